"""Featurisation: per-sample (compressed) gradients of a whole dataset."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .compressors import Compressor
from .persample import PerSampleGrads
from .store import (
    RANKS,
    GradientWriter,
    Store,
    hash_batch,
    loss_name,
    model_hash,
    sorted_positions,
)
from .task import Task, as_tree, batch_size, to_device


@dataclass
class Gradients:
    """Per-sample gradients of n samples, compressed to k dimensions: ``data`` is (n, k).

    Row i belongs to dataset item ``indices[i]``; when the loader exposes its dataset and sampler
    (a ``torch.utils.data.DataLoader`` over a map-style dataset), rows are sorted by dataset
    index whatever the sampling order. ``param_names`` gives the order of the parameters whose
    gradients were taken (before compression), ``compressor`` the compressor's fingerprint,
    ``model`` the model's hash (:func:`dropinf.store.model_hash`; None: unknown). Scores,
    self-influence, top-k and preconditioners refuse to combine rows whose compressor, model or
    parameters differ (see :class:`dropinf.curvature.Source`); plain tensors (``G.data``) are
    not checked. Gradients are of the per-sample loss; influence built from them is positive
    when helpful. ``path``: the store directory when ``data`` is memory-mapped from one (see
    :meth:`load`).
    """

    data: Tensor
    indices: Tensor
    losses: Tensor
    param_names: list[str]
    compressor: str
    path: Path | None = None
    model: str | None = None

    @classmethod
    def load(cls, path: str | os.PathLike, verify: bool = True) -> Gradients:
        """The gradients of a complete store, ``data`` memory-mapped (see
        :meth:`dropinf.Store.gradient_arrays`); ``verify`` checks every chunk's checksum first."""
        store = Store(path)
        data, indices, losses = store.gradient_arrays(verify=verify)
        g = store.manifest["gradients"]
        return cls(
            data, indices, losses, g["param_names"], g["compressor"], store.path, g.get("model")
        )

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

    def __getitems__(self, idx: list[int]):
        # Keep a dataset's whole-batch indexing (e.g. dropinf.study.data.TensorData) when it has
        # one: its result goes to the loader's collate_fn as it is.
        items = getattr(self.ds, "__getitems__", None)
        if items is None:
            return [(i, self.ds[i]) for i in idx]
        return _WholeBatch(list(idx), items(idx))


@dataclass
class _WholeBatch:
    indices: list[int]
    rows: object


def _open_store(path, task: Task, compressor: Compressor, model: str, dtype: torch.dtype,
                order: Tensor | None, overwrite: bool):
    """The store's gradient writer (created, or checked and resumed) with the provenance of
    these rows: compressor fingerprint, model hash, loss, parameters, k, dtype, batch order."""
    return Store(path).write_gradients(
        compressor=compressor.fingerprint, model=model, loss=loss_name(task.loss),
        param_names=task.param_names, k=compressor.dim, dtype=dtype, order=order,
        overwrite=overwrite,
    )


def _with_indices(loader: Iterable) -> tuple[Iterable, Tensor | None]:
    """Re-create a DataLoader whose batches carry dataset indices (same sampler and collate).

    Returns the loader and, when it has a map-style dataset and a batch sampler, the (n,) dataset
    indices in iteration order (else None). The sampler is drawn once, up front, and its batches
    kept: the order is known before any data is loaded, so rows go straight to their sorted place
    and a store can check the order on resume.
    """
    if not isinstance(loader, DataLoader) or loader.batch_sampler is None:
        return loader, None
    try:
        len(loader.dataset)
    except TypeError:  # iterable-style dataset: no indices to track
        return loader, None
    index_batches = [[int(i) for i in b] for b in loader.batch_sampler]
    order = torch.tensor([i for b in index_batches for i in b], dtype=torch.long)
    return _indexed_loader(loader, index_batches), order


def _indexed_loader(loader: DataLoader, index_batches: list[list[int]]) -> DataLoader:
    """A DataLoader like ``loader`` (same dataset, collate and workers) that yields the batches
    of dataset indices ``index_batches`` as ``(indices, batch)``."""
    collate = loader.collate_fn

    def collate_indexed(items):
        if isinstance(items, _WholeBatch):
            return torch.as_tensor(items.indices), collate(items.rows)
        idx, rest = zip(*items)
        return torch.as_tensor(idx), collate(list(rest))

    return DataLoader(
        _Indexed(loader.dataset),
        batch_sampler=index_batches,
        num_workers=loader.num_workers,
        collate_fn=collate_indexed,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        prefetch_factor=loader.prefetch_factor,
        persistent_workers=loader.persistent_workers,
    )


