"""Notebook 06 (language): the module's pieces against independent computations, and a
tiny-parameter run of the notebook."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import dropinf as di
from dropinf import theory as th
from dropinf.study import models
from dropinf.study.data import DatasetUnavailable
from dropinf.study.experiments import language as L
from dropinf.study.experiments.common import threads
from dropinf.study.experiments.methods import Match, match, ready, spec

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "06_language.ipynb"


@pytest.fixture(autouse=True)
def _one_thread():
    with threads(1):
        yield


def tiny_cfg(**kw) -> L.Config:
    base = dict(n_pretrain=0, n_train=24, n_test=6, seq_len=8, ratios=(1.0, 16.0),
                removal_ratio=16.0, n_mask_seeds=2, top_k=4, n_targets=2, grad_batch=16,
                epochs=1, batch_size=8, n_retrain_seeds=2, n_pilot=8)
    return L.Config.for_profile("cpu-quick", **{**base, **kw})


def tiny_lm(cfg: L.Config) -> L.LM:
    """A 1-block GPT-2 fine-tuned on random byte documents, with its exact gradients."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 20, (cfg.n_train + cfg.n_test, cfg.seq_len), generator=g)
    docs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    train = {k: v[: cfg.n_train] for k, v in docs.items()}
    test = {k: v[cfg.n_train :] for k, v in docs.items()}
    base = models.gpt2(n_layer=1, n_embd=8, n_head=2, vocab_size=24, n_positions=cfg.seq_len,
                       seed=1)
    model, hist = L.fine_tune(cfg, base, train, np.arange(cfg.n_train), L.finetune_seeds(cfg)[0])
    task = di.Task(model, di.losses.causal_lm, params=L.gradient_params(model, None))
    lm = L.LM("random", {}, train, test, base, model, task, torch.empty(0, 0),
              torch.empty(0, 0), L.doc_losses(model, test), [], hist, 0.0)
    lm.G_train, lm.G_test = L.compressed(lm, di.Identity(), cfg.grad_batch)
    return lm


