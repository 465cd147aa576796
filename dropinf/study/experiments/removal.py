"""Notebook 05 (removal): remove the training points each method calls most helpful to a set of
test points, retrain from scratch, and measure how much worse the model gets on those points.

What ``notebooks/05_removal.ipynb`` computes, here so that it is tested:

1. A model is trained on the full training set (seeded) and ``n_targets`` class-balanced test
   points are drawn: the *targets* (:func:`pick_targets`).
2. Each method (:data:`METHODS`: no compression, flat and factored dropout, dense and factored
   Gaussian, SJLT, PCA, all at the compressed dimension k of factored dropout at rate ``p``)
   scores every training point against every target with the damped empirical Fisher of its
   own compressed gradients, the same relative ``damping`` for all (:func:`aggregate_scores`).
   A training point's score for the target set is the **sum** of its scores over the targets;
   positive = helpful (removing it raises the targets' loss, to first order).
3. For each removal fraction f, each method removes its top ``round(f n)`` training points;
   baselines remove ``round(f n)`` points at random, or the *most harmful* ones (bottom of the
   ``reference`` method's scores) (:func:`removal_plan`).
4. Every subset is retrained from scratch (:class:`Retrainer`) and the targets' mean loss and
   accuracy are compared with the full-data model of the same retraining seed
   (:func:`retrain_all`). Draw ``r`` pairs compressor draw r, random draw r and retraining
   seed r, so the spread over r holds both the randomness of the method and that of training.
5. Effects, their spread and paired tests against random removal (:func:`effects`,
   :func:`compare`), the conclusion (:func:`conclude`) and the figure (:func:`plot`).

Retraining from scratch keeps the full set's data order and gives the removed points a loss
weight of 0, each batch averaged over its kept points (:func:`weighted_loss`): the same as
training on the subset with the same initialisation and the same order of the kept points,
so that subsets trained with the same seed differ only by the removed points (common random
numbers), at the cost of the removed points' forward passes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats as sps
from torch import Tensor, nn
from tqdm.auto import tqdm

from ...compressors import Identity
from ...curvature import Preconditioner
from ...gradients import gradients
from ...losses import cross_entropy
from ...scores import scores
from ...task import Task
from .. import data as dd
from .. import models
from ..retrain import subset_outputs
from .common import (
    Profiled,
    check_device,
    check_int,
    check_names,
    float_list,
    rng_for,
    seed_for,
    threads,
)
from .methods import (
    IDENTITY,
    color,
    compared,
    compressors,
    in_family,
    match,
    pilot_grads,
    pilot_subset,
    ready,
    spec,
)
from .methods import label as method_label

# The default methods: no compression and the table's compressors, without those fitted on a
# pilot set (importance dropout; see Config for why, and ``methods`` to add them).
METHODS = (IDENTITY, *(m for m in compared() if not spec(m).pilot))


def label(name: str) -> str:
    """The method's label (the random baseline removes random points here)."""
    return "random points" if name == "random" else method_label(name)

