"""Gradient compressors: one interface, a registry by name.

A compressor maps per-sample gradients in R^d to R^k with one fixed random draw shared by every
sample, so compressed inner products are comparable across samples. It is fully determined by
its constructor arguments (kind, size, seed: its ``fingerprint``) and the model's parameter
layout. Every compressor is scaled so that compressed dot products are unbiased estimates of
the uncompressed ones: ``E[ahat . bhat] = a . b`` (PCA, which is deterministic, is exact on the
span it keeps).

Life cycle: ``bind(layout)`` once with the task's :class:`Layout` (masks and projections are
drawn here, on the CPU from the seed, so they are the same on every device), then
``compress(bg)`` per batch of :class:`~dropinf.blocks.BatchGrads`, returning ``(B, dim)``.
Random draws are made per parameter (or per layer) with a seed derived from the compressor's
seed and the parameter's name, so a model of any size never needs a k x d matrix at once.

Output order: flat compressors follow the parameter order of ``Task.params``; factored ones
give each factored layer's ``(k_out, k_in)`` block row-major (bias unit last among the inputs),
layers in model order, followed by the flat compression of the remaining parameters.
"""

from __future__ import annotations

import json
import math
import numbers
import warnings
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from .blocks import BatchGrads, DenseGrad, FactorReducer, LinearFactors, ReducedFactors
from .plan import FactorSpec, factor_specs
from .task import ParamInfo, Task

REGISTRY: dict[str, type[Compressor]] = {}
F32 = torch.float32  # every map is drawn in float32, whatever the default dtype


@dataclass(frozen=True)
class Layout:
    """What a compressor needs to know of a model: its selected parameters and factored layers."""

    params: tuple[ParamInfo, ...]
    factored: tuple[FactorSpec, ...]

    @classmethod
    def of(cls, task: Task) -> Layout:
        return cls(tuple(task.params), tuple(factor_specs(task)))

    @property
    def dim(self) -> int:
        return self.params[-1].stop

    def rest(self) -> tuple[ParamInfo, ...]:
        """Parameters that no factored layer covers (LayerNorm, embeddings, tied, torch.func)."""
        covered = {p for s in self.factored for p in s.params}
        return tuple(p for p in self.params if p.name not in covered)


def _generator(seed: int, *keys: object) -> torch.Generator:
    """A CPU generator for one named draw; the same (seed, keys) give the same stream anywhere."""
    words = [seed] + [zlib.crc32(str(k).encode()) for k in keys]
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _check_rate(p: float) -> float:
    if not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"dropout rate p={p!r} is outside [0, 1); p is the fraction dropped")
    return float(p)


def _side(n: int, p: float) -> int:
    """Units kept out of n at rate p by a fixed-size mask (at least one)."""
    return max(1, round((1.0 - p) * n))


def _check_block(block: int) -> int:
    if isinstance(block, bool) or not isinstance(block, numbers.Integral) or block < 1:
        raise ValueError(f"block={block!r}: units per mask block must be an integer >= 1")
    return int(block)


def _check_flag(name: str, value: object) -> bool:
    """A True/False argument; anything else (the string "False", say, which bool() would read
    as True) is a TypeError naming it."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r} must be True or False")
    return value


def _n_blocks(n: int, block: int) -> int:
    """Mask blocks over n units: aligned runs of ``block``; the last also takes the remainder
    ``n mod block`` (so no block is shorter than ``block`` unless n is); none when n = 0."""
    return max(1, n // block) if n > 0 else 0


def _expand(kept: Tensor, n: int, block: int) -> Tensor:
    """Sorted unit indices (of n) covered by the sorted kept block indices ``kept``."""
    if block == 1:
        return kept
    m = _n_blocks(n, block)
    units = (kept[:, None] * block + torch.arange(block)).flatten()
    units = units[units < n]
    if len(kept) and int(kept[-1]) == m - 1 and n > m * block:  # the remainder
        units = torch.cat([units, torch.arange(m * block, n)])
    return units


class Compressor(ABC):
    """Base class. Subclasses set ``kind`` and are registered under it."""

    kind: ClassVar[str]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            REGISTRY[cls.kind] = cls

    layout: Layout | None = None

    def bind(self, layout: Layout | Task) -> Compressor:
        """Fix the input layout and draw the random map. Returns self."""
        if isinstance(layout, Task):
            layout = Layout.of(layout)
        if self.layout is not None:
            if self.layout != layout:
                raise ValueError(
                    f"{self!r} is already bound to another model's parameters; build a new one "
                    "with the same arguments (it makes the same draw) for this model"
                )
            return self
        self._draw(layout)  # first: a draw that raises leaves the compressor unbound
        self.layout = layout
        return self

    def _draw(self, layout: Layout) -> None:  # noqa: B027  (no draw by default)
        """Draw masks or projections for ``layout``."""

    @property
    def bound(self) -> Layout:
        """The layout; raises if :meth:`bind` has not been called."""
        if self.layout is None:
            raise RuntimeError(f"{self!r} is not bound to a model; call bind(task) first")
        return self.layout

    @property
    @abstractmethod
    def dim(self) -> int:
        """Output size k."""

    @property
    def map_bytes(self) -> int:
        """Bytes of map that must be stored (0 when it is regenerated from the seed)."""
        return 0

    def stored_bytes(self, d: int) -> int:
        """``map_bytes`` this compressor will have once bound to a flat input of ``d``
        coordinates, from its arguments alone (nothing is drawn, so a caller can decide
        beforehand whether it fits). Factored compressors depend on the layers: they refuse."""
        return 0

    def held_bytes(self, d: int) -> int:
        """Bytes held in use on a flat input of ``d`` coordinates, from the arguments alone:
        :meth:`stored_bytes` plus the indices or hashes that the seed regenerates but that are
        kept while in use, and a fit's workspace."""
        return self.stored_bytes(d)

    @abstractmethod
    def config(self) -> dict:
        """Constructor arguments: with ``kind``, they determine the compressor completely."""

    @property
    def fingerprint(self) -> str:
        """Deterministic description saved beside results."""
        return json.dumps({"kind": self.kind, **self.config()}, sort_keys=True)

    def reducers(self, device: torch.device) -> dict[str, FactorReducer]:
        """Maps of layer factors that :class:`~dropinf.PerSampleGrads` applies at capture time,
        by module name (none by default: the compressor reads the full factors)."""
        return {}

    @abstractmethod
    def compress(self, bg: BatchGrads) -> Tensor:
        """(B, dim) compressed per-sample gradients of one batch: float64 for a float64
        model, float32 otherwise (maps are drawn in float32 whatever the default dtype, so a
        fingerprint always means the same map)."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


def make(kind: str, **kwargs) -> Compressor:
    """Build a compressor from its registry name, e.g. ``make("dropout", p=0.9, seed=0)``."""
    if kind not in REGISTRY:
        raise ValueError(f"unknown compressor kind {kind!r}; choose one of {sorted(REGISTRY)}")
    return REGISTRY[kind](**kwargs)


class Identity(Compressor):
    """No compression: the full per-sample gradient, ``dim == d``."""

    kind = "identity"

    @property
    def dim(self) -> int:
        return self.bound.dim

    def config(self) -> dict:
        return {}

    def compress(self, bg: BatchGrads) -> Tensor:
        return bg.flat()


# ----------------------------------------------------------------------------- flat pieces


class _FlatMask:
    """A dropout mask over the concatenation of ``params``: kept coordinates of each parameter.

    The mask keeps or drops blocks of ``block`` consecutive coordinates of each parameter
    (flattened; :func:`_n_blocks`), single coordinates when ``block == 1``. Over the M blocks of
    all parameters, ``fixed`` keeps exactly ``K = round((1-p) M)``, a uniform K-subset (counts
    per parameter are multivariate hypergeometric, then a uniform subset within each), scaled by
    ``sqrt(M/K)``; ``bernoulli`` keeps each block with probability ``1-p``, scaled by
    ``1/sqrt(1-p)``. Every coordinate is kept with the probability its scale undoes.
    """

    def __init__(self, params: tuple[ParamInfo, ...], p: float, law: str, seed: int,
                 block: int = 1):
        self.params = params
        sizes = [_n_blocks(q.numel, block) for q in params]
        m = sum(sizes)
        self.index: dict[str, Tensor] = {}
        if not params:
            self.scale, self.dim = 1.0, 0
            return
        if law == "fixed":
            k = round((1.0 - p) * m)
            if k < 1:
                what = "coordinates" if block == 1 else f"blocks of {block} coordinates"
                raise ValueError(
                    f"dropout rate p={p} keeps none of the {m} {what} (round((1-p) {m}) = 0); "
                    f"use p <= {1 - 1 / m:.6g}" + ("" if block == 1 else " or a smaller block")
                )
            rng = np.random.default_rng([seed, 0x5EED])
            counts = rng.multivariate_hypergeometric(sizes, k)
            for q, n, c in zip(params, sizes, counts):
                perm = torch.randperm(n, generator=_generator(seed, "flat", q.name))
                self.index[q.name] = _expand(perm[: int(c)].sort().values, q.numel, block)
            self.scale = math.sqrt(m / k)
        else:
            for q, n in zip(params, sizes):
                u = torch.rand(n, generator=_generator(seed, "flat", q.name), dtype=F32)
                kept = (u < 1.0 - p).nonzero().flatten()
                self.index[q.name] = _expand(kept, q.numel, block)
            self.scale = 1.0 / math.sqrt(1.0 - p)
        self.dim = sum(len(i) for i in self.index.values())

    def apply(self, bg: BatchGrads) -> list[Tensor]:
        out = []
        for q in self.params:
            idx = _on(self, q.name, self.index[q.name], bg.device)
            if len(idx):
                out.append(bg.param_grad(q)[:, idx] * self._scale(q, bg))
        return out

    def _scale(self, q: ParamInfo, bg: BatchGrads) -> float | Tensor:
        """The kept coordinates' scale: one number for the uniform mask."""
        return self.scale


