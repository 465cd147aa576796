"""Notebook 03 (cost): what compressing per-sample gradients costs as the model grows.

What ``notebooks/03_cost.ipynb`` measures, here so that it is tested: for a ladder of model sizes
(MLPs and GPT-2 configurations, :func:`ladder`), every compressor of the method table
(:data:`~.methods.METHODS`) at the same compressed dimension k (that of factored dropout at
rate ``p`` per side, :func:`~.methods.match`):

- ``compress_ms``: the compression step per batch of B samples. Input: the batch's layer factors
  as the backward pass captures them in full (``PerSampleGrads(task)``); output: the (B, k)
  compressed gradients. For the factored methods that is the compressor's capture-time reducers
  (gather or project each factor) and then ``compress``; for the flat methods ``compress`` alone,
  which forms each parameter's (B, numel) per-sample gradient and maps it
  (:func:`compression_step`, the library's ``BatchGrads.reduced`` and ``compress``). Forward
  and backward passes, the same for every method, are not in it. Median over repeated calls
  after warm-up (:func:`time_calls`).
- ``featurize_ms`` and ``capture_ms``: the library's per-batch path, forward + backward with the
  capture hooks + compression (``PerSampleGrads(task, comp)`` then ``compress``, as
  :func:`dropinf.gradients` runs it; reducers inside the hooks), and the same capturing the full
  factors without compressing. Their difference is the in-pipeline cost of compression; it is a
  difference of two noisy medians.
- ``map_bytes``: the map that must be stored because the seed cannot regenerate it
  (``Compressor.map_bytes``); ``need_bytes``: what a method must hold beyond the model and data
  (:meth:`~.methods.MethodSpec.need_bytes`), which decides whether it fits ``memory_budget_gb``.
- ``peak_mb``: the peak memory of one compression step above what was resident before it
  (:func:`peak_bytes`).
- ``pipeline_s``: the whole pipeline for ``n_train`` training and ``n_test`` test points: a fresh
  compressor (PCA fitted), :func:`dropinf.gradients` of both sets, ``Preconditioner.fit(kind=
  "fisher")`` and :func:`dropinf.scores` (:func:`run_pipeline`), where the k x k Fisher is small
  enough (``k <= pipeline_max_k``); ``pipeline_peak_mb`` its peak memory.
- ``fit_s`` (PCA: exact gradients of the fit sample and the SVD; importance dropout: exact
  gradients of ``n_pilot`` pilot samples, their second moments and the allocation,
  :func:`~.methods.fit_pilot`) and ``bind_s`` (drawing masks, hashes or projections), once,
  outside the compression step; ``other_pct``: the share of the
  machine's CPU time other processes used while the row was measured (:class:`OtherLoad`).

Then fitted log-log slopes of each cost against the gradient's dimension d (:func:`fit_slope`),
the ratios to factored dropout at the largest size (:func:`ratios`), the figure and a
conclusion written from the numbers. Times vary between runs and machines: they go to tables,
never to the summary (:func:`summary` holds only what a seed determines).
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ...blocks import BatchGrads
from ...compressors import Compressor, Identity
from ...curvature import Preconditioner
from ...gradients import gradients
from ...losses import causal_lm, cross_entropy
from ...persample import PerSampleGrads
from ...scores import scores
from ...task import Task
from .. import models
from .common import Profiled, check_device, check_int, check_names, threads
from .measure import OtherLoad, compression_step, frozen_gc, peak_bytes, sync, time_calls
from .methods import ANCHOR, Match, color, compared, fit_pilot, label, marker, match, spec

REFERENCE = ANCHOR  # it fixes k: every ratio is to it
FAMILIES = ("mlp", "gpt2")
# Costs plotted and fitted against the parameter count, with their axis labels.
METRICS = {
    "compress_ms": "compression step (ms / batch)",
    "map_bytes": "stored map (bytes)",
    "peak_mb": "peak memory of the step (MB)",
    "pipeline_s": "whole pipeline (s)",
}
GB = 2**30


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Config(Profiled):
    """Every knob of notebook 03; the defaults are the ``cpu-quick`` profile.

    Ladder: MLPs ``mlp_widths`` (layer widths, input first) on random inputs with random labels,
    and GPT-2 LMs ``gpt2_shapes`` on random sequences of ``tokens`` tokens: each a rung of
    :data:`dropinf.study.models.GPT2_LADDER` by name, or ``(n_layer, n_embd, n_head)`` with
    vocabulary ``vocab_size`` and context ``n_positions``. Compression: factored dropout at rate
    ``p`` per side fixes k; SJLT has ``sjlt_c`` nonzeros per column; PCA is fitted on ``max(k,
    pca_min_fit)`` exact training gradients, importance dropout on ``n_pilot`` pilot samples
    (random data like the rest, from their own seed). ``memory_budget_gb``: a method whose map
    (and fit) needs more is recorded as not fitting. Timing: batches of ``batch_size``,
    ``warmup`` untimed calls, then at least ``repeats`` calls and ``min_time`` seconds, median.
    Pipeline: ``n_train`` and ``n_test`` points, relative Fisher ``damping``,
    ``pipeline_repeats`` runs (median), only where ``k <= pipeline_max_k``. ``device``:
    ``"cpu"`` or ``"cuda"``; ``threads``: torch's CPU threads while measuring (0: torch's
    default). One thread by default on CPU: on a machine shared with other processes, a
    multi-threaded operation waits for its slowest thread, and times of small operations jump by
    10x and more.
    """

    seed: int = 0
    p: float = 0.9
    mlp_widths: tuple[tuple[int, ...], ...] = (
        (32, 64, 10),
        (64, 128, 10),
        (256, 512, 10),
        (784, 1024, 1024, 10),
        (784, 2048, 2048, 10),
    )
    gpt2_shapes: tuple[str | tuple[int, int, int], ...] = ("nano", "micro", "mini", (4, 256, 4))
    vocab_size: int = 256
    n_positions: int = 256
    tokens: int = 64
    methods: tuple[str, ...] = compared()
    batch_size: int = 8
    warmup: int = 1
    repeats: int = 3
    min_time: float = 0.1
    memory_budget_gb: float = 1.0
    sjlt_c: int = 1
    pca_min_fit: int = 128
    n_pilot: int = 8
    n_train: int = 64
    n_test: int = 16
    damping: float = 1e-3
    pipeline_max_k: int = 2048
    pipeline_repeats: int = 1
    device: str = "cpu"
    threads: int = 1

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise lists (papermill passes JSON) to tuples
        set_(self, "mlp_widths", _shapes("mlp_widths", self.mlp_widths, low=1))
        set_(self, "gpt2_shapes", tuple(_gpt2_entry(v) for v in self.gpt2_shapes))
        if not self.mlp_widths and not self.gpt2_shapes:
            raise ValueError("mlp_widths and gpt2_shapes are both empty; give at least one model")
        for w in self.mlp_widths:
            if len(w) < 2:
                raise ValueError(f"mlp_widths entry {list(w)} needs an input and an output width")
        methods = check_names(self, "methods", compared("mask", "projection", "fitted", "composed"))
        if REFERENCE not in methods:
            raise ValueError(
                f"methods={list(methods)!r} lacks {REFERENCE!r}: it fixes k and is the reference "
                "of every ratio"
            )
        if not (isinstance(self.p, (int, float)) and 0.0 < self.p < 1.0):
            raise ValueError(f"p={self.p!r} must be a dropout rate in (0, 1)")
        for name, low in (("seed", 0), ("vocab_size", 2), ("n_positions", 2), ("tokens", 2),
                          ("batch_size", 1), ("warmup", 0), ("repeats", 1), ("sjlt_c", 1),
                          ("pca_min_fit", 1), ("n_pilot", 1), ("n_train", 1), ("n_test", 1),
                          ("pipeline_max_k", 1), ("pipeline_repeats", 1), ("threads", 0)):
            check_int(self, name, low)
        for shape in map(self.gpt2_shape, self.gpt2_shapes):
            if self.tokens > shape.n_positions:
                raise ValueError(
                    f"tokens={self.tokens} exceeds the context {shape.n_positions} of GPT-2 "
                    f"{shape}; lower tokens (or give [n_layer, n_embd, n_head] and raise "
                    "n_positions)"
                )
        for name in ("min_time", "memory_budget_gb", "damping"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"{name}={v!r} must be a number >= 0")
        if not self.damping > 0:
            raise ValueError(f"damping={self.damping!r} must be > 0 (the Fisher of n < k "
                             "gradients is singular)")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device={self.device!r}; use 'cpu' or 'cuda'")

    def gpt2_shape(self, entry: str | tuple[int, int, int]) -> models.GPT2Shape:
        """The architecture of a ``gpt2_shapes`` entry."""
        if isinstance(entry, str):
            return models.GPT2_LADDER[entry]
        return models.GPT2Shape(*entry, self.vocab_size, self.n_positions)


PROFILES: dict[str, dict] = {
    "cpu-quick": {},
    "gpu": {
        "mlp_widths": (
            (64, 128, 10),
            (256, 512, 10),
            (784, 1024, 1024, 10),
            (784, 2048, 2048, 10),
            (784, 4096, 4096, 10),
        ),
        "gpt2_shapes": ("nano", "mini", "distil", "small", "medium", "large"),
        "tokens": 256,  # the context of the ladder's small rungs
        "batch_size": 8,
        "warmup": 2,
        "repeats": 10,
        "min_time": 1.0,
        "memory_budget_gb": 32.0,
        "n_train": 512,
        "n_test": 64,
        "pipeline_max_k": 16384,
        "pipeline_repeats": 3,
        "device": "cuda",
        "threads": 0,
    },
}
# The gpu profile's code paths at toy size on the CPU, for the test suite (no results).
PROFILES["gpu-smoke"] = {
    **PROFILES["gpu"], "mlp_widths": ((8, 16, 4), (16, 32, 4)), "gpt2_shapes": ("nano",),
    "tokens": 8, "batch_size": 4, "pca_min_fit": 8, "warmup": 0, "repeats": 1, "min_time": 0.0,
    "memory_budget_gb": 1.0, "n_train": 8, "n_test": 4, "pipeline_max_k": 64,
    "pipeline_repeats": 1, "device": "cpu", "threads": 1,
}


def _is_int(x: object, low: int) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= low


def _shapes(name: str, value, low: int) -> tuple[tuple[int, ...], ...]:
    """A list of lists of integers >= low, as tuples."""
    try:
        out = tuple(tuple(v) for v in value)
    except TypeError:
        raise ValueError(f"{name}={value!r} must be a list of lists of integers") from None
    for t in out:
        if not all(_is_int(x, low) for x in t):
            raise ValueError(f"{name} entry {list(t)!r} must hold integers >= {low}")
    return tuple(tuple(int(x) for x in t) for t in out)


def _gpt2_entry(v) -> str | tuple[int, int, int]:
    """A ``gpt2_shapes`` entry: a :data:`~dropinf.study.models.GPT2_LADDER` name or a
    ``(n_layer, n_embd, n_head)`` triple with ``n_head`` dividing ``n_embd``."""
    if isinstance(v, str):
        if v not in models.GPT2_LADDER:
            raise ValueError(f"gpt2_shapes entry {v!r} is not in dropinf.study.models.GPT2_LADDER "
                             f"({list(models.GPT2_LADDER)}); or give [n_layer, n_embd, n_head]")
        return v
    try:
        t = tuple(v)
    except TypeError:
        t = ()
    if len(t) != 3 or not all(_is_int(x, 1) for x in t) or t[1] % t[2]:
        raise ValueError(f"gpt2_shapes entry {v!r} must be a GPT2_LADDER name or "
                         "[n_layer, n_embd, n_head] of positive integers, n_head dividing n_embd")
    return tuple(int(x) for x in t)


# --------------------------------------------------------------------------- the ladder


def mlp_params(widths: tuple[int, ...]) -> int:
    """Parameters of ``models.mlp(widths)``: ``sum (n_in + 1) n_out`` over the layers."""
    return sum((a + 1) * b for a, b in zip(widths[:-1], widths[1:]))


def gpt2_linear_params(n_layer: int, n_embd: int) -> int:
    """Parameters of the linear (Conv1D) layers of GPT-2's blocks, those its influence is taken
    over here: per block ``c_attn`` ``3 e^2 + 3 e``, ``attn.c_proj`` ``e^2 + e``, ``c_fc``
    ``4 e^2 + 4 e`` and ``mlp.c_proj`` ``4 e^2 + e``."""
    e = n_embd
    return n_layer * (12 * e * e + 9 * e)


@dataclass(frozen=True)
class Size:
    """One rung of the ladder: ``family`` (``"mlp"`` or ``"gpt2"``) and its shape; ``params``:
    the model's parameter count, ``dim``: that of the per-sample gradient (every parameter of an
    MLP; for GPT-2 the blocks' linear layers, see :func:`build`)."""

    family: str
    name: str
    shape: tuple[int, ...] | models.GPT2Shape
    params: int
    dim: int


