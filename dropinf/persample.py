"""Exact per-sample gradients in factored form.

For ``nn.Linear``, ``nn.Conv2d`` and Hugging Face ``Conv1D`` the per-sample weight gradient is
``G_b = sum_t delta_bt x_bt^T`` (t runs over tokens or spatial positions), so it is enough to keep
the layer input ``x`` and the gradient of the loss with respect to the layer output ``delta``.
Forward hooks capture ``x`` and route each output through :class:`_Tap`, whose backward records
``delta``. The backward pass asks autograd only for the gradient reaching a dummy anchor that every
tap hangs off, so no weight gradient is ever computed. ``LayerNorm`` and ``Embedding`` get the same
treatment with their own closed forms. Every other selected parameter goes through ``torch.func``
(``vmap`` over ``grad``) in a second pass.

The factors are what compressors consume (:class:`BatchGrads`); :meth:`BatchGrads.flat` builds
the full ``(B, d)`` per-sample gradient when a compressor needs it.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

from .task import ParamInfo, Task, as_tree, batch_size

# ----------------------------------------------------------------------------- factored blocks


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
        out: dict[str, Tensor] = {}
        for b in self.blocks:
            if absolute:
                b, w = b.abs(), w.abs()
            for name, start, g in b.weighted_sums(w):
                info = self._info[name]
                acc = out.setdefault(name, g.new_zeros(info.numel))
                acc[start : start + g.shape[0]] += g
        return out

    @property
    def _info(self) -> dict[str, ParamInfo]:
        return {p.name: p for p in self.params}

    def flat(self) -> Tensor:
        """(B, d) per-sample gradients in the task's parameter order (``Task.params``)."""
        layout = {p.name: p for p in self.params}
        out = torch.zeros(self.size, self.dim, device=self.device, dtype=self.dtype)
        for b in self.blocks:
            for name, start, g in b.contributions():
                o = layout[name].offset + start
                out[:, o : o + g.shape[1]] += g
        return out


# ----------------------------------------------------------------------------- planning


def _is_hf_conv1d(m: nn.Module) -> bool:
    return (
        type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None
    )


def _hookable(m: nn.Module) -> str | None:
    """Kind of factored path a module supports, or None."""
    if type(m) is nn.Linear:
        return "linear"
    if _is_hf_conv1d(m):
        return "conv1d"
    if type(m) is nn.Conv2d and m.padding_mode == "zeros":
        return "conv2d"
    if type(m) is nn.LayerNorm and m.elementwise_affine:
        return "layernorm"
    if type(m) is nn.Embedding and m.max_norm is None and not m.scale_grad_by_freq:
        return "embedding"
    return None


def _no_vmap(m: nn.Module) -> str | None:
    """Why ``torch.func`` cannot give per-sample gradients of a module, or None."""
    if isinstance(m, (nn.RNN, nn.GRU)):
        return "its fused recurrent kernel does not run under torch.func.vmap"
    if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None:
        return "max_norm renormalises the table in place during the forward pass"
    return None


@dataclass
class Plan:
    """Which selected parameters go through hooks (by module) and which through ``torch.func``.

    ``rerouted``: parameters that a hookable module owns but that go through ``torch.func``
    because the self-check found that the hooks miss part of their gradient (name -> why).
    """

    hooked: dict[str, str]  # module name -> kind
    func: list[str]  # parameter names
    unsupported: dict[str, str]  # module name -> type name, for modules whose params use func
    rerouted: dict[str, str] = field(default_factory=dict)


def _param_names(model: nn.Module) -> dict[int, str]:
    """Canonical name of every parameter by identity (tied ones under their first name)."""
    return {id(p): n for n, p in model.named_parameters()}


def _own(m: nn.Module, canon: dict[int, str], selected: set[str]) -> dict[str, str]:
    """A module's own (direct) selected parameters: {attribute, e.g. "weight": name}."""
    names = {a: canon.get(id(p)) for a, p in m._parameters.items() if p is not None}
    return {a: n for a, n in names.items() if n in selected}