def gradients(
    task: Task,
    loader: Iterable,
    compressor: Compressor,
    *,
    path: str | os.PathLike | None = None,
    chunk_size: int = 1024,
    overwrite: bool = False,
    progress: bool = True,
    desc: str = "gradients",
    dtype: torch.dtype = torch.float32,
    check: bool = True,
) -> Gradients:
    """Per-sample gradients of every sample ``loader`` yields, compressed by ``compressor``.

    Args:
        task: model and per-sample loss.
        loader: an iterable of batches that ``task.loss`` accepts (a ``DataLoader`` or a list).
            Batches are moved to the model's device.
        compressor: e.g. ``Identity()`` for the exact (n, d) per-sample gradients.
        path: a store directory (:mod:`dropinf.store`). The rows are written there in chunks and
            returned memory-mapped, never all held in RAM. If ``path`` holds an unfinished run of
            the same request (compressor, model, loss, parameters, dtype, data), it resumes after
            the last complete chunk: batches of complete chunks are re-read only to check their
            hash (no gradients), then the rest is computed, giving the same bytes as an
            uninterrupted run. A store of another request is refused (ValueError naming the
            field); a damaged chunk is reported (``CorruptStoreError``). A complete store is
            checked the same way and returned. A shuffling ``DataLoader`` resumes only with a
            seeded ``generator`` (its order is checked).
        chunk_size: with ``path``, samples per chunk, rounded up to whole batches: the unit of
            resumption, of fsync and manifest updates, and of rows held in RAM before a write.
        overwrite: with ``path``, discard what the store holds and start afresh.
        progress: show a tqdm bar labelled ``desc``.
        dtype: of the result (float64 keeps a float64 model's precision). A store takes float32,
            float16, bfloat16 or float64.
        check: run the self-check of :class:`~dropinf.PerSampleGrads` on the first batch: the
            per-sample gradients (before compression) are compared with autograd's gradient of
            a randomly weighted sum of the batch's losses, parameter by parameter; a parameter
            whose gradient the hooks miss in part (used outside its module, in the loss, on
            inputs that are not batch-first) goes through ``torch.func`` with a warning, or a
            ValueError says why it cannot. It costs about one training step per call.
            ``check=False`` skips it; do that only for a model you know (each parameter used
            once, inside its own hooked module, batch-first), since a missed use then gives
            silently wrong gradients.

    Returns:
        :class:`Gradients` with ``data`` of shape (n, compressor.dim), on the CPU, rows sorted by
        dataset index when the loader exposes them (see :class:`Gradients`).

    Raises:
        ValueError: empty loader, or a non-finite loss or gradient (naming the sample).

    Several processes (``torchrun``): :func:`dropinf.distributed.gradients` gives each its share
    of the data set and writes one store, the same bytes as this function's.
    """
    _check_args(compressor, chunk_size, dtype)
    if path is not None and not overwrite and any((Path(path) / RANKS).glob("*.json")):
        raise ValueError(
            f"store {path} holds an unfinished run of several processes "
            f"(dropinf.distributed.gradients; its chunks are listed in {Path(path) / RANKS}). "
            "Resume it with dropinf.distributed.gradients and the same arguments (any number of "
            "processes, one included), or pass overwrite=True to recompute"
        )
    compressor.bind(task)
    batches, order = _with_indices(loader)
    if order is not None and len(order) == 0:
        raise ValueError("loader yielded no batch; per-sample gradients need at least one sample")
    model = model_hash(task.model)  # provenance of the rows (and the store's identity)
    if path is None:
        sink = _Memory(order, compressor.dim, dtype)
    else:
        writer = _open_store(path, task, compressor, model, dtype, order, overwrite)
        sink = _Chunks(writer, chunk_size)
    device = task.device
    seen = 0
    try:
        with task.evaluating(), PerSampleGrads(task, compressor, check=check) as psg:
            for item in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
                bidx, batch = item if order is not None else (None, item)
                batch = as_tree(batch)  # a BatchEncoding or other Mapping: a dict of tensors
                if bidx is None and (m := batch_size(batch)) is not None:
                    bidx = torch.arange(seen, seen + m)
                if sink.skip(bidx, batch):  # in a chunk already stored: its hash was checked
                    seen += len(bidx)
                    continue
                bg, loss = psg(to_device(batch, device))
                z = compressor.compress(bg).detach()
                bidx = torch.arange(seen, seen + z.shape[0]) if bidx is None else bidx
                _check_finite(loss, z, bidx)
                sink.add(bidx, batch, z.to(dtype).cpu(), loss.float().cpu())
                seen += len(bidx)
        if seen == 0:
            raise ValueError(
                "loader yielded no batch; per-sample gradients need at least one sample"
            )
        data, indices, losses = sink.finish()
    finally:
        sink.close()  # a store's lock is released whatever happened (no-op after finish)
    return Gradients(
        data,
        indices,
        losses,
        task.param_names,
        compressor.fingerprint,
        None if path is None else Path(path),
        model=model,
    )


def _check_args(compressor: Compressor, chunk_size: int, dtype: torch.dtype) -> None:
    if not isinstance(compressor, Compressor):
        raise TypeError(
            f"compressor must be a dropinf compressor such as dropinf.Identity(), got "
            f"{type(compressor).__name__}"
        )
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive number of samples")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"dtype={dtype!r}: gradients are stored as floats; use torch.float32 (default), "
            "torch.float64, torch.float16 or torch.bfloat16"
        )


