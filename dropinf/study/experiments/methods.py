"""The compared methods: their names, labels and colours, how each is built at a matched
dimension, in one place for every notebook.

Names: :data:`IDENTITY` (no compression) and :data:`METHODS`: ``dropout`` (flat) and
``dropout_factored``, ``gaussian`` (a dense projection) and ``gaussian_factored`` (LoGra's),
``sjlt`` and ``pca``; plus notebook 06's two-stage :data:`VARIANT`. Each has one label
(:data:`LABELS`), one colour (:data:`COLORS`) and one marker (:data:`MARKERS`) in every figure.

Matched dimension (:func:`match`): factored dropout at rate p per side fixes the dimension k
that every other method is built with (:func:`build`): flat dropout at rate ``1 - k / d``,
factored Gaussian at the same p (the same per-layer sizes by construction), the dense Gaussian,
SJLT and PCA at k. The rate comes either from the notebook (``p``) or from a compression ratio
r: then p is the one whose factored dimension is closest to ``d / r`` (:func:`factored_rate`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from ...compressors import PCA, SJLT, Compressor, Dropout, Gaussian, Identity, Layout
from ...task import Task

IDENTITY = "identity"
METHODS = ("dropout", "dropout_factored", "gaussian", "gaussian_factored", "sjlt", "pca")
VARIANT = "dropout_sjlt"  # notebook 06: flat dropout to a multiple of k, then an SJLT to k
LABELS = {
    IDENTITY: "no compression",
    "dropout": "dropout (flat)",
    "dropout_factored": "dropout (factored)",
    "gaussian": "Gaussian (dense)",
    "gaussian_factored": "Gaussian (factored, LoGra)",
    "sjlt": "SJLT",
    "pca": "PCA",
    VARIANT: "dropout then SJLT (beyond the paper)",
}
COLORS = {
    IDENTITY: "black",
    "dropout": "C3",
    "dropout_factored": "C1",
    "gaussian": "C0",
    "gaussian_factored": "C9",
    "sjlt": "C2",
    "pca": "C4",
    VARIANT: "C6",
    # baselines of notebooks 04 and 05
    "random": "0.6",
    "loss": "C5",
    "harmful": "C8",
}
MARKERS = {
    IDENTITY: "*",
    "dropout": "s",
    "dropout_factored": "o",
    "gaussian": "D",
    "gaussian_factored": "^",
    "sjlt": "v",
    "pca": "x",
    VARIANT: "P",
}
DENSE_MAPS = ("gaussian", "pca")  # the methods that store a (k, d) float32 matrix


# --------------------------------------------------------------------------- matched dimension


@dataclass(frozen=True)
class Match:
    """One compression setting: factored dropout's rate ``p`` per side, the common output
    dimension ``k`` it gives, and the gradient dimension ``d``."""

    p: float
    k: int
    d: int

    @property
    def ratio(self) -> float:
        """The actual compression ratio ``d / k``."""
        return self.d / self.k

    @property
    def p_flat(self) -> float:
        """Flat dropout's rate: it keeps ``round((1 - p_flat) d) = k`` coordinates."""
        return 1.0 - self.k / self.d


def match(model: Task | Layout, ratio: float | None = None, p: float | None = None) -> Match:
    """The matched setting at factored dropout rate ``p``, or at the rate whose dimension is
    closest to ``d / ratio`` (:func:`factored_rate`); give one of the two."""
    layout = Layout.of(model) if isinstance(model, Task) else model
    if (ratio is None) == (p is None):
        raise ValueError(f"give ratio or p, not both or neither (ratio={ratio!r}, p={p!r})")
    if ratio is not None:
        if not (isinstance(ratio, (int, float)) and ratio >= 1):
            raise ValueError(f"ratio={ratio!r} must be a compression ratio d / k >= 1")
        p, k = factored_rate(layout, ratio)
    else:
        k = Dropout(p, factored=True).bind(layout).dim
    return Match(float(p), k, layout.dim)