def make_plan(task: Task, rerouted: dict[str, str] | None = None) -> Plan:
    """Route each selected parameter.

    A parameter goes through hooks only if every module that owns it (tied weights have several
    owners) is hookable and it is not in ``rerouted`` (name -> why, from the self-check);
    otherwise through ``torch.func``. A hookable module is hooked when at least one of its own
    parameters is selected and none of them is routed to ``torch.func``. A selected parameter
    of a module that ``torch.func`` cannot differentiate per sample (GRU, an embedding with
    ``max_norm``) is refused with a ValueError naming the module.
    """
    rerouted = dict(rerouted or {})
    selected = {p.name for p in task.params}
    canon = _param_names(task.model)
    owners: dict[str, list[tuple[str, nn.Module]]] = defaultdict(list)
    for mname, m in task.model.named_modules(remove_duplicate=False):
        for pname in _own(m, canon, selected).values():
            owners[pname].append((mname, m))
    func: set[str] = set(rerouted) & selected
    unsupported: dict[str, str] = {}
    for pname, mods in owners.items():
        for mname, m in mods:
            if not _hookable(m):
                func.add(pname)
                unsupported[mname] = type(m).__name__
            elif (attr := pname.rsplit(".", 1)[-1]) not in ("weight", "bias"):
                # e.g. weight_g / weight_v of torch.nn.utils.weight_norm: no factored rule
                func.add(pname)
                unsupported[mname] = f"{type(m).__name__} with parameter {attr!r}"
    # A hookable module with one parameter on the torch.func path sends all of its parameters
    # there (its hook would otherwise miss them); that can spread to their other owners.
    changed = True
    while changed:
        changed = False
        for mods in owners.values():
            for _, m in mods:
                own = set(_own(m, canon, selected).values())
                if own & func and not own <= func:
                    func |= own
                    changed = True
    for pname in sorted(func):
        for mname, m in owners.get(pname, []):
            if why := _no_vmap(m):
                raise ValueError(
                    f"module {mname!r} ({type(m).__name__}) has no exact per-sample gradient in "
                    f"dropinf: it is not a hooked layer and {why}. Leave its parameters out of "
                    f"Task(params=...) (e.g. params=[names without {mname!r}]), or use a module "
                    "that torch.func supports (nn.LSTM, an embedding without max_norm)"
                )
    hooked: dict[str, str] = {}
    seen: set[int] = set()
    for mname, m in task.model.named_modules(remove_duplicate=False):
        kind = _hookable(m)
        own = set(_own(m, canon, selected).values())
        if kind and own and not own & func and id(m) not in seen:
            hooked[mname] = kind
            seen.add(id(m))
    func_list = [p.name for p in task.params if p.name in func]  # layout order
    why = {n: rerouted[n] for n in func_list if n in rerouted}
    return Plan(hooked, func_list, unsupported, why)


# ----------------------------------------------------------------------------- hooks


class _Tap(torch.autograd.Function):
    """Identity on a layer output that records the gradient flowing back into it.

    ``anchor`` is a scalar that requires grad; asking autograd for its gradient runs exactly the
    nodes between the loss and the taps, so weight gradients are never computed. The output is a
    copy so that in-place ops downstream (``ReLU(inplace=True)``) cannot rewrite the tapped tensor.
    """

    @staticmethod
    def forward(ctx, y: Tensor, anchor: Tensor, sink: list, record: Callable | None) -> Tensor:
        ctx.sink, ctx.record = sink, record
        return y.clone()

    @staticmethod
    def backward(ctx, g: Tensor):
        ctx.sink.append(g if ctx.record is None else ctx.record(g))
        return g, None, None, None


@dataclass
class _Call:
    inp: Tensor
    grads: list = field(default_factory=list)  # one entry once backward has run


