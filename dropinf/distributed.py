"""Featurise, fit and score across processes with ``torch.distributed``, launched by ``torchrun``.

The same calls run in every process (``torchrun --nproc-per-node N script.py``, any number of
nodes) and give what the single-process functions give:

- :func:`gradients` writes one store, byte for byte the store of
  ``dropinf.gradients(task, loader, compressor, path=..., chunk_size=..., dtype=...)`` with the
  same arguments: every file the finished store holds (``manifest.json``, ``order.npy``,
  ``grads.bin``, ``indices.bin``, ``losses.bin``) is identical; nothing in a store records time,
  host or process count. The loader's batches are drawn once (the same on every rank, checked)
  and cut into the chunks a single process would write (``chunk_size`` rows rounded up to whole
  batches); rank r of W takes chunks ``C r / W`` up to ``C (r + 1) / W`` (C chunks), a contiguous
  run of the loader's batches: for an unshuffled loader, a contiguous range of dataset indices.
- :func:`load` maps a complete store, each rank checking its share of the chunks.
- :func:`fit` fits a Fisher preconditioner with one all-reduce of the k x k sums (the n x n
  kernel in the kernel form) and one broadcast of rank 0's factorisation, so every rank applies
  the same bits.
- :func:`scores`, :func:`top_k` and :func:`self_influence` give each rank a contiguous share of
  the training rows and gather the results on every rank; top-k is merged exactly (ties to the
  lower training index, as :func:`dropinf.top_k` breaks them).

Process group: the one the caller initialised, or, when there is none and torchrun's
environment (``WORLD_SIZE`` > 1, ``RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) is set, one
initialised here from it (``gloo`` on the CPU; ``cpu:gloo,cuda:nccl`` when CUDA is available)
and left initialised for later calls. Coordination (small objects, the all-reduce, the gathers)
runs on a ``gloo`` group created here with ``timeout``, so it needs no GPU. Without a process
group and without torchrun's environment, everything runs in this one process (world size 1).

Failure: an exception in one rank reaches every rank at the next synchronisation point (each
raises :class:`DistributedError` naming the failing rank and its message; the failing rank its
own exception). A rank that dies or hangs makes the others fail after ``timeout`` seconds with a
:class:`DistributedError` (or sooner, when its connection closes) instead of waiting forever.
``timeout`` must exceed the time between the first and the last rank reaching a synchronisation
point: for :func:`gradients` its start (rank 0 verifies the chunks already stored) and its end
(the ranks finish their shards at different times).

Resume: each rank records the chunks it completed in ``ranks/RUN-rankR.json`` in the store (not
in the manifest, which only rank 0 writes); an interrupted run resumes from every chunk any rank
completed, with any number of processes (one included: call this module's :func:`gradients`
without torchrun), since the chunks do not depend on the world size. A resumed run needs the same
``chunk_size`` and batches; its ranks re-read the batches of complete chunks to check their hash,
as a single process does. :func:`dropinf.gradients` refuses a store with an unfinished run of
several processes.

The store directory must be on a file system every rank sees (a shared one across nodes, with
POSIX writes to disjoint byte ranges of one file; NFS and Lustre do this); ranks write their rows
straight to their places in the store's files.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import uuid
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ._io import write_json
from .compressors import Compressor
from .curvature import _COLUMNS, _FIT_ROWS, Preconditioner, Source, _check_damping, _l2_of_rows
from .curvature import check_finite as _check_finite_rows
from .gradients import Gradients, _check_args, _check_finite, _open_store, _with_indices
from .gradients import _indexed_loader as _loader_of
from .persample import PerSampleGrads
from .scores import _check_pre, _dtypes, _rows, _top_k, best
from .scores import scores as _scores
from .scores import self_influence as _self_influence
from .store import RANKS, Store, hash_batch, loss_name, model_hash
from .task import Task, as_tree, to_device

TIMEOUT = 1800.0  # seconds, torch's default for gloo


class DistributedError(RuntimeError):
    """Another rank failed, died or did not reach a synchronisation point within the timeout."""


def world() -> tuple[int, int]:
    """``(rank, world size)``: of the initialised process group, else of torchrun's environment
    (``RANK``, ``WORLD_SIZE``), else ``(0, 1)``. Initialises nothing."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as e:
        raise ValueError(
            f"RANK={os.environ.get('RANK')!r}, WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}: "
            "torchrun sets both to integers; unset them to run one process"
        ) from e


