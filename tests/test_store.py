"""The resumable on-disk store: against in-memory featurisation, bit for bit, through interruptions,
corruption, mismatched requests and 16-bit storage."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_close
from torch.utils.data import DataLoader, TensorDataset

import dropinf as di
import dropinf.store as store_mod
from dropinf import losses
from dropinf.store import LOCK, CorruptStoreError, Store, StoreLockedError
from dropinf.study import models

N, BS, CHUNK = 30, 4, 8  # 8 batches (the last of 2); a chunk = 2 batches


class Counting:
    """A per-sample loss that counts its calls and raises on call ``fail_at``."""

    def __init__(self, fail_at: int | None = None):
        self.calls, self.fail_at = 0, fail_at

    def __call__(self, model, batch):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("injected failure")
        return losses.cross_entropy(model, batch)


@pytest.fixture
def setup():
    torch.manual_seed(1)
    model = models.mlp([5, 8, 3]).eval()
    ds = TensorDataset(torch.randn(N, 5), torch.randint(0, 3, (N,)))
    return model, ds


def comp():
    return di.Dropout(p=0.5, seed=0)


def loader(ds, bs=BS, seed=None, **kw):
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=bs, shuffle=seed is not None, generator=gen, **kw)


def run(model, ds, path=None, loss=None, **kw):
    task = di.Task(model, loss or Counting())
    kw.setdefault("chunk_size", CHUNK)
    if path is None:
        kw.pop("chunk_size")
    return di.gradients(
        task, kw.pop("ld", None) or loader(ds), comp(), path=path, progress=False, **kw
    )


def assert_same(G, ref):
    assert torch.equal(G.data, ref.data)
    assert torch.equal(G.indices, ref.indices)
    assert torch.equal(G.losses, ref.losses)


def mapped_file(t: torch.Tensor) -> str | None:
    """The file whose mapping holds tensor t's memory (from /proc/self/maps), if any."""
    ptr = t.untyped_storage().data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= ptr < hi:
                return parts[5] if len(parts) > 5 else None
    return None


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


# ----------------------------------------------------------------------------- equality


def test_store_equals_in_memory_bit_for_bit_and_is_memory_mapped(setup, tmp_path):
    model, ds = setup
    ref = run(model, ds)
    G = run(model, ds, tmp_path / "s")
    assert_same(G, ref)
    assert G.path == tmp_path / "s" and G.compressor == ref.compressor
    assert mapped_file(G.data) == str(tmp_path / "s" / "grads.bin")
    again = di.Gradients.load(tmp_path / "s")
    assert_same(again, ref)
    assert again.param_names == ref.param_names
    m = Store(tmp_path / "s").manifest["gradients"]
    assert (m["status"], m["n"], m["k"], len(m["chunks"])) == ("complete", N, ref.shape[1], 4)
    assert m["compressor_params"] == {"kind": "dropout", **comp().config()}


@pytest.mark.parametrize("chunk_size", [1, 5, 100])
def test_chunk_size_does_not_change_the_rows(setup, tmp_path, chunk_size):
    model, ds = setup
    G = run(model, ds, tmp_path / "s", chunk_size=chunk_size)
    assert_same(G, run(model, ds))
    chunks = Store(tmp_path / "s").manifest["gradients"]["chunks"]
    batches_per_chunk = math.ceil(chunk_size / BS)
    assert len(chunks) == math.ceil(math.ceil(N / BS) / batches_per_chunk)
    assert all(c["batches"] == batches_per_chunk for c in chunks[:-1])