BASELINES = ("random", "harmful")
DATASETS = ("digits", "cifar10")
KINDS = ("full", "helpful", "harmful", "random")


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Config(Profiled):
    """Every knob of notebook 05; the defaults are the ``cpu-quick`` profile.

    Data and model: ``dataset`` ``"digits"`` (scikit-learn's 8x8 digits, split with ``seed``,
    :func:`dropinf.study.models.cnn` with ``channels``) or ``"cifar10"``
    (:func:`dropinf.study.models.resnet9` of ``width`` with ``norm``, augmented; its GroupNorm
    affine parameters are left out of the gradients so that every gradient takes the hook path).
    Training (the base model and every retrain): :func:`dropinf.study.models.train` with
    ``epochs``, ``batch_size``, ``lr``, ``optimizer``, ``weight_decay`` (coupled L2), ``schedule``
    and ``warmup``.

    Removal: ``n_targets`` class-balanced test points; ``fractions`` of the training set
    removed, ``main_fraction`` (one of them) the one reported; ``n_seeds`` draws, each pairing a
    compressor draw, a random removal and a retraining seed; ``reference`` the method whose
    lowest scores define the most harmful points and against which removed sets are compared.

    Methods: ``methods`` (a subset of :data:`METHODS` holding ``reference``) at the dimension k
    of factored dropout at rate ``p``; SJLT with ``sjlt_c`` nonzeros per column; PCA fitted on
    at most ``pca_fit`` exact training gradients; importance dropout (the methods with
    ``pilot``, not among the defaults) on the exact gradients of ``n_pilot`` training points,
    a subset drawn per draw; damped Fisher with relative ``damping``. The default ``methods``
    leave importance dropout out: each method here costs ``len(fractions) * n_seeds`` retrains
    (the three importance variants would add 36 to the 112 of cpu-quick) and joins the families
    that the Holm and Bonferroni corrections adjust over, which would change every committed
    p-value; notebooks 02 and 04 measure it on MLPs, 06 on the transformer.
    ``grad_batch``: batch size of featurisation. ``device``: ``"cpu"`` or ``"cuda"``;
    ``threads``: torch's CPU threads during the run (0: torch's default; one by default, as
    the small CNN gains nothing from more and a shared machine makes them wait on each other).
    """

    seed: int = 0
    dataset: str = "digits"
    channels: tuple[int, int] = (8, 16)
    width: int = 64
    norm: str = "group"
    epochs: int = 15
    batch_size: int = 128
    lr: float = 5e-3
    optimizer: str = "adam"
    weight_decay: float = 1e-3
    schedule: str = "constant"
    warmup: float = 0.0
    n_targets: int = 40
    fractions: tuple[float, ...] = (0.02, 0.05, 0.1)
    main_fraction: float = 0.05
    n_seeds: int = 4
    methods: tuple[str, ...] = METHODS
    reference: str = IDENTITY
    p: float = 0.7
    damping: float = 0.1
    sjlt_c: int = 1
    pca_fit: int = 2048
    n_pilot: int = 256
    grad_batch: int = 256
    device: str = "cpu"
    threads: int = 1

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise lists (papermill passes JSON) to tuples
        fractions = tuple(sorted(set(float_list("fractions", self.fractions))))
        if not all(0.0 < f < 1.0 for f in fractions):
            raise ValueError(f"fractions={list(fractions)!r} must be a non-empty list of "
                             "fractions in (0, 1), e.g. [0.02, 0.05, 0.1]")
        set_(self, "fractions", fractions)
        if not any(abs(self.main_fraction - f) < 1e-12 for f in fractions):
            raise ValueError(f"main_fraction={self.main_fraction!r} must be one of fractions="
                             f"{list(fractions)}")
        methods = check_names(self, "methods", (IDENTITY, *compressors()))
        if self.reference not in methods:
            raise ValueError(f"reference={self.reference!r} must be one of methods="
                             f"{list(methods)} (its lowest scores are the most harmful points)")
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset={self.dataset!r} must be one of {DATASETS}")
        channels = tuple(self.channels)
        if len(channels) != 2 or not all(isinstance(c, int) and c >= 1 for c in channels):
            raise ValueError(f"channels={self.channels!r} must be two positive ints, e.g. [8, 16]")
        set_(self, "channels", channels)
        if self.norm not in models.RESNET9_NORMS:
            raise ValueError(f"norm={self.norm!r} must be one of {models.RESNET9_NORMS}")
        for name, low in (("seed", 0), ("width", 1), ("epochs", 1), ("batch_size", 1),
                          ("n_targets", 1), ("n_seeds", 2), ("sjlt_c", 1), ("pca_fit", 1),
                          ("n_pilot", 1), ("grad_batch", 1), ("threads", 0)):
            check_int(self, name, low)
        for name in ("lr", "damping"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{name}={v!r} must be a number > 0")
        if isinstance(self.weight_decay, bool) or not self.weight_decay >= 0:
            raise ValueError(f"weight_decay={self.weight_decay!r} must be a number >= 0")
        if not (isinstance(self.p, (int, float)) and 0.0 < self.p < 1.0):
            raise ValueError(f"p={self.p!r} must be a dropout rate in (0, 1)")
        if self.optimizer not in models.OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r} must be one of {models.OPTIMIZERS}")
        if self.schedule not in models.SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} must be one of {models.SCHEDULES}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup={self.warmup!r} must be in [0, 1)")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device={self.device!r}; use 'cpu' or 'cuda'")


PROFILES: dict[str, dict] = {
    "cpu-quick": {},
    "gpu": {
        "dataset": "cifar10",
        "width": 64,
        "norm": "group",
        "epochs": 24,
        "batch_size": 512,
        "lr": 0.2,
        "optimizer": "sgd",
        "weight_decay": 5e-4,
        "schedule": "linear",
        "warmup": 0.2,
        "n_targets": 100,
        "fractions": (0.05,),
        "main_fraction": 0.05,
        "n_seeds": 3,
        # d = 6.6M: no Fisher in the full space, no (k, d) map for dense Gaussian or PCA.
        "methods": ("dropout", "dropout_factored", "gaussian_factored", "sjlt"),
        "reference": "gaussian_factored",
        "p": 0.97,
        "grad_batch": 64,
        "device": "cuda",
        "threads": 0,
    },
}
# The gpu profile's code paths (ResNet-9 on CIFAR-10) at toy size on the CPU, for the test
# suite (no results).
PROFILES["gpu-smoke"] = {
    **PROFILES["gpu"], "width": 4, "epochs": 1, "batch_size": 8, "n_targets": 2,
    "fractions": (0.25,), "main_fraction": 0.25, "n_seeds": 2, "grad_batch": 8,
    "device": "cpu", "threads": 1,
}


