"""Metrics against per-test-point scipy loops and sampling theory; retraining on a tiny convex
problem against leave-one-out theory and a from-scratch scipy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from scipy.stats import pearsonr, spearmanr
from sklearn.datasets import load_breast_cancer
from sklearn.preprocessing import StandardScaler
from torch import nn

import dropinf as di
from dropinf.study import metrics, models, retrain


def ties_pair(rng, n_test=12, n_train=40):
    """Two correlated integer matrices with many ties."""
    A = rng.integers(0, 6, size=(n_test, n_train)).astype(float)
    return A, A + rng.integers(-3, 4, size=A.shape)


def test_rowwise_correlations_match_scipy_with_ties():
    A, B = ties_pair(np.random.default_rng(0))
    for method, ref in (("pearson", pearsonr), ("spearman", spearmanr)):
        est = metrics.per_test_correlation(A, B, method, n_boot=200)
        expect = np.array([ref(a, b).statistic for a, b in zip(A, B)])
        np.testing.assert_allclose(est.values, expect, rtol=1e-12, atol=1e-14)
        assert est.value == pytest.approx(expect.mean(), rel=1e-12)
        assert est.std == pytest.approx(expect.std(ddof=1), rel=1e-12)
        assert est.sem == pytest.approx(est.std / math.sqrt(len(A)), rel=1e-12)
        assert est.low < est.value < est.high and est.n == len(A) and est.n_excluded == 0
    # torch input and order of arguments make no difference
    r = metrics.rowwise_spearman(torch.as_tensor(B), torch.as_tensor(A))
    np.testing.assert_allclose(r, metrics.rowwise_spearman(A, B), rtol=1e-14)


def test_constant_rows_are_nan_with_a_warning_and_excluded():
    A, B = ties_pair(np.random.default_rng(1))
    A[3] = 2.0
    B[7] = -1.0
    with pytest.warns(RuntimeWarning, match="2 of 12 rows are constant"):
        est = metrics.per_test_correlation(A, B, "spearman", n_boot=100)
    assert np.isnan(est.values[[3, 7]]).all() and np.isfinite(np.delete(est.values, [3, 7])).all()
    keep = np.delete(np.arange(12), [3, 7])
    expect = np.mean([spearmanr(A[i], B[i]).statistic for i in keep])
    assert est.value == pytest.approx(expect, rel=1e-12)
    assert (est.n, est.n_excluded) == (10, 2)
    with pytest.warns(RuntimeWarning, match="constant"):
        assert np.isnan(metrics.overall_correlation(np.ones((3, 4)), B[:3, :4]).value)


@pytest.mark.parametrize("method", ["pearson", "spearman"])
def test_overall_correlation_and_its_row_bootstrap_match_a_slow_loop(method):
    A, B = ties_pair(np.random.default_rng(2), n_test=8, n_train=15)
    ref = pearsonr if method == "pearson" else spearmanr
    est = metrics.overall_correlation(A, B, method, n_boot=50, seed=3)
    assert est.value == pytest.approx(ref(A.ravel(), B.ravel()).statistic, rel=1e-12)
    # the same resampled row counts, applied by repeating whole rows
    counts = np.random.default_rng(3).multinomial(8, np.full(8, 1 / 8), size=50)
    if method == "spearman":  # ranks of the full sample, held fixed
        A = metrics.ranks(A, axis=None).reshape(A.shape)
        B = metrics.ranks(B, axis=None).reshape(B.shape)
    boot = [pearsonr(np.repeat(A, c, 0).ravel(), np.repeat(B, c, 0).ravel()).statistic
            for c in counts]
    np.testing.assert_allclose([est.low, est.high], np.quantile(boot, [0.025, 0.975]), rtol=1e-10)


def test_topk_overlap_against_sets_and_its_null_distribution():
    rng = np.random.default_rng(4)
    A = rng.standard_normal((30, 50))
    B = A + rng.standard_normal(A.shape)
    k = 7
    est = metrics.topk_overlap(A, B, k, n_boot=200)
    expect = [len(set(np.argsort(a)[-k:]) & set(np.argsort(b)[-k:])) / k for a, b in zip(A, B)]
    np.testing.assert_allclose(est.values, expect)
    assert metrics.topk_overlap(A, 3 * A + 1, k).value == 1.0
    # ties go to the lower index
    flat = np.zeros((1, 50))
    assert metrics.topk_overlap(flat, np.arange(50.0)[None, ::-1], 5).value == 1.0
    # independent scores: hypergeometric overlap, mean k/n
    n_test, n, k = 2000, 50, 10
    null = metrics.topk_overlap(rng.random((n_test, n)), rng.random((n_test, n)), k, n_boot=0)
    var = k * (k / n) * (1 - k / n) * (n - k) / (n - 1) / k**2
    assert abs(null.value - k / n) < 4 * math.sqrt(var / n_test), null.value
    assert null.std == pytest.approx(math.sqrt(var), rel=0.1)


def test_bootstrap_interval_agrees_with_the_normal_one_for_a_large_sample():
    x = np.random.default_rng(5).standard_normal(4000) + 0.3
    boot = metrics.summarize(x, n_boot=2000, seed=1)
    normal = metrics.summarize(x, n_boot=0)
    half = 1.959964 * x.std(ddof=1) / math.sqrt(len(x))
    assert (normal.low, normal.high) == pytest.approx((x.mean() - half, x.mean() + half))
    # the mean of 4000 values is close to normal: the percentile interval agrees
    assert (boot.low, boot.high) == pytest.approx((normal.low, normal.high), abs=0.1 * half)


@pytest.mark.parametrize("method", ["pearson", "spearman"])
def test_fisher_z_interval_covers_the_population_correlation(method):
    """2000 samples of 40 pairs from a bivariate normal with rho = 0.6; population Spearman is
    (6 / pi) asin(rho / 2). Coverage of a 95% interval: binomial sd 0.5%."""
    rng = np.random.default_rng(6)
    rho, n, reps = 0.6, 40, 2000
    x = rng.standard_normal((reps, n))
    y = rho * x + math.sqrt(1 - rho**2) * rng.standard_normal((reps, n))
    r = (metrics.rowwise_pearson if method == "pearson" else metrics.rowwise_spearman)(x, y)
    truth = rho if method == "pearson" else 6 / math.pi * math.asin(rho / 2)
    cover = np.mean([lo < truth < hi for lo, hi in
                     (metrics.fisher_z_interval(v, n, method) for v in r)])
    assert 0.93 < cover < 0.97, cover
    est = metrics.loo_correlation(x[0], y[0], method)
    assert est.value == pytest.approx(r[0]) and (est.low, est.high) == pytest.approx(
        metrics.fisher_z_interval(r[0], n, method))


def test_lds_subsets():
    masks = metrics.lds_subsets(101, 400, fraction=0.3, seed=7)
    assert masks.shape == (400, 101) and masks.dtype == bool
    assert (masks.sum(1) == 30).all()
    assert np.array_equal(masks, metrics.lds_subsets(101, 400, 0.3, seed=7))
    assert not np.array_equal(masks, metrics.lds_subsets(101, 400, 0.3, seed=8))
    # each point is kept with probability 30/101: binomial spread over 400 subsets
    p = 30 / 101
    assert np.abs(masks.mean(0) - p).max() < 4.5 * math.sqrt(p * (1 - p) / 400)


def slow_lds(scores, masks, outputs):
    """Per test point: sum the scores of each subset's points by a loop, then scipy."""
    out = []
    for t in range(scores.shape[0]):
        pred = [sum(scores[t, i] for i in np.flatnonzero(mk)) for mk in masks]
        out.append(spearmanr(pred, outputs[:, t]).statistic)
    return np.array(out)


