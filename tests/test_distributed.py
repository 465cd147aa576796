"""dropinf.distributed on the CPU with gloo: processes started here (spawn, torchrun's environment
variables, a free port) against one process: the same store bytes, resumed after a rank is
killed with 3 or 1 processes, fit / scores / top-k equal to the single-process ones; a rank
that hangs gives a DistributedError after the timeout."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

import dropinf as di
from dropinf import cli, distributed, losses

N, BS, CHUNK = 37, 4, 6  # a chunk = 2 batches (8 rows): 5 chunks, the last of 5 rows
HANG_AT = 26  # first item of chunk 3, on rank 1 of 2 (chunks 2..4): chunk 2 is complete
_CALLS = [0]


class Data(Dataset):
    """Seeded (x, y) items; ``hang_at``: item whose loading sleeps (a rank that hangs)."""

    def __init__(self, hang_at: int | None = None):
        g = torch.Generator().manual_seed(3)
        self.x, self.y = torch.randn(N, 5, generator=g), torch.randint(0, 3, (N,), generator=g)
        self.hang_at = hang_at

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int):
        if i == self.hang_at:
            time.sleep(300)
        return self.x[i], self.y[i]


def counted_loss(model, batch):
    _CALLS[0] += 1
    return losses.cross_entropy(model, batch)


def make_task() -> di.Task:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    return di.Task(model, counted_loss)


def make_loader(data: Dataset, shuffle: bool) -> DataLoader:
    gen = torch.Generator().manual_seed(7) if shuffle else None
    return DataLoader(data, batch_size=BS, shuffle=shuffle, generator=gen)


def comp() -> di.Compressor:
    return di.Dropout(p=0.3, seed=0)  # k = 0.7 * 75 rounded: fewer dimensions than rows


def featurise(path: Path, shuffle: bool = False, hang_at: int | None = None, **kw):
    return distributed.gradients(
        make_task(),
        make_loader(Data(hang_at), shuffle),
        comp(),
        path=path,
        chunk_size=CHUNK,
        progress=False,
        check=False,
        **kw,
    )


def reference(path: Path, shuffle: bool = False) -> di.Gradients:
    """The single-process store (dropinf.gradients) with the same arguments."""
    return di.gradients(
        make_task(),
        make_loader(Data(), shuffle),
        comp(),
        path=path,
        chunk_size=CHUNK,
        progress=False,
        check=False,
    )


def files(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in path.rglob("*") if f.is_file()}


def int_rows(seed: int, n: int, k: int) -> torch.Tensor:
    """float64 rows of small integers: every dot product exact, so equal scores tie exactly."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-2, 3, (n, k), generator=g).double()


# ----------------------------------------------------------------------------- the workers


def _worker(rank: int, world: int, port: int, out: str, job: str, args: dict) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    result: dict = {"rank": rank}
    try:
        result.update(_JOBS[job](rank, Path(out), **args))
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}"
        result["error_type"] = type(e).__name__
        result["traceback"] = traceback.format_exc()
    result["calls"] = _CALLS[0]
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
    if "error" in result:
        # A rank that failed (on purpose: a peer that hangs, a refused argument) skips the
        # interpreter's teardown, which can abort while a hung peer still holds the gloo
        # connection; ranks that succeed exit normally, so a teardown crash is still caught.
        os._exit(0)


def _job_all(rank: int, out: Path, store: str, shuffle: bool) -> dict:
    G = featurise(Path(store), shuffle, timeout=60)
    Gt = G  # test rows: the training rows themselves (their own store would be as good)
    saved = {}
    for solver in ("dense", "kernel"):
        pre = distributed.fit(G, "fisher", damping=1e-2, solver=solver, timeout=60)
        saved[f"{solver}_scores"] = distributed.scores(Gt[:9], G, pre, timeout=60).numpy()
        idx, val = distributed.top_k(Gt[:9], G, pre, 5, block_train=7, timeout=60)
        saved[f"{solver}_idx"], saved[f"{solver}_val"] = idx.numpy(), val.numpy()
        saved[f"{solver}_self"] = distributed.self_influence(G, pre, timeout=60).numpy()
        saved[f"{solver}_lam"] = np.array(pre.lam)
    # exact ties: integer rows, identity preconditioner
    T, Q = int_rows(0, 23, 4), int_rows(1, 6, 4)
    ident = di.Preconditioner.fit(T, "identity")
    for largest in (True, False):
        idx, val = distributed.top_k(Q, T, ident, 7, largest=largest, timeout=60)
        saved[f"tie_idx_{largest}"], saved[f"tie_val_{largest}"] = idx.numpy(), val.numpy()
    np.savez(out / f"rank{rank}.npz", **saved)
    return {}


