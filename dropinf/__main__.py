"""``python -m dropinf``: featurise a data set or score two gradient stores (``featurise``,
``score``: :mod:`dropinf.cli`, also under torchrun), or run the study's notebooks, list them, or
build the paper (``run``, ``list``, ``paper``: :mod:`dropinf.study.pipeline`)."""

import sys

if len(sys.argv) > 1 and sys.argv[1] in ("featurise", "score"):
    from .cli import main
else:
    from .study.pipeline import main

raise SystemExit(main())
