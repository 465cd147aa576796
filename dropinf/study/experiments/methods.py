"""The compared methods, in one table: name, label, colour, marker, family, how each is built
at a matched dimension and what it needs in memory, for every notebook.

:data:`METHODS` maps a name to its :class:`MethodSpec`. Families (:data:`FAMILIES`): the
``reference`` (``identity``, no compression, and notebook 02's exact and GGN influence), the
random ``mask`` (flat and factored dropout, uniform or by importance), random ``projection``
(dense and factored Gaussian, SJLT), ``fitted`` (PCA, fitted on the uncompressed training
gradients), ``composed`` (a flat mask, uniform or by importance, to ``oversample * k`` then
an SJLT to k, a :class:`dropinf.Chain`), and the ``baseline`` rankings of notebooks 04 and 05
(no compressor).
Notebooks group, compare and write conclusions by family (:func:`in_family`), so a compressor
added to the study is one :class:`MethodSpec` (plus its library class) and appears in every
table, figure and conclusion.

Matched dimension (:func:`match`): factored dropout at rate p per side fixes the dimension k
that every other method is built with (:meth:`MethodSpec.compressor`): flat dropout at rate
``1 - k / d``, factored Gaussian at the same p (the same per-layer sizes by construction), the
dense Gaussian, SJLT and PCA at k. The rate comes either from the notebook (``p``) or from a
compression ratio r: then p is the one whose factored dimension is closest to ``d / r``
(:func:`factored_rate`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from ...blocks import BatchGrads
from ...compressors import PCA, SJLT, Chain, Compressor, Dropout, Gaussian, Identity, Layout
from ...task import Task

FAMILIES = ("reference", "mask", "projection", "fitted", "composed", "baseline")


@dataclass(frozen=True)
class Options:
    """What a notebook sets about how methods are built: SJLT's nonzeros per column (at most;
    :func:`sjlt_nonzeros`), the rows PCA is fitted on, and the composed method's first-stage
    size as a multiple of k."""

    sjlt_c: int = 1
    pca_n_fit: int = 1024
    oversample: int = 4


@dataclass(frozen=True)
class MethodSpec:
    """One compared method. ``make(match, seed, options)`` builds its unbound compressor (None
    for the references and baselines that are not compressors); ``needs_fit``: fitted on the
    uncompressed training gradients (so it needs them in memory); ``pilot``: fitted on a pilot
    set of training samples (importance dropout, by :func:`ready`); ``factored``: its maps are per
    layer (O(n_in + n_out) indices or ``k_in n_in + k_out n_out`` floats per layer), so its
    memory is not a function of d and is counted as 0 in :meth:`need_bytes`."""

    name: str
    label: str
    color: str
    marker: str
    family: str
    make: Callable[[Match, int, Options], Compressor] | None = None
    needs_fit: bool = False
    factored: bool = False
    pilot: bool = False

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family={self.family!r} of {self.name!r}; choose from {FAMILIES}")

    @property
    def compresses(self) -> bool:
        """Whether it is a compressor (built at a matched k), not a reference or baseline."""
        return self.make is not None and self.family != "reference"

    def compressor(self, m: Match, seed: int, **options) -> Compressor:
        """The unbound compressor at the matched setting ``m``, drawn from ``seed`` (PCA not
        yet fitted, see :func:`ready`); ``options``: fields of :class:`Options`."""
        if self.make is None:
            raise ValueError(f"method {self.name!r} ({self.family}) is not a compressor")
        return self.make(m, seed, Options(**options))

    def stored_bytes(self, m: Match, **options) -> int:
        """The map it would store at ``m`` (``Compressor.map_bytes``, from the arguments alone:
        :meth:`~dropinf.Compressor.stored_bytes`); 0 for a factored method."""
        return 0 if self.factored else self.compressor(m, 0, **options).stored_bytes(m.d)

    def need_bytes(self, m: Match, **options) -> int:
        """What it holds beyond the model and data at ``m``, stored or regenerable, with a fit's
        workspace (:meth:`~dropinf.Compressor.held_bytes`); 0 for a factored method."""
        return 0 if self.factored else self.compressor(m, 0, **options).held_bytes(m.d)


def sjlt_nonzeros(k: int, c: int) -> int:
    """The largest divisor of k that is at most c (SJLT needs c to divide k)."""
    return max(j for j in range(1, min(c, k) + 1) if k % j == 0)


def _chain(m: Match, seed: int, o: Options) -> Chain:
    """Flat dropout to ``min(d, oversample * k)`` coordinates, then an SJLT (c = 1) to k."""
    return Chain(Dropout(1.0 - min(m.d, o.oversample * m.k) / m.d, seed=seed), SJLT(m.k, seed=seed))


def _importance_chain(m: Match, seed: int, o: Options) -> Chain:
    """:func:`_chain` with an importance mask as its first stage (fitted by :func:`ready`)."""
    keep = 1.0 - min(m.d, o.oversample * m.k) / m.d
    return Chain(Dropout(keep, importance=True, seed=seed), SJLT(m.k, seed=seed))


def _spec(*args, **kwargs) -> tuple[str, MethodSpec]:
    return args[0], MethodSpec(*args, **kwargs)


METHODS: dict[str, MethodSpec] = dict([
    _spec("exact", "exact (Hessian)", "0.15", "h", "reference"),
    _spec("ggn", "exact GGN", "0.35", "8", "reference"),
    _spec("identity", "no compression", "black", "*", "reference", lambda m, s, o: Identity()),
    _spec("dropout", "dropout (flat)", "C3", "s", "mask",
          lambda m, s, o: Dropout(m.p_flat, seed=s)),
    _spec("dropout_factored", "dropout (factored)", "C1", "o", "mask",
          lambda m, s, o: Dropout(m.p, factored=True, seed=s), factored=True),
    _spec("gaussian", "Gaussian (dense)", "C0", "D", "projection",
          lambda m, s, o: Gaussian(m.k, seed=s)),
    _spec("gaussian_factored", "Gaussian (factored, LoGra)", "C9", "^", "projection",
          lambda m, s, o: Gaussian(factored=True, p=m.p, seed=s), factored=True),
    _spec("sjlt", "SJLT", "C2", "v", "projection",
          lambda m, s, o: SJLT(m.k, sjlt_nonzeros(m.k, o.sjlt_c), seed=s)),
    _spec("pca", "PCA", "C4", "x", "fitted",
          lambda m, s, o: PCA(m.k, n_fit=o.pca_n_fit, seed=s), needs_fit=True),
    _spec("dropout_imp", "importance dropout (flat)", "darkred", "<", "mask",
          lambda m, s, o: Dropout(m.p_flat, importance=True, seed=s), pilot=True),
    _spec("dropout_factored_imp", "importance dropout (factored)", "goldenrod", ">", "mask",
          lambda m, s, o: Dropout(m.p, factored=True, importance=True, seed=s),
          factored=True, pilot=True),
    _spec("dropout_sjlt", "dropout then SJLT (beyond the paper)", "C6", "P", "composed", _chain),
    _spec("dropout_imp_sjlt", "importance dropout then SJLT", "m", "p", "composed",
          _importance_chain, pilot=True),
    _spec("random", "random", "0.6", ".", "baseline"),
    _spec("loss", "training loss (baseline)", "C5", ".", "baseline"),
    _spec("harmful", "most harmful", "C8", ".", "baseline"),
])
IDENTITY = "identity"
ANCHOR = "dropout_factored"  # its dimension at rate p is the matched k (:func:`match`)


def spec(name: str) -> MethodSpec:
    """The :class:`MethodSpec` of ``name`` (ValueError naming the known ones)."""
    if name not in METHODS:
        raise ValueError(f"method={name!r} is not one of {tuple(METHODS)}")
    return METHODS[name]


def family(name: str) -> str:
    """The family of method ``name``."""
    return spec(name).family


def in_family(names: Iterable[str], *families: str) -> tuple[str, ...]:
    """Those of ``names`` whose family is one of ``families``, in the given order."""
    return tuple(n for n in names if family(n) in families)


COMPRESSING = ("mask", "projection", "fitted", "composed")


def compressors() -> tuple[str, ...]:
    """Every compressor of the table (what a notebook may be asked to run), in table order."""
    return compared(*COMPRESSING)


def compared(*families: str) -> tuple[str, ...]:
    """Every method of the table in ``families`` (default: the compressors compared against
    each other, families mask, projection and fitted), in table order."""
    return in_family(METHODS, *(families or ("mask", "projection", "fitted")))


def uniform_of(name: str) -> str | None:
    """The uniform method an importance method (``pilot``) is compared with: the first of the
    table in its family with the same ``factored`` and no pilot (None for other methods)."""
    s = spec(name)
    if not s.pilot:
        return None
    return next((m for m, t in METHODS.items() if t.family == s.family
                 and t.factored == s.factored and not t.pilot and t.make is not None), None)


def label(name: str) -> str:
    """The method's label (an unknown name is its own label: a notebook's own rows)."""
    return METHODS[name].label if name in METHODS else name


def color(name: str) -> str:
    return spec(name).color


def marker(name: str) -> str:
    return spec(name).marker


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


def build(method: str, m: Match, seed: int, **options) -> Compressor:
    """The unbound compressor of ``method`` at the matched setting ``m`` (:class:`MethodSpec`)."""
    return spec(method).compressor(m, seed, **options)


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


def _unfitted_importance(comp: Compressor) -> Dropout | None:
    """The importance mask of ``comp`` (itself or a chain's first stage) if not yet fitted."""
    c = comp.first if isinstance(comp, Chain) else comp
    return c if isinstance(c, Dropout) and c.importance and c.probs is None else None


def pilot_subset(n: int, size: int, seed: int) -> np.ndarray:
    """(size,) sorted training indices of a pilot set, drawn without replacement from ``seed``."""
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= n:
        raise ValueError(f"n_pilot={size!r} must be an integer in [1, {n}] (the training points)")
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def pilot_grads(task: Task, loader: Iterable, check: bool = True) -> list[BatchGrads]:
    """The full per-sample gradients of the pilot batches ``loader`` yields (in eval mode, on
    the model's device): computed once, they serve every importance fit of :func:`ready`
    (``Dropout.fit_grads``), at every rate and draw."""
    from ...persample import PerSampleGrads
    from ...task import as_tree, to_device

    with task.evaluating(), PerSampleGrads(task, check=check) as psg:
        return [psg(to_device(as_tree(batch), task.device))[0] for batch in loader]


def fit_pilot(comp: Compressor, task: Task | Layout, pilot: Iterable | None) -> Compressor:
    """``comp`` with its unfitted importance mask (itself or a chain's first stage) fitted on
    ``pilot`` (see :func:`ready`); unchanged where it has none. ValueError without a pilot."""
    if (imp := _unfitted_importance(comp)) is None:
        return comp
    if pilot is None:
        raise ValueError(f"{comp!r} is fitted on a pilot set of training samples: pass pilot")
    if isinstance(pilot, (list, tuple)) and pilot and all(isinstance(b, BatchGrads)
                                                           for b in pilot):
        imp.fit_grads(task, pilot)
    elif isinstance(task, Task):
        imp.fit(task, pilot)
    else:
        raise TypeError(f"pilot={type(pilot).__name__}: with a Layout (no model) instead of a "
                        "Task, pass the pilot's per-sample gradients as a list of BatchGrads")
    return comp


def ready(comp: Compressor, task: Task | Layout, k: int, G_train: Tensor | None = None,
          pca_cache: dict | None = None, pilot: Iterable | None = None) -> Compressor | None:
    """``comp`` bound to ``task`` with output dimension k checked. An unfitted PCA is first
    fitted on ``G_train`` (:func:`fit_pca`), and None returned if it cannot span k; an unfitted
    importance mask (alone or a chain's first stage) is fitted on ``pilot``: batches of
    training samples (``Dropout.fit``), or a list of their full per-sample gradients
    (:class:`~dropinf.BatchGrads` as ``PerSampleGrads(task)`` gives them; ``Dropout.fit_grads``),
    which lets many masks share one backward pass over the pilot set. ``task`` may be a
    :class:`~dropinf.compressors.Layout` where nothing needs a model (``pilot`` as gradients)."""
    fit_pilot(comp, task, pilot)
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