def _job_featurise(rank: int, out: Path, store: str, hang_rank: int | None = None) -> dict:
    hang_at = HANG_AT if rank == hang_rank else None
    featurise(Path(store), hang_at=hang_at, timeout=4 if hang_rank is not None else 60)
    return {}


def _job_mismatch(rank: int, out: Path, store: str) -> dict:
    task = make_task()
    with torch.no_grad():
        task.model[0].bias.add_(rank)  # rank 1's model differs
    distributed.gradients(
        task, make_loader(Data(), False), comp(), path=store, progress=False, timeout=60
    )
    return {}


_JOBS = {"all": _job_all, "featurise": _job_featurise, "mismatch": _job_mismatch}


def launch(world: int, job: str, out: Path, wait_for: int | None = None, **args) -> list[dict]:
    """Run ``job`` in ``world`` spawned processes (torchrun's environment, a free port); return
    each rank's result. ``wait_for``: return once that rank reported, killing the others."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out.mkdir(parents=True, exist_ok=True)
    ctx = torch.multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, str(out), job, args))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    try:
        deadline = time.monotonic() + 120  # a guard for a broken test, not a timing
        waiting = procs if wait_for is None else [procs[wait_for]]
        for p in waiting:
            p.join(max(1.0, deadline - time.monotonic()))
            assert p.exitcode is not None, "a rank did not finish: the test hangs"
            assert p.exitcode == 0, f"a rank exited with {p.exitcode} (aborted at exit?)"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    ranks = range(world) if wait_for is None else [wait_for]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in ranks]


def ok(results: list[dict]) -> list[dict]:
    for r in results:
        assert "error" not in r, r.get("traceback")
    return results


# ----------------------------------------------------------------------------- the tests


def test_two_ranks_equal_one_process(tmp_path):
    """Store bytes, fit, scores, self-influence and top-k (exact ties included) of 2 ranks equal
    those of one process (a seeded shuffling loader: rows placed by dataset index)."""
    ok(launch(2, "all", tmp_path / "out", store=str(tmp_path / "dist"), shuffle=True))
    G = reference(tmp_path / "one", shuffle=True)
    assert files(tmp_path / "dist") == files(tmp_path / "one")
    assert sorted(files(tmp_path / "one")) == [
        "grads.bin",
        "indices.bin",
        "losses.bin",
        "manifest.json",
        "order.npy",
    ]
    r0, r1 = (np.load(tmp_path / "out" / f"rank{r}.npz") for r in (0, 1))
    for name in r0.files:  # every rank holds the same result
        np.testing.assert_array_equal(r0[name], r1[name], err_msg=name)
    for solver in ("dense", "kernel"):
        pre = di.Preconditioner.fit(G, "fisher", damping=1e-2, solver=solver)
        assert pre.info["solver"] == solver
        S = di.scores(G[:9], G, pre).numpy()
        # float64 sums in another order, rounded to float32: at most an ulp of float32 apart
        scale = np.abs(S).max()
        np.testing.assert_allclose(r0[f"{solver}_scores"], S, rtol=2.4e-7, atol=1e-12 * scale)
        np.testing.assert_allclose(r0[f"{solver}_lam"], pre.lam, rtol=1e-12)
        s = di.self_influence(G, pre).numpy()
        np.testing.assert_allclose(r0[f"{solver}_self"], s, rtol=2.4e-7, atol=1e-12 * scale)
        idx, val = di.top_k(G[:9], G, pre, 5, block_train=7)
        np.testing.assert_array_equal(r0[f"{solver}_idx"], idx.numpy())
        np.testing.assert_allclose(r0[f"{solver}_val"], val.numpy(), rtol=2.4e-7)
        # top-k is the k best columns of the full score matrix
        np.testing.assert_array_equal(idx.numpy(), np.argsort(-S, 1, kind="stable")[:, :5])
    T, Q = int_rows(0, 23, 4), int_rows(1, 6, 4)
    S = (Q @ T.T).numpy()
    for largest in (True, False):
        want = np.argsort(-S if largest else S, 1, kind="stable")[:, :7]  # ties: lower index
        assert (np.diff(np.sort(S, 1), axis=1) == 0).any()  # there are ties to break
        np.testing.assert_array_equal(r0[f"tie_idx_{largest}"], want)
        np.testing.assert_array_equal(r0[f"tie_val_{largest}"], np.take_along_axis(S, want, 1))
        idx, _ = di.top_k(Q, T, di.Preconditioner.fit(T, "identity"), 7, largest, block_train=5)
        np.testing.assert_array_equal(idx.numpy(), want)


def test_hung_rank_times_out_then_resumes_with_three_or_one(tmp_path):
    """Rank 1 of 2 hangs after its first chunk: rank 0 raises DistributedError after the 4 s
    timeout; rank 1 is killed. The store then resumes from every complete chunk with 3
    processes (the ranks whose chunks are all stored compute nothing), and with 1, to the
    single-process bytes."""
    store = tmp_path / "dist"
    (r0,) = launch(2, "featurise", tmp_path / "out", wait_for=0, store=str(store), hang_rank=1)
    assert r0["error_type"] == "DistributedError", r0
    assert "within timeout=4 s" in r0["error"] and "rank 0 of 2" in r0["error"]
    recs = [json.loads(f.read_text()) for f in (store / "ranks").glob("*.json")]
    assert sorted(rec["chunk"] for f in recs for rec in f) == [0, 1, 2]
    assert json.loads((store / "manifest.json").read_text())["gradients"]["status"] != "complete"
    with pytest.raises(ValueError, match="unfinished run of several processes"):
        reference(store)
    shutil.copytree(store, tmp_path / "again")

    calls = [r["calls"] for r in ok(launch(3, "featurise", tmp_path / "out3", store=str(store)))]
    # chunks of rank 0 ([0]) and rank 1 ([1, 2]) of 3 are stored; rank 2's (3, 4) are not
    assert calls[:2] == [0, 0] and calls[2] == 4  # 4 batches: 2 per chunk
    reference(tmp_path / "one")
    assert files(store) == files(tmp_path / "one")

    with pytest.raises(ValueError, match="chunk_size=9"):  # chunks of another size: refused
        distributed.gradients(
            make_task(),
            make_loader(Data(), False),
            comp(),
            path=tmp_path / "again",
            chunk_size=9,
            progress=False,
            check=False,
        )
    _CALLS[0] = 0
    featurise(tmp_path / "again")  # one process, no process group
    assert _CALLS[0] == 4  # chunks 3 and 4
    assert files(tmp_path / "again") == files(tmp_path / "one")


def test_ranks_must_agree(tmp_path):
    """Ranks with different models are refused on every rank, naming the field."""
    results = launch(2, "mismatch", tmp_path / "out", store=str(tmp_path / "s"))
    for r in results:
        assert r["error_type"] == "ValueError"
        assert "different model" in r["error"] and "seed the model" in r["error"]
    assert not (tmp_path / "s").exists()


def test_refusals_in_one_process(tmp_path):
    class Stream(IterableDataset):
        def __iter__(self):
            yield from zip(torch.randn(8, 5), torch.randint(0, 3, (8,)))

    with pytest.raises(TypeError, match="iterable-only"):
        distributed.gradients(
            make_task(), DataLoader(Stream(), batch_size=4), comp(), path=tmp_path / "s"
        )
    with pytest.raises(TypeError, match="map-style"):
        distributed.gradients(make_task(), [1, 2], comp(), path=tmp_path / "s")
    with pytest.raises(ValueError, match="path=None"):
        distributed.gradients(make_task(), make_loader(Data(), False), comp(), path=None)
    with pytest.raises(ValueError, match="timeout=0"):
        featurise(tmp_path / "s", timeout=0)


def test_plan_is_the_single_process_chunking():
    """Chunks close once they hold chunk_size rows (whole batches), the last takes the rest."""
    assert distributed._plan([4] * 9 + [1], 6) == [
        (0, 2, 0, 8),
        (2, 4, 8, 16),
        (4, 6, 16, 24),
        (6, 8, 24, 32),
        (8, 10, 32, 37),
    ]
    assert distributed._plan([3, 3, 3], 3) == [(0, 1, 0, 3), (1, 2, 3, 6), (2, 3, 6, 9)]
    assert distributed._plan([2, 2], 100) == [(0, 2, 0, 4)]


# ----------------------------------------------------------------------------- the command line

CLI_TASK = """
import torch
from torch import nn
from torch.utils.data import TensorDataset

