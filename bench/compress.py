"""Cost of the compression step, on GPT-2-small-shaped linear layers, at matched dimension.

Run from the repository root::

    .venv/bin/python bench/compress.py                   # defaults, about 20-40 s on 2 idle cores
    .venv/bin/python bench/compress.py --p 0.99          # k = 312: the dense Gaussian fits in 4 GB
    .venv/bin/python bench/compress.py --threads 1 --methods dropout_factored gaussian_factored
    .venv/bin/python bench/compress.py --device cuda     # on a GPU (peak: CUDA allocator)

Two stages (``--stage``):

- ``factors`` (default): no model and no backward pass. Two linear layers with bias, shaped like
  one GPT-2-small block, ``attn.proj`` (768 in, 768 out) and ``mlp.fc`` (768 in, 3072 out),
  d = 2,952,960 parameters, get random inputs ``x`` (B, T, n_in) and output gradients ``delta``
  (B, T, n_out) (default B = 8 samples of T = 512 tokens). Timed: what the library does to them,
  i.e. the compressor's capture-time reducers (factored dropout gathers the kept units of each
  factor, factored Gaussian projects each factor; see ``Compressor.reducers``) followed by
  ``comp.compress``. Before each timed call the worker writes ``--evict-mb`` MB of another
  buffer (untimed; default 512, more than this machine's last-level cache), so the factors are
  read from main memory, as in a pipeline whose batch does not fit in the cache: the worst case
  for the gathers, which are memory-bound, and nearly no change for the projections, which are
  compute-bound. ``--evict-mb 0`` times warm repeated calls on the same factors instead.
- ``pipeline``: the same two layers as a model whose per-sample loss is ``sum_t <y_t, r_t>``,
  so the output gradients are random too. Timed per batch: forward, backward with the capture
  hooks and compression, where the reducers run inside the hooks while the factors are fresh;
  minus the same forward and backward capturing the full factors without compressing (the
  baseline, measured in the same subprocess, alternating with the timed step: the median of
  the paired differences is reported, and the difference of the minima as "min ms"). Read
  them on an idle machine.

``comp.bind(layout)`` (drawing the masks or projections) is timed once, separately, and so is
PCA's fit. Median and minimum over at least ``--repeats`` calls and at least ``--min-time``
seconds, after ``--warmup`` calls; torch uses its default thread count unless ``--threads``.

Methods (``dropinf.study.experiments.methods``), all at the output dimension k of factored
dropout at rate p (k = sum over the layers of ``round((1-p) n_out) * round((1-p) (n_in + 1))``,
about (1-p)^2 d):

- ``dropout_factored``: ``Dropout(p, factored=True)``, ``delta[S_out]^T x[S_in]`` per layer.
- ``gaussian_factored``: ``Gaussian(factored=True, p=p)`` (LoGra), the same k by construction.
- ``gaussian``: ``Gaussian(k=k)``, a stored (k, d) matrix; run only if it fits in
  ``--budget-gb``, otherwise reported as not fitting, with the bytes it would need.
- ``sjlt``: ``SJLT(k=k, c)``, c the largest divisor of k up to ``--sjlt-c``.
- ``pca``: ``PCA(k=k)`` fitted on random (n_fit, d) data (n_fit = max(k, --pca-n-fit)); run only
  if the fit (data, its fp64 copy, the SVD factor) and the (k, d) components fit in the budget.
- ``dropout``: ``Dropout(1 - k/d)``, flat dropout keeping k of the d coordinates, for
  reference.
- ``dropout_factored_b<B>`` (with ``--block B > 1``, default 16): ``Dropout(p, factored=True,
  block=B)``, which keeps or drops units in aligned blocks of B, so its gathers copy whole
  cache lines (16 fp32 units are 64 bytes), where a gather of single units at rate p touches a
  fraction 1 - p^16 of each factor's lines (81% at p = 0.9, 15% at p = 0.99).
  A different estimator with a larger variance (see ``dropinf.theory``); its dimension is not
  exactly k (it keeps ``round((1-p) n / B)`` blocks per side), and the bench reports it.
- ``dropout_imp`` and ``dropout_factored_imp`` (importance dropout, flat and factored; unless
  ``--no-importance``): the method table's entries (``pilot=True``), fitted by
  ``methods.fit_pilot`` on the full per-sample gradients of a pilot batch (the timed batch's
  factors; ``Dropout.fit_grads``), then the same gathers with per-entry scales
  ``1/sqrt(pi_out pi_in)`` (factored) or per coordinate (flat); dimension k. The fit (per-sample
  layer gradients of the pilot batch, squared and summed per unit or coordinate; allocation) is
  timed once and reported apart from ms/batch. The random factors make the probabilities nearly
  uniform: the rows time the methods, not their accuracy. The issue's targets for the factored
  one: compression step at most 1.2x factored dropout's, stored probabilities at least 100x
  smaller than factored Gaussian's map.

The flat methods (dense Gaussian, SJLT, PCA, flat dropout) ask for each parameter's full (B, numel)
per-sample gradient (``BatchGrads.param_grad``, a ``bmm`` over tokens): that is part of their cost
and is included, since without factors there is nothing else to compress (as the library computes
it, whatever that costs). The factored methods never form it.

Each method runs in a fresh subprocess (no shared allocator state). Peak memory: the subprocess
builds the inputs and binds the compressor, resets the kernel's resident-set high-water mark
(``/proc/self/clear_refs``) and reports ``VmHWM - VmRSS`` over the warm-up and timed calls: the
peak resident memory above what was resident just before (process RSS, so allocator slack is
included). ``map B`` is ``comp.map_bytes``, the map that must be stored because it cannot be
regenerated from the seed; ``held B`` is what the bound compressor keeps in memory in tensors
(masks, hashes, projections), regenerable or not. ``other%`` is the share of the machine's CPU time
that other processes used while a row was timed (``/proc/stat`` busy time minus this process's):
on a shared machine the small multi-threaded ops of factored dropout slow down by up to 10x when
another process competes for the cores, so rows with more than a few percent are not to be trusted
(a warning is printed above 10%).

Not part of the test suite: it prints a table and whether the issue's targets are met (factored
dropout at least 10x faster than factored Gaussian, and at least 100x less stored map).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings

from dropinf.study.experiments import methods
from dropinf.study.experiments.measure import (
    OtherLoad,
    compression_step,
    proc_status_kb,
    reset_peak,
    sync,
    time_calls,
)

METHODS = methods.compared()
LAYERS = (("attn.proj", 768, 768), ("mlp.fc", 768, 3072))  # (module, n_in, n_out)
SPEED_TARGET = 10.0  # factored Gaussian time / factored dropout time, from the issue
IMPORTANCE = "dropout_factored_imp"  # the row issue 15's targets are checked on
IMP_SPEED_TARGET = 1.2  # importance dropout time / factored dropout time, at most (issue 15)
MAP_TARGET = 100.0  # factored Gaussian stored map / factored dropout stored map
BUSY = 0.10  # warn when other processes used more than this share of the CPUs during a row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--p", type=float, default=0.9, help="dropout rate per side (fraction dropped)")
    ap.add_argument("--tokens", type=int, default=512, help="tokens per sample (T)")
    ap.add_argument("--batch", type=int, default=8, help="samples per batch (B)")
    ap.add_argument("--repeats", type=int, default=10, help="timed calls per method (median)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls per method first")
    ap.add_argument(
        "--min-time", type=float, default=1.0, help="keep timing until this many seconds"
    )
    ap.add_argument(
        "--evict-mb",
        type=int,
        default=512,
        help="factors stage: MB written before each timed call to evict the caches (0: warm)",
    )
    ap.add_argument("--budget-gb", type=float, default=4.0, help="memory budget for stored maps")
    ap.add_argument("--sjlt-c", type=int, default=1, help="SJLT nonzeros per column")
    ap.add_argument("--pca-n-fit", type=int, default=256, help="PCA fit rows (at least k)")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument(
        "--stage",
        choices=("factors", "pipeline"),
        default="factors",
        help="factors: compression from captured factors alone; pipeline: the marginal cost of "
        "compression inside forward + backward with the capture hooks",
    )
    ap.add_argument(
        "--block",
        type=int,
        default=16,
        help="also time factored dropout with mask blocks of this many units (1: skip that row)",
    )
    ap.add_argument(
        "--no-importance", action="store_true", help="skip the importance dropout row"
    )
    ap.add_argument("--device", default="cpu", help="cpu or cuda (factors, model and maps there)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------- inputs


def layout():
    """The hand-built layout of the two layers (nn.Linear storage: weight is (n_out, n_in))."""
    from dropinf.compressors import Layout
    from dropinf.plan import FactorSpec
    from dropinf.task import ParamInfo

    params, specs, off = [], [], 0
    for name, n_in, n_out in LAYERS:
        w, b = f"{name}.weight", f"{name}.bias"
        params.append(ParamInfo(w, (n_out, n_in), off))
        off += n_out * n_in
        params.append(ParamInfo(b, (n_out,), off))
        off += n_out
        specs.append(FactorSpec(name, w, b, n_in, n_out))
    return Layout(params=tuple(params), factored=tuple(specs))


def batch(lay, args: argparse.Namespace):
    """BatchGrads of random factors, deterministic in ``args.seed``."""
    import torch

    from dropinf.blocks import BatchGrads, LinearFactors

    gen = torch.Generator().manual_seed(args.seed + 1)
    B, T = args.batch, args.tokens
    blocks = []
    for s in lay.factored:
        x = torch.randn(B, T, s.n_in, generator=gen).to(args.device)
        delta = torch.randn(B, T, s.n_out, generator=gen).to(args.device)
        blocks.append(LinearFactors(s.module, x, delta, s.weight, s.bias, rows=slice(0, s.n_out)))
    return BatchGrads(params=list(lay.params), blocks=blocks, size=B)


def block_row(args: argparse.Namespace) -> list[str]:
    """The block-mask row's name, if it is timed."""
    return [f"dropout_factored_b{args.block}"] if args.block > 1 else []