def factored_rate(layout: Layout, ratio: float) -> tuple[float, int]:
    """The dropout rate p whose factored dropout has the dimension closest to ``d / ratio`` in
    log scale, and that dimension; p is the smallest multiple of 1e-4 giving it."""
    target = layout.dim / ratio

    @functools.cache
    def dim(j: int) -> int:  # non-increasing in j, the rate in units of 1e-4
        return Dropout(j / 10_000, factored=True).bind(layout).dim

    def first(pred: Callable[[int], bool]) -> int:
        """Smallest j in [0, 9999] with pred(j) for a pred false then true (10000 if never)."""
        lo, hi = -1, 10_000
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if pred(mid) else (mid, hi)
        return hi

    below = first(lambda j: dim(j) < target)  # the first rate that falls short of the target
    candidates = [j for j in (below - 1, below) if 0 <= j <= 9999]
    j = min(candidates, key=lambda j: abs(math.log(dim(j) / target)))
    k = dim(j)
    j = first(lambda i: dim(i) <= k)
    return j / 10_000, k


# --------------------------------------------------------------------------- building


def sjlt_nonzeros(k: int, c: int) -> int:
    """The largest divisor of k that is at most c (SJLT needs c to divide k)."""
    return max(j for j in range(1, min(c, k) + 1) if k % j == 0)


def dense_map_bytes(method: str, k: int, d: int) -> int:
    """Bytes of the (k, d) float32 matrix a method must store (0 for the others)."""
    return 4 * k * d if method in DENSE_MAPS else 0


def build(method: str, m: Match, seed: int, sjlt_c: int = 1, pca_n_fit: int = 1024
          ) -> Compressor:
    """The unbound compressor of ``method`` at the matched setting ``m``, drawn from ``seed``:
    SJLT with ``sjlt_nonzeros(k, sjlt_c)`` nonzeros per column, PCA (not yet fitted, see
    :func:`ready`) on ``pca_n_fit`` training gradients; ``identity`` ignores ``m``."""
    if method == IDENTITY:
        return Identity()
    if method == "dropout":
        return Dropout(m.p_flat, seed=seed)
    if method == "dropout_factored":
        return Dropout(m.p, factored=True, seed=seed)
    if method == "gaussian":
        return Gaussian(m.k, seed=seed)
    if method == "gaussian_factored":
        return Gaussian(factored=True, p=m.p, seed=seed)
    if method == "sjlt":
        return SJLT(m.k, sjlt_nonzeros(m.k, sjlt_c), seed=seed)
    if method == "pca":
        return PCA(m.k, n_fit=pca_n_fit, seed=seed)
    raise ValueError(f"method={method!r} is not one of {(IDENTITY, *METHODS)}")


def fit_pca(pca: PCA, G_train: Tensor, cache: dict | None = None) -> PCA | None:
    """``pca`` fitted on its ``n_fit`` rows of the (n, d) uncompressed training gradients, or
    None when k exceeds the ``min(n_fit, n, d)`` directions they span.

    With a ``cache`` dict (for one ``G_train``), one singular value decomposition per
    ``(seed, n_fit)`` serves every k: the same sample and decomposition give the first k
    components, so the result equals a fit at k.
    """
    n, d = G_train.shape
    most = min(pca.n_fit, n, d)
    if pca.k > most:
        return None
    if cache is None:
        return pca.fit(G_train)
    key = (pca.seed, pca.n_fit)
    if key not in cache:
        cache[key] = PCA(most, n_fit=pca.n_fit, seed=pca.seed).fit(G_train)
    out = PCA(pca.k, n_fit=pca.n_fit, seed=pca.seed)
    out.components = cache[key].components[: pca.k].contiguous()
    return out


def ready(comp: Compressor, task: Task, k: int, G_train: Tensor | None = None,
          pca_cache: dict | None = None) -> Compressor | None:
    """``comp`` bound to ``task`` with output dimension k checked; an unfitted PCA is first
    fitted on ``G_train`` (:func:`fit_pca`), and None returned if it cannot span k."""
    if isinstance(comp, PCA) and comp.components is None:
        if G_train is None:
            raise ValueError("PCA is fitted on the uncompressed training gradients: pass G_train")
        comp = fit_pca(comp, G_train, pca_cache)
        if comp is None:
            return None
    comp.bind(task)
    if comp.dim != k:
        raise RuntimeError(f"{comp!r} has dimension {comp.dim}, not the matched k={k}")
    return comp
