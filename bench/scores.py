"""Influence-scoring throughput and memory from a memory-mapped store, against a bare matmul.

Run from the repository root::

    .venv/bin/python bench/scores.py                         # n_train 200k, n_test 1k, k 4096
    .venv/bin/python bench/scores.py --n-train 20000 --k 1024 --repeats 1    # a quick look

Scoring ``n_test`` test rows against ``n_train`` training rows of dimension k is one
(n_test, k) x (k, n_train) product: its limit is a bare ``torch.matmul`` of those shapes, timed in
the same run. The driver writes ``n_train`` standard normal rows (seeded) to a store under
``bench/out/`` with the store's writer API (``Store.write_gradients`` / ``write_chunk``, chunks of
``--chunk`` rows; float32: 3.3 GB at full size), fits a ``fisher`` preconditioner on the first
``--fit-rows`` rows and saves it to the store. Then one fresh subprocess times, in interleaved
rounds (so that load from other processes hits every method alike):

- ``matmul (RAM)``: ``torch.matmul(Q, G.T)`` with G a copy of the rows in RAM: the limit.
- ``matmul (mmap)``: the same product straight from the memory-mapped rows (``G.data.T``).
- ``scores identity`` / ``scores fisher``: ``dropinf.scores(Q, G, pre, block_test, block_train)``
  with G from ``dropinf.Gradients.load`` (memory-mapped) and the preconditioner loaded from the
  store.

``--warmup`` untimed rounds come first (they also bring the file into the page cache, where it
stays if memory allows), then ``--repeats`` timed rounds: median and min per method. Memory, per
call in the timed rounds (the largest): ``peak MB`` is the resident set's high-water mark above
the resident set just before the call (VmHWM - VmRSS, reset through ``/proc/self/clear_refs``);
``anon MB`` is the peak of anonymous memory above its value before the call (RssAnon sampled every
10 ms): what the call allocated. Both include the output, n_test x n_train float32 (0.8 GB at full
size). Buffers this large are mapped and unmapped by the allocator, so calls do not inherit each
other's memory. The mapping's file pages (page cache, reclaimable, shared with other processes)
become resident in the first round and are reported once. The store is deleted at the end unless
``--keep``.

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from dropinf.study.experiments.measure import OtherLoad, proc_status_kb, reset_peak

METHODS = ("matmul (RAM)", "matmul (mmap)", "scores identity", "scores fisher")
OUT = Path(__file__).resolve().parent / "out"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-train", type=int, default=200_000)
    ap.add_argument("--n-test", type=int, default=1_000)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    ap.add_argument("--chunk", type=int, default=8192, help="rows per store chunk")
    ap.add_argument("--block-test", type=int, default=1024, help="dropinf.scores block_test")
    ap.add_argument("--block-train", type=int, default=65536, help="dropinf.scores block_train")
    ap.add_argument("--fit-rows", type=int, default=8192, help="rows the fisher fit sees")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--store", type=Path, default=OUT / "scores_store")
    ap.add_argument("--keep", action="store_true", help="keep the store afterwards")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------- the store


def write_store(args: argparse.Namespace) -> dict:
    """Synthetic N(0, 1) rows through the store's writer; returns timings."""
    import torch

    import dropinf as di
    from dropinf.store import Store

    store = Store(args.store)
    store.clear()
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    w = store.write_gradients(
        compressor=json.dumps({"kind": "synthetic", "law": "normal", "seed": args.seed}),
        model="none",
        loss="none",
        param_names=["synthetic"],
        k=args.k,
        dtype=args.dtype,
    )
    gen_s = 0.0
    for a in range(0, args.n_train, args.chunk):
        m = min(args.chunk, args.n_train - a)
        t = time.perf_counter()
        rows = torch.randn(m, args.k, generator=gen)
        gen_s += time.perf_counter() - t
        idx = torch.arange(a, a + m)
        w.write_chunk(idx, rows, torch.zeros(m), data_hash=f"synthetic rows {a}..{a + m - 1}")
    w.finish()
    write_s = time.perf_counter() - t0 - gen_s
    t = time.perf_counter()
    G = di.Gradients.load(args.store, verify=True)
    verify_s = time.perf_counter() - t
    t = time.perf_counter()
    pre = di.Preconditioner.fit(G.data[: args.fit_rows], kind="fisher", damping=1e-3)
    fit_s = time.perf_counter() - t
    store.save_preconditioner(pre, "fisher")
    nbytes = (args.store / "grads.bin").stat().st_size
    return {"bytes": nbytes, "write_s": write_s, "verify_s": verify_s, "fit_s": fit_s}


# ----------------------------------------------------------------------------- worker


class AnonPeak:
    """Samples RssAnon (kB) in a thread; ``peak`` is the largest value seen."""

    def __init__(self, every: float = 0.01):
        self.every, self.peak, self._stop = every, proc_status_kb("RssAnon"), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, proc_status_kb("RssAnon"))

    def __enter__(self) -> AnonPeak:
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, proc_status_kb("RssAnon"))


