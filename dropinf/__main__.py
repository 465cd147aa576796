"""``python -m dropinf``: run the study's notebooks, list them, or build the paper."""

from .pipeline import main

raise SystemExit(main())
