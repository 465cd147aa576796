"""Per-sample gradients of one batch in factored form: the blocks the hooks produce and
:class:`BatchGrads`, which holds them and forms any parameter's (B, numel) gradient on demand.

For a linear map the per-sample weight gradient is ``sum_t delta_t x_t^T``: a block keeps the
layer inputs x and output gradients delta instead (:class:`LinearFactors`). Compressors read the
factors directly; :meth:`BatchGrads.flat` builds the full ``(B, d)`` gradients when needed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from .task import ParamInfo


@dataclass
class LinearFactors:
    """Per-sample gradient of one linear map (or one group of a grouped convolution).

    ``x``: (B, T, I) layer inputs; ``delta``: (B, T, O) gradients of the per-sample loss with
    respect to the layer outputs. The per-sample gradient of the (O, I) weight is
    ``sum_t delta_t x_t^T`` and that of the bias ``sum_t delta_t``: the bias is the weight of an
    extra input unit of value 1 (see :meth:`x_aug`).

    ``module`` names the layer; ``weight``/``bias`` name its parameters (None if not selected).
    ``rows`` are the output rows of the weight, viewed as ``(out, -1)``, that this block covers
    (a slice of them for one group of a grouped convolution).
    ``transposed`` is True when the weight is stored as (I, O) (Hugging Face ``Conv1D``).
    """

    module: str
    x: Tensor
    delta: Tensor
    weight: str | None
    bias: str | None
    rows: slice
    transposed: bool = False

    @property
    def x_aug(self) -> Tensor:
        """(B, T, I + 1) inputs with the bias unit (a column of ones) last, if bias is tracked."""
        if self.bias is None:
            return self.x
        return torch.cat([self.x, self.x.new_ones(*self.x.shape[:-1], 1)], -1)

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(p for p in (self.weight, self.bias) if p is not None)

    def contributions(self, only: str | None = None) -> Iterator[tuple[str, int, Tensor]]:
        """(parameter name, start within the flattened parameter, (B, n) gradient part), for
        every parameter of the block or ``only`` the named one."""
        B = self.x.shape[0]
        if self.weight is not None and only in (None, self.weight):
            gw = torch.bmm(self.delta.transpose(1, 2), self.x)  # (B, O, I)
            if self.transposed:
                gw = gw.transpose(1, 2)
            yield self.weight, self.rows.start * self.x.shape[-1], gw.reshape(B, -1)
        if self.bias is not None and only in (None, self.bias):
            yield self.bias, self.rows.start, self.delta.sum(1)

    def abs(self) -> LinearFactors:
        """The block with absolute values: its weighted sums (with |w|) bound this block's
        elementwise, the scale of their rounding error."""
        return replace(self, x=self.x.abs(), delta=self.delta.abs())

    def weighted_sums(self, w: Tensor) -> Iterator[tuple[str, int, Tensor]]:
        """Like :meth:`contributions`, but ``sum_b w_b g_b`` (n,) over the batch, from the
        factors (one (O, B T) x (B T, I) product; no per-sample weight gradient)."""
        n_out, n_in = self.delta.shape[-1], self.x.shape[-1]
        d = (self.delta * w.to(self.delta.dtype)[:, None, None]).reshape(-1, n_out)
        if self.weight is not None:
            gw = d.T @ self.x.reshape(-1, n_in)
            gw = gw.T if self.transposed else gw
            yield self.weight, self.rows.start * n_in, gw.reshape(-1)
        if self.bias is not None:
            yield self.bias, self.rows.start, d.sum(0)


@dataclass
class EmbeddingFactors:
    """Per-sample gradient of an embedding table: ``G_b[v] = sum_t [ids_bt == v] delta_bt``.

    ``ids``: (B, T) token ids, with tokens equal to ``padding_idx`` already set to -1 (they get no
    gradient, as in ``nn.Embedding``). ``delta``: (B, T, D).
    """

    module: str
    ids: Tensor
    delta: Tensor
    weight: str
    num_embeddings: int

    @property
    def params(self) -> tuple[str, ...]:
        return (self.weight,)

    def contributions(self, only: str | None = None) -> Iterator[tuple[str, int, Tensor]]:
        B, T, D = self.delta.shape
        keep = self.ids >= 0
        rows = torch.arange(B, device=self.ids.device).unsqueeze(1) * self.num_embeddings
        flat_ids = (rows + self.ids.clamp_min(0))[keep]
        g = self.delta.new_zeros(B * self.num_embeddings, D)
        g.index_add_(0, flat_ids, self.delta[keep])
        yield self.weight, 0, g.view(B, -1)

    def abs(self) -> EmbeddingFactors:
        return replace(self, delta=self.delta.abs())

    def weighted_sums(self, w: Tensor) -> Iterator[tuple[str, int, Tensor]]:
        keep = self.ids >= 0
        d = self.delta * w.to(self.delta.dtype)[:, None, None]
        g = self.delta.new_zeros(self.num_embeddings, self.delta.shape[-1])
        g.index_add_(0, self.ids[keep], d[keep])
        yield self.weight, 0, g.reshape(-1)


@dataclass
class DenseGrad:
    """A per-sample gradient computed directly: (B, numel) (LayerNorm, the ``torch.func`` path)."""

    param: str
    g: Tensor

    @property
    def params(self) -> tuple[str, ...]:
        return (self.param,)

    def contributions(self, only: str | None = None) -> Iterator[tuple[str, int, Tensor]]:
        yield self.param, 0, self.g

    def abs(self) -> DenseGrad:
        return replace(self, g=self.g.abs())

    def weighted_sums(self, w: Tensor) -> Iterator[tuple[str, int, Tensor]]:
        yield self.param, 0, w.to(self.g.dtype) @ self.g


@dataclass(frozen=True)
class FactorReducer:
    """A compressor's maps of one layer's factors, applied as they are captured.

    ``inputs``: (B, T, n_in) layer inputs -> (B, T, k_in), the bias unit (if the compressor keeps
    it) included; ``outputs``: (B, T, n_out) output gradients -> (B, T, k_out). The compressed
    per-sample gradient is then ``sum_t outputs(delta)_t inputs(x)_t^T``. Reducing at capture
    time, while the factors are hot in cache, is cheaper than gathering or projecting them later,
    and only the reduced factors are held until the backward pass ends.
    """

    inputs: Callable[[Tensor], Tensor]
    outputs: Callable[[Tensor], Tensor]


@dataclass
class ReducedFactors:
    """A layer's factors after its compressor's :class:`FactorReducer`: ``a`` (B, T, k_in),
    ``c`` (B, T, k_out). Only the compressor that reduced them can use them."""

    module: str
    a: Tensor
    c: Tensor
    params: tuple[str, ...]

    def product(self) -> Tensor:
        """(B, k_out * k_in): ``sum_t c_t a_t^T`` per sample, row-major."""
        return torch.bmm(self.c.transpose(1, 2), self.a).reshape(self.a.shape[0], -1)

    def contributions(self, only: str | None = None) -> Iterator[tuple[str, int, Tensor]]:
        raise ValueError(
            f"layer {self.module!r} was compressed as it was captured; its exact gradient is "
            "gone. Use PerSampleGrads(task) without a compressor for exact gradients"
        )


Block = LinearFactors | EmbeddingFactors | DenseGrad | ReducedFactors


@dataclass
class BatchGrads:
    """Per-sample gradients of one batch of B samples, in factored form where possible.

    A parameter may receive contributions from several blocks (tied weights, a layer called
    twice); they add up. Compressors either use the factors of :class:`LinearFactors` directly or
    ask for one parameter's (B, numel) gradient at a time (:meth:`param_grad`), so the full
    (B, d) matrix is built only by :meth:`flat`.
    """

    params: list[ParamInfo]
    blocks: list[Block] = field(default_factory=list)
    size: int = 0

    @property
    def dim(self) -> int:
        return self.params[-1].stop

    @property
    def device(self) -> torch.device:
        return self._first.device

    @property
    def dtype(self) -> torch.dtype:
        """float32, or float64 when the model computes in float64."""
        return torch.float64 if self._first.dtype == torch.float64 else torch.float32

    @property
    def _first(self) -> Tensor:
        b = self.blocks[0]
        if isinstance(b, DenseGrad):
            return b.g
        return b.c if isinstance(b, ReducedFactors) else b.delta

    def param_grad(self, info: ParamInfo) -> Tensor:
        """(B, numel) per-sample gradient of one parameter, summed over the blocks that own it."""
        out = torch.zeros(self.size, info.numel, device=self.device, dtype=self.dtype)
        for b in self.blocks:
            if info.name in b.params:  # only the blocks that own it compute anything
                for _, start, g in b.contributions(only=info.name):
                    out[:, start : start + g.shape[1]] += g
        return out

    def weighted_sums(self, w: Tensor, absolute: bool = False) -> dict[str, Tensor]:
        """``{name: sum_b w_b g_b}`` (numel,) for every parameter that a block holds, formed
        from the factors. ``absolute``: the same sums of absolute values (with ``|w|``), which
        bound the sums elementwise and set the scale of their rounding error."""
        layout, out = self._layout(), {}
        w = w.abs() if absolute else w
        for b in self.blocks:
            for name, start, g in (b.abs() if absolute else b).weighted_sums(w):
                acc = out.setdefault(name, g.new_zeros(layout[name].numel))
                acc[start : start + g.shape[0]] += g
        return out

    def reduced(self, reducers: dict[str, FactorReducer]) -> BatchGrads:
        """These gradients with each layer's factors mapped by its reducer (a compressor's
        :meth:`~dropinf.Compressor.reducers`), as :class:`~dropinf.PerSampleGrads` with that
        compressor maps them while capturing: ``compressor.compress(bg.reduced(reducers))``
        equals ``compressor.compress`` of the capture with the compressor. A layer held in
        several blocks (a grouped convolution) is left whole: ``compress`` reads its factors."""
        count = Counter(getattr(b, "module", None) for b in self.blocks)
        blocks = [
            ReducedFactors(b.module, r.inputs(b.x), r.outputs(b.delta), b.params)
            if isinstance(b, LinearFactors) and count[b.module] == 1
            and (r := reducers.get(b.module)) is not None else b
            for b in self.blocks
        ]
        return BatchGrads(self.params, blocks, self.size)

    def _layout(self) -> dict[str, ParamInfo]:
        return {p.name: p for p in self.params}

    def flat(self) -> Tensor:
        """(B, d) per-sample gradients in the task's parameter order (``Task.params``)."""
        layout = self._layout()
        out = torch.zeros(self.size, self.dim, device=self.device, dtype=self.dtype)
        for b in self.blocks:
            for name, start, g in b.contributions():
                o = layout[name].offset + start
                out[:, o : o + g.shape[1]] += g
        return out
