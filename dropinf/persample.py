"""Exact per-sample gradients in factored form.

For ``nn.Linear``, ``nn.Conv2d`` and Hugging Face ``Conv1D`` the per-sample weight gradient is
``G_b = sum_t delta_bt x_bt^T`` (t runs over tokens or spatial positions), so it is enough to keep
the layer input ``x`` and the gradient of the loss with respect to the layer output ``delta``.
Forward hooks capture ``x`` and route each output through :class:`_Tap`, whose backward records
``delta``. The backward pass asks autograd only for the gradient reaching a dummy anchor that every
tap hangs off, so no weight gradient is ever computed. ``LayerNorm`` and ``Embedding`` get the same
treatment with their own closed forms. Every other selected parameter goes through ``torch.func``
(``vmap`` over ``grad``) in a second pass.

The factors are what compressors consume (:class:`~dropinf.blocks.BatchGrads`); which
parameters go which way is :func:`~dropinf.plan.make_plan`'s; the self-check that makes sure
the hooks saw every use of a parameter is :class:`PerSampleGrads`'s, with its pieces in
:mod:`dropinf.check`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

from .blocks import (
    BatchGrads,
    Block,
    DenseGrad,
    EmbeddingFactors,
    FactorReducer,
    LinearFactors,
    ReducedFactors,
)
from .check import (
    CHECK_SEED,
    HALF,
    autograd_grads,
    compare,
    failure_message,
    float32_leaves,
    in_float32,
    module_params,
)
from .plan import Plan, _own, _param_names, make_plan
from .task import Task, as_tree, batch_size

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
        g = torch.Generator().manual_seed(CHECK_SEED)
        w = (0.5 + torch.rand(B, generator=g, dtype=torch.float64)).to(task.device)
        half = any(p.dtype in HALF for p in task.model.parameters())
        plan = self.plan
        with in_float32(task.model) if half else contextlib.nullcontext():
            batch = float32_leaves(batch) if half else batch
            while True:
                bg, losses, bad = self._check_once(batch, plan, w)
                if not bad:
                    break
                new = {n: why for n, (why, _) in bad.items() if n not in plan.func}
                if not new:
                    raise ValueError(failure_message(bad, plan))
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
            return None, None, module_params(task, expanded, len(w), why)
        return bg, losses, compare(task, plan, bg, ref, w, capture.misfit, capture.expanded)


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