class _Capture:
    """Installs forward hooks on the planned modules for the duration of a ``with`` block.

    A hooked module whose input does not have the batch's B samples along dimension 0 is
    *misfit* (its name and input shape go to ``misfit``) and is not tapped: its parameters then
    miss gradient, which the self-check finds and reroutes; after the check such an input is an
    error (``strict``). An input with 1 along dimension 0 in a batch of B > 1 is taken as shared
    by every sample (GPT-2's position embeddings) and expanded, which the self-check verifies
    (with ``expand=False`` it is misfit too). The input is the first positional argument, or
    the first keyword argument (``layer(input=x)``).
    """

    def __init__(
        self,
        task: Task,
        plan: Plan,
        reducers: dict[str, FactorReducer] | None = None,
        strict: bool = True,
        expand: bool = True,
    ):
        self.task, self.plan, self.reducers = task, plan, reducers or {}
        self.strict, self.expand = strict, expand
        self.calls: dict[str, list[_Call]] = defaultdict(list)
        self.misfit: dict[str, tuple[int, ...]] = {}  # module -> input shape
        self.expanded: dict[str, tuple[int, ...]] = {}  # module -> input shape
        self.anchor: Tensor | None = None
        self.size = 0
        self.handles = []

    def __enter__(self) -> _Capture:
        modules = dict(self.task.model.named_modules(remove_duplicate=False))
        for name in self.plan.hooked:
            hook = modules[name].register_forward_hook(self._hook(name), with_kwargs=True)
            self.handles.append(hook)
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def reset(self, device: torch.device, size: int) -> Tensor:
        self.calls.clear()
        self.misfit.clear()
        self.expanded.clear()
        self.size = size
        self.anchor = torch.zeros((), device=device, requires_grad=True)
        return self.anchor

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor | None:
            if self.anchor is None:
                return None
            inp = args[0] if args else next(iter(kwargs.values()), None)
            if not isinstance(inp, Tensor):
                raise ValueError(
                    f"module {name!r} was called without a tensor input; dropinf's hooks read "
                    "a layer's input from its first argument"
                )
            inp, B = inp.detach(), self.size
            if inp.shape[0] != B:
                if inp.shape[0] != 1 or not self.expand:
                    if self.strict:
                        raise ValueError(
                            f"module {name!r} got input of shape {tuple(inp.shape)} in a batch "
                            f"of {B}; hooked layers need the samples along dimension 0 "
                            "(batch_first). Leave this module out of Task(params=...) or "
                            "reshape its input."
                        )
                    self.misfit[name] = tuple(inp.shape)
                    return None
                # Shared across the batch (e.g. GPT-2 position embeddings): give each sample its
                # own copy so that its output gradient is per-sample, not summed over samples.
                self.expanded[name] = tuple(inp.shape)
                inp = inp.expand(B, *inp.shape[1:])
                output = output.expand(B, *output.shape[1:])
            reducer, record = self.reducers.get(name), None
            if reducer is not None:  # keep only the compressor's view of both factors
                inp = reducer.inputs(_token_inputs(module, inp))
                n_out = output.shape[1] if isinstance(module, nn.Conv2d) else output.shape[-1]

                def record(g: Tensor) -> Tensor:
                    return reducer.outputs(_token_grads(module, g, n_out))

            call = _Call(inp)
            self.calls[name].append(call)
            return _Tap.apply(output, self.anchor, call.grads, record)

        return hook


def _factors(
    name: str,
    kind: str,
    m: nn.Module,
    calls: list[_Call],
    selected: set[str],
    canon: dict,
    reduced: bool = False,
) -> list[Block]:
    """Turn the captured inputs and output gradients of one module into blocks."""
    own = _own(m, canon, selected)
    w, b = own.get("weight"), own.get("bias")
    calls = [c for c in calls if c.grads]  # a call whose output did not reach the loss adds 0
    if not calls:
        return []
    B = calls[0].inp.shape[0]

    if reduced:  # already in token form and reduced by the compressor
        a, c = _tokens([c.inp for c in calls]), _tokens([c.grads[0] for c in calls])
        return [ReducedFactors(name, a, c, tuple(p for p in (w, b) if p is not None))]

    if kind in ("linear", "conv1d"):
        x = _tokens([_token_inputs(m, c.inp) for c in calls])
        d = _tokens([_token_grads(m, c.grads[0], c.grads[0].shape[-1]) for c in calls])
        return [LinearFactors(name, x, d, w, b, slice(0, d.shape[-1]), transposed=kind == "conv1d")]

    if kind == "conv2d":
        xs, ds = zip(*[(_token_inputs(m, c.inp), _token_grads(m, c.grads[0], 0)) for c in calls])
        x, d = _tokens(list(xs)), _tokens(list(ds))
        g, (ci, co) = m.groups, (x.shape[-1] // m.groups, m.out_channels // m.groups)
        return [
            LinearFactors(
                name,
                x[..., i * ci : (i + 1) * ci],
                d[..., i * co : (i + 1) * co],
                w,
                b,
                slice(i * co, (i + 1) * co),
            )
            for i in range(g)
        ]

    if kind == "embedding":
        ids = _tokens([c.inp.reshape(B, -1) for c in calls])
        d = _tokens([c.grads[0].reshape(B, -1, c.grads[0].shape[-1]) for c in calls])
        if m.padding_idx is not None:
            ids = ids.masked_fill(ids == m.padding_idx, -1)
        return [EmbeddingFactors(name, ids, d, w, m.num_embeddings)] if w else []

    if kind == "layernorm":
        out: list[Block] = []
        for c in calls:
            dims = tuple(range(1, c.inp.ndim - len(m.normalized_shape)))
            xhat = F.layer_norm(c.inp, m.normalized_shape, None, None, m.eps)
            delta = c.grads[0]
            for pname, g in ((w, delta * xhat), (b, delta)):
                if pname is not None:
                    out.append(DenseGrad(pname, (g.sum(dims) if dims else g).reshape(B, -1)))
        return out
    raise AssertionError(kind)  # unreachable: make_plan only emits the kinds above


def _token_inputs(m: nn.Module, inp: Tensor) -> Tensor:
    """(B, T, n_in) inputs of a linear-like layer: tokens, or a Conv2d's unfolded patches."""
    if isinstance(m, nn.Conv2d):
        return _unfold(m, inp)
    return inp.reshape(inp.shape[0], -1, inp.shape[-1])


def _token_grads(m: nn.Module, g: Tensor, n_out: int) -> Tensor:
    """(B, T, n_out) output gradients, matching :func:`_token_inputs` (``n_out`` for linear)."""
    if isinstance(m, nn.Conv2d):
        return g.flatten(2).transpose(1, 2)
    return g.reshape(g.shape[0], -1, n_out)


def _tokens(parts: list[Tensor]) -> Tensor:
    """Concatenate the calls of a layer used several times along the token axis (dim 1)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def _unfold(m: nn.Conv2d, x: Tensor) -> Tensor:
    """(B, L, C_in * kh * kw) patches of a Conv2d input, in the weight's column order."""
    padding = m.padding
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        else:  # "same": PyTorch pads the extra element on the right/bottom
            total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
            x = F.pad(
                x,
                (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2),
            )
            padding = (0, 0)
    cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride)
    return cols.transpose(1, 2)