def ladder(cfg: Config) -> list[Size]:
    """The model sizes of ``cfg``, each family in the given order."""
    out = []
    for w in cfg.mlp_widths:
        out.append(Size("mlp", "mlp-" + "-".join(map(str, w)), w, mlp_params(w), mlp_params(w)))
    for entry in cfg.gpt2_shapes:
        s = cfg.gpt2_shape(entry)
        name = f"gpt2-{entry}" if isinstance(entry, str) else f"gpt2-L{s.n_layer}-E{s.n_embd}"
        out.append(Size("gpt2", name, s, s.num_params, gpt2_linear_params(s.n_layer, s.n_embd)))
    return out


@dataclass
class Bench:
    """A model of the ladder on its device, and its random data: ``batches(n, seed)`` gives
    ``ceil(n / batch_size)`` batches of n samples in total, a function of the seed alone."""

    size: Size
    task: Task
    batches: Callable[[int, int], list]


def build(size: Size, cfg: Config, seed: int) -> Bench:
    """The model of ``size`` initialised from ``seed`` (the global RNG is left as it was), in
    eval mode, with its data: for an MLP, inputs ~ N(0, 1) and uniform labels; for GPT-2, uniform
    token ids of ``tokens`` tokens.

    GPT-2's task takes the gradient of its blocks' linear (Conv1D) layers only, as LoGra and
    GraSS do: the token embedding (tied to the output layer) and the layer norms are left out,
    so that every parameter is in a factored layer and the factored methods compress all of d.
    """
    device = torch.device(cfg.device)
    if size.family == "mlp":
        model = models.mlp(list(size.shape), seed=seed)
    else:
        model = size.shape.build(seed)
    model = model.to(device).eval()
    if size.family == "mlp":
        task = Task(model, cross_entropy)
    else:
        linear = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
        task = Task(model, causal_lm, params=linear)
    if task.dim != size.dim:
        raise RuntimeError(f"{size.name} has a gradient of {task.dim} parameters, not {size.dim}")
    B = cfg.batch_size

    def batches(n: int, data_seed: int) -> list:
        g = torch.Generator().manual_seed(data_seed)
        out = []
        for i in range(0, n, B):
            m = min(B, n - i)
            if size.family == "mlp":
                x = torch.randn(m, size.shape[0], generator=g)
                y = torch.randint(size.shape[-1], (m,), generator=g)
                out.append((x.to(device), y.to(device)))
            else:
                ids = torch.randint(size.shape.vocab_size - 1, (m, cfg.tokens), generator=g)
                out.append({"input_ids": ids.to(device),
                            "attention_mask": torch.ones_like(ids, device=device)})
        return out

    return Bench(size, task, batches)


