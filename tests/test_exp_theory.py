"""Tests for dropinf.study.experiments.theory (notebook 01) and the dropinf.theory helpers it added.

Each function is checked against an independent computation: exhaustive enumeration of masks
on tiny d, per-pair loops instead of Gram matrices, numpy eigenvalues instead of the library's
eigendecomposition, autograd per sample instead of the hooks. Statistical checks use fixed
seeds and a tolerance of Z = 5 standard errors (a correct estimator fails with probability
~1e-6). The notebook itself is executed through papermill with tiny parameters.
"""

from __future__ import annotations

import itertools
import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import loop_grads
from scipy import stats as sps

import dropinf as di
from dropinf import theory as th
from dropinf.study.experiments import theory as T
from dropinf.study.experiments.common import seed_for

Z = 5.0
TINY = dict(n_trials=50, d=64, coherences=[1, 4], rates=[0.5, 0.9], hidden=4, n_train=60,
            n_test=10, fit_iter=20, n_real_pairs=1, library_trials=10, fisher_rates=[0.5],
            dampings=[0.1], n_mask_seeds=2, block_seeds=10, block_n_test=2, block_n_train=5,
            block_max_length=16)


@pytest.fixture(scope="module")
def tiny():
    """A tiny configuration, its fitted MLP and a few real pairs."""
    cfg = T.Config.for_profile("cpu-quick", **TINY)
    data = T.digits_mlp(cfg)
    return cfg, data


# --------------------------------------------------------------------------- dropinf.theory


