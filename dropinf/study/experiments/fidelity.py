"""Notebook 02 (fidelity): how close is each compressor to exact influence, and to retraining?

What ``notebooks/02_fidelity.ipynb`` computes, here so that it is tested:

- reference models fitted to a tight gradient norm with weight decay (:func:`fit_model`):
  L2-regularised multinomial logistic regression and a small tanh MLP on scikit-learn digits
  (``cpu-quick``), ResNet-9 on CIFAR-10 (``gpu``);
- reference scores in the full parameter space (:func:`reference_scores`): ``exact`` (Hessian
  of the regularised training loss), ``ggn`` (Gauss-Newton) and ``identity`` (the uncompressed
  empirical Fisher, the same estimator as the compressed rows without compression);
- every compressor at matched output dimension k per compression ratio (:func:`matched_dims`,
  :func:`build_compressor`) with the compressed-space Fisher and one relative damping
  (:func:`compressed_scores`);
- the retraining ground truth (:func:`ground_truth`): leave-one-out effects for the convex
  model and LDS subsets for every model;
- per row, agreement with exact scores, LOO correlation and LDS (:func:`fidelity_metrics`),
  their means and spreads over seeds (:func:`summary_table`), the notebook's summary and
  conclusion written from the numbers (:func:`make_summary`), and the figure
  (:func:`plot_fidelity`).

Matched dimension (:func:`~.methods.match`): for a nominal ratio r the factored dropout rate p
(a multiple of 1e-4, the smallest giving its dimension) is the one whose factored-dropout
dimension is closest to ``d / r`` (in log); k is that dimension exactly, and every other method
is built with that same k (flat dropout at rate ``1 - k / d``, factored Gaussian at the same p,
which has the same dimension by construction). Scores follow the package convention: positive
= helpful.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ...compressors import Compressor, Identity, Layout
from ...curvature import Preconditioner
from ...gradients import gradients
from ...losses import cross_entropy
from ...scores import scores
from ...task import Task
from .. import data, metrics, models, retrain
from .common import Profiled, check_int, check_names, float_list, rng_for, seed_for, threads
from .methods import (
    FAMILIES,
    IDENTITY,
    Match,
    color,
    compared,
    compressors,
    in_family,
    match,
    pilot_grads,
    pilot_subset,
    ready,
    spec,
    uniform_of,
)
from .methods import label as method_label

METHODS = compared()
REFERENCES = compared("reference")
MODELS = ("logreg", "mlp", "resnet9")


def label(name: str) -> str:
    """The method's label; the ``identity`` reference is the uncompressed Fisher here."""
    return "uncompressed Fisher" if name == IDENTITY else method_label(name)
MODEL_LABELS = {"logreg": "logistic regression", "mlp": "MLP", "resnet9": "ResNet-9"}
METRICS = ("pearson", "spearman", "spearman_overall", "topk", "spearman_vs_identity", "loo",
           "lds")
DIGITS_SPLIT = (1437, 360)  # train / test sizes of data.digits at its default test_fraction
CIFAR_SPLIT = (50_000, 10_000)
DATTRI = {"loo": 0.88, "lds": 0.80}  # dattri's exact influence on logistic regression, MNIST


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Config(Profiled):
    """Every knob of notebook 02; the defaults are the ``cpu-quick`` profile.

    Models: ``models`` among ``logreg``, ``mlp`` (``64-hidden-10``, tanh) and ``resnet9``
    (``width``), trained with weight decay ``l2`` (the ``l2/2 |theta|^2`` of
    :func:`dropinf.study.models.fit_full_batch`) on ``n_train`` points, evaluated on ``n_test``;
    L-BFGS fits take at most ``fit_iter`` iterations. Methods: ``methods`` at each compression
    ratio of ``ratios`` (d / k), ``n_seeds`` draws each; ``references`` in the full space.
    Curvature: compressed-space empirical Fisher with relative ``damping`` (``lambda = damping
    * trace(F) / k``) for every compressed method and the ``identity`` reference. SJLT uses
    ``sjlt_c`` nonzeros per column (the largest divisor of k not above it); PCA is fitted on
    ``pca_n_fit`` training gradients drawn per seed; importance dropout (the methods with
    ``pilot``) on the gradients of ``n_pilot`` training points, a subset drawn per model and
    seed (the pilot is training data: no test point is seen). Metrics: top-``top_k`` overlap,
    ``n_boot`` bootstrap resamples for intervals, LOO on ``n_loo`` removed points (convex model
    only), LDS on ``n_subsets`` subsets of ``fraction`` of the training set, non-convex models
    retrained ``retrain_seeds`` times per subset from seeded initialisations (the same seeds
    for every subset), with at most ``retrain_iter`` L-BFGS iterations (MLP) or ``epochs`` of
    SGD (ResNet-9: ``batch_size``, peak ``lr``). ``threads``: torch CPU threads while computing
    (0 leaves torch's setting; one thread is fastest for these tiny models).
    """

    seed: int = 0
    models: tuple[str, ...] = ("logreg", "mlp")
    n_train: int = 1200
    n_test: int = 100
    hidden: int = 32
    l2: float = 1e-3
    fit_iter: int = 1000
    ratios: tuple[float, ...] = (2.0, 4.0, 16.0, 64.0, 256.0)
    methods: tuple[str, ...] = METHODS
    references: tuple[str, ...] = REFERENCES
    n_seeds: int = 3
    damping: float = 0.1
    sjlt_c: int = 1
    pca_n_fit: int = 1024
    n_pilot: int = 256
    top_k: int = 10
    n_boot: int = 200
    n_loo: int = 50
    n_subsets: int = 50
    fraction: float = 0.5
    retrain_seeds: int = 2
    retrain_iter: int = 300
    width: int = 64
    epochs: int = 16
    batch_size: int = 512
    lr: float = 0.2
    threads: int = 1

    def __post_init__(self) -> None:
        check_names(self, "models", MODELS)
        check_names(self, "methods", compressors(), empty=True)
        check_names(self, "references", REFERENCES, empty=True)
        ratios = float_list("ratios", self.ratios)
        if any(not r >= 1 for r in ratios) or len(set(ratios)) != len(ratios):
            raise ValueError(f"ratios={ratios!r} must be distinct compression ratios d/k >= 1")
        object.__setattr__(self, "ratios", tuple(sorted(ratios)))
        for name, low in (("seed", 0), ("n_train", 4), ("n_test", 2), ("hidden", 1),
                          ("fit_iter", 1), ("n_seeds", 1), ("sjlt_c", 1), ("pca_n_fit", 1),
                          ("n_pilot", 1), ("top_k", 1), ("n_boot", 0), ("n_loo", 0),
                          ("n_subsets", 3), ("retrain_seeds", 1), ("retrain_iter", 1), ("width", 1),
                          ("epochs", 1), ("batch_size", 1)):
            check_int(self, name, low)
        check_int(self, "threads", 0)
        if self.n_pilot > self.n_train and any(spec(m).pilot for m in self.methods):
            raise ValueError(f"n_pilot={self.n_pilot} exceeds n_train={self.n_train}; lower "
                             "n_pilot (the pilot set is a subset of the training points)")
        if self.top_k > self.n_train:
            raise ValueError(f"top_k={self.top_k} exceeds n_train={self.n_train}")
        if self.n_loo > self.n_train:
            raise ValueError(f"n_loo={self.n_loo} exceeds n_train={self.n_train}; lower n_loo")
        limits = {"logreg": DIGITS_SPLIT, "mlp": DIGITS_SPLIT, "resnet9": CIFAR_SPLIT}
        for m in self.models:
            n_tr, n_te = limits[m]
            if self.n_train > n_tr or self.n_test > n_te:
                raise ValueError(
                    f"n_train={self.n_train}, n_test={self.n_test}: the {m} data set has "
                    f"{n_tr} training and {n_te} test points; lower them"
                )
        for name in ("l2", "damping", "lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"{name}={v!r} must be a number >= 0")
        if not self.l2 > 0:
            raise ValueError(
                f"l2={self.l2!r} must be > 0: exact influence needs a positive definite Hessian"
            )
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r} must be > 0")
        if not 0 < self.fraction < 1:
            raise ValueError(f"fraction={self.fraction!r} must be in (0, 1); 0.5 is usual")


