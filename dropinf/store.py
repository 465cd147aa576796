"""A directory store: per-sample gradients as memory-mapped arrays written in resumable chunks, and
fitted preconditioners and score matrices, all described by one JSON manifest.

Layout (``manifest.json`` is the only source of truth: bytes it does not list are ignored)::

    manifest.json       format; for the gradients: package version, compressor (fingerprint and
                        parameters), model hash, loss, parameter names, dtype, n, k, data identity
                        (order hash, per-chunk batch hashes, overall data hash), complete chunks
                        with the sha256 of the bytes each put in each file, status
    grads.bin           (n, k) rows in the storage dtype, raw C order (bfloat16 as its uint16 bits)
    indices.bin         (n,) int64 dataset index of each row
    losses.bin          (n,) float32 per-sample loss of each row
    order.npy           (n,) int64 dataset indices in the loader's iteration order, when known
    preconditioners/NAME.npz, scores/NAME.npy
    ranks/RUN-rankR.json  only while a run of several processes (dropinf.distributed) is
                        unfinished: the chunks that rank R completed, gathered into the
                        manifest when the run finishes (then deleted)

Row order: when the iteration order is known before the pass (``order``; a ``DataLoader`` over a
map-style dataset), row i is the sample with the i-th smallest dataset index (ties in iteration
order), whatever the sampling order; each row is written straight to that place. Otherwise rows
are kept in the order written.

Chunks: rows are written in chunks of consecutive rows in iteration order. A chunk is complete only
when its bytes are written and fsynced *and* the manifest, replaced atomically, lists it with the
sha256 of those bytes and the hash of the batches (indices and tensors) that produced it. A run
interrupted at any point leaves at worst bytes of an unlisted chunk, which a resumed run rewrites.
``order.npy`` is checked against its sha256 (``order_sha256``; stores written before it was
recorded: against the hash of its contents, ``order``) whenever it is read: a damaged one would
misplace every row.

One writer per store: :meth:`Store.write_gradients` takes the store's lock, ``writer.lock``, a
file created atomically (``O_CREAT | O_EXCL``) that holds the holder's pid, host, start time and
purpose as JSON, and its writer keeps it until :meth:`GradientWriter.finish` or
:meth:`GradientWriter.close` (a ``with`` block, its garbage collection or the interpreter's exit
closes it too). Saving preconditioners or scores, ``truncate`` and ``clear`` take it briefly,
re-reading the manifest under it. Another holder is refused (:class:`StoreLockedError`, naming
it); a brief holder is waited for up to a few seconds. A lock whose holder ran on this host and no
longer runs is taken over with a warning; a lock from another host is never assumed stale. The
lock file is not part of the manifest: readers ignore it.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import socket
import time
import uuid
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from . import _version as _version_module
from ._io import atomic_write, fsync_dir, write_json
from .curvature import Preconditioner, Source

FORMAT = 1
MANIFEST = "manifest.json"
ORDER = "order.npy"
LOCK = "writer.lock"
RANKS = "ranks"  # per-rank chunk records of an unfinished multi-process run (dropinf.distributed)
_WAIT_S = 10.0  # how long a lock request waits for a brief holder (a save), not for a writer
# file -> (per-row shape suffix is (k,) for grads, () otherwise; fixed numpy dtype or None)
FILES = {"grads.bin": None, "indices.bin": np.dtype(np.int64), "losses.bin": np.dtype(np.float32)}
# storage dtype name -> (torch dtype, numpy dtype of the bytes); numpy has no bfloat16
DTYPES = {
    "float64": (torch.float64, np.dtype(np.float64)),
    "float32": (torch.float32, np.dtype(np.float32)),
    "float16": (torch.float16, np.dtype(np.float16)),
    "bfloat16": (torch.bfloat16, np.dtype(np.uint16)),
}
_FIX = "Use another path, or pass overwrite=True to discard the store and recompute."
_WHY = {
    "format": " (written by another version of dropinf's store format)",
    "dropinf_version": " (rows from two versions of the code would be mixed)",
    "model": " (sha256 of the model's parameter and buffer names, shapes, dtypes and values)",
    "loss": " (the task's loss function)",
    "k": " (compressed dimension)",
    "n": " (number of samples the loader yields)",
    "order": (
        " (hash of the dataset indices in the loader's iteration order: the loader yields other "
        "samples or another order. A shuffling DataLoader repeats its order only with a seeded "
        "generator, e.g. generator=torch.Generator().manual_seed(0). Rows are stored sorted by "
        "dataset index whatever the order, so shuffling buys nothing here)"
    ),
}


class CorruptStoreError(ValueError):
    """A store file, or a chunk of it, does not match the checksum its manifest records."""


class StoreLockedError(ValueError):
    """Another writer (another process, or an unfinished writer of this one) holds the store."""


def _version() -> str:
    # Read at call time (not bound at import), so the one place to change it is dropinf._version.
    return _version_module.__version__


# ----------------------------------------------------------------------------- hashing


def _feed(h, x: object) -> None:
    """Add a tensor's (or array's) dtype, shape and bytes to hash ``h``; anything else by repr."""
    if isinstance(x, Tensor):
        t = x.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(x, np.ndarray) and x.dtype != object:
        a = np.ascontiguousarray(x)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.reshape(-1).view(np.uint8))
    else:
        h.update(repr(x).encode())


def model_hash(model: nn.Module) -> str:
    """sha256 of the model's state: every parameter's and buffer's name, dtype, shape and value."""
    h = hashlib.sha256()
    for name, value in model.state_dict().items():
        h.update(name.encode())
        _feed(h, value)
    return h.hexdigest()