# ----------------------------------------------------------------------------- one batch


class PerSampleGrads:
    """Computes :class:`BatchGrads` for batches of a task. Use as a context manager.

    >>> with PerSampleGrads(task) as psg:
    ...     bg, losses = psg(batch)        # BatchGrads; bg.flat() is (B, d)

    With a ``compressor`` (bound to the task here), layers that it reduces factor by factor
    (:meth:`~dropinf.Compressor.reducers`: factored dropout and Gaussian) are reduced as they are
    captured and come back as :class:`ReducedFactors`, which only ``compressor.compress`` reads.

    **Self-check** (``check=True``, the default). The hooks see only the gradient that flows
    through a hooked module's own call; a parameter also used elsewhere (a penalty on it in the
    loss, ``F.linear`` on a layer's weight, a weight tied outside its module) or a layer whose
    samples are not along dimension 0 would get a silently wrong per-sample gradient. So on the
    first batch (and, if that batch has one sample, on the first batch of two or more), for
    random sample weights ``w`` (fixed seed) and every selected parameter, the weighted sum
    ``sum_b w_b g_b`` of the per-sample gradients is compared with autograd's gradient of
    ``sum_b w_b loss_b``: one extra forward and two backward passes (the second with weight
    gradients), about one training step per featurisation. Random weights make the check see a
    sample's gradient attributed to another sample, which a plain sum would not. The tolerance is
    ``sqrt(eps)`` of the parameter's dtype relative to the sums of absolute values (the scale of
    their rounding error): 3.5e-4 in float32, 1.5e-8 in float64. A parameter that fails is
    routed to ``torch.func`` (which sees every use of it, the loss included) with a warning
    naming it and why, and the check is repeated; if it fails again (the model or loss treats a
    sample differently in a batch than alone, or ``torch.func`` cannot trace it) a ValueError
    names the parameter and the fix. A 16-bit model is checked with its parameters in float32
    (its own rounding would hide a missed use), so the check costs float32 copies of them for
    one batch. The check sees the first batch only: a model that takes another code path on
    later batches is not covered. ``check=False`` skips all this: use it only for a model whose
    parameters are each used once, inside their own module, on batch-first inputs.
    """

    def __init__(self, task: Task, compressor=None, check: bool = True):
        self.task = task
        self.compressor = None if compressor is None else compressor.bind(task)
        self._pending = bool(check)  # a batch of >= 2 samples is still to be checked
        self._checked = False
        self._entered = False
        self._capture: _Capture | None = None
        self._set_plan(make_plan(task))
        if self.plan.unsupported:
            mods = ", ".join(
                f"{m or '(the model)'} ({t})" for m, t in self.plan.unsupported.items()
            )
            warnings.warn(
                f"no factored per-sample gradient for {mods}; their parameters "
                f"({', '.join(self.plan.func)}) go through torch.func (vmap over grad), "
                "which costs an extra forward and backward pass",
                stacklevel=2,
            )

    def _set_plan(self, plan: Plan) -> None:
        self.plan = plan
        self._modules = dict(self.task.model.named_modules(remove_duplicate=False))
        self._canon = _param_names(self.task.model)
        self._selected = {p.name for p in self.task.params}
        self.reducers: dict[str, FactorReducer] = {}
        if self.compressor is not None:
            self.reducers = {
                name: r
                for name, r in self.compressor.reducers(self.task.device).items()
                # grouped convolutions split the factors per group: compressors handle those
                if name in plan.hooked and getattr(self._modules[name], "groups", 1) == 1
            }
        if self._capture is not None and self._entered:
            self._capture.__exit__()
        self._capture = _Capture(self.task, plan, self.reducers)
        if self._entered:
            self._capture.__enter__()

    def __enter__(self) -> PerSampleGrads:
        self._capture.__enter__()
        self._entered = True
        return self

    def __exit__(self, *exc) -> None:
        self._capture.__exit__(*exc)
        self._entered = False

    def __call__(self, batch: object) -> tuple[BatchGrads, Tensor]:
        """Per-sample gradients and the per-sample losses (B,) of one batch."""
        batch = as_tree(batch)
        B = batch_size(batch)
        if self._pending and B is not None and (B >= 2 or not self._checked):
            checked = self._self_check(batch, B)
            self._checked, self._pending = True, B < 2
            if checked is not None and not self.reducers:  # the check's capture is the result
                return checked
        bg, losses, _ = self._run(batch, self._capture)
        return bg, losses

    def _run(
        self, batch: object, capture: _Capture, w: Tensor | None = None
    ) -> tuple[BatchGrads, Tensor, dict[str, Tensor] | None]:
        """One forward and backward with ``capture``; with weights ``w`` (B,) also autograd's
        gradient of ``sum_b w_b loss_b`` for every selected parameter (the self-check's
        reference)."""
        task, plan = self.task, capture.plan
        out = BatchGrads(task.params)
        device = task.device
        losses, ref = None, None
        if plan.hooked or w is not None:
            B = batch_size(batch)
            if B is None:
                raise ValueError("batch has no tensor with the samples along dimension 0")
            anchor = capture.reset(device, B)
            try:
                with torch.enable_grad():
                    losses = task.per_sample_losses(batch)
                    if losses.requires_grad and plan.hooked:
                        torch.autograd.grad(
                            losses.sum(), anchor, allow_unused=True, retain_graph=w is not None
                        )
                    if w is not None:
                        ref = autograd_grads(task, losses, w)
            finally:
                capture.anchor = None
            for name, kind in plan.hooked.items():
                if name in capture.misfit:
                    continue
                out.blocks += _factors(
                    name,
                    kind,
                    self._modules[name],
                    capture.calls.get(name, []),
                    self._selected,
                    self._canon,
                    reduced=name in capture.reducers,
                )
            capture.calls.clear()
        if plan.func:
            func_losses, grads = _func_grads(task, batch, plan.func)
            losses = func_losses if losses is None else losses
            out.blocks += [DenseGrad(n, g) for n, g in grads.items()]
        if losses is None:
            raise AssertionError("plan routes no parameter")  # Task guarantees one is selected
        out.size = losses.shape[0]
        return out, losses.detach(), ref

    def _self_check(self, batch: object, B: int) -> tuple[BatchGrads, Tensor] | None:
        """Check (and if needed reroute) the plan on ``batch``; see the class docstring. Returns
        the batch's uncompressed result, or None when the check ran in float32 for a 16-bit
        model (the result must then come from the model's own dtype)."""
        task = self.task
        g = torch.Generator().manual_seed(_CHECK_SEED)
        w = (0.5 + torch.rand(B, generator=g, dtype=torch.float64)).to(task.device)
        half = any(p.dtype in _HALF for p in task.model.parameters())
        plan = self.plan
        with _in_float32(task.model) if half else contextlib.nullcontext():
            batch = _float32_leaves(batch) if half else batch
            while True:
                bg, losses, bad = self._check_once(batch, plan, w)
                if not bad:
                    break
                new = {n: why for n, (why, _) in bad.items() if n not in plan.func}
                if not new:
                    raise ValueError(_check_failed(bad, plan))
                plan = make_plan(task, {**plan.rerouted, **new})
                warnings.warn(
                    "per-sample gradient self-check: the hooks miss part of the gradient of "
                    + "; ".join(f"{n} ({why})" for n, why in new.items())
                    + f". These parameters go through torch.func instead "
                    f"({', '.join(plan.func)}), which is exact but costs an extra forward and "
                    "backward per batch",
                    stacklevel=4,
                )
        if plan is not self.plan:
            self._set_plan(plan)
        return None if half else (bg, losses)

    def _check_once(
        self, batch: object, plan: Plan, w: Tensor
    ) -> tuple[BatchGrads | None, Tensor | None, dict[str, tuple[str, float]]]:
        """One pass of the check with ``plan``: (result, losses, failing parameters)."""
        task = self.task
        capture = _Capture(task, plan, strict=False)
        try:
            with capture:
                bg, losses, ref = self._run(batch, capture, w)
        except Exception as e:
            if plan.rerouted and not capture.expanded:
                raise ValueError(
                    f"the self-check sent {', '.join(plan.rerouted)} to torch.func because the "
                    f"hooks miss part of their gradient, and then the model failed "
                    f"({type(e).__name__}: {e}). The cause found first: "
                    + "; ".join(f"{n}: {why}" for n, why in plan.rerouted.items())
                ) from e
            if not capture.expanded:
                raise
            # Giving a 1-row input one copy per sample may have broken the forward pass (the
            # input was a batch along another dimension, as x.unsqueeze(0)): without the copies
            # those modules are misfit and rerouted; if it still fails, the error is the user's.
            expanded = dict(capture.expanded)
            try:
                with _Capture(task, plan, strict=False, expand=False) as plain:
                    self._run(batch, plain, w)
            except Exception:
                raise e from None
            why = "copied per sample, the forward failed"
            return None, None, _module_params(task, expanded, len(w), why)
        return bg, losses, _compare(task, plan, bg, ref, w, capture)