_GROUPS: dict[float, tuple[object, object]] = {}  # timeout -> (default group, gloo group)
# Dropped before the interpreter's teardown: a gloo group object destroyed during it (after
# destroy_process_group, say) can abort the process ("terminate called without an active
# exception"), which torchrun reports as a failed rank.
atexit.register(_GROUPS.clear)


class _Comm:
    """This process's place in the group, and the gloo group (``timeout``) that coordinates."""

    def __init__(self, timeout: float):
        ok = isinstance(timeout, int | float) and not isinstance(timeout, bool) and timeout > 0
        if not ok:
            raise ValueError(f"timeout={timeout!r} must be a positive number of seconds")
        self.timeout = float(timeout)
        self.rank, self.size = world()
        self.group = None
        if self.size == 1:
            return
        if not dist.is_available():
            raise RuntimeError(
                f"WORLD_SIZE={self.size} but this torch has no torch.distributed; run one process"
            )
        if not dist.is_initialized():
            backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend, timeout=timedelta(seconds=self.timeout))
            self.rank, self.size = dist.get_rank(), dist.get_world_size()
        made_in, group = _GROUPS.get(self.timeout, (None, None))
        if made_in is not dist.group.WORLD:  # every rank makes the same calls: the same groups
            group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout))
            _GROUPS[self.timeout] = (dist.group.WORLD, group)
        self.group = group

    def _failed(self, stage: str, e: Exception) -> DistributedError:
        return DistributedError(
            f"rank {self.rank} of {self.size}: not every process reached {stage} within "
            f"timeout={self.timeout:g} s, or one closed its connection: a process died or hangs "
            f"(its own log says why). What was complete is kept; rerun the same command to "
            f"resume. ({type(e).__name__}: {e})"
        )

    def gather(self, obj: object, stage: str) -> list:
        """``obj`` of every rank, in rank order, once every rank reached ``stage``."""
        if self.size == 1:
            return [obj]
        try:
            dist.monitored_barrier(
                self.group, timeout=timedelta(seconds=self.timeout), wait_all_ranks=True
            )
            out = [None] * self.size
            dist.all_gather_object(out, obj, group=self.group)
        except RuntimeError as e:
            raise self._failed(stage, e) from e
        return out

    def agree(self, error: BaseException | None, stage: str) -> None:
        """Raise on every rank when any rank failed before ``stage`` (``error``: its own)."""
        msgs = self.gather(None if error is None else f"{type(error).__name__}: {error}", stage)
        if error is not None:
            raise error
        bad = [(r, m) for r, m in enumerate(msgs) if m is not None]
        if bad:
            r, m = bad[0]
            raise DistributedError(f"rank {r} of {self.size} failed before {stage}: {m}")

    def all_reduce(self, t: Tensor, stage: str) -> Tensor:
        """Sum of ``t`` (a CPU tensor) over ranks, in place."""
        if self.size > 1:
            try:
                dist.all_reduce(t, group=self.group)
            except RuntimeError as e:
                raise self._failed(stage, e) from e
        return t

    def broadcast(self, t: Tensor, stage: str) -> Tensor:
        """Rank 0's ``t`` (same shape and dtype on every rank), in place."""
        if self.size > 1:
            try:
                dist.broadcast(t, 0, group=self.group)
            except RuntimeError as e:
                raise self._failed(stage, e) from e
        return t

    def share(self, n: int) -> tuple[int, int]:
        """This rank's contiguous share ``[a, b)`` of ``n`` items."""
        return n * self.rank // self.size, n * (self.rank + 1) // self.size


# ----------------------------------------------------------------------------- featurisation


