"""dropinf: influence functions with dropout as the gradient compressor.

Sign convention everywhere: a positive influence score means the training point is helpful to
the test point (removing it would raise the test loss).
"""

from . import distributed, losses
from ._version import __version__
from .blocks import BatchGrads
from .compressors import (
    PCA,
    REGISTRY,
    SJLT,
    Chain,
    Compressor,
    Dropout,
    Gaussian,
    Identity,
    Layout,
    make,
)
from .curvature import Preconditioner
from .gradients import Gradients, gradients
from .persample import PerSampleGrads
from .scores import scores, self_influence, top_k
from .store import CorruptStoreError, Store, StoreLockedError
from .task import Task

__all__ = [
    "PCA",
    "REGISTRY",
    "SJLT",
    "Dropout",
    "Gaussian",
    "Layout",
    "BatchGrads",
    "Chain",
    "Compressor",
    "CorruptStoreError",
    "Gradients",
    "Identity",
    "PerSampleGrads",
    "Store",
    "StoreLockedError",
    "Task",
    "distributed",
    "gradients",
    "losses",
    "__version__",
    "Preconditioner",
    "scores",
    "self_influence",
    "top_k",
    "make",
]
