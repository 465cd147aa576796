"""A model plus its per-sample loss: the one object every influence computation starts from."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map

LossFn = Callable[[nn.Module, object], Tensor]

# Modules whose behaviour differs between train() and eval(): featurisation must not run them
# in train mode, because dropout would make gradients random and batch norm would mix samples.
_MODE_SENSITIVE = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)


@dataclass(frozen=True)
class ParamInfo:
    """One selected parameter: its name in ``model.named_parameters()``, shape and offset.

    ``offset`` is where the flattened (row-major) parameter starts in the per-sample gradient
    vector, which concatenates the selected parameters in ``named_parameters()`` order.
    """

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def stop(self) -> int:
        return self.offset + self.numel


class Task:
    """A model and its per-sample loss.

    Args:
        model: any ``nn.Module``.
        loss: ``loss(model, batch) -> Tensor`` of shape ``(B,)``: one loss per sample, where B is
            the leading dimension of the batch's tensors. Reduce over tokens *inside* the loss
            (mask padded tokens there; a masked token then contributes nothing to any gradient).
            The loss must call the model as ``model(...)``: the ``torch.func`` path passes a
            functional stand-in for it.
        params: which parameters count. ``None`` (default) takes every parameter with
            ``requires_grad``; otherwise a list of parameter names (``"fc1.weight"``) or module
            names (``"fc1"``, all of that module's parameters, recursively).

    Gradients are of the per-sample loss, so an influence score built from them is positive when
    the training point is helpful (removing it would raise the test loss).
    """

    def __init__(self, model: nn.Module, loss: LossFn, params: Sequence[str] | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss):
            raise TypeError(
                f"loss must be callable as loss(model, batch), got {type(loss).__name__}"
            )
        self.model = model
        self.loss = loss
        self.params: list[ParamInfo] = _select_params(model, params)
        self.dim = self.params[-1].stop

    @property
    def device(self) -> torch.device:
        """Where the model's parameters live (batches are moved there)."""
        return next((p.device for p in self.model.parameters()), torch.device("cpu"))

    @property
    def param_names(self) -> list[str]:
        return [p.name for p in self.params]

    def l2_vector(
        self, l2: float | Mapping[str, float], device: torch.device | str = "cpu"
    ) -> Tensor:
        """(d,) float64 coefficients of an L2 regulariser ``sum_i l2_i / 2 * theta_i^2`` over the
        selected parameters, in gradient order.

        ``l2``: one number for every selected parameter, or a mapping from parameter name (as
        in :attr:`param_names`) to its coefficient; parameters not named get 0. This states
        weight decay on some parameters only (optimizer groups that leave biases and norms
        out), so the curvature matches the objective the model was trained on.
        """
        if isinstance(l2, Mapping):
            unknown = sorted(set(l2) - set(self.param_names))
            if unknown:
                raise ValueError(
                    f"l2 names {unknown}, which are not selected parameters; use names from "
                    f"task.param_names, e.g. {self.param_names[:3]}"
                )
            out = torch.zeros(self.dim, dtype=torch.float64)
            for q in self.params:
                if q.name in l2:
                    out[q.offset : q.stop] = _coefficient(l2[q.name], f"l2[{q.name!r}]")
        else:
            out = torch.full((self.dim,), _coefficient(l2, "l2"), dtype=torch.float64)
        return out.to(device)

    def per_sample_losses(self, batch: object, model: object | None = None) -> Tensor:
        """Call the loss and check that it returned one finite-shaped value per sample: ``(B,)``."""
        out = self.loss(self.model if model is None else model, batch)
        n = batch_size(batch)
        if not isinstance(out, Tensor):
            raise TypeError(
                f"loss returned {type(out).__name__}; it must return a Tensor of per-sample "
                f"losses with shape ({n},)"
            )
        if out.ndim != 1 or (n is not None and out.shape[0] != n):
            hint = (
                " It returned a scalar: use reduction='none' and average over tokens per sample."
                if out.ndim == 0
                else ""
            )
            raise ValueError(
                f"loss returned shape {tuple(out.shape)} for a batch of {n}; it must return "
                f"per-sample losses of shape ({n},).{hint}"
            )
        return out

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        """Run the model in eval mode, warning if train mode would have changed the gradients."""
        if self.model.training:
            active = sorted(
                {type(m).__name__ for m in self.model.modules() if isinstance(m, _MODE_SENSITIVE)}
            )
            if active:
                warnings.warn(
                    f"model is in train mode with {', '.join(active)} active; per-sample "
                    "gradients are computed in eval mode (call model.eval() to silence this)",
                    stacklevel=3,
                )
        with eval_mode(self.model):
            yield


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode, then restore the mode it had."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def as_tree(batch: object) -> object:
    """``batch`` with every mapping that is not a ``dict`` (a Hugging Face ``BatchEncoding``, a
    ``UserDict``) turned into a ``dict``, inside tuples and lists too, so that its tensors are
    seen as the batch's leaves. Other objects are returned as they are."""
    if isinstance(batch, Mapping):
        return {k: as_tree(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)) and not hasattr(batch, "_fields"):
        return type(batch)(as_tree(v) for v in batch)
    return batch


def _coefficient(v: object, name: str) -> float:
    if isinstance(v, Tensor) and v.numel() == 1:
        v = v.item()
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool)
    if not ok or not math.isfinite(v) or v < 0:
        raise ValueError(
            f"{name}={v!r} must be a finite number >= 0 (the coefficient c of c/2 * |theta|^2)"
        )
    return float(v)


def batch_size(batch: object) -> int | None:
    """Leading dimension shared by the batch's tensors, or None if there is no tensor."""
    sizes = {t.shape[0] for t in tree_leaves(batch) if isinstance(t, Tensor) and t.ndim > 0}
    if not sizes:
        return None
    if len(sizes) > 1:
        raise ValueError(
            f"batch tensors have different leading dimensions {sorted(sizes)}; every tensor "
            "in a batch must have the samples along dimension 0"
        )
    return sizes.pop()


def _select_params(model: nn.Module, names: Sequence[str] | None) -> list[ParamInfo]:
    named = dict(model.named_parameters())
    if names is None:
        chosen = {n for n, p in named.items() if p.requires_grad}
        if not chosen:
            raise ValueError("model has no parameter with requires_grad=True; pass params=[...]")
    else:
        if isinstance(names, str):
            raise TypeError(f"params must be a list of names, got the string {names!r}")
        modules = dict(model.named_modules())
        chosen = set()
        for name in names:
            if name in named:
                hits = [name]
            elif name in modules:
                prefix = f"{name}." if name else ""
                hits = [n for n in named if n.startswith(prefix)]
            else:
                raise ValueError(
                    f"params entry {name!r} is neither a parameter nor a module of the model "
                    f"(parameters look like {next(iter(named), '<none>')!r})"
                )
            for n in hits:
                if not named[n].requires_grad:
                    raise ValueError(
                        f"parameter {n!r} has requires_grad=False; set it to True or leave it "
                        "out of params"
                    )
            chosen.update(hits)
        if not chosen:
            raise ValueError(f"params={list(names)!r} selects no parameter")
    out, offset = [], 0
    for n, p in named.items():  # named_parameters() order defines the gradient layout
        if n in chosen:
            out.append(ParamInfo(n, tuple(p.shape), offset))
            offset += p.numel()
    return out


def to_device(batch: object, device: torch.device) -> object:
    """``batch`` with every tensor in it (nested tuples, lists, dicts) moved to ``device``."""
    return tree_map(lambda x: x.to(device) if isinstance(x, Tensor) else x, batch)
