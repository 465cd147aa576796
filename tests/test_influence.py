"""Preconditioners and scores against closed forms, dense algebra and leave-one-out retraining."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close
from scipy.stats import pearsonr
from sklearn.datasets import load_breast_cancer
from sklearn.preprocessing import StandardScaler
from torch import nn

import dropinf as di
from dropinf import curvature
from dropinf.study import models

L2 = 1e-2


def bce(model, batch):
    x, y = batch
    return F.binary_cross_entropy_with_logits(model(x).squeeze(-1), y, reduction="none")


@pytest.fixture(scope="module")
def logreg():
    """L2-regularised logistic regression on breast cancer, float64, trained to |grad| < 1e-9."""
    X, y = load_breast_cancer(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(X))
    tr, te = idx[:200], idx[200:240]
    to = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    train, test = (to(X[tr]), to(y[tr])), (to(X[te]), to(y[te]))
    torch.manual_seed(0)
    model = nn.Linear(30, 1).double()
    gnorm = models.fit_full_batch(model, bce, train, l2=L2)
    assert gnorm < 1e-9
    return model, train, test


def closed_form_scores(model, train, test):
    """numpy: H = X^T diag(s(1-s)) X / n + c I over (w, b); g_i = (s_i - y_i) [x_i, 1]."""
    w = np.concatenate([model.weight.detach().numpy().ravel(), model.bias.detach().numpy()])

    def feats(x):
        return np.hstack([x.numpy(), np.ones((len(x), 1))])

    Xtr, Xte = feats(train[0]), feats(test[0])
    s = 1 / (1 + np.exp(-Xtr @ w))
    H = Xtr.T @ (Xtr * (s * (1 - s))[:, None]) / len(Xtr) + L2 * np.eye(len(w))
    g_tr = (s - train[1].numpy())[:, None] * Xtr
    s_te = 1 / (1 + np.exp(-Xte @ w))
    g_te = (s_te - test[1].numpy())[:, None] * Xte
    return g_te @ np.linalg.solve(H, g_tr.T), g_tr, g_te


def test_exact_influence_matches_the_closed_form(logreg):
    model, train, test = logreg
    task = di.Task(model, bce)
    G_tr = di.gradients(task, [train], di.Identity(), progress=False, dtype=torch.float64)
    G_te = di.gradients(task, [test], di.Identity(), progress=False, dtype=torch.float64)
    expect, g_tr, _ = closed_form_scores(model, train, test)
    np.testing.assert_allclose(G_tr.numpy(), g_tr, rtol=1e-10, atol=1e-12)
    pre = di.Preconditioner.fit_exact(task, [train], l2=L2)
    S = di.scores(G_te, G_tr, pre)
    np.testing.assert_allclose(S.numpy(), expect, rtol=1e-6, atol=1e-9 * np.abs(expect).max())
    assert pre.info["grad_norm"] < 1e-9 and pre.info["min_eig"] > 0
    # the matrix-free solver agrees with the dense one
    cg = di.Preconditioner.fit_exact(task, [train], l2=L2, solver="cg", cg_tol=1e-12)
    S_cg = di.scores(G_te[:5], G_tr, cg)
    np.testing.assert_allclose(
        S_cg.numpy(), expect[:5], rtol=1e-6, atol=1e-9 * np.abs(expect).max()
    )
    assert max(cg.info["cg_residuals"]) <= 1e-12


def test_leave_one_out_retraining_correlates_with_score_over_n(logreg):
    """Retrain without each of 60 training points; the change in the summed test loss is
    predicted by mean-over-test score / n (positive score = removing it raises the loss)."""
    model, train, test = logreg
    n = len(train[0])
    task = di.Task(model, bce)
    G_tr = di.gradients(task, [train], di.Identity(), progress=False, dtype=torch.float64)
    G_te = di.gradients(task, [test], di.Identity(), progress=False, dtype=torch.float64)
    pre = di.Preconditioner.fit_exact(task, [train], l2=L2)
    predicted = di.scores(G_te, G_tr, pre).sum(0) / n
    base = bce(model, test).sum().item()
    removed = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:60]
    actual = []
    for j in removed.tolist():
        keep = torch.arange(n) != j
        m = copy.deepcopy(model)
        models.fit_full_batch(m, bce, (train[0][keep], train[1][keep]), l2=L2)
        actual.append(bce(m, test).sum().item() - base)
    r = pearsonr(predicted[removed].numpy(), np.array(actual)).statistic
    assert r >= 0.95, r


@pytest.fixture(scope="module")
def mlp_grads():
    torch.manual_seed(0)
    task = di.Task(models.mlp([6, 8, 3]).eval(), di.losses.cross_entropy)
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    G = di.gradients(task, [(x[:30], y[:30])], di.Identity(), progress=False)
    T = di.gradients(task, [(x[30:], y[30:])], di.Identity(), progress=False)
    return G.data, T.data


def test_fisher_equals_a_dense_solve(mlp_grads):
    G, T = mlp_grads
    pre = di.Preconditioner.fit(G, kind="fisher", damping=0.1)
    Gd, Td = G.double(), T.double()
    Fm = Gd.T @ Gd / len(G)
    lam = 0.1 * torch.trace(Fm) / Fm.shape[0]
    expect = Td @ torch.linalg.solve(Fm + lam * torch.eye(len(Fm), dtype=torch.float64), Gd.T)
    assert pre.lam == pytest.approx(float(lam))
    assert_close(di.scores(T, G, pre).double(), expect, rtol=1e-4)
    ident = di.Preconditioner.fit(G, kind="identity")
    assert_close(di.scores(T, G, ident), T @ G.T)


def test_blocks_do_not_change_scores(mlp_grads):
    G, T = mlp_grads
    pre = di.Preconditioner.fit(G, kind="fisher", damping=0.05)
    full = di.scores(T, G, pre)
    assert_close(di.scores(T, G, pre, block_test=3, block_train=7), full)
    si = di.self_influence(G, pre, block=4)
    assert_close(si, torch.diagonal(di.scores(G, G, pre)))
    for largest in (True, False):
        idx, val = di.top_k(T, G, pre, k=5, largest=largest, block_test=4, block_train=6)
        ref_val, ref_idx = full.topk(5, dim=1, largest=largest)
        assert_close(val, ref_val)
        assert torch.equal(idx, ref_idx)


def test_bad_inputs(mlp_grads):
    G, T = mlp_grads
    pre = di.Preconditioner.fit(G, kind="fisher", damping=0.1)
    with pytest.raises(ValueError, match="same compressor"):
        di.scores(T[:, :10], G, pre)
    with pytest.raises(ValueError, match="dimension"):
        di.scores(T[:, :10], G[:, :10], pre)
    with pytest.raises(ValueError, match="damping=-1"):
        di.Preconditioner.fit(G, damping=-1)
    with pytest.raises(ValueError, match="fit_exact"):
        di.Preconditioner.fit(G, kind="exact")
    with pytest.raises(ValueError, match="not positive definite"):
        di.Preconditioner.fit(G[:, :5] * 0, kind="fisher", damping=0.0)


def test_exact_refuses_an_indefinite_hessian():
    """An MLP at initialisation (not a minimum, no weight decay) has negative curvature."""
    torch.manual_seed(0)
    m = models.mlp([4, 6, 3]).double()
    x, y = torch.randn(30, 4, dtype=torch.float64), torch.randint(0, 3, (30,))
    task = di.Task(m, di.losses.cross_entropy)
    with pytest.raises(ValueError, match="not positive definite"):
        di.Preconditioner.fit_exact(task, [(x, y)])


def test_ggn_equals_the_hessian_for_logistic_regression(logreg):
    """A model linear in its parameters has no second-order term: GGN == Hessian."""
    model, train, _ = logreg
    x, y = train
    split = di.losses.SplitLoss(
        lambda m, b: m(b[0]).squeeze(-1),
        lambda z, b: F.binary_cross_entropy_with_logits(z, b[1], reduction="none"),
    )
    task = di.Task(model, split)
    exact = di.Preconditioner.fit_exact(task, [(x[:100], y[:100]), (x[100:], y[100:])], l2=L2)
    ggn = di.Preconditioner.fit_exact(task, [train], l2=L2, kind="ggn")
    assert ggn.kind == "ggn"
    V, w = ggn.eigvecs, ggn.eigvals
    H = (exact.eigvecs * exact.eigvals) @ exact.eigvecs.T
    torch.testing.assert_close((V * w) @ V.T, H, rtol=0, atol=1e-12 * H.abs().max().item())
    with pytest.raises(TypeError, match="SplitLoss"):
        di.Preconditioner.fit_exact(di.Task(model, bce), [train], kind="ggn")


def test_ggn_of_an_mlp_against_per_sample_jacobians():
    """G = (1/n) sum_i J_i^T (diag(p_i) - p_i p_i^T) J_i + l2 I, with J_i the Jacobian of sample i's
    logits from torch.autograd.functional.jacobian; the matrix-free (CG) solver agrees."""
    torch.manual_seed(0)
    m = models.mlp([4, 5, 3]).double()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    task = di.Task(m, di.losses.cross_entropy)
    # at initialisation the Hessian is indefinite, the GGN is not
    pre = di.Preconditioner.fit_exact(task, [(x[:5], y[:5]), (x[5:], y[5:])], l2=1e-3, kind="ggn")
    names = [q.name for q in task.params]
    theta = [p.detach() for p in m.parameters()]

    def logits(i):
        def f(*ps):
            return torch.func.functional_call(m, dict(zip(names, ps)), (x[i : i + 1],))[0]

        return torch.cat(
            [j.reshape(3, -1) for j in torch.autograd.functional.jacobian(f, tuple(theta))], 1
        )

    G = torch.zeros(task.dim, task.dim, dtype=torch.float64)
    for i in range(len(x)):
        J = logits(i)
        p = torch.softmax(m(x[i : i + 1])[0], 0).detach()
        G += J.T @ (torch.diag(p) - torch.outer(p, p)) @ J
    G = G / len(x) + 1e-3 * torch.eye(task.dim, dtype=torch.float64)
    torch.testing.assert_close(
        (pre.eigvecs * pre.eigvals) @ pre.eigvecs.T, G, rtol=0, atol=1e-12 * G.abs().max().item()
    )
    assert pre.info["min_eig"] > 0
    cg = di.Preconditioner.fit_exact(task, [(x, y)], l2=1e-3, kind="ggn", solver="cg", cg_tol=1e-12)
    q = torch.randn(2, task.dim, dtype=torch.float64)
    torch.testing.assert_close(cg.apply(q), torch.linalg.solve(G, q.T).T, rtol=1e-8, atol=0)



@pytest.mark.parametrize("n, k", [(12, 40), (40, 12)])
def test_fisher_kernel_form_equals_the_dense_form(n, k, monkeypatch):
    """Woodbury through the n x n Gram matrix against the k x k eigendecomposition and a direct
    solve, in float64, whether k exceeds n or not, in one column block and in several."""
    g = torch.Generator().manual_seed(n)
    G = torch.randn(n, k, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, k)
    T = torch.randn(5, k, generator=g, dtype=torch.float64)
    Fm = G.T @ G / n
    for damping in (1e-3, 0.1, 10.0):
        lam = damping * float(torch.trace(Fm)) / k
        direct = torch.linalg.solve(Fm + lam * torch.eye(k, dtype=torch.float64), T.T).T
        dense = di.Preconditioner.fit(G, "fisher", damping, solver="dense")
        kern = di.Preconditioner.fit(G, "fisher", damping, solver="kernel")
        auto = di.Preconditioner.fit(G, "fisher", damping)
        assert kern.info["solver"] == "kernel" and dense.info["solver"] == "dense"
        assert auto.info["solver"] == ("kernel" if k > n else "dense")
        assert kern.lam == pytest.approx(dense.lam, rel=1e-12) and kern.rows is G
        for pre in (dense, kern):
            torch.testing.assert_close(pre.apply(T), direct, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(di.scores(T, G, kern), di.scores(T, G, dense), rtol=1e-8,
                                   atol=1e-10)
        torch.testing.assert_close(di.self_influence(G, kern), di.self_influence(G, dense),
                                   rtol=1e-8, atol=1e-10)
        # F's nonzero eigenvalues, hence the effective dimension, are the dense form's
        top = [pre.eigvals.sort(descending=True).values[: min(n, k)] for pre in (dense, kern)]
        torch.testing.assert_close(top[1], top[0], rtol=1e-8, atol=1e-10 * float(top[0][0]))
    monkeypatch.setattr(curvature, "_COLUMNS", 5)
    blocked = di.Preconditioner.fit(G, "fisher", 10.0, solver="kernel")
    torch.testing.assert_close(blocked.apply(T), kern.apply(T), rtol=1e-12, atol=1e-14)


def test_fisher_kernel_form_refuses_what_it_cannot_do():
    G = torch.randn(4, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.raises(ValueError, match="damping=0.0 with k=9 > n=4"):
        di.Preconditioner.fit(G, "fisher", 0.0)
    with pytest.raises(ValueError, match="solver='qr'"):
        di.Preconditioner.fit(G, "fisher", 0.1, solver="qr")
    lost = dataclasses.replace(di.Preconditioner.fit(G, "fisher", 0.1), rows=None)
    with pytest.raises(ValueError, match="lost its training rows"):
        lost.apply(G)


def test_non_finite_rows_are_named_where_they_enter():
    """A NaN or inf entry would make every Fisher score NaN (or the dense solve look
    ill-conditioned): fit, scores, top_k and self_influence name the argument and the row."""
    g = torch.Generator().manual_seed(0)
    G = torch.randn(40, 12, generator=g)
    T = torch.randn(6, 12, generator=g)
    for n, bad, value in [(40, 37, float("nan")), (8, 5, float("inf"))]:  # dense, kernel form
        Gb = G[:n].clone()
        Gb[bad, 3] = value
        with pytest.raises(ValueError, match=rf"G_train row {bad} has a NaN or inf entry"):
            di.Preconditioner.fit(Gb, "fisher", damping=0.1)
    pre = di.Preconditioner.fit(G, "fisher", damping=0.1)
    Gb, Tb = G.clone(), T.clone()
    Gb[29, 0], Tb[4, 11] = float("nan"), -float("inf")
    for call, name, row in [
        (lambda: di.scores(Tb, G, pre, block_test=3), "G_test", 4),
        (lambda: di.scores(T, Gb, pre, block_train=7), "G_train", 29),
        (lambda: di.top_k(Tb, G, pre, k=2), "G_test", 4),
        (lambda: di.top_k(T, Gb, pre, k=2, block_train=7), "G_train", 29),
        (lambda: di.self_influence(Gb, pre, block=8), "G_train", 29),
        (lambda: di.scores(T.half(), Gb.bfloat16(), di.Preconditioner.fit(G, "identity")),
         "G_train", 29),
    ]:
        with pytest.raises(ValueError, match=rf"{name} row {row} has a NaN or inf entry"):
            call()
    # finite rows whose float64 row sum overflows are not refused
    huge = torch.full((2, 3), 1e308, dtype=torch.float64)
    curvature.check_finite(huge, "G_train")


U32, U64 = 2.0**-24, 2.0**-53


@pytest.fixture(scope="module")
def wide_mlp_grads():
    """float32 gradients of an MLP with k = 517 parameters: 800 training rows, 30 test rows."""
    torch.manual_seed(0)
    task = di.Task(models.mlp([10, 32, 5]).eval(), di.losses.cross_entropy)
    x, y = torch.randn(830, 10), torch.randint(0, 5, (830,))
    G = di.gradients(task, [(x[:800], y[:800])], di.Identity(), progress=False).data
    T = di.gradients(task, [(x[800:], y[800:])], di.Identity(), progress=False).data
    return G, T


@pytest.mark.parametrize("damping", [1e-3, 1e-5])
@pytest.mark.parametrize("n", [200, 800])  # k = 517: kernel form (k > n), dense form (k < n)
def test_float32_scores_are_the_float64_scores_rounded(wide_mlp_grads, n, damping):
    """float32 rows give the scores of a float64 computation on the same values, rounded.

    Reference: numpy in float64, x_i = (F + lambda I)^{-1} t_i by a direct solve, S = X G^T.
    Each float64 solve (numpy's, and dropinf's eigendecomposition) is backward stable, so its
    error in x_i is at most about u64 kappa |x_i| (kappa = |F + lambda I|_2 / lambda), up to a
    factor of order one (we allow 4 per solve); through the product with g_j, u64 kappa |x_i|
    |g_j|. Rounding the result to float32 adds u32 |S_ij|. The float32 products this replaced
    (and the query rounded to float32) cost about u32 sum_l |x_il g_jl|, which the 1 / lambda
    in x makes far larger: the last assertion checks that this test tells them apart."""
    G, T = wide_mlp_grads
    G = G[:n]
    k = G.shape[1]
    Gd, Td = G.double().numpy(), T.double().numpy()  # the float32 values, exactly
    A = Gd.T @ Gd / n
    lam = damping * np.trace(A) / k
    A += lam * np.eye(k)
    kappa = np.linalg.norm(A, 2) / lam
    pre = di.Preconditioner.fit(G, "fisher", damping)
    assert pre.info["solver"] == ("kernel" if k > n else "dense")

    def reference(Q):
        X = np.linalg.solve(A, Q.T).T
        slack = 2 * 4 * U64 * kappa * np.linalg.norm(X, axis=1)
        return X, slack

    X, slack = reference(Td)
    S = X @ Gd.T
    tol = U32 * np.abs(S) + np.outer(slack, np.linalg.norm(Gd, axis=1))
    got = di.scores(T, G, pre, block_test=7, block_train=64)
    assert got.dtype == torch.float32
    assert (np.abs(got.double().numpy() - S) <= tol).all()
    idx, val = di.top_k(T, G, pre, k=3, block_train=64)
    ref_val = np.take_along_axis(S, idx.numpy(), 1)
    assert (np.abs(val.double().numpy() - ref_val) <= np.take_along_axis(tol, idx.numpy(), 1)).all()
    assert (ref_val[:, -1] >= np.sort(S, 1)[:, -3] - tol.max(1)).all()  # the best 3, up to tol
    Xg, slack_g = reference(Gd)
    s_ref = (Xg * Gd).sum(1)
    s_tol = U32 * np.abs(s_ref) + slack_g * np.linalg.norm(Gd, axis=1)
    s = di.self_influence(G, pre, block=50)
    assert s.dtype == torch.float32 and (np.abs(s.double().numpy() - s_ref) <= s_tol).all()
    fast = di.scores(T, G, pre, product_dtype=torch.float32).double().numpy()
    assert (np.abs(fast - S) > tol).any()


@pytest.mark.parametrize("n, k, l2", [(30, 12, 0.0), (12, 30, 0.0), (12, 30, 0.05), (30, 12, 0.05)])
def test_with_damping_equals_refitting(n, k, l2):
    """Dense and kernel form, with and without l2: rescaling lambda equals a refit."""
    G = torch.randn(n, k, dtype=torch.float64)
    Q = torch.randn(4, k, dtype=torch.float64)
    fitted = di.Preconditioner.fit(G, "fisher", 0.1, l2=l2)
    for dm in (1e-3, 0.1, 2.0):
        pre, ref = fitted.with_damping(dm), di.Preconditioner.fit(G, "fisher", dm, l2=l2)
        assert pre.damping == dm and pre.lam == pytest.approx(ref.lam, rel=1e-12)
        assert pre.info["lambda"] == pytest.approx(ref.info["lambda"], rel=1e-12)
        assert pre.info["min_eig"] == pytest.approx(ref.info["min_eig"], rel=1e-9)
        torch.testing.assert_close(pre.apply(Q), ref.apply(Q), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="damping > 0"):
        di.Preconditioner.fit(G[:, :5], "fisher", 0.0).with_damping(0.1)


@pytest.fixture
def one_thread():
    """Tiny products: a second thread on a busy machine only slows them down."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_batched_cg_equals_dense_solve_and_row_by_row_and_warns_at_maxiter(monkeypatch,
                                                                           one_thread):
    """fit_exact(solver="cg") solves all rows as one block (curvature products in chunks): the
    result equals a dense float64 solve of the Hessian (built column by column with autograd)
    and the same rows solved one call at a time; a maxiter too small for the tolerance warns
    and records the rows that stopped."""
    monkeypatch.setattr(curvature, "_CG_CHUNK", 3)  # several chunks per product
    g = torch.Generator().manual_seed(3)
    x = torch.randn(30, 4, generator=g, dtype=torch.float64)
    y = torch.randint(3, (30,), generator=g)
    model = models.mlp([4, 5, 3], activation=nn.Tanh, seed=0).double()
    models.fit_full_batch(model, di.losses.cross_entropy, (x, y), l2=L2)
    task = di.Task(model, di.losses.cross_entropy)
    batches = [(x[:16], y[:16]), (x[16:], y[16:])]
    params = tuple(model.parameters())

    def objective(*ps):
        out = torch.func.functional_call(model, dict(zip(dict(model.named_parameters()), ps)),
                                         (x,))
        return F.cross_entropy(out, y) + L2 / 2 * sum((p**2).sum() for p in ps)

    H = torch.cat([torch.cat([b.reshape(a.numel(), b.numel() // a.numel()) for b in row], 1)
                   for row, a in zip(torch.autograd.functional.hessian(objective, params),
                                     params)])
    Q = torch.randn(7, task.dim, generator=g, dtype=torch.float64)
    cg = di.Preconditioner.fit_exact(task, batches, l2=L2, solver="cg", cg_tol=1e-12)
    X = cg.apply(Q)
    assert cg.info["cg_unconverged"] == 0 and max(cg.info["cg_residuals"]) <= 1e-12
    assert len(cg.info["cg_iterations"]) == 7
    torch.testing.assert_close(X, torch.linalg.solve(H, Q.T).T, rtol=1e-8, atol=0)
    rows = torch.cat([cg.apply(Q[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(X[:3], rows, rtol=1e-9, atol=0)
    short = dataclasses.replace(cg, cg_maxiter=2, info={})
    with pytest.warns(RuntimeWarning, match="cg_maxiter=2 for 7 of 7 rows"):
        short.apply(Q)
    assert short.info["cg_unconverged"] == 7 and short.info["cg_iterations"] == [2] * 7