# --------------------------------------------------------------------------- data and models


def load_data(cfg: Config) -> dd.Classification:
    """The dataset of ``cfg``: digits as (n, 1, 8, 8) images split with ``cfg.seed``, or
    CIFAR-10 (raises :class:`dropinf.study.data.DatasetUnavailable` when it is not on disk)."""
    if cfg.dataset == "digits":
        return dd.digits(seed=cfg.seed, image=True)
    return dd.cifar10()


def build_model(cfg: Config, num_classes: int, seed: int) -> nn.Module:
    """A freshly initialised model of ``cfg`` (from ``seed``) on ``cfg.device``."""
    if cfg.dataset == "digits":
        model = models.cnn(cfg.channels, num_classes=num_classes, image_size=8, seed=seed)
    else:
        model = models.resnet9(num_classes, width=cfg.width, norm=cfg.norm, seed=seed)
    return model.to(cfg.device)


def make_task(model: nn.Module) -> Task:
    """The task whose gradients are scored: every Conv2d and Linear parameter (so every
    per-sample gradient takes the hook path; normalisation parameters are left out)."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return Task(model, cross_entropy, params=names)


def weighted_loss(loss: Callable[[nn.Module, Any], Tensor]) -> Callable[[nn.Module, Any], Tensor]:
    """``loss`` on batches ``(x, y, w)``: ``loss(model, (x, y)) * w * B / sum(w)``, (B,).

    With 0/1 weights the batch mean is the mean loss over the batch's kept points, and a point
    of weight 0 contributes nothing to any gradient. A batch without kept points gives zeros.
    """

    def weighted(model: nn.Module, batch) -> Tensor:
        *inputs, w = batch
        per = loss(model, inputs)
        return per * w * (len(w) / w.sum().clamp_min(1.0))

    return weighted


class Retrainer:
    """``train_fn(indices, seed) -> model`` for :mod:`dropinf.study.retrain`: a fresh model from
    ``seed`` trained with ``cfg``'s recipe on the training points ``indices`` only.

    The full training set goes through :func:`dropinf.study.models.train` in the order drawn from
    ``seed``, the points outside ``indices`` with loss weight 0 (see :func:`weighted_loss`), so
    two subsets retrained with the same seed share the initialisation and the data order.
    """

    def __init__(self, cfg: Config, x: Tensor, y: Tensor, num_classes: int):
        self.cfg, self.x, self.y, self.num_classes = cfg, x, y, num_classes
        self.loss = weighted_loss(cross_entropy)
        self.augment = dd.cifar10_augment if cfg.dataset == "cifar10" else None

    def __call__(self, indices, seed: int) -> nn.Module:
        n = len(self.y)
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        if idx.numel() == 0 or idx.min() < 0 or idx.max() >= n:
            raise ValueError(f"indices must be a non-empty set of training indices in [0, {n})")
        w = torch.zeros(n)
        w[idx] = 1.0
        c = self.cfg
        model = build_model(c, self.num_classes, seed)
        models.train(model, self.loss, (self.x, self.y, w), seed=seed, epochs=c.epochs,
                     batch_size=c.batch_size, lr=c.lr, optimizer=c.optimizer,
                     weight_decay=c.weight_decay, schedule=c.schedule, warmup=c.warmup,
                     augment=self.augment, progress=False)
        return model


def target_outputs(x: Tensor, y: Tensor, block: int = 1024) -> Callable[[nn.Module], np.ndarray]:
    """``output_fn`` for :mod:`dropinf.study.retrain`: per target, ``[-loss..., correct...]``, a
    (2 n_targets,) float64 vector (both halves higher = better), in eval mode, ``block``
    points at a time."""

    def output(model: nn.Module) -> np.ndarray:
        dev = next(model.parameters()).device
        model.eval()
        loss, correct = [], []
        with torch.no_grad():
            for i in range(0, len(y), block):
                logits = model(x[i : i + block].to(dev)).double()
                yi = y[i : i + block].to(dev)
                loss.append(nn.functional.cross_entropy(logits, yi, reduction="none"))
                correct.append((logits.argmax(1) == yi).double())
        return torch.cat([-torch.cat(loss), torch.cat(correct)]).cpu().numpy()

    return output


def pick_targets(y_test, n_targets: int, seed: int) -> np.ndarray:
    """``n_targets`` distinct test indices, class-balanced: ``n_targets // C`` per class plus
    one more for the first ``n_targets % C`` classes (in label order), drawn uniformly within
    each class with ``rng_for(seed, "targets")``. Sorted by (class, draw order)."""
    y = np.asarray(y_test)
    classes = np.unique(y)
    per = [n_targets // len(classes) + (i < n_targets % len(classes))
           for i in range(len(classes))]
    rng = rng_for(seed, "targets")
    out = []
    for c, m in zip(classes, per):
        pool = np.flatnonzero(y == c)
        if m > len(pool):
            raise ValueError(f"n_targets={n_targets} needs {m} test points of class {c}, which "
                             f"has {len(pool)}; lower n_targets")
        out.append(rng.choice(pool, m, replace=False))
    return np.concatenate(out).astype(np.int64)


# --------------------------------------------------------------------------- scoring


def aggregate_scores(G_targets, G_train, damping: float) -> np.ndarray:
    """(n_train,) float64: each training point's summed score over the targets,
    ``sum_t g_t^T (F + lambda I)^{-1} g_i`` with F the empirical Fisher of ``G_train`` (n, k)
    and relative ``damping``; positive = helpful to the target set."""
    pre = Preconditioner.fit(G_train, kind="fisher", damping=damping)
    return scores(G_targets, G_train, pre).double().sum(0).numpy()


@dataclass
class Scored:
    """Every method's aggregate scores: ``scores[method][r]`` (n_train,) for draw r, with the
    matched dimension ``k``, the gradient dimension ``d``, each method's dimension ``dims``
    (``d`` for no compression) and the seconds each step took (the exact gradients shared by
    no compression and PCA; then per (method, draw): featurisation, fit and scoring)."""

    scores: dict[str, list[np.ndarray]]
    k: int
    d: int
    dims: dict[str, int]
    seconds: pd.DataFrame


def score_all(cfg: Config, task: Task, train: tuple[Tensor, Tensor],
              targets: tuple[Tensor, Tensor], progress: bool = True) -> Scored:
    """Aggregate scores of every method in ``cfg.methods`` for ``cfg.n_seeds`` draws.

    Draw r uses compressor seed ``seed_for(cfg.seed, "compressor", r)`` and, for importance
    dropout, the pilot set ``seed_for(cfg.seed, "pilot", r)`` (its gradients computed once per
    draw). Deterministic methods
    (no compression, and PCA fitted on every training gradient) are computed once and shared by
    all draws.
    """
    train_loader = dd.tensor_loader(train, cfg.grad_batch)
    target_loader = dd.tensor_loader(targets, cfg.grad_batch)
    n, d = len(train[1]), task.dim
    m = match(task, p=cfg.p)
    G_exact, times = None, []
    if any(x == IDENTITY or spec(x).needs_fit for x in cfg.methods):
        t0 = time.perf_counter()
        G_exact = gradients(task, train_loader, Identity(), progress=False)
        times.append({"method": "exact gradients", "k": d, "seconds": time.perf_counter() - t0})
    pilots: dict[int, list] = {}
    out: dict[str, list[np.ndarray]] = {m: [] for m in cfg.methods}
    dims: dict[str, int] = {}
    bar = tqdm(total=len(cfg.methods) * cfg.n_seeds, desc="scores", disable=not progress)
    with bar:
        for method in cfg.methods:
            # deterministic: no compression, and a fit on every training gradient
            once = method == IDENTITY or (spec(method).needs_fit and n <= cfg.pca_fit)
            for r in range(cfg.n_seeds):
                if once and r > 0:
                    out[method].append(out[method][0])
                    bar.update()
                    continue
                t0 = time.perf_counter()
                comp = spec(method).compressor(m, seed_for(cfg.seed, "compressor", r),
                                               sjlt_c=cfg.sjlt_c, pca_n_fit=cfg.pca_fit)
                if spec(method).pilot and r not in pilots:
                    idx = torch.from_numpy(pilot_subset(n, cfg.n_pilot,
                                                        seed_for(cfg.seed, "pilot", r)))
                    pilots[r] = pilot_grads(task, dd.tensor_loader(
                        (train[0][idx], train[1][idx]), cfg.grad_batch))
                comp = ready(comp, task, d if method == IDENTITY else m.k,
                             None if G_exact is None else G_exact.data, pilot=pilots.get(r))
                if comp is None:
                    raise ValueError(f"{label(method)} at k={m.k} needs at least k of the {n} "
                                     f"training gradients it is fitted on (pca_fit={cfg.pca_fit}); "
                                     "raise pca_fit or p")
                G_train = (G_exact if method == IDENTITY else
                           gradients(task, train_loader, comp, progress=False))
                G_targets = gradients(task, target_loader, comp, progress=False)
                out[method].append(aggregate_scores(G_targets.data, G_train.data, cfg.damping))
                dims[method] = G_train.shape[1]
                times.append({"method": method, "draw": r, "k": dims[method],
                              "seconds": time.perf_counter() - t0})
                bar.update()
    return Scored(out, m.k, d, dims, pd.DataFrame(times))


# --------------------------------------------------------------------------- removal


def top_removed(agg, m: int, helpful: bool = True) -> np.ndarray:
    """The m training indices with the largest aggregate scores (most helpful), or the
    smallest (most harmful) with ``helpful=False``; ties go to the lower index. Sorted."""
    agg = np.asarray(agg, dtype=np.float64)
    if not 1 <= m <= len(agg):
        raise ValueError(f"m={m} must be between 1 and the {len(agg)} training points")
    order = np.argsort(-agg if helpful else agg, kind="stable")
    return np.sort(order[:m])


def n_removed(fraction: float, n: int) -> int:
    """Training points removed at ``fraction``: ``round(fraction n)``, at least 1."""
    return max(1, round(fraction * n))


def removal_plan(cfg: Config, scored: Scored, n: int) -> list[dict]:
    """Every subset to retrain: for draw r, the full set, then per fraction each method's
    most helpful points, the reference method's most harmful and random points
    (``rng_for(cfg.seed, "random", r)``, nested across fractions). Each entry holds ``draw``,
    ``kind``, ``method``, ``fraction``, ``removed`` (sorted indices) and ``overlap_reference``
    (the share of ``removed`` that the reference method's removal of the same kind, fraction
    and draw also removes; NaN for random and the full set)."""
    plan = []
    for r in range(cfg.n_seeds):
        plan.append({"draw": r, "kind": "full", "method": "full", "fraction": 0.0,
                     "removed": np.zeros(0, np.int64), "overlap_reference": np.nan})
        perm = rng_for(cfg.seed, "random", r).permutation(n)
        ref = scored.scores[cfg.reference][r]
        for f in cfg.fractions:
            m = n_removed(f, n)
            ref_top = top_removed(ref, m)
            for method in cfg.methods:
                removed = top_removed(scored.scores[method][r], m)
                plan.append({"draw": r, "kind": "helpful", "method": method, "fraction": f,
                             "removed": removed,
                             "overlap_reference": len(np.intersect1d(removed, ref_top)) / m})
            plan.append({"draw": r, "kind": "harmful", "method": "harmful", "fraction": f,
                         "removed": top_removed(ref, m, helpful=False), "overlap_reference": 1.0})
            plan.append({"draw": r, "kind": "random", "method": "random", "fraction": f,
                         "removed": np.sort(perm[:m]), "overlap_reference": np.nan})
    return plan


def retrain_all(cfg: Config, plan: list[dict], train_fn, output_fn, n: int,
                progress: bool = True) -> pd.DataFrame:
    """Retrain every subset of ``plan`` (draw r with retraining seed
    ``seed_for(cfg.seed, "retrain", r)``) and tabulate the targets' mean loss and accuracy,
    and their change against the full-data model of the same draw: one row per retrain, with
    ``delta_loss = loss(removed) - loss(full)`` (> 0: the removal hurt the targets) and
    ``delta_acc`` likewise."""
    rows = []
    for r in range(cfg.n_seeds):
        entries = [e for e in plan if e["draw"] == r]
        if entries[0]["kind"] != "full":
            raise ValueError("each draw of the plan must start with its full-data entry")
        masks = np.ones((len(entries), n), dtype=bool)
        for i, e in enumerate(entries):
            masks[i, e["removed"]] = False
        seed = seed_for(cfg.seed, "retrain", r)
        out = subset_outputs(train_fn, output_fn, masks, seeds=[seed], progress=progress,
                             desc=f"retrain, draw {r + 1}/{cfg.n_seeds}")
        half = out.shape[1] // 2
        loss, acc = -out[:, :half].mean(1), out[:, half:].mean(1)
        for i, e in enumerate(entries):
            rows.append({"draw": r, "retrain_seed": seed, "kind": e["kind"],
                         "method": e["method"], "fraction": e["fraction"],
                         "n_removed": len(e["removed"]), "target_loss": loss[i],
                         "target_acc": acc[i], "delta_loss": loss[i] - loss[0],
                         "delta_acc": acc[i] - acc[0],
                         "overlap_reference": e["overlap_reference"]})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- analysis


def effects(df: pd.DataFrame) -> pd.DataFrame:
    """Per (method, fraction) of the removals: mean and sample standard deviation (ddof=1)
    over draws of ``delta_loss`` and ``delta_acc``, the number of draws and the mean overlap
    with the reference method's removal."""
    rem = df[df.kind != "full"]
    g = rem.groupby(["kind", "method", "fraction"], sort=False)
    out = g.agg(loss_mean=("delta_loss", "mean"), loss_std=("delta_loss", "std"),
                acc_mean=("delta_acc", "mean"), acc_std=("delta_acc", "std"),
                n_draws=("draw", "nunique"), overlap_reference=("overlap_reference", "mean"))
    return out.reset_index()