def test_batch_size_and_shuffling_change_rows_only_to_float_tolerance(setup, tmp_path):
    model, ds = setup
    ref = run(model, ds)
    for i, ld in enumerate([loader(ds, bs=7), loader(ds, bs=3, seed=5)]):
        G = run(model, ds, tmp_path / f"s{i}", ld=ld)
        assert torch.equal(G.indices, torch.arange(N))
        assert_close(G.data, ref.data)
        assert_close(G.losses, ref.losses)
    # a subset sampler: rows of the chosen samples, sorted by dataset index
    sub = DataLoader(ds, batch_size=2, sampler=[20, 3, 11, 7, 0])
    G = run(model, ds, tmp_path / "sub", ld=sub, chunk_size=2)
    assert G.indices.tolist() == [0, 3, 7, 11, 20]
    assert_close(G.data, ref.data[G.indices])


def test_list_of_batches_is_stored_in_order(setup, tmp_path):
    model, ds = setup
    batches = [ds[:7], ds[7:9], ds[9:]]
    ref = run(model, ds, ld=batches)
    G = run(model, ds, tmp_path / "s", ld=batches, chunk_size=3)
    assert_same(G, ref)
    assert torch.equal(G.indices, torch.arange(N))
    # interrupted in the third batch, then resumed
    with pytest.raises(RuntimeError, match="injected"):
        run(model, ds, tmp_path / "r", ld=batches, chunk_size=3, loss=Counting(fail_at=3))
    G = run(model, ds, tmp_path / "r", ld=batches, chunk_size=3)
    assert_same(G, ref)


# ----------------------------------------------------------------------------- resumption


def calls_per_batch(model, ds) -> int:
    loss = Counting()
    run(model, ds, loss=loss)
    return loss.calls // math.ceil(N / BS)


@pytest.mark.parametrize("seed", [None, 7])
def test_interrupted_run_resumes_to_identical_arrays_without_recomputing(setup, tmp_path, seed):
    model, ds = setup
    per = calls_per_batch(model, ds)
    ref = run(model, ds, ld=loader(ds, seed=seed))
    path = tmp_path / "s"
    # fails in the 6th batch: chunks 0 and 1 (batches 0-3) are complete, batch 4 is lost
    with pytest.raises(RuntimeError, match="injected"):
        run(model, ds, path, loss=Counting(fail_at=5 * per + 1), ld=loader(ds, seed=seed))
    m = Store(path).manifest["gradients"]
    assert (m["status"], len(m["chunks"])) == ("in progress", 2)
    with pytest.raises(ValueError, match="incomplete"):
        di.Gradients.load(path)
    loss = Counting()
    G = run(model, ds, path, loss=loss, ld=loader(ds, seed=seed))  # a fresh, equally seeded loader
    assert_same(G, ref)
    assert loss.calls == per * (math.ceil(N / BS) - 4)
    # a complete store is re-read to check the data, nothing is recomputed
    loss = Counting()
    assert_same(run(model, ds, path, loss=loss, ld=loader(ds, seed=seed)), ref)
    assert loss.calls == 0