def loss_name(loss: object) -> str:
    """A name for a loss function, stable across processes: module and qualified name, or the
    repr of a callable object without memory addresses."""
    if getattr(loss, "__qualname__", None):
        return f"{loss.__module__}.{loss.__qualname__}"
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(loss))


def hash_batch(h, indices: Tensor, batch: object) -> None:
    """Add one batch to hash ``h``: its structure, its samples' dataset indices and every leaf."""
    leaves, spec = tree_flatten(batch)
    h.update(str(spec).encode())
    _feed(h, indices)
    for leaf in leaves:
        _feed(h, leaf)


def _sha(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
    return h.hexdigest()


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def sorted_positions(order: Tensor) -> tuple[Tensor, Tensor]:
    """``(sorted indices, pos)`` for dataset indices in iteration order: row t of the pass
    belongs at row ``pos[t]`` of the index-sorted result (stable: repeats keep their order)."""
    idx, perm = torch.sort(order, stable=True)
    pos = torch.empty_like(perm)
    pos[perm] = torch.arange(len(perm))
    return idx, pos


# ----------------------------------------------------------------------------- raw rows


def _pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    while buf:
        done = os.pwrite(fd, buf, offset)
        buf, offset = buf[done:], offset + done


def _write_rows(path: Path, pos: np.ndarray, a: np.ndarray) -> None:
    """Write row t of ``a`` at row ``pos[t]`` of the raw file ``path`` (one write per run of
    consecutive rows), then fsync it."""
    row = a.itemsize * int(np.prod(a.shape[1:]))
    perm = np.argsort(pos, kind="stable")
    p = pos[perm]
    cuts = np.flatnonzero(np.diff(p) != 1) + 1
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for lo, hi in zip([0, *cuts], [*cuts, len(p)]):
            run = np.ascontiguousarray(_take(a, perm[lo:hi]))  # a view when rows are in order
            _pwrite_all(fd, memoryview(run.reshape(-1).view(np.uint8)), int(p[lo]) * row)
        os.fsync(fd)
    finally:
        os.close(fd)


def _take(a: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """``a[pos]``, as a view when pos is a run of consecutive rows."""
    if len(pos) and pos[-1] - pos[0] == len(pos) - 1 and (np.diff(pos) == 1).all():
        return a[pos[0] : pos[-1] + 1]
    return a[pos]


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"name={name!r}: use letters, digits, '_', '.' or '-' (it names a file)")


def _show(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 300 else s[:297] + "..."


# ----------------------------------------------------------------------------- the lock

_HELD: set[Path] = set()  # lock files this process holds


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists
        return True
    return True


class _Lock:
    """The store's exclusive lock: file ``LOCK`` in the store directory, created with
    ``O_CREAT | O_EXCL`` and holding the holder's pid, host, start time, purpose (``gradients``:
    a writer, held long; anything else: brief) and a random token as JSON."""

    def __init__(self, root: Path, purpose: str):
        root.mkdir(parents=True, exist_ok=True)
        self.file = root.resolve() / LOCK
        self.info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.now().astimezone().isoformat(timespec="seconds"),
            "purpose": purpose,
            "token": uuid.uuid4().hex,
        }
        self.held = False

    def _read(self) -> tuple[str | None, dict | None]:
        """(text, parsed holder) of the lock file: (None, None) if it is gone, (text, None) if
        it cannot be parsed (being written, or damaged)."""
        try:
            text = self.file.read_text()
        except FileNotFoundError:
            return None, None
        except OSError:
            return "", None
        try:
            holder = json.loads(text)
        except ValueError:
            return text, None
        return text, holder if isinstance(holder, dict) else None

    def acquire(self) -> _Lock:
        deadline = time.monotonic() + _WAIT_S
        while True:
            try:
                fd = os.open(self.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                text, holder = self._read()
                if text is None:
                    continue  # released meanwhile
                mine = holder is not None and self._this_process(holder)
                if mine and self.file in _HELD:
                    gc.collect()  # a writer of this process that nothing refers to any more
                    if self.file not in _HELD:  # was released by its collection
                        continue
                elif holder is not None and (mine or self._dead(holder)):
                    self._take_over(text, holder)
                    continue
                brief = holder is None or holder.get("purpose") != "gradients"
                if brief and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise StoreLockedError(self._refusal(holder)) from None
            with os.fdopen(fd, "w") as f:
                json.dump(self.info, f)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            _HELD.add(self.file)
            return self

    def release(self) -> None:
        """Remove the lock file if this lock still holds it (idempotent; a forked child never
        removes its parent's lock)."""
        if not self.held or os.getpid() != self.info["pid"]:
            return
        self.held = False
        _HELD.discard(self.file)
        holder = self._read()[1]
        if holder is not None and holder.get("token") == self.info["token"]:
            self.file.unlink(missing_ok=True)

    def _this_process(self, h: dict) -> bool:
        return h.get("host") == self.info["host"] and h.get("pid") == self.info["pid"]

    def _dead(self, h: dict) -> bool:
        """Known dead: ran on this host and its pid no longer exists. Another host's process
        cannot be checked, so it is never assumed dead."""
        pid = h.get("pid")
        return h.get("host") == self.info["host"] and isinstance(pid, int) and not _alive(pid)

    def _take_over(self, text: str, h: dict) -> None:
        """Remove the stale lock whose content is ``text``: move it aside atomically, and give it
        back if it is not what was judged stale (another process took over first)."""
        aside = self.file.with_name(f".{LOCK}.{self.info['token']}.tmp")
        try:
            os.rename(self.file, aside)
        except FileNotFoundError:
            return
        if aside.read_text() != text:
            with suppress(OSError):
                os.link(aside, self.file)  # fails if yet another writer created one: keep that
            aside.unlink()
            return
        aside.unlink()
        why = (
            "an earlier process with this pid (this one does not hold it)"
            if self._this_process(h)
            else "no longer running"
        )
        warnings.warn(
            f"taking over the lock of store {self.file.parent}: its holder, pid {h.get('pid')} on "
            f"this host ({h.get('host')}), since {h.get('started')}, is {why}. What it wrote is "
            "checked as usual (complete chunks against their checksums) and resumed",
            RuntimeWarning,
            stacklevel=4,
        )

    def _refusal(self, h: dict | None) -> str:
        root, file = self.file.parent, self.file
        if h is None:
            return (
                f"store {root} is locked by {file}, which cannot be read (a writer may be "
                f"starting, or the file is damaged). If no dropinf process uses this store, "
                f"delete {file} by hand"
            )
        who = (
            f"pid {h.get('pid')} on host {h.get('host')!r}, since {h.get('started')} "
            f"({'writing gradients' if h.get('purpose') == 'gradients' else h.get('purpose')})"
        )
        if self._this_process(h):
            return (
                f"store {root} is already being written by this process ({who}): one writer "
                "per store. finish() or close() the earlier writer (Store.write_gradients returns "
                "it; use it in a `with` block), or use another path"
            )
        if h.get("host") != self.info["host"]:
            return (
                f"store {root} is locked by {who}: one writer per store. Wait for it, or use "
                f"another path. A lock from another host is never assumed stale: if that "
                f"process is known to be dead, delete {file} by hand"
            )
        return (
            f"store {root} is locked by {who}, which is still running: one writer per store. "
            f"Wait for it to finish, stop it, or use another path (if pid {h.get('pid')} is no "
            f"dropinf process, its number reused, delete {file} by hand)"
        )


# ----------------------------------------------------------------------------- the store


class Store:
    """A store directory (created on first write). ``manifest`` is its parsed manifest.

    Gradients: :meth:`write_gradients` starts or resumes writing (``dropinf.gradients(...,
    path=...)`` uses it), :meth:`gradient_arrays` maps them, :meth:`verify` checks every complete
    chunk. Also :meth:`save_preconditioner` / :meth:`load_preconditioner` and
    :meth:`save_scores` / :meth:`load_scores`. Methods that change the store hold its lock (see
    the module docstring) and re-read the manifest under it.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"store path {self.path} is a file; give a directory")
        self._pos: np.ndarray | None = None
        if (self.path / MANIFEST).exists():
            self._reload()
            return
        if self.path.is_dir() and any(not self._ours(p) for p in self.path.iterdir()):
            raise ValueError(
                f"{self.path} is not empty and has no {MANIFEST}, so it is not a dropinf store; "
                "give a new or empty directory"
            )
        self.manifest = self._empty()

    def __repr__(self) -> str:
        g = self.manifest.get("gradients") or {}
        return f"Store({str(self.path)!r}, gradients={g.get('status')!r}, n={g.get('n')})"

    @staticmethod
    def _empty() -> dict:
        return {"format": FORMAT, "gradients": None, "preconditioners": {}, "scores": {}}

    def _ours(self, p: Path) -> bool:
        known = {MANIFEST, ORDER, LOCK, RANKS, *FILES, "preconditioners", "scores"}
        return p.name in known or (p.name.startswith(".") and p.name.endswith(".tmp"))

    def _reload(self) -> None:
        """Re-read the manifest (another process may have changed it)."""
        file = self.path / MANIFEST
        self.manifest = json.loads(file.read_text()) if file.exists() else self._empty()
        self._pos = None

    @contextmanager
    def _locked(self, purpose: str) -> Iterator[None]:
        """Hold the store's lock briefly, on a freshly read manifest."""
        lock = _Lock(self.path, purpose).acquire()
        try:
            self._reload()
            yield
        finally:
            lock.release()

    def _commit(self) -> None:
        write_json(self.path / MANIFEST, self.manifest)

    def clear(self) -> None:
        """Delete everything this store wrote (only files it knows), leaving an empty store."""
        with self._locked("clear"):
            self._clear()

    def _clear(self) -> None:
        # The manifest goes first: an interruption then leaves files no manifest claims.
        (self.path / MANIFEST).unlink(missing_ok=True)
        for rec in [
            *self.manifest.get("preconditioners", {}).values(),
            *self.manifest.get("scores", {}).values(),
        ]:
            (self.path / rec["file"]).unlink(missing_ok=True)
        for name in (MANIFEST, ORDER, *FILES):
            (self.path / name).unlink(missing_ok=True)
        for f in (self.path / RANKS).glob("*.json"):
            f.unlink()
        for sub in ("preconditioners", "scores", RANKS):
            if (self.path / sub).is_dir() and not any((self.path / sub).iterdir()):
                (self.path / sub).rmdir()
        self.manifest, self._pos = self._empty(), None

    # ------------------------------------------------------------------------- gradients

    def _gradients(self, complete: bool = False) -> dict:
        g = self.manifest.get("gradients")
        if g is None:
            raise ValueError(
                f"store {self.path} holds no gradients; write them with "
                "dropinf.gradients(task, loader, compressor, path=...)"
            )
        if self.manifest.get("format") != FORMAT:
            raise ValueError(
                f"store {self.path} has format {self.manifest.get('format')}; this "
                f"dropinf reads format {FORMAT}. Recompute it (overwrite=True)"
            )
        if complete and g["status"] != "complete":
            raise ValueError(
                f"store {self.path} is incomplete ({len(g['chunks'])} chunks, {g['status']}); "
                "resume it by calling dropinf.gradients with the same task, loader, compressor "
                "and path"
            )
        return g

    def write_gradients(
        self,
        *,
        compressor: str,
        model: str,
        loss: str,
        param_names: list[str],
        k: int,
        dtype: str | torch.dtype = "float32",
        order: Tensor | None = None,
        overwrite: bool = False,
    ) -> GradientWriter:
        """Start writing (n, k) gradient rows here, or resume the store's unfinished run.

        Args:
            compressor: the compressor's ``fingerprint`` (JSON of its kind and parameters).
            model: :func:`model_hash` of the model; ``loss``: a name for the loss function.
            param_names: parameters whose gradients were taken, in gradient order.
            k: row length. ``dtype``: storage dtype, float32 (default), float16, bfloat16 or
                float64.
            order: (n,) int64 dataset indices in the order rows will be written, if known: rows
                are then stored sorted by dataset index. Without it, rows are kept in the order
                written and n is known at :meth:`GradientWriter.finish`.
            overwrite: discard whatever this store holds first.

        Resuming: every field above must equal the manifest's, or a ValueError names the field
        and both values. The complete chunks are verified against their checksums
        (:class:`CorruptStoreError` names a bad one) and kept; the writer continues after them.

        The writer holds the store's lock until its ``finish()`` or ``close()`` (use it in a
        ``with`` block): a second writer, here or in another process, gets a
        :class:`StoreLockedError` naming the holder. Any refusal here releases it.
        """
        name = str(dtype).removeprefix("torch.")
        if name not in DTYPES:
            raise ValueError(f"dtype={dtype!r} cannot be stored; choose one of {list(DTYPES)}")
        if order is not None:
            order = torch.as_tensor(order, dtype=torch.long)
        request = {
            "format": FORMAT,
            "dropinf_version": _version(),
            "compressor": compressor,
            "model": model,
            "loss": loss,
            "param_names": list(param_names),
            "k": int(k),
            "dtype": name,
            "n": None if order is None else len(order),
            "order": None if order is None else _sha(order.numpy()),
        }
        lock = _Lock(self.path, "gradients").acquire()
        try:
            self._reload()
            if overwrite:
                self._clear()
            g = self.manifest.get("gradients")
            if g is None:
                self._create(request, order)
            else:
                for field, want in request.items():
                    have = self.manifest["format"] if field == "format" else g.get(field)
                    if field == "n" and (want is None or have is None):
                        continue  # unknown until a run without ``order`` finishes
                    if have != want:
                        raise ValueError(
                            f"store {self.path} holds gradients with {field} = {_show(have)}, "
                            f"but this call asks for {field} = {_show(want)}"
                            f"{_WHY.get(field, '')}. {_FIX}"
                        )
                self.verify()
                self._positions()  # checks order.npy even before the first chunk
            return GradientWriter(self, order, lock)
        except BaseException:
            lock.release()
            raise

    def _create(self, request: dict, order: Tensor | None) -> None:
        try:
            params = json.loads(request["compressor"])
        except (TypeError, ValueError):
            params = None
        self.path.mkdir(parents=True, exist_ok=True)
        order_sha = None
        if order is not None:
            atomic_write(self.path / ORDER, lambda f: np.save(f, order.numpy()))
            order_sha = _file_sha(self.path / ORDER)
        n = request["n"] or 0
        for name in FILES:
            with open(self.path / name, "wb") as f:  # preallocated (sparse) when n is known
                f.truncate(n * self._row_bytes(name, request))
        fsync_dir(self.path)
        self.manifest["format"] = FORMAT
        self.manifest["gradients"] = {
            **request,
            "compressor_params": params,
            "order_sha256": order_sha,
            "status": "in progress",
            "data_hash": None,
            "chunks": [],
        }
        self._commit()

    @staticmethod
    def _file_dtype(name: str, g: dict) -> np.dtype:
        return FILES[name] if FILES[name] is not None else DTYPES[g["dtype"]][1]

    def _row_bytes(self, name: str, g: dict) -> int:
        return self._file_dtype(name, g).itemsize * (g["k"] if name == "grads.bin" else 1)

    def _positions(self) -> np.ndarray | None:
        """Where each row of the pass is stored (None: in the order written)."""
        if self.manifest["gradients"]["order"] is None:
            return None
        if self._pos is None:
            self._pos = sorted_positions(torch.from_numpy(self._order()))[1].numpy()
        return self._pos

    def _put_chunk(
        self,
        chunk: int,
        start: int,
        indices: Tensor,
        rows: Tensor,
        losses: Tensor,
        data_hash: str,
        batches: int,
        order: Tensor | None,
    ) -> dict:
        """Write rows ``start .. start + m`` of the pass (in iteration order) to their places
        and fsync them; return the chunk's record (numbered ``chunk``) without listing it in the
        manifest. Shapes are the caller's to check; ``order`` (the store's, when it has one)
        must hold ``indices`` at ``start``."""
        g, m = self.manifest["gradients"], len(indices)
        stop = start + m
        indices = torch.as_tensor(indices, dtype=torch.long).cpu()
        pos = self._positions()
        if pos is None:
            p = np.arange(start, stop)
        else:
            if stop > g["n"] or not torch.equal(indices, order[start:stop]):
                raise ValueError(
                    f"indices of rows {start}..{stop - 1} do not follow the order the store was "
                    "created with; write rows in exactly that order"
                )
            p = pos[start:stop]
        tdt, ndt = DTYPES[g["dtype"]]
        data = rows.detach().cpu().to(tdt).contiguous()
        if g["dtype"] == "bfloat16":
            data = data.view(torch.uint16)
        arrays = {
            "grads.bin": data.numpy().view(ndt),
            "indices.bin": indices.numpy(),
            "losses.bin": losses.detach().cpu().to(torch.float32).numpy(),
        }
        for name, a in arrays.items():
            _write_rows(self.path / name, p, a)
        return {
            "chunk": chunk,
            "start": start,
            "stop": stop,
            "batches": batches,
            "data_hash": data_hash,
            "checksum": {name: _sha(a) for name, a in arrays.items()},
        }

    def _order(self) -> np.ndarray:
        """``order.npy``, checked against its sha256 in the manifest and its contents against
        the request's ``order`` hash (all that a store written before the sha256 was has)."""
        g, file = self.manifest["gradients"], self.path / ORDER
        try:
            if g.get("order_sha256") not in (None, _file_sha(file)):
                problem = "does not match its sha256 in the manifest"
            else:
                a = np.load(file, allow_pickle=False)
                ok = a.dtype == np.int64 and a.shape == (g["n"],) and _sha(a) == g["order"]
                problem = None if ok else "does not hold the order the manifest records"
        except (OSError, ValueError) as e:
            problem = f"cannot be read ({type(e).__name__}: {e})"
        if problem is None:
            return a
        raise CorruptStoreError(
            f"{file} {problem}: the order file (the loader's order of the dataset indices, which "
            f"places every row) is damaged or was modified, so no row's place can be trusted. "
            f"Recompute the store: the same call with overwrite=True."
        )

    def _map(self, name: str, rows: int, mode: str = "r") -> np.ndarray:
        g = self.manifest["gradients"]
        shape = (rows, g["k"]) if name == "grads.bin" else (rows,)
        return np.memmap(self.path / name, dtype=self._file_dtype(name, g), mode=mode, shape=shape)

    def verify(self, chunks: list[int] | None = None) -> None:
        """Recompute the sha256 of complete chunks (default: all) from the files and compare
        with the manifest. Raises :class:`CorruptStoreError` naming the first bad chunk and file.
        """
        g = self._gradients()
        self._verify_records(g["chunks"] if chunks is None else [g["chunks"][c] for c in chunks])

    def _verify_records(self, recs: list[dict]) -> None:
        """:meth:`verify` for chunk records ``recs`` (the manifest's, or a rank's)."""
        g = self._gradients()
        if not recs:
            return
        rows = g["n"] if g["order"] is not None else recs[-1]["stop"]
        for name in FILES:
            need = rows * self._row_bytes(name, g)
            have = (self.path / name).stat().st_size if (self.path / name).exists() else -1
            if have < need:
                raise CorruptStoreError(
                    f"{self.path / name} is {'missing' if have < 0 else f'{have} bytes'}; the "
                    f"manifest lists {rows} rows ({need} bytes) as written. {_FIX}"
                )
        pos = self._positions()
        maps = {name: self._map(name, rows) for name in FILES}
        for rec in recs:
            a, b = rec["start"], rec["stop"]
            p = np.arange(a, b) if pos is None else pos[a:b]
            for name, mm in maps.items():
                if _sha(_take(mm, p)) != rec["checksum"][name]:
                    raise CorruptStoreError(
                        f"chunk {rec['chunk']} (rows {rec['start']}..{rec['stop'] - 1} in loader "
                        f"order) of {self.path / name} does not match its sha256 in the manifest: "
                        f"the file was modified or damaged. Recompute from that chunk on with "
                        f"Store(path).truncate({rec['chunk']}) and the same dropinf.gradients "
                        f"call, or pass overwrite=True to recompute everything."
                    )

    def truncate(self, chunk: int) -> None:
        """Forget chunk ``chunk`` and the ones after it, so a resumed run recomputes them."""
        with self._locked("truncate"):
            g = self._gradients()
            if not 0 <= chunk <= len(g["chunks"]):
                raise ValueError(f"chunk={chunk}; the store has chunks 0..{len(g['chunks']) - 1}")
            g["chunks"] = g["chunks"][:chunk]
            g.update(status="in progress", data_hash=None)
            if g["order"] is None:
                g["n"] = None
            self._commit()

    def gradient_arrays(self, verify: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """``(data (n, k), indices (n,), losses (n,))`` of a complete store.

        ``data`` maps ``grads.bin`` copy-on-write: it never changes the file, and only the rows
        read are brought into memory (an in-place write changes only this process's copy).
        ``verify`` checks every chunk's checksum first (it reads every byte once).
        """
        g = self._gradients(complete=True)
        if verify:
            self.verify()
        n = g["n"]
        data = torch.from_numpy(self._map("grads.bin", n, mode="c"))
        if g["dtype"] == "bfloat16":
            data = data.view(torch.bfloat16)
        indices = torch.from_numpy(np.array(self._map("indices.bin", n)))
        losses = torch.from_numpy(np.array(self._map("losses.bin", n)))
        return data, indices, losses

    # ------------------------------------------------------------------------- preconditioners

    def save_preconditioner(self, pre: Preconditioner, name: str) -> Path:
        """Save a fitted ``identity``, ``fisher`` or dense ``exact``/``ggn`` preconditioner as
        ``preconditioners/NAME.npz`` (atomic), recorded in the manifest with its checksum, the
        data hash of this store's gradients (if any) and its ``source`` (if known). Holds the
        store's lock meanwhile."""
        _check_name(name)
        if pre.hvp is not None:
            raise ValueError(
                "a matrix-free (conjugate gradient) exact preconditioner cannot be saved: its "
                "curvature is a closure over the task and data. Refit it, or fit "
                "solver='dense' (up to about 20k parameters) to save it"
            )
        arrays = {
            name: t.numpy()
            for name in ("eigvals", "eigvecs")
            if (t := getattr(pre, name)) is not None
        }
        with self._locked("save_preconditioner"):
            # The Fisher's kernel form refers to its (n, k) training gradients: when they are
            # this store's, the record points at them instead of copying them.
            rows = None
            if pre.rows is not None:
                rows = "gradients" if self._holds(pre.rows) else "file"
                if rows == "file":
                    arrays["rows"] = pre.rows.numpy()  # in its own dtype (float64 stays)
            file = f"preconditioners/{name}.npz"
            atomic_write(self.path / file, lambda f: np.savez(f, **arrays))
            g = self.manifest.get("gradients") or {}
            self.manifest.setdefault("preconditioners", {})[name] = {
                "rows": rows,
                "file": file,
                "sha256": _file_sha(self.path / file),
                "kind": pre.kind,
                "damping": pre.damping,
                "dim": pre.dim,
                "lam": pre.lam,
                "info": pre.info,
                "source": None if pre.source is None else pre.source.to_dict(),
                "gradients_data_hash": g.get("data_hash"),
                "dropinf_version": _version(),
            }
            self._commit()
        return self.path / file

    def load_preconditioner(self, name: str) -> Preconditioner:
        """The preconditioner saved under ``name``, checked against its checksum (``source``
        None when saved without one)."""
        rec = self._record("preconditioners", name)
        with np.load(self.path / rec["file"]) as z:
            eig = {k: torch.from_numpy(z[k]) for k in ("eigvals", "eigvecs", "rows") if k in z}
        if rec.get("rows") == "gradients":
            now = (self.manifest.get("gradients") or {}).get("data_hash")
            if now != rec["gradients_data_hash"]:
                raise ValueError(
                    f"preconditioner {name!r} was fitted on gradients (data hash "
                    f"{rec['gradients_data_hash']}) that this store no longer holds ({now}); "
                    "refit it on the current gradients"
                )
            eig["rows"] = self.gradient_arrays(verify=False)[0]
        return Preconditioner(
            rec["kind"],
            rec["damping"],
            rec["dim"],
            lam=rec["lam"],
            info=rec["info"],
            source=Source.from_dict(rec.get("source")),
            **eig,
        )

    def _holds(self, rows: Tensor) -> bool:
        """Whether ``rows`` equal this store's complete gradients (same shape, dtype, values)."""
        g = self.manifest.get("gradients") or {}
        if g.get("status") != "complete" or tuple(rows.shape) != (g.get("n"), g.get("k")):
            return False
        data = self.gradient_arrays(verify=False)[0]
        return data.dtype == rows.dtype and torch.equal(data, rows.cpu())

    # ------------------------------------------------------------------------- scores

    def save_scores(self, S: Tensor, name: str, meta: dict | None = None) -> Path:
        """Save a score matrix (e.g. (n_test, n_train), positive = helpful) as
        ``scores/NAME.npy`` (atomic), recorded in the manifest with its checksum, shape, dtype
        and ``meta`` (JSON: say which test set and preconditioner it came from). Holds the
        store's lock meanwhile."""
        _check_name(name)
        a = torch.as_tensor(S).detach().cpu().numpy()
        file = f"scores/{name}.npy"
        with self._locked("save_scores"):
            atomic_write(self.path / file, lambda f: np.save(f, a))
            self.manifest.setdefault("scores", {})[name] = {
                "file": file,
                "sha256": _file_sha(self.path / file),
                "shape": list(a.shape),
                "dtype": str(a.dtype),
                "meta": meta or {},
                "dropinf_version": _version(),
            }
            self._commit()
        return self.path / file

    def load_scores(self, name: str, verify: bool = True) -> Tensor:
        """The score matrix saved under ``name``, memory-mapped copy-on-write (checked against
        its checksum first with ``verify``)."""
        rec = self._record("scores", name, verify)
        return torch.from_numpy(np.load(self.path / rec["file"], mmap_mode="c"))

    def _record(self, section: str, name: str, verify: bool = True) -> dict:
        recs = self.manifest.get(section, {})
        if name not in recs:
            raise ValueError(
                f"store {self.path} has no {section} named {name!r}; it has {sorted(recs)}"
            )
        rec = recs[name]
        if verify and _file_sha(self.path / rec["file"]) != rec["sha256"]:
            raise CorruptStoreError(
                f"{self.path / rec['file']} does not match its sha256 in the "
                f"manifest: the file was modified or damaged; save it again"
            )
        return rec


class GradientWriter:
    """Writes chunks of gradient rows to a :class:`Store` (from :meth:`Store.write_gradients`).

    ``chunks`` lists the complete chunks (each: ``chunk``, ``start``, ``stop`` in iteration
    order, ``batches``, ``data_hash``, ``checksum`` per file); ``rows_done`` is where the next
    chunk starts.

    It holds the store's lock until :meth:`finish` succeeds or :meth:`close` is called (a
    ``with`` block closes it on leaving, whatever happened); if neither happens, its garbage
    collection or the interpreter's exit releases it.
    """

    def __init__(self, store: Store, order: Tensor | None, lock: _Lock):
        self.store = store
        self.meta = store.manifest["gradients"]
        self.order = order
        self._release = weakref.finalize(self, lock.release)

    def __enter__(self) -> GradientWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return not self._release.alive

    def close(self) -> None:
        """Release the store's lock without finishing (idempotent): the store keeps its complete
        chunks, and the same request resumes after them."""
        self._release()

    @property
    def chunks(self) -> list[dict]:
        return self.meta["chunks"]

    @property
    def rows_done(self) -> int:
        return self.chunks[-1]["stop"] if self.chunks else 0

    def write_chunk(
        self, indices: Tensor, rows: Tensor, losses: Tensor, data_hash: str, batches: int = 1
    ) -> dict:
        """Append rows ``rows_done .. rows_done + m`` of the pass and record them as complete.

        Args:
            indices: (m,) dataset indices (with ``order``: must be its next m entries).
            rows: (m, k), converted to the storage dtype (round to nearest).
            losses: (m,) per-sample losses, stored as float32.
            data_hash: hash of the input that produced the rows (see :func:`hash_batch`), checked
                when a resumed run re-reads it.
            batches: how many batches the chunk spans.
        """
        g, start = self.meta, self.rows_done
        if self.closed:
            raise ValueError(
                f"this writer of store {self.store.path} is closed (finished, or close() was "
                "called) and no longer holds its lock; start another with Store.write_gradients"
            )
        if g["status"] == "complete":
            raise ValueError(
                f"store {self.store.path} is complete with n={g['n']} rows, but more rows "
                f"arrived: the data changed (the loader yields more samples). {_FIX}"
            )
        m = len(indices)
        if rows.ndim != 2 or rows.shape != (m, g["k"]) or losses.shape != (m,):
            raise ValueError(
                f"chunk shapes indices {tuple(indices.shape)}, rows {tuple(rows.shape)}, losses "
                f"{tuple(losses.shape)} do not agree with (m,), (m, k={g['k']}), (m,)"
            )
        rec = self.store._put_chunk(
            len(self.chunks), start, indices, rows, losses, data_hash, batches, self.order
        )
        self.chunks.append(rec)
        self.store._commit()
        return rec

    def finish(self) -> None:
        """Mark the store complete once every row is written (idempotent), and release the
        store's lock. If it raises, the writer keeps the lock: write the missing rows, or
        :meth:`close` it."""
        g, n = self.meta, self.rows_done
        if g["status"] == "complete":
            self.close()
            return
        if n == 0:
            raise ValueError(
                "loader yielded no batch; per-sample gradients need at least one sample"
            )
        if g["n"] is not None and n != g["n"]:
            raise ValueError(f"{n} rows written, but the store was created for n={g['n']}")
        if g["order"] is None:  # drop bytes of an abandoned longer run, if any
            for name in FILES:
                os.truncate(self.store.path / name, n * self.store._row_bytes(name, g))
        digest = hashlib.sha256("".join(c["data_hash"] for c in self.chunks).encode())
        g.update(n=n, status="complete", data_hash=digest.hexdigest())
        self.store._commit()
        self.close()