def holm(p) -> np.ndarray:
    """Holm's step-down adjustment of the p-values ``p`` (one family of tests), same order;
    NaN stays NaN and counts as no test."""
    p = np.asarray(p, dtype=np.float64)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m = len(order)
    running = 0.0
    for j, i in enumerate(order):
        running = max(running, min(1.0, (m - j) * p[i]))
        out[i] = running
    return out


def compare(df: pd.DataFrame, fraction: float, baseline: str = "random") -> pd.DataFrame:
    """Paired comparison (over draws, which share the retraining seed) of each removal's
    ``delta_loss`` at ``fraction`` with that of ``baseline``: mean difference, its 95% t
    interval, the two-sided paired t-test p-value (``scipy.stats.ttest_rel``) and that p-value
    adjusted by :func:`holm` over the removals compared (``p_holm``)."""
    at = df[(df.kind != "full") & np.isclose(df.fraction, fraction)]
    wide = at.pivot(index="draw", columns="method", values="delta_loss")
    if baseline not in wide:
        raise ValueError(f"baseline={baseline!r} is not among the removals {list(wide)}")
    rows = []
    for method in wide.columns:
        if method == baseline:
            continue
        diff = (wide[method] - wide[baseline]).to_numpy()
        n = len(diff)
        mean, sd = float(diff.mean()), float(diff.std(ddof=1))
        half = float(sps.t.ppf(0.975, n - 1)) * sd / np.sqrt(n)
        p = float(sps.ttest_rel(wide[method], wide[baseline]).pvalue) if sd > 0 else np.nan
        rows.append({"method": method, "baseline": baseline, "fraction": fraction,
                     "diff_mean": mean, "diff_low": mean - half, "diff_high": mean + half,
                     "p_value": p, "n_draws": n})
    out = pd.DataFrame(rows)
    out["p_holm"] = holm(out.p_value)
    return out