def test_lds_matches_a_brute_force_loop_and_its_invariances():
    rng = np.random.default_rng(8)
    n_test, n, m = 6, 20, 15
    S = rng.standard_normal((n_test, n))
    masks = metrics.lds_subsets(n, m, 0.5, seed=0)
    Y = masks @ S.T + rng.standard_normal((m, n_test))
    est = metrics.lds(S, masks, Y, n_boot=100)
    np.testing.assert_allclose(est.values, slow_lds(S, masks, Y), rtol=1e-12)
    # same-size subsets: a per-test shift of every score, or a positive scale, changes nothing;
    # negated scores negate LDS
    same = metrics.lds(3 * S + rng.standard_normal((n_test, 1)), masks, Y, n_boot=0)
    np.testing.assert_allclose(same.values, est.values, rtol=1e-12)
    np.testing.assert_allclose(metrics.lds(-S, masks, Y, n_boot=0).values, -est.values)


def test_lds_of_a_linear_datamodel_and_of_random_scores():
    """outputs = masks @ true.T + noise. With signal sd s and noise sd e the Pearson
    correlation is r = s / sqrt(s^2 + e^2), and for Gaussian pairs Spearman is
    (6 / pi) asin(r / 2).

    Null: against outputs unrelated to the subsets a per-test Spearman over m subsets has
    variance exactly 1 / (m - 1). Random scores against the linear datamodel add their chance
    alignment with the true scores: across same-size subsets the population Pearson is the
    cosine of the centred score vectors, variance 1 / (n - 1), times (3 / pi)^2 for Spearman."""
    rng = np.random.default_rng(9)
    n_test, n, m = 200, 100, 100
    true = rng.standard_normal((n_test, n))
    masks = metrics.lds_subsets(n, m, 0.5, seed=1)
    signal_sd = math.sqrt(50 * 50 / 99)  # sd of a sum of 50 of 100 unit-variance scores
    Y = masks @ true.T + 0.1 * signal_sd * rng.standard_normal((m, n_test))
    r = 1 / math.sqrt(1 + 0.1**2)
    est = metrics.lds(true, masks, Y, seed=2)
    assert est.value == pytest.approx(6 / math.pi * math.asin(r / 2), abs=0.005), est.value
    assert est.low <= est.value <= est.high
    random_scores = rng.standard_normal((n_test, n))
    unrelated = rng.standard_normal((m, n_test))
    for outputs, var in ((unrelated, 1 / (m - 1)), (Y, 1 / (m - 1) + (3 / math.pi) ** 2 / (n - 1))):
        null = metrics.lds(random_scores, masks, outputs, seed=2)
        # sd of a sample sd of 200 values: about 5% relative
        assert null.std == pytest.approx(math.sqrt(var), rel=0.15), (null.std, math.sqrt(var))
        assert abs(null.value) < 4 * math.sqrt(var / n_test), null.value
        assert null.sem == pytest.approx(null.std / math.sqrt(n_test))