_CHECK_SEED = 0x5E1F  # the self-check's sample weights: a fixed draw, reproducible
_HALF = (torch.float16, torch.bfloat16)


@contextlib.contextmanager
def _in_float32(model: nn.Module) -> Iterator[None]:
    """The model's 16-bit parameters and buffers in float32 for the block, then back (16-bit
    values are exact in float32, so the round trip restores them bit for bit). The self-check
    compares in float32: 16-bit rounding (0.4% for bfloat16) would hide a missed use."""
    tensors = [t for t in itertools.chain(model.parameters(), model.buffers()) if t.dtype in _HALF]
    dtypes = [t.dtype for t in tensors]
    for t in tensors:
        t.data = t.data.float()
    try:
        yield
    finally:
        for t, dt in zip(tensors, dtypes):
            t.data = t.data.to(dt)


def _float32_leaves(batch: object) -> object:
    return tree_map(lambda t: t.float() if isinstance(t, Tensor) and t.dtype in _HALF else t, batch)


def autograd_grads(task: Task, losses: Tensor, w: Tensor | None = None) -> dict[str, Tensor]:
    """Autograd's gradient of ``sum_b w_b loss_b`` (all weights 1 if ``w`` is None) for every
    selected parameter, flattened and dense: the reference the self-checks compare with."""
    named = dict(task.model.named_parameters())
    params = [named[q.name] for q in task.params]
    total = (losses if w is None else losses * w.to(losses.dtype)).sum()
    gs = torch.autograd.grad(total, params, allow_unused=True) if total.requires_grad else None
    out = {}
    for i, (q, p) in enumerate(zip(task.params, params)):
        g = torch.zeros_like(p) if gs is None or gs[i] is None else gs[i]
        out[q.name] = (g.to_dense() if g.is_sparse else g).reshape(-1)
    return out