# --------------------------------------------------------------------------- the methods


def pca_fit_rows(k: int, cfg: Config) -> int:
    """Exact training gradients PCA is fitted on: at least k, so that k directions exist."""
    return max(k, cfg.pca_min_fit)


def options(m: Match, cfg: Config) -> dict:
    """How ``cfg`` builds methods at ``m`` (:class:`~.methods.Options`)."""
    return {"sjlt_c": cfg.sjlt_c, "pca_n_fit": pca_fit_rows(m.k, cfg)}


def make_compressor(method: str, m: Match, cfg: Config) -> Compressor:
    """The unbound compressor of ``method`` at the matched setting ``m`` with ``cfg``'s seed and
    :func:`options` (a fitted method not yet fitted)."""
    return spec(method).compressor(m, cfg.seed, **options(m, cfg))


def fit(comp: Compressor, task: Task, fit_batches: list) -> Compressor:
    """Fit ``comp`` on the exact (Identity) gradients of ``fit_batches``: the fit's full cost."""
    G = gradients(task, fit_batches, Identity(), progress=False)
    return comp.fit(G.data)


def run_pipeline(bench: Bench, method: str, m: Match, cfg: Config, train: list, test: list,
                 fit_batches: list, pilot: list) -> Tensor:
    """The whole influence pipeline with a fresh compressor: draw (and for PCA or importance
    dropout fit) it, featurise the training and test sets, fit the damped Fisher, score.
    Returns the (n_test, n_train) scores (positive = helpful)."""
    comp = make_compressor(method, m, cfg)
    if spec(method).needs_fit:
        fit(comp, bench.task, fit_batches)
    fit_pilot(comp, bench.task, pilot if spec(method).pilot else None)
    G_train = gradients(bench.task, train, comp, progress=False)
    G_test = gradients(bench.task, test, comp, progress=False)
    pre = Preconditioner.fit(G_train, kind="fisher", damping=cfg.damping)
    return scores(G_test, G_train, pre)