class _Projection:
    """``z = M g`` for a (k, d) matrix stored per parameter as (k, numel) blocks (Gaussian, PCA)."""

    def __init__(self, params: tuple[ParamInfo, ...], blocks: dict[str, Tensor], k: int):
        self.params, self.blocks, self.dim = params, blocks, k if params else 0

    @classmethod
    def gaussian(cls, params: tuple[ParamInfo, ...], k: int, seed: int) -> _Projection:
        """iid N(0, 1/k) entries, drawn per parameter from (seed, name)."""
        blocks = {
            q.name: torch.randn(k, q.numel, generator=_generator(seed, "gauss", q.name), dtype=F32)
            / math.sqrt(k)
            for q in params
        }
        return cls(params, blocks, k)

    @property
    def map_bytes(self) -> int:
        return _nbytes(self.blocks.values())

    def apply(self, bg: BatchGrads) -> list[Tensor]:
        if not self.params:
            return []
        z = torch.zeros(bg.size, self.dim, device=bg.device, dtype=bg.dtype)
        for q in self.params:
            z += bg.param_grad(q) @ _on(self, q.name, self.blocks[q.name], bg.device, bg.dtype).T
        return [z]


def _on(
    owner: object, key: str, t: Tensor, device: torch.device, dtype: torch.dtype | None = None
) -> Tensor:
    """``t`` on ``device`` (and in ``dtype``, for a float map): maps are drawn on the CPU in
    float32, so copy them to an accelerator or to float64 once (cached on ``owner`` under
    ``key``), not once per batch."""
    dtype = t.dtype if dtype is None or not t.is_floating_point() else dtype
    if t.device == device and t.dtype == dtype:
        return t
    cache = owner.__dict__.setdefault("_on_device", {})
    if (key, device, dtype) not in cache:
        cache[key, device, dtype] = t.to(device, dtype)
    return cache[key, device, dtype]


def _work(t: Tensor) -> Tensor:
    """The dtype compression works in: float64 for a float64 model, float32 otherwise."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _cat(parts: list[Tensor], bg: BatchGrads) -> Tensor:
    if parts:
        return torch.cat(parts, 1)
    return torch.zeros(bg.size, 0, device=bg.device, dtype=bg.dtype)


def _layer_blocks(bg: BatchGrads) -> dict[str, list[LinearFactors | ReducedFactors]]:
    out: dict[str, list[LinearFactors | ReducedFactors]] = {}
    for b in bg.blocks:
        if isinstance(b, LinearFactors | ReducedFactors):
            out.setdefault(b.module, []).append(b)
    return out


def _dense_layer(s: FactorSpec, bg: BatchGrads) -> Tensor | None:
    """(B, n_out, n_in_aug) per-sample gradient of factored layer ``s`` (bias column last) when
    its parameters came as plain per-sample gradients rather than factors (the self-check of
    :class:`~dropinf.PerSampleGrads` sent them to ``torch.func``); None when they did not."""
    if not any(isinstance(b, DenseGrad) and s.weight in b.params for b in bg.blocks):
        return None
    info = {q.name: q for q in bg.params}
    W = bg.param_grad(info[s.weight])
    if s.transposed:  # stored (I, O)
        W = W.view(bg.size, s.n_in, s.n_out).transpose(1, 2)
    else:
        W = W.view(bg.size, s.n_out, s.n_in)
    if s.bias is not None:
        W = torch.cat([W, bg.param_grad(info[s.bias]).unsqueeze(-1)], -1)
    return W


def _reduced(blocks: list) -> Tensor | None:
    """The product of a layer's reduced factors, or None if it was captured in full."""
    if len(blocks) == 1 and isinstance(blocks[0], ReducedFactors):
        return blocks[0].product()
    return None


# ----------------------------------------------------------------------------- dropout


