"""The method registry: matched dimensions against an independent re-derivation, every method
built at that dimension, PCA fits shared across k, one label and colour per method."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgb

from dropinf import PCA, Chain, Dropout, Identity, Task
from dropinf.compressors import Layout
from dropinf.losses import cross_entropy
from dropinf.study.experiments import methods as M
from dropinf.study.models import mlp


@pytest.fixture(scope="module")
def task():
    return Task(mlp([64, 8, 10], seed=0), cross_entropy)


def test_match_at_a_ratio_is_closest_to_the_target(task):
    d = task.dim
    # independent re-derivation: each layer keeps max(1, round((1-p) n)) units per side
    specs = Layout.of(task).factored
    p = np.arange(10_000) / 10_000
    grid = sum(np.maximum(1, np.round((1 - p) * s.n_out))
               * np.maximum(1, np.round((1 - p) * s.n_in_aug)) for s in specs)
    for ratio in (1.0, 2.0, 4.0, 16.0, 64.0):
        m = M.match(task, ratio=ratio)
        best = np.min(np.abs(np.log(grid / (d / ratio))))
        assert abs(math.log(m.k / (d / ratio))) == pytest.approx(best, abs=1e-12)
        assert m.p == np.flatnonzero(grid == m.k)[0] / 10_000  # the smallest rate giving k
        assert (m.d, m.ratio, m.p_flat) == (d, d / m.k, 1 - m.k / d)
    assert M.match(task, ratio=1.0) == M.Match(0.0, d, d)


def test_match_at_a_rate_is_factored_dropouts_dimension(task):
    specs = Layout.of(task).factored
    for p in (0.3, 0.75, 0.97):
        want = sum(max(1, round((1 - p) * s.n_out)) * max(1, round((1 - p) * s.n_in_aug))
                   for s in specs)
        assert M.match(task, p=p) == M.Match(p, want, task.dim)
        assert M.match(Layout.of(task), p=p).k == want
    for kw in ({}, {"ratio": 2.0, "p": 0.5}):
        with pytest.raises(ValueError, match="ratio or p"):
            M.match(task, **kw)
    with pytest.raises(ValueError, match="ratio=0.5"):
        M.match(task, ratio=0.5)


def test_every_method_is_built_at_k(task):
    G = torch.randn(400, task.dim, generator=torch.Generator().manual_seed(0))
    for ratio in (2.0, 16.0):  # k = 312 and 38 of d = 610
        m = M.match(task, ratio=ratio)
        for method in M.compared("mask", "projection", "fitted", "composed"):
            comp = M.ready(M.build(method, m, seed=1, sjlt_c=4, pca_n_fit=400), task, m.k, G,
                           pilot=_pilot(task))
            assert comp.dim == m.k, method
            assert comp.fingerprint == M.ready(M.build(method, m, 1, sjlt_c=4, pca_n_fit=400),
                                               task, m.k, G, pilot=_pilot(task)
                                               ).fingerprint, method  # the seed
        sj = M.build("sjlt", m, seed=1, sjlt_c=4)
        assert sj.c == M.sjlt_nonzeros(m.k, 4) and m.k % sj.c == 0
        chain = M.build("dropout_sjlt", m, seed=1, oversample=3).bind(task)
        assert chain.first.dim == min(m.d, 3 * m.k) and chain.dim == m.k
    flat = M.build("dropout", m, seed=0)
    assert isinstance(flat, Dropout) and not flat.factored and flat.p == pytest.approx(m.p_flat)
    assert isinstance(M.build(M.IDENTITY, m, 0), Identity)
    assert M.sjlt_nonzeros(12, 5) == 4 and M.sjlt_nonzeros(7, 4) == 1
    with pytest.raises(ValueError, match="method='nope'"):
        M.build("nope", m, 0)
    with pytest.raises(ValueError, match="'random' .*not a compressor"):
        M.build("random", m, 0)
    with pytest.raises(RuntimeError, match="not the matched k"):
        M.ready(M.build("sjlt", m, 0), task, m.k + 1)
    with pytest.raises(ValueError, match="G_train"):
        M.ready(M.build("pca", m, 0), task, m.k)


def test_memory_needs_come_from_the_library(task):
    m = M.match(task, ratio=16.0)
    for name in M.compared("mask", "projection", "fitted", "composed"):
        s = M.spec(name)
        comp = M.ready(s.compressor(m, 0, pca_n_fit=64), task, m.k,
                       torch.randn(64, task.dim, generator=torch.Generator().manual_seed(0)),
                       pilot=_pilot(task))
        if s.factored:
            assert s.stored_bytes(m) == s.need_bytes(m) == 0
            continue
        assert s.stored_bytes(m, pca_n_fit=64) == comp.map_bytes, name
        assert s.need_bytes(m, pca_n_fit=64) >= s.stored_bytes(m, pca_n_fit=64), name
    assert M.spec("pca").need_bytes(m, pca_n_fit=64) == 4 * m.k * m.d + PCA(
        m.k, n_fit=64).fit_bytes(m.d)


def test_families_group_the_table():
    assert M.compared() == ("dropout", "dropout_factored", "gaussian", "gaussian_factored",
                            "sjlt", "pca", "dropout_imp", "dropout_factored_imp")
    assert M.compared("composed") == ("dropout_sjlt", "dropout_imp_sjlt")
    assert M.compressors() == (*M.compared(), *M.compared("composed"))
    assert M.in_family(["sjlt", "dropout", "pca"], "mask", "fitted") == ("dropout", "pca")
    assert M.family("dropout_sjlt") == "composed" and M.family("identity") == "reference"
    assert [n for n, s in M.METHODS.items() if s.pilot] == ["dropout_imp",
                                                            "dropout_factored_imp",
                                                            "dropout_imp_sjlt"]
    assert all(s.compresses == (s.family not in ("reference", "baseline"))
               for s in M.METHODS.values() if s.name != M.IDENTITY)
    with pytest.raises(ValueError, match="family='nope'"):
        M.MethodSpec("x", "x", "k", "o", "nope")


def test_pca_fits_are_shared_across_k_and_refused_beyond_the_span():
    G = torch.randn(120, 50, generator=torch.Generator().manual_seed(1))
    cache: dict = {}
    for k in (3, 37, 40):
        shared = M.fit_pca(PCA(k, n_fit=40, seed=5), G, cache)
        fresh = PCA(k, n_fit=40, seed=5).fit(G)
        assert torch.equal(shared.components, fresh.components), k
    assert len(cache) == 1
    assert M.fit_pca(PCA(41, n_fit=40, seed=5), G, cache) is None  # 40 rows span 40 directions
    assert M.fit_pca(PCA(51, n_fit=200, seed=5), G) is None  # d = 50


def test_one_label_colour_and_marker_per_method():
    specs = [s for s in M.METHODS.values() if s.family != "baseline"]
    assert all(M.METHODS[s.name] is s for s in M.METHODS.values())
    rgb = [to_rgb(s.color) for s in M.METHODS.values()]
    assert len(set(rgb)) == len(rgb)  # no two methods, references or baselines share a colour
    assert len({s.label for s in M.METHODS.values()}) == len(M.METHODS)
    assert len({s.marker for s in specs}) == len(specs)


def _pilot(task, n: int = 32, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 64, generator=g), torch.randint(10, (n,), generator=g)
    return [(x[:20], y[:20]), (x[20:], y[20:])]


def test_ready_fits_importance_on_a_pilot(task):
    """The three importance entries: fitted on the pilot by ``ready`` (from batches, or from
    their per-sample gradients computed once: the same probabilities), bound, at the matched
    k; the chain's first stage is the fitted mask, at ``oversample * k``."""
    from dropinf.persample import PerSampleGrads

    pilot = _pilot(task)
    with task.evaluating(), PerSampleGrads(task) as psg:
        grads = [psg(b)[0] for b in pilot]
    for ratio in (2.0, 16.0):
        m = M.match(task, ratio=ratio)
        for name in ("dropout_imp", "dropout_factored_imp", "dropout_imp_sjlt"):
            comp = M.ready(M.build(name, m, seed=1), task, m.k, pilot=pilot)
            imp = comp.first if isinstance(comp, Chain) else comp
            assert isinstance(imp, Dropout) and imp.importance and imp.probs is not None, name
            assert comp.layout is not None and comp.dim == m.k, name
            if isinstance(comp, Chain):
                assert imp.dim == min(m.d, 4 * m.k) and imp.layout is not None
            # independent fit: Dropout.fit on the same batches, and fit_grads on the gradients
            want = M.build(name, m, seed=1)
            want_imp = want.first if isinstance(want, Chain) else want
            want_imp.fit(task, pilot)
            again = M.ready(M.build(name, m, seed=1), task, m.k, pilot=grads)
            again_imp = again.first if isinstance(again, Chain) else again
            assert imp.probs.keys() == want_imp.probs.keys() == again_imp.probs.keys()
            for key, pi in imp.probs.items():
                torch.testing.assert_close(pi, want_imp.probs[key], rtol=1e-12, atol=0)
                torch.testing.assert_close(pi, again_imp.probs[key], rtol=1e-10, atol=1e-15)
            assert comp.fingerprint == again.fingerprint, name  # same draw, same fit


def test_ready_refuses_importance_without_a_pilot(task):
    m = M.match(task, ratio=16.0)
    for name in ("dropout_imp", "dropout_factored_imp", "dropout_imp_sjlt"):
        comp = M.build(name, m, seed=0)
        with pytest.raises(ValueError, match="pass pilot"):
            M.ready(comp, task, m.k)
        assert comp.layout is None  # nothing bound by the refused call
        with pytest.raises(TypeError, match="BatchGrads"):  # a Layout cannot run batches
            M.ready(comp, Layout.of(task), m.k, pilot=_pilot(task))
    # a method that needs no pilot ignores one
    assert M.ready(M.build("dropout", m, 0), task, m.k, pilot=_pilot(task)).dim == m.k