def _plan(batch_sizes: list[int], chunk_size: int) -> list[tuple[int, int, int, int]]:
    """The chunks a single process writes (see ``dropinf.gradients._Chunks``): ``(first batch,
    stop batch, first row, stop row)`` each, a chunk closing once it holds ``chunk_size`` rows."""
    out, b0, r0, rows = [], 0, 0, 0
    for b, m in enumerate(batch_sizes):
        rows += m
        if rows - r0 >= chunk_size:
            out.append((b0, b + 1, r0, rows))
            b0, r0 = b + 1, rows
    if r0 < rows:
        out.append((b0, len(batch_sizes), r0, rows))
    return out


def _records(path: Path) -> dict[int, dict]:
    """Chunk records of the ``ranks/*.json`` files of an unfinished run (a chunk listed twice
    must be listed alike)."""
    known: dict[int, dict] = {}
    for f in sorted((path / RANKS).glob("*.json")):
        for rec in json.loads(f.read_text()):
            if known.setdefault(rec["chunk"], rec) != rec:
                raise ValueError(
                    f"{f} lists chunk {rec['chunk']} unlike another file of {path / RANKS}: the "
                    "store was written by two runs at once. Pass overwrite=True to recompute"
                )
    return known


def _check_plan(known: dict[int, dict], plan: list, path: Path, chunk_size: int) -> None:
    for c, rec in known.items():
        want = plan[c] if c < len(plan) else None
        if want is None or (rec["start"], rec["stop"], rec["batches"]) != (
            want[2],
            want[3],
            want[1] - want[0],
        ):
            have = f"rows {rec['start']}..{rec['stop'] - 1} in {rec['batches']} batches"
            got = (
                "no such chunk"
                if want is None
                else (f"rows {want[2]}..{want[3] - 1} in {want[1] - want[0]} batches")
            )
            raise ValueError(
                f"store {path} holds chunk {c} as {have}; this call's chunk_size={chunk_size} "
                f"and the loader's batches give {got}. Resume with the chunk_size and batch size "
                "of the interrupted run, or pass overwrite=True to recompute"
            )