def test_bad_inputs():
    A = np.zeros((3, 5))
    with pytest.raises(ValueError, match="same shape"):
        metrics.per_test_correlation(A, np.zeros((3, 4)))
    with pytest.raises(ValueError, match="method='kendall'"):
        metrics.per_test_correlation(A, A, "kendall")
    with pytest.raises(ValueError, match="2 dimensions"):
        metrics.topk_overlap(np.zeros(5), np.zeros(5))
    with pytest.raises(ValueError, match="k=6"):
        metrics.topk_overlap(A, A, k=6)
    with pytest.raises(ValueError, match="fraction=1.2"):
        metrics.lds_subsets(10, 5, 1.2)
    with pytest.raises(ValueError, match="keeps 0"):
        metrics.lds_subsets(10, 5, 0.01)
    masks = metrics.lds_subsets(5, 4, seed=0)
    with pytest.raises(TypeError, match="bool"):
        metrics.lds(A, masks.astype(float), np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"\(m, n_test\) = \(4, 3\)"):
        metrics.lds(A, masks, np.zeros((3, 4)))
    with pytest.raises(ValueError, match="cover 5 training points but scores have 4"):
        metrics.lds(np.zeros((3, 4)), masks, np.zeros((4, 3)))
    with pytest.raises(ValueError, match="level=95"):
        metrics.summarize(np.ones(4), level=95)
    with pytest.raises(TypeError, match="int indices"):
        retrain.loo_effects(None, None, np.array([0.5]), 4)
    with pytest.raises(ValueError, match="repeated"):
        retrain.loo_effects(None, None, np.array([1, 1]), 4)


def test_retraining_plumbing_with_a_fake_model():
    """A "model" that remembers its indices and seed; the output is a known function of them."""

    def train(idx, seed):
        return idx, seed

    def output(model):
        idx, seed = model
        return torch.tensor([idx.sum() + 100.0 * seed, float(len(idx))])

    masks = metrics.lds_subsets(6, 3, 0.5, seed=0)
    every = retrain.subset_outputs(train, output, masks, seeds=(1, 2), progress=False,
                                   per_seed=True)
    expect = np.array([[[np.flatnonzero(mk).sum() + 100 * s, 3] for s in (1, 2)] for mk in masks])
    np.testing.assert_array_equal(every, expect)
    mean = retrain.subset_outputs(train, output, masks, seeds=(1, 2), progress=False)
    np.testing.assert_array_equal(mean, expect.mean(1))
    # removing point j lowers the first output by j and the count by one, whatever the seed
    eff = retrain.loo_effects(train, output, np.array([4, 0, 2]), 6, seeds=(0, 3), progress=False)
    np.testing.assert_array_equal(eff, [[4, 1], [0, 1], [2, 1]])
    t = torch.arange(5.0)
    part = retrain.subset_batch({"x": t, "pair": (2 * t, "label")}, np.array([3, 0]))
    assert torch.equal(part["x"], t[[3, 0]]) and part["pair"][1] == "label"
    assert torch.equal(part["pair"][0], 2 * t[[3, 0]])


L2 = 0.1