def pca_rows(k: int, args: argparse.Namespace) -> int:
    """Rows of random data PCA is fitted on: at least k, so that k directions exist."""
    return max(k, args.pca_n_fit)


def needs(method: str, k: int, d: int, args: argparse.Namespace) -> tuple[int, str]:
    """Bytes a method must hold beyond the inputs (``MethodSpec.need_bytes``) for the two that can
    run out of memory, and what they are (0 for the others)."""
    n = pca_rows(k, args)
    what = {
        "gaussian": f"the ({k:,}, {d:,}) fp32 projection",
        "pca": f"the ({k:,}, {d:,}) fp32 components plus the fit on ({n:,}, {d:,}) gradients "
        "(fp32 data, fp64 copy, fp64 right singular vectors)",
    }
    if method not in what:
        return 0, ""
    need = methods.spec(method).need_bytes(methods.Match(1.0 - k / d, k, d), pca_n_fit=n)
    return need, what[method]


def build(method: str, lay, args: argparse.Namespace):
    """The compressor (unbound) at factored dropout's k, and the seconds spent fitting it (PCA;
    importance dropout on a pilot batch)."""
    import torch

    from dropinf.compressors import Dropout

    m = methods.match(lay, p=args.p)
    if method in block_row(args):
        return Dropout(m.p, factored=True, seed=args.seed, block=args.block), 0.0
    comp = methods.build(method, m, args.seed, sjlt_c=args.sjlt_c, pca_n_fit=pca_rows(m.k, args))
    if methods.spec(method).pilot:
        pilot = [batch(lay, args)]  # full per-sample gradients, as PerSampleGrads(task) gives
        t0 = time.perf_counter()
        methods.fit_pilot(comp, lay, pilot)
        return comp, time.perf_counter() - t0
    if method != "pca":
        return comp, 0.0
    G = torch.randn(comp.n_fit, lay.dim, generator=torch.Generator().manual_seed(args.seed + 2))
    t0 = time.perf_counter()
    comp.fit(G)
    return comp, time.perf_counter() - t0