def gradients(
    task: Task,
    loader: DataLoader,
    compressor: Compressor,
    *,
    path: str | os.PathLike,
    chunk_size: int = 1024,
    overwrite: bool = False,
    progress: bool = True,
    desc: str = "gradients",
    dtype: torch.dtype = torch.float32,
    check: bool = True,
    timeout: float = TIMEOUT,
) -> Gradients:
    """:func:`dropinf.gradients` with the data set shared among the processes of a
    ``torch.distributed`` group (see the module docstring): call it in every rank with the same
    arguments; every rank returns the whole store's :class:`~dropinf.Gradients` (memory-mapped).

    Args:
        loader: a ``torch.utils.data.DataLoader`` over a map-style dataset (``__len__`` and
            ``__getitem__``): its batch sampler is drawn once, up front, and must give the same
            batches on every rank (a shuffling one needs a seeded ``generator``); each rank loads
            only the batches of its chunks, with the loader's collate function and workers.
        path: the store directory, the same on every rank (required: the ranks' rows meet there).
        timeout: seconds a rank waits at a synchronisation point for the others before raising
            :class:`DistributedError`; also the timeout of a process group initialised here.
        Everything else as :func:`dropinf.gradients` (``chunk_size`` is the unit of resumption
        and of sharing: fewer chunks than processes leaves some idle).

    Raises:
        ValueError: as :func:`dropinf.gradients`; a loader without a map-style dataset; ranks
            called with different arguments, models, data orders or paths (naming the field);
            a store resumed with another chunk_size or batch size.
        DistributedError: another rank failed, died or timed out.
    """
    comm = _Comm(timeout)
    _check_args(compressor, chunk_size, dtype)
    if path is None:
        raise ValueError(
            "path=None: dropinf.distributed.gradients writes a store that every rank shares; "
            "give its directory (on a file system every rank sees)"
        )
    if not isinstance(loader, DataLoader) or loader.batch_sampler is None:
        raise TypeError(
            f"loader must be a torch.utils.data.DataLoader with a batch size (got "
            f"{type(loader).__name__}): the ranks share the data set by index, so it must be "
            "map-style (__len__ and __getitem__). An iterable-only loader can run in one process "
            "with dropinf.gradients"
        )
    try:
        len(loader.dataset)
    except TypeError:
        raise TypeError(
            f"loader's dataset {type(loader.dataset).__name__} is iterable-only (no __len__): "
            "the ranks share the data set by index, which needs a map-style dataset "
            "(__len__ and __getitem__). Run one process with dropinf.gradients instead"
        ) from None
    path = Path(path)
    compressor.bind(task)
    full, order = _with_indices(loader)
    index_batches: list[list[int]] = full.batch_sampler
    if len(order) == 0:
        raise ValueError("loader yielded no batch; per-sample gradients need at least one sample")
    plan = _plan([len(b) for b in index_batches], chunk_size)
    model = model_hash(task.model)
    request = {
        "path": os.fspath(path),
        "compressor": compressor.fingerprint,
        "model": model,
        "loss": loss_name(task.loss),
        "param_names": hashlib.sha256("\n".join(task.param_names).encode()).hexdigest(),
        "dtype": str(dtype),
        "chunk_size": chunk_size,
        "overwrite": bool(overwrite),
        "order": hashlib.sha256(order.numpy().tobytes()).hexdigest(),
        "batches": hashlib.sha256(str([len(b) for b in index_batches]).encode()).hexdigest(),
    }
    _same(comm.gather(request, "the start of gradients()"), comm.size)

    # Rank 0 takes the store's lock (for the whole run), creates or checks it, and gathers the
    # chunks complete so far: the manifest's and those that ranks of earlier runs recorded.
    writer, state, error = None, None, None
    if comm.rank == 0:
        try:
            writer = _open_store(path, task, compressor, model, dtype, order, overwrite)
            known = {rec["chunk"]: rec for rec in writer.chunks}  # verified by write_gradients
            listed = set(known)
            for c, rec in _records(path).items():
                if known.setdefault(c, rec) != rec:
                    raise ValueError(
                        f"{path / RANKS} lists chunk {c} unlike the manifest: the store was "
                        "written by two runs at once. Pass overwrite=True to recompute"
                    )
            _check_plan(known, plan, path, chunk_size)
            state = (known, sorted(listed), uuid.uuid4().hex[:12])
        except Exception as e:  # every rank must hear of it
            error = e
    try:
        comm.agree(error, "the store's opening by rank 0")
        known, listed, run = comm.gather(state, "the store's opening by rank 0")[0]
        lo, hi = comm.share(len(plan))
        mine = plan[lo:hi]
        store = Store(path)
        todo = [known[c] for c in range(lo, hi) if c in known and c not in listed]
        error = None
        try:
            store._verify_records(todo)  # those from ranks' files; the manifest's are verified
        except Exception as e:
            error = e
        comm.agree(error, "the check of the stored chunks")

        records, error = [], None
        try:
            records = _shard(
                task,
                loader,
                compressor,
                store,
                order,
                index_batches,
                mine,
                lo,
                known,
                path / RANKS / f"{run}-rank{comm.rank}.json",
                dtype,
                check,
                progress and comm.rank == 0,
                desc if comm.size == 1 else f"{desc} (rank 0 of {comm.size})",
            )
        except Exception as e:
            error = e
        comm.agree(error, "the end of every rank's chunks")
        new = comm.gather(records, "the end of every rank's chunks")

        error = None
        if comm.rank == 0:
            try:
                for recs in new:
                    known.update((rec["chunk"], rec) for rec in recs)
                missing = [c for c in range(len(plan)) if c not in known]
                if missing:
                    raise ValueError(f"chunks {missing[:10]} were not written")
                writer.meta["chunks"] = [known[c] for c in range(len(plan))]
                writer.finish()
                for f in (path / RANKS).glob("*.json"):
                    f.unlink()
                if (path / RANKS).is_dir():
                    (path / RANKS).rmdir()
            except Exception as e:
                error = e
        comm.agree(error, "the manifest's completion by rank 0")
    finally:
        if writer is not None:
            writer.close()  # releases the lock (no-op after finish)
    return Gradients.load(path, verify=False)


