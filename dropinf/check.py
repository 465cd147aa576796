"""The self-check's pieces: autograd's reference gradient, the tolerance, and the comparison of
weighted per-sample sums with it (used by :class:`~dropinf.persample.PerSampleGrads` and by
:meth:`~dropinf.Preconditioner.fit_exact`)."""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from .blocks import BatchGrads
from .plan import Plan, _own, _param_names
from .task import Task

CHECK_SEED = 0x5E1F  # the self-check's sample weights: a fixed draw, reproducible
HALF = (torch.float16, torch.bfloat16)


@contextlib.contextmanager
def in_float32(model: nn.Module) -> Iterator[None]:
    """The model's 16-bit parameters and buffers in float32 for the block, then back (16-bit
    values are exact in float32, so the round trip restores them bit for bit). The self-check
    compares in float32: 16-bit rounding (0.4% for bfloat16) would hide a missed use."""
    tensors = [t for t in itertools.chain(model.parameters(), model.buffers()) if t.dtype in HALF]
    dtypes = [t.dtype for t in tensors]
    for t in tensors:
        t.data = t.data.float()
    try:
        yield
    finally:
        for t, dt in zip(tensors, dtypes):
            t.data = t.data.to(dt)


def float32_leaves(batch: object) -> object:
    return tree_map(lambda t: t.float() if isinstance(t, Tensor) and t.dtype in HALF else t, batch)


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


def module_params(
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


def compare(
    task: Task,
    plan: Plan,
    bg: BatchGrads,
    ref: dict[str, Tensor],
    w: Tensor,
    misfit: dict[str, tuple[int, ...]],
    expanded: dict[str, tuple[int, ...]],
) -> dict[str, tuple[str, float]]:
    """Parameters whose weighted per-sample sum misses autograd's: name -> (why, relative
    error). Tolerance ``sqrt(eps)`` of the parameter's dtype times the sum of absolute values."""
    sums, mags = bg.weighted_sums(w), bg.weighted_sums(w, absolute=True)
    named = dict(task.model.named_parameters())
    shape_of = {
        **module_params(task, expanded, len(w), "taken as shared by every sample"),
        **module_params(task, misfit, len(w)),
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


def failure_message(bad: dict[str, tuple[str, float]], plan: Plan) -> str:
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
