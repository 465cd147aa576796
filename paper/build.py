"""Build paper/paper.md from results/<profile>/: ``python paper/build.py [--profile gpu]``.

A thin wrapper around ``python -m dropinf paper`` (the logic is dropinf.study.pipeline.build_paper).
"""

import sys

from dropinf.study.pipeline import main

if __name__ == "__main__":
    sys.exit(main(["paper", *sys.argv[1:]]))