def load(path: str | os.PathLike, *, timeout: float = TIMEOUT) -> Gradients:
    """:meth:`dropinf.Gradients.load` of a complete store, each rank verifying the checksums of
    its share of the chunks (rather than every rank all of them); every rank returns the whole
    store's gradients, memory-mapped."""
    comm = _Comm(timeout)
    error = None
    try:
        store = Store(path)
        lo, hi = comm.share(len(store._gradients(complete=True)["chunks"]))
        store.verify(list(range(lo, hi)))
    except Exception as e:
        error = e
    comm.agree(error, f"the check of store {path}")
    return Gradients.load(path, verify=False)


def _same(requests: list[dict], size: int) -> None:
    """Refuse ranks called with different arguments (naming the first field that differs)."""
    for field in requests[0]:
        values = [r[field] for r in requests]
        if len(set(map(str, values))) > 1:
            which = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values[:8]))
            why = {
                "model": " (different weights: seed the model's initialisation, or load one "
                "checkpoint, in every rank)",
                "order": " (a shuffling DataLoader needs a seeded generator, the same in every "
                "rank)",
            }.get(field, "")
            raise ValueError(
                f"the {size} ranks called dropinf.distributed.gradients with different "
                f"{field}{why}: {which}. Every rank must make the same call"
            )


def _shard(
    task: Task,
    loader: DataLoader,
    compressor: Compressor,
    store: Store,
    order: Tensor,
    index_batches: list[list[int]],
    mine: list[tuple[int, int, int, int]],
    first: int,
    known: dict[int, dict],
    record_file: Path,
    dtype: torch.dtype,
    check: bool,
    progress: bool,
    desc: str,
) -> list[dict]:
    """Compute and write this rank's chunks (``mine``, numbered from ``first``); the batches of
    chunks already complete (``known``) are only hashed and compared. Each new chunk's record
    goes to ``record_file`` as soon as its rows are on disk. Returns the new records."""
    if not mine:
        return []
    batches = _loader_of(loader, index_batches[mine[0][0] : mine[-1][1]])
    it = iter(tqdm(batches, desc=desc, disable=not progress, unit="batch"))
    records: list[dict] = []
    device = task.device
    with task.evaluating(), PerSampleGrads(task, compressor, check=check) as psg:
        for c, (b0, b1, start, stop) in enumerate(mine, first):
            h, parts = hashlib.sha256(), []
            for _ in range(b0, b1):
                bidx, batch = next(it)
                batch = as_tree(batch)
                hash_batch(h, bidx, batch)
                if c in known:
                    continue
                bg, loss = psg(to_device(batch, device))
                z = compressor.compress(bg).detach()
                _check_finite(loss, z, bidx)
                parts.append((bidx, z.to(dtype).cpu(), loss.float().cpu()))
            if c in known:
                if h.hexdigest() != known[c]["data_hash"]:
                    raise ValueError(
                        f"store {store.path} holds gradients of other data: chunk {c} (samples "
                        f"{start}..{stop - 1} in loader order) was written from batches with "
                        f"data_hash {known[c]['data_hash'][:16]}..., these give "
                        f"{h.hexdigest()[:16]}.... The dataset's contents or order changed "
                        "(random augmentation does this too). Use the same data and loader, "
                        "another path, or overwrite=True to recompute."
                    )
                continue
            idx, z, loss = (torch.cat(x) for x in zip(*parts))
            records.append(store._put_chunk(c, start, idx, z, loss, h.hexdigest(), b1 - b0, order))
            write_json(record_file, records)
    return records


# ----------------------------------------------------------------------------- fit and scores


