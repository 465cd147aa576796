"""Featurisation throughput with one process and with two (dropinf.distributed, gloo on the CPU).

Run from the repository root::

    .venv/bin/python bench/distributed.py                 # defaults, about a minute on 2 cores
    .venv/bin/python bench/distributed.py --n 8192 --repeats 5 --threads 2

The same featurisation (an MLP 784-``--width``-``--width``-10 with biases, cross-entropy, on ``--n``
seeded N(0, 1) inputs with random labels, batches of ``--batch-size`` from a map-style data set,
``dropinf.Dropout(p=0.9, factored=True, seed=0)``, a store of float32 rows, chunks of
``--chunk-size``, the self-check on) runs as:

- ``1 process``: ``dropinf.gradients`` in one process with ``--threads`` torch threads (2 by
  default: the whole of this machine), the baseline;
- ``N processes``: ``dropinf.distributed.gradients`` in ``--procs`` processes (2) with
  ``--threads / --procs`` threads each, so both use the same number of cores;
- ``1 process x 1 thread``: the baseline's code on one thread, for reference (on a loaded
  machine, several threads of one process can lose more to waiting for each other than they
  gain).

Each process is started fresh (spawn, torchrun's environment variables, a free port) and builds
the model and data before the clock starts; the time is rank 0's, from a barrier before the call
to its return (which, with several processes, includes the final gather and rank 0's manifest):
it leaves out process start and imports, which a long featurisation amortises. The
configurations alternate for ``--repeats`` rounds (so a change of the machine's load hits both
alike); reported: the median time, samples per second, and the throughput of N processes as a
ratio to one process's, measured in this run. The stores of both are compared byte for byte.
The CPUs' busy share over each launch (``/proc/stat``) hints at other load: with 2 cores and
nothing else running, it stays near 100% only while the run itself computes.
Times vary with the machine's load: run it on an idle machine, and say when it was not. On a
loaded machine, set ``OMP_WAIT_POLICY=PASSIVE``: otherwise the threads of the 2-thread process
spin while waiting for each other and the baseline slows by several times.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset


class Inputs(Dataset):
    def __init__(self, n: int):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def _worker(rank: int, world: int, port: int, threads: int, a: dict, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(threads)
    import dropinf as di
    from dropinf import distributed, losses

    torch.manual_seed(0)
    w = a["width"]
    model = nn.Sequential(
        nn.Linear(784, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, 10)
    )
    task = di.Task(model.eval(), losses.cross_entropy)
    loader = DataLoader(Inputs(a["n"]), batch_size=a["batch_size"])
    comp = di.Dropout(p=0.9, factored=True, seed=0)
    kw = dict(chunk_size=a["chunk_size"], progress=False)
    # warm-up on two batches (process group, allocator, code paths), then the timed run
    warm = DataLoader(Subset(loader.dataset, range(2 * a["batch_size"])), a["batch_size"])
    featurise = distributed.gradients if world > 1 else di.gradients
    featurise(task, warm, comp, path=a["store"] + "-warm", **kw)
    if world > 1:
        distributed._Comm(distributed.TIMEOUT).gather(None, "the start")
    t = time.perf_counter()
    featurise(task, loader, comp, path=a["store"], **kw)
    if rank == 0:
        Path(out).write_text(json.dumps({"seconds": time.perf_counter() - t}))


def run(world: int, threads: int, a: dict) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = torch.multiprocessing.get_context("spawn")
    out = Path(a["tmp"]) / "result.json"
    out.unlink(missing_ok=True)
    ps = [
        ctx.Process(target=_worker, args=(r, world, port, threads, a, str(out)))
        for r in range(world)
    ]
    for p in ps:
        p.start()
    for p in ps:
        p.join()
    if any(p.exitcode for p in ps):
        raise SystemExit(f"a process of the {world}-process run failed: {[p.exitcode for p in ps]}")
    return json.loads(out.read_text())["seconds"]


def _cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs, from /proc/stat (Linux)."""
    f = open("/proc/stat").readline().split()[1:]
    v = [float(x) for x in f]
    return sum(v) - v[3] - v[4], sum(v)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=8192, help="samples")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch threads in all, per config")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if args.threads % args.procs:
        raise SystemExit(f"--threads {args.threads} must be a multiple of --procs {args.procs}")
    tmp = tempfile.mkdtemp(prefix="dropinf-bench-")
    a = {**vars(args), "tmp": tmp}
    configs = [(1, args.threads), (args.procs, args.threads // args.procs), (1, 1)]
    times: dict[tuple[int, int], list[float]] = {c: [] for c in configs}
    stores = {}
    try:
        for i in range(args.repeats):
            for world, threads in configs if i % 2 == 0 else configs[::-1]:
                a["store"] = stores[world] = os.path.join(tmp, f"store{world}")
                for d in (a["store"], a["store"] + "-warm"):  # a fresh store: no resume
                    shutil.rmtree(d, ignore_errors=True)
                busy0, all0 = _cpu_times()
                t = run(world, threads, a)
                busy1, all1 = _cpu_times()
                times[world, threads].append(t)
                busy = 100 * (busy1 - busy0) / max(all1 - all0, 1)
                print(
                    f"round {i}: {world} process(es) x {threads} thread(s): {t:.2f} s timed "
                    f"(all CPUs {busy:.0f}% busy over the launch, its own processes included)"
                )
        same = all(
            (Path(stores[1]) / f).read_bytes() == (Path(stores[args.procs]) / f).read_bytes()
            for f in ("manifest.json", "order.npy", "grads.bin", "indices.bin", "losses.bin")
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {c: statistics.median(t) for c, t in times.items()}
    print(f"\n{args.n} samples, MLP 784-{args.width}-{args.width}-10, batch {args.batch_size}, "
          f"Dropout(p=0.9, factored=True), median of {args.repeats} rounds")  # fmt: skip
    base = med[configs[0]]
    for (world, threads), t in med.items():
        print(
            f"  {world} process(es) x {threads} thread(s): {t:7.2f} s {args.n / t:8.0f} "
            f"samples/s, throughput {base / t:5.2f}x that of 1 process x {args.threads} threads"
        )
    print(f"  stores byte-identical: {same}")


if __name__ == "__main__":
    main()