def _time_fit(method: str, m: Match, bench: Bench, cfg: Config, fit_batches: list,
              pilot: list) -> tuple[Compressor, float, float]:
    """The ready compressor, seconds to fit it (PCA: exact gradients and SVD; importance
    dropout: exact gradients of the pilot batches, second moments, allocation; else 0) and to
    bind it (draw masks, hashes or projections)."""
    dev = torch.device(cfg.device)
    comp = make_compressor(method, m, cfg)
    fit_s = 0.0
    if spec(method).needs_fit or spec(method).pilot:
        t0 = time.perf_counter()
        if spec(method).needs_fit:
            fit(comp, bench.task, fit_batches)
        fit_pilot(comp, bench.task, pilot if spec(method).pilot else None)
        sync(dev)
        fit_s = time.perf_counter() - t0
    sync(dev)
    t0 = time.perf_counter()
    comp.bind(bench.task)
    bind_s = time.perf_counter() - t0
    if comp.dim != m.k:
        raise RuntimeError(f"{method} gives dimension {comp.dim}, not the matched k={m.k}")
    return comp, fit_s, bind_s


def measure_size(size: Size, cfg: Config, bar: tqdm | None = None) -> list[dict]:
    """One row per method of ``cfg.methods`` at one model size, a dict of :data:`COLUMNS` (NaN
    where not measured; see the module docstring). A method that does not fit the memory budget
    gets ``status`` "does not fit" and its ``need_bytes``; one that fails at run time (out of
    memory) gets "error: ..."."""
    with threads(cfg.threads):
        return _measure_size(size, cfg, bar)