def agrees(got: Tensor, want: Tensor, scale: float, dtype: torch.dtype) -> tuple[bool, float]:
    """Whether two computations of one gradient agree to rounding, ``|got - want| <=
    sqrt(eps(dtype)) * scale`` with ``scale`` the size of the terms summed (a sum that cancels
    is judged by its terms), and their relative error."""
    err = float((got.double() - want.double()).norm())
    rel = err / max(float(want.norm()), float(got.norm()), 1e-300)
    return err <= math.sqrt(torch.finfo(dtype).eps) * scale, rel


def _module_params(
    task: Task, shapes: dict[str, tuple[int, ...]], B: int, what: str = ""
) -> dict[str, tuple[str, float]]:
    """The selected parameters of the modules in ``shapes`` (module -> input shape), each with
    why it fails: the module's input is not batch-first."""
    modules = dict(task.model.named_modules(remove_duplicate=False))
    canon, selected = _param_names(task.model), {q.name for q in task.params}
    out = {}
    for m, shape in shapes.items():
        why = (
            f"module {m!r} got input of shape {shape} in a batch of {B}"
            + (f" ({what})" if what else "")
            + ": its samples are not along dimension 0"
        )
        for n in _own(modules[m], canon, selected).values():
            out[n] = (why, 1.0)
    return out