PROFILES: dict[str, dict] = {
    "cpu-quick": {},
    "gpu": {
        "models": ("resnet9",),
        "n_train": 10_000,
        "n_test": 200,
        "l2": 5e-4,
        # d is about 6.6M: only k of a few thousand is storable for n_train gradients, and a
        # dense Gaussian or PCA map of k x d is not (nor is any full-space reference).
        "ratios": (1024.0, 4096.0, 16384.0),
        "methods": ("dropout", "dropout_factored", "gaussian_factored", "sjlt"),
        "references": (),
        "n_subsets": 50,
        "retrain_seeds": 1,
        "n_loo": 0,
        "threads": 0,
    },
}
# The gpu profile's code paths (ResNet-9 on CIFAR-10) at toy size on the CPU, for the test
# suite (no results).
PROFILES["gpu-smoke"] = {
    **PROFILES["gpu"], "n_train": 24, "n_test": 4, "width": 4, "epochs": 1, "batch_size": 8,
    "ratios": (1024.0, 4096.0), "n_seeds": 2, "n_subsets": 4, "n_boot": 0, "threads": 1,
}


# --------------------------------------------------------------------------- models


@dataclass
class Fitted:
    """A reference model at (near) a stationary point of its regularised loss.

    ``train`` and ``test`` are ``(x, y)`` batches (on the model's device); ``retrain_lds`` and
    ``retrain_loo`` are ``train_fn(indices, seed) -> model`` of :mod:`dropinf.study.retrain` (LOO
    only for a convex model); ``retrain_seeds`` the seeds each subset is retrained with. ``info``:
    d, sizes, test accuracy, the gradient norm reached.
    """

    name: str
    task: Task
    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    retrain_lds: retrain.TrainFn
    retrain_loo: retrain.TrainFn | None
    retrain_seeds: tuple[int, ...]
    batch: int = 256
    info: dict = field(default_factory=dict)

    @property
    def d(self) -> int:
        return self.task.dim

    @property
    def n_train(self) -> int:
        return len(self.train[1])

    def loader(self, split: str) -> list[tuple[Tensor, Tensor]]:
        """The split as a list of ``(x, y)`` batches in dataset order."""
        x, y = self.train if split == "train" else self.test
        b = self.batch
        return [(x[i : i + b], y[i : i + b]) for i in range(0, len(x), b)]

    def output_fn(self) -> retrain.OutputFn:
        """``-loss`` per test point (higher = better), the measured output of LOO and LDS."""
        return retrain.negative_loss(cross_entropy, self.test)


def _accuracy(model: nn.Module, batch: tuple[Tensor, Tensor]) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(batch[0]).argmax(1) == batch[1]).double().mean())


