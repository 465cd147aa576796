"""Notebook 05 (removal) and dropinf.study.experiments.removal: targets, removal sets, retraining
without the removed points, the analysis, and a tiny run of the notebook."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as sps

from dropinf.compressors import Identity, Layout
from dropinf.gradients import gradients
from dropinf.losses import cross_entropy
from dropinf.study import data as dd
from dropinf.study import models
from dropinf.study.experiments import removal as rm
from dropinf.study.experiments.common import seed_for, threads
from dropinf.study.experiments.methods import build, compressors, match, ready, spec

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny convolutions: a second thread only waits on the first (and on a busy machine, long).
    with threads(1):
        yield


def test_config_profiles_and_validation():
    cfg = rm.Config.for_profile("cpu-quick", seed=3, fractions=[0.1, 0.02, 0.05])
    assert cfg.seed == 3 and cfg.fractions == (0.02, 0.05, 0.1)  # sorted, tuple
    gpu = rm.Config.for_profile("gpu")
    assert gpu.dataset == "cifar10" and gpu.main_fraction == 0.05 and gpu.reference in gpu.methods
    with pytest.raises(ValueError, match="profile"):
        rm.Config.for_profile("tpu")
    with pytest.raises(TypeError, match="unknown Config field"):
        rm.Config.for_profile("cpu-quick", n_target=3)
    bad = [
        (dict(fractions=[0.0]), "fractions"),
        (dict(main_fraction=0.3), "main_fraction"),
        (dict(methods=["identity", "dropout-flat"]), "methods=.*choose distinct names"),
        (dict(methods=["sjlt"]), "reference"),
        (dict(n_seeds=1), "n_seeds"),
        (dict(damping=0.0), "damping"),
        (dict(p=1.0), "p="),
        (dict(channels=[8]), "channels"),
        (dict(dataset="mnist"), "dataset"),
    ]
    for kw, name in bad:
        with pytest.raises(ValueError, match=name):
            rm.Config.for_profile("cpu-quick", **kw)


def test_pick_targets_is_class_balanced_seeded_and_distinct():
    y = np.repeat(np.arange(4), [5, 9, 3, 7])
    rng = np.random.default_rng(1)
    y = y[rng.permutation(len(y))]
    t = rm.pick_targets(y, 10, seed=0)
    assert len(np.unique(t)) == 10
    np.testing.assert_array_equal(np.bincount(y[t], minlength=4), [3, 3, 2, 2])
    np.testing.assert_array_equal(t, rm.pick_targets(y, 10, seed=0))
    assert not np.array_equal(t, rm.pick_targets(y, 10, seed=1))
    with pytest.raises(ValueError, match="n_targets=16"):
        rm.pick_targets(y, 16, seed=0)  # 4 of class 2, which has 3


def test_top_removed_against_a_sorted_list_with_ties():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 6, size=40).astype(float)  # many ties
    for m in (1, 7, 40):
        helpful = sorted(range(40), key=lambda i: (-s[i], i))[:m]
        harmful = sorted(range(40), key=lambda i: (s[i], i))[:m]
        np.testing.assert_array_equal(rm.top_removed(s, m), sorted(helpful))
        np.testing.assert_array_equal(rm.top_removed(s, m, helpful=False), sorted(harmful))
    with pytest.raises(ValueError, match="m=41"):
        rm.top_removed(s, 41)


def test_aggregate_scores_against_a_numpy_solve():
    rng = np.random.default_rng(0)
    G, Gt = rng.normal(size=(30, 6)), rng.normal(size=(4, 6))
    damping = 0.05
    F = G.T @ G / 30
    lam = damping * np.trace(F) / 6
    expected = (Gt @ np.linalg.solve(F + lam * np.eye(6), G.T)).sum(0)
    got = rm.aggregate_scores(torch.from_numpy(Gt), torch.from_numpy(G), damping)
    np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_holm_against_hand_computed_values():
    # sorted p: 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1, but never below 0.06)
    np.testing.assert_allclose(rm.holm([0.04, 0.01, 0.03]), [0.06, 0.03, 0.06])
    np.testing.assert_allclose(rm.holm([0.5, np.nan, 0.6]), [1.0, np.nan, 1.0])


def _tiny_digits(n: int = 48):
    d = dd.digits(seed=0, image=True)
    return d.x_train[:n].clone(), d.y_train[:n].clone()


def test_retraining_with_zero_weights_is_training_on_the_subset():
    x, y = _tiny_digits()
    keep = np.sort(np.random.default_rng(0).choice(len(y), 30, replace=False))
    # One batch per epoch: the data order plays no part, so the two runs must agree.
    cfg = rm.Config(channels=(2, 3), epochs=4, batch_size=len(y), lr=1e-2)
    ours = rm.Retrainer(cfg, x, y, 10)(keep, seed=5)
    ref = models.cnn((2, 3), seed=5)
    models.train(ref, cross_entropy, (x[keep], y[keep]), seed=5, epochs=4, batch_size=len(y),
                 lr=1e-2, weight_decay=cfg.weight_decay, progress=False)
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_removed_points_have_no_effect_on_the_retrained_model():
    x, y = _tiny_digits()
    keep = np.arange(0, len(y), 2)
    cfg = rm.Config(channels=(2, 3), epochs=2, batch_size=8)
    a = rm.Retrainer(cfg, x, y, 10)(keep, seed=1)
    x2, y2 = x.clone(), y.clone()
    x2[1::2] = torch.randn_like(x2[1::2]) * 5
    y2[1::2] = (y2[1::2] + 3) % 10
    b = rm.Retrainer(cfg, x2, y2, 10)(keep, seed=1)
    c = rm.Retrainer(cfg, x, y, 10)(np.arange(1, len(y), 2), seed=1)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-7)
    assert any(not torch.allclose(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))
    with pytest.raises(ValueError, match="indices"):
        rm.Retrainer(cfg, x, y, 10)(np.array([len(y)]), seed=1)


def test_target_outputs_are_negative_loss_and_correctness():
    x, y = _tiny_digits(12)
    model = models.cnn((2, 3), seed=0)
    out = rm.target_outputs(x, y)(model)
    with torch.no_grad():
        logits = model(x)
    loss = torch.stack([torch.nn.functional.cross_entropy(logits[i:i + 1], y[i:i + 1])
                        for i in range(12)])
    np.testing.assert_allclose(out[:12], -loss.double().numpy(), rtol=1e-5)
    np.testing.assert_array_equal(out[12:], (logits.argmax(1) == y).numpy())
    np.testing.assert_allclose(rm.target_outputs(x, y, block=5)(model), out, rtol=1e-6)


def test_every_method_gets_the_matched_dimension():
    x, y = _tiny_digits(20)
    cfg = rm.Config(channels=(4, 6), p=0.5)
    task = rm.make_task(rm.build_model(cfg, 10, seed=0))
    m, d = match(task, p=cfg.p), task.dim
    assert 1 < m.k < d
    G = gradients(task, [(x, y)], Identity(), progress=False).data
    G = torch.cat([G, torch.randn(m.k, d)])  # any k + 20 rows of dimension d, for PCA
    # every compressor of the table, importance dropout (fitted on a pilot batch) included
    for method in ("identity", *compressors()):
        comp = build(method, m, seed=1, sjlt_c=cfg.sjlt_c, pca_n_fit=cfg.pca_fit)
        comp = ready(comp, task, d if method == "identity" else m.k, G, pilot=[(x[:8], y[:8])])
        assert comp is not None, method
    # the defaults leave the pilot-fitted methods out (Config says why)
    assert set(rm.METHODS) == {"identity", *(x for x in compressors()
                                             if spec(x).family != "composed" and not spec(x).pilot)}


def test_resnet9_task_takes_only_the_hook_path():
    cfg = rm.Config.for_profile("gpu", width=4, device="cpu")
    model = rm.build_model(cfg, 10, seed=0)
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    task = rm.make_task(model)
    assert Layout.of(task).rest() == ()  # every selected parameter is in a hooked layer
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


class _Fake:
    """A 'model' that is its kept set; the targets' loss rises by the removed points' weights."""

    def __init__(self, n: int, n_targets: int, rng):
        self.weight = rng.uniform(0, 1, size=n)
        self.n, self.n_targets = n, n_targets

    def train(self, indices, seed):
        return set(np.asarray(indices).tolist()), seed

    def output(self, model):
        kept, seed = model
        removed = [i for i in range(self.n) if i not in kept]
        loss = self.weight[removed].sum() / 10 + np.random.default_rng(seed).normal(0, 0.01)
        return np.concatenate([np.full(self.n_targets, -loss), np.zeros(self.n_targets)])


def test_plan_retrains_effects_and_tests_against_independent_computations():
    n, n_targets = 60, 3
    rng = np.random.default_rng(0)
    cfg = rm.Config(methods=("identity", "sjlt", "dropout"), fractions=(0.1, 0.2),
                    main_fraction=0.2, n_seeds=4, n_targets=n_targets)
    fake = _Fake(n, n_targets, rng)
    # identity ranks by the true effect; sjlt by noise; flat dropout by a noisy true effect.
    sc = {"identity": [fake.weight] * 4,
          "sjlt": [rng.normal(size=n) for _ in range(4)],
          "dropout": [fake.weight + rng.normal(0, 0.3, n) for _ in range(4)]}
    scored = rm.Scored(sc, k=5, d=10, dims={}, seconds=pd.DataFrame())
    plan = rm.removal_plan(cfg, scored, n)
    assert len(plan) == 4 * (1 + 2 * (3 + 2))
    for e in plan:
        r, f = e["draw"], e["fraction"]
        if e["kind"] == "full":
            assert len(e["removed"]) == 0
            continue
        m = round(f * n)
        assert len(e["removed"]) == m == len(np.unique(e["removed"]))
        if e["kind"] == "helpful":
            s = sc[e["method"]][r]
            assert set(e["removed"]) == set(np.argsort(-s, kind="stable")[:m])
            ref = set(np.argsort(-fake.weight, kind="stable")[:m])
            assert e["overlap_reference"] == len(ref & set(e["removed"])) / m
        elif e["kind"] == "harmful":
            assert set(e["removed"]) == set(np.argsort(fake.weight, kind="stable")[:m])
    rand = {(e["draw"], e["fraction"]): set(e["removed"]) for e in plan if e["kind"] == "random"}
    assert all(rand[r, 0.1] < rand[r, 0.2] for r in range(4))  # nested across fractions
    assert rand[0, 0.2] != rand[1, 0.2]

    df = rm.retrain_all(cfg, plan, fake.train, fake.output, n, progress=False)
    assert len(df) == len(plan)
    for e, row in zip(plan, df.itertuples()):
        seed = seed_for(cfg.seed, "retrain", e["draw"])
        assert row.retrain_seed == seed
        # the seed's noise cancels against the full model of the same draw
        np.testing.assert_allclose(row.delta_loss, fake.weight[e["removed"]].sum() / 10,
                                   atol=1e-12)

    eff = rm.effects(df).set_index(["method", "fraction"])
    for (method, f), row in eff.iterrows():
        v = df[(df.method == method) & (df.fraction == f)].delta_loss.to_numpy()
        assert row.loss_mean == pytest.approx(v.mean()) and row.n_draws == 4
        assert row.loss_std == pytest.approx(np.sqrt(((v - v.mean()) ** 2).sum() / 3))

    tests = rm.compare(df, 0.2).set_index("method")
    assert set(tests.index) == {"identity", "sjlt", "dropout", "harmful"}
    a = df[(df.method == "dropout") & (df.fraction == 0.2)].sort_values("draw").delta_loss
    b = df[(df.method == "random") & (df.fraction == 0.2)].sort_values("draw").delta_loss
    diff = a.to_numpy() - b.to_numpy()
    t_stat = diff.mean() / (diff.std(ddof=1) / 2)
    assert tests.at["dropout", "p_value"] == pytest.approx(2 * sps.t.sf(abs(t_stat), 3))
    assert tests.at["dropout", "p_holm"] >= tests.at["dropout", "p_value"]
    half = sps.t.ppf(0.975, 3) * diff.std(ddof=1) / 2
    assert tests.at["dropout", "diff_low"] == pytest.approx(diff.mean() - half)
    # identity removes the largest weights: the most damaging removal there is
    assert tests.at["identity", "diff_mean"] > 0 and tests.at["harmful", "diff_mean"] < 0

    summary = rm.summarize(cfg, rm.effects(df), rm.compare(df, 0.2))
    assert set(summary["removal_effect"]) == {"identity", "sjlt", "dropout", "random",
                                              "harmful"}
    assert summary["removal_effect"]["sjlt"]["mean"] == pytest.approx(eff.loc["sjlt", 0.2]
                                                                      .loss_mean)
    text = rm.conclude(cfg, rm.effects(df), df, n)
    assert "no compression" in text and f"{eff.loc['identity', 0.2].loss_mean:+.4f}" in text
    assert "12 of 60 points" in text


def test_notebook_runs_on_tiny_parameters(tmp_path):
    pm = pytest.importorskip("papermill")
    out = tmp_path / "out"
    pm.execute_notebook(
        str(ROOT / "notebooks" / "05_removal.ipynb"), str(tmp_path / "nb.ipynb"),
        kernel_name="dropinf", progress_bar=False,
        parameters=dict(out_dir=str(out), config=dict(n_targets=10, fractions=[0.05, 0.1],
                        main_fraction=0.1, n_seeds=2, epochs=2, channels=[4, 8], n_pilot=32,
                        methods=["identity", "dropout_factored", "sjlt", "dropout_factored_imp"])),
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["main_fraction"] == 0.1 and summary["conclusion"]
    assert set(summary["removal_effect"]) == {"identity", "dropout_factored", "sjlt", "random",
                                              "harmful", "dropout_factored_imp"}
    assert summary["k"] < summary["d"] and len(summary["targets"]) == 10
    df = pd.read_csv(out / "tables" / "retrains.csv")
    assert len(df) == 2 * (1 + 2 * (4 + 2))
    main = df[(df.fraction == 0.1) & (df.method == "sjlt")].delta_loss
    assert summary["removal_effect"]["sjlt"]["mean"] == pytest.approx(main.mean(), rel=1e-4)
    assert (out / "figures" / "removal.png").exists()
    assert (out / "figures" / "removal.pdf").exists()
