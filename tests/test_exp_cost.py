"""Notebook 03 (cost): the ladder, matched k, stored-map counts, the compression step, slopes,
ratios, the summary's independence from timings, and a tiny run of the notebook."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import dropinf
from dropinf.persample import PerSampleGrads
from dropinf.study.experiments import cost
from dropinf.study.experiments.measure import compression_step
from dropinf.study.experiments.methods import compared, fit_pilot, match, spec

TINY = dict(
    mlp_widths=[[8, 16, 4], [16, 32, 4]],
    gpt2_shapes=[[1, 16, 2]],
    tokens=8,
    batch_size=8,
    pca_min_fit=8,
    warmup=0,
    repeats=1,
    min_time=0.0,
    n_train=8,
    n_test=4,
    pipeline_max_k=64,
)


def tiny(**kw) -> cost.Config:
    return cost.Config.for_profile("cpu-quick", **{**TINY, **kw})


def side(n: int, p: float) -> int:
    return max(1, round((1 - p) * n))


def layers(model: nn.Module, task: dropinf.Task) -> list[tuple[int, int, bool]]:
    """(n_in, n_out, has_bias) of every selected linear layer, from the modules themselves."""
    chosen = set(task.param_names)
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and f"{name}.weight" in chosen:
            out.append((m.in_features, m.out_features, m.bias is not None))
        elif type(m).__name__ == "Conv1D" and f"{name}.weight" in chosen:
            n_in, n_out = m.weight.shape  # HF Conv1D stores (in, out)
            out.append((n_in, n_out, m.bias is not None))
    return out


# --------------------------------------------------------------------------- config


def test_profiles_and_validation():
    cfg = cost.Config.for_profile("cpu-quick")
    assert cfg.methods == compared() and cfg.threads == 1
    gpu = cost.Config.for_profile("gpu")
    assert gpu.device == "cuda" and "large" in gpu.gpt2_shapes
    c = tiny(methods=["dropout_factored", "sjlt"])
    assert c.mlp_widths == ((8, 16, 4), (16, 32, 4)) and c.gpt2_shapes == ((1, 16, 2),)
    assert c.methods == ("dropout_factored", "sjlt")
    with pytest.raises(TypeError, match="unknown Config field"):
        cost.Config.for_profile("cpu-quick", widths=[[4, 2]])
    with pytest.raises(ValueError, match="profile"):
        cost.Config.for_profile("tpu")
    bad = [
        dict(p=1.0),
        dict(p=0),
        dict(methods=["sjlt", "pca"]),  # no reference
        dict(methods=["dropout_factored", "dropout-flat"]),  # the old name
        dict(gpt2_shapes=[[1, 10, 3]]),  # heads do not divide the width
        dict(gpt2_shapes=["huge"]),
        dict(mlp_widths=[[8]]),
        dict(mlp_widths=[[8, 0, 4]]),
        dict(mlp_widths=[], gpt2_shapes=[]),
        dict(gpt2_shapes=["nano"], tokens=512),  # beyond the rung's context of 256
        dict(batch_size=0),
        dict(damping=0.0),
        dict(device="tpu"),
    ]
    for kw in bad:
        with pytest.raises(ValueError):
            tiny(**kw)


# --------------------------------------------------------------------------- ladder and k


def test_ladder_builds_the_stated_sizes():
    cfg = tiny(gpt2_shapes=["nano", [2, 16, 4]], vocab_size=64, n_positions=32)
    sizes = cost.ladder(cfg)
    assert [s.family for s in sizes] == ["mlp", "mlp", "gpt2", "gpt2"]
    for s in sizes:
        b = cost.build(s, cfg, seed=0)
        model = b.task.model
        assert sum(p.numel() for p in model.parameters()) == s.params
        # d: the selected linear layers' weights and biases, counted from the modules
        d = sum(i * o + o * bias for i, o, bias in layers(model, b.task))
        assert b.task.dim == s.dim == d
        if s.family == "mlp":
            assert s.dim == s.params
        else:  # only the blocks' Conv1D layers: no embedding, no layer norm
            assert all(".h." in n and ("c_" in n) for n in b.task.param_names)
    nano = dropinf.study.models.GPT2_LADDER["nano"]
    assert sizes[2].params == nano.num_params and sizes[2].name == "gpt2-nano"


def test_matched_k_is_equal_across_methods():
    cfg = tiny()
    for s in cost.ladder(cfg):
        b = cost.build(s, cfg, seed=0)
        m = match(b.task, p=cfg.p)
        k = m.k
        want = sum(side(o, cfg.p) * side(i + bias, cfg.p)
                   for i, o, bias in layers(b.task.model, b.task))
        assert k == want
        fit = b.batches(cost.pca_fit_rows(k, cfg), 5)
        pilot = b.batches(cfg.n_pilot, 6)
        for method in compared():
            comp = cost.make_compressor(method, m, cfg)
            if method == "pca":
                cost.fit(comp, b.task, fit)
            fit_pilot(comp, b.task, pilot if spec(method).pilot else None)
            assert comp.bind(b.task).dim == k, method


def test_map_and_need_bytes_against_an_independent_count():
    cfg = tiny()
    for s in cost.ladder(cfg):
        b = cost.build(s, cfg, seed=0)
        m = match(b.task, p=cfg.p)
        d, k = m.d, m.k
        shapes = layers(b.task.model, b.task)
        factored = 4 * sum(side(o, cfg.p) * o + side(i + bias, cfg.p) * (i + bias)
                           for i, o, bias in shapes)
        # importance dropout stores its float64 keep probabilities: one per coordinate (flat),
        # one per input (bias unit included) and output unit of each layer (factored)
        units = 8 * sum(o + i + bias for i, o, bias in shapes)
        want = {"dropout_factored": 0, "dropout": 0, "sjlt": 0, "gaussian": 4 * k * d,
                "pca": 4 * k * d, "gaussian_factored": factored, "dropout_imp": 8 * d,
                "dropout_factored_imp": units}
        fit = b.batches(cost.pca_fit_rows(k, cfg), 5)
        for method, nbytes in want.items():
            comp = cost.make_compressor(method, m, cfg)
            if method == "pca":
                cost.fit(comp, b.task, fit)
            fit_pilot(comp, b.task, b.batches(cfg.n_pilot, 6) if spec(method).pilot else None)
            assert comp.bind(b.task).map_bytes == nbytes, method
            if method not in ("dropout_factored", "gaussian_factored", "dropout_factored_imp"):
                assert spec(method).stored_bytes(m, **cost.options(m, cfg)) == nbytes, method
        n = cost.pca_fit_rows(k, cfg)

        def need(method, sjlt_c=1, m=m, n=n):
            return spec(method).need_bytes(m, sjlt_c=sjlt_c, pca_n_fit=n)

        assert need("gaussian") == 4 * k * d
        assert need("pca") == 4 * k * d + 12 * n * d + 8 * min(n, d) * d
        c = 2 if k % 2 == 0 else 1  # SJLT's nonzeros per column must divide k
        assert need("sjlt", sjlt_c=2) == c * (8 + 4) * d
        assert need("dropout") == 8 * k
        assert need("dropout_factored") == need("gaussian_factored") == 0


def test_compression_step_equals_the_library_path():
    """From fully captured factors, the step gives what the reducers inside the hooks give."""
    cfg = tiny()
    for s in cost.ladder(cfg):
        b = cost.build(s, cfg, seed=0)
        batch = b.batches(4, 1)[0]  # one batch of 4
        m = match(b.task, p=cfg.p)
        k = m.k
        with PerSampleGrads(b.task) as psg:
            bg = psg(batch)[0]
        for method in ("dropout_factored", "gaussian_factored", "dropout", "sjlt"):
            comp = cost.make_compressor(method, m, cfg).bind(b.task)
            z = compression_step(comp, bg)()
            with PerSampleGrads(b.task, comp) as psg:
                ref = comp.compress(psg(batch)[0])
            assert z.shape == (4, k)
            torch.testing.assert_close(z, ref, rtol=1e-4, atol=1e-6)
        # and factored dropout is exact: the kept coordinates of the full gradient, scaled
        comp = cost.make_compressor("dropout_factored", m, cfg).bind(b.task)
        idx, scale = comp.kept_indices()
        torch.testing.assert_close(compression_step(comp, bg)(), bg.flat()[:, idx] * scale,
                                   rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- measurement


def test_measure_size_rows():
    cfg = tiny(memory_budget_gb=1.0)
    size = cost.ladder(cfg)[0]
    before = torch.get_num_threads()
    rows = pd.DataFrame(cost.measure_size(size, cfg))
    assert torch.get_num_threads() == before and (rows["threads"] == cfg.threads).all()
    assert list(rows["method"]) == list(compared())
    assert (rows["status"] == "ok").all(), rows["status"].tolist()
    assert rows["k"].nunique() == 1 and rows["d"].iloc[0] == size.dim
    assert (rows["compress_ms"] > 0).all() and (rows["calls"] >= 1).all()
    assert (rows["pipeline_status"] == "ok").all() and (rows["pipeline_s"] > 0).all()
    fitted = rows["method"].map(lambda m: spec(m).needs_fit or spec(m).pilot)
    assert fitted.sum() == 3 and (rows.loc[fitted, "fit_s"] > 0).all()  # PCA, 2 importance
    assert (rows.loc[~fitted, "fit_s"] == 0).all()
    other = rows["other_pct"].dropna()
    assert ((other >= 0) & (other <= 100)).all()


def test_does_not_fit_and_pipeline_cap():
    # a budget between what SJLT holds and the dense Gaussian's map, for the 8-16-4 MLP
    cfg = tiny(pipeline_max_k=1)
    size = cost.ladder(cfg)[0]
    k, d = match(cost.build(size, cfg, 0).task, p=cfg.p).k, size.dim
    m = match(cost.build(size, cfg, 0).task, p=cfg.p)
    opts = cost.options(m, cfg)
    low, high = (spec(x).need_bytes(m, **opts) for x in ("sjlt", "gaussian"))
    assert low < high <= spec("pca").need_bytes(m, **opts)
    cfg = tiny(pipeline_max_k=1, memory_budget_gb=(low + high) / 2 / cost.GB)
    rows = pd.DataFrame(cost.measure_size(size, cfg)).set_index("method")
    for method in ("gaussian", "pca"):
        r = rows.loc[method]
        assert r["status"] == "does not fit" and np.isnan(r["compress_ms"])
        assert r["need_bytes"] == spec(method).need_bytes(m, **opts)
        assert r["map_bytes"] == 4 * k * d  # what it would have to store
    for method in ("dropout_factored", "dropout", "gaussian_factored", "sjlt"):
        assert rows.loc[method, "status"] == "ok"
        assert rows.loc[method, "pipeline_status"].startswith("k > pipeline_max_k")
        assert np.isnan(rows.loc[method, "pipeline_s"])


# --------------------------------------------------------------------------- analysis


def test_fit_slope_recovers_a_power_law():
    x = np.logspace(3, 7, 9)
    s, c = cost.fit_slope(x, 3.0 * x**1.7)
    assert s == pytest.approx(1.7, abs=1e-9) and c == pytest.approx(math.log10(3.0), abs=1e-9)
    # multiplicative noise: the least-squares slope is within 4 standard errors
    sigma = 0.1
    rng = np.random.default_rng(0)
    y = 2.0 * x**0.8 * np.exp(rng.normal(0, sigma, len(x)))
    lx = np.log10(x)
    se = sigma / math.log(10) / math.sqrt(((lx - lx.mean()) ** 2).sum())
    assert abs(cost.fit_slope(x, y)[0] - 0.8) < 4 * se
    # zeros, NaNs and single points are left out; fewer than two points give NaN
    assert cost.fit_slope([10, 100, 1000], [0, 5, 50])[0] == pytest.approx(1.0)
    assert math.isnan(cost.fit_slope([10, 100], [np.nan, 5])[0])
    assert math.isnan(cost.fit_slope([10, 10], [1, 2])[0])


def synthetic(seed: int = 0) -> pd.DataFrame:
    """A measurement table by hand: two sizes, dropout, SJLT, a dense Gaussian that fits only at
    the small size, random times."""
    rng = np.random.default_rng(seed)
    rows = []
    for size, d, k in (("a", 1000, 10), ("b", 100_000, 1000)):
        for method in ("dropout_factored", "sjlt", "gaussian"):
            fits = not (method == "gaussian" and size == "b")
            rows.append({
                "family": "mlp", "size": size, "params": d, "d": d, "k": k,
                "compression": d / k, "method": method,
                "status": "ok" if fits else "does not fit",
                "map_bytes": 4 * k * d if method == "gaussian" else 0,
                "need_bytes": 4 * k * d if method == "gaussian" else 0,
                "compress_ms": rng.uniform(1, 10) if fits else np.nan,
                "peak_mb": rng.uniform(1, 10) if fits else np.nan,
                "pipeline_status": "ok" if fits and size == "a" else "k > pipeline_max_k=100",
                "pipeline_s": rng.uniform(1, 10) if fits and size == "a" else np.nan,
                "other_pct": rng.uniform(0, 100),
            })
    return pd.DataFrame(rows).reindex(columns=list(cost.COLUMNS))


def test_ratios_at_the_largest_common_size():
    df = synthetic()
    # dropout's peak at "a" below the resolution: the dense Gaussian (only at "a") gets no ratio
    df.loc[(df["size"] == "a") & (df["method"] == "dropout_factored"), "peak_mb"] = 0.0
    r = cost.ratios(df).set_index(["metric", "method"])
    val = df.set_index(["size", "method"])
    # SJLT ran at both sizes: compared at the largest
    got = r.loc[("compress_ms", "sjlt")]
    assert got["size"] == "b"
    assert got["ratio"] == pytest.approx(val.loc[("b", "sjlt"), "compress_ms"]
                                         / val.loc[("b", "dropout_factored"), "compress_ms"])
    # the dense Gaussian did not fit at "b": its ratio is at "a"
    got = r.loc[("compress_ms", "gaussian")]
    assert got["size"] == "a"
    assert got["ratio"] == pytest.approx(val.loc[("a", "gaussian"), "compress_ms"]
                                         / val.loc[("a", "dropout_factored"), "compress_ms"])
    assert r.loc[("pipeline_s", "sjlt"), "size"] == "a"
    assert r.loc[("map_bytes", "gaussian"), "ratio"] == math.inf
    assert r.loc[("map_bytes", "sjlt"), "ratio"] == 1.0  # both store nothing
    assert r.loc[("compress_ms", "dropout_factored"), "ratio"] == 1.0
    assert math.isnan(r.loc[("peak_mb", "gaussian"), "ratio"])
    assert r.loc[("peak_mb", "sjlt"), "size"] == "b"


def test_summary_holds_no_measurement():
    cfg = tiny()
    a, b = synthetic(0), synthetic(1)  # same shapes and statuses, other times and memory
    sa, sb = cost.numbers(cfg, a), cost.numbers(cfg, b)
    assert sa == sb
    json.dumps(sa)  # serialisable as is
    assert sa["map_bytes"]["b"]["gaussian"] is None
    assert sa["does_not_fit"] == [{"size": "b", "method": "gaussian",
                                   "need_bytes": 4 * 1000 * 100_000}]
    assert sa["map_slopes"]["mlp"]["sjlt"] is None  # nothing stored: no slope
    assert sa["pipeline_sizes"] == ["a"]  # k <= pipeline_max_k = 64
    # the conclusion quotes the measured ratio at the largest size, and the map that did not fit
    v = a.set_index(["size", "method"])["compress_ms"]
    text = cost.conclude(a, cost.ratios(a))
    assert f"SJLT {v['b', 'sjlt'] / v['b', 'dropout_factored']:.3g}x" in text
    assert "Gaussian (dense) would need 381.5 MB" in text  # 4 k d = 4e8 B at "b"


# --------------------------------------------------------------------------- notebook


def test_notebook_runs_tiny(tmp_path):
    papermill = pytest.importorskip("papermill")
    from dropinf.study.results import repo_root

    nb = repo_root() / "notebooks" / "03_cost.ipynb"
    out = tmp_path / "03_cost"
    out.mkdir()
    papermill.execute_notebook(
        str(nb), str(out / "03_cost.ipynb"), kernel_name="dropinf", progress_bar=False,
        cwd=str(nb.parent), parameters={"out_dir": str(out), "config": TINY},
    )
    for f in ("figures/cost_vs_size.png", "figures/cost_vs_size.pdf", "tables/cost.csv",
              "tables/cost_ratios.csv", "tables/slopes.csv", "manifest.json"):
        assert (out / f).exists(), f
    summary = json.loads((out / "summary.json").read_text())
    for key in ("ladder", "map_bytes", "does_not_fit", "map_slopes", "pipeline_sizes",
                "timings_file", "ratios_file"):
        assert key in summary
    assert summary["notebook"] == "03_cost" and len(summary["ladder"]) == 3
    table = pd.read_csv(out / "tables" / "cost.csv")
    assert set(table["method"]) == set(compared())