def fit_model(cfg: Config, name: str) -> Fitted:
    """Split the data by ``cfg.seed``, fit model ``name`` and its retraining functions.

    ``logreg``: ``Linear(64, 10)`` in float64 on digits, L-BFGS to a tight gradient norm; LOO
    by :class:`~dropinf.study.retrain.ConvexRetrainer` on the full objective (removal = weight 0
    instead of 1/n, what influence linearises), LDS subsets on their own mean loss plus
    ``l2/2 |theta|^2`` (the usual retraining), warm-started, deterministic.
    ``mlp``: ``64-hidden-10`` with tanh (smooth, so the Hessian exists everywhere and L-BFGS
    converges) in float64, L-BFGS from a seeded initialisation; each LDS subset model is
    L-BFGS from a seeded initialisation on the subset's own objective.
    ``resnet9``: CIFAR-10 (``dropinf.study.data.cifar10``; it must be on disk), SGD with a linear
    schedule and the usual augmentation; influence on the conv and linear weights.
    """
    if name == "resnet9":
        return _fit_resnet9(cfg)
    if name not in ("logreg", "mlp"):
        raise ValueError(f"model {name!r} is not one of {MODELS}")
    ds = data.digits(cfg.seed)
    train = ds.x_train[: cfg.n_train].double(), ds.y_train[: cfg.n_train]
    test = ds.x_test[: cfg.n_test].double(), ds.y_test[: cfg.n_test]
    n_in, n_out = train[0].shape[1], ds.num_classes
    sizes = [n_in, n_out] if name == "logreg" else [n_in, cfg.hidden, n_out]

    def build(seed: int) -> nn.Module:
        return models.mlp(sizes, activation=nn.Tanh, seed=seed).double()

    model = build(seed_for(cfg.seed, "init", name))
    grad_norm = models.fit_full_batch(model, cross_entropy, train, l2=cfg.l2,
                                      max_iter=cfg.fit_iter)
    model.eval()
    task = Task(model, cross_entropy)
    info = {"model": name, "d": task.dim, "n_train": cfg.n_train, "n_test": cfg.n_test,
            "l2": cfg.l2, "grad_norm": grad_norm, "test_accuracy": _accuracy(model, test)}
    if name == "logreg":
        loo = retrain.ConvexRetrainer(model, cross_entropy, train, l2=cfg.l2,
                                      max_iter=cfg.fit_iter)
        lds = retrain.ConvexRetrainer(model, cross_entropy, train, l2=cfg.l2,
                                      max_iter=cfg.fit_iter, same_objective=False)
        return Fitted(name, task, train, test, lds, loo, (0,), info=info)

    grad_norms: list[float] = []

    def retrain_mlp(indices: np.ndarray, seed: int) -> nn.Module:
        m = build(seed)
        grad_norms.append(models.fit_full_batch(
            m, cross_entropy, retrain.subset_batch(train, indices), l2=cfg.l2,
            max_iter=cfg.retrain_iter))
        return m

    info["retrain_grad_norms"] = grad_norms
    seeds = tuple(seed_for(cfg.seed, "retrain", name, r) for r in range(cfg.retrain_seeds))
    return Fitted(name, task, train, test, retrain_mlp, None, seeds, info=info)


def _fit_resnet9(cfg: Config) -> Fitted:
    """ResNet-9 (batch norm) on a seeded subset of CIFAR-10, trained on ``cuda`` if present."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ds = data.cifar10()
    rng = rng_for(cfg.seed, "cifar10")
    tr = torch.from_numpy(np.sort(rng.permutation(len(ds.y_train))[: cfg.n_train]))
    te = torch.from_numpy(np.sort(rng.permutation(len(ds.y_test))[: cfg.n_test]))
    train = ds.x_train[tr].to(device), ds.y_train[tr].to(device)
    test = ds.x_test[te].to(device), ds.y_test[te].to(device)

    def fit(indices: np.ndarray | None, seed: int) -> nn.Module:
        m = models.resnet9(ds.num_classes, width=cfg.width, seed=seed).to(device)
        batch = train if indices is None else retrain.subset_batch(train, indices)
        models.train(m, cross_entropy, batch, seed=seed, epochs=cfg.epochs,
                     batch_size=cfg.batch_size, lr=cfg.lr, optimizer="sgd",
                     weight_decay=cfg.l2, schedule="linear", warmup=0.2,
                     augment=data.cifar10_augment, progress=False)
        return m

    model = fit(None, seed_for(cfg.seed, "init", "resnet9"))
    # conv and linear weights take the hook path; batch-norm parameters are left out
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    task = Task(model, cross_entropy, params=names)
    info = {"model": "resnet9", "d": task.dim, "n_train": cfg.n_train, "n_test": cfg.n_test,
            "l2": cfg.l2, "grad_norm": None, "test_accuracy": _accuracy(model, test)}
    seeds = tuple(seed_for(cfg.seed, "retrain", "resnet9", r) for r in range(cfg.retrain_seeds))
    return Fitted("resnet9", task, train, test, fit, None, seeds, batch=64, info=info)


# --------------------------------------------------------------------------- scores


def exact_gradients(fitted: Fitted) -> tuple[Tensor, Tensor]:
    """Uncompressed per-sample gradients ``(G_train (n_train, d), G_test (n_test, d))`` in the
    model's precision (float64 here)."""
    dtype = next(fitted.task.model.parameters()).dtype
    return tuple(gradients(fitted.task, fitted.loader(s), Identity(), progress=False, dtype=dtype)
                 .data for s in ("train", "test"))


def reference_scores(cfg: Config, fitted: Fitted, G_train: Tensor, G_test: Tensor
                     ) -> dict[str, tuple[np.ndarray, dict]]:
    """``{reference: (scores (n_test, n_train) float64, fit info)}`` for ``cfg.references``.

    ``exact`` and ``ggn``: ``Preconditioner.fit_exact`` with the model's ``l2`` and no damping
    (the regulariser makes them positive definite; the fit refuses an indefinite Hessian).
    ``identity``: the uncompressed empirical Fisher with relative damping ``cfg.damping``.
    """
    out = {}
    for ref in cfg.references:
        if ref == "identity":
            pre = Preconditioner.fit(G_train, "fisher", cfg.damping)
        else:
            pre = Preconditioner.fit_exact(fitted.task, fitted.loader("train"), l2=cfg.l2,
                                           kind=ref)
        out[ref] = (scores(G_test, G_train, pre).double().numpy(), dict(pre.info))
    return out


def matched_dims(task: Task, ratios: tuple[float, ...]) -> pd.DataFrame:
    """One row per nominal ratio (:func:`~.methods.match`): ``ratio``, factored dropout rate
    ``p``, the common ``k`` (the factored dimension at p), ``actual_ratio = d / k`` and the
    flat dropout rate ``p_flat = 1 - k/d``."""
    layout = Layout.of(task)
    rows = []
    for r in ratios:
        m = match(layout, ratio=r)
        rows.append({"ratio": r, "p": m.p, "k": m.k, "actual_ratio": m.ratio, "p_flat": m.p_flat})
    return pd.DataFrame(rows)


