"""Notebook 07 (peers): dropinf beside dattri, TRAK, kronfluence and LogIX on the same models,
data, reference and machine, with a Pareto figure of time against fidelity.

What ``notebooks/07_peers.ipynb`` computes, here so that it is tested:

- two tasks (:func:`mlp_task`, :func:`gpt2_task`): (a) a tanh MLP on scikit-learn digits
  trained with weight decay to a near-stationary point, whose reference is exact influence (the
  dense Hessian of the regularised training loss, ``Preconditioner.fit_exact(l2=...)`` on the
  float64 model); (b) notebook 06's tiny GPT-2, pretrained and fine-tuned on standard-library
  docstrings, whose reference is the uncompressed damped empirical Fisher. GPT-2's Conv1D layers
  are replaced by the equivalent ``nn.Linear`` (weights transposed) so that every library sees
  the same linear layers; influence is over those layers;
- points (:func:`dropinf_points`, :func:`peer_points`): dropinf's exact influence (dense and
  CG), the uncompressed Fisher, flat and factored dropout at several rates, a Gaussian
  projection and an SJLT at factored dropout's dimension, with Fisher and identity curvature;
  each peer at a cheaper, its recommended and a costlier setting. Everything but the reference
  runs on a float32 copy of the model, as a user would run it;
- per point (:func:`measure`): wall seconds from the trained model to the (n_test, n_train)
  score matrix (median of ``repeats`` where one run takes under ``cheap_s``), peak memory above
  the start, and agreement with the reference (mean over test rows of Spearman and Pearson,
  top-k overlap). A point that raises (out of memory included) or returns non-finite scores is
  a row with its reason;
- the report (:func:`summary`, :func:`conclusions`): for each peer point, the fastest dropinf
  point that is both faster and at least as faithful (Spearman with the reference), or that
  none is; the Pareto figure (:func:`plot_pareto`).

Sign convention: positive score = helpful (removing the point raises the test loss); each
adapter converts its library's scores (:mod:`.adapters`). No LDS here: retraining the GPT-2 per
subset would take the notebook far past its budget, and notebook 02 measures LDS.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from ....compressors import Compressor, Identity
from ....curvature import Preconditioner
from ....gradients import gradients
from ....losses import cross_entropy
from ....scores import scores
from ....task import Task
from ... import data, metrics, models
from .. import methods
from ..common import Profiled, check_int, check_names, float_list, seed_for, threads
from ..measure import OtherLoad, peak_bytes, time_calls
from . import adapters
from .adapters import PEERS, Problem

TASKS = ("mlp", "gpt2")
TASK_LABELS = {"mlp": "MLP on digits (reference: exact influence)",
               "gpt2": "tiny GPT-2 (reference: uncompressed Fisher)"}
DIGITS_TRAIN, DIGITS_TEST = 1437, 360
PEER_LABELS = {"dattri": "dattri", "trak": "traker", "kronfluence": "kronfluence",
               "logix": "LogIX"}
PEER_COLORS = {"dattri": "C0", "trak": "C4", "kronfluence": "C2", "logix": "C1"}
PEER_MARKERS = {"explicit": "X", "cg": "P", "lissa": "h", "arnoldi": "8", "trak": "d",
                "diagonal": "<", "kfac": ">", "ekfac": "^", "raw": "v"}
LEVELS = ("cheaper", "recommended", "costlier")


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Config(Profiled):
    """Every knob of notebook 07; the defaults are the ``cpu-quick`` profile.

    Task ``mlp``: digits split by ``seed``, ``n_train``/``n_test`` points, a ``64-hidden-10``
    tanh MLP in float64 trained by L-BFGS (at most ``fit_iter`` iterations) with weight decay
    ``l2``. Task ``gpt2``: notebook 06's ``lm_model`` rung pretrained on ``lm_n_pretrain``
    documents of ``seq_len`` tokens (``lm_pretrain_epochs``) and fine-tuned on ``lm_n_train``
    (``lm_epochs``), ``lm_n_test`` test documents. ``damping``: dropinf's relative damping
    (``lambda = damping * trace(C) / dim``) of every Fisher point, and of the GPT-2 reference.

    dropinf points: each of ``methods`` (names of the study's method table,
    :mod:`~dropinf.study.experiments.methods`) at factored dropout's dimension at each rate of
    ``rates`` (a method that would hold more than ``dense_max_mb`` is left out), with Fisher
    curvature; the masks also with identity curvature (the gradient dot product); exact CG
    (mlp) at each of ``cg_iters``.

    Peers (those of ``peers`` that import), each setting tuple read as (cheaper, recommended,
    costlier): dattri's CG ``cg_iters``, LiSSA ``lissa_depths``, Arnoldi ``arnoldi_dims``
    (projection dimension; ``max_iter`` twice that), explicit influence where d is at most
    ``explicit_max_d`` (mlp); TRAK (dattri's and traker's, classification only) at
    ``trak_dims``; kronfluence's diagonal, K-FAC and EK-FAC; LogIX's LoGra at ``logra_ranks``
    with raw and K-FAC curvature.

    Measures: ``repeats`` timed runs where the first takes under ``cheap_s`` seconds, top-
    ``top_k`` overlap; ``threads`` torch CPU threads (0: torch's default).

    cpu-quick keeps LiSSA below dattri's default depth of 5,000 (about a minute per run on the
    MLP, where Spearman no longer rises between depths 100 and 500); the gpu profile runs it.
    Everything runs on the CPU.
    """

    seed: int = 0
    tasks: tuple[str, ...] = TASKS
    n_train: int = 1000
    n_test: int = 100
    hidden: int = 32
    l2: float = 1e-2
    fit_iter: int = 2000
    lm_model: str = "nano"
    seq_len: int = 64
    lm_n_pretrain: int = 1024
    lm_n_train: int = 256
    lm_n_test: int = 32
    lm_pretrain_epochs: int = 2
    lm_epochs: int = 2
    damping: float = 0.1
    rates: tuple[float, ...] = (0.3, 0.5, 0.75)
    methods: tuple[str, ...] = ("dropout_factored", "dropout", "sjlt", "gaussian")
    dense_max_mb: float = 256.0
    peers: tuple[str, ...] = PEERS
    cg_iters: tuple[int, ...] = (5, 10, 50)
    lissa_depths: tuple[int, ...] = (20, 100, 500)
    arnoldi_dims: tuple[int, ...] = (25, 100, 200)
    explicit_max_d: int = 5000
    trak_dims: tuple[int, ...] = (128, 512, 2048)
    logra_ranks: tuple[int, ...] = (16, 64, 128)
    repeats: int = 3
    cheap_s: float = 1.0
    top_k: int = 10
    threads: int = 1

    def __post_init__(self) -> None:
        check_names(self, "tasks", TASKS)
        check_names(self, "peers", PEERS, empty=True)
        check_names(self, "methods", methods.compressors(), empty=True)
        rates = float_list("rates", self.rates)
        if any(not 0 <= r < 1 for r in rates):
            raise ValueError(f"rates={rates!r} must be dropout rates in [0, 1)")
        object.__setattr__(self, "rates", rates)
        for name in ("cg_iters", "lissa_depths", "arnoldi_dims", "trak_dims", "logra_ranks"):
            value = getattr(self, name)
            value = (value,) if isinstance(value, int) else tuple(value)
            if not value or any(isinstance(v, bool) or not isinstance(v, (int, np.integer))
                                or v < 1 for v in value):
                raise ValueError(f"{name}={value!r} must be a non-empty list of integers >= 1")
            object.__setattr__(self, name, tuple(int(v) for v in value))
        for name, low in (("seed", 0), ("n_train", 4), ("n_test", 2), ("hidden", 1),
                          ("fit_iter", 1), ("seq_len", 2), ("lm_n_pretrain", 0),
                          ("lm_n_train", 4), ("lm_n_test", 2), ("lm_pretrain_epochs", 1),
                          ("lm_epochs", 1), ("explicit_max_d", 0), ("repeats", 1),
                          ("top_k", 1), ("threads", 0)):
            check_int(self, name, low)
        if self.n_train > DIGITS_TRAIN or self.n_test > DIGITS_TEST:
            raise ValueError(f"n_train={self.n_train}, n_test={self.n_test}: digits has "
                             f"{DIGITS_TRAIN} training and {DIGITS_TEST} test points")
        if self.top_k > min(self.n_train, self.lm_n_train):
            raise ValueError(f"top_k={self.top_k} exceeds a task's training points")
        if self.lm_model not in models.GPT2_LADDER:
            raise ValueError(f"lm_model={self.lm_model!r}; choose from {list(models.GPT2_LADDER)}")
        for name in ("l2", "damping", "dense_max_mb", "cheap_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{name}={v!r} must be a number > 0")


PROFILES: dict[str, dict] = {
    "cpu-quick": {},
    "gpu": {
        "n_train": DIGITS_TRAIN,
        "hidden": 128,
        "lm_model": "mini",
        "lm_n_pretrain": 2048,
        "lm_n_train": 1000,
        "lm_n_test": 100,
        "lm_pretrain_epochs": 4,
        "lm_epochs": 3,
        "explicit_max_d": 20_000,
        "lissa_depths": (500, 5000, 20_000),
        "cheap_s": 5.0,
        "threads": 0,
    },
}
# The gpu profile's code paths at toy size on the CPU, for the test suite (no results).
PROFILES["gpu-smoke"] = {
    **PROFILES["gpu"], "n_train": 40, "n_test": 4, "hidden": 4, "lm_n_pretrain": 8,
    "lm_n_train": 12, "lm_n_test": 2, "seq_len": 8, "lm_pretrain_epochs": 1, "lm_epochs": 1,
    "rates": (0.5,), "cg_iters": (5,), "lissa_depths": (20,), "arnoldi_dims": (5,),
    "explicit_max_d": 5000, "trak_dims": (16,), "logra_ranks": (4,), "repeats": 1, "top_k": 4,
    "cheap_s": 1.0, "threads": 1,
}


# --------------------------------------------------------------------------- tasks


@dataclass
class Setup:
    """One task ready to score: ``problem`` (float32 model and data, what every library gets),
    ``task``/``reference`` (dropinf's on the float32 model; the reference scores (n_test,
    n_train) float64 and how they were made), ``exact`` (float64 model and batches for
    ``fit_exact``, mlp only), ``info`` (sizes, accuracy, gradient norm, reference fit)."""

    name: str
    problem: Problem
    task: Task
    reference: np.ndarray
    reference_label: str
    info: dict
    exact: tuple[Task, list] | None = None


def mlp_task(cfg: Config) -> Setup:
    """Task (a): fit the MLP in float64, the exact-influence reference (dense Hessian of the
    mean loss plus ``l2``, float64, no damping), and the float32 copy every point runs on."""
    ds = data.digits(cfg.seed)
    train = ds.x_train[: cfg.n_train].double(), ds.y_train[: cfg.n_train]
    test = ds.x_test[: cfg.n_test].double(), ds.y_test[: cfg.n_test]
    model = models.mlp([train[0].shape[1], cfg.hidden, ds.num_classes], activation=nn.Tanh,
                       seed=seed_for(cfg.seed, "init")).double()
    grad_norm = models.fit_full_batch(model, cross_entropy, train, l2=cfg.l2,
                                      max_iter=cfg.fit_iter)
    model.eval()
    task64 = Task(model, cross_entropy)
    batches = [(train[0][i : i + 256], train[1][i : i + 256]) for i in range(0, cfg.n_train, 256)]
    t0 = time.perf_counter()
    pre = Preconditioner.fit_exact(task64, batches, l2=cfg.l2, solver="dense")
    G_tr, G_te = (gradients(task64, [b], Identity(), progress=False, dtype=torch.float64).data
                  for b in (train, test))
    S_ref = scores(G_te, G_tr, pre).numpy()
    ref_s = time.perf_counter() - t0
    m32 = copy.deepcopy(model).float().eval()
    linear = [n for n, m in m32.named_modules() if isinstance(m, nn.Linear)]
    problem = Problem(m32, cross_entropy, (train[0].float(), train[1]),
                      (test[0].float(), test[1]), linear, l2=cfg.l2, lam=0.0, batch_size=256,
                      seed=cfg.seed)
    with torch.no_grad():
        acc = float((model(test[0]).argmax(1) == test[1]).double().mean())
    info = {"d": task64.dim, "n_train": cfg.n_train, "n_test": cfg.n_test, "l2": cfg.l2,
            "grad_norm": grad_norm, "test_accuracy": acc, "min_eig": pre.info["min_eig"],
            "reference_s": ref_s}
    return Setup("mlp", problem, Task(m32, cross_entropy), S_ref,
                 "exact influence (dense Hessian + l2, float64)", info, (task64, batches))


def conv1d_to_linear(model: nn.Module) -> nn.Module:
    """``model`` with every Hugging Face ``Conv1D`` (``y = x W + b``, W (in, out)) replaced in
    place by the equivalent ``nn.Linear`` (weight ``W^T``): the same function, in the module
    type that kronfluence and LogIX track."""
    for name, mod in list(model.named_modules()):
        if type(mod).__name__ != "Conv1D":
            continue
        w = mod.weight.detach()
        lin = nn.Linear(w.shape[0], w.shape[1], dtype=w.dtype, device=w.device)
        with torch.no_grad():
            lin.weight.copy_(w.T)
            lin.bias.copy_(mod.bias.detach())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, lin)
    return model


def gpt2_task(cfg: Config, progress: bool = False) -> Setup:
    """Task (b): notebook 06's preparation (pretraining, fine-tuning) at this config's sizes,
    Conv1D layers as Linear, and the uncompressed damped-Fisher reference on the float32 model
    (its lambda is every peer's absolute damping where one is passed)."""
    from ....losses import causal_lm
    from .. import language

    lcfg = language.Config.for_profile(
        "cpu-quick", seed=cfg.seed, model=cfg.lm_model, seq_len=cfg.seq_len,
        n_pretrain=cfg.lm_n_pretrain, n_train=cfg.lm_n_train, n_test=cfg.lm_n_test,
        pretrain_epochs=cfg.lm_pretrain_epochs, epochs=cfg.lm_epochs, top_k=cfg.top_k,
        n_targets=1, n_pilot=min(cfg.lm_n_train, language.Config.n_pilot), threads=cfg.threads)
    corpus, pre_docs = language.load_corpus(lcfg, "stdlib")
    base, _ = language.base_model(lcfg, pre_docs, progress)
    model, _ = language.fine_tune(lcfg, base, corpus.train, np.arange(cfg.lm_n_train),
                                  language.finetune_seeds(lcfg)[0])
    model = conv1d_to_linear(model.float().cpu()).eval()
    linear = [n for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and n.startswith("transformer.h.")]
    task = Task(model, causal_lm, params=linear)
    train = {k: v for k, v in corpus.train.items()}
    test = {k: v for k, v in corpus.test.items()}
    t0 = time.perf_counter()
    G_tr, G_te = (gradients(task, data.tensor_loader(b, batch_size=64), Identity(),
                            progress=False).data for b in (train, test))
    pre = Preconditioner.fit(G_tr, "fisher", cfg.damping)
    S_ref = scores(G_te, G_tr, pre).double().numpy()
    ref_s = time.perf_counter() - t0
    problem = Problem(model, causal_lm, train, test, linear, l2=0.0, lam=pre.info["lambda"],
                      batch_size=64, kind="lm", seed=cfg.seed)
    info = {"d": task.dim, "n_train": cfg.lm_n_train, "n_test": cfg.lm_n_test,
            "model": cfg.lm_model, "lambda": pre.info["lambda"], "reference_s": ref_s,
            "test_loss": float(language.doc_losses(model, test).mean())}
    return Setup("gpt2", problem, task, S_ref,
                 f"uncompressed empirical Fisher, damping {cfg.damping:g}", info)


def build_task(cfg: Config, name: str, progress: bool = False) -> Setup:
    return mlp_task(cfg) if name == "mlp" else gpt2_task(cfg, progress)


# --------------------------------------------------------------------------- points


@dataclass
class Point:
    """One configuration to time and score: ``library`` ("dropinf" or a peer), ``method``,
    ``setting`` (a short text), ``level`` (cheaper/recommended/costlier for peers, "" for
    dropinf), ``spec`` (dropinf's: its name in the method table, for colour and marker),
    ``fn() -> (n_test, n_train)`` scores, or ``skip``: why it is not run."""

    library: str
    method: str
    setting: str
    fn: Callable[[], np.ndarray] | None
    level: str = ""
    spec: str = ""
    skip: str | None = None

    @property
    def label(self) -> str:
        lib = "dropinf" if self.library == "dropinf" else PEER_LABELS[self.library]
        return f"{lib} {self.method}" + (f" ({self.setting})" if self.setting else "")


def _loaders(setup: Setup) -> tuple[list, list]:
    p = setup.problem
    b = p.batch_size
    if isinstance(p.train, dict):
        return (list(data.tensor_loader(p.train, batch_size=b)),
                list(data.tensor_loader(p.test, batch_size=b)))
    return ([(p.train[0][i : i + b], p.train[1][i : i + b]) for i in range(0, p.n_train, b)],
            [(p.test[0][i : i + b], p.test[1][i : i + b]) for i in range(0, p.n_test, b)])


def _compressed_fn(setup: Setup, comp: Compressor, curvature: str, damping: float
                   ) -> Callable[[], np.ndarray]:
    """Gradients of both splits through ``comp``, the preconditioner, the scores."""
    train, test = _loaders(setup)
    l2 = setup.problem.l2

    def fn() -> np.ndarray:
        G_tr = gradients(setup.task, train, comp, progress=False)
        G_te = gradients(setup.task, test, comp, progress=False)
        pre = (Preconditioner.fit(G_tr, "identity") if curvature == "identity"
               else Preconditioner.fit(G_tr, "fisher", damping, l2=l2))
        return scores(G_te, G_tr, pre).double().numpy()

    return fn


def _exact_fn(setup: Setup, solver: str, maxiter: int = 500) -> Callable[[], np.ndarray]:
    """``fit_exact`` on the float32 model (the Hessian in float32, solves in float64)."""
    train, test = _loaders(setup)
    l2 = setup.problem.l2

    def fn() -> np.ndarray:
        pre = Preconditioner.fit_exact(setup.task, train, l2=l2, solver=solver,
                                       cg_maxiter=maxiter)
        G_tr = gradients(setup.task, train, Identity(), progress=False)
        G_te = gradients(setup.task, test, Identity(), progress=False)
        return scores(G_te, G_tr, pre).double().numpy()

    return fn


def dropinf_points(cfg: Config, setup: Setup) -> list[Point]:
    """dropinf's configurations on ``setup`` (see :class:`Config`)."""
    pts: list[Point] = []
    if setup.name == "mlp":
        pts.append(Point("dropinf", "exact", "dense", _exact_fn(setup, "dense"),
                         spec="exact"))
        for it in cfg.cg_iters:
            pts.append(Point("dropinf", "exact CG", f"{it} it", _exact_fn(setup, "cg", it),
                             spec="exact"))
    pts.append(Point("dropinf", "Fisher", "uncompressed",
                     _compressed_fn(setup, Identity(), "fisher", cfg.damping),
                     spec="identity"))
    for p in cfg.rates:
        seed = seed_for(cfg.seed, "dropinf", p)
        m = methods.match(setup.task, p=p)
        ok = [n for n in cfg.methods
              if methods.spec(n).need_bytes(m) <= cfg.dense_max_mb * 2**20]
        for name in ok:
            comp = methods.build(name, m, seed)
            pts.append(Point("dropinf", methods.label(name), f"k={m.k:,}",
                             _compressed_fn(setup, comp, "fisher", cfg.damping), spec=name))
        for name in methods.in_family(ok, "mask"):
            pts.append(Point("dropinf", methods.label(name) + ", dot", f"k={m.k:,}",
                             _compressed_fn(setup, methods.build(name, m, seed), "identity",
                                            cfg.damping), spec=name))
    return pts


def peer_points(cfg: Config, setup: Setup, missing: dict[str, str | None]) -> list[Point]:
    """Each importable peer of ``cfg.peers`` at its settings; peers that do not import and
    settings that do not apply are points with ``skip`` set."""
    p = setup.problem
    d = setup.task.dim
    pts: list[Point] = []

    def add(peer: str, method: str, setting: dict, text: str, level: str,
            skip: str | None = None):
        why = missing.get(peer) and f"not importable: {missing[peer]}"
        fn = None if (why or skip) else (
            lambda: adapters.run_peer(peer, method, p, setting))
        pts.append(Point(peer, method, text, fn, level, method, why or skip))

    def three(values: tuple) -> list[tuple[object, str]]:
        levels = LEVELS if len(values) == 3 else [""] * len(values)
        return list(zip(values, levels))

    for peer in cfg.peers:
        if peer == "dattri":
            add(peer, "explicit", {}, "", "recommended",
                None if d <= cfg.explicit_max_d else
                f"d = {d:,} > explicit_max_d = {cfg.explicit_max_d:,}: a dense d x d Hessian")
            for it, lvl in three(cfg.cg_iters):
                add(peer, "cg", {"max_iter": it}, f"{it} it", lvl)
            for depth, lvl in three(cfg.lissa_depths):
                add(peer, "lissa", {"recursion_depth": depth}, f"depth {depth}", lvl)
            for k, lvl in three(cfg.arnoldi_dims):
                add(peer, "arnoldi", {"proj_dim": k, "max_iter": 2 * k}, f"k={k}", lvl)
        if peer in ("dattri", "trak"):
            for k, lvl in three(cfg.trak_dims):
                add(peer, "trak", {"proj_dim": k}, f"k={k}", lvl,
                    None if p.kind == "classification" else
                    "the adapter's TRAK output function is for classification")
        if peer == "kronfluence":
            for strategy, lvl in (("diagonal", "cheaper"), ("kfac", "cheaper"),
                                  ("ekfac", "recommended")):
                add(peer, strategy, {}, "", lvl)
        if peer == "logix":
            for hess in ("raw", "kfac"):
                for r, lvl in three(cfg.logra_ranks):
                    add(peer, hess, {"rank": r}, f"rank {r}", lvl)
    return pts


# --------------------------------------------------------------------------- measuring


def measure(point: Point, reference: np.ndarray, cfg: Config) -> dict:
    """One row: status, seconds (median of the timed runs), runs, peak MB, agreement with the
    reference, the other processes' CPU share meanwhile, or the reason it failed."""
    row = {"library": point.library, "method": point.method, "setting": point.setting,
           "level": point.level, "spec": point.spec, "label": point.label,
           "status": "ok", "reason": "", "seconds": math.nan, "runs": 0, "peak_mb": math.nan,
           "spearman": math.nan, "pearson": math.nan, "topk": math.nan,
           "other_load": math.nan}
    if point.skip:
        return {**row, "status": "skipped", "reason": point.skip}
    out: dict[str, np.ndarray] = {}

    def call() -> None:
        out["S"] = point.fn()

    cpu = torch.device("cpu")
    try:
        with OtherLoad() as load:
            peak, first = peak_bytes(call, cpu, timed=True)
            times = [first.median]
            if first.median < cfg.cheap_s:
                times += [time_calls(call, cpu, 0, 1).median for _ in range(cfg.repeats - 1)]
        S = np.asarray(out["S"], dtype=np.float64)
    except Exception as e:  # noqa: BLE001 - a failure is a result (out of memory included)
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return {**row, "status": "failed", "reason": f"{type(e).__name__}: {first_line}"[:160]}
    if S.shape != reference.shape:
        return {**row, "status": "failed",
                "reason": f"scores of shape {S.shape}, expected {reference.shape}"}
    if not np.isfinite(S).all():
        return {**row, "status": "failed",
                "reason": f"{int((~np.isfinite(S)).sum())} non-finite scores"}
    ag = metrics.agreement(S, reference, k=cfg.top_k, n_boot=0)
    return {**row, "seconds": float(np.median(times)), "runs": len(times),
            "peak_mb": peak / 2**20, "spearman": ag["spearman"].value,
            "pearson": ag["pearson"].value, "topk": ag[f"top{cfg.top_k}_overlap"].value,
            "other_load": load.share}


@dataclass
class Result:
    """What :func:`run` measured: ``rows`` (one per task and point), ``infos`` (per task),
    ``available`` ({peer: None or why it does not import}), ``versions`` ({peer: version})."""

    cfg: Config
    rows: pd.DataFrame
    infos: dict[str, dict]
    available: dict[str, str | None]
    versions: dict[str, str | None] = field(default_factory=dict)


def run(cfg: Config, progress: bool = True) -> Result:
    """Every task, every point, measured (computation only)."""
    missing = adapters.available()
    versions = {p: adapters.version(p) for p in PEERS}
    rows, infos = [], {}
    with threads(cfg.threads):
        for name in cfg.tasks:
            setup = build_task(cfg, name, progress)
            infos[name] = {**setup.info, "reference": setup.reference_label}
            points = dropinf_points(cfg, setup) + peer_points(cfg, setup, missing)
            for pt in tqdm(points, desc=f"points {name}", unit="pt", disable=not progress):
                rows.append({"task": name, **measure(pt, setup.reference, cfg)})
    return Result(cfg, pd.DataFrame(rows), infos, missing, versions)


# --------------------------------------------------------------------------- report


def pareto_front(df: pd.DataFrame) -> pd.Series:
    """Boolean mask of the rows (status ok) that no other row beats on both time and
    Spearman: sorted by seconds, a row is on the front when its Spearman exceeds that of
    every faster row."""
    ok = df[df.status == "ok"].sort_values(["seconds", "spearman"], ascending=[True, False])
    front, best = [], -math.inf
    for i, r in ok.iterrows():
        if r.spearman > best:
            front.append(i)
            best = r.spearman
    return df.index.isin(front)


def dominating(df: pd.DataFrame, peer_row: pd.Series) -> pd.Series | None:
    """The fastest dropinf row (status ok) both faster than ``peer_row`` and at least as
    faithful (Spearman), or None."""
    d = df[(df.library == "dropinf") & (df.status == "ok") & (df.seconds < peer_row.seconds)
           & (df.spearman >= peer_row.spearman)]
    return None if d.empty else d.sort_values(["seconds", "spearman"]).iloc[0]


def _r(x, digits: int = 4):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return None
    return float(f"{float(x):.{digits}g}")


def task_table(result: Result) -> pd.DataFrame:
    """One row per task: its information (sizes, accuracy, gradient norm, reference)."""
    return pd.DataFrame([{"task": name, **info} for name, info in result.infos.items()])


def summary(result: Result) -> dict:
    """The numbers the notebook reports: per task its information, every point (Spearman,
    Pearson, top-k to 4 digits; seconds and peak MB to 2, since they vary between runs), the
    verdict for each peer point, and which peers ran. The dominance verdicts compare wall
    times of this machine (recorded in the manifest)."""
    out: dict = {"peers_available": [p for p, why in result.available.items() if why is None],
                 "peers_missing": {p: why for p, why in result.available.items() if why},
                 "peer_versions": result.versions, "damping": result.cfg.damping,
                 "top_k": result.cfg.top_k, "tasks": {}}
    for name, info in result.infos.items():
        df = result.rows[result.rows.task == name]
        points, verdicts = [], []
        for _, r in df.iterrows():
            points.append({"label": r.label, "library": r.library, "status": r.status,
                           "seconds": _r(r.seconds, 2), "peak_mb": _r(r.peak_mb, 2),
                           "spearman": _r(r.spearman), "pearson": _r(r.pearson),
                           "topk": _r(r.topk), "reason": r.reason or None})
            if r.library == "dropinf" or r.status != "ok":
                continue
            dom = dominating(df, r)
            verdicts.append({
                "peer": r.label, "seconds": _r(r.seconds, 2), "spearman": _r(r.spearman),
                "dominated_by": None if dom is None else dom.label,
                "by_seconds": None if dom is None else _r(dom.seconds, 2),
                "by_spearman": None if dom is None else _r(dom.spearman)})
        ok = df[df.status == "ok"]
        front = df[pareto_front(df)]
        out["tasks"][name] = {
            "info": {k: (_r(v) if isinstance(v, float) else v) for k, v in info.items()},
            "points": points, "verdicts": verdicts,
            "n_peer_points": int((ok.library != "dropinf").sum()),
            "n_dominated": sum(v["dominated_by"] is not None for v in verdicts),
            "front": list(front.label),
            "failed": {r.label: r.reason for _, r in df[df.status == "failed"].iterrows()},
            "skipped": {r.label: r.reason for _, r in df[df.status == "skipped"].iterrows()},
        }
    out["conclusion"] = conclusions(out)
    return out


def conclusions(s: dict) -> str:
    """The conclusion, written from :func:`summary`'s numbers: per task, how many peer points
    some dropinf point dominates, each peer point's verdict naming the dropinf point, and the
    peers that did not run."""
    parts = []
    if s.get("peers_missing"):
        parts.append("Not importable, so not compared: " + "; ".join(
            f"{p} ({why})" for p, why in s["peers_missing"].items()) + ".")
    for name, t in s["tasks"].items():
        label = TASK_LABELS.get(name, name)
        n, k = t["n_peer_points"], t["n_dominated"]
        if n == 0:
            parts.append(f"{label}: no peer point ran.")
            continue
        head = (f"{label}: every one of the {n} peer points that ran is dominated by a dropinf "
                "point (faster and at least as faithful)" if k == n else
                f"{label}: {k} of the {n} peer points that ran are dominated by a dropinf point "
                "(faster and at least as faithful), " + (
                    "none is" if k == 0 else f"{n - k} are not"))
        lines = []
        for v in t["verdicts"]:
            if v["dominated_by"] is None:
                lines.append(f"{v['peer']} (Spearman {v['spearman']:.3f} in {v['seconds']:.3g} s): "
                             "no dropinf point is both faster and at least as faithful")
            else:
                lines.append(f"{v['peer']} ({v['spearman']:.3f}, {v['seconds']:.3g} s) by "
                             f"{v['dominated_by']} ({v['by_spearman']:.3f}, "
                             f"{v['by_seconds']:.3g} s)")
        parts.append(head + ". " + "; ".join(lines) + ".")
        if t["failed"]:
            parts.append("Failed on this task: " + "; ".join(
                f"{lab} ({why})" for lab, why in t["failed"].items()) + ".")
    return " ".join(parts)


def table(result: Result) -> pd.DataFrame:
    """The readable table: one row per task and point, sorted by task then seconds."""
    cols = ["task", "label", "level", "status", "seconds", "runs", "peak_mb", "spearman",
            "pearson", "topk", "other_load", "reason"]
    df = result.rows[cols].copy()
    front = pd.Series(False, index=df.index)
    for name in df.task.unique():
        sub = result.rows[result.rows.task == name]
        front[sub.index] = pareto_front(sub)
    df.insert(4, "front", front)
    return df.sort_values(["task", "seconds"], na_position="last").reset_index(drop=True)


def verdict_table(s: dict) -> pd.DataFrame:
    """One row per peer point that ran: its seconds and Spearman, and the dropinf point that
    dominates it (fastest such) with its numbers, or "none" (from :func:`summary`)."""
    rows = []
    for name, t in s["tasks"].items():
        for v in t["verdicts"]:
            rows.append({"task": name, "peer point": v["peer"], "seconds": v["seconds"],
                         "spearman": v["spearman"],
                         "dominated by": v["dominated_by"] or "none",
                         "its seconds": v["by_seconds"], "its spearman": v["by_spearman"]})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- figure


def plot_pareto(result: Result):
    """Seconds (log) against Spearman with the reference, one panel per task: dropinf points
    filled in their method colours, peer points hollow in their library's colour (marker by
    method), the Pareto front as a step line, peer points labelled."""
    import matplotlib.pyplot as plt

    names = list(result.infos)
    fig, axes = plt.subplots(1, len(names), figsize=(7.0 * len(names), 5.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        df = result.rows[(result.rows.task == name) & (result.rows.status == "ok")]
        front = df[pareto_front(df)].sort_values("seconds")
        if len(front):
            xs = list(front.seconds) + [df.seconds.max() * 1.5]
            ys = list(front.spearman) + [front.spearman.iloc[-1]]
            ax.step(xs, ys, where="post", color="0.3", lw=1.2, ls="--", label="Pareto front",
                    zorder=1)
        for _, r in df.iterrows():
            if r.library == "dropinf":
                ax.scatter(r.seconds, r.spearman, s=46, zorder=3,
                           color=methods.color(r.spec), marker=methods.marker(r.spec),
                           label=f"dropinf {r.method}")
            else:
                ax.scatter(r.seconds, r.spearman, s=64, zorder=4, facecolors="none", lw=1.5,
                           edgecolors=PEER_COLORS[r.library],
                           marker=PEER_MARKERS.get(r.method, "o"),
                           label=f"{PEER_LABELS[r.library]} {r.method}")
                ax.annotate(r.setting or r.method, (r.seconds, r.spearman), fontsize=6.5,
                            xytext=(4, -3), textcoords="offset points",
                            color=PEER_COLORS[r.library])
        ax.set_xscale("log")
        ax.set_xlabel("wall seconds, trained model to score matrix (log)")
        ax.set_ylabel("Spearman with the reference (mean over test points)")
        info = result.infos[name]
        ax.set_title(f"{TASK_LABELS[name]}, d = {info['d']:,}", fontsize=10)
        ax.grid(alpha=0.3, lw=0.5)
        hs, labels = ax.get_legend_handles_labels()
        handles = dict(zip(labels, hs))
        ax.legend(handles.values(), handles.keys(), fontsize=6.5, ncol=2, loc="lower right",
                  frameon=False)
    fig.tight_layout()
    return fig
