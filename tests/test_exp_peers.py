"""Notebook 07 (peers): each adapter on a tiny logistic regression against a direct computation
(a numpy solve of the regularised Hessian, the gradient dot product, TRAK's formula at a square
projection), sign and shape conventions, Config validation, the Pareto front and the conclusion
from synthetic summaries, and the notebook under papermill at toy size. Tests that need a peer
skip when it does not import."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dropinf as di
from dropinf.study import models
from dropinf.study.experiments import peers
from dropinf.study.experiments.common import threads
from dropinf.study.experiments.peers import adapters as A

ROOT = Path(__file__).resolve().parents[1]
L2 = 0.05
TINY = {"tasks": ["mlp"], "n_train": 40, "n_test": 5, "hidden": 3, "fit_iter": 200,
        "rates": [0.5], "peers": ["kronfluence"], "cg_iters": [3], "repeats": 1}


@pytest.fixture(autouse=True)
def _one_thread():
    with threads(1):
        yield


@pytest.fixture(scope="module")
def logreg():
    """Multinomial logistic regression (4 features, 3 classes, d = 15) fitted in float64 with
    L2 = 0.05; its closed-form exact influence (numpy) and the float32 Problem."""
    g = torch.Generator().manual_seed(0)
    n, nt = 60, 5
    x = torch.randn(n + nt, 4, generator=g)
    y = torch.randint(3, (n + nt,), generator=g)
    model = models.mlp([4, 3], seed=0).double()
    models.fit_full_batch(model, di.losses.cross_entropy, (x[:n].double(), y[:n]), l2=L2)
    lin = next(m for m in model.modules() if isinstance(m, nn.Linear))
    W, b = lin.weight.detach().numpy(), lin.bias.detach().numpy()
    X = np.hstack([x.double().numpy(), np.ones((n + nt, 1))])  # (w row-major, then b)
    P = np.exp(X[:, :4] @ W.T + b)
    P /= P.sum(1, keepdims=True)
    Y = np.eye(3)[y.numpy()]
    # per-sample gradient of CE in (W (3x4) row-major, b (3)): (p - y) outer x, then p - y
    G = np.hstack([np.einsum("ik,ij->ikj", P - Y, X[:, :4]).reshape(n + nt, 12), P - Y])
    H = np.zeros((15, 15))
    for i in range(n):
        Dp = np.diag(P[i]) - np.outer(P[i], P[i])
        J = np.hstack([np.kron(np.eye(3), X[i, :4]), np.eye(3)])  # d logits / d theta
        H += J.T @ Dp @ J
    H = H / n + L2 * np.eye(15)
    S = G[n:] @ np.linalg.solve(H, G[:n].T)
    m32 = model.float().eval()
    mods = [nm for nm, m in m32.named_modules() if isinstance(m, nn.Linear)]
    prob = A.Problem(m32, di.losses.cross_entropy, (x[:n], y[:n]), (x[n:], y[n:]), mods,
                     l2=L2, batch_size=16)
    return prob, S, G[:n], G[n:]


def _need(peer: str) -> None:
    pytest.importorskip(A.MODULES[peer], reason=f"{A.DISTRIBUTIONS[peer]} is not installed")


# --------------------------------------------------------------------------- adapters


def test_dattri_explicit_and_cg_equal_the_numpy_solve(logreg):
    """dattri's explicit inverse and CG, given regularization = l2, reproduce the closed-form
    exact influence (float32 model: relative error of float32 gradients); positive =
    helpful, (n_test, n_train)."""
    _need("dattri")
    prob, S, _, _ = logreg
    for method, setting in (("explicit", {}), ("cg", {"max_iter": 8})):
        got = A.run_peer("dattri", method, prob, setting)
        assert got.shape == S.shape
        np.testing.assert_allclose(got, S, rtol=0, atol=1e-4 * np.abs(S).max())


def test_kronfluence_identity_is_the_gradient_dot_product(logreg):
    """kronfluence's identity strategy scores g_test . g_train (its damping only rescales):
    proportional to the numpy dot product with a positive factor."""
    _need("kronfluence")
    prob, _, G_tr, G_te = logreg
    got = A.run_peer("kronfluence", "identity", prob, {})
    dot = G_te @ G_tr.T
    scale = (got * dot).sum() / (dot * dot).sum()
    assert scale > 0
    np.testing.assert_allclose(got, scale * dot, rtol=0, atol=1e-4 * np.abs(got).max())


def _margin_gradients(prob: A.Problem) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-sample gradients of TRAK's margin log(p / (1 - p)) (train, test) and 1 - p of the
    training points, by autograd on the float64 copy of the model."""
    model = prob.model.double()

    def margin(m, batch):
        x, y = batch
        lp = -F.cross_entropy(m(x), y, reduction="none")
        return lp - torch.log1p(-torch.exp(lp))

    task = di.Task(model, lambda m, b: -margin(m, b))
    out = [di.gradients(task, [(x.double(), y)], di.Identity(), progress=False,
                        dtype=torch.float64).data.numpy() for x, y in (prob.train, prob.test)]
    with torch.no_grad():
        x, y = prob.train
        p = torch.softmax(model(x.double()), -1)[torch.arange(len(y)), y].numpy()
    prob.model.float()
    return out[0], out[1], 1 - p