def build_compressor(method: str, m: Match, seed: int, cfg: Config, task: Task,
                     G_train: Tensor | None = None, pca_cache: dict | None = None,
                     pilot=None) -> Compressor | None:
    """``method`` at the matched setting ``m`` drawn from ``seed``, bound to ``task``
    (:func:`~.methods.build`, :func:`~.methods.ready`): SJLT with up to ``cfg.sjlt_c`` nonzeros
    per column, PCA fitted on ``cfg.pca_n_fit`` rows of the uncompressed training gradients
    ``G_train``, once per seed with a ``pca_cache``; None for PCA when k exceeds what those rows
    span; importance dropout fitted on ``pilot`` (training batches or their
    :func:`~.methods.pilot_grads`)."""
    comp = spec(method).compressor(m, seed, sjlt_c=cfg.sjlt_c, pca_n_fit=cfg.pca_n_fit)
    return ready(comp, task, m.k, G_train, pca_cache, pilot)


def pilot_set(cfg: Config, fitted: Fitted, draw: int) -> list[tuple[Tensor, Tensor]]:
    """``cfg.n_pilot`` training points (a subset drawn from ``(cfg.seed, model, draw)``) as
    batches: importance dropout is fitted on them, so the spread over draws holds the pilot's."""
    idx = torch.from_numpy(pilot_subset(fitted.n_train, cfg.n_pilot,
                                        seed_for(cfg.seed, "pilot", fitted.name, draw)))
    x, y = fitted.train[0][idx], fitted.train[1][idx]
    return [(x[i : i + fitted.batch], y[i : i + fitted.batch])
            for i in range(0, len(y), fitted.batch)]


def compressed_scores(fitted: Fitted, comp: Compressor, damping: float) -> np.ndarray:
    """(n_test, n_train) float64 scores with ``comp``'s gradients and the compressed-space
    empirical Fisher at relative ``damping``; positive = helpful."""
    G_tr, G_te = (gradients(fitted.task, fitted.loader(s), comp, progress=False).data
                  for s in ("train", "test"))
    pre = Preconditioner.fit(G_tr, "fisher", damping)
    return scores(G_te, G_tr, pre).double().numpy()


# --------------------------------------------------------------------------- ground truth


@dataclass
class GroundTruth:
    """Retraining results for one model.

    ``masks`` (m, n_train) bool LDS subsets; ``outputs`` (m, n_test) outputs (``-loss``)
    averaged over retraining seeds, ``per_seed`` (m, n_seeds, n_test); ``removed``
    (n_loo,) and ``loo`` (n_loo, n_test) leave-one-out effects (None if not computed).
    """

    masks: np.ndarray
    outputs: np.ndarray
    per_seed: np.ndarray
    removed: np.ndarray | None = None
    loo: np.ndarray | None = None

    @property
    def seed_consistency(self) -> float:
        """Mean over test points of the Spearman correlation across subsets between two
        retraining seeds' outputs (NaN with one seed): how reproducible the target is."""
        if self.per_seed.shape[1] < 2:
            return math.nan
        return metrics.per_test_correlation(self.per_seed[:, 0].T, self.per_seed[:, 1].T,
                                            "spearman", n_boot=0).value


def ground_truth(cfg: Config, fitted: Fitted, progress: bool = True) -> GroundTruth:
    """LDS outputs on ``cfg.n_subsets`` subsets and, for a convex model, LOO effects of
    ``cfg.n_loo`` points drawn from ``cfg.seed``."""
    n = fitted.n_train
    out_fn = fitted.output_fn()
    masks = metrics.lds_subsets(n, cfg.n_subsets, cfg.fraction, seed=seed_for(cfg.seed, "lds"))
    per_seed = retrain.subset_outputs(fitted.retrain_lds, out_fn, masks, fitted.retrain_seeds,
                                      progress=progress, desc=f"LDS retrain {fitted.name}",
                                      per_seed=True)
    truth = GroundTruth(masks, per_seed.mean(1), per_seed)
    if fitted.retrain_loo is not None and cfg.n_loo:
        truth.removed = np.sort(rng_for(cfg.seed, "loo").choice(n, cfg.n_loo, replace=False))
        truth.loo = retrain.loo_effects(fitted.retrain_loo, out_fn, truth.removed, n,
                                        progress=progress, desc=f"LOO retrain {fitted.name}")
    return truth


# --------------------------------------------------------------------------- metrics


def fidelity_metrics(S: np.ndarray, cfg: Config, truth: GroundTruth | None,
                     S_exact: np.ndarray | None = None, S_identity: np.ndarray | None = None,
                     ) -> dict[str, float]:
    """The row's metrics for scores S (n_test, n_train): per-test Pearson and Spearman,
    overall Spearman and top-k overlap against ``S_exact``; per-test Spearman against the
    uncompressed Fisher ``S_identity``; LOO correlation (per-test Pearson across removed points
    of ``S / n`` with the retrained effects, averaged) and LDS. NaN where the input is absent.
    """
    kw = {"n_boot": 0}  # rows keep values only; their spread is over seeds
    row = dict.fromkeys(METRICS, math.nan)
    if S_exact is not None:
        ag = metrics.agreement(S, S_exact, k=cfg.top_k, **kw)
        row.update(pearson=ag["pearson"].value, spearman=ag["spearman"].value,
                   spearman_overall=ag["spearman_overall"].value,
                   topk=ag[f"top{cfg.top_k}_overlap"].value)
    if S_identity is not None:
        row["spearman_vs_identity"] = metrics.per_test_correlation(S, S_identity, "spearman",
                                                                   **kw).value
    if truth is not None and truth.loo is not None:
        predicted = S[:, truth.removed].T / S.shape[1]
        row["loo"] = metrics.loo_correlation(predicted, truth.loo, "pearson", **kw).value
    if truth is not None:
        row["lds"] = metrics.lds(S, truth.masks, truth.outputs, **kw).value
    return row


def reference_estimates(S: np.ndarray, cfg: Config, truth: GroundTruth) -> dict:
    """LOO and LDS of one score matrix with their confidence intervals (for the summary)."""
    kw = {"n_boot": cfg.n_boot, "seed": seed_for(cfg.seed, "boot")}
    out = {}
    if truth.loo is not None:
        e = metrics.loo_correlation(S[:, truth.removed].T / S.shape[1], truth.loo, "pearson", **kw)
        out["loo"] = {"value": e.value, "low": e.low, "high": e.high}
    e = metrics.lds(S, truth.masks, truth.outputs, **kw)
    out["lds"] = {"value": e.value, "low": e.low, "high": e.high}
    return out