def bce(model, batch):
    x, y = batch
    return F.binary_cross_entropy_with_logits(model(x).squeeze(-1), y, reduction="none")


@pytest.fixture(scope="module")
def tiny_logreg():
    """L2-regularised logistic regression on 80 breast-cancer points, 15 test points, float64,
    with its exact influence scores (n_test, n_train)."""
    X, y = load_breast_cancer(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    idx = np.random.default_rng(0).permutation(len(X))
    to = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    train = to(X[idx[:80]]), to(y[idx[:80]])
    test = to(X[idx[80:95]]), to(y[idx[80:95]])
    torch.manual_seed(0)
    model = nn.Linear(30, 1).double()
    assert models.fit_full_batch(model, bce, train, l2=L2) < 1e-8
    task = di.Task(model, bce)
    G_tr = di.gradients(task, [train], di.Identity(), progress=False, dtype=torch.float64)
    G_te = di.gradients(task, [test], di.Identity(), progress=False, dtype=torch.float64)
    S = di.scores(G_te, G_tr, di.Preconditioner.fit_exact(task, [train], l2=L2)).numpy()
    return model, train, test, S


def test_leave_one_out_effects_follow_score_over_n(tiny_logreg):
    """Removing point j is the up-weighting by -1/n that influence linearises, so the fall in
    the (negated-loss) output is about score / n: close to it in scale, not just correlated."""
    model, train, test, S = tiny_logreg
    n = len(train[0])
    fit = retrain.ConvexRetrainer(model, bce, train, l2=L2)
    removed = np.arange(0, n, 2)
    eff = retrain.loo_effects(fit, retrain.negative_loss(bce, test), removed, n, progress=False)
    assert eff.shape == (40, 15) and max(fit.grad_norms) < 1e-6
    predicted = S[:, removed].T / n
    summed = metrics.loo_correlation(predicted.sum(1), eff.sum(1))
    assert summed.value > 0.95 and summed.low > 0.9, summed
    per_test = metrics.loo_correlation(predicted, eff, "spearman", n_boot=200)
    assert per_test.value > 0.9 and per_test.n == 15, per_test
    assert np.median(eff / predicted) == pytest.approx(1.0, abs=0.1)
    # a fit stopped early says so
    early = retrain.ConvexRetrainer(model, bce, train, l2=L2, max_iter=1)
    with pytest.warns(RuntimeWarning, match="gradient norm"):
        early(np.arange(0, n, 2), seed=0)


def scipy_logreg_outputs(train, test, kept, n):
    """From scratch, cold start at zero: minimise (1/n) sum_{i in kept} loss_i + L2/2 |theta|^2
    over theta = (w, b) with scipy, and return the negated test losses."""
    X, y = train[0].numpy()[kept], train[1].numpy()[kept]
    Xb = np.hstack([X, np.ones((len(X), 1))])

    def f(theta):
        z = Xb @ theta
        loss = np.logaddexp(0, z) - y * z
        grad = Xb.T @ (1 / (1 + np.exp(-z)) - y)
        return loss.sum() / n + L2 / 2 * theta @ theta, grad / n + L2 * theta

    theta = minimize(f, np.zeros(Xb.shape[1]), jac=True, method="L-BFGS-B",
                     options={"gtol": 1e-12, "ftol": 0, "maxiter": 5000}).x
    z = np.hstack([test[0].numpy(), np.ones((len(test[0]), 1))]) @ theta
    return -(np.logaddexp(0, z) - test[1].numpy() * z)


def test_lds_on_retrained_logistic_regression_matches_a_scipy_reference(tiny_logreg):
    model, train, test, S = tiny_logreg
    n, m = len(train[0]), 20
    masks = metrics.lds_subsets(n, m, 0.5, seed=3)
    fit = retrain.ConvexRetrainer(model, bce, train, l2=L2)
    Y = retrain.subset_outputs(fit, retrain.negative_loss(bce, test), masks, progress=False)
    Y_ref = np.stack([scipy_logreg_outputs(train, test, mk, n) for mk in masks])
    np.testing.assert_allclose(Y, Y_ref, rtol=1e-6, atol=1e-8)
    est = metrics.lds(S, masks, Y)
    np.testing.assert_allclose(est.values, slow_lds(S, masks, Y_ref), atol=1e-12)
    assert est.value > 0.8, est
    # random scores: null spread as in test_lds_of_a_linear_datamodel_and_of_random_scores
    null = metrics.lds(np.random.default_rng(0).standard_normal(S.shape), masks, Y, n_boot=0)
    assert abs(null.value) < 4 * math.sqrt((1 / (m - 1) + (3 / math.pi) ** 2 / (n - 1)) / len(S))