def _measure_size(size: Size, cfg: Config, bar: tqdm | None) -> list[dict]:
    bench = build(size, cfg, cfg.seed)
    with frozen_gc():
        rows = _measure_bench(bench, cfg, bar)
    return [{c: r.get(c, math.nan) for c in COLUMNS} for r in rows]


def _measure_bench(bench: Bench, cfg: Config, bar: tqdm | None) -> list[dict]:
    dev, size = torch.device(cfg.device), bench.size
    task = bench.task
    setting = match(task, p=cfg.p)
    d, k = setting.d, setting.k
    data_seed = cfg.seed + 1
    batch = bench.batches(cfg.batch_size, data_seed)[0]
    budget = cfg.memory_budget_gb * GB
    need = {method: spec(method).need_bytes(setting, **options(setting, cfg))
            for method in cfg.methods}
    fits = any(spec(x).needs_fit and need[x] <= budget for x in cfg.methods)
    fit_batches = bench.batches(pca_fit_rows(k, cfg), data_seed + 1) if fits else []
    pilots = any(spec(x).pilot for x in cfg.methods)
    pilot = bench.batches(cfg.n_pilot, data_seed + 4) if pilots else []
    run_pipe = k <= cfg.pipeline_max_k
    train = bench.batches(cfg.n_train, data_seed + 2) if run_pipe else []
    test = bench.batches(cfg.n_test, data_seed + 3) if run_pipe else []

    with PerSampleGrads(task) as psg:  # forward + backward capturing the full factors
        capture = time_calls(lambda: psg(batch), dev, cfg.warmup, cfg.repeats, cfg.min_time)
        bg = psg(batch)[0]
    base = {"family": size.family, "size": size.name, "params": size.params, "d": d, "k": k,
            "compression": d / k, "batch": cfg.batch_size, "threads": torch.get_num_threads(),
            "capture_ms": 1e3 * capture.median}
    rows = []
    for method in cfg.methods:
        if bar is not None:
            bar.set_postfix_str(f"{size.name} {method}")
        row = {**base, "method": method, "need_bytes": need[method]}
        if need[method] > budget:
            rows.append({**row, "status": "does not fit", "pipeline_status": "does not fit",
                         "map_bytes": spec(method).stored_bytes(setting,
                                                                **options(setting, cfg))})
        else:
            try:
                with OtherLoad() as load:
                    row.update(_measure_method(method, setting, bench, cfg, batch, bg,
                                               fit_batches, pilot, train, test, run_pipe))
                row["other_pct"] = 100 * load.share
            except (RuntimeError, MemoryError) as e:  # torch's out-of-memory is a RuntimeError
                row.update(status=f"error: {str(e).splitlines()[0][:120]}",
                           pipeline_status="error")
            rows.append(row)
            gc.collect()
        if bar is not None:
            bar.update()
    return rows


def _measure_method(method: str, m: Match, bench: Bench, cfg: Config, batch, bg: BatchGrads,
                    fit_batches: list, pilot: list, train: list, test: list,
                    run_pipe: bool) -> dict:
    dev = torch.device(cfg.device)
    row = {"status": "ok", **_step_costs(method, m, bench, cfg, batch, bg, fit_batches, pilot)}
    gc.collect()  # the compressor (a dense map, say) is gone before the pipeline draws its own
    if not run_pipe:
        return {**row, "pipeline_status": f"k > pipeline_max_k={cfg.pipeline_max_k}"}

    def pipe() -> Tensor:
        return run_pipeline(bench, method, m, cfg, train, test, fit_batches, pilot)

    runs = [peak_bytes(pipe, dev, timed=True) for _ in range(cfg.pipeline_repeats)]
    return {**row, "pipeline_status": "ok",
            "pipeline_s": statistics.median(r[1].median for r in runs),
            "pipeline_peak_mb": max(r[0] for r in runs) / 2**20}


def _step_costs(method: str, m: Match, bench: Bench, cfg: Config, batch, bg: BatchGrads,
                fit_batches: list, pilot: list) -> dict:
    """Fit, bind, compression step (time and peak) and the library's per-batch path."""
    dev = torch.device(cfg.device)
    k = m.k
    comp, fit_s, bind_s = _time_fit(method, m, bench, cfg, fit_batches, pilot)
    step = compression_step(comp, bg)
    z = step()
    if z.shape != (bg.size, k) or not bool(torch.isfinite(z).all()):
        raise RuntimeError(f"{method} gave shape {tuple(z.shape)} (or non-finite values), "
                           f"expected ({bg.size}, {k})")
    del z
    t = time_calls(step, dev, cfg.warmup, cfg.repeats, cfg.min_time)
    peak = peak_bytes(step, dev)
    with PerSampleGrads(bench.task, comp) as psg:  # the library's path: reducers in the hooks
        feat = time_calls(lambda: comp.compress(psg(batch)[0]), dev, cfg.warmup, cfg.repeats,
                          cfg.min_time)
    return {"map_bytes": comp.map_bytes, "fit_s": fit_s, "bind_s": bind_s,
            "compress_ms": 1e3 * t.median, "compress_ms_min": 1e3 * t.min, "calls": t.calls,
            "peak_mb": peak / 2**20, "featurize_ms": 1e3 * feat.median}