def fit(
    G_train,
    kind: str = "fisher",
    damping: float = 1e-3,
    solver: str = "auto",
    l2: float | Tensor = 0.0,
    *,
    timeout: float = TIMEOUT,
) -> Preconditioner:
    """:meth:`dropinf.Preconditioner.fit` with the work shared among the ranks: call it in every
    rank with the same (n, k) ``G_train`` (a store's :class:`~dropinf.Gradients`, memory-mapped:
    each rank reads only its share). ``dense``: each rank sums ``g^T g`` over its share of the
    rows (float64), one all-reduce adds the k x k sums; ``kernel``: each rank sums ``G_j G_j^T``
    over its share of the k columns, one all-reduce adds the n x n sums. Rank 0 factorises and
    broadcasts the result, so every rank holds the same preconditioner. Equal to the
    single-process fit up to float64 rounding of the sums' order (a relative error of about
    ``n_blocks * 1e-16`` in C, amplified in the factors by C's conditioning; scores agree to
    about ``1e-16 * cond(C + lambda I)`` relative to their scale)."""
    comm = _Comm(timeout)
    G = torch.as_tensor(G_train)
    if kind != "fisher" or G.ndim != 2 or G.shape[0] == 0:
        return Preconditioner.fit(G_train, kind, damping, solver, l2)  # nothing to share, or
        # the refusal the single-process fit gives
    _check_damping(damping)
    if solver not in ("auto", "dense", "kernel"):
        raise ValueError(f"solver={solver!r}; choose 'auto', 'dense' or 'kernel'")
    source = Source.of(G_train)
    n, k = G.shape
    l2 = _l2_of_rows(l2, k)
    kernel = solver == "kernel" or (solver == "auto" and k > n)
    if kernel and l2.ndim:
        return Preconditioner.fit(G_train, kind, damping, solver, l2)  # its refusal
    if kernel and not damping > 0:
        return Preconditioner._fit_kernel(G, damping, source)  # its refusal
    error, size = None, n if kernel else k
    S = torch.zeros(size, size, dtype=torch.float64)
    try:
        if kernel:
            a, b = comm.share(k)
            for j in range(a, b, _COLUMNS):  # float64 products without a float64 copy of G
                g = G[:, j : min(b, j + _COLUMNS)].double()
                S += g @ g.T
        else:
            a, b = comm.share(n)
            for i in range(a, b, _FIT_ROWS):
                g = G[i : min(b, i + _FIT_ROWS)].double()
                _check_finite_rows(g, "G_train", i)
                S += g.T @ g
    except Exception as e:
        error = e
    comm.agree(error, "the Fisher's sums")
    comm.all_reduce(S, "the all-reduce of the Fisher's sums")
    error, pre, meta = None, None, None
    if comm.rank == 0:
        try:
            if kernel:
                pre = Preconditioner._fit_kernel(G, damping, source, float(l2), K=S)
            else:
                S /= n
                S.diagonal().add_(l2)
                info = {
                    "n": n,
                    "solver": "dense",
                    "l2": float(l2) if l2.ndim == 0 else "per coordinate",
                }
                pre = Preconditioner._from_matrix("fisher", S, damping, info)
                pre.source = source
            # contiguous: a broadcast sends the storage as it lies (eigh's vectors are not)
            pre.eigvals, pre.eigvecs = pre.eigvals.contiguous(), pre.eigvecs.contiguous()
            meta = (pre.lam, pre.info, tuple(pre.eigvals.shape), tuple(pre.eigvecs.shape))
        except Exception as e:
            error = e
    comm.agree(error, "the factorisation on rank 0")
    lam, info, vshape, Vshape = comm.gather(meta, "the factorisation on rank 0")[0]
    if comm.rank != 0:
        pre = Preconditioner(
            "fisher",
            damping,
            k,
            lam=lam,
            eigvals=torch.empty(vshape, dtype=torch.float64),
            eigvecs=torch.empty(Vshape, dtype=torch.float64),
            rows=G if kernel else None,
            info=info,
            source=source,
        )
    comm.broadcast(pre.eigvals, "the broadcast of the factorisation")
    comm.broadcast(pre.eigvecs, "the broadcast of the factorisation")
    return pre


