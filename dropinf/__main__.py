"""``python -m dropinf``: run the study's notebooks, list them, or build the paper."""

from .study.pipeline import main

raise SystemExit(main())
