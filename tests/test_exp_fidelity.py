"""Notebook 02 (fidelity): matched dimensions, reductions at ratio 1, the retraining ground
truth against an independent scipy refit, the metric plumbing against scipy loops, config
validation, the gpu code path on a stand-in, and a tiny papermill run of the notebook."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import optimize, stats
from torch import nn

from dropinf.curvature import Preconditioner
from dropinf.losses import cross_entropy
from dropinf.scores import scores
from dropinf.study import data, retrain
from dropinf.study.experiments import fidelity as fid
from dropinf.study.experiments.common import threads
from dropinf.study.experiments.methods import Match, match
from dropinf.study.models import fit_full_batch, mlp
from dropinf.task import Task

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(n_train=40, n_test=6, hidden=4, ratios=[2, 16], n_seeds=2, n_subsets=4, n_loo=4,
            retrain_seeds=1, retrain_iter=30, fit_iter=300, n_boot=0, n_pilot=16)


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one torch thread avoids waiting on a busy second core."""
    with threads(1):
        yield


def tiny_fitted(n: int = 40, n_test: int = 8, n_in: int = 4, n_out: int = 3, seed: int = 0
                ) -> fid.Fitted:
    """Logistic regression (d = 15) on random data, fitted to a tight gradient norm."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + n_test, n_in, generator=g, dtype=torch.float64)
    y = torch.randint(n_out, (n + n_test,), generator=g)
    model = mlp([n_in, n_out], seed=seed).double()
    train, test = (x[:n], y[:n]), (x[n:], y[n:])
    fit_full_batch(model, cross_entropy, train, l2=1e-2)
    trainer = retrain.ConvexRetrainer(model, cross_entropy, train, l2=1e-2)
    return fid.Fitted("logreg", Task(model, cross_entropy), train, test, trainer, trainer, (0,),
                      batch=16)


# --------------------------------------------------------------------------- config


def test_config_profiles_and_overrides():
    cfg = fid.Config.for_profile("cpu-quick", ratios=[4, 2])
    assert cfg == fid.Config(ratios=(2.0, 4.0))  # ratios sorted
    gpu = fid.Config.for_profile("gpu")
    assert gpu.models == ("resnet9",) and gpu.references == ()
    with pytest.raises(ValueError, match="profile"):
        fid.Config.for_profile("laptop")
    with pytest.raises(TypeError, match="n_trian"):
        fid.Config.for_profile("cpu-quick", n_trian=10)


@pytest.mark.parametrize("field, value", [
    ("ratios", (0.5, 2)), ("ratios", ()), ("methods", ("dropout", "fft")), ("models", ()),
    ("n_seeds", 0), ("n_subsets", 2), ("fraction", 1.0), ("damping", -1.0), ("l2", 0.0),
    ("n_train", 5000), ("n_loo", 2000), ("sjlt_c", 0), ("threads", -1), ("seed", 1.5),
])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        fid.Config(**{field: value})


# --------------------------------------------------------------------------- dimensions


def test_matched_dims_build_every_method_at_k():
    task = Task(mlp([64, 8, 10], seed=0), cross_entropy)
    d = task.dim
    dims = fid.matched_dims(task, (2.0, 16.0, 64.0))
    cfg = fid.Config(sjlt_c=4, pca_n_fit=200)
    G = torch.randn(300, d, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    pilot = [(torch.randn(8, 64, generator=g), torch.randint(10, (8,), generator=g))]
    for r in dims.itertuples():
        m = match(task, ratio=r.ratio)
        assert (r.p, r.k, r.actual_ratio, r.p_flat) == (m.p, m.k, d / m.k, 1 - m.k / d)
        for method in fid.METHODS:
            comp = fid.build_compressor(method, m, 1, cfg, task, G, pilot=pilot)
            if method == "pca" and r.k > cfg.pca_n_fit:
                assert comp is None
                continue
            assert comp.dim == r.k, method


def _squared_error(model: nn.Module, batch) -> torch.Tensor:
    return 0.5 * (model(batch[0]) - batch[1]).pow(2).sum(1)


def test_ratio_one_reduces_to_uncompressed_fisher():
    """At k = d, dropout (flat and factored) is a permutation and PCA (fitted on n >= d points)
    an orthogonal map, so compressed-Fisher scores equal the uncompressed ones at any damping;
    dense and factored Gaussian maps P are invertible, and ``(Pa)^T (P F P^T)^{-1} (Pb) =
    a^T F^{-1} b`` without damping. (SJLT at k = d hashes coordinates together: not
    invertible.) A least-squares model keeps F non-singular (a softmax's is not)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 4, generator=g, dtype=torch.float64)
    y = torch.randn(48, 2, generator=g, dtype=torch.float64)
    model = mlp([4, 2], seed=0).double()
    task = Task(model, _squared_error)
    fitted = fid.Fitted("ls", task, (x[:40], y[:40]), (x[40:], y[40:]), None, None, (0,),
                        batch=16)
    d = fitted.d
    G_tr, G_te = fid.exact_gradients(fitted)
    (r,) = fid.matched_dims(task, (1.0,)).itertuples()
    assert (r.k, r.p) == (d, 0.0)
    cfg = fid.Config(pca_n_fit=40)
    for damping, methods in ((0.1, ("dropout", "dropout_factored", "pca")),
                             (0.0, ("gaussian", "gaussian_factored"))):
        ref = scores(G_te, G_tr, Preconditioner.fit(G_tr, "fisher", damping)).numpy()
        for m in methods:
            comp = fid.build_compressor(m, Match(0.0, d, d), 3, cfg, task, G_tr)
            S = fid.compressed_scores(fitted, comp, damping)
            np.testing.assert_allclose(S, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max(),
                                       err_msg=m)


# --------------------------------------------------------------------------- ground truth


def _np_fit(x: np.ndarray, y: np.ndarray, n_classes: int, weight: float, l2: float,
            theta0: np.ndarray) -> np.ndarray:
    """Minimise ``weight * sum_i CE_i + l2/2 |theta|^2`` for a linear softmax model in numpy."""
    n_in = x.shape[1]

    def f(theta):
        W, b = theta[: n_in * n_classes].reshape(n_classes, n_in), theta[n_in * n_classes :]
        z = x @ W.T + b
        z = z - z.max(1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        loss = -np.log(p[np.arange(len(y)), y]).sum()
        r = p.copy()
        r[np.arange(len(y)), y] -= 1
        grad = np.concatenate([(r.T @ x).ravel(), r.sum(0)])
        return weight * loss + l2 / 2 * theta @ theta, weight * grad + l2 * theta

    res = optimize.minimize(f, theta0, jac=True, method="L-BFGS-B",
                            options={"gtol": 1e-12, "ftol": 0, "maxiter": 5000})
    return res.x


def _np_test_outputs(theta, x, y, n_classes):
    n_in = x.shape[1]
    W, b = theta[: n_in * n_classes].reshape(n_classes, n_in), theta[n_in * n_classes :]
    z = x @ W.T + b
    return -(np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
             - z[np.arange(len(y)), y])


def test_ground_truth_and_metrics_match_scipy_refits_and_loops():
    cfg = fid.Config(**{**TINY, "models": ("logreg",), "n_subsets": 5, "n_loo": 6, "l2": 0.05})
    fitted = fid.fit_model(cfg, "logreg")
    truth = fid.ground_truth(cfg, fitted, progress=False)
    (x, y), (xt, yt) = (tuple(t.numpy() for t in b) for b in (fitted.train, fitted.test))
    n, K = len(y), 10
    theta0 = np.zeros(x.shape[1] * K + K)
    # LDS subsets: each fitted on its own mean loss plus l2/2 |theta|^2
    for j, mask in enumerate(truth.masks):
        th = _np_fit(x[mask], y[mask], K, 1 / mask.sum(), cfg.l2, theta0)
        np.testing.assert_allclose(truth.outputs[j], _np_test_outputs(th, xt, yt, K),
                                   atol=1e-5)
    # LOO on the full objective: (1/n) sum over the kept points
    full = _np_test_outputs(_np_fit(x, y, K, 1 / n, cfg.l2, theta0), xt, yt, K)
    for j, i in enumerate(truth.removed):
        keep = np.arange(n) != i
        th = _np_fit(x[keep], y[keep], K, 1 / n, cfg.l2, theta0)
        np.testing.assert_allclose(truth.loo[j], full - _np_test_outputs(th, xt, yt, K),
                                   atol=1e-6)
    # the row's LOO and LDS against scipy loops over test points
    S = np.random.default_rng(0).normal(size=(len(yt), n))
    row = fid.fidelity_metrics(S, cfg, truth)
    pred = truth.masks.astype(float) @ S.T
    lds = np.mean([stats.spearmanr(pred[:, t], truth.outputs[:, t])[0] for t in range(len(yt))])
    loo = np.mean([stats.pearsonr(S[t, truth.removed], truth.loo[:, t])[0]
                   for t in range(len(yt))])
    assert row["lds"] == pytest.approx(lds, abs=1e-12)
    assert row["loo"] == pytest.approx(loo, abs=1e-12)
    assert np.isnan(row["spearman"]) and np.isnan(row["spearman_vs_identity"])


def test_exact_influence_predicts_leave_one_out():
    """Exact influence with the model's l2 is the first-order LOO effect: on a small convex
    problem the predicted and retrained effects agree closely (a real property, not plumbing)."""
    fitted = tiny_fitted(n=100)
    cfg = fid.Config(n_loo=20, n_subsets=3, n_boot=0, references=("exact",))
    G_tr, G_te = fid.exact_gradients(fitted)
    refs = fid.reference_scores(fid.Config(l2=1e-2, references=("exact",)), fitted, G_tr, G_te)
    S, info = refs["exact"]
    assert info["grad_norm"] < 1e-8 and info["min_eig"] > 0
    truth = fid.ground_truth(cfg, fitted, progress=False)
    row = fid.fidelity_metrics(S, cfg, truth, S_exact=S)
    assert row["loo"] > 0.95
    assert row["spearman"] == pytest.approx(1.0) and row["topk"] == pytest.approx(1.0)
    # in the right units: the retrained effect is about score / n (least-squares slope)
    pred = S[:, truth.removed].T / fitted.n_train
    assert (pred * truth.loo).sum() / (pred * pred).sum() == pytest.approx(1.0, abs=0.15)


# --------------------------------------------------------------------------- one model


@pytest.fixture(scope="module")
def tiny_run():
    """run for both cpu-quick models at the TINY configuration, with the summary."""
    cfg = fid.Config(**TINY)
    res = fid.run(cfg, progress=False, log=None)
    return cfg, res, res.rows, fid.summary(res)


def test_run_rows_tables_and_summary(tiny_run):
    cfg, res, rows, s = tiny_run
    comp = rows[rows.kind == "compressed"]
    # one row per (model, method, ratio, seed) except PCA where k > n_fit (k <= n_train here)
    for _, g in comp.groupby(["model", "ratio"]):
        assert g.k.nunique() == 1
        expected = [m for m in fid.METHODS if m != "pca" or g.k.iloc[0] <= cfg.n_train]
        assert sorted(g.method.unique()) == sorted(expected)
        assert (g.groupby("method").size() == cfg.n_seeds).all()
    assert set(rows[rows.kind == "reference"].method) == set(fid.REFERENCES)
    vals = rows[list(fid.METRICS)].to_numpy(dtype=float)
    assert np.nanmax(np.abs(vals)) <= 1 + 1e-9
    # LOO only for the convex model; ggn = exact for logistic regression
    assert rows[rows.model == "mlp"].loo.isna().all()
    assert rows[rows.model == "logreg"].loo.notna().all()
    lr = rows[(rows.model == "logreg") & (rows.kind == "reference")].set_index("method")
    assert lr.loc["ggn", "spearman"] == pytest.approx(1.0, abs=1e-6)
    summ = res.summ
    one = summ[(summ.model == "mlp") & (summ.method == "sjlt") & (summ.ratio == 16.0)].iloc[0]
    sel = comp[(comp.model == "mlp") & (comp.method == "sjlt") & (comp.ratio == 16.0)]
    assert one.lds_mean == pytest.approx(sel.lds.mean())
    assert one.lds_std == pytest.approx(sel.lds.std(ddof=1))
    json.dumps(s)
    assert s["exact_lds_logreg"] == pytest.approx(
        float(f"{res.infos['logreg']['exact']['lds']['value']:.4g}"))
    assert "Dropout (flat) matches" in s["conclusion"]
    assert s["table_64x"] == {}  # no 64x ratio in this configuration
    # the Result's tables: one dims row per (model, ratio), timings per (model, stage)
    assert len(res.dims) == len(cfg.models) * len(cfg.ratios)
    assert set(res.models.model) == set(cfg.models) and set(res.timings.model) == set(cfg.models)
    assert set(fid.timing_table(res).columns) == set(cfg.models)
    ref = fid.reference_intervals(res)
    lr = ref[(ref.model == "logreg") & (ref.reference == "exact")].set_index("metric")
    assert lr.at["lds", "value"] == res.infos["logreg"]["exact"]["lds"]["value"]
    assert (ref.low <= ref.value).all() and (ref.value <= ref.high).all()
    fid.plot_fidelity(summ)


def test_gpu_code_path_on_a_stand_in(monkeypatch):
    """The gpu profile's ResNet-9 path (no references, LDS only) on 32x32 random images."""
    g = torch.Generator().manual_seed(0)

    def fake_cifar10(*args, **kwargs):
        x = torch.randn(60, 3, 32, 32, generator=g)
        y = torch.randint(10, (60,), generator=g)
        return data.Classification("cifar10", x[:48], y[:48], x[48:], y[48:], 10,
                                   torch.zeros(3, 32, 32), torch.ones(3, 32, 32), {})

    monkeypatch.setattr(data, "cifar10", fake_cifar10)
    cfg = fid.Config.for_profile("gpu", n_train=16, n_test=4, width=2, epochs=1, batch_size=8,
                                 n_subsets=3, ratios=(256,), n_seeds=1, n_boot=0, threads=1)
    res = fid.run_model(cfg, "resnet9", progress=False, log=None)
    rows = res.rows
    assert sorted(rows.method) == sorted(cfg.methods)
    assert rows.lds.notna().all() and rows.spearman.isna().all() and rows.loo.isna().all()
    assert rows.k.nunique() == 1 and (rows.k < res.info["d"]).all()


# --------------------------------------------------------------------------- notebook


def test_notebook_runs_with_tiny_parameters(tmp_path, tiny_run):
    """The notebook with tiny parameters writes its figure, tables and a summary equal to the
    one computed here in another process (so deterministic for a fixed seed)."""
    papermill = pytest.importorskip("papermill")
    papermill.execute_notebook(str(ROOT / "notebooks" / "02_fidelity.ipynb"),
                               str(tmp_path / "02_fidelity.ipynb"), kernel_name="dropinf",
                               parameters={"out_dir": str(tmp_path), "config": TINY},
                               progress_bar=False, cwd=str(ROOT / "notebooks"))
    for name in ("figures/fidelity_vs_ratio.png", "figures/fidelity_vs_ratio.pdf",
                 "tables/fidelity.csv", "tables/fidelity_summary.csv", "manifest.json"):
        assert (tmp_path / name).is_file(), name
    s = json.loads((tmp_path / "summary.json").read_text())
    for key in ("exact_loo_logreg", "exact_lds_logreg", "exact_lds_mlp", "table_16x",
                "table_64x", "conclusion"):
        assert key in s
    assert set(s["table_16x"]) == {"logreg", "mlp"}
    assert set(s["table_16x"]["mlp"]) == set(fid.METHODS)
    expected = json.loads(json.dumps({"notebook": "02_fidelity", "profile": "cpu-quick",
                                      **tiny_run[3]}))
    assert s == expected


def test_a_method_added_to_the_table_appears_in_summary_and_conclusion(monkeypatch):
    """One MethodSpec entry is all a new compressor needs: here a second flat-dropout draw."""
    from dropinf import Dropout
    from dropinf.study.experiments import methods as M

    extra = M.MethodSpec("dropout_b", "dropout (flat, second draw)", "C7", "<", "mask",
                         lambda m, s, o: Dropout(m.p_flat, seed=s + 1000))
    monkeypatch.setitem(M.METHODS, extra.name, extra)
    cfg = fid.Config(**{**TINY, "models": ("mlp",), "references": ("exact",),
                        "methods": ("dropout", "sjlt", "dropout_b")})
    res = fid.run(cfg, progress=False, log=None)
    rows = res.rows
    s = fid.summary(res)
    assert set(s["table_16x"]["mlp"]) == {"dropout", "sjlt", "dropout_b"}
    assert "Dropout (flat, second draw) matches the best random projection" in s["conclusion"]
    assert "dropout (flat, second draw) " in s["conclusion"]  # its number at each ratio
    fid.plot_fidelity(fid.summary_table(rows))


def test_importance_against_uniform_in_summary_and_conclusion(tiny_run):
    """Each importance mask is compared with the uniform mask of its kind, ratio by ratio,
    against a direct computation from the summary table; the conclusion names the comparison
    and gives the plain count."""
    cfg, res, rows, s = tiny_run
    summ = res.summ
    pairs = {"dropout_imp": "dropout", "dropout_factored_imp": "dropout_factored"}
    counts = {"ahead": 0, "level": 0, "behind": 0}
    for model in cfg.models:
        for a, b in pairs.items():
            v = s["importance_vs_uniform"][model][a]
            assert v["against"] == b
            for metric in ("spearman", "lds"):
                for r in cfg.ratios:
                    ga = summ[(summ.model == model) & (summ.method == a) & (summ.ratio == r)]
                    gb = summ[(summ.model == model) & (summ.method == b) & (summ.ratio == r)]
                    diff = ga[f"{metric}_mean"].item() - gb[f"{metric}_mean"].item()
                    se = np.sqrt((ga[f"{metric}_std"].item() ** 2
                                  + gb[f"{metric}_std"].item() ** 2) / cfg.n_seeds)
                    tol = max(2 * se, 0.02)
                    key = "ahead" if diff > tol else "behind" if diff < -tol else "level"
                    assert r in v[metric][key]
                    counts[key] += 1
    assert "Importance dropout (flat) against dropout (flat) on LDS" in s["conclusion"]
    n = sum(counts.values())
    assert (f"ahead in {counts['ahead']}, level in {counts['level']} and behind in "
            f"{counts['behind']} of {n} comparisons") in s["conclusion"]


def test_pilot_set_is_a_seeded_subset_of_the_training_points():
    cfg = fid.Config(**TINY)
    fitted = tiny_fitted()
    a, b, c = (fid.pilot_set(cfg, fitted, draw) for draw in (0, 0, 1))
    xa = torch.cat([x for x, _ in a])
    assert len(xa) == cfg.n_pilot and len(a) == -(-cfg.n_pilot // fitted.batch)
    rows = {tuple(r.tolist()) for r in fitted.train[0]}
    assert all(tuple(r.tolist()) in rows for r in xa)  # training points only
    assert len({tuple(r.tolist()) for r in xa}) == cfg.n_pilot  # without replacement
    assert torch.equal(xa, torch.cat([x for x, _ in b]))
    assert not torch.equal(xa, torch.cat([x for x, _ in c]))
    with pytest.raises(ValueError, match="n_pilot"):
        fid.Config(**{**TINY, "n_pilot": 41})