COLUMNS = (
    "family", "size", "params", "d", "k", "compression", "batch", "threads", "method", "status",
    "map_bytes", "need_bytes", "fit_s", "bind_s", "compress_ms", "compress_ms_min", "calls",
    "peak_mb", "capture_ms", "featurize_ms", "pipeline_status", "pipeline_s",
    "pipeline_peak_mb", "other_pct",
)


def measure(cfg: Config, progress: bool = True) -> pd.DataFrame:
    """Every (size, method) measurement of ``cfg``: one row each, columns :data:`COLUMNS`."""
    check_device(cfg.device)
    sizes = ladder(cfg)
    rows: list[dict] = []
    with tqdm(total=len(sizes) * len(cfg.methods), desc="cost", disable=not progress) as bar:
        for size in sizes:
            rows += measure_size(size, cfg, bar)
    return pd.DataFrame(rows, columns=list(COLUMNS))


# --------------------------------------------------------------------------- analysis


def fit_slope(x, y) -> tuple[float, float]:
    """Least-squares line through ``(log10 x, log10 y)`` over the finite positive points:
    ``(slope, intercept)``, so ``y ~ 10**intercept * x**slope``; NaNs with fewer than 2 points."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    if len(np.unique(x[ok])) < 2:
        return float("nan"), float("nan")
    slope, intercept = np.polyfit(np.log10(x[ok]), np.log10(y[ok]), 1)
    return float(slope), float(intercept)


def _measured(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Rows where ``metric`` was measured (map bytes: only where the method ran)."""
    ok = df["pipeline_status"] == "ok" if metric.startswith("pipeline") else df["status"] == "ok"
    return df[ok & df[metric].notna()]


def slopes(df: pd.DataFrame) -> pd.DataFrame:
    """Fitted log-log slope of each metric of :data:`METRICS` against the parameter count, per
    family and method, with the number of sizes it rests on (NaN below two)."""
    out = []
    for (family, method), g in df.groupby(["family", "method"], sort=False):
        for metric in METRICS:
            m = _measured(g, metric)
            s, c = fit_slope(m["d"], m[metric])
            out.append({"family": family, "method": method, "metric": metric, "slope": s,
                        "intercept": c, "sizes": int((m[metric] > 0).sum())})
    return pd.DataFrame(out)


def ratios(df: pd.DataFrame) -> pd.DataFrame:
    """Each method's cost over factored dropout's, per family and metric, at the largest size
    where both were measured. Map bytes: factored dropout stores none, so the ratio is inf where
    the other method stores any (1 where it stores none either); a peak of 0 (below the page
    resolution of the resident set) gives no ratio (NaN)."""
    out = []
    for family, g in df.groupby("family", sort=False):
        for metric in METRICS:
            m = _measured(g, metric)
            ref = m[m["method"] == REFERENCE].set_index("size")[metric]
            for method, gm in m.groupby("method", sort=False):
                both = gm[gm["size"].isin(ref.index)]
                if both.empty:
                    continue
                last = both.loc[both["d"].idxmax()]
                r = float(ref[last["size"]])
                v = float(last[metric])
                if r > 0:
                    ratio = v / r
                elif metric == "map_bytes":  # dropout stores nothing: any map is infinitely more
                    ratio = math.inf if v > 0 else 1.0
                else:  # a time or peak below the measurement's resolution: no ratio
                    ratio = math.nan
                out.append({"family": family, "metric": metric, "method": method,
                            "size": last["size"], "d": int(last["d"]), "value": v,
                            "dropout_value": r, "ratio": ratio})
    return pd.DataFrame(out)


# --------------------------------------------------------------------------- the run


@dataclass
class Result:
    """Everything notebook 03 shows, computed by :func:`run`: ``measurements`` (one row per
    size and method, :func:`measure`), their log-log ``slopes`` and their ``ratios`` to factored
    dropout, and the ``hardware`` they were measured on (:func:`dropinf.study.results.hardware`).
    """

    cfg: Config
    measurements: pd.DataFrame
    slopes: pd.DataFrame
    ratios: pd.DataFrame
    hardware: dict


# Result field -> file name under tables/ (the notebook saves each with ``run.table``).
TABLES = {"measurements": "cost", "slopes": "slopes", "ratios": "cost_ratios"}


def run(cfg: Config, progress: bool = True) -> Result:
    """Notebook 03's computation: every measurement, then the slopes and ratios."""
    from ..results import hardware

    df = measure(cfg, progress)
    return Result(cfg, df, slopes(df), ratios(df), hardware())