def held_bytes(obj, seen: set[int] | None = None) -> int:
    """Bytes of the tensors an object keeps (attributes, dicts, tuples, lists, nested objects)."""
    import torch

    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(held_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(held_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith("dropinf.compressors"):
        # the layout is the model's; _on_device holds the accelerator copies of the maps
        skip = ("layout", "_on_device")
        return sum(held_bytes(v, seen) for k, v in vars(obj).items() if k not in skip)
    return 0


# ----------------------------------------------------------------------------- timed steps


class TwoLayers:
    """The two layers as a model: ``y_l = fc_l(x_l)``, per-sample loss ``sum_t <y_l, r_l>`` so
    the output gradients are fixed random tensors ``r_l`` (B, T, n_out), like ``batch``'s."""

    def __init__(self, args: argparse.Namespace):
        import torch
        from torch import nn

        gen = torch.Generator().manual_seed(args.seed + 1)
        B, T = args.batch, args.tokens
        self.model = nn.ModuleDict({n.replace(".", "_"): nn.Linear(i, o) for n, i, o in LAYERS})
        self.batch = {
            n: (
                torch.randn(B, T, m.in_features, generator=gen).to(args.device),
                torch.randn(B, T, m.out_features, generator=gen).to(args.device),
            )
            for n, m in self.model.items()
        }
        self.model.to(args.device)

    def loss(self, model, batch):
        return sum((model[n](x) * r).sum((1, 2)) for n, (x, r) in batch.items())


def in_pipeline(comp, args: argparse.Namespace):
    """Per batch: forward, backward with the capture hooks, compression (reduced at capture
    where the compressor can), and the same without compression as the baseline."""
    import dropinf
    from dropinf.persample import PerSampleGrads

    two = TwoLayers(args)
    task = dropinf.Task(two.model.eval(), two.loss)
    comp.bind(task)
    full, reduced = PerSampleGrads(task).__enter__(), PerSampleGrads(task, comp).__enter__()
    return (lambda: comp.compress(reduced(two.batch)[0])), (lambda: full(two.batch)[0])


def paired(step, baseline, args: argparse.Namespace) -> tuple[float, float, float, int]:
    """Marginal cost of ``step`` over ``baseline``, timed in alternating pairs so that a change
    in the machine's load hits both alike: (median of the paired differences, min step - min
    baseline, median baseline, pairs), in ms."""
    import torch

    dev = torch.device(args.device)
    for _ in range(args.warmup):
        baseline()
    steps, bases = [], []
    while len(steps) < max(args.repeats, 20) or sum(steps) + sum(bases) < 2 * args.min_time:
        sync(dev)
        t0 = time.perf_counter()
        baseline()
        sync(dev)
        t1 = time.perf_counter()
        step()
        sync(dev)
        bases.append(t1 - t0)
        steps.append(time.perf_counter() - t1)
    diffs = [s - b for s, b in zip(steps, bases)]
    return (
        1e3 * statistics.median(diffs),
        1e3 * (min(steps) - min(bases)),
        1e3 * statistics.median(bases),
        len(steps),
    )


def evictor(mb: int, device: str = "cpu"):
    """A call that writes ``mb`` MB on ``device`` (evicting its caches), or None for 0."""
    import torch

    if mb <= 0:
        return None
    buf = torch.zeros(mb * 2**20 // 4, device=device)
    return lambda: buf.add_(1.0)


# ----------------------------------------------------------------------------- worker


def worker(method: str, args: argparse.Namespace) -> dict:
    import torch

    warnings.simplefilter("ignore")
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    lay = layout()
    bg = batch(lay, args)
    comp, fit_s = build(method, lay, args)
    t0 = time.perf_counter()
    comp.bind(lay)
    bind_s = time.perf_counter() - t0
    if args.stage == "pipeline":
        comp, _ = build(method, lay, args)  # bound to the model's layout below (same draw)
        step, baseline = in_pipeline(comp, args)
    else:
        step, baseline = compression_step(comp, bg), None
    evict = evictor(args.evict_mb, args.device) if args.stage == "factors" else None
    if evict is not None:
        evict()  # resident before the peak is reset, so it is not counted
    # a first call makes what stays (maps copied to the device, library workspaces) before the
    # peak is reset, as it would be in a run of many batches
    z = step()
    shape, finite = tuple(z.shape), bool(torch.isfinite(z).all())
    del z
    gc.collect()
    sync(dev)
    rss0 = proc_status_kb("VmRSS")
    exact_peak = reset_peak()
    maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        alloc0 = torch.cuda.memory_allocated(dev)
    for _ in range(max(args.warmup - 1, 1)):  # the peak covers at least one untimed call
        step()
    with OtherLoad(min_wall=0.0) as load:  # other processes' share of the CPUs while we time
        if baseline is None:
            t = time_calls(step, dev, 0, args.repeats, args.min_time, evict)
            ms, ms_min, base, calls = 1e3 * t.median, 1e3 * t.min, None, t.calls
        else:
            ms, ms_min, base, calls = paired(step, baseline, args)
    if dev.type == "cuda":  # device memory: the allocator's peak above what was allocated
        peak_kb = (torch.cuda.max_memory_allocated(dev) - alloc0) / 1024
        exact_peak = True
    elif exact_peak:
        peak_kb = proc_status_kb("VmHWM") - rss0
    else:  # high-water mark could not be reset: ru_maxrss is the whole process's peak
        peak_kb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss0, 0)
    return {
        "dim": comp.dim,
        "shape": shape,
        "finite": finite,
        "ms": ms,
        "base_ms": base,
        "ms_min": ms_min,
        "calls": calls,
        "others": None if math.isnan(load.share) else load.share,
        "bind_s": bind_s,
        "fit_s": fit_s,
        "map_bytes": comp.map_bytes,
        "held_bytes": held_bytes(comp),
        "peak_mb": peak_kb / 1024,
        "exact_peak": exact_peak,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU",
        "config": comp.fingerprint,
    }


# ----------------------------------------------------------------------------- driver


def run_one(method: str, argv: list[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", method]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": last[:160]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("kB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def report_targets(name: str, df: dict, gf: dict) -> None:
    """Print the issue's two targets for one factored dropout row against factored Gaussian."""
    q = gf["ms"] / df["ms"]
    ok = "MET" if q >= SPEED_TARGET else "NOT MET"
    print(
        f"speed: factored Gaussian / {name} = {gf['ms']:.2f} / {df['ms']:.2f} ms = "
        f"{q:.1f}x (target >= {SPEED_TARGET:g}x) -> {ok}"
    )
    dm, gm = df["map_bytes"], gf["map_bytes"]
    if dm == 0:
        ok = "MET" if gm > 0 else "NOT MET"
        q_txt = "infinitely less" if gm > 0 else "no difference"
    else:
        q_txt, ok = f"{gm / dm:.0f}x less", "MET" if gm / dm >= MAP_TARGET else "NOT MET"
    print(
        f"stored map: {name} stores {fmt_bytes(dm)}; factored Gaussian stores "
        f"{fmt_bytes(gm)} ({gm:,} B): {q_txt} (target >= {MAP_TARGET:g}x) -> {ok}"
    )
    dh, gh = df["held_bytes"], gf["held_bytes"]
    print(
        f"  held in memory even so: {name} {fmt_bytes(dh)} (kept unit indices), "
        f"factored Gaussian {fmt_bytes(gh)}: {gh / max(dh, 1):.0f}x"
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return

    import torch

    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here; use --device cpu")
    t_start = time.perf_counter()
    lay = layout()
    d, k = lay.dim, methods.match(lay, p=args.p).k
    budget = int(args.budget_gb * 2**30)
    rows = [*(m for m in args.methods if not (args.no_importance and methods.spec(m).pilot)),
            *block_row(args)]
    results: dict[str, dict] = {}
    for m in rows:
        need, what = needs(m, k, d, args)
        if need > budget:
            results[m] = {"skip": f"does not fit: needs {fmt_bytes(need)} ({need:,} B) for {what}"}
        else:
            results[m] = run_one(m, list(argv))

    any_res = next((r for r in results.values() if "threads" in r), {})
    shapes = ", ".join(f"{n} {i}x{o}" for n, i, o in LAYERS)
    stage = (
        "compression step alone (capture-time reducers + compress, from the factors)"
        if args.stage == "factors"
        else "marginal cost of compression in forward + backward with the capture hooks"
    )
    print(
        f"{stage}: layers {shapes} (in x out, + bias), d = {d:,}; "
        f"B = {args.batch}, T = {args.tokens}; p = {args.p} per side -> k = {k:,} "
        f"({d / k:.0f}x compression)"
    )
    print(
        f"{args.warmup} warm-up, then >= {args.repeats} timed calls of compress(bg) and >= "
        f"{args.min_time:g} s (median; min too), torch threads {any_res.get('threads', '?')}, "
        f"{any_res.get('device', args.device)}, fp32; memory budget {args.budget_gb:g} GB; "
        + (f"caches evicted ({args.evict_mb} MB written) before each call"
           if args.stage == "factors" and args.evict_mb > 0 else "warm caches")
    )
    print(
        ("peak MB: the CUDA allocator's peak above what it held just before the calls"
         if args.device.startswith("cuda") else
         "peak MB: resident memory above the resident set just before the calls (VmHWM - VmRSS, "
         "fresh subprocess per row, includes allocator slack)")
        + "; map B: comp.map_bytes (must be "
        "stored); held B: tensors the bound compressor keeps (masks/hashes, regenerable); "
        "other%: share of the machine's CPU used by other processes while the row was timed"
    )
    head = (
        f"{'method':<20} {'dim':>8} {'ms/batch':>9} {'min ms':>8} {'x drop-f':>8} {'fit s':>7} "
        f"{'bind s':>7} "
        f"{'map B':>11} {'held B':>11} {'peak MB':>8} {'other%':>6}"
    )
    print()
    print(head)
    print("-" * len(head))
    base = results.get("dropout_factored", {}).get("ms")
    notes, busy = [], False
    for m in rows:
        r = results[m]
        if "skip" in r or "error" in r:
            print(f"{m:<20} {'-':>8} {'n/a':>9}")
            notes.append(f"{m}: {r.get('skip') or 'error: ' + r.get('error', '?')}")
            continue
        ratio = f"{r['ms'] / base:8.1f}" if base else f"{'?':>8}"
        mark = "" if r["exact_peak"] else "*"
        other = f"{100 * r['others']:>6.0f}" if r["others"] is not None else f"{'?':>6}"
        busy = busy or (r["others"] or 0.0) > BUSY
        print(
            f"{m:<20} {r['dim']:>8,} {r['ms']:>9.2f} {r['ms_min']:>8.2f} {ratio} "
            f"{r['fit_s']:>7.2f} {r['bind_s']:>7.2f} "
            f"{fmt_bytes(r['map_bytes']):>11} {fmt_bytes(r['held_bytes']):>11} "
            f"{r['peak_mb']:>7.1f}{mark} {other}"
        )
        want = r["dim"] if m in block_row(args) else k
        if m in block_row(args):
            notes.append(
                f"{m}: blocks of {args.block} units (another estimator: see dropinf.theory), "
                f"dimension {r['dim']:,} = {r['dim'] / k:.3f} k"
            )
        if r["dim"] != want or r["shape"] != [args.batch, want] or not r["finite"]:
            notes.append(
                f"{m}: output {r['shape']} (finite: {r['finite']}), expected "
                f"({args.batch}, {want})"
            )
        if m == "pca":
            notes.append(f"pca: fit (SVD) took {r['fit_s']:.2f} s, not included in ms/batch")
        if m in methods.METHODS and methods.spec(m).pilot:
            notes.append(
                f"{m}: fit on one pilot batch of {args.batch} samples took {r['fit_s']:.2f} s, "
                "not included in ms/batch"
            )
        if r.get("base_ms") is not None:
            notes.append(
                f"{m}: forward + backward + capture + compression {r['ms'] + r['base_ms']:.2f} ms "
                f"per batch; without compression (full factors captured) {r['base_ms']:.2f} ms; "
                "ms/batch is the difference"
            )
    if busy:
        notes.append(
            f"WARNING: other processes used more than {100 * BUSY:.0f}% of the CPUs while some "
            "rows were timed: those times are inflated (most for small multi-threaded ops, "
            "i.e. factored dropout); rerun on an idle machine, or with --threads 1"
        )
    if any(not r.get("exact_peak", True) for r in results.values()):
        notes.append("* high-water mark could not be reset: ru_maxrss delta (a lower bound)")
    print()
    for line in notes:
        print(line)

    print()
    gf = results.get("gaussian_factored", {})
    for name in ("dropout_factored", *block_row(args)):
        df = results.get(name, {})
        if "ms" in df and "ms" in gf:
            report_targets(name, df, gf)
        else:
            print(f"targets for {name}: not evaluated (need its row and gaussian_factored's)")
    imp, df = results.get(IMPORTANCE, {}), results.get("dropout_factored", {})
    if "ms" in imp and "ms" in df and "ms" in gf:
        q = imp["ms"] / df["ms"]
        ok = "MET" if q <= IMP_SPEED_TARGET else "NOT MET"
        print(
            f"speed: {IMPORTANCE} / dropout_factored = {imp['ms']:.2f} / {df['ms']:.2f} ms = "
            f"{q:.2f}x (target <= {IMP_SPEED_TARGET:g}x) -> {ok}; fit {imp['fit_s']:.2f} s"
        )
        q = gf["map_bytes"] / max(imp["map_bytes"], 1)
        ok = "MET" if q >= MAP_TARGET else "NOT MET"
        print(
            f"stored map: {IMPORTANCE} stores {fmt_bytes(imp['map_bytes'])} of probabilities; "
            f"factored Gaussian {fmt_bytes(gf['map_bytes'])}: {q:.0f}x less "
            f"(target >= {MAP_TARGET:g}x) -> {ok}"
        )
    elif IMPORTANCE in rows:
        print(f"targets for {IMPORTANCE}: not evaluated (need its, dropout_factored's and "
              "gaussian_factored's rows)")
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
