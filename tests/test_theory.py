"""Tests for dropinf.theory: closed forms against exact enumeration and Monte Carlo.

Two kinds of checks:
- exact: for tiny d, enumerate every mask (or integrate exactly over a Gaussian P with
  Gauss-Hermite quadrature, exact for polynomials) and compare moments to float tolerance;
- statistical: 20000 draws per case with fixed seeds. The sample mean must lie within Z
  standard errors ``sqrt(Var/n)`` of a.b; the sample variance within Z standard errors of
  the formula, where ``sd(s^2) = sqrt((mu4 - Var^2 (n-3)/(n-1)) / n)`` is the exact standard
  deviation of a sample variance. mu4 is the closed-form fourth central moment where we have
  one (Bernoulli, Gaussian; both verified exactly below) and the sample's own fourth central
  moment otherwise (fixed mask, SJLT; consistent, and n is large enough for it to be stable).
  With Z = 5 a correct formula fails with probability ~6e-7 per check under the normal
  approximation; a wrong formula is off by O(1) relative error, many standard errors.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.polynomial.hermite_e import hermegauss

from dropinf import theory as th

Z = 5.0
N = 20_000


def _pairs():
    g = np.random.default_rng(123)
    a, b = g.standard_normal(40), g.standard_normal(40)
    return {
        "flat": th.coherent_pair(40, 1.0, rho=0.5, seed=1),
        "coherent4": th.coherent_pair(40, 4.0, rho=0.5, seed=2),
        "gauss": (a, 0.6 * a + 0.8 * b),
    }


PAIRS = _pairs()


def _check_mean(x, ab, var):
    se = math.sqrt(var / len(x))
    assert abs(x.mean() - ab) <= Z * se, (x.mean(), ab, se)


def _check_var(x, var, mu4=None):
    if mu4 is None:
        mu4 = np.mean((x - x.mean()) ** 4)
    sd = math.sqrt(th.var_of_sample_variance(var, mu4, len(x)))
    s2 = x.var(ddof=1)
    assert abs(s2 - var) <= Z * sd, (s2, var, sd)


# --------------------------------------------------------------------------- exact moments


def _moments(vals, probs):
    m = np.sum(probs * vals)
    return m, np.sum(probs * (vals - m) ** 2), np.sum(probs * (vals - m) ** 4)


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.8, 1.0])
def test_bernoulli_exact_enumeration(keep):
    g = np.random.default_rng(0)
    a, b = g.standard_normal(6), g.standard_normal(6)
    masks = np.array(list(itertools.product([0, 1], repeat=6)), dtype=float)
    probs = np.prod(np.where(masks == 1, keep, 1 - keep), axis=1)
    m, v, m4 = _moments(masks @ (a * b) / keep, probs)
    assert m == pytest.approx(a @ b, rel=1e-12)
    assert v == pytest.approx(th.bernoulli_variance(a, b, keep), rel=1e-10, abs=1e-14)
    assert m4 == pytest.approx(th.bernoulli_moment4(a, b, keep), rel=1e-10, abs=1e-14)


def _fixed_exact(a, b, k):
    d = len(a)
    subsets = np.array(list(itertools.combinations(range(d), k)))
    vals = (a * b)[subsets].sum(axis=1) * d / k
    return _moments(vals, np.full(len(vals), 1 / len(vals)))[:2]


@pytest.mark.parametrize("k", range(1, 8))
def test_fixed_exact_enumeration(k):
    g = np.random.default_rng(k)
    a, b = g.standard_normal(7), g.standard_normal(7) + 0.5
    m, v = _fixed_exact(a, b, k)
    assert m == pytest.approx(a @ b, rel=1e-12)
    assert v == pytest.approx(th.fixed_variance(a, b, k), rel=1e-10, abs=1e-13)


@settings(max_examples=30, deadline=None)
@given(
    d=st.integers(2, 6),
    k=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_fixed_exact_enumeration_property(d, k, seed):
    k = min(k, d)
    g = np.random.default_rng(seed)
    a, b = g.standard_normal(d), g.exponential(size=d)
    m, v = _fixed_exact(a, b, k)
    assert m == pytest.approx(a @ b, rel=1e-10, abs=1e-12)
    assert v == pytest.approx(th.fixed_variance(a, b, k), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("k,c", [(3, 1), (3, 2), (3, 3), (4, 2)])
def test_sjlt_exact_enumeration(k, c):
    d = 3
    g = np.random.default_rng(10 * k + c)
    a, b = g.standard_normal(d), g.standard_normal(d)
    # every possible column: a c-subset of rows and c signs, all equally likely
    cols = []
    for rows in itertools.combinations(range(k), c):
        for signs in itertools.product([-1.0, 1.0], repeat=c):
            col = np.zeros(k)
            col[list(rows)] = np.array(signs) / math.sqrt(c)
            cols.append(col)
    cols = np.array(cols)  # (n_col, k)
    idx = np.array(list(itertools.product(range(len(cols)), repeat=d)))  # (n_cfg, d)
    S = cols[idx]  # (n_cfg, d, k): S[t, j] is column j of configuration t
    vals = np.einsum("tk,tk->t", a @ S, b @ S)
    m, v, _ = _moments(vals, np.full(len(vals), 1 / len(vals)))
    assert m == pytest.approx(a @ b, rel=1e-12)
    assert v == pytest.approx(th.sjlt_variance(a, b, k, c), rel=1e-10)


@pytest.mark.parametrize("k,d", [(1, 3), (2, 3), (3, 2)])
def test_gaussian_exact_quadrature(k, d):
    # X is a degree-4 polynomial in the k*d entries of P, (X - m)^4 has degree 8 in each entry;
    # 5-point Gauss-Hermite (exact to degree 9 per variable) integrates every moment exactly.
    g = np.random.default_rng(k + d)
    a, b = g.standard_normal(d), g.standard_normal(d)
    x, w = hermegauss(5)
    w = w / w.sum()
    grid = np.array(list(itertools.product(range(5), repeat=k * d)))
    P = x[grid].reshape(-1, k, d) / math.sqrt(k)
    probs = np.prod(w[grid], axis=1)
    m, v, m4 = _moments(np.einsum("tk,tk->t", P @ a, P @ b), probs)
    assert m == pytest.approx(a @ b, rel=1e-10)
    assert v == pytest.approx(th.gaussian_variance(a, b, k), rel=1e-10)
    assert m4 == pytest.approx(th.gaussian_moment4(a, b, k), rel=1e-10)


# --------------------------------------------------------------------------- Monte Carlo


@pytest.mark.parametrize("name", PAIRS)
@pytest.mark.parametrize("keep", [0.1, 0.5])
def test_bernoulli_monte_carlo(name, keep):
    a, b = PAIRS[name]
    x = th.sample_bernoulli(a, b, keep, N, seed=11)
    var = th.bernoulli_variance(a, b, keep)
    _check_mean(x, a @ b, var)
    _check_var(x, var, th.bernoulli_moment4(a, b, keep))


@pytest.mark.parametrize("name", PAIRS)
@pytest.mark.parametrize("k", [4, 20, 36])
def test_fixed_monte_carlo(name, k):
    a, b = PAIRS[name]
    x = th.sample_fixed(a, b, k, N, seed=12)
    var = th.fixed_variance(a, b, k)
    _check_mean(x, a @ b, var)
    _check_var(x, var)


@pytest.mark.parametrize("name", PAIRS)
@pytest.mark.parametrize("k", [4, 16])
def test_gaussian_monte_carlo(name, k):
    a, b = PAIRS[name]
    x = th.sample_gaussian(a, b, k, N, seed=13)
    var = th.gaussian_variance(a, b, k)
    _check_mean(x, a @ b, var)
    _check_var(x, var, th.gaussian_moment4(a, b, k))


@pytest.mark.parametrize("name", PAIRS)
@pytest.mark.parametrize("k,c", [(8, 1), (8, 3)])
def test_sjlt_monte_carlo(name, k, c):
    a, b = PAIRS[name]
    x = th.sample_sjlt(a, b, k, c, N, seed=14)
    var = th.sjlt_variance(a, b, k, c)
    _check_mean(x, a @ b, var)
    _check_var(x, var)


def test_samplers_reproducible():
    a, b = PAIRS["gauss"]
    for f, arg in [
        (th.sample_bernoulli, 0.3),
        (th.sample_fixed, 5),
        (th.sample_gaussian, 5),
    ]:
        np.testing.assert_array_equal(f(a, b, arg, 50, seed=3), f(a, b, arg, 50, seed=3))
    np.testing.assert_array_equal(
        th.sample_sjlt(a, b, 5, 2, 50, seed=3), th.sample_sjlt(a, b, 5, 2, 50, seed=3)
    )


# --------------------------------------------------------------------------- exact limits


def test_no_compression_has_zero_variance():
    a, b = PAIRS["gauss"]
    d = len(a)
    assert th.fixed_variance(a, b, d) == 0.0
    assert th.bernoulli_variance(a, b, 1.0) == 0.0
    np.testing.assert_allclose(th.sample_fixed(a, b, d, 100, seed=0), a @ b, rtol=1e-12)
    np.testing.assert_allclose(th.sample_bernoulli(a, b, 1.0, 100, seed=0), a @ b, rtol=1e-12)


def test_fixed_k1_and_bernoulli_relation():
    a, b = PAIRS["coherent4"]
    d, c = len(a), a * b
    # k = 1: X = d c_I with I uniform, so Var = d^2 Var(c_I) = d sum (c - cbar)^2
    assert th.fixed_variance(a, b, 1) == pytest.approx(d * np.sum((c - c.mean()) ** 2))
    # sampling without replacement never does worse than Bernoulli by more than d/(d-1)
    for k in (1, 10, 30):
        assert th.fixed_variance(a, b, k) <= d / (d - 1) * th.bernoulli_variance(a, b, k / d)


def test_sjlt_below_gaussian_and_batched():
    g = np.random.default_rng(5)
    A, B = g.standard_normal((7, 30)), g.standard_normal((7, 30))
    diff = th.gaussian_variance(A, B, 8) - th.sjlt_variance(A, B, 8, 2)
    np.testing.assert_allclose(diff, 2 * np.sum((A * B) ** 2, axis=1) / 8)
    for f, arg in [
        (th.bernoulli_variance, 0.3),
        (th.fixed_variance, 9),
        (th.gaussian_variance, 9),
        (th.coherence, None),
    ]:
        args = () if arg is None else (arg,)
        batched = f(A, B, *args)
        assert batched.shape == (7,)
        np.testing.assert_allclose(batched, [f(x, y, *args) for x, y in zip(A, B)], rtol=1e-12)


def test_gaussian_same_vector():
    a = PAIRS["gauss"][0]
    assert th.gaussian_variance(a, a, 4) == pytest.approx(2 * (a @ a) ** 2 / 4)


def test_coherence_limits():
    d = 25
    one = np.ones(d)
    assert th.coherence(one, one) == pytest.approx(1.0)
    assert th.coherence(3 * one, -0.5 * one) == pytest.approx(1.0)
    e = np.zeros(d)
    e[7] = 2.0
    assert th.coherence(e, e) == pytest.approx(d)
    f = np.zeros(d)
    f[3] = 1.0
    assert th.coherence(e, f) == 0.0
    g = np.random.default_rng(0)
    for _ in range(20):
        a, b = g.standard_normal(d), g.standard_cauchy(d)
        assert 0.0 <= th.coherence(a, b) <= d


def test_effective_dimension_limits():
    e = np.array([5.0, 2.0, 1.0, 0.0, -1e-15])
    assert th.effective_dimension(e, 1e-12) == pytest.approx(3.0, rel=1e-9)
    assert th.effective_dimension(e, 1e9) == pytest.approx(8.0 / 1e9, rel=1e-6)
    assert th.effective_dimension(np.full(10, 0.3), 0.3) == pytest.approx(5.0)
    lams = np.logspace(-3, 3, 20)
    vals = [th.effective_dimension(e, lam) for lam in lams]
    assert all(np.diff(vals) < 0)
    with pytest.raises(ValueError):
        th.effective_dimension(e, 0.0)


@pytest.mark.parametrize("kappa", [1.0, 1.5, 4.0, 10.0, 30.0])
@pytest.mark.parametrize("rho", [-1.0, 0.0, 0.7, 1.0])
def test_coherent_pair_exact_coherence(kappa, rho):
    a, b = th.coherent_pair(64, kappa, rho=rho, seed=4)
    assert a.shape == b.shape == (64,)
    assert th.coherence(a, b) == pytest.approx(kappa, rel=1e-10)
    np.testing.assert_allclose(np.abs(a), np.abs(b))
    assert np.linalg.norm(a) == pytest.approx(1.0)
    if abs(rho) == 1.0:
        np.testing.assert_allclose(b, rho * a)
    a2, b2 = th.coherent_pair(64, kappa, rho=rho, seed=4)
    np.testing.assert_array_equal(a, a2)
    np.testing.assert_array_equal(b, b2)


def test_coherent_pair_flat_and_rho_mean():
    a, _ = th.coherent_pair(50, 1.0, seed=0)
    np.testing.assert_allclose(np.abs(a), 1 / math.sqrt(50))
    # E[cos] = rho; the cosine of one draw has sd <= sqrt(kappa/d), so 400 draws pin it to 0.025
    cos = [np.dot(*th.coherent_pair(50, 2.0, rho=0.3, seed=s)) for s in range(400)]
    assert abs(np.mean(cos) - 0.3) < Z * math.sqrt(2.0 / 50 / 400)
    with pytest.raises(ValueError):
        th.coherent_pair(50, 50.0)  # needs kappa < d/m
    with pytest.raises(ValueError):
        th.coherent_pair(50, 0.5)


# --------------------------------------------------------------------------- block masks


def _blocks(d: int, b: int) -> list[list[int]]:
    """The mask blocks re-derived: aligned runs of b, the remainder joining the last run."""
    m = max(1, d // b)
    out = [list(range(j * b, (j + 1) * b)) for j in range(m)]
    out[-1] = list(range((m - 1) * b, d))
    return out


@pytest.mark.parametrize("d,b", [(12, 3), (13, 3), (10, 4), (3, 4)])
def test_block_sums_follow_the_partition(d, b):
    c = np.random.default_rng(d).standard_normal((2, d))
    want = np.stack([c[:, blk].sum(1) for blk in _blocks(d, b)], -1)
    np.testing.assert_allclose(th.block_sums(c, b), want, rtol=0, atol=1e-12)
    st_ = th.PairStats.of(c[0], c[1], block=b)
    assert st_.d == len(_blocks(d, b))
    sums = [sum(c[0, i] * c[1, i] for i in blk) for blk in _blocks(d, b)]
    assert st_.cc == pytest.approx(sum(s * s for s in sums), rel=1e-12)


@pytest.mark.parametrize("d,b,k", [(12, 3, 1), (12, 3, 2), (13, 3, 3), (10, 4, 1)])
def test_block_fixed_exact_enumeration(d, b, k):
    """Every k-subset of blocks, each scaled by m/k: mean a.b and the fixed law on block sums."""
    a, bb = th.coherent_pair(d, 2.0, rho=0.4, seed=d + k)
    blocks = _blocks(d, b)
    m = len(blocks)
    vals = np.array([sum(a[i] * bb[i] for j in S for i in blocks[j]) * m / k
                     for S in itertools.combinations(range(m), k)])
    assert vals.mean() == pytest.approx(a @ bb, rel=1e-10, abs=1e-12)
    want = th.variance(th.PairStats.of(a, bb, block=b), "fixed", k)
    assert vals.var() == pytest.approx(want, rel=1e-9, abs=1e-14)


@pytest.mark.parametrize("keep", [0.3, 0.75])
def test_block_bernoulli_exact_enumeration(keep):
    d, b = 11, 3  # blocks of 3, 3, 5
    a, bb = th.coherent_pair(d, 3.0, rho=-0.3, seed=5)
    C = th.block_sums(a * bb, b)
    m = len(C)
    mean = second = 0.0
    for mask in itertools.product([0, 1], repeat=m):
        mask = np.array(mask)
        prob = np.prod(np.where(mask == 1, keep, 1 - keep))
        x = mask @ C / keep
        mean += prob * x
        second += prob * x * x
    want = th.variance(th.PairStats.of(a, bb, block=b), "bernoulli", keep * m)
    assert mean == pytest.approx(a @ bb, rel=1e-10)
    assert second - mean**2 == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("law,d,b,q", [("fixed", 6, 2, 1 / 3), ("fixed", 6, 2, 2 / 3),
                                       ("fixed", 8, 4, 0.5), ("bernoulli", 6, 2, 0.4),
                                       ("bernoulli", 8, 4, 0.7)])
def test_block_variance_by_order_is_the_exact_mean_over_all_orders(law, d, b, q):
    """Average the block mask's variance over all d! orders of the coordinates."""
    rng = np.random.default_rng(d * 10 + b)
    a = rng.standard_normal(d) + 0.5  # a mean product away from 0 matters for Bernoulli
    bb = a * rng.uniform(0.2, 1.5, d)
    perms = np.array(list(itertools.permutations(range(d))))
    st_perm = th.PairStats.of(a[perms], bb[perms], block=b)
    k = q * st_perm.d
    mean_over_orders = th.variance(st_perm, law, k).mean()
    want = th.block_variance_by_order(th.PairStats.of(a, bb), law, q, b)
    assert mean_over_orders == pytest.approx(want, rel=1e-10)
    unit = th.variance(th.PairStats.of(a, bb), law, q * d)
    if law == "fixed":  # free on average
        assert want == pytest.approx(unit, rel=1e-10)
    else:  # the mean product adds (1-q)/q (b-1) d (cbar^2 - S/(d(d-1))) > 0 here
        assert want > unit * (1 + 1e-6)


