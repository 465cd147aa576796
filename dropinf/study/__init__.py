"""The study of dropinf: its data sets and models, the metrics and retraining it evaluates
scores with, one experiment module per notebook (:mod:`.experiments`), the papermill runner
(:mod:`.pipeline`, ``python -m dropinf``) and the results it saves (:mod:`.results`).

Not part of the library: it needs the ``study`` extra (``pip install dropinf[study]``).
"""

from . import metrics, models, retrain


def __getattr__(name: str):
    # dropinf.study.data is imported on first use, so that `python -m dropinf.study.data` runs it
    # fresh.
    if name == "data":
        import importlib

        return importlib.import_module(".data", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["metrics", "models", "retrain"]