def _gather_columns(comm: _Comm, part: Tensor, n: int, stage: str) -> Tensor:
    """Every rank's ``part`` (r, share_r) concatenated along columns in rank order: (r, n)."""
    if comm.size == 1:
        return part
    width = -(-n // comm.size) + 1
    pad = torch.zeros(part.shape[0], width, dtype=part.dtype)
    pad[:, : part.shape[1]] = part
    out = [torch.empty_like(pad) for _ in range(comm.size)]
    try:
        dist.all_gather(out, pad, group=comm.group)
    except RuntimeError as e:
        raise comm._failed(stage, e) from e
    sizes = [(n * (r + 1)) // comm.size - (n * r) // comm.size for r in range(comm.size)]
    return torch.cat([o[:, :m] for o, m in zip(out, sizes)], 1)


def _rows_of(G_test, G_train, pre: Preconditioner) -> tuple[Tensor, Tensor]:
    _check_pre(pre, ("G_test", G_test), ("G_train", G_train))
    return _rows(G_test, "G_test"), _rows(G_train, "G_train")


def scores(
    G_test,
    G_train,
    pre: Preconditioner,
    block_test: int = 1024,
    block_train: int = 65536,
    product_dtype: torch.dtype | None = None,
    *,
    timeout: float = TIMEOUT,
) -> Tensor:
    """:func:`dropinf.scores` with each rank scoring its contiguous share of the training rows;
    every rank returns the whole (n_test, n_train) matrix. Call it in every rank with the same
    arguments. Equal to the single-process scores up to the rounding of the product dtype
    (the same queries; a product's summation order may depend on the block's width)."""
    comm = _Comm(timeout)
    G_test, G_train = _rows_of(G_test, G_train, pre)
    a, b = comm.share(G_train.shape[0])
    part, error = torch.empty(0), None
    try:
        part = _scores(G_test, G_train[a:b], pre, block_test, block_train, product_dtype)
    except Exception as e:
        error = e
    comm.agree(error, "the scores of every rank's share")
    return _gather_columns(comm, part, G_train.shape[0], "the gather of the scores")


def self_influence(
    G_train,
    pre: Preconditioner,
    block: int = 4096,
    product_dtype: torch.dtype | None = None,
    *,
    timeout: float = TIMEOUT,
) -> Tensor:
    """:func:`dropinf.self_influence` with each rank taking its contiguous share of the rows;
    every rank returns all n values (equal to the single-process ones: each row's value is
    computed alone)."""
    comm = _Comm(timeout)
    _check_pre(pre, ("G_train", G_train))
    G = _rows(G_train, "G_train")
    a, b = comm.share(G.shape[0])
    part, error = torch.empty(0), None
    try:
        part = _self_influence(G[a:b], pre, block, product_dtype) if b > a else None
    except Exception as e:
        error = e
    comm.agree(error, "the self-influence of every rank's share")
    if part is None:
        part = torch.empty(0, dtype=_dtypes(G, G, pre, product_dtype)[0])
    return _gather_columns(comm, part[None], G.shape[0], "the gather of self-influence")[0]


def top_k(
    G_test,
    G_train,
    pre: Preconditioner,
    k: int,
    largest: bool = True,
    block_test: int = 1024,
    block_train: int = 65536,
    product_dtype: torch.dtype | None = None,
    *,
    timeout: float = TIMEOUT,
) -> tuple[Tensor, Tensor]:
    """:func:`dropinf.top_k` with each rank ranking its contiguous share of the training rows;
    the ranks' best (values in the product dtype) are gathered and merged exactly, equal scores
    to the lower training index as in the single-process ranking; every rank returns the result.
    Equal to the single-process result wherever the scores are (see :func:`scores`)."""
    comm = _Comm(timeout)
    G_test, G_train = _rows_of(G_test, G_train, pre)
    n = G_train.shape[0]
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n:
        raise ValueError(f"k={k!r} must be an integer between 1 and the {n} training points")
    a, b = comm.share(n)
    part, error = None, None
    try:
        if b > a:
            i, v, _ = _top_k(
                G_test,
                G_train[a:b],
                pre,
                min(k, b - a),
                largest,
                block_test,
                block_train,
                product_dtype,
            )
            part = (i + a, v)
    except Exception as e:
        error = e
    comm.agree(error, "the top-k of every rank's share")
    dtype = _dtypes(G_test, G_train, pre, product_dtype)[0]
    parts = [p for p in comm.gather(part, "the gather of the top-k") if p is not None]
    idx = torch.cat([p[0] for p in parts], 1)  # rank order: training indices increase
    val = torch.cat([p[1] for p in parts], 1)
    val, idx = best(val, idx, k, largest)
    return idx, val.to(dtype)