@pytest.mark.parametrize("peer", ["dattri", "trak"])
def test_trak_at_a_square_projection_is_trak_formula(logreg, peer):
    """At projection dimension k = d the projection cancels: TRAK is
    ``phi_test^T (Phi^T Phi)^-1 phi_j (1 - p_j)`` with unprojected margin gradients (dattri's
    to float32 rounding; traker's up to its internal rescaling, so by correlation)."""
    _need(peer)
    prob, _, _, _ = logreg
    P_tr, P_te, q = _margin_gradients(prob)
    want = P_te @ np.linalg.solve(P_tr.T @ P_tr, P_tr.T) * q
    got = A.run_peer(peer, "trak", prob, {"proj_dim": 15})
    assert got.shape == want.shape
    if peer == "dattri":
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-3 * np.abs(want).max())
    else:  # traker 0.3.2 rescales its features internally: same sign and ranking, not values
        assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.8


@pytest.mark.parametrize("peer, method, setting", [
    ("kronfluence", "ekfac", {}), ("logix", "raw", {"rank": 2}), ("dattri", "arnoldi",
                                                                  {"proj_dim": 10,
                                                                   "max_iter": 20})])
def test_approximate_peers_agree_in_sign_with_exact_influence(logreg, peer, method, setting):
    """The approximations keep the sign convention: their scores correlate positively and
    strongly with exact influence on this convex model, in the (n_test, n_train) layout."""
    _need(peer)
    prob, S, _, _ = logreg
    got = A.run_peer(peer, method, prob, setting)
    assert got.shape == S.shape
    assert np.corrcoef(got.ravel(), S.ravel())[0, 1] > 0.4