# --------------------------------------------------------------------------- one model


@dataclass
class ModelResult:
    """Everything :func:`run_model` measured for one model: ``rows`` (one per reference and
    per (method, ratio, seed)), ``dims`` (:func:`matched_dims`), ``info`` (fit diagnostics,
    reference intervals, retraining consistency) and ``timings`` (seconds per stage; they vary
    between runs and stay out of the summary)."""

    rows: pd.DataFrame
    dims: pd.DataFrame
    info: dict
    timings: dict[str, float]


def run_model(cfg: Config, name: str, progress: bool = True,
              log: Callable[[str], None] | None = print) -> ModelResult:
    """Fit model ``name``, compute references, every (method, ratio, seed) and the ground
    truth, and return the rows of the fidelity table."""
    timings: dict[str, float] = {}
    say = log or (lambda _msg: None)

    @contextlib.contextmanager
    def stage(label: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        timings[label] = timings.get(label, 0.0) + time.perf_counter() - t0

    with threads(cfg.threads):
        with stage("fit"):
            fitted = fit_model(cfg, name)
        info = dict(fitted.info)
        say(f"{name}: d = {fitted.d}, gradient norm {info['grad_norm']}, test accuracy "
            f"{info['test_accuracy']:.3f}")
        G_tr = G_te = None
        refs: dict[str, tuple[np.ndarray, dict]] = {}
        if cfg.references or any(spec(m).needs_fit for m in cfg.methods):
            with stage("exact gradients"):
                G_tr, G_te = exact_gradients(fitted)
        with stage("references"):
            refs = reference_scores(cfg, fitted, G_tr, G_te) if cfg.references else {}
        for ref, (_, fit_info) in refs.items():
            info[ref] = {k: fit_info[k] for k in ("grad_norm", "min_eig", "lambda")
                         if k in fit_info}
        with stage("retraining"):
            truth = ground_truth(cfg, fitted, progress)
        info["seed_consistency"] = truth.seed_consistency
        if info.get("retrain_grad_norms"):
            g = np.asarray(info.pop("retrain_grad_norms"))
            info["retrain_grad_norm_median"] = float(np.median(g))
            info["retrain_grad_norm_max"] = float(g.max())
        info["n_retrained"] = int(truth.per_seed.shape[0] * truth.per_seed.shape[1]
                                  + (0 if truth.loo is None else len(truth.removed) + 1))
        S_exact = refs.get("exact", (None,))[0]
        S_ident = refs.get("identity", (None,))[0]
        rows = []
        with stage("metrics"):
            for ref, (S, _) in refs.items():
                rows.append({"model": name, "method": ref, "kind": "reference",
                             "ratio": 1.0, "k": fitted.d, "actual_ratio": 1.0, "p": 0.0,
                             "seed": -1, "map_bytes": 0,
                             **fidelity_metrics(S, cfg, truth, S_exact, S_ident)})
                info[ref] = {**info.get(ref, {}), **reference_estimates(S, cfg, truth)}
        with stage("matched dims"):
            dims = matched_dims(fitted.task, cfg.ratios)
        pca_cache: dict = {}
        pilots: dict[int, list] = {}  # draw -> pilot gradients, shared by every rate and method
        cells = [(m, r, s) for r in dims.itertuples() for m in cfg.methods
                 for s in range(cfg.n_seeds)]
        for method, r, s in tqdm(cells, desc=f"compressors {name}", unit="row",
                                 disable=not progress):
            # the same draws at every ratio (common random numbers along each curve)
            cseed = seed_for(cfg.seed, "compressor", method, s)
            with stage(f"compress {method}"):
                m = Match(float(r.p), int(r.k), fitted.d)
                if spec(method).pilot and s not in pilots:
                    pilots[s] = pilot_grads(fitted.task, pilot_set(cfg, fitted, s))
                comp = build_compressor(method, m, cseed, cfg, fitted.task, G_tr, pca_cache,
                                        pilots.get(s))
                if comp is None:
                    continue
                S = compressed_scores(fitted, comp, cfg.damping)
            with stage("metrics"):
                rows.append({"model": name, "method": method, "kind": "compressed",
                             "ratio": r.ratio, "k": int(r.k), "actual_ratio": r.actual_ratio,
                             "p": float(r.p) if spec(method).factored else float(r.p_flat),
                             "seed": s, "map_bytes": comp.map_bytes,
                             **fidelity_metrics(S, cfg, truth, S_exact, S_ident)})
    return ModelResult(pd.DataFrame(rows), dims, info, timings)


@dataclass
class Result:
    """Everything notebook 02 shows, computed by :func:`run` for every model of ``cfg``.

    ``rows``: one per reference and per (model, method, ratio, seed); ``summ``:
    :func:`summary_table`; ``models``: :func:`model_table`; ``dims``: :func:`matched_dims` of
    each model (column ``model``); ``pivot``: :func:`ratio_pivot` at 16x and 64x; ``infos``:
    model -> fit diagnostics and reference intervals; ``timings``: (model, stage, seconds).
    """

    cfg: Config
    rows: pd.DataFrame
    summ: pd.DataFrame
    models: pd.DataFrame
    dims: pd.DataFrame
    pivot: pd.DataFrame
    infos: dict[str, dict]
    timings: pd.DataFrame


# Result field -> the table's file name under tables/
TABLES = {"rows": "fidelity", "summ": "fidelity_summary", "models": "models",
          "dims": "matched_dims", "pivot": "fidelity_16x_64x"}


def run(cfg: Config, progress: bool = True, log: Callable[[str], None] | None = print
        ) -> Result:
    """Notebook 02's computation: :func:`run_model` for every model of ``cfg.models``."""
    results = {name: run_model(cfg, name, progress, log) for name in cfg.models}
    rows = pd.concat([r.rows for r in results.values()], ignore_index=True)
    summ = summary_table(rows)
    infos = {name: r.info for name, r in results.items()}
    dims = pd.concat([r.dims.assign(model=name) for name, r in results.items()],
                     ignore_index=True)
    timings = pd.DataFrame([{"model": name, "stage": stage, "seconds": t}
                            for name, r in results.items() for stage, t in r.timings.items()])
    return Result(cfg, rows, summ, model_table(infos), dims, ratio_pivot(summ), infos, timings)


def timing_table(res: Result) -> pd.DataFrame:
    """Seconds per stage (rows) and model (columns), to 0.01 s."""
    return res.timings.pivot(index="stage", columns="model", values="seconds").round(2)


def reference_intervals(res: Result) -> pd.DataFrame:
    """The references' LOO and LDS with their 95% bootstrap intervals over test points: one
    row per (model, reference, metric)."""
    return pd.DataFrame([
        {"model": name, "reference": ref, "metric": metric, **{k: e[k] for k in
                                                               ("value", "low", "high")}}
        for name, info in res.infos.items() for ref in REFERENCES if ref in info
        for metric, e in info[ref].items() if isinstance(e, dict) and "value" in e])


# --------------------------------------------------------------------------- summary


def summary_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds of every metric, one row per (model, method,
    ratio); ``n_seeds`` counts the rows averaged (std is NaN for a single one)."""
    keys = ["model", "method", "kind", "ratio", "k", "actual_ratio"]
    g = rows.groupby(keys, sort=False)
    out = g[list(METRICS)].mean().add_suffix("_mean")
    std = g[list(METRICS)].std(ddof=1).add_suffix("_std")
    out = out.join(std)
    out["n_seeds"] = g.size()
    cols = ["n_seeds"] + [f"{m}_{s}" for m in METRICS for s in ("mean", "std")]
    return out[cols].reset_index()


def model_table(infos: dict[str, dict]) -> pd.DataFrame:
    """One row per model: size, accuracy, the gradient norm reached, the smallest eigenvalue
    of the exact and GGN curvature (plus l2), the identity reference's lambda, and the
    retraining diagnostics (seed consistency, retrained models' gradient norms)."""
    rows = []
    for name, info in infos.items():
        rows.append({
            "model": name, "d": info["d"], "n_train": info["n_train"],
            "test_accuracy": info["test_accuracy"], "grad_norm": info["grad_norm"],
            "exact_min_eig": info.get("exact", {}).get("min_eig", math.nan),
            "ggn_min_eig": info.get("ggn", {}).get("min_eig", math.nan),
            "fisher_lambda": info.get("identity", {}).get("lambda", math.nan),
            "n_retrained": info.get("n_retrained"),
            "retrain_grad_norm_median": info.get("retrain_grad_norm_median", math.nan),
            "retrain_grad_norm_max": info.get("retrain_grad_norm_max", math.nan),
            "seed_consistency": info.get("seed_consistency", math.nan),
        })
    return pd.DataFrame(rows)


def ratio_pivot(summ: pd.DataFrame, ratios: tuple[float, ...] = (16.0, 64.0),
                metrics_: tuple[str, ...] = ("spearman", "lds")) -> pd.DataFrame:
    """Readable table: one row per (model, method), one column per (metric, ratio) with
    ``mean +- std`` over seeds; references (ratio 1) in every ratio column."""
    out = []
    for (model, method), g in summ.groupby(["model", "method"], sort=False):
        row = {"model": model, "method": label(method)}
        for r in ratios:
            sel = g if (g.kind == "reference").all() else g[np.isclose(g.ratio, r)]
            for m in metrics_:
                key = f"{m} {r:g}x"
                if sel.empty or not np.isfinite(sel[f"{m}_mean"].iloc[0]):
                    row[key] = "-"
                    continue
                mean, std = sel[f"{m}_mean"].iloc[0], sel[f"{m}_std"].iloc[0]
                row[key] = f"{mean:.3f}" + (f" ± {std:.3f}" if np.isfinite(std) else "")
        out.append(row)
    return pd.DataFrame(out)


def _r(x) -> float | None:
    """A summary number to 4 significant digits (None for NaN or missing)."""
    if x is None:
        return None
    x = float(x)
    return None if not math.isfinite(x) else float(f"{x:.4g}")


def ratio_table(summ: pd.DataFrame, ratio: float) -> dict:
    """``{model: {method: {"spearman": mean, "lds": mean, "k": k}}}`` at nominal ``ratio``."""
    out: dict = {}
    for row in summ[(summ.kind == "compressed") & np.isclose(summ.ratio, ratio)].itertuples():
        out.setdefault(row.model, {})[row.method] = {
            "spearman": _r(row.spearman_mean), "lds": _r(row.lds_mean), "k": int(row.k)}
    return out


def _compare(summ: pd.DataFrame, model: str, a: str, b: list[str], metric: str
             ) -> tuple[list[float], list[float]]:
    """Ratios where method ``a`` matches the best of ``b`` on ``metric`` (its mean is below
    the best mean by no more than two standard errors of the difference over seeds, or 0.02)
    and ratios where it loses."""
    s = summ[(summ.model == model) & (summ.kind == "compressed")]
    match, lose = [], []
    for ratio, grp in s.groupby("ratio"):
        g = grp.set_index("method")
        mean = g[f"{metric}_mean"]
        others = [m for m in b if m in g.index and np.isfinite(mean[m])]
        if a not in g.index or not others or not np.isfinite(mean[a]):
            continue
        best = max(others, key=lambda m: mean[m])
        se = math.sqrt(sum(np.nan_to_num(g.loc[m, f"{metric}_std"]) ** 2 / g.loc[m, "n_seeds"]
                           for m in (a, best)))
        (match if mean[a] - mean[best] >= -max(2 * se, 0.02) else lose).append(float(ratio))
    return match, lose


def versus(summ: pd.DataFrame, model: str, a: str, b: str, metric: str) -> dict[str, list]:
    """Ratios where method ``a`` is ``ahead`` of ``b`` on ``metric``, ``level`` with it or
    ``behind``: ahead or behind when the means differ by more than two standard errors of the
    difference over seeds, and by more than 0.02 (the tolerance of :func:`_compare`)."""
    s = summ[(summ.model == model) & (summ.kind == "compressed")]
    out: dict[str, list] = {"ahead": [], "level": [], "behind": []}
    for ratio, grp in s.groupby("ratio"):
        g = grp.set_index("method")
        if a not in g.index or b not in g.index:
            continue
        diff = g.at[a, f"{metric}_mean"] - g.at[b, f"{metric}_mean"]
        if not np.isfinite(diff):
            continue
        se = math.sqrt(sum(np.nan_to_num(g.at[m, f"{metric}_std"]) ** 2 / g.at[m, "n_seeds"]
                           for m in (a, b)))
        tol = max(2 * se, 0.02)
        out["ahead" if diff > tol else "behind" if diff < -tol else "level"].append(float(ratio))
    return out


def importance_table(summ: pd.DataFrame) -> dict:
    """``{model: {importance method: {"against": uniform method, metric: versus(...)}}}`` for
    every importance method that ran beside its uniform counterpart (:func:`~.methods.uniform_of`),
    on Spearman with exact influence and LDS."""
    out: dict = {}
    present = set(summ.method)
    for model in dict.fromkeys(summ.model):
        sub = summ[summ.model == model]
        for a in (m for m in compared(*FAMILIES) if m in present):
            b = uniform_of(a)
            if b is None or b not in present:
                continue
            out.setdefault(model, {})[a] = {"against": b, **{
                metric: versus(summ, model, a, b, metric) for metric in ("spearman", "lds")
                if sub[f"{metric}_mean"].notna().any()}}
    return out


def _ratios(rs: list[float]) -> str:
    return ", ".join(f"{r:g}x" for r in rs) if rs else "no ratio"


def _at(summ: pd.DataFrame, model: str, ratio: float, metric: str) -> str:
    """'flat dropout 0.16, factored dropout 0.12, best projection 0.18 (Gaussian (dense))'."""
    s = summ[(summ.model == model) & (summ.kind == "compressed") & np.isclose(summ.ratio, ratio)]
    mean = s.set_index("method")[f"{metric}_mean"].dropna()
    present = [m for m in compared(*FAMILIES) if m in mean.index]
    proj = mean[list(in_family(present, "projection"))]
    parts = [f"{label(m)} {mean[m]:.2f}" for m in in_family(present, "mask")]
    if len(proj):
        parts.append(f"best projection {proj.max():.2f} ({label(proj.idxmax())})")
    parts += [f"{label(m)} {mean[m]:.2f}" for m in in_family(present, "fitted", "composed")]
    return ", ".join(parts)


def conclude(summ: pd.DataFrame, infos: dict[str, dict]) -> str:
    """The conclusion, written from the numbers: the references (against dattri's), then per
    model where flat and factored dropout match the best random projection and where they
    lose, on Spearman with exact influence and on LDS."""
    s = []
    lr = infos.get("logreg", {}).get("exact", {})
    if "loo" in lr:
        s.append(
            f"Exact influence on logistic regression reaches a leave-one-out correlation of "
            f"{lr['loo']['value']:.2f} and an LDS of {lr['lds']['value']:.2f} (dattri reports "
            f"about {DATTRI['loo']:.2f} and {DATTRI['lds']:.2f} on MNIST).")
    methods = [m for m in compared(*FAMILIES) if m in set(summ.method)]
    projections = list(in_family(methods, "projection"))
    for model in dict.fromkeys(summ.model):
        info, what = infos.get(model, {}), MODEL_LABELS[model]
        ref = summ[(summ.model == model) & (summ.kind == "reference")].set_index("method")
        if model != "logreg" and "exact" in info:
            consistency = info.get("seed_consistency", math.nan)
            s.append(f"On the {what}, exact influence has an LDS of "
                     f"{info['exact']['lds']['value']:.2f}"
                     + (f" (the outputs of two retraining seeds agree at Spearman "
                        f"{consistency:.2f})" if np.isfinite(consistency) else "") + ".")
        if "identity" in ref.index and np.isfinite(ref.spearman_mean["identity"]):
            s.append(f"On the {what} the uncompressed Fisher itself agrees with exact influence "
                     f"at Spearman {ref.spearman_mean['identity']:.2f} (LDS "
                     f"{ref.lds_mean['identity']:.2f}): compression starts from there.")
        for metric, name in (("spearman", "Spearman with exact influence"), ("lds", "LDS")):
            sub = summ[(summ.model == model) & (summ.kind == "compressed")]
            if not sub[f"{metric}_mean"].notna().any():
                continue
            at = "; ".join(f"at {r:g}x {_at(summ, model, r, metric)}"
                           for r in (16.0, 64.0) if np.isclose(sub.ratio, r).any())
            if at:
                s.append(f"{what[0].upper()}{what[1:]}, {name}: {at}.")
            for a in in_family(methods, "mask", "composed") if projections else ():
                match, lose = _compare(summ, model, a, projections, metric)
                s.append(f"{label(a).capitalize()} matches the best random projection on "
                         f"{name} at {_ratios(match)} and loses at {_ratios(lose)}.")
            for a in in_family(methods, "fitted"):
                best = sub.loc[sub.groupby("ratio")[f"{metric}_mean"].idxmax()]
                wins = [float(r) for r in best[best.method == a].ratio]
                s.append(f"{label(a)}, fitted on the training gradients, is best on {name} at "
                         f"{_ratios(wins)}.")
            for a, v in importance_table(summ).get(model, {}).items():
                if metric in v:
                    w = v[metric]
                    s.append(f"{label(a).capitalize()} against {label(v['against'])} on {name}: "
                             f"ahead at {_ratios(w['ahead'])}, level at {_ratios(w['level'])}, "
                             f"behind at {_ratios(w['behind'])}.")
    s += _importance_verdict(importance_table(summ))
    return " ".join(s)


def _importance_verdict(table: dict) -> list[str]:
    """The plain answer: does importance beat uniform dropout on these models, or lose?"""
    count = {"ahead": 0, "level": 0, "behind": 0}
    for per_model in table.values():
        for v in per_model.values():
            for metric in ("spearman", "lds"):
                for key in count:
                    count[key] += len(v.get(metric, {}).get(key, []))
    n = sum(count.values())
    if not n:
        return []
    a, lv, b = count["ahead"], count["level"], count["behind"]
    what = ", ".join(MODEL_LABELS[m] for m in table)
    if b == 0 and a > 0:
        word = "beats uniform dropout"
    elif a == 0 and b > 0:
        word = "loses to uniform dropout"
    elif a == b == 0:
        word = "neither beats nor loses to uniform dropout"
    else:
        word = ("mostly beats uniform dropout" if a > b else "mostly loses to uniform dropout"
                if b > a else "wins and loses against uniform dropout as often")
    return [f"So importance dropout {word} on these models ({what}): over every model, metric "
            f"and ratio it is ahead in {a}, level in {lv} and behind in {b} of {n} comparisons "
            f"with its uniform counterpart (ahead or behind: beyond two standard errors over "
            f"draws and 0.02)."]


def summary(res: Result) -> dict:
    """summary.json (deterministic for a fixed seed: numbers to 4 significant digits): the
    references, the compressed methods at 16x and 64x, importance against uniform dropout
    (:func:`importance_table`), the models and the conclusion (:func:`conclude`)."""
    cfg, summ, infos = res.cfg, res.summ, res.infos

    def ref(model: str, name: str, metric: str) -> float | None:
        return _r(infos.get(model, {}).get(name, {}).get(metric, {}).get("value"))

    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if isinstance(x, (float, np.floating)):
            return _r(x)
        if isinstance(x, np.integer):
            return int(x)
        return x

    return {
        "exact_loo_logreg": ref("logreg", "exact", "loo"),
        "exact_lds_logreg": ref("logreg", "exact", "lds"),
        "exact_lds_mlp": ref("mlp", "exact", "lds"),
        "table_16x": ratio_table(summ, 16.0),
        "table_64x": ratio_table(summ, 64.0),
        "references": {m: {r: {"spearman": _r(row.spearman_mean), "lds": _r(row.lds_mean),
                               "loo": _r(row.loo_mean)}
                           for r, row in summ[(summ.model == m) & (summ.kind == "reference")]
                           .set_index("method").iterrows()}
                       for m in summ.model.unique()},
        "models": clean(infos),
        "dattri_reference": DATTRI,
        "damping": cfg.damping,
        "importance_vs_uniform": importance_table(summ),
        "conclusion": conclude(summ, infos),
    }


# --------------------------------------------------------------------------- figure

REF_STYLES = {"exact": ("black", "--"), "ggn": ("0.35", ":"), "identity": ("0.55", "-.")}
AGAINST_EXACT = ("pearson", "spearman", "spearman_overall", "topk")
PANELS = {"spearman": "Spearman with exact influence", "lds": "LDS (Spearman vs retraining)",
          "loo": "LOO correlation (Pearson)", "pearson": "Pearson with exact influence",
          "topk": "top-k overlap with exact influence",
          "spearman_vs_identity": "Spearman with uncompressed Fisher"}


def plot_fidelity(summ: pd.DataFrame, metrics_: tuple[str, ...] = ("spearman", "lds")):
    """Fidelity against compression ratio: one column per model, one row per metric, one line
    per method (mean over seeds, band = +-1 std over seeds), references as horizontal lines.
    Metrics that are NaN for every row of a model are left out of that panel."""
    import matplotlib.pyplot as plt

    model_names = list(dict.fromkeys(summ.model))
    metrics_ = [m for m in metrics_ if summ[f"{m}_mean"].notna().any()]
    if not metrics_:  # e.g. the gpu profile's details: no exact, GGN or identity reference
        fig, ax = plt.subplots(figsize=(4.6, 0.8))
        ax.axis("off")
        ax.text(0.5, 0.5, "none of these metrics has a value at this configuration",
                ha="center", va="center")
        return fig
    fig, axes = plt.subplots(len(metrics_), len(model_names), squeeze=False, sharex="col",
                             sharey="row", figsize=(4.6 * len(model_names), 3.3 * len(metrics_)))
    ratios = sorted(summ.loc[summ.kind == "compressed", "ratio"].unique())
    for j, model in enumerate(model_names):
        s = summ[summ.model == model]
        comp = s[s.kind == "compressed"]
        for i, metric in enumerate(metrics_):
            ax = axes[i, j]
            for method, g in comp.groupby("method", sort=False):
                g = g.sort_values("ratio")
                mean, std = g[f"{metric}_mean"], g[f"{metric}_std"].fillna(0.0)
                if mean.isna().all():
                    continue
                ax.plot(g.ratio, mean, "o-", ms=3.5, lw=1.5, color=color(method),
                        label=label(method))
                ax.fill_between(g.ratio, mean - std, mean + std, color=color(method),
                                alpha=0.18, lw=0)
            for row in s[s.kind == "reference"].itertuples():
                value = getattr(row, f"{metric}_mean")
                trivial = (row.method == "identity" if metric == "spearman_vs_identity"
                           else row.method == "exact" and metric in AGAINST_EXACT)
                if np.isfinite(value) and not trivial:  # a reference against itself is 1
                    ref_color, style = REF_STYLES[row.method]
                    ax.axhline(value, color=ref_color, ls=style, lw=1.2, label=label(row.method))
            if s[f"{metric}_mean"].isna().all():
                ax.text(0.5, 0.5, "not measured for this model", ha="center", va="center",
                        transform=ax.transAxes, color="0.4")
            ax.set_xscale("log", base=2)
            ax.set_xticks(ratios, [f"{r:g}x" for r in ratios])
            ax.minorticks_off()
            ax.grid(alpha=0.3, lw=0.5)
            if i == 0:
                ax.set_title(f"{MODEL_LABELS[model]} (d = {int(s.k.max()):,})")
            if i == len(metrics_) - 1:
                ax.set_xlabel("compression ratio d / k")
            if j == 0:
                ax.set_ylabel(PANELS[metric])
    handles, labels = {}, []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    fig.legend([handles[lab] for lab in labels], labels, loc="lower center",
               ncol=min(5, len(labels)), frameon=False, bbox_to_anchor=(0.5, -0.01))
    legend_in = 0.3 * math.ceil(len(labels) / 5) + 0.15  # legend height, inches
    fig.tight_layout(rect=(0, legend_in / fig.get_figheight(), 1, 1))
    return fig