def _compare(
    task: Task,
    plan: Plan,
    bg: BatchGrads,
    ref: dict[str, Tensor],
    w: Tensor,
    capture: _Capture,
) -> dict[str, tuple[str, float]]:
    """Parameters whose weighted per-sample sum misses autograd's: name -> (why, relative
    error). Tolerance ``sqrt(eps)`` of the parameter's dtype times the sum of absolute values."""
    sums, mags = bg.weighted_sums(w), bg.weighted_sums(w, absolute=True)
    named = dict(task.model.named_parameters())
    shape_of = {
        **_module_params(task, capture.expanded, len(w), "taken as shared by every sample"),
        **_module_params(task, capture.misfit, len(w)),
    }
    # A floor from the whole gradient: a parameter whose gradient cancels to 0 (a shift before
    # a normalisation) is rounding noise on both sides; on the torch.func path its own sum of
    # absolute values is of the results, not of the terms that cancelled.
    total = float(torch.cat([r.double() for r in ref.values()]).norm())
    bad = {}
    for q in task.params:
        want = ref[q.name].double()
        got = sums[q.name].double() if q.name in sums else torch.zeros_like(want)
        mag = float(mags[q.name].double().norm()) if q.name in mags else 0.0
        floor = total * math.sqrt(q.numel / task.dim)
        ok, rel = agrees(got, want, mag + float(want.norm()) + floor, named[q.name].dtype)
        if ok:
            continue
        if q.name in shape_of:
            bad[q.name] = shape_of[q.name]
            continue
        miss = want - got
        theta = named[q.name].detach().double().reshape(-1)
        cos = float(miss @ theta) / max(float(miss.norm() * theta.norm()), 1e-300)
        why = f"relative error {rel:.2g}"
        if q.name in plan.func:
            why += " between torch.func's per-sample gradients and the batch's gradient"
        elif cos > 0.99:
            why += (
                "; the missing part is parallel to the parameter itself: an L2 penalty on it "
                "inside the loss? Give it as fit_exact(l2=...) instead"
            )
        else:
            why += (
                "; it is used outside its module's own call (a functional call on it, a "
                "weight tied outside its module, a term of the loss) or its module's input "
                "is not batch-first. Tie weights by reusing the module"
            )
        bad[q.name] = (why, rel)
    return bad


def _check_failed(bad: dict[str, tuple[str, float]], plan: Plan) -> str:
    lines = "; ".join(f"{n}: {why}" for n, (why, _) in bad.items())
    via = [n for n in bad if n in plan.func]
    hint = ""
    if via:
        hint = (
            f" torch.func's per-sample gradient of {', '.join(via)} disagrees with the batch's "
            "gradient: the model or loss treats a sample differently in a batch than alone "
            "(batch statistics, part of the batch under torch.no_grad, samples not along "
            "dimension 0, a loss that mixes samples). Per-sample influence needs each sample's "
            "loss to depend on that sample only."
        )
    return (
        f"per-sample gradients failed the self-check (weighted sum over the batch against "
        f"autograd): {lines}.{hint} Pass check=False only if you know the gradients are right."
    )


class _LossCall(nn.Module):
    """``fn(model, *args)`` as a module, so that ``functional_call`` substitutes the model's
    parameters for the whole call: the loss's own uses of them (a penalty, a submodule called
    directly, ``model.scale``) see the substitutes too, not only ``model(...)``."""

    def __init__(self, model: nn.Module, fn: Callable):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, *args):
        return self.fn(self.model, *args)