def test_conv1d_to_linear_keeps_the_function():
    model = models.gpt2_ladder("nano", seed=0).eval()
    ids = torch.randint(256, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        peers.conv1d_to_linear(model)
        after = model(input_ids=ids).logits
    assert not any(type(m).__name__ == "Conv1D" for m in model.modules())
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- config


def test_config_profiles_and_validation():
    cfg = peers.Config.for_profile("cpu-quick", n_train=500)
    assert cfg.n_train == 500 and cfg.tasks == peers.TASKS
    assert peers.Config.for_profile("gpu").hidden > cfg.hidden
    for bad in ({"tasks": ["resnet"]}, {"rates": [1.0]}, {"cg_iters": [0]}, {"n_train": 5000},
                {"damping": 0}, {"peers": ["captum"]}, {"repeats": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            peers.Config.for_profile("cpu-quick", **bad)
    with pytest.raises(TypeError, match="unknown Config field"):
        peers.Config.for_profile("cpu-quick", n_trian=3)


# --------------------------------------------------------------------------- report


def _rows(task: str, pts: list[tuple[str, str, float, float]]) -> pd.DataFrame:
    return pd.DataFrame([{"task": task, "library": lib, "label": label, "status": "ok",
                          "seconds": s, "spearman": r, "reason": ""}
                         for lib, label, s, r in pts])


def test_pareto_front_and_dominance_against_a_brute_force_check():
    rng = np.random.default_rng(0)
    pts = [("dropinf" if i % 2 else "dattri", f"p{i}", float(t), float(r))
           for i, (t, r) in enumerate(zip(rng.uniform(0.1, 10, 30), rng.uniform(0, 1, 30)))]
    df = _rows("mlp", pts)
    front = peers.pareto_front(df)
    for i, r in df.iterrows():
        beaten = ((df.seconds < r.seconds) & (df.spearman >= r.spearman)).any()
        assert front[i] == (not beaten)
    for _, r in df[df.library == "dattri"].iterrows():
        dom = peers.dominating(df, r)
        cands = df[(df.library == "dropinf") & (df.seconds < r.seconds)
                   & (df.spearman >= r.spearman)]
        assert (dom is None) == cands.empty
        if dom is not None:
            assert dom.seconds == cands.seconds.min()


def _summary(verdicts: list[dict], failed: dict | None = None, missing: dict | None = None
             ) -> dict:
    n_dom = sum(v["dominated_by"] is not None for v in verdicts)
    return {"peers_missing": missing or {}, "tasks": {"mlp": {
        "n_peer_points": len(verdicts), "n_dominated": n_dom, "verdicts": verdicts,
        "failed": failed or {}}}}


def _v(peer: str, by: str | None) -> dict:
    return {"peer": peer, "seconds": 2.0, "spearman": 0.5, "dominated_by": by,
            "by_seconds": None if by is None else 1.0, "by_spearman": None if by is None else 0.6}


def test_conclusions_cover_every_branch():
    every = peers.conclusions(_summary([_v("kronfluence ekfac", "dropinf SJLT (k=9)")]))
    assert "every one of the 1 peer points" in every and "by dropinf SJLT (k=9)" in every
    none = peers.conclusions(_summary([_v("dattri cg (10 it)", None)]))
    assert "0 of the 1 peer points" in none and "none is" in none
    assert "no dropinf point is both faster and at least as faithful" in none
    some = peers.conclusions(_summary([_v("a", "dropinf x"), _v("b", None)],
                                      failed={"dattri explicit": "OutOfMemoryError: 5 GB"},
                                      missing={"logix": "ModuleNotFoundError: logix"}))
    assert "1 of the 2 peer points" in some and "1 are not" in some
    assert "Failed on this task: dattri explicit (OutOfMemoryError" in some
    assert some.startswith("Not importable, so not compared: logix")
    assert "no peer point ran" in peers.conclusions(_summary([]))


def test_measure_records_failures_and_non_finite_scores():
    cfg = peers.Config.for_profile("cpu-quick", repeats=1)
    ref = np.ones((2, 12))

    def boom():
        raise MemoryError("cannot allocate 4.9 GB")

    row = peers.measure(peers.experiment.Point("dattri", "explicit", "", boom), ref, cfg)
    assert row["status"] == "failed" and row["reason"].startswith("MemoryError: cannot")
    nan = peers.measure(peers.experiment.Point("dattri", "cg", "", lambda: ref * np.nan),
                        ref, cfg)
    assert nan["status"] == "failed" and "24 non-finite" in nan["reason"]
    ramp = ref + 1e-3 * np.arange(12)
    ok = peers.measure(peers.experiment.Point("dropinf", "x", "", lambda: 2 * ramp), ramp, cfg)
    assert ok["status"] == "ok" and ok["spearman"] == pytest.approx(1.0)


# --------------------------------------------------------------------------- notebook


def test_notebook_runs_with_tiny_parameters(tmp_path):
    """The notebook at toy size (the MLP task, exact and one CG point, one dropout rate,
    kronfluence if installed) writes its figure, tables and a summary whose dropinf exact
    point agrees with the reference."""
    papermill = pytest.importorskip("papermill")
    papermill.execute_notebook(str(ROOT / "notebooks" / "07_peers.ipynb"),
                               str(tmp_path / "07_peers.ipynb"), kernel_name="dropinf",
                               parameters={"out_dir": str(tmp_path), "config": TINY},
                               progress_bar=False, cwd=str(ROOT / "notebooks"))
    for name in ("figures/pareto.png", "tables/points.csv", "tables/verdicts.csv",
                 "manifest.json"):
        assert (tmp_path / name).is_file(), name
    s = json.loads((tmp_path / "summary.json").read_text())
    pts = {p["label"]: p for p in s["tasks"]["mlp"]["points"]}
    assert pts["dropinf exact (dense)"]["spearman"] > 0.999
    assert isinstance(s["conclusion"], str) and s["conclusion"]
