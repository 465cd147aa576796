"""Featurisation: per-sample (compressed) gradients of a whole dataset."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils._pytree import tree_map
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .compressors import Compressor
from .persample import PerSampleGrads
from .task import Task


@dataclass
class Gradients:
    """Per-sample gradients of n samples, compressed to k dimensions: ``data`` is (n, k).

    Row i belongs to dataset item ``indices[i]``; when the loader exposes its dataset and sampler
    (a ``torch.utils.data.DataLoader`` over a map-style dataset), rows are sorted by dataset
    index whatever the sampling order. ``param_names`` gives the order of the parameters whose
    gradients were taken (before compression), ``compressor`` the compressor's fingerprint.
    Gradients are of the per-sample loss; influence built from them is positive when helpful.
    """

    data: Tensor
    indices: Tensor
    losses: Tensor
    param_names: list[str]
    compressor: str

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.data.shape)

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, i) -> Tensor:
        return self.data[i]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        a = self.data.detach().cpu().numpy()
        return a if dtype is None else a.astype(dtype, copy=False)

    def numpy(self) -> np.ndarray:
        return self.__array__()

    def __dlpack__(self, *args, **kwargs):
        # torch.as_tensor(G) and np.from_dlpack(G) share memory with ``data`` through this.
        return self.data.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self.data.__dlpack_device__()


class _Indexed(Dataset):
    """Wraps a map-style dataset so every item carries its index."""

    def __init__(self, ds: Dataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        return i, self.ds[i]


def _with_indices(loader: Iterable) -> tuple[Iterable, bool]:
    """Re-create a DataLoader whose batches carry dataset indices (same sampler and collate)."""
    if not isinstance(loader, DataLoader) or loader.batch_sampler is None:
        return loader, False
    try:
        len(loader.dataset)
    except TypeError:  # iterable-style dataset: no indices to track
        return loader, False
    collate = loader.collate_fn

    def collate_indexed(items):
        idx, rest = zip(*items)
        return torch.as_tensor(idx), collate(list(rest))

    return DataLoader(
        _Indexed(loader.dataset),
        batch_sampler=loader.batch_sampler,
        num_workers=loader.num_workers,
        collate_fn=collate_indexed,
        pin_memory=loader.pin_memory,
    ), True


def _to_device(batch: object, device: torch.device) -> object:
    return tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, batch)


def gradients(
    task: Task,
    loader: Iterable,
    compressor: Compressor,
    *,
    progress: bool = True,
    desc: str = "gradients",
    dtype: torch.dtype = torch.float32,
) -> Gradients:
    """Per-sample gradients of every sample ``loader`` yields, compressed by ``compressor``.

    Args:
        task: model and per-sample loss.
        loader: an iterable of batches that ``task.loss`` accepts (a ``DataLoader`` or a list).
            Batches are moved to the model's device.
        compressor: e.g. ``Identity()`` for the exact (n, d) per-sample gradients.
        progress: show a tqdm bar labelled ``desc``.
        dtype: of the result (float64 keeps a float64 model's precision).

    Returns:
        :class:`Gradients` with ``data`` of shape (n, compressor.dim), on the CPU.

    Raises:
        ValueError: empty loader, or a non-finite loss or gradient (naming the sample).
    """
    if not isinstance(compressor, Compressor):
        raise TypeError(
            f"compressor must be a dropinf compressor such as dropinf.Identity(), got "
            f"{type(compressor).__name__}"
        )
    compressor.bind(task)
    batches, indexed = _with_indices(loader)
    device = task.device
    rows, idx, losses = [], [], []
    seen = 0
    with task.evaluating(), PerSampleGrads(task, compressor) as psg:
        for item in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
            bidx, batch = item if indexed else (None, item)
            bg, loss = psg(_to_device(batch, device))
            z = compressor.compress(bg).detach()
            n = z.shape[0]
            bidx = torch.arange(seen, seen + n) if bidx is None else bidx
            _check_finite(loss, z, bidx)
            rows.append(z.to(dtype).cpu())
            idx.append(bidx)
            losses.append(loss.float().cpu())
            seen += n
    if not rows:
        raise ValueError("loader yielded no batch; per-sample gradients need at least one sample")
    data, indices, loss = torch.cat(rows), torch.cat(idx), torch.cat(losses)
    if indexed:
        order = torch.argsort(indices, stable=True)
        data, indices, loss = data[order], indices[order], loss[order]
    return Gradients(data, indices, loss, task.param_names, compressor.fingerprint)


def _check_finite(loss: Tensor, z: Tensor, idx: Tensor) -> None:
    # A row sum is non-finite whenever an entry is (or on overflow): check it first, cheaply.
    if torch.isfinite(loss).all() and torch.isfinite(z.sum(1)).all():
        return
    bad = ~torch.isfinite(loss).cpu() | ~torch.isfinite(z).all(1).cpu()
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        what = "loss" if not torch.isfinite(loss[i]) else "gradient"
        raise ValueError(
            f"non-finite {what} for sample {int(idx[i])} (loss {float(loss[i]):.4g}); check the "
            f"data and the model for NaN/inf ({int(bad.sum())} such samples in this batch)"
        )
