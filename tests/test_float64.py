"""float64 end to end: under ``torch.set_default_dtype(torch.float64)`` and with float64 models,
every public function runs, keeps float64 where asked, and draws the same maps as in float32."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import loop_grads
from torch import nn

import dropinf as di
from dropinf import losses
from dropinf.blocks import BatchGrads, DenseGrad

SPECS = [
    ("identity", {}),
    ("dropout", {"p": 0.5, "seed": 3}),
    ("dropout", {"p": 0.5, "mask": "bernoulli", "seed": 3}),
    ("dropout", {"p": 0.5, "factored": True, "seed": 3}),
    ("dropout", {"p": 0.5, "factored": True, "mask": "bernoulli", "seed": 3}),
    ("gaussian", {"k": 9, "seed": 3}),
    ("gaussian", {"p": 0.5, "factored": True, "seed": 3}),
    ("sjlt", {"k": 9, "c": 3, "seed": 3}),
]


@pytest.fixture
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def mlp(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype).eval()


def data(dtype: torch.dtype, n: int = 12):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g).to(dtype), torch.randint(0, 3, (n,), generator=g)


def batches(X, y, size=5):
    return [(X[i : i + size], y[i : i + size]) for i in range(0, len(X), size)]


def _compressed_exact(comp, task, G: torch.Tensor) -> torch.Tensor:
    dense = [DenseGrad(q.name, G[:, q.offset : q.stop]) for q in task.params]
    return comp.compress(BatchGrads(task.params, dense, G.shape[0]))


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_maps_do_not_depend_on_the_default_dtype(spec):
    """A fingerprint means one map: drawing under a float64 default gives the float32 map."""
    task = di.Task(mlp(torch.float32), losses.cross_entropy)
    a = di.make(spec[0], **spec[1]).bind(task)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        b = di.make(spec[0], **spec[1]).bind(task)
    finally:
        torch.set_default_dtype(old)
    assert a.fingerprint == b.fingerprint and a.dim == b.dim
    G = torch.randn(4, task.dim, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(_compressed_exact(a, task, G), _compressed_exact(b, task, G))


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_float64_rows_under_a_float64_default(spec, float64_default, tmp_path):
    """gradients(dtype=float64) of a float64 model: memory and store agree bit for bit, and
    equal the compression of the exact float64 gradients of a per-sample loop to 1e-12."""
    model = mlp(torch.float64)
    X, y = data(torch.float64)
    task = di.Task(model, losses.cross_entropy)
    comp = di.make(spec[0], **spec[1])
    G = di.gradients(task, batches(X, y), comp, progress=False, dtype=torch.float64)
    S = di.gradients(task, batches(X, y), di.make(spec[0], **spec[1]), progress=False,
                     dtype=torch.float64, path=tmp_path / "s")
    assert G.data.dtype == torch.float64 and S.data.dtype == torch.float64
    assert torch.equal(G.data, torch.as_tensor(S.data))
    assert G.losses.dtype == torch.float32  # as a store keeps them
    exact = loop_grads(model, losses.cross_entropy, batches(X, y, 1), task.param_names)
    want = _compressed_exact(comp, task, exact)
    assert want.dtype == torch.float64
    torch.testing.assert_close(G.data, want, rtol=1e-12, atol=1e-12 * float(want.abs().max()))


def _softmax_hessian(W: np.ndarray, b: np.ndarray, X: np.ndarray, l2: np.ndarray) -> np.ndarray:
    """Hessian of the mean cross-entropy of softmax regression in (W row-major, b) order, plus
    diag(l2): sum_i (diag(p) - p p^T) (x) [x; 1][x; 1]^T / n, re-ordered to dropinf's layout."""
    n, d_in = X.shape
    k = W.shape[0]
    Z = X @ W.T + b
    P = np.exp(Z - Z.max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    Xa = np.hstack([X, np.ones((n, 1))])
    H = np.zeros((k * (d_in + 1), k * (d_in + 1)))
    for p, x in zip(P, Xa):
        H += np.kron(np.diag(p) - np.outer(p, p), np.outer(x, x))
    H /= n
    # kron order is (class, input incl. bias); dropinf's is W (class, input) then b (class)
    w_idx = [c * (d_in + 1) + j for c in range(k) for j in range(d_in)]
    b_idx = [c * (d_in + 1) + d_in for c in range(k)]
    order = w_idx + b_idx
    return H[np.ix_(order, order)] + np.diag(l2)


def test_fit_exact_scores_and_top_k_in_float64_match_a_numpy_rederivation(float64_default):
    """Exact influence of softmax regression with weight decay on the weight only: dropinf's
    float64 scores equal g_test^T H^{-1} g_train with H derived in numpy."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3).eval()
    X, y = data(torch.float64, 20)
    task = di.Task(model, losses.cross_entropy)
    l2 = {"weight": 0.3}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        pre = di.Preconditioner.fit_exact(task, batches(X, y), l2=l2, damping=0.0)
    G = di.gradients(task, batches(X, y), di.Identity(), progress=False, dtype=torch.float64)
    S = di.scores(G[:4], G.data, pre)
    assert S.dtype == torch.float64
    W, b = (p.detach().numpy() for p in (model.weight, model.bias))
    l2_vec = np.r_[np.full(15, 0.3), np.zeros(3)]
    H = _softmax_hessian(W, b, X.numpy(), l2_vec)
    g = G.data.numpy()
    want = g[:4] @ np.linalg.solve(H, g.T)
    np.testing.assert_allclose(S.numpy(), want, rtol=1e-9, atol=1e-12 * np.abs(want).max())
    idx, val = di.top_k(G[:4], G.data, pre, k=3)
    np.testing.assert_array_equal(idx.numpy(), np.argsort(-want, 1, kind="stable")[:, :3])
    si = di.self_influence(G.data, pre)
    np.testing.assert_allclose(si.numpy(), np.einsum("ij,ji->i", g, np.linalg.solve(H, g.T)),
                               rtol=1e-9)


def test_fisher_in_float64_matches_numpy(float64_default):
    X, y = data(torch.float64, 20)
    task = di.Task(mlp(torch.float64), losses.cross_entropy)
    G = di.gradients(task, batches(X, y), di.Dropout(0.5, factored=True), progress=False,
                     dtype=torch.float64)
    for solver in ("dense", "kernel"):
        pre = di.Preconditioner.fit(G, "fisher", damping=1e-3, solver=solver)
        S = di.scores(G, G, pre)
        g = G.data.numpy()
        F = g.T @ g / len(g)
        lam = 1e-3 * np.trace(F) / F.shape[0]
        want = g @ np.linalg.solve(F + lam * np.eye(len(F)), g.T)
        np.testing.assert_allclose(S.numpy(), want, rtol=1e-8, atol=1e-10 * np.abs(want).max())


def test_fisher_with_a_regulariser_per_parameter_matches_numpy():
    """Preconditioner.fit(l2=task.l2_vector({...})) on uncompressed rows is F + diag(l2) with the
    relative damping on the whole; a number gives the same scores in the dense and kernel forms."""
    X, y = data(torch.float64, 20)
    task = di.Task(mlp(torch.float64), losses.cross_entropy)
    G = di.gradients(task, batches(X, y), di.Identity(), progress=False, dtype=torch.float64)
    g = G.data.numpy()
    l2 = task.l2_vector({"0.weight": 0.3, "2.weight": 0.1})
    pre = di.Preconditioner.fit(G, "fisher", damping=1e-2, l2=l2, solver="dense")
    C = g.T @ g / len(g) + np.diag(l2.numpy())
    lam = 1e-2 * np.trace(C) / len(C)
    want = g @ np.linalg.solve(C + lam * np.eye(len(C)), g.T)
    np.testing.assert_allclose(di.scores(G, G, pre).numpy(), want, rtol=1e-8,
                               atol=1e-10 * np.abs(want).max())
    dense = di.Preconditioner.fit(G, "fisher", damping=1e-2, l2=0.05, solver="dense")
    kernel = di.Preconditioner.fit(G, "fisher", damping=1e-2, l2=0.05, solver="kernel")
    torch.testing.assert_close(di.scores(G, G, kernel), di.scores(G, G, dense), rtol=1e-8,
                               atol=1e-10)
    assert kernel.info["min_eig"] == pytest.approx(dense.info["min_eig"], rel=1e-6)
    with pytest.raises(TypeError, match=r"task.l2_vector\(mapping\)"):
        di.Preconditioner.fit(G, "fisher", l2={"0.weight": 0.3})
    with pytest.raises(ValueError, match="needs solver='dense'"):
        di.Preconditioner.fit(G, "fisher", l2=l2, solver="kernel")
    with pytest.raises(ValueError, match="finite and >= 0"):
        di.Preconditioner.fit(G, "fisher", l2=-1.0)