def call_with(model: nn.Module, params: dict[str, Tensor], fn: Callable, *args) -> object:
    """``fn(model, *args)`` with the named parameters of ``model`` replaced by ``params`` (by
    name, as in ``model.named_parameters()``; tied parameters follow) for the whole call."""
    return functional_call(_LossCall(model, fn), {f"model.{n}": t for n, t in params.items()}, args)


def _losses_of(task: Task) -> Callable[[nn.Module, object], Tensor]:
    """``(model, batch) -> task.per_sample_losses(batch, model)``, for :func:`call_with`."""
    return lambda model, batch: task.per_sample_losses(batch, model)


def _func_grads(task: Task, batch: object, names: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-sample losses (B,) and gradients {name: (B, numel)} by ``vmap(grad)``."""
    B = batch_size(batch)
    if B is None:
        raise ValueError("the torch.func path needs a batch with at least one tensor of samples")
    named = dict(task.model.named_parameters())
    params = {n: named[n].detach() for n in names}
    # the other parameters are constants here (they would otherwise carry autograd history)
    fixed = {n: p.detach() for n, p in named.items() if n not in params}
    in_dims = tree_map(lambda t: 0 if isinstance(t, Tensor) and t.ndim > 0 else None, batch)

    def one(p: dict[str, Tensor], sample: object) -> tuple[Tensor, Tensor]:
        batch1 = tree_map(lambda t, d: t if d is None else t.unsqueeze(0), sample, in_dims)
        loss = call_with(task.model, {**fixed, **p}, _losses_of(task), batch1).reshape(())
        return loss, loss

    try:
        with torch.enable_grad():
            grads, losses = vmap(grad(one, has_aux=True), in_dims=(None, in_dims))(params, batch)
    except (ValueError, TypeError):
        raise  # dropinf's own errors (a loss that is not per-sample, ...) pass as they are
    except Exception as e:
        raise ValueError(
            f"torch.func (vmap over grad) could not compute per-sample gradients of "
            f"{', '.join(names)}: {type(e).__name__}: {e}. These parameters are not in layers "
            "dropinf hooks (Linear, Conv2d, Conv1D, LayerNorm, Embedding) or were rerouted by "
            "the self-check. Leave them out of Task(params=...), or make the model traceable "
            "by torch.func (no .item() or data-dependent Python control flow in forward)"
        ) from e
    return losses.detach(), {n: g.detach().reshape(B, -1) for n, g in grads.items()}


# ----------------------------------------------------------------------------- factored layout


@dataclass(frozen=True)
class FactorSpec:
    """A layer whose per-sample gradient compressors may form from its factors.

    The layer's (augmented) weight is an ``(n_out, n_in + has_bias)`` matrix: output units by
    input units, the bias being the last input unit. A grouped convolution is one such matrix
    whose output rows are split among the groups, each over the same ``n_in`` local inputs.
    """

    module: str
    weight: str | None
    bias: str | None
    n_in: int
    n_out: int
    transposed: bool = False

    @property
    def n_in_aug(self) -> int:
        return self.n_in + (self.bias is not None)

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(p for p in (self.weight, self.bias) if p is not None)


def factor_specs(task: Task, plan: Plan | None = None) -> list[FactorSpec]:
    """Layers (in model order) whose parameters no other hooked module shares.

    A parameter shared with another hooked module (GPT-2's ``lm_head`` tied to ``wte``) is not
    listed: compressors treat it as a plain parameter, summing all its contributions first.
    """
    plan = plan or make_plan(task)
    selected = {p.name for p in task.params}
    canon = _param_names(task.model)
    modules = dict(task.model.named_modules(remove_duplicate=False))
    users: dict[str, int] = defaultdict(int)
    for name in plan.hooked:
        for pname in _own(modules[name], canon, selected).values():
            users[pname] += 1
    specs = []
    for name, kind in plan.hooked.items():
        if kind not in ("linear", "conv1d", "conv2d"):
            continue
        m = modules[name]
        own = _own(m, canon, selected)
        w, b = own.get("weight"), own.get("bias")
        # Without its weight a layer has no factored gradient (a selected bias alone is flat).
        if w is None or any(users[p] > 1 for p in (w, b) if p is not None):
            continue
        if kind == "linear":
            n_in, n_out = m.in_features, m.out_features
        elif kind == "conv1d":
            n_in, n_out = m.weight.shape
        else:  # (C_out, C_in / groups, kh, kw)
            n_in, n_out = m.weight[0].numel(), m.out_channels
        specs.append(FactorSpec(name, w, b, n_in, n_out, kind == "conv1d"))
    return specs