class Dropout(Compressor):
    """Dropout as a compressor: keep a random subset of coordinates (or of units), rescaled.

    Args:
        p: dropout rate in [0, 1), the fraction dropped.
        factored: False keeps ``round((1-p) d)`` coordinates of the flat per-sample gradient.
            True drops input and output units of each factored layer (Linear, Conv2d, Conv1D)
            at rate p and forms ``delta[S_out] x[S_in]^T`` from the layer's factors, never the
            full gradient; it keeps about ``(1-p)^2`` of each layer's weights. The bias is an
            extra input unit of value 1 and is dropped like any other input unit (its gradient
            is kept for the kept output units exactly when the bias unit is kept). Parameters
            outside factored layers get flat dropout at the same rate and law.
        mask: ``"fixed"`` (exactly ``round((1-p) n)`` of n, uniform without replacement) or
            ``"bernoulli"`` (each independently with probability 1-p).
        block: units (or, for the flat mask, coordinates of each parameter) are kept or dropped
            together in aligned blocks of ``block`` consecutive ones; the last block of a side
            also takes the remainder (so the bias unit joins the last block of inputs when
            ``n_in`` is a multiple of ``block``). The laws above then apply to blocks: a fixed
            mask keeps ``max(1, round((1-p) m))`` of a side's ``m = max(1, n // block)``
            blocks, scaled by ``sqrt(m/k)``; a Bernoulli mask keeps each block with
            probability 1-p. A side of fewer than ``2 * block`` units is one block: a fixed
            mask keeps it whole (no compression there) and a Bernoulli mask keeps or drops it
            whole (a warning names such layers). 1 (the default) is plain unit dropout. With
            16 fp32 units to a 64-byte line, a gather of single units at rate p touches a
            fraction ``1 - p^16`` of a factor's cache lines (81% at p = 0.9); aligned blocks of
            16 touch only the kept ones. The estimate then samples blocks: for the flat mask
            its variance is the mask law's formula applied to the per-block sums of
            ``a_i b_i`` (:meth:`dropinf.theory.PairStats.of` with ``block``), which for a
            fixed mask with blocks of equal size equals the unit mask's on average over the
            order of the units.
        seed: the draw.
        importance: False (the default) keeps every unit with the same probability. True keeps
            unit i (a coordinate for the flat mask; an output or input unit of a factored layer,
            or a block of them) with its own probability pi_i, estimated by :meth:`fit` on a
            pilot set, and scales it by ``1/sqrt(pi_i)`` (see "Importance" below).
        floor: with ``importance=True``, the smallest keep probability as a fraction of the
            uniform rate (default 0.1: no unit is kept with probability below ``0.1 (1-p)``).

    Kept entries are scaled by ``sqrt(n/k)`` per side for a fixed mask (k out of n; this
    differs from ``1/sqrt(1-p)`` once k is rounded) and ``1/sqrt(1-p)`` for Bernoulli, so
    compressed dot products are unbiased. No map is stored: the mask is regenerated from the
    seed (``map_bytes == 0``).

    Importance (``importance=True``): ``Dropout(p, importance=True).fit(task, pilot)`` sums
    the squared per-sample gradients of the pilot samples per coordinate (flat mask and the
    parameters outside factored layers) or, for each factored layer, per output unit (the
    mass ``sum_j G[o, j]^2`` of row o of the per-sample weight gradient, bias column
    included) and per input unit (column masses, the bias unit last), summed over each mask
    block. These masses w become keep probabilities ``pi = clip(lam w, floor (1-p), 1)``
    with the expected kept count of the uniform mask: ``sum pi = round((1-p) n)`` per side
    (``max(1, .)``; for the flat mask over all its coordinates together) for ``"fixed"`` and
    ``(1-p) n`` for ``"bernoulli"`` (:func:`dropinf.theory.allocate`, which derives why
    probabilities proportional to the second moment minimise the variance ``sum (1/pi - 1)
    E[a_i^2 b_i^2]`` of the mask; for a factored layer it is exact for the dominant term
    ``sum (1/pi_o)(1/rho_j) E[C_oj^2]`` when the second moments of the gradient are
    separable, ``E[G_oj^2] = u_o v_j``). The floor keeps every unit with a positive
    probability, so the estimate stays unbiased for any input, also for a unit that was 0 on
    the whole pilot set (which gets the floor); a side that is 0 throughout is uniform.
    Laws: ``"bernoulli"`` keeps each unit independently with probability pi_i (Poisson);
    ``"fixed"`` keeps exactly ``sum pi`` units by systematic sampling in a random order
    (units with pi = 1 always, the rest laid end to end as intervals of length pi_i, hit by
    equally spaced points from a uniform start), whose inclusion probabilities are exactly
    pi, so ``dim`` is the uniform mask's. Kept units are scaled by ``1/sqrt(pi_i)``, a
    factored layer's kept ``(o, j)`` entry by ``1/sqrt(pi_o rho_j)`` (the two sides are drawn
    independently, so it is kept with probability ``pi_o rho_j``): every compressed inner
    product is unbiased. The variances are :func:`dropinf.theory.importance_variance` and
    :func:`dropinf.theory.factored_importance_variance`. The probabilities (float64, one per
    block of each side, and one per coordinate of the flat part) must be stored:
    ``map_bytes`` counts them and the fingerprint holds their hash, so gradients computed
    with one fit are not mixed with another's. A fitted compressor can be bound to the model
    it was fitted on only; using it before :meth:`fit` raises.
    """

    kind = "dropout"

    def __init__(self, p: float, factored: bool = False, mask: str = "fixed", seed: int = 0,
                 block: int = 1, importance: bool = False, floor: float | None = None):
        self.p = _check_rate(p)
        if mask not in ("fixed", "bernoulli"):
            raise ValueError(f"mask={mask!r}; choose 'fixed' or 'bernoulli'")
        self.factored, self.mask, self.seed = _check_flag("factored", factored), mask, int(seed)
        self.block = _check_block(block)
        self.importance = _check_flag("importance", importance)
        if floor is not None and not self.importance:
            raise ValueError(f"floor={floor!r} applies to importance=True only")
        floor = 0.1 if floor is None else floor
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 < floor <= 1:
            raise ValueError(
                f"floor={floor!r}: the smallest keep probability, as a fraction of the uniform "
                "rate 1-p, must be in (0, 1] (1 gives the uniform mask)"
            )
        self.floor = float(floor)
        self.probs: dict[str, Tensor] | None = None  # fitted keep probabilities, per side
        self._fitted: Layout | None = None  # the layout they were fitted on

    def config(self) -> dict:
        out = {"p": self.p, "factored": self.factored, "mask": self.mask, "seed": self.seed}
        # block=1 draws what Dropout drew before blocks existed: same fingerprint, so stores
        # written then still resume
        out = out if self.block == 1 else {**out, "block": self.block}
        if self.importance:
            out = {**out, "importance": True, "floor": self.floor, "fit": _probs_hash(self.probs)}
        return out

    @property
    def bound(self) -> Layout:
        """The layout; raises if :meth:`fit` (importance) or :meth:`bind` has not been called."""
        self._require_fit()
        return super().bound

    def bind(self, layout: Layout | Task) -> Dropout:
        self._require_fit()  # before the layout is recorded: an unfitted one stays unbound
        return super().bind(layout)

    def _require_fit(self) -> None:
        if self.importance and self.probs is None:
            raise RuntimeError(
                f"{self!r} is not fitted: importance dropout needs keep probabilities from a "
                "pilot set; call .fit(task, pilot_loader) first"
            )

    @property
    def map_bytes(self) -> int:
        """0 for the uniform mask (regenerated from the seed); the fitted probabilities for
        ``importance=True``."""
        if not self.importance:
            return 0
        self._require_fit()
        return _nbytes(self.probs.values())

    def fit(self, task: Task, loader, check: bool = True) -> Dropout:
        """Estimate the keep probabilities (``importance=True``) from the exact per-sample
        gradients of the batches ``loader`` yields (the pilot set; moved to the model's
        device, computed in eval mode; ``check``: the self-check of
        :class:`~dropinf.PerSampleGrads`). Returns self, fitted, not yet bound."""
        from .persample import PerSampleGrads
        from .task import as_tree, to_device

        self._check_fittable()

        def grads():
            with task.evaluating(), PerSampleGrads(task, check=check) as psg:
                for batch in loader:
                    yield psg(to_device(as_tree(batch), task.device))[0]

        return self.fit_grads(task, grads())

    def fit_grads(self, layout: Layout | Task, grads) -> Dropout:
        """:meth:`fit` from per-sample gradients already computed: an iterable of full
        (not capture-reduced) :class:`~dropinf.BatchGrads` of the model of ``layout``."""
        self._check_fittable()
        layout = Layout.of(layout) if isinstance(layout, Task) else layout
        acc = _Moments(layout, self.factored)
        for bg in grads:
            acc.add(bg)
        if acc.n == 0:
            raise ValueError(
                "the pilot loader yielded no sample: fit needs at least one batch to estimate "
                "the second moments of the gradients"
            )
        probs: dict[str, Tensor] = {}
        for s in layout.factored if self.factored else ():
            for side, n in (("out", s.n_out), ("in", s.n_in_aug)):
                w = _block_sums(acc.sums[f"{s.module}:{side}"], n, self.block)
                probs[f"{s.module}:{side}"] = _importance_probs(w, self._budget(len(w)), self.floor)
        rest = layout.rest() if self.factored else layout.params
        sums = [_block_sums(acc.sums[q.name], q.numel, self.block) for q in rest]
        sizes = [len(w) for w in sums]
        probs.update({q.name: torch.zeros(0, dtype=torch.float64) for q in rest})
        if sum(sizes):
            pi = _importance_probs(torch.cat(sums), self._budget(sum(sizes), flat=True), self.floor)
            probs.update(zip((q.name for q in rest), pi.split(sizes)))
        self.probs, self._fitted = probs, layout
        return self

    def _check_fittable(self) -> None:
        if not self.importance:
            raise ValueError(
                "fit estimates keep probabilities for importance dropout only; use "
                "Dropout(..., importance=True)"
            )
        if self.layout is not None:
            raise RuntimeError(
                f"{self!r} is already bound: its mask is drawn. Build a new Dropout with the "
                "same arguments and fit that one"
            )

    def _budget(self, m: int, flat: bool = False) -> float:
        """Expected kept count of the uniform mask over m units (or blocks)."""
        if self.mask == "bernoulli":
            return (1.0 - self.p) * m
        if flat and round((1.0 - self.p) * m) < 1:
            raise ValueError(
                f"dropout rate p={self.p} keeps none of the {m} flat mask units "
                f"(round((1-p) {m}) = 0); use p <= {1 - 1 / m:.6g}"
            )
        return float(round((1.0 - self.p) * m) if flat else _side(m, self.p))

    def _importance_units(self, n: int, module: str, side: str) -> tuple[Tensor, Tensor]:
        """Kept units of one side (sorted) and their scales ``1/sqrt(pi)`` (float64)."""
        pi = self.probs[f"{module}:{side}"]
        kept = _sample_importance(pi, self.mask, _generator(self.seed, "importance", module, side))
        units = _expand(kept, n, self.block)
        return units, _unit_scales(pi, units, n, self.block)

    def _units(self, n: int, *key: object) -> tuple[Tensor, float]:
        """Kept unit indices out of n (sorted) and the per-side scale."""
        g = _generator(self.seed, "units", *key)
        m = _n_blocks(n, self.block)
        if self.mask == "fixed":
            k = _side(m, self.p)
            kept, scale = torch.randperm(m, generator=g)[:k].sort().values, math.sqrt(m / k)
        else:
            kept = (torch.rand(m, generator=g, dtype=F32) < 1.0 - self.p).nonzero().flatten()
            scale = 1.0 / math.sqrt(1.0 - self.p)
        return _expand(kept, n, self.block), scale

    def _draw(self, layout: Layout) -> None:
        self.units: dict[str, tuple[Tensor, Tensor, float | Tensor]] = {}
        if self.importance and self._fitted != layout:
            raise ValueError(
                f"{self!r} was fitted on another model's parameters; fit it on this model "
                "(fit(task, loader)) before using it here"
            )
        if self.factored and self.block > 1:
            whole = [f"{s.module} ({side}: {n})" for s in layout.factored
                     for side, n in (("outputs", s.n_out), ("inputs", s.n_in_aug))
                     if _n_blocks(n, self.block) == 1]
            if whole:
                what = "kept whole" if self.mask == "fixed" else "kept or dropped whole"
                warnings.warn(
                    f"block={self.block}: these sides have fewer than {2 * self.block} units, "
                    f"one block each, {what}: {', '.join(whole)}; use a smaller block or leave "
                    "these layers out of Task(params=...)",
                    stacklevel=3,
                )
        for s in layout.factored if self.factored else ():
            if self.importance:  # per-entry scales, (k_out * k_in,) row-major, float64
                s_out, a = self._importance_units(s.n_out, s.module, "out")
                s_in, b = self._importance_units(s.n_in_aug, s.module, "in")
                self.units[s.module] = (s_out, s_in, torch.outer(a, b).flatten())
                continue
            s_out, a = self._units(s.n_out, s.module, "out")
            s_in, b = self._units(s.n_in_aug, s.module, "in")
            self.units[s.module] = (s_out, s_in, a * b)
        rest = layout.rest() if self.factored else layout.params
        if self.importance:
            self.flat = _ImportanceFlat(rest, self.probs, self.mask, self.seed, self.block)
        else:
            self.flat = _FlatMask(rest, self.p, self.mask, self.seed, self.block)

    @property
    def dim(self) -> int:
        _ = self.bound
        return sum(len(o) * len(i) for o, i, _ in self.units.values()) + self.flat.dim

    def compress(self, bg: BatchGrads) -> Tensor:
        parts = []
        if self.factored:
            blocks = _layer_blocks(bg)
            for s in self.bound.factored:
                parts.append(self._layer(s, blocks.get(s.module, []), bg))
        parts += self.flat.apply(bg)
        return _cat(parts, bg)

    def reducers(self, device: torch.device) -> dict[str, FactorReducer]:
        """Gather the kept input units (plus a column of ones for a kept bias unit) and the kept
        output units as the factors are captured."""
        out = {}
        for s in self.bound.factored if self.factored else ():
            s_out, s_in, _ = self.units[s.module]
            keep_in = _Columns(s_in[s_in < s.n_in], device)
            if len(keep_in.idx) < len(s_in):  # the bias unit is kept: its input is 1

                def keep_in(x: Tensor, weights=keep_in) -> Tensor:
                    a = weights(x)
                    return torch.cat([a, a.new_ones(*a.shape[:-1], 1)], -1)

            out[s.module] = FactorReducer(keep_in, _Columns(s_out, device))
        return out

    def _layer(self, s: FactorSpec, blocks: list, bg: BatchGrads) -> Tensor:
        s_out, s_in, scale = self.units[s.module]
        if isinstance(scale, Tensor):  # importance: one scale per kept entry, after the gather
            scale = _on(self, f"{s.module}:scale", scale, bg.device, bg.dtype)
        reduced = _reduced(blocks)
        if reduced is not None:
            return reduced.mul_(scale)
        if not blocks and (M := _dense_layer(s, bg)) is not None:
            M = M[:, _on(self, f"{s.module}:out", s_out, bg.device)]
            M = M[:, :, _on(self, f"{s.module}:in", s_in, bg.device)]
            return M.reshape(bg.size, -1) * scale
        w_in = s_in[s_in < s.n_in]  # indices stay on the CPU: _columns moves them
        bias_kept = len(w_in) < len(s_in)  # the bias unit is the last input index
        parts = []
        for b in blocks:  # one per group, in row order; rows of S_out falling in this group
            sel = s_out[(s_out >= b.rows.start) & (s_out < b.rows.stop)] - b.rows.start
            d = _columns(b.delta, sel)
            g = torch.bmm(d.transpose(1, 2), _columns(b.x, w_in))  # (B, k_out_g, k_in_w)
            if bias_kept:
                g = torch.cat([g, d.sum(1).unsqueeze(-1)], -1)
            parts.append(g)
        if not parts:  # the layer did not reach the loss
            return torch.zeros(bg.size, len(s_out) * len(s_in), device=bg.device, dtype=bg.dtype)
        out = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        return out.reshape(bg.size, -1).mul_(scale)

    def stored_bytes(self, d: int) -> int:
        """0 for the uniform mask; importance: its float64 keep probabilities, one per
        coordinate (flat, unit blocks)."""
        if self.factored or self.block != 1:
            raise ValueError(f"stored_bytes and held_bytes are for flat unit masks; {self!r} "
                             "depends on the layers")
        return 8 * d if self.importance else 0

    def held_bytes(self, d: int) -> int:
        """The kept coordinates' int64 indices (about ``(1-p) d``; flat, unit blocks), and for
        importance also the probabilities and the kept coordinates' float64 scales."""
        k = _side(d, self.p)
        return self.stored_bytes(d) + 8 * k + (8 * k if self.importance else 0)

    def kept_indices(self) -> tuple[Tensor, Tensor]:
        """Coordinates of the flat (d,) gradient that the output keeps, in output order, and
        their scales: ``compress(bg) == bg.flat()[:, idx] * scale`` (for factored dropout this
        is flat dropout with a Kronecker-structured mask)."""
        layout = self.bound
        info = {q.name: q for q in layout.params}
        idx, scale = [], []
        if self.factored:
            for s in layout.factored:
                s_out, s_in, sc = self.units[s.module]
                w_in = s_in[s_in < s.n_in]
                rows = sc.view(len(s_out), len(s_in)).to(F32) if isinstance(sc, Tensor) else None
                for r, o in enumerate(s_out.tolist()):
                    cols = []
                    if s.weight is not None:  # (O, I) storage, or (I, O) when transposed
                        pos = w_in * s.n_out + o if s.transposed else o * s.n_in + w_in
                        cols.append(info[s.weight].offset + pos)
                    if s.bias is not None and bool((s_in == s.n_in).any()):
                        cols.append(torch.tensor([info[s.bias].offset + o], dtype=torch.long))
                    row = torch.cat(cols) if cols else torch.zeros(0, dtype=torch.long)
                    idx.append(row)
                    scale.append(torch.full((len(row),), sc, dtype=F32) if rows is None
                                 else rows[r, : len(row)])
        for q in self.flat.params:
            i = self.flat.index[q.name]
            idx.append(q.offset + i)
            scale.append(self.flat.scales[q.name].to(F32) if self.importance
                         else torch.full((len(i),), self.flat.scale, dtype=F32))
        if not idx:  # a Bernoulli mask may keep nothing at all
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=F32)
        return torch.cat(idx), torch.cat(scale)