def test_half_written_chunk_is_redone(setup, tmp_path, monkeypatch):
    model, ds = setup
    per = calls_per_batch(model, ds)
    ref = run(model, ds)
    path = tmp_path / "s"
    real, commits = store_mod.write_json, []

    def crash_on_third(p, obj):  # commits: 1 creation, 2 chunk 0, 3 chunk 1
        commits.append(p)
        if len(commits) == 3:
            raise KeyboardInterrupt
        return real(p, obj)

    monkeypatch.setattr(store_mod, "write_json", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        run(model, ds, path)
    monkeypatch.undo()
    assert len(Store(path).manifest["gradients"]["chunks"]) == 1
    # chunk 1's rows (8..15) reached the file; tear them as a crash mid-write would
    row = ref.shape[1] * 4
    with open(path / "grads.bin", "r+b") as f:
        f.seek(8 * row)
        f.write(b"\x00" * 8 * row)
    loss = Counting()
    G = run(model, ds, path, loss=loss)
    assert_same(G, ref)
    assert loss.calls == per * (math.ceil(N / BS) - 2)


# ----------------------------------------------------------------------------- corruption


@pytest.mark.parametrize("file,row_bytes", [("grads.bin", None), ("losses.bin", 4)])
def test_corrupted_chunk_is_reported_not_used(setup, tmp_path, file, row_bytes):
    model, ds = setup
    per = calls_per_batch(model, ds)
    ref = run(model, ds)
    path = tmp_path / "s"
    run(model, ds, path)
    flip_byte(path / file, 10 * (row_bytes or ref.shape[1] * 4) + 1)  # row 10: chunk 1
    msg = rf"chunk 1 \(rows 8\.\.15 .*{file}"
    with pytest.raises(CorruptStoreError, match=msg):
        Store(path).verify()
    with pytest.raises(CorruptStoreError, match=msg):
        di.Gradients.load(path)
    with pytest.raises(CorruptStoreError, match=msg):
        run(model, ds, path)
    Store(path).verify([0, 2, 3])  # the other chunks are intact
    di.Gradients.load(path, verify=False)  # opt-out: maps without reading
    # the message's fix: forget chunk 1 onwards, resume
    Store(path).truncate(1)
    loss = Counting()
    assert_same(run(model, ds, path, loss=loss), ref)
    assert loss.calls == per * (math.ceil(N / BS) - 2)


def test_truncated_file_is_reported(setup, tmp_path):
    model, ds = setup
    run(model, ds, tmp_path / "s")
    with open(tmp_path / "s" / "indices.bin", "r+b") as f:
        f.truncate(8 * 20)
    with pytest.raises(CorruptStoreError, match=r"indices\.bin is 160 bytes.*30 rows"):
        Store(tmp_path / "s").verify()


@pytest.mark.parametrize("where", ["header", "data"])
def test_damaged_order_file_is_named_not_a_chunk(setup, tmp_path, where):
    """order.npy places every row: a flipped bit there must not pass for a damaged chunk (whose
    fix, truncate and resume, would leave a store that verifies but is not sorted by index)."""
    model, ds = setup
    path = tmp_path / "s"
    ref = run(model, ds, path, ld=loader(ds, seed=7))
    size = (path / store_mod.ORDER).stat().st_size
    flip_byte(path / store_mod.ORDER, 10 if where == "header" else size - 3)  # last index
    calls = [
        lambda: Store(path).verify(),
        lambda: di.Gradients.load(path),
        lambda: run(model, ds, path, ld=loader(ds, seed=7)),  # resume of a complete store
    ]
    for call in calls:
        with pytest.raises(CorruptStoreError, match=r"order\.npy .*overwrite=True") as err:
            call()
        assert "chunk" not in str(err.value)
    assert_same(run(model, ds, path, ld=loader(ds, seed=7), overwrite=True), ref)


def test_store_without_an_order_checksum_still_loads_and_checks_the_order(setup, tmp_path):
    """A store written before order.npy had a sha256 in the manifest: its contents are checked
    against the manifest's hash of the loader's order instead."""
    model, ds = setup
    path = tmp_path / "s"
    ref = run(model, ds, path, ld=loader(ds, seed=7))
    m = json.loads((path / "manifest.json").read_text())
    assert m["gradients"].pop("order_sha256") == store_mod._file_sha(path / store_mod.ORDER)
    (path / "manifest.json").write_text(json.dumps(m))
    assert_same(di.Gradients.load(path), ref)
    assert_same(run(model, ds, path, ld=loader(ds, seed=7)), ref)
    flip_byte(path / store_mod.ORDER, (path / store_mod.ORDER).stat().st_size - 3)
    with pytest.raises(CorruptStoreError, match=r"order\.npy does not hold the order"):
        di.Gradients.load(path)


# ----------------------------------------------------------------------------- one writer


def writer(path: Path, **kw) -> store_mod.GradientWriter:
    return Store(path).write_gradients(
        compressor="c", model="m", loss="l", param_names=["x"], k=2, **kw
    )


def write_some(w: store_mod.GradientWriter, m: int = 3) -> None:
    a = w.rows_done
    w.write_chunk(torch.arange(a, a + m), torch.ones(m, 2), torch.zeros(m), f"rows {a}")


CHILD = """
import sys, time
from dropinf.store import Store, StoreLockedError
try:
    w = Store(sys.argv[1]).write_gradients(
        compressor="c", model="m", loss="l", param_names=["x"], k=2
    )
except StoreLockedError as e:
    print(e, flush=True)
    sys.exit(3)
print("holding", flush=True)
time.sleep(600)
"""


def child(path: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True
    )


def test_second_writer_is_refused_while_the_first_holds_the_lock(setup, tmp_path):
    model, ds = setup
    path = tmp_path / "s"
    w = writer(path)
    holder = json.loads((path / LOCK).read_text())
    assert (holder["pid"], holder["host"]) == (os.getpid(), socket.gethostname())
    # in this process: another writer, dropinf.gradients, a save
    with pytest.raises(StoreLockedError, match=rf"already being written by this process \(pid "
                       rf"{os.getpid()} .*finish\(\) or close\(\)"):
        writer(path)
    with pytest.raises(StoreLockedError, match=str(path)):
        run(model, ds, path)
    with pytest.raises(StoreLockedError, match="writing gradients"):
        Store(path).save_scores(torch.zeros(2, 2), "s")
    # in another process: refused, naming this one
    p = child(path)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 3, out
    who = f"pid {os.getpid()} on host {socket.gethostname()!r}, since {holder['started']}"
    assert who in out and "still running" in out and str(path) in out
    # readers ignore the lock file, and the manifest does not list it
    write_some(w)
    assert Store(path).manifest["gradients"]["chunks"][0]["stop"] == 3
    assert LOCK not in (path / "manifest.json").read_text()
    # finish releases it
    w.finish()
    assert not (path / LOCK).exists()
    assert Store(path).gradient_arrays()[0].shape == (3, 2)
    Store(path).save_scores(torch.zeros(2, 2), "s")
    writer(path).close()


def test_lock_of_a_dead_writer_is_taken_over_and_a_foreign_one_is_not(tmp_path):
    path = tmp_path / "s"
    p = child(path)  # takes the lock, then is killed: nothing releases it
    assert p.stdout.readline().strip() == "holding"
    stale = json.loads((path / LOCK).read_text())
    with pytest.raises(StoreLockedError, match=rf"pid {p.pid} .*still running"):
        writer(path)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    p.stdout.close()
    with pytest.warns(RuntimeWarning, match=rf"pid {p.pid} .*no longer running"):
        w = writer(path)
    assert json.loads((path / LOCK).read_text())["pid"] == os.getpid()
    w.close()
    assert not (path / LOCK).exists()
    # the same record from another host cannot be checked: refused, with the manual fix
    foreign = json.dumps({**stale, "host": "elsewhere.example"})
    (path / LOCK).write_text(foreign)
    msg = r"host 'elsewhere.example'.*never assumed stale.*delete .*writer\.lock by hand"
    with pytest.raises(StoreLockedError, match=msg):
        writer(path)
    with pytest.raises(StoreLockedError, match=msg):
        Store(path).save_scores(torch.zeros(1), "s")
    assert (path / LOCK).read_text() == foreign
    (path / LOCK).unlink()
    writer(path).close()


def test_brief_holder_is_waited_for_a_writer_is_not(tmp_path, monkeypatch):
    """A save holds the lock briefly: another save waits for it (up to _WAIT_S), and gives up
    with the holder named after that."""
    path = tmp_path / "s"
    path.mkdir()
    live = {"pid": os.getppid(), "host": socket.gethostname(), "started": "then", "token": "t"}
    (path / LOCK).write_text(json.dumps({**live, "purpose": "save_scores"}))
    threading.Timer(0.5, (path / LOCK).unlink).start()
    Store(path).save_scores(torch.ones(2), "s")  # after the holder left
    assert torch.equal(Store(path).load_scores("s"), torch.ones(2))
    monkeypatch.setattr(store_mod, "_WAIT_S", 0.3)
    (path / LOCK).write_text(json.dumps({**live, "purpose": "save_scores"}))
    with pytest.raises(StoreLockedError, match=rf"pid {os.getppid()} .*\(save_scores\)"):
        Store(path).save_scores(torch.ones(2), "t")


def test_lock_is_released_after_finish_and_after_an_error(setup, tmp_path):
    model, ds = setup
    w = writer(tmp_path / "w")
    write_some(w)
    w.finish()
    assert not (tmp_path / "w" / LOCK).exists()
    with pytest.raises(ValueError, match="closed"):
        write_some(w)
    with pytest.raises(RuntimeError, match="injected"), writer(tmp_path / "x") as w:
        write_some(w)
        assert (tmp_path / "x" / LOCK).exists()
        raise RuntimeError("injected")
    assert not (tmp_path / "x" / LOCK).exists()
    # a writer nobody refers to any more, even from a reference cycle, no longer holds the store
    w = writer(tmp_path / "y")
    w.cycle = w
    del w
    writer(tmp_path / "y").close()
    assert not (tmp_path / "y" / LOCK).exists()
    # dropinf.gradients: an error in the loss, a refusal while resuming, then a resumed run
    path = tmp_path / "g"
    with pytest.raises(RuntimeError, match="injected"):  # in batch 3: chunk 0 is complete
        run(model, ds, path, loss=Counting(fail_at=2 * calls_per_batch(model, ds) + 1))
    assert not (path / LOCK).exists()
    with pytest.raises(ValueError, match="other data") as err:  # err keeps the run's frames
        run(model, ds, path, ld=loader(TensorDataset(ds.tensors[0] + 1, ds.tensors[1])))
    assert "chunk 0" in str(err.value) and not (path / LOCK).exists()
    assert_same(run(model, ds, path), run(model, ds))
    assert not (path / LOCK).exists()


# ----------------------------------------------------------------------------- refusals


def mismatches(model, ds):
    """field -> (a request differing from the store's in that field only, text the refusal
    must show: both values where they are short)."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[0].weight[0, 0] += 1e-3
    x, y = ds.tensors
    x2 = x.clone()
    x2[12, 1] += 1.0  # a sample of chunk 1 (rows 8..15)
    return {
        "compressor": (dict(compressor=di.Dropout(p=0.5, seed=1)), ['"seed": 0', '"seed": 1']),
        "model": (dict(model=other), []),
        "loss": (dict(loss=losses.cross_entropy), ["Counting", "dropinf.losses.cross_entropy"]),
        "param_names": (dict(params=["0"]), ["'2.weight'"]),
        "dtype": (dict(dtype=torch.float16), ["'float32'", "'float16'"]),
        "n": (dict(ld=DataLoader(ds, batch_size=BS, sampler=range(N - 1))), ["30", "29"]),
        "order": (dict(ld=loader(ds, seed=3)), ["seeded generator"]),
        "chunk 1": (dict(ld=loader(TensorDataset(x2, y))), ["other data", "samples 8..15"]),
    }


def test_mismatched_request_is_refused_naming_the_field(setup, tmp_path, monkeypatch):
    model, ds = setup
    path = tmp_path / "s"
    ref = run(model, ds, path)
    for field, (change, shown) in mismatches(model, ds).items():
        m = change.get("model", model)
        task = di.Task(m, change.get("loss", Counting()), params=change.get("params"))
        with pytest.raises(ValueError, match=field) as err:
            di.gradients(
                task,
                change.get("ld", loader(ds)),
                change.get("compressor", comp()),
                path=path,
                dtype=change.get("dtype", torch.float32),
                progress=False,
            )
        assert "overwrite=True" in str(err.value)
        assert all(t in str(err.value) for t in shown), (field, str(err.value))
    monkeypatch.setattr(di._version, "__version__", "9.9.9")
    with pytest.raises(ValueError, match=r"dropinf_version = '0\.1\.0'.*'9\.9\.9'"):
        run(model, ds, path)
    monkeypatch.undo()
    # the store was left as it was, and overwrite=True replaces it
    assert_same(di.Gradients.load(path), ref)
    G = run(model, ds, path, dtype=torch.float16, overwrite=True)
    assert G.data.dtype == torch.float16


def test_directory_that_is_not_a_store_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a dropinf store"):
        Store(tmp_path)
    with pytest.raises(ValueError, match="cannot be stored"):
        Store(tmp_path / "s").write_gradients(
            compressor="c", model="m", loss="l", param_names=[], k=2, dtype=torch.int8
        )


def test_writer_api_sorts_rows_and_checks_the_order(tmp_path):
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(10, generator=g)
    rows = torch.randn(10, 3, generator=g)
    w = Store(tmp_path).write_gradients(
        compressor="synthetic", model="none", loss="none", param_names=["x"], k=3, order=order
    )
    with pytest.raises(ValueError, match="do not follow the order"):
        w.write_chunk(order[1:5], rows[1:5], torch.zeros(4), "h")
    for a, b in [(0, 4), (4, 10)]:
        w.write_chunk(order[a:b], rows[a:b], order[a:b].float(), f"h{a}")
    w.finish()
    data, indices, losses_ = Store(tmp_path).gradient_arrays()
    assert torch.equal(indices, torch.arange(10))
    assert torch.equal(data[order], rows) and torch.equal(losses_, torch.arange(10.0))


# ----------------------------------------------------------------------------- 16-bit storage


U16 = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}  # unit roundoff (round to nearest)
ETA16 = {torch.float16: 2.0**-25, torch.bfloat16: 0.0}  # half the fp16 subnormal spacing


def test_16bit_storage_error_in_scores_is_bounded_by_the_unit_roundoff(setup, tmp_path):
    """Storing rounds each entry: a_hat = a + e with |e| <= u |a| + eta (eta: underflow, fp16
    only). With both sides stored, a_hat.b_hat - a.b = sum e_i b_hat_i + a_i f_i, so

        |s16 - s32| <= sum_i (u |a_i| + eta) |b_hat_i| + |a_i| (u |b_i| + eta)
                       + gamma_k (sum |a_i b_i| + sum |a_hat_i b_hat_i|),

    the last term the float32 rounding of either dot product (gamma_k = k u32 / (1 - k u32)).
    With a preconditioner P (symmetric, fit once from the float32 rows, applied to the query
    side in float64 and rounded to float32), a is replaced by P a in the second sum and b_hat by
    P b_hat in the first, and the float32 rounding of P a adds u32 to gamma_k."""
    model, ds = setup
    ld = DataLoader(ds, batch_size=10)
    task = di.Task(model, losses.cross_entropy)
    G32 = di.gradients(task, ld, di.Identity(), path=tmp_path / "f32", progress=False)
    A, B = G32.data[:8].double(), G32.data[8:].double()  # test and training rows
    k = A.shape[1]
    u32 = 2.0**-24
    gamma = k * u32 / (1 - k * u32)
    G16 = {}
    for dt in U16:
        G16[dt] = di.gradients(
            task, ld, di.Identity(), path=tmp_path / str(dt), dtype=dt, progress=False
        )
        assert G16[dt].data.dtype == dt and torch.equal(G16[dt].data, G32.data.to(dt))
    for which in ("identity", "fisher"):
        pre = di.Preconditioner.fit(G32.data[8:], kind=which, damping=0.1)
        S32 = di.scores(G32.data[:8], G32.data[8:], pre).double()
        PA = pre.apply(A).double()
        mean_err = {}
        for dt, u in U16.items():
            G = G16[dt]
            Ah, Bh = G.data[:8].double(), G.data[8:].double()
            S = di.scores(G.data[:8], G.data[8:], pre).double()
            PBh, PAh = pre.apply(Bh).double(), pre.apply(Ah).double()
            eta = ETA16[dt]
            bound = (u * A.abs() + eta) @ PBh.abs().T + PA.abs() @ (u * B.abs() + eta).T
            bound += (gamma + (u32 if which == "fisher" else 0)) * (
                PA.abs() @ B.abs().T + PAh.abs() @ Bh.abs().T
            )
            err = (S - S32).abs()
            assert (err <= bound).all(), f"{which} {dt}: max err/bound {(err / bound).max():.3g}"
            assert (err > 0).any()
            mean_err[dt] = err.mean().item()
        # errors scale with u: bfloat16's is 8 times float16's, up to sampling spread
        assert 3 < mean_err[torch.bfloat16] / mean_err[torch.float16] < 20


# ----------------------------------------------------------------------------- other contents


def test_preconditioner_and_scores_round_trip(setup, tmp_path):
    model, ds = setup
    G = run(model, ds, tmp_path)
    st = Store(tmp_path)
    for kind in ("identity", "fisher"):
        pre = di.Preconditioner.fit(G, kind=kind, damping=1e-2)
        st.save_preconditioner(pre, kind)
        back = Store(tmp_path).load_preconditioner(kind)
        assert (back.kind, back.damping, back.dim, back.lam) == (
            kind,
            1e-2 * (kind == "fisher"),
            pre.dim,
            pre.lam,
        )
        assert torch.equal(back.apply(G.data), pre.apply(G.data))
    rec = st.manifest["preconditioners"]["fisher"]
    assert rec["gradients_data_hash"] == st.manifest["gradients"]["data_hash"] is not None
    S = di.scores(G.data[:5], G, back)
    st.save_scores(S, "test5_fisher", meta={"test": "first 5 training rows"})
    back_S = Store(tmp_path).load_scores("test5_fisher")
    assert torch.equal(back_S, S) and back_S.dtype == S.dtype
    assert st.manifest["scores"]["test5_fisher"]["shape"] == [5, N]
    flip_byte(tmp_path / "scores" / "test5_fisher.npy", 200)
    with pytest.raises(CorruptStoreError, match="test5_fisher.npy"):
        Store(tmp_path).load_scores("test5_fisher")
    with pytest.raises(ValueError, match="no scores named 'nope'"):
        st.load_scores("nope")
    with pytest.raises(ValueError, match="name="):
        st.save_scores(S, "../escape")
    cg = di.Preconditioner.fit_exact(
        di.Task(model, losses.cross_entropy), [ds[:]], damping=0.1, solver="cg"
    )
    with pytest.raises(ValueError, match="cannot be saved"):
        st.save_preconditioner(cg, "exact")
    # overwrite discards all of it
    run(model, ds, tmp_path, overwrite=True)
    assert Store(tmp_path).manifest["preconditioners"] == {}
    assert not (tmp_path / "scores").exists()
    assert np.array_equal(np.asarray(G), Store(tmp_path).gradient_arrays()[0].numpy())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_fisher_refers_to_the_store_gradients(setup, tmp_path, dtype):
    """A kernel-form Fisher fitted on the store's own gradients is saved without copying them,
    and loads back equal; fitted on other rows, it carries them."""
    model, ds = setup
    G = run(model, ds, tmp_path, dtype=dtype)
    st = Store(tmp_path)
    pre = di.Preconditioner.fit(G.data, kind="fisher", damping=1e-2, solver="kernel")
    st.save_preconditioner(pre, "kernel")
    with np.load(tmp_path / "preconditioners" / "kernel.npz") as z:
        assert "rows" not in z.files
    q = torch.randn(3, G.shape[1])
    back = Store(tmp_path).load_preconditioner("kernel")
    assert torch.equal(back.apply(q), pre.apply(q))
    other = di.Preconditioner.fit(G.data[:10].float(), kind="fisher", damping=1e-2, solver="kernel")
    st.save_preconditioner(other, "other")
    assert torch.equal(Store(tmp_path).load_preconditioner("other").apply(q), other.apply(q))