# --------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("n, d", [(30, 12), (10, 40)])  # dense and kernel form
def test_fisher_scores_equal_a_direct_solve(n, d):
    g = torch.Generator().manual_seed(n + d)
    G = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, d)
    T = torch.randn(5, d, generator=g, dtype=torch.float64)
    S, A = L.fisher_scores(T, G, damping=0.05)
    F = G.T @ G / n
    lam = 0.05 * torch.trace(F) / d
    direct = T @ torch.linalg.solve(F + lam * torch.eye(d, dtype=torch.float64), G.T)
    torch.testing.assert_close(S, direct, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(A, T @ G.T, rtol=1e-12, atol=1e-12)


def test_fisher_scores_reject_bad_input():
    with pytest.raises(ValueError, match="damping"):
        L.fisher_scores(torch.ones(2, 3), torch.ones(4, 3), damping=0.0)
    with pytest.raises(ValueError, match="same compressor"):
        L.fisher_scores(torch.ones(2, 3), torch.ones(4, 5), damping=0.1)


# --------------------------------------------------------------------------- methods


def test_every_method_matches_k_or_says_why_not():
    cfg = tiny_cfg(dense_max_mb=0.01)
    model = models.gpt2(n_layer=1, n_embd=8, n_head=2, vocab_size=24, n_positions=8,
                        seed=0).eval()
    task = di.Task(model, di.losses.causal_lm, params=L.gradient_params(model, None))
    d = task.dim
    assert d == 12 * 8 * 8 + 9 * 8  # one block's Conv1D weights and biases
    m = match(task, ratio=16.0)
    k = m.k
    ids = torch.randint(0, 24, (4, 8), generator=torch.Generator().manual_seed(0))
    pilot = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    for method in L.METHODS:
        comp, why = L.method_compressor(method, m, seed=0, cfg=cfg)
        if method == "gaussian":
            assert comp is None and "dense_max_mb" in why  # 4 k d bytes > 0.01 MB
            continue
        if method == "pca":
            assert comp is None and str(cfg.n_train) in why  # k > 24 training gradients
            continue
        if spec(method).pilot:  # importance dropout: unusable before its fit on a pilot set
            with pytest.raises(RuntimeError, match="not fitted"):
                comp.bind(task)
            ready(comp, task, k, pilot=pilot)
        comp.bind(task)
        assert comp.dim == k, method
        if isinstance(comp, di.Chain):  # the composed method: a mask to oversample * k first
            assert comp.first.dim == min(d, cfg.oversample * k)
    big = tiny_cfg(n_train=200, top_k=4)
    pca, _ = L.method_compressor("pca", Match(m.p, 50, d), seed=0, cfg=big)
    assert isinstance(pca, di.PCA) and pca.k == 50


def test_ratio_one_reproduces_the_reference_and_draws_differ():
    """At ratio 1, dropout at rate 0 keeps every coordinate: flat and factored masks give the
    uncompressed scores exactly (Spearman and top-k overlap 1, both curvatures). At 16x the
    draws differ, and every method's first-draw scores are kept for removal."""
    cfg = tiny_cfg(methods=("dropout", "dropout_factored", "sjlt", "dropout_imp",
                            "dropout_factored_imp"),
                   removal_methods=("identity", "dropout"))
    lm = tiny_lm(cfg)
    ag = L.agreement(cfg, lm, progress=False)
    t = ag.table
    # importance masks at rate 0 keep every unit with probability 1: exact too
    exact = ["dropout", "dropout_factored", "dropout_imp", "dropout_factored_imp"]
    one = t[(t.ratio == 1.0) & t.method.isin(exact)]
    assert len(one) == len(exact) * 2 * cfg.n_mask_seeds
    np.testing.assert_allclose(one.spearman, 1.0, atol=1e-12)
    np.testing.assert_allclose(one.topk_overlap, 1.0)
    sixteen = t[(t.ratio == 16.0) & (t.curvature == "fisher") & (t.method == "sjlt")]
    assert sixteen.spearman.nunique() == cfg.n_mask_seeds
    assert set(ag.scores) == {"identity", *cfg.methods}
    agg = L.aggregate(t)
    row = agg[(agg.method == "sjlt") & (agg.ratio == 16.0) & (agg.curvature == "fisher")].iloc[0]
    assert row.spearman_mean == pytest.approx(sixteen.spearman.mean())
    assert row.spearman_std == pytest.approx(sixteen.spearman.std(ddof=1))
    at = L.agreement_at(agg, 16.0)
    assert at["sjlt"]["n_draws"] == cfg.n_mask_seeds and L.agreement_at(agg, 64.0) is None


def test_coherence_against_numpy_per_pair_and_per_layer():
    cfg = tiny_cfg()
    lm = tiny_lm(cfg)
    stats, by_layer, values = L.coherence(cfg, lm)
    A, B = lm.G_test.double().numpy(), lm.G_train.double().numpy()
    ref = th.PairStats.pairwise(A, B)
    np.testing.assert_allclose(np.sort(values), np.sort(ref.coherence.ravel()), rtol=1e-9)
    assert stats["median"] == pytest.approx(np.median(ref.coherence), rel=1e-3)
    k = match(lm.task, ratio=16.0).k
    wins = np.mean(th.variance(ref, "fixed", k) < th.variance(ref, "gaussian", k))
    assert stats["by_ratio"]["16x"]["mask_wins"] == pytest.approx(wins, abs=1e-4)
    first = lm.task.params[0]  # the first layer's weight, then its bias
    assert first.name.endswith("c_attn.weight")
    cols = slice(first.offset, lm.task.params[1].stop)
    layer = th.PairStats.pairwise(A[:, cols], B[:, cols]).coherence
    row = by_layer.iloc[0]
    assert row.layer.endswith("c_attn") and row.d_layer == cols.stop - cols.start
    assert row["median"] == pytest.approx(np.median(layer), rel=1e-3)
    assert stats["layer_median_range"] == [by_layer["median"].min(), by_layer["median"].max()]


def test_pilot_is_a_seeded_subset_of_the_training_documents():
    cfg = tiny_cfg()
    idx = L.pilot_docs(cfg)
    assert len(np.unique(idx)) == cfg.n_pilot and list(idx) == sorted(idx)
    assert 0 <= idx.min() and idx.max() < cfg.n_train  # training documents only
    np.testing.assert_array_equal(idx, L.pilot_docs(tiny_cfg()))
    assert not np.array_equal(idx, L.pilot_docs(tiny_cfg(seed=1)))
    with pytest.raises(ValueError, match="n_pilot"):
        tiny_cfg(n_pilot=25)


def test_importance_masks_are_fitted_on_the_pilot_gradients():
    """The masks fitted from the pilot gradients computed once equal a direct Dropout.fit on
    the pilot documents (an independent path through the model), and the gradients are
    computed once for every mask."""
    cfg = tiny_cfg()
    lm = tiny_lm(cfg)
    m = match(lm.task, ratio=16.0)
    idx = torch.as_tensor(L.pilot_docs(cfg))
    docs = [{k: v[idx] for k, v in lm.train.items()}]
    for method in ("dropout_imp", "dropout_factored_imp", "dropout_imp_sjlt"):
        comp, _ = L.method_compressor(method, m, 3, cfg)
        comp = L.fitted(cfg, lm, method, comp, m.k)
        imp = comp.first if isinstance(comp, di.Chain) else comp
        want, _ = L.method_compressor(method, m, 3, cfg)
        want = want.first if isinstance(want, di.Chain) else want
        want.fit(lm.task, docs)
        assert imp.probs.keys() == want.probs.keys(), method
        for key, pi in imp.probs.items():
            torch.testing.assert_close(pi, want.probs[key], rtol=1e-10, atol=1e-15)
        assert comp.dim == m.k
    first = lm.pilot
    assert sum(bg.size for bg in first) == cfg.n_pilot
    L.fitted(cfg, lm, "dropout_imp", L.method_compressor("dropout_imp", m, 4, cfg)[0], m.k)
    assert lm.pilot is first  # not recomputed


def test_importance_targets_from_the_numbers():
    def a(**means):
        return {k: {"mean": v, "std": 0.01, "n_draws": 3} for k, v in means.items()}

    s = {"agreement_16x": a(gaussian=0.90, dropout_imp=0.885, dropout_imp_sjlt=0.87, sjlt=0.95),
         "agreement_64x": a(gaussian=0.70, dropout_factored_imp=0.64, dropout=0.69),
         "agreement_dot_16x": a(dropout_imp=0.99),  # no Gaussian: not evaluated
         "agreement_dot_64x": a(gaussian=0.5, dropout_imp_sjlt=0.6), "n_pilot": 8}
    t = L.importance_targets(s)
    c = t["fisher"]["16x"]
    assert (c["best"], c["gap"], c["met"]) == ("dropout_imp", 0.015, True)
    c = t["fisher"]["64x"]  # the uniform mask does not count, only importance variants
    assert (c["best"], c["gap"], c["met"]) == ("dropout_factored_imp", 0.06, False)
    assert t["dot"]["16x"]["met"] is None and t["dot"]["64x"]["gap"] == -0.1
    assert t["met"] is None
    s["agreement_dot_16x"] = a(gaussian=0.99, dropout_imp=0.975)
    t = L.importance_targets(s)
    assert t["dot"]["16x"]["met"] is True and t["met"] is False
    text = "\n".join(L.report._importance_text({**s, "importance_targets": t}))
    assert "missed for damped Fisher at 64x" in text and "gap +0.06" in text


# --------------------------------------------------------------------------- removal


def test_most_helpful_sums_over_targets_and_breaks_ties_low():
    S = np.array([[1.0, 3.0, 2.0, 3.0, -1.0],
                  [0.0, 0.0, 1.0, 0.0, 5.0],
                  [9.0, 9.0, 9.0, 9.0, 9.0]])
    rows = np.array([0, 1])
    total = S[rows].sum(0)  # [1, 3, 3, 3, 4]
    order = sorted(range(5), key=lambda j: (-total[j], j))
    for n in range(1, 6):
        assert list(L.most_helpful(S, rows, n)) == sorted(order[:n])


def test_fine_tuning_is_reproducible_and_removal_is_paired():
    """The same seed gives the same model (the paired comparison relies on it), and each
    removal row removes what its method's scores say."""
    cfg = tiny_cfg(methods=("dropout",), removal_methods=("identity", "dropout"),
                   ratios=(16.0,))
    lm = tiny_lm(cfg)
    again, _ = L.fine_tune(cfg, lm.base, lm.train, np.arange(cfg.n_train),
                           L.finetune_seeds(cfg)[0])
    np.testing.assert_array_equal(L.doc_losses(again, lm.test), lm.test_loss)
    ag = L.agreement(cfg, lm, progress=False)
    rem = L.removal(cfg, lm, ag.scores, progress=False)
    assert list(rem.method.unique()) == ["identity", "dropout", "random"]
    assert (rem.n_removed == cfg.n_remove).all() and len(rem) == 3 * cfg.n_retrain_seeds
    assert (rem[rem.method == "identity"].overlap_with_reference == 1.0).all()
    ref = L.most_helpful(ag.scores["identity"], L.targets(cfg), cfg.n_remove)
    flat = L.most_helpful(ag.scores["dropout"], L.targets(cfg), cfg.n_remove)
    got = rem[rem.method == "dropout"].overlap_with_reference.iloc[0]
    assert got == len(np.intersect1d(ref, flat)) / cfg.n_remove
    # a random set per seed, of the right size, reproducible
    sets = [L.random_set(cfg, j) for j in range(2)]
    assert all(len(np.unique(s)) == cfg.n_remove for s in sets)
    assert not np.array_equal(*sets)
    np.testing.assert_array_equal(sets[0], L.random_set(cfg, 0))
    summ = L.removal_summary(rem)
    g = rem[rem.method == "random"].target_loss_change
    assert summ["random"]["target_loss_change"]["mean"] == pytest.approx(g.mean(), abs=1e-5)


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("kw, match", [
    ({"ratios": (0.5,)}, "ratios"),
    ({"removal_ratio": 8.0}, "removal_ratio"),
    ({"methods": ("dropout",)}, "methods"),
    ({"removal_methods": ("pca",), "methods": ("sjlt",)}, "removal_methods"),
    ({"n_targets": 100}, "n_targets"),
    ({"corpora": ("openwebtext",)}, "pretrained"),
    ({"model": "huge"}, "model"),
    ({"damping": 0.0}, "damping"),
    ({"remove_fraction": 1.5}, "remove_fraction"),
])
def test_config_rejects_bad_values_naming_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        L.Config.for_profile("cpu-quick", **kw)


def test_config_unknown_field_and_profile():
    with pytest.raises(TypeError, match="n_epochs"):
        L.Config.for_profile("cpu-quick", n_epochs=3)
    with pytest.raises(ValueError, match="profile"):
        L.Config.for_profile("laptop")


def test_gpu_profile_fails_offline_naming_the_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("DROPINF_DATA", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    cfg = L.Config.for_profile("gpu")
    assert cfg.pretrained == "gpt2" and cfg.corpora == ("openwebtext", "cnn_dailymail")
    with pytest.raises(DatasetUnavailable, match="dropinf.study.data fetch"):
        L.load_corpus(cfg, "openwebtext")


# --------------------------------------------------------------------------- notebook


def test_notebook_runs_with_tiny_parameters(tmp_path):
    papermill = pytest.importorskip("papermill")
    out = tmp_path / "res"
    papermill.execute_notebook(
        str(NOTEBOOK), str(tmp_path / "out.ipynb"), kernel_name="dropinf", progress_bar=False,
        parameters=dict(out_dir=str(out), config=dict(packages=["json"], seq_len=16, n_pretrain=48,
                        n_train=32, n_test=6, pretrain_epochs=1, epochs=1, ratios=[16, 64],
                        methods=["dropout", "dropout_factored", "sjlt", "dropout_sjlt"],
                        removal_methods=["identity", "dropout"], n_mask_seeds=2,
                        n_retrain_seeds=2, n_targets=2, top_k=4, timing_repeats=1, n_pilot=8)))
    summ = json.loads((out / "summary.json").read_text())
    for key in ("agreement_16x", "agreement_64x", "removal_effect", "coherence", "conclusion"):
        assert summ[key], key
    assert set(summ["agreement_16x"]) == {"dropout", "dropout_factored", "sjlt",
                                          "dropout_sjlt"}
    assert summ["agreement_16x"]["sjlt"]["std"] is not None
    assert set(summ["removal_effect"]) == {"identity", "dropout", "random"}
    assert summ["provenance"]["licence"]
    for name in ("agreement_vs_ratio", "removal_effect", "coherence"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 0
    for name in ("agreement", "agreement_draws", "removal", "cost", "coherence_by_layer"):
        assert (out / "tables" / f"{name}.csv").exists()
    assert "compress_ms" not in json.dumps(summ)  # timings stay in the tables