# ----------------------------------------------------------------------------- importance


def _block_of(units: Tensor, n: int, block: int) -> Tensor:
    """The mask block (of :func:`_n_blocks`) that each of the units (of n) belongs to."""
    return units if block == 1 else torch.clamp(units // block, max=_n_blocks(n, block) - 1)


def _block_sums(v: Tensor, n: int, block: int) -> Tensor:
    """(m,) sums of a per-unit (n,) vector over the m mask blocks."""
    if block == 1:
        return v
    out = torch.zeros(_n_blocks(n, block), dtype=v.dtype)
    return out.index_add_(0, _block_of(torch.arange(n), n, block), v)


def _unit_scales(pi: Tensor, units: Tensor, n: int, block: int) -> Tensor:
    """``1/sqrt(pi)`` of the block of each kept unit, float64."""
    return pi[_block_of(units, n, block)].rsqrt()


def _importance_probs(w: Tensor, budget: float, floor: float) -> Tensor:
    """Keep probabilities (float64) from masses w: :func:`dropinf.theory.allocate` with the
    floor ``floor * budget / m``."""
    from .theory import allocate

    return torch.from_numpy(allocate(w.double().numpy(), budget, floor * budget / len(w)))


def _sample_importance(pi: Tensor, law: str, g: torch.Generator) -> Tensor:
    """Sorted indices kept with probabilities pi (float64): Poisson for ``"bernoulli"``;
    systematic sampling in a random order (exactly ``round(sum pi)``) for ``"fixed"``."""
    if law == "bernoulli":
        return (torch.rand(len(pi), generator=g, dtype=torch.float64) < pi).nonzero().flatten()
    certain = pi >= 1.0
    rest = (~certain).nonzero().flatten()
    n_rest = round(float(pi.sum())) - int(certain.sum())
    chosen = rest[:0]
    if n_rest > 0:
        order = rest[torch.randperm(len(rest), generator=g)]
        edges = torch.cumsum(pi[order], 0)
        edges[-1] = n_rest  # remove the rounding of the sum: the points stay below it
        start = torch.rand(1, generator=g, dtype=torch.float64)
        points = start + torch.arange(n_rest, dtype=torch.float64)
        chosen = order[torch.searchsorted(edges, points, right=True)]
    return torch.cat([certain.nonzero().flatten(), chosen]).sort().values


def _probs_hash(probs: dict[str, Tensor] | None) -> str | None:
    """A short hash of fitted probabilities (names and float64 bytes), None if unfitted."""
    if probs is None:
        return None
    import hashlib

    h = hashlib.sha256()
    for name in sorted(probs):
        h.update(name.encode() + b"\0" + probs[name].numpy().tobytes())
    return h.hexdigest()[:16]


class _ImportanceFlat(_FlatMask):
    """An importance mask over the concatenation of ``params``: the mask blocks of every
    parameter (as in :class:`_FlatMask`) drawn together with their fitted probabilities
    (``probs[name]``, one per block; :func:`_sample_importance`), each kept coordinate scaled
    by ``1/sqrt(pi)`` of its block (``scales[name]``, float64)."""

    def __init__(self, params: tuple[ParamInfo, ...], probs: dict[str, Tensor], law: str,
                 seed: int, block: int):
        self.params = params
        self.index: dict[str, Tensor] = {}
        self.scales: dict[str, Tensor] = {}
        pi = torch.cat([probs[q.name] for q in params]) if params else torch.zeros(0)
        kept = _sample_importance(pi, law, _generator(seed, "importance", "flat"))
        start = 0
        for q in params:
            m = len(probs[q.name])
            mine = kept[(kept >= start) & (kept < start + m)] - start
            self.index[q.name] = _expand(mine, q.numel, block)
            self.scales[q.name] = _unit_scales(probs[q.name], self.index[q.name], q.numel, block)
            start += m
        self.dim = sum(len(i) for i in self.index.values())

    def _scale(self, q: ParamInfo, bg: BatchGrads) -> Tensor:
        """The kept coordinates' scales ``1/sqrt(pi)``, on the batch's device and dtype."""
        return _on(self, f"{q.name}:scale", self.scales[q.name], bg.device, bg.dtype)


class _Moments:
    """Sums of squared per-sample gradients over a pilot set (float64, on the CPU): per
    coordinate of the flat parameters (``sums[name]``) and, with ``factored``, per output unit
    (``sums["<module>:out"]``: row masses of the layer's per-sample weight gradient, bias
    column included) and per input unit (``"<module>:in"``: column masses, bias unit last)."""

    CHUNK = 2**24  # elements of per-sample layer gradients formed at once

    def __init__(self, layout: Layout, factored: bool):
        self.specs = layout.factored if factored else ()
        self.rest = layout.rest() if factored else layout.params
        zeros = lambda n: torch.zeros(n, dtype=torch.float64)  # noqa: E731
        self.sums: dict[str, Tensor] = {q.name: zeros(q.numel) for q in self.rest}
        for s in self.specs:
            self.sums[f"{s.module}:out"], self.sums[f"{s.module}:in"] = (
                zeros(s.n_out), zeros(s.n_in_aug)
            )
        self.n = 0

    def add(self, bg: BatchGrads) -> None:
        blocks = _layer_blocks(bg)
        for s in self.specs:
            for rows, G in self._layer(s, blocks.get(s.module, []), bg):
                G2 = G.double().square_()
                self.sums[f"{s.module}:out"][rows] += G2.sum((0, 2)).cpu()
                self.sums[f"{s.module}:in"] += G2.sum((0, 1)).cpu()
        for q in self.rest:
            self.sums[q.name] += bg.param_grad(q).double().square_().sum(0).cpu()
        self.n += bg.size

    def _layer(self, s: FactorSpec, blocks: list, bg: BatchGrads):
        """(output rows, (b, rows, n_in_aug) per-sample gradients) of layer s, in chunks."""
        if any(isinstance(b, ReducedFactors) for b in blocks):
            raise ValueError(
                f"layer {s.module!r} was compressed as it was captured; fitting needs the full "
                "factors: PerSampleGrads(task) without a compressor"
            )
        if not blocks:
            if (M := _dense_layer(s, bg)) is not None:
                yield slice(0, s.n_out), M
            return
        for b in blocks:
            x, d = _work(b.x), _work(b.delta)
            step = max(1, self.CHUNK // (d.shape[-1] * s.n_in_aug))
            for i in range(0, bg.size, step):
                G = torch.bmm(d[i : i + step].transpose(1, 2), x[i : i + step])
                if s.bias is not None:
                    G = torch.cat([G, d[i : i + step].sum(1).unsqueeze(-1)], -1)
                yield b.rows, G


class _Columns:
    """Copies columns ``idx`` (sorted) of a (B, T, n) factor into a contiguous float32
    (B, T, len(idx)), on ``device`` (default: where ``idx`` is).

    Where the indices form long runs (block masks), it concatenates slices of the runs, which
    reads only their cache lines. Otherwise it uses ``gather`` with a broadcast index, which
    reads each row once and measured about twice as fast as ``index_select`` along the last
    dimension on CPU. The runs are found once, here (pass ``idx`` on the CPU to avoid a
    device-to-host copy).
    """

    MIN_RUN = 8  # mean run length from which slices beat the gather

    def __init__(self, idx: Tensor, device: torch.device | None = None):
        cpu = idx.cpu()
        self.idx = idx if device is None else idx.to(device)
        self.runs: list[tuple[int, int]] = []  # [start, stop) of each run of consecutive idx
        if len(cpu):
            cut = ((cpu[1:] != cpu[:-1] + 1).nonzero().flatten() + 1).tolist()
            bounds = zip([0, *cut], [*cut, len(cpu)])
            self.runs = [(int(cpu[a]), int(cpu[b - 1]) + 1) for a, b in bounds]
        self.sliced = bool(self.runs) and len(cpu) >= self.MIN_RUN * len(self.runs)

    def __call__(self, t: Tensor) -> Tensor:
        if self.sliced:
            return _work(torch.cat([t[..., a:b] for a, b in self.runs], -1))
        B, T, n = t.shape
        rows = t.reshape(B * T, n)
        out = torch.gather(rows, 1, self.idx.expand(B * T, len(self.idx)))
        return _work(out.view(B, T, -1))


def _columns(t: Tensor, idx: Tensor) -> Tensor:
    """Columns ``idx`` (on the CPU) of a (B, T, n) factor, on its device (see
    :class:`_Columns`)."""
    return _Columns(idx, t.device)(t)


# ----------------------------------------------------------------------------- Gaussian


class Gaussian(Compressor):
    """Gaussian random projection with iid ``N(0, 1/k)`` entries.

    Args:
        k: output size of the flat projection (``factored=False``).
        factored: True is LoGra's ``(P_out delta)(P_in x)^T`` per factored layer, with
            ``P_in`` of shape ``(k_in, n_in + bias)`` and ``P_out`` of ``(k_out, n_out)``; the
            per-layer sizes are those of fixed-mask factored dropout at rate ``p``
            (``k_side = round((1-p) n_side)``), so the two have the same ``dim``. Parameters
            outside factored layers get a flat projection to ``round((1-p) d_rest)``.
        p: the matching dropout rate, for ``factored=True`` (give k or p, not both).
        seed: the draw.

    The projection matrices must be stored: ``map_bytes`` counts them.
    """

    kind = "gaussian"

    def __init__(
        self, k: int | None = None, factored: bool = False, p: float | None = None, seed: int = 0
    ):
        factored = _check_flag("factored", factored)
        if factored and (p is None or k is not None):
            raise ValueError("Gaussian(factored=True) takes p, the matching dropout rate, not k")
        if not factored and (k is None or p is not None):
            raise ValueError("Gaussian(factored=False) takes k, the output size, not p")
        if k is not None and (not isinstance(k, int) or k < 1):
            raise ValueError(f"k={k!r}: the output size must be an integer >= 1")
        self.k, self.factored, self.seed = k, factored, int(seed)
        self.p = None if p is None else _check_rate(p)

    def config(self) -> dict:
        return {"k": self.k, "factored": self.factored, "p": self.p, "seed": self.seed}

    def _draw(self, layout: Layout) -> None:
        self.proj: dict[str, tuple[Tensor, Tensor]] = {}
        if not self.factored:
            if self.k > layout.dim:
                raise ValueError(f"k={self.k} exceeds the gradient dimension d={layout.dim}")
            self.flat = _Projection.gaussian(layout.params, self.k, self.seed)
            return
        for s in layout.factored:
            k_out, k_in = _side(s.n_out, self.p), _side(s.n_in_aug, self.p)
            g = _generator(self.seed, "gauss", s.module)
            p_out = torch.randn(k_out, s.n_out, generator=g, dtype=F32) / math.sqrt(k_out)
            p_in = torch.randn(k_in, s.n_in_aug, generator=g, dtype=F32) / math.sqrt(k_in)
            self.proj[s.module] = (p_out, p_in)
        rest = layout.rest()
        d_rest = sum(q.numel for q in rest)
        self.flat = _Projection.gaussian(rest, _side(d_rest, self.p), self.seed)

    @property
    def dim(self) -> int:
        _ = self.bound
        return sum(o.shape[0] * i.shape[0] for o, i in self.proj.values()) + self.flat.dim

    @property
    def map_bytes(self) -> int:
        _ = self.bound
        return _nbytes(t for pair in self.proj.values() for t in pair) + self.flat.map_bytes

    def stored_bytes(self, d: int) -> int:
        """The (k, d) float32 projection of the flat Gaussian."""
        if self.factored:
            raise ValueError(f"held_bytes is for the flat Gaussian; {self!r} depends on the layers")
        return 4 * self.k * d

    def reducers(self, device: torch.device) -> dict[str, FactorReducer]:
        """Project both factors as they are captured: ``P_in x_aug`` and ``P_out delta``."""
        out = {}
        for s in self.bound.factored if self.factored else ():
            p_out, p_in = (t.to(device) for t in self.proj[s.module])
            w_t, b = p_in[:, : s.n_in].T, p_in[:, s.n_in] if s.bias is not None else None

            def inputs(x: Tensor, w_t=w_t, b=b) -> Tensor:
                x = _work(x)
                a = x @ w_t.to(x.dtype)
                return a if b is None else a.add_(b)

            def outputs(d: Tensor, p=p_out.T) -> Tensor:
                d = _work(d)
                return d @ p.to(d.dtype)

            out[s.module] = FactorReducer(inputs, outputs)
        return out

    def compress(self, bg: BatchGrads) -> Tensor:
        parts = []
        if self.factored:
            blocks = _layer_blocks(bg)
            for s in self.bound.factored:
                reduced = _reduced(blocks.get(s.module, []))
                if reduced is not None:
                    parts.append(reduced)
                    continue
                p_out, p_in = (
                    _on(self, f"{s.module}:{i}", t, bg.device, bg.dtype)
                    for i, t in enumerate(self.proj[s.module])
                )
                if not blocks.get(s.module) and (M := _dense_layer(s, bg)) is not None:
                    parts.append((p_out @ M @ p_in.T).reshape(bg.size, -1))
                    continue
                out = torch.zeros(
                    bg.size, p_out.shape[0], p_in.shape[0], device=bg.device, dtype=bg.dtype
                )
                for b in blocks.get(s.module, []):
                    # P_in x_aug without building x_aug: the bias unit's column is added after.
                    a = _work(b.x) @ p_in[:, : s.n_in].T  # (B, T, k_in)
                    if s.bias is not None:
                        a += p_in[:, s.n_in]
                    c = _work(b.delta) @ p_out[:, b.rows].T  # (B, T, k_out)
                    out += torch.bmm(c.transpose(1, 2), a)
                parts.append(out.reshape(bg.size, -1))
        parts += self.flat.apply(bg)
        return _cat(parts, bg)


# ----------------------------------------------------------------------------- SJLT


class SJLT(Compressor):
    """Sparse Johnson-Lindenstrauss transform: each coordinate goes to c rows with random signs.

    Block construction: the k rows are split into c blocks of k/c rows, and each coordinate is
    hashed to one uniformly chosen row in every block with an independent sign, scaled by
    ``1/sqrt(c)``. So each column has exactly c nonzeros in distinct rows, compressed dot
    products are unbiased and their variance is that of :func:`dropinf.theory.sjlt_variance`.
    The hashes are regenerated from the seed (``map_bytes == 0``).

    Args:
        k: output size; c: nonzeros per column (1 <= c <= k, c must divide k); seed: the draw.
    """

    kind = "sjlt"

    def __init__(self, k: int, c: int = 1, seed: int = 0):
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k={k!r}: the output size must be an integer >= 1")
        if not isinstance(c, int) or not 1 <= c <= k or k % c:
            raise ValueError(f"c={c!r}: nonzeros per column must be in [1, k={k}] and divide k")
        self.k, self.c, self.seed = k, c, int(seed)

    def config(self) -> dict:
        return {"k": self.k, "c": self.c, "seed": self.seed}

    def _draw(self, layout: Layout) -> None:
        if self.k > layout.dim:
            raise ValueError(f"k={self.k} exceeds the gradient dimension d={layout.dim}")
        block = self.k // self.c
        self.hash: dict[str, tuple[Tensor, Tensor]] = {}
        for q in layout.params:
            g = _generator(self.seed, "sjlt", q.name)
            rows = torch.randint(block, (q.numel, self.c), generator=g)
            rows += torch.arange(self.c) * block
            signs = torch.randint(2, (q.numel, self.c), generator=g).to(F32) * 2 - 1
            self.hash[q.name] = (rows.flatten(), signs.flatten() / math.sqrt(self.c))

    @property
    def dim(self) -> int:
        return self.k

    def held_bytes(self, d: int) -> int:
        """The int64 row and float32 sign of each of the c d nonzeros (regenerable, but held)."""
        return 12 * self.c * d

    def compress(self, bg: BatchGrads) -> Tensor:
        z = torch.zeros(bg.size, self.k, device=bg.device, dtype=bg.dtype)
        for q in self.bound.params:
            rows, signs = (
                _on(self, f"{q.name}:{i}", t, bg.device) for i, t in enumerate(self.hash[q.name])
            )
            vals = bg.param_grad(q).unsqueeze(-1) * signs.view(q.numel, self.c).to(bg.dtype)
            z.index_add_(1, rows, vals.reshape(bg.size, -1))
        return z


# ----------------------------------------------------------------------------- PCA


class PCA(Compressor):
    """Projection on the top-k principal directions of training gradients.

    The directions are the top right singular vectors of a sample of (uncentred) per-sample
    training gradients: those that keep the most of ``sum_i (g_i . v)^2``, which is what
    preserves dot products. Fitting is an explicit step: ``PCA(k, n_fit, seed).fit(G)`` with G
    the (n, d) exact gradients (``Identity``) of the training set, of which ``n_fit`` rows are
    drawn with ``seed`` (all if fewer). Deterministic once fitted; ``map_bytes`` counts the
    (k, d) components.
    """

    kind = "pca"

    def __init__(self, k: int, n_fit: int = 1024, seed: int = 0):
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k={k!r}: the output size must be an integer >= 1")
        if not isinstance(n_fit, int) or n_fit < 1:
            raise ValueError(f"n_fit={n_fit!r}: the number of fit gradients must be an int >= 1")
        self.k, self.n_fit, self.seed = k, n_fit, int(seed)
        self.components: Tensor | None = None

    def config(self) -> dict:
        fitted = None
        if self.components is not None:
            fitted = f"{zlib.crc32(self.components.numpy().tobytes()):08x}"
        return {"k": self.k, "n_fit": self.n_fit, "seed": self.seed, "components": fitted}

    def fit(self, grads: Tensor) -> PCA:
        """Fit on exact per-sample gradients, (n, d) (a Tensor, array or ``Gradients``)."""
        G = torch.as_tensor(grads).double()
        n, d = G.shape
        if self.k > min(n, self.n_fit, d):
            raise ValueError(
                f"k={self.k} exceeds what min(n={n}, n_fit={self.n_fit}) gradients of dimension "
                f"{d} can span; fit on more samples (n_fit) or lower k"
            )
        if n > self.n_fit:
            G = G[torch.randperm(n, generator=_generator(self.seed, "pca"))[: self.n_fit]]
        _, _, vh = torch.linalg.svd(G, full_matrices=False)
        self.components = vh[: self.k].float().contiguous()
        return self

    def _draw(self, layout: Layout) -> None:
        if self.components is None:
            raise RuntimeError("PCA must be fitted before use: PCA(k).fit(identity_gradients)")
        if self.components.shape[1] != layout.dim:
            raise ValueError(
                f"PCA was fitted on gradients of dimension {self.components.shape[1]}, but this "
                f"model's is {layout.dim}"
            )
        views = {q.name: self.components[:, q.offset : q.stop] for q in layout.params}
        self.proj = _Projection(layout.params, views, self.k)

    @property
    def dim(self) -> int:
        return self.k

    @property
    def map_bytes(self) -> int:
        return 0 if self.components is None else _nbytes([self.components])

    def fit_bytes(self, d: int) -> int:
        """A lower bound on the fit's memory: the (n_fit, d) float32 gradients, their float64
        copy and the float64 (min(n_fit, d), d) right singular vectors (the SVD's workspace
        comes on top)."""
        return 12 * self.n_fit * d + 8 * min(self.n_fit, d) * d

    def stored_bytes(self, d: int) -> int:
        """The (k, d) float32 components."""
        return 4 * self.k * d

    def held_bytes(self, d: int) -> int:
        """The components and the fit (:meth:`fit_bytes`)."""
        return self.stored_bytes(d) + self.fit_bytes(d)

    def compress(self, bg: BatchGrads) -> Tensor:
        _ = self.bound
        return self.proj.apply(bg)[0]


# ----------------------------------------------------------------------------- composition


class Chain(Compressor):
    """Two compressors in a row: ``second`` applied to ``first``'s output.

    ``first`` is bound to the model; ``second`` to a flat layout of ``first.dim`` coordinates
    (one parameter named ``"chain"``), so its draw depends on its own arguments and that size
    alone. E.g. ``Chain(Dropout(0.75), SJLT(k))`` keeps a quarter of the coordinates, then
    hashes them down to k. Both stages are unbiased and independent, so the chain is:
    ``E[ahat . bhat] = a . b``; its variance for a flat mask then SJLT or Gaussian is
    :func:`dropinf.theory.chain_variance`. The first stage's capture-time reducers are the
    chain's (a factored mask still reduces the factors inside the hooks); ``map_bytes`` adds
    both stages'.

    Args:
        first: any compressor (a fitted PCA, if PCA), or its ``{"kind": ..., **config}``.
        second: a flat compressor of output size at most ``first.dim`` (not factored; a fitted
            PCA must be fitted on ``first``'s outputs), or its dict.
    """

    kind = "chain"
    FLAT = "chain"  # the name of the second stage's one input parameter

    def __init__(self, first: Compressor | dict, second: Compressor | dict):
        first, second = (_stage(name, c) for name, c in (("first", first), ("second", second)))
        if getattr(second, "factored", False):
            raise ValueError(
                f"second={second!r} is factored, but its input is the flat output of first; "
                "use a flat second stage (factored=False)"
            )
        for name, c in (("first", first), ("second", second)):
            if isinstance(c, PCA) and c.components is None:
                raise ValueError(f"{name}={c!r} is not fitted; fit it before chaining it")
        self.first, self.second = first, second

    def config(self) -> dict:
        return {name: {"kind": c.kind, **c.config()}
                for name, c in (("first", self.first), ("second", self.second))}

    def _draw(self, layout: Layout) -> None:
        m = self.first.bind(layout).dim
        k = getattr(self.second, "k", None)
        if k is not None and k > m:
            raise ValueError(
                f"second={self.second!r} has k={k} outputs, more than the {m} of first="
                f"{self.first!r}; lower second's k or keep more in first"
            )
        self.second.bind(Layout((ParamInfo(self.FLAT, (m,), 0),), ()))

    @property
    def dim(self) -> int:
        _ = self.bound
        return self.second.dim

    @property
    def map_bytes(self) -> int:
        _ = self.bound
        return self.first.map_bytes + self.second.map_bytes

    def _stage_bytes(self, d: int, what: str) -> int:
        f = self.first
        m = _side(d, f.p) if isinstance(f, Dropout) else d if isinstance(f, Identity) else f.k
        return getattr(f, what)(d) + getattr(self.second, what)(m)

    def stored_bytes(self, d: int) -> int:
        """Both stages', the second's at the first's output size."""
        return self._stage_bytes(d, "stored_bytes")

    def held_bytes(self, d: int) -> int:
        """Both stages', the second's at the first's output size."""
        return self._stage_bytes(d, "held_bytes")

    def reducers(self, device: torch.device) -> dict[str, FactorReducer]:
        """The first stage's: its ``compress`` reads the factors they reduce."""
        return self.first.reducers(device)

    def compress(self, bg: BatchGrads) -> Tensor:
        z = self.first.compress(bg)
        flat = self.second.bound.params
        return self.second.compress(BatchGrads(list(flat), [DenseGrad(self.FLAT, z)], bg.size))


def _stage(name: str, c: Compressor | dict) -> Compressor:
    if isinstance(c, dict):
        if "kind" not in c:
            raise ValueError(f"{name}={c!r}: a stage given as a dict needs its 'kind'")
        c = make(**c)
    if not isinstance(c, Compressor):
        raise TypeError(f"{name}={c!r} is not a Compressor (or a dict with its 'kind')")
    if c.layout is not None:
        raise ValueError(f"{name}={c!r} is already bound; chain a fresh one (same arguments, "
                         "same draw)")
    return c
