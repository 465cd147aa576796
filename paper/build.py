"""Build paper/paper.md from results/<profile>/: ``python paper/build.py [--profile gpu]``.

A thin wrapper around ``python -m dropinf paper`` (the logic is dropinf.pipeline.build_paper).
"""

import sys

from dropinf.pipeline import main

if __name__ == "__main__":
    sys.exit(main(["paper", *sys.argv[1:]]))