def summary(res: Result) -> dict:
    """summary.json: ``conclusion`` (:func:`conclude`, written from the measured times, so it
    changes between runs) and the numbers a seed determines (:func:`numbers`)."""
    return {"conclusion": conclude(res.measurements, res.ratios),
            **numbers(res.cfg, res.measurements)}


def numbers(cfg: Config, df: pd.DataFrame) -> dict:
    """What a seed determines (no time or memory measurement): the ladder with d and k, the
    stored map of each method at each size (None where it failed), what did not fit and what it
    would need, the log-log slope of the stored map, where the pipeline ran, and where the
    timings are."""
    lad = df.drop_duplicates("size")
    maps: dict[str, dict] = {}
    for _, r in df.iterrows():
        value = int(r["map_bytes"]) if r["status"] == "ok" else None
        maps.setdefault(r["size"], {})[r["method"]] = value
    map_slopes: dict[str, dict] = {}
    for (family, method), g in df[df["status"] == "ok"].groupby(["family", "method"], sort=False):
        s, _ = fit_slope(g["d"], g["map_bytes"])
        map_slopes.setdefault(family, {})[method] = None if math.isnan(s) else round(s, 4)
    return {
        "p": cfg.p,
        "methods": list(cfg.methods),
        "reference": REFERENCE,
        "ladder": [{"family": r["family"], "size": r["size"], "params": int(r["params"]),
                    "d": int(r["d"]), "k": int(r["k"]),
                    "compression": round(float(r["compression"]), 3)}
                   for _, r in lad.iterrows()],
        "map_bytes": maps,
        "does_not_fit": [{"size": r["size"], "method": r["method"],
                          "need_bytes": int(r["need_bytes"])}
                         for _, r in df[df["status"] == "does not fit"].iterrows()],
        "memory_budget_bytes": int(cfg.memory_budget_gb * GB),
        "map_slopes": map_slopes,
        "pipeline_sizes": sorted(set(df.loc[df["k"] <= cfg.pipeline_max_k, "size"])),
        "timings_file": "tables/cost.csv",
        "ratios_file": "tables/cost_ratios.csv",
        "slopes_file": "tables/slopes.csv",
        "note": "times and peak memory vary between runs and machines: they are in the tables "
                "(with the hardware in manifest.json), not in this summary",
    }


# --------------------------------------------------------------------------- figure and text


def plot_cost(res: Result):
    """:func:`plot` of a :class:`Result`, its hardware in the title."""
    return plot(res.measurements, res.slopes, hardware_label(res.hardware, res.measurements),
                p=res.cfg.p)


def plot(df: pd.DataFrame, slope_df: pd.DataFrame, hardware: str = "", p: float | None = None):
    """Log-log cost against d: one row of panels per family, one panel per metric of
    :data:`METRICS`, one line per method with its fitted slope in the legend. Hollow markers on
    the map panel: the map a method that did not fit would need."""
    import matplotlib.pyplot as plt

    families = [f for f in FAMILIES if f in set(df["family"])]
    fig, axes = plt.subplots(len(families), len(METRICS), figsize=(4.2 * len(METRICS),
                             3.6 * len(families)), squeeze=False)
    for i, family in enumerate(families):
        g = df[df["family"] == family]
        for j, metric in enumerate(METRICS):
            ax = axes[i, j]
            none = []
            for method in dict.fromkeys(g["method"]):
                style = dict(color=color(method), marker=marker(method), ms=4)
                m = _measured(g[g["method"] == method], metric).sort_values("d")
                y = m[metric].to_numpy(float)
                if metric == "map_bytes" and len(y) and (y == 0).all():
                    none.append(label(method))
                    continue
                s = slope_df[(slope_df["family"] == family) & (slope_df["method"] == method)
                             & (slope_df["metric"] == metric)]["slope"]
                slope = f"slope {s.iloc[0]:.2f}" if len(s) and np.isfinite(s.iloc[0]) else "1 pt"
                if len(y):
                    ax.plot(m["d"], y, "-", label=f"{label(method)} ({slope})", **style)
                nf = g[(g["method"] == method) & (g["status"] == "does not fit")]
                if metric == "map_bytes" and len(nf):
                    ax.plot(nf["d"], nf["map_bytes"], "--", mfc="none",
                            label=f"{label(method)}: would need", **style)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("parameters in the gradient, d")
            note = f"\nnone (0 B): {', '.join(none)}" if none else ""
            ax.set_title(f"{family}: {METRICS[metric]}{note}", fontsize=9)
            if ax.has_data():
                ax.legend(fontsize=6, loc="best", framealpha=0.7)
            ax.grid(True, which="major", alpha=0.3)
    ratio = df.drop_duplicates("size")["compression"]
    rate = f"factored dropout's at p = {p:g} per side, " if p is not None else ""
    fig.suptitle(f"Cost of compression at matched k ({rate}d/k = {ratio.min():.0f} to "
                 f"{ratio.max():.0f}); times on {hardware}", fontsize=9)
    fig.tight_layout()
    return fig


