"""Retraining on subsets of the training set: the ground truth for leave-one-out and LDS.

Everything here is generic over two callables:

- ``train_fn(indices, seed) -> model``: train on the training points ``indices`` (a sorted
  int64 numpy array) from ``seed``;
- ``output_fn(model) -> (n_test,)``: the measured output per test point, **higher = better for
  the test point** (e.g. :func:`negative_loss`, or the correct-class margin).

With that sign, removing a helpful point (positive score) lowers the output, and keeping more
helpful points raises it, which is what :func:`dropinf.study.metrics.loo_correlation` and
:func:`dropinf.study.metrics.lds` expect. For a convex model :class:`ConvexRetrainer` is a fast,
deterministic ``train_fn``; for a non-convex one pass several seeds, and outputs are averaged.
The same seeds are used for every subset (common random numbers), so differences between
subsets are not swamped by differences between initialisations.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map
from tqdm.auto import tqdm

from ..task import batch_size, eval_mode
from .models import fit_full_batch

TrainFn = Callable[[np.ndarray, int], Any]
OutputFn = Callable[[Any], Any]


def negative_loss(loss: Callable[[nn.Module, Any], Tensor], batch) -> OutputFn:
    """``output_fn`` giving ``-loss(model, batch)`` per test point, (n_test,) float64, computed
    in eval mode without gradients (the model's mode is restored)."""

    def output(model: nn.Module) -> np.ndarray:
        with eval_mode(model), torch.no_grad():
            return -loss(model, batch).double().cpu().numpy()

    return output


def _seeds(seeds: Sequence[int]) -> list[int]:
    seeds = [seeds] if isinstance(seeds, (int, np.integer)) else list(seeds)
    if not seeds or not all(isinstance(s, (int, np.integer)) for s in seeds):
        raise ValueError(f"seeds={seeds!r} must be a non-empty sequence of ints, e.g. (0, 1, 2)")
    return [int(s) for s in seeds]


def _outputs(
    train_fn: TrainFn,
    output_fn: OutputFn,
    index_sets: Iterable[np.ndarray],
    count: int,
    seeds: list[int],
    progress: bool,
    desc: str,
) -> np.ndarray:
    """(count, n_seeds, n_test) outputs of a model trained on each index set with each seed."""
    out: np.ndarray | None = None
    bar = tqdm(total=count * len(seeds), desc=desc, disable=not progress, unit="model")
    with bar:
        for j, idx in enumerate(index_sets):
            for r, seed in enumerate(seeds):
                y = output_fn(train_fn(idx, seed))
                y = np.asarray(y.detach().cpu() if isinstance(y, Tensor) else y, np.float64)
                if out is None:
                    if y.ndim != 1:
                        raise ValueError(f"output_fn must return (n_test,), got shape {y.shape}")
                    out = np.empty((count, len(seeds), len(y)))
                if y.shape != out.shape[2:]:
                    raise ValueError(
                        f"output_fn returned shape {y.shape} after {out.shape[2:]}: it must give "
                        f"one value per test point every time"
                    )
                out[j, r] = y
                bar.update()
    return out


def subset_outputs(
    train_fn: TrainFn,
    output_fn: OutputFn,
    masks,
    seeds: Sequence[int] = (0,),
    progress: bool = True,
    desc: str = "retrain on subsets",
    per_seed: bool = False,
) -> np.ndarray:
    """Outputs of models retrained on each subset, the ``outputs`` of
    :func:`dropinf.study.metrics.lds`.

    Args:
        masks: (m, n_train) bool, e.g. from :func:`dropinf.study.metrics.lds_subsets`.
        seeds: one model per seed per subset, the same seeds for every subset.
        per_seed: return every seed's outputs instead of their mean.

    Returns:
        (m, n_test) mean over seeds, or (m, n_seeds, n_test) with ``per_seed``.
    """
    masks = masks.cpu().numpy() if isinstance(masks, Tensor) else np.asarray(masks)
    if masks.ndim != 2 or masks.dtype != bool:
        raise TypeError(f"masks must be a 2-D bool array (m, n_train), got {masks.dtype} "
                        f"{masks.shape}")
    if not masks.any(1).all():
        raise ValueError("every subset must keep at least one training point; a mask row is empty")
    seeds = _seeds(seeds)
    sets = (np.flatnonzero(row) for row in masks)
    out = _outputs(train_fn, output_fn, sets, len(masks), seeds, progress, desc)
    return out if per_seed else out.mean(1)


def loo_effects(
    train_fn: TrainFn,
    output_fn: OutputFn,
    removed,
    n_train: int,
    seeds: Sequence[int] = (0,),
    reference=None,
    progress: bool = True,
    desc: str = "leave one out",
) -> np.ndarray:
    """True effect of removing each point in ``removed``, by retraining without it.

    ``effect[j, t] = mean over seeds of output(all points)[t] - output(all but removed[j])[t]``:
    how much test point t's output (higher = better) falls when the point is removed. Positive
    = helpful, in the units of ``score / n`` for a first-order influence score.

    Args:
        removed: (n_removed,) distinct training indices in ``[0, n_train)``.
        n_train: size of the full training set.
        seeds: as in :func:`subset_outputs` (the full-data models use the same seeds).
        reference: (n_test,) outputs of the full-data models averaged over ``seeds``, if already
            known; otherwise computed with ``train_fn`` on all points.

    Returns:
        (n_removed, n_test) effects.
    """
    removed = np.asarray(removed.cpu() if isinstance(removed, Tensor) else removed)
    if removed.ndim != 1 or not np.issubdtype(removed.dtype, np.integer):
        raise TypeError(f"removed must be a 1-D array of int indices, got {removed.dtype} "
                        f"{removed.shape}")
    if len(removed) and (removed.min() < 0 or removed.max() >= n_train):
        raise ValueError(f"removed holds indices outside [0, {n_train}): "
                         f"{removed.min()}..{removed.max()}")
    if len(np.unique(removed)) != len(removed):
        raise ValueError("removed holds repeated indices; each point is removed once")
    seeds = _seeds(seeds)
    everything = np.arange(n_train)
    if reference is None:
        reference = _outputs(train_fn, output_fn, [everything], 1, seeds, False, desc)[0].mean(0)
    reference = np.asarray(reference, np.float64)
    sets = (np.delete(everything, j) for j in removed)
    out = _outputs(train_fn, output_fn, sets, len(removed), seeds, progress, desc).mean(1)
    if reference.shape != out.shape[1:]:
        raise ValueError(f"reference has shape {reference.shape}; it must be (n_test,) = "
                         f"{out.shape[1:]}")
    return reference[None] - out


def subset_batch(batch, indices) -> Any:
    """The rows ``indices`` of every tensor in ``batch`` (a tensor, tuple, list or dict)."""
    idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
    return tree_map(lambda t: t[idx] if isinstance(t, Tensor) and t.ndim > 0 else t, batch)


class ConvexRetrainer:
    """Fast ``train_fn`` for a convex model (e.g. L2-regularised logistic regression) trained
    full batch with :func:`dropinf.study.models.fit_full_batch`.

    Each call starts from a copy of ``model`` (warm start: pass the model fitted on all the data,
    which is close to every subset's optimum), minimises to a tight gradient norm and records it
    in ``grad_norms``. The optimum is unique, so ``seed`` is ignored.

    With ``same_objective=True`` (default) a subset S is fitted on
    ``(1/n) sum_{i in S} loss_i + l2/2 |theta|^2`` with n the full training size (``l2`` is
    rescaled by ``n / |S|`` for ``fit_full_batch``'s mean loss): removing points is then exactly
    the down-weighting by ``1/n`` that an influence score linearises. With ``False`` each subset
    is fitted on its own mean loss plus ``l2/2 |theta|^2``.

    Args:
        model: the full-data model (copied, never changed).
        loss: ``loss(model, batch) -> (B,)``.
        data: the whole training set as one batch (tensors with a leading dimension n).
        l2, tol, max_iter: as in ``fit_full_batch``.
        warn_above: warn when a fit ends with a gradient norm above this.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: Callable[[nn.Module, Any], Tensor],
        data,
        l2: float,
        tol: float = 1e-10,
        max_iter: int = 500,
        same_objective: bool = True,
        warn_above: float = 1e-6,
    ):
        n = batch_size(data)
        if n is None:
            raise ValueError("data must hold tensors with a leading dimension (the samples)")
        if l2 < 0:
            raise ValueError(f"l2={l2} must be non-negative")
        self.model, self.loss, self.data, self.n = model, loss, data, n
        self.l2, self.tol, self.max_iter = l2, tol, max_iter
        self.same_objective, self.warn_above = same_objective, warn_above
        self.grad_norms: list[float] = []

    def __call__(self, indices, seed: int = 0) -> nn.Module:
        del seed  # convex: one optimum whatever the seed
        indices = np.asarray(indices)
        model = copy.deepcopy(self.model)
        l2 = self.l2 * self.n / len(indices) if self.same_objective else self.l2
        gnorm = fit_full_batch(model, self.loss, subset_batch(self.data, indices), l2=l2,
                               tol=self.tol, max_iter=self.max_iter)
        self.grad_norms.append(gnorm)
        if not gnorm <= self.warn_above:
            warnings.warn(
                f"retraining on {len(indices)} points stopped at gradient norm {gnorm:.2e} > "
                f"{self.warn_above:.0e}: raise max_iter, or use float64",
                RuntimeWarning,
                stacklevel=2,
            )
        return model
