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

import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

from .task import ParamInfo, Task, batch_size

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


@dataclass
class Plan:
    """Which selected parameters go through hooks (by module) and which through ``torch.func``."""

    hooked: dict[str, str]  # module name -> kind
    func: list[str]  # parameter names
    unsupported: dict[str, str]  # module name -> type name, for modules whose params use func


def _param_names(model: nn.Module) -> dict[int, str]:
    """Canonical name of every parameter by identity (tied ones under their first name)."""
    return {id(p): n for n, p in model.named_parameters()}


def _own(m: nn.Module, canon: dict[int, str], selected: set[str]) -> dict[str, str]:
    """A module's own (direct) selected parameters: {attribute, e.g. "weight": name}."""
    names = {a: canon.get(id(p)) for a, p in m._parameters.items() if p is not None}
    return {a: n for a, n in names.items() if n in selected}


def make_plan(task: Task) -> Plan:
    """Route each selected parameter.

    A parameter goes through hooks only if every module that owns it (tied weights have several
    owners) is hookable; otherwise through ``torch.func``. A hookable module is hooked when at
    least one of its own parameters is selected and none of them is routed to ``torch.func``.
    """
    selected = {p.name for p in task.params}
    canon = _param_names(task.model)
    owners: dict[str, list[tuple[str, nn.Module]]] = defaultdict(list)
    for mname, m in task.model.named_modules(remove_duplicate=False):
        for pname in _own(m, canon, selected).values():
            owners[pname].append((mname, m))
    func: set[str] = set()
    unsupported: dict[str, str] = {}
    for pname, mods in owners.items():
        for mname, m in mods:
            if not _hookable(m):
                func.add(pname)
                unsupported[mname] = type(m).__name__
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
    hooked: dict[str, str] = {}
    seen: set[int] = set()
    for mname, m in task.model.named_modules(remove_duplicate=False):
        kind = _hookable(m)
        own = set(_own(m, canon, selected).values())
        if kind and own and not own & func and id(m) not in seen:
            hooked[mname] = kind
            seen.add(id(m))
    func_list = [p.name for p in task.params if p.name in func]  # layout order
    return Plan(hooked, func_list, unsupported)


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
    """Installs forward hooks on the planned modules for the duration of a ``with`` block."""

    def __init__(self, task: Task, plan: Plan, reducers: dict[str, FactorReducer] | None = None):
        self.task, self.plan, self.reducers = task, plan, reducers or {}
        self.calls: dict[str, list[_Call]] = defaultdict(list)
        self.anchor: Tensor | None = None
        self.size = 0
        self.handles = []

    def __enter__(self) -> _Capture:
        modules = dict(self.task.model.named_modules(remove_duplicate=False))
        for name in self.plan.hooked:
            self.handles.append(modules[name].register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def reset(self, device: torch.device, size: int) -> Tensor:
        self.calls.clear()
        self.size = size
        self.anchor = torch.zeros((), device=device, requires_grad=True)
        return self.anchor

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
            if self.anchor is None:
                return None
            inp, B = args[0].detach(), self.size
            if inp.shape[0] != B:
                if inp.shape[0] != 1:
                    raise ValueError(
                        f"module {name!r} got input of shape {tuple(inp.shape)} in a batch of "
                        f"{B}; hooked layers need the samples along dimension 0 (batch_first). "
                        f"Leave this module out of Task(params=...) or reshape its input."
                    )
                # Shared across the batch (e.g. GPT-2 position embeddings): give each sample its
                # own copy so that its output gradient is per-sample, not summed over samples.
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
    ...     bg = psg(batch)        # BatchGrads; bg.flat() is (B, d)

    With a ``compressor`` (bound to the task here), layers that it reduces factor by factor
    (:meth:`~dropinf.Compressor.reducers`: factored dropout and Gaussian) are reduced as they are
    captured and come back as :class:`ReducedFactors`, which only ``compressor.compress`` reads.
    """

    def __init__(self, task: Task, compressor=None):
        self.task = task
        self.plan = make_plan(task)
        if self.plan.unsupported:
            mods = ", ".join(f"{m} ({t})" for m, t in self.plan.unsupported.items())
            warnings.warn(
                f"no factored per-sample gradient for {mods}; their parameters "
                f"({', '.join(self.plan.func)}) go through torch.func (vmap over grad), "
                "which costs an extra forward and backward pass",
                stacklevel=2,
            )
        self._canon = _param_names(task.model)
        self._selected = {p.name for p in task.params}
        self._modules = dict(task.model.named_modules(remove_duplicate=False))
        self.reducers: dict[str, FactorReducer] = {}
        if compressor is not None:
            self.reducers = {
                name: r
                for name, r in compressor.bind(task).reducers(task.device).items()
                # grouped convolutions split the factors per group: compressors handle those
                if name in self.plan.hooked and getattr(self._modules[name], "groups", 1) == 1
            }
        self._capture = _Capture(task, self.plan, self.reducers)

    def __enter__(self) -> PerSampleGrads:
        self._capture.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._capture.__exit__(*exc)

    def __call__(self, batch: object) -> tuple[BatchGrads, Tensor]:
        """Per-sample gradients and the per-sample losses (B,) of one batch."""
        task, plan = self.task, self.plan
        out = BatchGrads(task.params)
        device = task.device
        losses = None
        if plan.hooked:
            B = batch_size(batch)
            if B is None:
                raise ValueError("batch has no tensor with the samples along dimension 0")
            anchor = self._capture.reset(device, B)
            try:
                with torch.enable_grad():
                    losses = task.per_sample_losses(batch)
                    if losses.requires_grad:
                        torch.autograd.grad(losses.sum(), anchor, allow_unused=True)
            finally:
                self._capture.anchor = None
            for name, kind in plan.hooked.items():
                calls = self._capture.calls.get(name, [])
                out.blocks += _factors(
                    name,
                    kind,
                    self._modules[name],
                    calls,
                    self._selected,
                    self._canon,
                    reduced=name in self.reducers,
                )
            self._capture.calls.clear()
        if plan.func:
            func_losses, grads = _func_grads(task, batch, plan.func)
            losses = func_losses if losses is None else losses
            out.blocks += [DenseGrad(n, g) for n, g in grads.items()]
        if losses is None:
            raise AssertionError("plan routes no parameter")  # Task guarantees one is selected
        out.size = losses.shape[0]
        return out, losses.detach()


class _Functional:
    """Stands in for the model inside ``torch.func``: calls it with substituted parameters."""

    def __init__(self, module: nn.Module, params: dict[str, Tensor]):
        self._module, self._params = module, params

    def __call__(self, *args, **kwargs):
        return functional_call(self._module, self._params, args, kwargs)

    def __getattr__(self, name: str):
        return getattr(self._module, name)


def _func_grads(task: Task, batch: object, names: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-sample losses (B,) and gradients {name: (B, numel)} by ``vmap(grad)``."""
    B = batch_size(batch)
    if B is None:
        raise ValueError("the torch.func path needs a batch with at least one tensor of samples")
    named = dict(task.model.named_parameters())
    params = {n: named[n].detach() for n in names}
    in_dims = tree_map(lambda t: 0 if isinstance(t, Tensor) and t.ndim > 0 else None, batch)

    def one(p: dict[str, Tensor], sample: object) -> tuple[Tensor, Tensor]:
        batch1 = tree_map(lambda t, d: t if d is None else t.unsqueeze(0), sample, in_dims)
        loss = task.per_sample_losses(batch1, _Functional(task.model, p)).reshape(())
        return loss, loss

    with torch.enable_grad():
        grads, losses = vmap(grad(one, has_aux=True), in_dims=(None, in_dims))(params, batch)
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