class _Memory:
    """Rows kept in RAM: preallocated and put in their sorted place when the order is known."""

    def __init__(self, order: Tensor | None, k: int, dtype: torch.dtype):
        self.t = 0
        self.parts: list[tuple[Tensor, Tensor, Tensor]] | None = [] if order is None else None
        if order is None:
            return
        self.indices, self.pos = sorted_positions(order)
        self.data = torch.empty(len(order), k, dtype=dtype)
        self.losses = torch.empty(len(order), dtype=torch.float32)  # as a store keeps them

    def skip(self, bidx: Tensor | None, batch: object) -> bool:
        return False

    def close(self) -> None:  # nothing held
        pass

    def add(self, bidx: Tensor, batch: object, z: Tensor, loss: Tensor) -> None:
        if self.parts is not None:
            self.parts.append((z, bidx, loss))
        else:
            p = self.pos[self.t : self.t + len(z)]
            self.data[p], self.losses[p] = z, loss
        self.t += len(z)

    def finish(self) -> tuple[Tensor, Tensor, Tensor]:
        if self.parts is not None:
            data, idx, loss = (torch.cat(x) for x in zip(*self.parts))
            return data, idx, loss
        return self.data, self.indices, self.losses


class _Chunks:
    """Rows to a store in chunks of at least ``size`` samples (whole batches). On resume, the
    batches of chunks already complete are only hashed and compared with the manifest.

    The writer holds the store's lock: :meth:`finish` releases it, and so does an error in any
    method here (the run is over); :meth:`close` releases it whatever happened elsewhere, and a
    ``with`` block around the run does so on an error."""

    def __init__(self, writer: GradientWriter, size: int):
        self.w, self.size = writer, size
        self.stored = len(writer.chunks)  # complete before this run: re-read and checked only
        self.checked = 0
        self._reset()

    def __enter__(self) -> _Chunks:
        return self

    def __exit__(self, exc_type: type | None, *rest: object) -> None:
        if exc_type is not None:
            self.close()

    def close(self) -> None:
        """Release the store's lock (idempotent)."""
        self.w.close()

    def _reset(self) -> None:
        self.h, self.parts, self.rows, self.batches = hashlib.sha256(), [], 0, 0

    def _take(self, bidx: Tensor, batch: object) -> None:
        hash_batch(self.h, bidx, batch)
        self.rows += len(bidx)
        self.batches += 1

    def skip(self, bidx: Tensor | None, batch: object) -> bool:
        with self:
            return self._skip(bidx, batch)

    def _skip(self, bidx: Tensor | None, batch: object) -> bool:
        if self.checked >= self.stored:
            return False
        rec = self.w.chunks[self.checked]
        if bidx is None:
            raise ValueError(
                f"cannot resume the store at {self.w.store.path}: a batch holds no tensor, so its "
                "samples cannot be counted without computing its gradients; pass overwrite=True"
            )
        self._take(bidx, batch)
        want = rec["stop"] - rec["start"]
        if self.batches == rec["batches"] or self.rows >= want:
            if (self.rows, self.batches, self.h.hexdigest()) != (
                want,
                rec["batches"],
                rec["data_hash"],
            ):
                raise ValueError(
                    f"store {self.w.store.path} holds gradients of other data: chunk "
                    f"{rec['chunk']} (samples {rec['start']}..{rec['stop'] - 1} in loader order, "
                    f"{rec['batches']} batches) was written from batches with data_hash "
                    f"{rec['data_hash'][:16]}..., these give {self.h.hexdigest()[:16]}... and "
                    f"{self.rows} samples in {self.batches} batches. The dataset's contents, the "
                    "batch size or the order changed (random augmentation does this too). Use the "
                    "same data and loader, another path, or overwrite=True to recompute."
                )
            self.checked += 1
            self._reset()
        return True

    def add(self, bidx: Tensor, batch: object, z: Tensor, loss: Tensor) -> None:
        with self:
            self._take(bidx, batch)
            self.parts.append((bidx, z, loss))
            if self.rows >= self.size:
                self._flush()

    def _flush(self) -> None:
        if self.parts:
            idx, z, loss = (torch.cat(x) for x in zip(*self.parts))
            self.w.write_chunk(idx, z, loss, self.h.hexdigest(), self.batches)
        self._reset()

    def finish(self) -> tuple[Tensor, Tensor, Tensor]:
        with self:
            return self._finish()

    def _finish(self) -> tuple[Tensor, Tensor, Tensor]:
        if self.checked < self.stored:
            rec = self.w.chunks[self.stored - 1]
            raise ValueError(
                f"the loader ended before the {rec['stop']} samples that the store at "
                f"{self.w.store.path} holds: the data changed. Use another path, or pass "
                "overwrite=True to recompute."
            )
        self._flush()
        self.w.finish()
        return self.w.store.gradient_arrays(verify=False)


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