def worker(args: argparse.Namespace) -> dict:
    import gc

    import torch

    import dropinf as di

    G = di.Gradients.load(args.store, verify=False)
    gen = torch.Generator().manual_seed(args.seed + 1)
    Q = torch.randn(args.n_test, args.k, generator=gen).to(G.data.dtype)
    Qf = Q.float()
    file0 = proc_status_kb("RssFile")
    steps = {}
    if "matmul (RAM)" in args.methods:
        G_ram = G.data.to(torch.float32, copy=True)
        steps["matmul (RAM)"] = lambda: torch.matmul(Qf, G_ram.T)
    if "matmul (mmap)" in args.methods:
        steps["matmul (mmap)"] = lambda: torch.matmul(Qf, G.data.T.float())
    pres = {"identity": di.Preconditioner.fit(G.data[:1], kind="identity"),
            "fisher": di.Store(args.store).load_preconditioner("fisher")}
    for kind, pre in pres.items():
        if f"scores {kind}" in args.methods:
            steps[f"scores {kind}"] = lambda pre=pre: di.scores(
                Q, G, pre, block_test=args.block_test, block_train=args.block_train
            )
    res = {m: {"times": [], "peak_mb": 0.0, "anon_mb": 0.0} for m in steps}
    exact = reset_peak()
    for r in range(args.warmup + args.repeats):
        for m, step in steps.items():
            gc.collect()
            rss0, anon0 = proc_status_kb("VmRSS"), proc_status_kb("RssAnon")
            reset_peak()
            with AnonPeak() as anon:
                t0 = time.perf_counter()
                out = step()
                dt = time.perf_counter() - t0
            assert out.shape == (args.n_test, args.n_train)
            del out
            if r == 0:
                file_mb = (proc_status_kb("RssFile") - file0) / 1024
            if r >= args.warmup:
                peak = (proc_status_kb("VmHWM") - rss0) / 1024 if exact else float("nan")
                res[m]["times"].append(dt)
                res[m]["peak_mb"] = max(res[m]["peak_mb"], peak)
                res[m]["anon_mb"] = max(res[m]["anon_mb"], (anon.peak - anon0) / 1024)
    return {"methods": res, "file_mb": file_mb, "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------- driver


def run_worker(argv: list[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"worker failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    t_start, load = time.perf_counter(), OtherLoad(min_wall=0.0, children=True).start()
    try:
        w = write_store(args)
        res = run_worker(argv)
    finally:
        if not args.keep:
            shutil.rmtree(args.store, ignore_errors=True)
    flop = 2 * args.n_test * args.n_train * args.k
    gb = w["bytes"] / 1e9
    results, threads = res["methods"], res["threads"]
    print(
        f"scores: n_test {args.n_test:,} x n_train {args.n_train:,}, k {args.k}, store dtype "
        f"{args.dtype} ({gb:.2f} GB), block_test {args.block_test}, block_train "
        f"{args.block_train}; torch threads {threads}; {args.warmup} warm-up + {args.repeats} "
        "timed rounds over all rows (interleaved, one fresh process)"
    )
    print(
        f"store: written at {gb / w['write_s']:.2f} GB/s (sha256 and fsync per {args.chunk}-row "
        f"chunk, excluding row generation), opened and verified at {gb / w['verify_s']:.2f} GB/s; "
        f"fisher fit on {min(args.fit_rows, args.n_train):,} rows in {w['fit_s']:.1f} s"
    )
    head = (f"{'method':<16} {'s':>7} {'min s':>7} {'GFLOP/s':>8} {'x matmul':>9} "
            f"{'peak MB':>8} {'anon MB':>8}")
    print()
    print(head)
    print("-" * len(head))
    limit = results.get("matmul (RAM)", {}).get("times")
    for m, r in results.items():
        t = statistics.median(r["times"])
        # paired by round: both calls of a round saw about the same load from other processes
        ratio = statistics.median(a / b for a, b in zip(r["times"], limit)) if limit else None
        print(
            f"{m:<16} {t:7.2f} {min(r['times']):7.2f} {flop / t / 1e9:8.1f} "
            f"{ratio or float('nan'):9.2f} {r['peak_mb']:8.0f} {r['anon_mb']:8.0f}"
        )
    out_mb = args.n_test * args.n_train * 4 / 2**20
    print(
        f"\noutput alone: {out_mb:.0f} MB; x matmul: median over rounds of time / matmul (RAM) "
        f"time in the same round (1 = the limit); file pages of the store mapped by the worker "
        f"(RAM copy and first round): {res['file_mb']:.0f} MB (page cache, not in the columns)"
    )
    load.stop()
    print(
        f"total wall time {time.perf_counter() - t_start:.0f} s; other processes used "
        f"{load.cpus:.2f} of {os.cpu_count()} CPUs on average meanwhile (/proc/stat minus this "
        "benchmark's CPU time)"
    )
    if load.cpus > 0.25:
        print("WARNING: other processes competed for the CPUs; rerun on a quiet machine")


if __name__ == "__main__":
    main()