def summarize(cfg: Config, eff: pd.DataFrame, tests: pd.DataFrame) -> dict:
    """The JSON-able numbers of the notebook: ``removal_effect`` (method, ``random`` and
    ``harmful`` -> {mean, std} of the targets' loss change at the main fraction), the same for
    accuracy, the paired tests against random removal, and ``main_fraction``."""
    main = eff[np.isclose(eff.fraction, cfg.main_fraction)].set_index("method")
    names = [*cfg.methods, *BASELINES]

    def pick(col: str) -> dict:
        return {m: {"mean": float(main.at[m, f"{col}_mean"]),
                    "std": float(main.at[m, f"{col}_std"])} for m in names}

    return {
        "main_fraction": cfg.main_fraction,
        "removal_effect": pick("loss"),
        "removal_effect_accuracy": pick("acc"),
        "vs_random": {row.method: {"diff_mean": row.diff_mean, "diff_low": row.diff_low,
                                   "diff_high": row.diff_high, "p_value": row.p_value,
                                   "p_holm": row.p_holm}
                      for row in tests.itertuples()},
        "overlap_with_reference": {m: float(main.at[m, "overlap_reference"])
                                   for m in cfg.methods},
    }


def conclude(cfg: Config, eff: pd.DataFrame, df: pd.DataFrame, n_train: int,
             alpha: float = 0.05) -> str:
    """The notebook's conclusion, every sentence computed from ``eff`` (:func:`effects`) and
    the retrains ``df`` (paired t-tests over draws, :func:`compare`, at level ``alpha``).

    Multiple comparisons: the tests against random removal are Holm-adjusted over the removals
    compared (every method and the most harmful points);
    a comparison between methods chosen after looking (the best against the worst, a dropout
    method against the best other) is Bonferroni-adjusted for the pairs it was chosen from.
    """
    f = cfg.main_fraction
    main = eff[np.isclose(eff.fraction, f)].set_index("method")
    t = compare(df, f).set_index("method")
    R = int(main.n_draws.min())
    M = len(cfg.methods)

    def pm(name: str) -> str:
        return f"{main.at[name, 'loss_mean']:+.4f} ± {main.at[name, 'loss_std']:.4f}"

    def against(name: str, other: str, pairs: int) -> tuple[float, float]:
        """Mean paired difference of ``name`` over ``other`` and its Bonferroni p-value."""
        row = compare(df, f, baseline=other).set_index("method").loc[name]
        return float(row.diff_mean), min(1.0, float(row.p_value) * pairs)

    ranked = sorted(cfg.methods, key=lambda x: -main.at[x, "loss_mean"])
    sig = [x for x in ranked if t.at[x, "p_holm"] < alpha and t.at[x, "diff_mean"] > 0]
    lines = [
        f"Removing {f:.0%} of the training set ({n_removed(f, n_train)} of {n_train} points) "
        f"and retraining changed the mean loss of the {cfg.n_targets} target test points by "
        f"(mean ± std over {R} draws, each with its own retraining seed): "
        + "; ".join(f"{label(x)} {pm(x)}" for x in ranked)
        + f"; random points {pm('random')}; the most harmful points (by "
        f"{label(cfg.reference)}) {pm('harmful')}."
    ]
    test_words = f"paired t-test over {R} draws, Holm-adjusted over the {len(t)} removals"
    if sig:
        lines.append(
            f"{len(sig)} of {M} methods raise the targets' loss more than random removal at "
            f"the {alpha:.0%} level ({test_words}): "
            + ", ".join(f"{label(x)} (adjusted p = {t.at[x, 'p_holm']:.2g})" for x in sig)
            + ".")
    else:
        lines.append(f"No method raises the targets' loss more than random removal at the "
                     f"{alpha:.0%} level ({test_words}).")
    rest = [x for x in ranked if x not in sig]
    if sig and rest:
        lines.append("Not distinguishable from random removal: "
                     + ", ".join(f"{label(x)} (adjusted p = {t.at[x, 'p_holm']:.2g})"
                                 for x in rest) + ".")
    h = t.loc["harmful"]
    lines.append(
        f"Removing the most harmful points instead changed the loss by {pm('harmful')}, "
        f"{h.diff_mean:+.4f} against random removal (95% interval [{h.diff_low:+.4f}, "
        f"{h.diff_high:+.4f}], p = {h.p_value:.2g})"
        + (": lower than random removal." if h.diff_high < 0 else
           ": not lower than random removal, so the points these scores call harmful are "
           "not measurably harmful here."))
    if M > 1:
        top, bottom = ranked[0], ranked[-1]
        diff, p = against(top, bottom, M * (M - 1) // 2)
        lines.append(
            f"Between methods the mean effects run from {main.at[top, 'loss_mean']:+.4f} "
            f"({label(top)}) to {main.at[bottom, 'loss_mean']:+.4f} ({label(bottom)}); that "
            f"gap of {diff:+.4f} has p = {p:.2g} after a Bonferroni correction for the "
            f"{M * (M - 1) // 2} pairs, so "
            + ("the extremes of the ordering are separated beyond the retraining noise."
               if p < alpha else
               "the ordering of the methods is within the retraining noise of these draws."))
    for drop in sorted(in_family(ranked, "mask"), key=lambda x: not spec(x).factored):
        if drop not in ranked or M < 2:
            continue
        rank = ranked.index(drop) + 1
        best = next(x for x in ranked if x != drop)
        diff, p = against(drop, best, M - 1)
        where = (f"ahead of the next, {label(best)}, by {diff:+.4f}" if rank == 1 else
                 f"behind the best, {label(best)}, by {-diff:.4f}")
        verdict = ("significant" if p < alpha else "not significant") + f", p = {p:.2g}"
        lines.append(
            f"{label(drop).capitalize()} ranks {rank} of {M} ({pm(drop)}), {where} "
            f"({verdict} after a Bonferroni correction for {M - 1} pairs); its removed set "
            f"shares {main.at[drop, 'overlap_reference']:.0%} of its points with that of "
            f"{label(cfg.reference)}.")
    return " ".join(lines)


# --------------------------------------------------------------------------- the whole run


@dataclass
class Result:
    """Everything notebook 05 shows, computed by :func:`run`: the retrains (one row each),
    effects per (method, fraction), paired tests against random removal at the main fraction,
    timings, the compressed dimension k, the gradient dimension d, the targets and the base
    model's accuracy on the test split and on the targets."""

    cfg: Config
    retrains: pd.DataFrame
    effects: pd.DataFrame
    tests: pd.DataFrame
    timings: pd.DataFrame
    k: int
    d: int
    n_train: int
    targets: np.ndarray
    base_test_acc: float
    base_target_loss: float


def run(cfg: Config, progress: bool = True) -> Result:
    """Steps 1-4 of the module docstring for ``cfg``."""
    check_device(cfg.device)
    with threads(cfg.threads):
        data = load_data(cfg)
        n = len(data.y_train)
        targets = pick_targets(data.y_test, cfg.n_targets, cfg.seed)
        tx, ty = data.x_test[targets], data.y_test[targets]
        retrainer = Retrainer(cfg, data.x_train, data.y_train, data.num_classes)
        t0 = time.perf_counter()
        base = retrainer(np.arange(n), seed_for(cfg.seed, "base"))
        base_s = time.perf_counter() - t0
        out = target_outputs(data.x_test, data.y_test)(base)
        n_test = len(data.y_test)
        base_acc = float(out[n_test:].mean())
        base_loss = float(-out[:n_test][targets].mean())
        scored = score_all(cfg, make_task(base), data.train, (tx, ty), progress)
        plan = removal_plan(cfg, scored, n)
        t0 = time.perf_counter()
        df = retrain_all(cfg, plan, retrainer, target_outputs(tx, ty), n, progress)
        retrain_s = time.perf_counter() - t0
    eff = effects(df)
    tests = compare(df, cfg.main_fraction)
    timings = pd.concat([
        scored.seconds.assign(step="scores"),
        pd.DataFrame([{"step": "base model", "seconds": base_s},
                      {"step": f"retrain {len(df)} models", "seconds": retrain_s}]),
    ], ignore_index=True)
    return Result(cfg, df, eff, tests, timings, scored.k, scored.d, n, targets, base_acc,
                  base_loss)


# Result field -> the table's file name under tables/
TABLES = {"retrains": "retrains", "effects": "effects", "tests": "vs_random",
          "timings": "timings"}


def timing_table(res: Result) -> pd.Series:
    """Seconds per step (scores, base model, retrains), to 0.1 s."""
    return res.timings.groupby("step", sort=False).seconds.sum().round(1)


def summary(res: Result) -> dict:
    """summary.json: :func:`summarize`'s numbers, the conclusion (:func:`conclude`), the sizes,
    the targets and the base model."""
    cfg = res.cfg
    return {
        **summarize(cfg, res.effects, res.tests),
        "conclusion": conclude(cfg, res.effects, res.retrains, res.n_train),
        "n_train": res.n_train,
        "n_targets": cfg.n_targets,
        "targets": res.targets.tolist(),
        "d": res.d,
        "k": res.k,
        "base_test_accuracy": res.base_test_acc,
        "base_target_loss": res.base_target_loss,
    }


# --------------------------------------------------------------------------- figure


def plot(res: Result):
    """Three panels: the targets' loss change and accuracy change against the fraction
    removed (mean ± std over draws), and the loss change at the main fraction per removal
    (bars: mean ± std, dots: each draw)."""
    import matplotlib.pyplot as plt

    cfg, eff, df = res.cfg, res.effects, res.retrains
    names = [*cfg.methods, *BASELINES]
    style = {"random": "--", "harmful": ":"}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    step = 0.3 * min(np.diff([0.0, *cfg.fractions])) * 100 / len(names)  # error bars side by side
    for col, ax, ylabel in (("loss", axes[0], "change in the targets' mean loss"),
                            ("acc", axes[1], "change in the targets' accuracy")):
        for i, name in enumerate(names):
            e = eff[eff.method == name].sort_values("fraction")
            x = e.fraction * 100 + (i - (len(names) - 1) / 2) * step
            ax.errorbar(x, e[f"{col}_mean"], yerr=e[f"{col}_std"], marker="o", ms=4,
                        capsize=2, color=color(name), ls=style.get(name, "-"),
                        label=label(name))
        ax.axhline(0, color="0.7", lw=0.8)
        ax.set_xlabel("training points removed (% of the training set)")
        ax.set_ylabel(f"{ylabel}\n(retrained without them − retrained on all)")
        ax.set_xticks([f * 100 for f in cfg.fractions])
    axes[0].set_title("top-k% most helpful removed (sum of scores over targets;\n"
                      "positive score = helpful), mean ± std over draws", fontsize=9)
    axes[1].set_title("accuracy on the targets", fontsize=9)
    axes[0].legend(fontsize=7, ncol=2, loc="upper left")
    ax = axes[2]
    main = eff[np.isclose(eff.fraction, cfg.main_fraction)].set_index("method").loc[names]
    pos = np.arange(len(names))
    ax.bar(pos, main.loss_mean, yerr=main.loss_std, capsize=3,
           color=[color(m) for m in names], alpha=0.75)
    at = df[np.isclose(df.fraction, cfg.main_fraction) & (df.kind != "full")]
    for i, name in enumerate(names):
        v = at[at.method == name].delta_loss.to_numpy()
        ax.plot(np.full(len(v), pos[i]), v, "o", color="white", mec="black", ms=4)
    ax.axhline(0, color="0.7", lw=0.8)
    ax.set_xticks(pos, [label(m) for m in names], rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("change in the targets' mean loss")
    ax.set_title(f"{cfg.main_fraction:.0%} removed: bars mean ± std, dots one draw each",
                 fontsize=9)
    fig.tight_layout()
    return fig