import dropinf as di
from dropinf import losses


def make(split="train", n=30):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    x, y = torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)
    return di.Task(model, losses.cross_entropy), TensorDataset(x, y)
"""


def torchrun(n: int, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={n}", "-m", "dropinf", *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_command_line_under_torchrun(tmp_path, capsys):
    """featurise (2 processes, and 1) and score (2 processes; 1) from the command line equal the
    library in one process."""
    (tmp_path / "cli_task.py").write_text(CLI_TASK)
    sys.path.insert(0, str(tmp_path))
    try:
        from cli_task import make
    finally:
        sys.path.remove(str(tmp_path))
    G = {}
    for split in ("train", "test"):
        task, data = make(split)
        G[split] = di.gradients(
            task,
            DataLoader(data, batch_size=4),
            di.Dropout(p=0.5, seed=0),
            path=tmp_path / f"one-{split}",
            chunk_size=8,
            progress=False,
        )

    feat = ["--task", f"{tmp_path / 'cli_task.py'}:make", "--compressor", "dropout"]
    feat += ["--compressor-arg", "p=0.5", "--compressor-arg", "seed=0", "--batch-size", "4"]
    feat += ["--chunk-size", "8", "--no-progress"]
    torchrun(2, "featurise", *feat, "--arg", "split=train", "--out", str(tmp_path / "train"))
    test = ["featurise", *feat, "--arg", "split=test", "--out", str(tmp_path / "test")]
    assert cli.main(test) == 0
    for split in ("train", "test"):
        assert files(tmp_path / split) == files(tmp_path / f"one-{split}"), split

    stores = ["--train", str(tmp_path / "train"), "--test", str(tmp_path / "test")]
    torchrun(2, "score", *stores, "--top-k", "4", "--self-influence", "--damping", "1e-2")
    assert cli.main(["score", *stores, "--name", "all", "--damping", "1e-2"]) == 0
    pre = di.Preconditioner.fit(G["train"], "fisher", damping=1e-2)
    store = di.Store(tmp_path / "train")
    S = di.scores(G["test"], G["train"], pre)
    scale = float(S.abs().max())
    torch.testing.assert_close(store.load_scores("all"), S, rtol=2.4e-7, atol=1e-12 * scale)
    idx, val = di.top_k(G["test"], G["train"], pre, 4)
    assert torch.equal(store.load_scores("scores.top4.indices"), idx)
    torch.testing.assert_close(store.load_scores("scores.top4.values"), val, rtol=2.4e-7, atol=0)
    s = di.self_influence(G["train"], pre)
    torch.testing.assert_close(store.load_scores("scores.self"), s, rtol=2.4e-7, atol=0)
    meta = store.manifest["scores"]["scores.top4.indices"]["meta"]
    assert meta["test"] == str(tmp_path / "test") and meta["top_k"] == 4

    capsys.readouterr()
    assert cli.main(["featurise", *feat, "--device", "cuda", "--out", str(tmp_path / "c")]) == 1
    if not torch.cuda.is_available():
        assert "no CUDA device" in capsys.readouterr().err