def test_pairwise_stats_and_variances_match_per_pair_loops():
    g = np.random.default_rng(0)
    A, B = g.standard_normal((5, 9)), g.standard_exponential((4, 9))
    st = th.PairStats.pairwise(A, B)
    assert st.ab.shape == st.aa.shape == (5, 4) and st.d == 9
    for i, j in itertools.product(range(5), range(4)):
        a, b = A[i], B[j]
        assert st.ab[i, j] == pytest.approx(a @ b, rel=1e-12)
        assert st.cc[i, j] == pytest.approx(np.sum(a**2 * b**2), rel=1e-12)
        assert st.coherence[i, j] == pytest.approx(th.coherence(a, b), rel=1e-12)
        assert st.cosine[i, j] == pytest.approx(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
        for law, size, want in [("bernoulli", 3.6, th.bernoulli_variance(a, b, 0.4)),
                                ("fixed", 4, th.fixed_variance(a, b, 4)),
                                ("gaussian", 4, th.gaussian_variance(a, b, 4)),
                                ("sjlt", 4, th.sjlt_variance(a, b, 4, 2))]:
            assert th.variance(st, law, size)[i, j] == pytest.approx(want, rel=1e-10, abs=1e-14)


def test_fixed_variance_by_deviations():
    # the stats form sum c^2 - (sum c)^2 / d against the explicit centred sum
    g = np.random.default_rng(1)
    a, b = g.standard_normal(30), g.standard_normal(30)
    c = a * b
    want = 30 * (30 - 7) / (7 * 29) * np.sum((c - c.mean()) ** 2)
    assert th.fixed_variance(a, b, 7) == pytest.approx(want, rel=1e-12)


def test_variance_rejects_bad_arguments():
    st = th.PairStats.of(np.ones(5), np.ones(5))
    with pytest.raises(ValueError, match="law"):
        th.variance(st, "pca", 2)
    with pytest.raises(ValueError, match="k"):
        th.variance(st, "fixed", 6)
    with pytest.raises(ValueError, match="keep"):
        th.variance(st, "bernoulli", 0)
    with pytest.raises(ValueError, match="must be"):
        th.PairStats.pairwise(np.ones(5), np.ones((2, 5)))
    with pytest.raises(ValueError, match="k"):
        th.sample_fixed(np.ones(5), np.ones(5), 0, 10)


@pytest.mark.parametrize("which", ["general", "same", "orthogonal"])
def test_gaussian_span_sampler_has_the_gaussian_moments(which):
    g = np.random.default_rng(2)
    a = g.standard_normal(50)
    b = {"general": 0.3 * a + g.standard_normal(50), "same": a,
         "orthogonal": np.r_[a[1], -a[0], np.zeros(48)]}[which]
    n, k = 20_000, 7
    x = th.sample_gaussian_span(a, b, k, n, seed=3)
    var = th.gaussian_variance(a, b, k)
    assert abs(x.mean() - a @ b) <= Z * math.sqrt(var / n)
    sd = math.sqrt(th.var_of_sample_variance(var, th.gaussian_moment4(a, b, k), n))
    assert abs(x.var(ddof=1) - var) <= Z * sd
    # and the direct O(k d) sampler agrees with it in distribution (two-sample, variances)
    y = th.sample_gaussian(a, b, k, 4000, seed=4)
    se = math.sqrt(th.var_of_sample_variance(var, th.gaussian_moment4(a, b, k), 4000) + sd**2)
    assert abs(y.var(ddof=1) - x.var(ddof=1)) <= Z * se


def test_gaussian_span_sampler_zero_vector():
    np.testing.assert_array_equal(th.sample_gaussian_span(np.zeros(4), np.ones(4), 2, 5), 0.0)


# --------------------------------------------------------------------------- configuration


def test_config_profiles_and_overrides():
    cfg = T.Config.for_profile("cpu-quick")
    assert cfg == T.Config()
    gpu = T.Config.for_profile("gpu")
    assert gpu.d > cfg.d and gpu.n_trials > cfg.n_trials and gpu.hidden > cfg.hidden
    c2 = T.Config.for_profile("cpu-quick", seed=3, rates=[0.2, 0.4])
    assert c2.seed == 3 and c2.n_trials == cfg.n_trials and c2.rates == (0.2, 0.4)
    assert c2.coherences == cfg.coherences
    with pytest.raises(ValueError, match="profile"):
        T.Config.for_profile("laptop")
    with pytest.raises(TypeError, match="n_trails"):
        T.Config.for_profile("cpu-quick", n_trails=3)
    with pytest.raises(ValueError, match="n_trials=None"):  # None is a value, not "the default"
        T.Config.for_profile("cpu-quick", n_trials=None)


@pytest.mark.parametrize("field,value", [
    ("n_trials", 5), ("seed", -1), ("hidden", 1.5), ("d", True), ("n_mask_seeds", 1),
    ("coherences", [0.5]), ("coherences", [400.0]), ("rates", [1.0]), ("rates", []),
    ("fisher_rates", [0.0]), ("dampings", [0.0]), ("rho", 2.0), ("library_rate", 1.0),
    ("n_train", 1797), ("l2", -1.0), ("rates", "abc"), ("blocks", ()), ("blocks", (1,)),
    ("blocks", (True,)), ("block_p", 1.0), ("block_seeds", 5), ("block_layers", 0),
])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        T.Config(**{field: value})


def test_size_at_rate_is_what_dropout_keeps(tiny):
    _, data = tiny
    for p in (0.1, 0.5, 0.93):
        assert T.size_at_rate(data.d, p, "fixed") == di.Dropout(p).bind(data.task).dim
        assert T.size_at_rate(data.d, p, "bernoulli") == pytest.approx((1 - p) * data.d)


# --------------------------------------------------------------------------- Monte Carlo


def test_summarize_draws_against_a_hand_computation():
    x = np.random.default_rng(5).standard_normal(37) * 2 + 1
    r = T.summarize_draws(x, mean=0.5, var=3.0)
    n = len(x)
    m = sum(x) / n
    s2 = sum((v - m) ** 2 for v in x) / (n - 1)
    m4 = sum((v - m) ** 4 for v in x) / n
    se_var = math.sqrt((m4 - s2**2 * (n - 3) / (n - 1)) / n)
    assert r["mean_mc"] == pytest.approx(m) and r["var_mc"] == pytest.approx(s2)
    assert r["z_mean"] == pytest.approx((m - 0.5) / math.sqrt(s2 / n))
    assert r["z_var"] == pytest.approx((s2 - 3.0) / se_var)
    assert r["var_hi"] - r["var_lo"] == pytest.approx(2 * 1.959964 * se_var, rel=1e-6)
    const = T.summarize_draws(np.full(10, 2.0), mean=2.0, var=0.0)
    assert const["z_mean"] == 0.0 and const["z_var"] == 0.0
    assert T.summarize_draws(np.full(10, 2.0), mean=1.0, var=0.0)["z_mean"] == math.inf


def _enumerated(a, b, law, p):
    """Exact mean and variance of ahat.bhat by enumerating every mask or hash (tiny d)."""
    d, c = len(a), a * b
    k = T.size_at_rate(d, p, law)
    if law == "fixed":
        vals = np.array([c[list(s)].sum() * d / k for s in itertools.combinations(range(d), k)])
        w = np.full(len(vals), 1 / len(vals))
    elif law == "bernoulli":
        masks = np.array(list(itertools.product([0, 1], repeat=d)), dtype=float)
        vals = masks @ c / (1 - p)
        w = np.prod(np.where(masks == 1, 1 - p, p), axis=1)
    else:  # sjlt with c = 1: every column is (row, sign), all 2k of them equally likely
        cols = [(r, s) for r in range(k) for s in (-1.0, 1.0)]
        vals = []
        for cfg in itertools.product(cols, repeat=d):
            sa, sb = np.zeros(k), np.zeros(k)
            for j, (r, s) in enumerate(cfg):
                sa[r] += s * a[j]
                sb[r] += s * b[j]
            vals.append(sa @ sb)
        vals = np.array(vals)
        w = np.full(len(vals), 1 / len(vals))
    m = np.sum(w * vals)
    return m, np.sum(w * (vals - m) ** 2)


def test_check_pairs_against_exhaustive_enumeration():
    g = np.random.default_rng(6)
    pair = T.Pair("synthetic", "tiny", g.standard_normal(5), g.standard_normal(5) + 0.3)
    df = T.check_pairs([pair], (0.4,), 20_000, seed=7, laws=("fixed", "bernoulli", "sjlt"))
    for _, r in df.iterrows():
        mean, var = _enumerated(pair.a, pair.b, r.law, r.p)
        assert r.mean_formula == pytest.approx(mean, rel=1e-12)
        assert r.var_formula == pytest.approx(var, rel=1e-10)
        assert abs(r.mean_mc - mean) <= Z * r.se_mean
        assert abs(r.var_mc - var) <= Z * r.se_var
        assert r.z_var == pytest.approx((r.var_mc - r.var_formula) / r.se_var)
    # same seed, same draws; another seed, other draws
    again = T.check_pairs([pair], (0.4,), 20_000, seed=7, laws=("fixed", "bernoulli", "sjlt"))
    pd.testing.assert_frame_equal(df, again)
    other = T.check_pairs([pair], (0.4,), 20_000, seed=8, laws=("fixed",))
    assert other.var_mc[0] != df.var_mc[0]


def test_gaussian_draws_against_the_direct_sampler():
    pair = T.synthetic_pairs(T.Config(d=40, coherences=(4.0,)))[0]
    assert th.coherence(pair.a, pair.b) == pytest.approx(4.0)
    r = T.check_pairs([pair], (0.75,), 20_000, seed=0, laws=("gaussian",)).iloc[0]
    direct = th.sample_gaussian(pair.a, pair.b, 10, 4000, seed=1)
    assert r.k == 10
    assert abs(direct.var(ddof=1) - r.var_mc) <= Z * math.sqrt(
        r.se_var**2 + th.var_of_sample_variance(r.var_formula, th.gaussian_moment4(
            pair.a, pair.b, 10), 4000))


def test_z_table_is_the_long_form():
    df = T.check_pairs(T.synthetic_pairs(T.Config(d=16, coherences=(1.0, 2.0))), (0.5,), 30,
                       seed=0)
    zt = T.z_table(df)
    assert len(zt) == 2 * len(df) and set(zt.stat) == {"mean", "var"}
    np.testing.assert_array_equal(np.sort(zt.z), np.sort(np.r_[df.z_mean, df.z_var]))


# --------------------------------------------------------------------------- MLP


def test_digits_mlp_gradients_are_per_sample_gradients(tiny):
    cfg, data = tiny
    assert data.G_train.shape == (cfg.n_train, data.d) and data.G_test.shape == (cfg.n_test,
                                                                                  data.d)
    X, y = data.train
    names = data.task.param_names
    want = loop_grads(data.task.model, di.losses.cross_entropy,
                      [(X[i : i + 1], y[i : i + 1]) for i in range(5)], names)
    np.testing.assert_allclose(data.G_train[:5], want.double().numpy(), rtol=1e-4, atol=1e-6)
    # fitted at all: the mean-loss gradient plus weight decay is small
    assert data.grad_norm < 0.5


def test_real_pairs_sit_at_the_coherence_quantile(tiny):
    _, data = tiny
    pairs, idx = T.real_pairs(data, 1)
    coh = np.array([[th.coherence(a, b) for b in data.G_train] for a in data.G_test])
    coh = np.where(np.isfinite(coh), coh, np.nan)
    target = np.nanquantile(coh, 0.5)
    (i, j), = idx
    assert abs(coh[i, j] - target) == pytest.approx(np.nanmin(np.abs(coh - target)))
    np.testing.assert_array_equal(pairs[0].a, data.G_test[i])
    np.testing.assert_array_equal(pairs[0].b, data.G_train[j])
    flat = T.pair_coherences(data)
    np.testing.assert_allclose(np.sort(flat), np.sort(coh[np.isfinite(coh)]), rtol=1e-10)


def test_library_check_draws_are_compressed_dot_products(tiny):
    _, data = tiny
    a, b = data.G_test[0], data.G_train[1]
    df = T.library_check(data, 0, 1, 0.5, 12, seed=3)
    for law in ("fixed", "bernoulli"):
        base = seed_for(3, "library", law)
        x = []
        for s in range(12):  # independently: the compressor's kept coordinates and scales
            idx, sc = di.Dropout(0.5, mask=law, seed=base + s).bind(data.task).kept_indices()
            idx, sc = idx.numpy(), sc.double().numpy()
            x.append(np.sum(a[idx] * sc * b[idx] * sc))
        r = df[df.law == law].iloc[0]
        assert r.mean_mc == pytest.approx(np.mean(x), rel=1e-4, abs=1e-9)
        assert r.var_mc == pytest.approx(np.var(x, ddof=1), rel=1e-3, abs=1e-12)
        assert r.mean_formula == pytest.approx(a @ b)


def test_real_pair_table_against_per_pair_loops():
    g = np.random.default_rng(9)
    G_train = g.standard_normal((7, 20)) * g.standard_exponential(20)
    G_test = g.standard_normal((3, 20))
    data = SimpleNamespace(G_train=G_train, G_test=G_test, d=20)
    tab = T.real_pair_table(data, (0.3, 0.8)).set_index("p")
    for p in (0.3, 0.8):
        k = T.size_at_rate(20, p, "fixed")
        wins = [th.fixed_variance(a, b, k) < th.gaussian_variance(a, b, k)
                for a in G_test for b in G_train]
        ratio = [th.bernoulli_variance(a, b, 1 - p) / th.gaussian_variance(a, b, k)
                 for a in G_test for b in G_train]
        assert tab.fixed_wins[p] == pytest.approx(np.mean(wins))
        assert tab.bernoulli_median_ratio[p] == pytest.approx(np.median(ratio))


# --------------------------------------------------------------------------- coherence


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("cos", [0.0, 0.6])
def test_crossover_coherence_closed_forms(p, cos):
    d = 200
    k = T.size_at_rate(d, p, "fixed")
    # derived by hand from the two variances with |a| = |b| = 1:
    assert T.crossover_coherence(d, p, cos, "fixed") == pytest.approx(
        cos**2 + (1 + cos**2) * (d - 1) / (d - k), rel=1e-10)
    assert T.crossover_coherence(d, p, cos, "bernoulli") == pytest.approx(
        (1 + cos**2) * (1 - p) * d / (p * k), rel=1e-10)


def test_crossover_on_real_vectors():
    # a coherent pair just below / above the crossover is won / lost by the mask
    d, p, rho = 400, 0.5, 1.0
    kstar = T.crossover_coherence(d, p, rho, "fixed")
    k = T.size_at_rate(d, p, "fixed")
    for c, mask_wins in [(kstar * 0.95, True), (kstar * 1.05, False)]:
        a, b = th.coherent_pair(d, c, rho=rho, seed=0)
        assert bool(th.fixed_variance(a, b, k) < th.gaussian_variance(a, b, k)) is mask_wins


def test_zero_crossing_and_ratio_table():
    assert T.zero_crossing([0, 1, 2], [-1.0, 1.0, 3.0]) == pytest.approx(0.5)
    assert T.zero_crossing([0, 1, 2], [2.0, 1.0, -1.0]) == pytest.approx(1.5)
    assert math.isnan(T.zero_crossing([0, 1], [1.0, 2.0]))
    pairs = T.synthetic_pairs(T.Config(d=40, coherences=(1.0, 8.0)))
    df = T.check_pairs(pairs, (0.5,), 200, seed=0)
    rt = T.ratio_table(df).set_index("pair")
    for pr in pairs:
        want = th.fixed_variance(pr.a, pr.b, 20) / th.gaussian_variance(pr.a, pr.b, 20)
        assert rt.ratio_formula[pr.label] == pytest.approx(want)
        assert rt.ratio_lo[pr.label] < rt.ratio_mc[pr.label] < rt.ratio_hi[pr.label]


def test_score_errors_exact_cases():
    S = np.random.default_rng(0).standard_normal((4, 6))
    r = T.score_errors([0.7 * S, 0.7 * S, 0.7 * S], S)  # pure shrinkage, no variance
    assert r["rel_rmse"] == pytest.approx(0.3) and r["rel_bias"] == pytest.approx(0.3)
    assert r["rel_sd"] == pytest.approx(0.0, abs=1e-7) and r["scale"] == pytest.approx(0.7)
    assert r["rel_err_rescaled"] == pytest.approx(0.0, abs=1e-7)
    assert r["pearson"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="2 draws"):
        T.score_errors([S], S)


def test_score_errors_separate_bias_from_variance():
    g = np.random.default_rng(1)
    S = g.standard_normal((20, 30))
    B = 0.3 * g.standard_normal(S.shape)
    sigma = 0.5
    draws = [S + B + sigma * g.standard_normal(S.shape) for _ in range(40)]
    r = T.score_errors(draws, S)
    norm = np.linalg.norm(S)
    # b^2 estimate has sd ~ sigma^2 sqrt(2 N / m) ... a few percent of these values here
    assert r["rel_bias"] == pytest.approx(np.linalg.norm(B) / norm, rel=0.1)
    assert r["rel_sd"] == pytest.approx(sigma * math.sqrt(S.size) / norm, rel=0.05)


def test_fisher_bias_against_numpy(tiny):
    cfg, data = tiny
    df = T.fisher_bias(cfg, data)
    assert set(df.compressor) == {"dropout", "gaussian"}
    assert len(df) == 2 * len(cfg.fisher_rates) * (1 + len(cfg.dampings))
    G = data.G_train
    F = G.T @ G / len(G)
    e = np.linalg.eigvalsh(F)
    for _, r in df[df.curvature == "fisher"].iterrows():
        lam = r.damping * np.trace(F) / data.d
        assert r.lam == pytest.approx(lam, rel=1e-8)
        want = np.trace(np.linalg.solve(F + lam * np.eye(data.d), F))
        assert r.d_lambda == pytest.approx(want, rel=1e-6)
        assert r.d_lambda == pytest.approx(np.sum(e / (e + lam)), rel=1e-6)
    assert (df.k == T.size_at_rate(data.d, cfg.fisher_rates[0], "fixed")).all()


# --------------------------------------------------------------------------- conclusion


def test_conclusion_follows_the_numbers(tiny):
    cfg, data = tiny
    checks = T.check_pairs(T.synthetic_pairs(cfg), cfg.rates, 200, cfg.seed)
    real = T.real_pair_table(data, cfg.rates)
    cross = T.crossover_table(cfg, T.ratio_table(checks), real)
    fisher = T.fisher_bias(cfg, data)
    args = (cross, real, T.pair_coherences(data), data.d, fisher)
    text, nums = T.conclude(cfg, checks, *args)
    assert nums["max_abs_z"] == pytest.approx(np.abs(np.r_[checks.z_mean, checks.z_var]).max())
    assert nums["z_crit_5pct"] == pytest.approx(
        sps.norm.isf(0.025 / (2 * len(checks))))
    assert ("agrees with every closed form" in text) == (nums["max_abs_z"] <= nums["z_crit_5pct"])
    assert f"{nums['max_abs_z']:.2f}" in text
    good = checks.assign(z_mean=0.1, z_var=-0.2)
    assert "agrees with every closed form" in T.conclude(cfg, good, *args)[0]
    bad = good.copy()
    bad.loc[0, "z_var"] = 12.0
    text, _ = T.conclude(cfg, bad, *args)
    assert "disagrees" in text and "12.00" in text
    json.dumps(nums)  # JSON-able


# --------------------------------------------------------------------------- the notebook


NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "01_theory.ipynb"


def _execute(out: Path, seed: int) -> dict:
    import papermill as pm

    out.mkdir(parents=True, exist_ok=True)
    pm.execute_notebook(str(NOTEBOOK), str(out / "01_theory.ipynb"), kernel_name="dropinf",
                        parameters={"out_dir": str(out), "config": {"seed": seed, **TINY}},
                        progress_bar=False)
    return json.loads((out / "summary.json").read_text())


def test_notebook_runs_and_is_reproducible(tmp_path):
    runs = [(tmp_path / "a", 0), (tmp_path / "b", 0), (tmp_path / "c", 1)]
    with ThreadPoolExecutor(len(runs)) as pool:
        a, b, c = pool.map(lambda r: _execute(*r), runs)
    assert a == b
    assert a != c
    assert a["notebook"] == "01_theory" and isinstance(a["conclusion"], str)
    assert a["max_abs_z"] >= 0
    for name in ("error_vs_p", "checks", "coherence", "fisher_bias"):
        assert (tmp_path / "a" / "figures" / f"{name}.png").stat().st_size > 0
    z = pd.read_csv(tmp_path / "a" / "tables" / "z_scores.csv")
    assert a["max_abs_z"] == pytest.approx(z.z.abs().max(), rel=1e-5)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["params"]["n_trials"] == TINY["n_trials"] and manifest["seeds"]["seed"] == 0


# --------------------------------------------------------------------------- block masks


def _partition(n: int, b: int) -> list[range]:
    m = max(1, n // b)
    return [range(j * b, (j + 1) * b if j < m - 1 else n) for j in range(m)]


def _fixed_dev(c: np.ndarray) -> float:
    """``d/(d-1) sum (c - cbar)^2``: the fixed mask's variance up to the factor (1-q)/q."""
    return len(c) / (len(c) - 1) * float(np.sum((c - c.mean()) ** 2))


def test_block_table_against_a_per_pair_loop(tiny):
    _, data = tiny
    table, ratios = T.block_table(data, (4, 16), seed=0)
    params = data.task.params
    for block in (4, 16):
        got = ratios[block, "model"].reshape(data.G_test.shape[0], data.G_train.shape[0])
        for i, j in [(0, 0), (3, 7), (9, 59)]:
            c = data.G_test[i] * data.G_train[j]
            sums = [c[q.offset + r.start: q.offset + r.stop].sum()
                    for q in params for r in _partition(q.numel, block)]
            want = _fixed_dev(np.array(sums)) / _fixed_dev(c)
            assert got[i, j] == pytest.approx(want, rel=1e-9)
        row = table[(table.block == block) & (table.order == "model")].iloc[0]
        assert row.n_blocks == sum(len(_partition(q.numel, block)) for q in params)
        assert row.median_ratio == pytest.approx(np.median(got))
    assert set(table.order) == {"model", "shuffled"}


def test_importance_probs_are_the_library_fit_and_the_checks_use_its_formulas(tiny):
    """The notebook's probabilities (numpy, from the gradient matrix) are those
    Dropout(importance=True).fit sets from the same samples; each check's formula is
    dropinf.theory's, its draws have the formula's mean, and its ratio is to the fixed mask."""
    _, data = tiny
    X, y = data.train
    comp = di.Dropout(0.6, importance=True).fit(data.task, [(X, y)])
    lib = np.concatenate([comp.probs[q.name].numpy() for q in data.task.params])
    np.testing.assert_allclose(T.importance_probs(data.G_train, 0.6), lib, rtol=1e-6, atol=1e-12)
    pairs, _ = T.real_pairs(data, 2)
    df = T.importance_checks(pairs, data.G_train, (0.5, 0.9), 400, seed=1)
    assert len(df) == 2 * 2 * len(T.IMPORTANCE_LAWS)
    for r in df.itertuples():
        pr = next(p for p in pairs if p.label == r.pair)
        pi = T.importance_probs(data.G_train, r.p)
        law = r.law.removeprefix("importance_")
        assert r.var_formula == pytest.approx(th.importance_variance(pr.a, pr.b, pi, law))
        assert r.var_uniform == pytest.approx(float(th.fixed_variance(pr.a, pr.b, r.k)))
        assert r.k == round((1 - r.p) * len(pr.a)) and r.exact_formula == (law == "poisson")
        assert abs(r.z_mean) < 5  # unbiased: 400 draws, the mean within 5 standard errors


def test_library_check_with_blocks_uses_the_block_formula(tiny):
    _, data = tiny
    a, b = data.G_test[0], data.G_train[1]
    df = T.library_check(data, 0, 1, 0.5, 12, seed=3, blocks=(4,))
    params = data.task.params
    sums = np.array([(a * b)[q.offset + r.start: q.offset + r.stop].sum()
                     for q in params for r in _partition(q.numel, 4)])
    for law in ("fixed", "bernoulli"):
        base = seed_for(3, "library", law, 4)
        x = []
        for s in range(12):
            comp = di.Dropout(0.5, mask=law, seed=base + s, block=4).bind(data.task)
            idx, sc = comp.kept_indices()
            idx, sc = idx.numpy(), sc.double().numpy()
            x.append(np.sum(a[idx] * sc * b[idx] * sc))
        r = df[df.law == law].iloc[0]
        assert r.block == 4 and "blocks of 4" in r.pair
        assert r.mean_mc == pytest.approx(np.mean(x), rel=1e-4, abs=1e-9)
        assert r.var_mc == pytest.approx(np.var(x, ddof=1), rel=1e-3, abs=1e-12)
        m = len(sums)
        if law == "fixed":  # k = round(m/2) blocks of m, scale m/k per product
            k = round(0.5 * m)
            want = m * (m - k) / (k * (m - 1)) * np.sum((sums - sums.mean()) ** 2)
        else:
            want = np.sum(sums**2)  # (1-q)/q = 1 at q = 1/2
        assert r.var_formula == pytest.approx(want, rel=1e-9)


@pytest.fixture(scope="module")
def small_pairs():
    """FactorPairs of a small MLP with a bias, built by hand."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.Tanh(), torch.nn.Linear(8, 6))
    task = di.Task(model, di.losses.cross_entropy)
    x, y = torch.randn(7, 12), torch.randint(0, 6, (7,))
    with di.PerSampleGrads(task) as psg:
        bg, _ = psg((x, y))
    G = loop_grads(model, di.losses.cross_entropy,
                   [(x[i : i + 1], y[i : i + 1]) for i in range(7)],
                   [q.name for q in task.params]).double()
    return T.FactorPairs(task, (x, y), bg, 3, (G[:3] @ G[3:].T).numpy(), "small"), G


def test_shuffled_units_keep_the_dot_products(small_pairs):
    fp, G = small_pairs
    sh = T.shuffled_units(fp.bg, seed=1)
    Gs = sh.flat().double()
    np.testing.assert_allclose(Gs @ Gs.T, G @ G.T, rtol=1e-5, atol=1e-6)  # float32 grads
    assert not torch.allclose(Gs, G)  # the coordinates did move
    comp = di.Dropout(0.5, factored=True, block=2, seed=0).bind(fp.task)
    assert not torch.allclose(comp.compress(sh), comp.compress(fp.bg))


def test_factored_block_mc_against_kept_indices(small_pairs):
    fp, G = small_pairs
    n = 12
    table, var = T.factored_block_mc(fp, 0.5, (2,), n, seed=5)
    for (block, order), stream in [((1, "model"), "factored block mc"),
                                   ((1, T.CONTROL), "control"),
                                   ((2, "model"), "factored block mc")]:
        x = []
        for s in range(n):
            comp = di.Dropout(0.5, factored=True, block=block,
                              seed=seed_for(5, stream, block) + s).bind(fp.task)
            idx, sc = comp.kept_indices()
            Z = G[:, idx] * sc.double()
            x.append((Z[:3] @ Z[3:].T).numpy())
        np.testing.assert_allclose(var[block, order], np.var(x, axis=0, ddof=1),
                                   rtol=1e-6, atol=1e-12)
    sh = T.shuffled_units(fp.bg, seed_for(5, "unit order")).flat().double()
    x = []
    for s in range(n):  # the same masks on the shuffled units
        comp = di.Dropout(0.5, factored=True, block=2,
                          seed=seed_for(5, "factored block mc", 2) + s).bind(fp.task)
        idx, sc = comp.kept_indices()
        Z = sh[:, idx] * sc.double()
        x.append((Z[:3] @ Z[3:].T).numpy())
    np.testing.assert_allclose(var[2, "shuffled"], np.var(x, axis=0, ddof=1), rtol=1e-6,
                               atol=1e-12)
    assert not np.allclose(var[2, "shuffled"], var[2, "model"])
    unit = var[1, "model"]
    for _, row in table.iterrows():
        assert row.median_ratio == pytest.approx(np.median(var[row.block, row.order] / unit))
    assert table[(table.block == 1) & (table.order == "model")].median_ratio.item() == 1.0
    assert set(table.order) == {"model", T.CONTROL, "shuffled"}


def test_minilm_factors_are_exact_gradient_products():
    cfg = T.Config(block_n_test=2, block_n_train=3, block_max_length=12)
    fp = T.minilm_factors(cfg)
    names = [q.name for q in fp.task.params]
    assert names and all(n.startswith("layers.") for n in names)  # the head is left out
    samples = [{k: v[i : i + 1] for k, v in fp.batch.items()} for i in range(5)]
    G = loop_grads(fp.task.model, fp.task.loss, samples, names).double()
    np.testing.assert_allclose(fp.exact, (G[:2] @ G[2:].T).numpy(), rtol=1e-4, atol=1e-8)


def test_conclusion_reports_the_block_numbers(tiny, small_pairs):
    cfg, data = tiny
    fp, _ = small_pairs
    checks = T.check_pairs(T.synthetic_pairs(cfg), cfg.rates, 100, cfg.seed)
    real = T.real_pair_table(data, cfg.rates)
    cross = T.crossover_table(cfg, T.ratio_table(checks), real)
    fisher = T.fisher_bias(cfg, data)
    flat, _ = T.block_table(data, (4, 16), seed=0)
    factored, _ = T.factored_block_mc(fp, 0.5, (4, 16), 10, seed=0)
    text, nums = T.conclude(cfg, checks, cross, real, T.pair_coherences(data), data.d, fisher,
                            flat, factored)
    b = nums["blocks"]
    assert b["block"] == 16
    want = flat[(flat.block == 16) & (flat.order == "model")].median_ratio.item()
    assert b["flat_mlp"]["model"]["median_ratio"] == pytest.approx(want)
    assert f"{want:.2f} times the unit mask's" in text
    fm = factored[(factored.block == 16) & (factored.order == "model")].median_ratio.item()
    assert f"median {fm:.2f} times the unit mask's variance" in text
    ctrl = factored[factored.order == T.CONTROL].median_ratio.item()
    assert b["factored_unit_control"]["median_ratio"] == pytest.approx(ctrl)
    json.dumps(nums)


def test_block_verdict_follows_the_bootstrap_interval(tiny, small_pairs):
    cfg, data = tiny
    checks = T.check_pairs(T.synthetic_pairs(cfg), cfg.rates, 100, cfg.seed)
    real = T.real_pair_table(data, cfg.rates)
    args = (checks, T.crossover_table(cfg, T.ratio_table(checks), real), real,
            T.pair_coherences(data), data.d, T.fisher_bias(cfg, data))
    flat, _ = T.block_table(data, (16,), seed=0)
    factored, _ = T.factored_block_mc(small_pairs[0], 0.5, (16,), 10, seed=0, n_boot=20)
    row = (factored.block == 16) & (factored.order == "model")
    for lo, hi, verdict, phrase in [(0.5, 2.0, "none visible", "no cost of blocks is visible"),
                                    (1.2, 2.0, "cost", "blocks cost variance here"),
                                    (0.3, 0.8, "save", "blocks save variance here")]:
        f = factored.copy()
        f.loc[row, "median_ratio_lo"], f.loc[row, "median_ratio_hi"] = lo, hi
        text, nums = T.conclude(cfg, *args, flat, f)
        assert nums["blocks"]["factored_verdict"] == verdict
        assert phrase in text and f"masks {lo:.2f} to {hi:.2f}" in text
        assert small_pairs[0].label in text