def test_block_pairwise_equals_single_pairs_and_checks():
    rng = np.random.default_rng(0)
    A, B = rng.standard_normal((4, 23)), rng.standard_normal((3, 23))
    P = th.PairStats.pairwise(A, B, block=5)
    Q = th.PairStats.of(A[:, None], B[None], block=5)
    for f in ("aa", "bb", "ab", "cc"):
        want = np.broadcast_to(getattr(Q, f), (4, 3))
        np.testing.assert_allclose(getattr(P, f), want, rtol=1e-12, atol=1e-12)
    assert P.d == Q.d == 4 and P.block == 5
    unit = th.PairStats.pairwise(A, B)
    np.testing.assert_allclose(th.PairStats.pairwise(A, B, block=1).cc, unit.cc)
    with pytest.raises(ValueError, match="block"):
        th.variance(P, "sjlt", 4)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="block"):
            th.PairStats.of(A[0], B[0], block=bad)
    with pytest.raises(ValueError, match="divid"):
        th.block_variance_by_order(unit, "fixed", 0.5, 5)


def test_concat_is_the_statistics_of_the_concatenation():
    rng = np.random.default_rng(1)
    A, B = rng.standard_normal((3, 40)), rng.standard_normal((2, 40))
    cuts = [0, 17, 33, 40]
    for block in (1, 4):
        parts = [th.PairStats.pairwise(A[:, i:j], B[:, i:j], block) for i, j in zip(cuts, cuts[1:])]
        whole = th.PairStats.concat(parts)
        want = th.PairStats.pairwise(A, B, block)
        for f in ("aa", "bb", "ab"):
            np.testing.assert_allclose(getattr(whole, f), getattr(want, f), rtol=1e-12)
        if block == 1:  # blocks inside each piece differ from blocks of the whole vector
            np.testing.assert_allclose(whole.cc, want.cc, rtol=1e-12)
        else:
            sums = np.concatenate([th.block_sums(A[:, None, i:j] * B[None, :, i:j], block)
                                   for i, j in zip(cuts, cuts[1:])], -1)
            np.testing.assert_allclose(whole.cc, np.sum(sums**2, -1), rtol=1e-12)
            assert whole.d == sums.shape[-1] == 4 + 4 + 1
    with pytest.raises(ValueError, match="same block"):
        th.PairStats.concat([th.PairStats.of(A[0], B[0]), th.PairStats.of(A[0], B[0], block=2)])


@pytest.mark.parametrize("block", [1, 4])
def test_pairwise_of_tensors_in_column_slices_equals_numpy(block):
    """The torch backend, accumulated over column slices, against numpy on the whole arrays."""
    g = np.random.default_rng(0)
    A = (g.standard_normal((4, 23)) * np.linspace(0.1, 5, 23)).astype(np.float32)
    B = g.standard_normal((6, 23)).astype(np.float32)
    ours = th.PairStats.pairwise(torch.from_numpy(A), torch.from_numpy(B), block, chunk=5)
    ref = th.PairStats.pairwise(A, B, block)
    for name in ("aa", "bb", "ab", "cc"):
        np.testing.assert_allclose(getattr(ours, name), getattr(ref, name), rtol=1e-12)
    assert (ours.d, ours.block) == (ref.d, ref.block) and ours.aa.shape == (4, 6)
    one = th.PairStats.of(A[1].astype(np.float64), B[2].astype(np.float64), block)
    np.testing.assert_allclose(ours.coherence[1, 2], one.coherence, rtol=1e-12)
    with pytest.raises(ValueError, match="chunk=0"):
        th.PairStats.pairwise(torch.from_numpy(A), torch.from_numpy(B), chunk=0)