def hardware_label(hw: dict, df: pd.DataFrame | None = None) -> str:
    """One line naming the hardware the times were measured on (with the torch threads used,
    from the measurements ``df`` when given)."""
    if hw.get("gpus"):
        return f"GPU {hw['gpus'][0]}"
    used = hw.get("torch_threads")
    if df is not None and df["threads"].notna().any():
        used = "/".join(str(int(t)) for t in sorted(df["threads"].dropna().unique()))
    return f"CPU {hw.get('cpu')}, {hw.get('cpu_count')} cores, torch threads {used}"


def conclude(df: pd.DataFrame, ratio_df: pd.DataFrame) -> str:
    """Markdown conclusions written from the measured numbers."""
    lines = []
    for family, g in ratio_df.groupby("family", sort=False):
        c = g[(g["metric"] == "compress_ms") & (g["method"] != REFERENCE)]
        if c.empty:
            continue
        ref = g[(g["metric"] == "compress_ms") & (g["method"] == REFERENCE)].iloc[0]
        size = ref["size"]
        rel = [f"{label(r.method)} {_fmt_ratio(r.ratio)}" + ("" if r.size == size else
               f" (at {r.size}, the largest where it fits)") for r in c.itertuples()]
        faster = c[c["ratio"] < 1.0]
        lines.append(
            f"- **{family}**, largest size {size} ({int(ref['d']):,} parameters in the "
            f"gradient): the factored-dropout compression step takes {ref['value']:.3g} ms per "
            f"batch; relative to it, {'; '.join(rel)}. "
            + (f"Faster than factored dropout: "
               f"{', '.join(label(m) for m in faster['method'])}." if len(faster)
               else "No method is faster.")
        )
        maps = df[(df["family"] == family) & (df["size"] == size)]
        stored = [f"{label(r.method)} "
                  + (f"would need {_fmt_bytes(r.map_bytes)} (over the memory budget)"
                     if r.status == "does not fit" else _fmt_bytes(r.map_bytes))
                  for r in maps.itertuples() if r.map_bytes > 0]
        free = [label(r.method) for r in maps.itertuples()
                if r.status == "ok" and r.map_bytes == 0]
        lines.append(f"  Stored map at {size}: none for {', '.join(free)}; "
                     f"{'; '.join(stored) if stored else 'none for any method'}.")
        close = c[(c["ratio"] < 2.0) & c["method"].isin(free)]
        if len(close):
            lines.append(
                "  Within 2x of factored dropout's time and storing no map either: "
                + ", ".join(f"{label(r.method)} ({_fmt_ratio(r.ratio)})"
                            for r in close.itertuples())
                + "."
            )
        pl = g[g["metric"] == "pipeline_s"]
        if len(pl) > 1:
            top = pl[pl["method"] == REFERENCE].iloc[0]
            others = pl[pl["method"] != REFERENCE]
            same = others[(others["ratio"] > 0.8) & (others["ratio"] < 1.25)]
            lines.append(
                f"  Whole pipeline at {top['size']} (the largest size where it ran): factored "
                f"dropout {top['value']:.2f} s; relative to it, "
                + "; ".join(f"{label(r.method)} {_fmt_ratio(r.ratio)}"
                            + ("" if r.size == top["size"] else f" (at {r.size})")
                            for r in others.itertuples())
                + "."
                + (f" Within 20-25% of dropout: {', '.join(label(m) for m in same['method'])}"
                   ": there featurisation and the k x k Fisher, the same for all, dominate."
                   if len(same) else "")
            )
        fits = maps[(maps["status"] == "ok") & (maps["fit_s"] > 0)]
        if len(fits):
            lines.append(f"  Fitted methods at {size}, fit once outside the compression step: "
                         + ", ".join(f"{label(r.method)} {r.fit_s:.3g} s"
                                     for r in fits.itertuples()) + ".")
    errors = df[df["status"].astype(str).str.startswith("error")]
    for r in errors.itertuples():
        lines.append(f"- **Failed**: {label(r.method)} at {r.size}: {r.status}")
    busy = df["other_pct"].dropna()
    if len(busy) and busy.max() > 10:
        lines.append(
            f"- Other processes used {busy.min():.0f}% to {busy.max():.0f}% of the machine's CPU "
            f"time while the rows were measured (median {busy.median():.0f}%): absolute times "
            "are inflated by that contention; ratios between methods less so where every row "
            "saw about the same load. Rerun on an idle machine before quoting a number."
        )
    return "\n".join(lines)


def _fmt_ratio(r: float) -> str:
    return f"{r:,.0f}x" if r >= 100 else f"{r:.3g}x"


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GB", GB), ("MB", 2**20), ("kB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
