"""Compressors: structure against the exact gradients, statistics against the variances of
docs/definitions.md."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import assert_close
from torch import nn

import dropinf as di
from dropinf import losses, theory
from dropinf.persample import PerSampleGrads
from dropinf.study import models


class Mixed(nn.Module):
    """Linear with and without bias, grouped Conv2d, LayerNorm (a parameter outside layers)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, groups=2)
        self.norm = nn.LayerNorm(4)
        self.fc1 = nn.Linear(4, 6, bias=False)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        h = self.conv(x).mean((2, 3))
        return self.fc2(torch.tanh(self.fc1(self.norm(h))))


def mixed_case(n=6):
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(n, 2, 5, 5, generator=g), torch.randint(0, 3, (n,), generator=g))
    return di.Task(Mixed().eval(), losses.cross_entropy), [batch]


def gpt2_case(n=4):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (n, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    m = models.gpt2(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=16).eval()
    return di.Task(m, losses.causal_lm), [{"input_ids": ids * mask, "attention_mask": mask}]


CASES = {"mixed": mixed_case, "gpt2": gpt2_case}


def grads(task, batches, comp):
    return di.gradients(task, batches, comp, progress=False).data


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    torch.manual_seed(0)
    task, batches = CASES[request.param]()
    return task, batches, grads(task, batches, di.Identity())


# ----------------------------------------------------------------------------- structure


@pytest.mark.parametrize("factored", [False, True])
@pytest.mark.parametrize("mask", ["fixed", "bernoulli"])
@pytest.mark.parametrize("p", [0.5, 0.8])
def test_dropout_keeps_scaled_coordinates_of_the_exact_gradient(case, factored, mask, p):
    task, batches, G = case
    comp = di.Dropout(p, factored=factored, mask=mask, seed=3)
    Z = grads(task, batches, comp)
    idx, scale = comp.kept_indices()
    assert Z.shape[1] == comp.dim == len(idx) == len(set(idx.tolist()))
    assert_close(Z, G[:, idx] * scale)
    if mask == "fixed" and not factored:
        assert comp.dim == round((1 - p) * task.dim)
        assert torch.allclose(scale, torch.tensor(math.sqrt(task.dim / comp.dim)))


@pytest.mark.parametrize("mask", ["fixed", "bernoulli"])
def test_factored_mask_is_a_kronecker_product(case, mask):
    task, _, _ = case
    comp = di.Dropout(0.6, factored=True, mask=mask, seed=1).bind(task)
    layout = {q.name: q for q in task.params}
    idx, _ = comp.kept_indices()
    kept = set(idx.tolist())
    assert comp.layout.factored, "the case must have factored layers"
    for s in comp.layout.factored:
        s_out, s_in, scale = comp.units[s.module]
        w = layout[s.weight]
        rows = torch.arange(s.n_out).repeat_interleave(s.n_in)
        cols = torch.arange(s.n_in).repeat(s.n_out)
        if s.transposed:
            rows, cols = (
                torch.arange(s.n_out).repeat(s.n_in),
                torch.arange(s.n_in).repeat_interleave(s.n_out),
            )
        mask_w = torch.tensor([w.offset + j in kept for j in range(w.numel)])
        expect = torch.isin(rows, s_out) & torch.isin(cols, s_in)
        assert torch.equal(mask_w, expect)  # weight mask = S_out x S_in
        if s.bias is not None:
            b = layout[s.bias]
            mask_b = torch.tensor([b.offset + j in kept for j in range(b.numel)])
            bias_unit = bool((s_in == s.n_in).any())
            assert torch.equal(mask_b, torch.isin(torch.arange(s.n_out), s_out) & bias_unit)
        if mask == "fixed":
            k_out, k_in = len(s_out), len(s_in)
            assert k_out == max(1, round(0.4 * s.n_out)) and k_in == max(1, round(0.4 * s.n_in_aug))
            assert scale == pytest.approx(math.sqrt(s.n_out / k_out * s.n_in_aug / k_in))


def test_zero_rate_dropout_is_the_identity(case):
    task, batches, G = case
    assert torch.equal(grads(task, batches, di.Dropout(0.0)), G)
    Z = grads(task, batches, di.Dropout(0.0, factored=True))
    assert Z.shape == G.shape  # a permutation of the coordinates
    assert_close(Z @ Z.T, G @ G.T)


def test_factored_gaussian_is_logra_on_each_layer(case):
    """(P_out delta)(P_in x)^T from the factors equals P_out G P_in^T from the exact gradient."""
    task, batches, G = case
    comp = di.Gaussian(factored=True, p=0.5, seed=2)
    Z = grads(task, batches, comp)
    layout = {q.name: q for q in task.params}
    parts = []
    for s in comp.layout.factored:
        w = layout[s.weight]
        Gw = G[:, w.offset : w.stop]
        Gw = (
            Gw.view(-1, s.n_in, s.n_out).transpose(1, 2)
            if s.transposed
            else Gw.view(-1, s.n_out, s.n_in)
        )
        if s.bias is not None:
            b = layout[s.bias]
            Gw = torch.cat([Gw, G[:, b.offset : b.stop, None]], 2)
        p_out, p_in = comp.proj[s.module]
        parts.append((p_out @ Gw @ p_in.T).flatten(1))
    rest = comp.layout.rest()
    cols = torch.cat([torch.arange(q.offset, q.stop) for q in rest])
    P = torch.cat([comp.flat.blocks[q.name] for q in rest], 1)
    parts.append(G[:, cols] @ P.T)
    assert_close(Z, torch.cat(parts, 1))
    assert comp.dim == di.Dropout(0.5, factored=True).bind(task).dim  # matched dimension


def test_dense_gaussian_sjlt_and_pca_against_explicit_matrices(case):
    task, batches, G = case
    d = task.dim
    gauss = di.Gaussian(k=16, seed=4).bind(task)
    P = torch.cat([gauss.flat.blocks[q.name] for q in task.params], 1)
    assert P.shape == (16, d)
    assert_close(grads(task, batches, gauss), G @ P.T)

    sjlt = di.SJLT(k=16, c=4, seed=4).bind(task)
    S = torch.zeros(16, d)
    for q in task.params:
        rows, signs = sjlt.hash[q.name]
        S.index_put_(
            (rows, torch.arange(q.offset, q.stop).repeat_interleave(4)), signs, accumulate=True
        )
    assert torch.equal((S != 0).sum(0), torch.full((d,), 4))  # c distinct rows per column
    assert_close(grads(task, batches, sjlt), G @ S.T)

    pca = di.PCA(k=3).fit(G)
    _, _, vt = np.linalg.svd(G.double().numpy(), full_matrices=False)
    Z = grads(task, batches, pca)
    assert_close(Z.abs(), torch.as_tensor(G.double().numpy() @ vt[:3].T).abs().float())
    full = di.PCA(k=len(G)).fit(G)  # n directions span the n gradients: dot products exact
    Zf = grads(task, batches, full)
    assert_close(Zf @ Zf.T, G @ G.T, rtol=1e-3)


# ----------------------------------------------------------------------------- statistics


@pytest.fixture(scope="module")
def pair():
    """Two real per-sample gradients of an MLP on digits-sized inputs, and their BatchGrads."""
    torch.manual_seed(0)
    task = di.Task(models.mlp([8, 12, 4]).eval(), losses.cross_entropy)
    batch = (torch.randn(2, 8), torch.tensor([1, 3]))
    with PerSampleGrads(task) as psg:
        bg, _ = psg(batch)
    G = bg.flat().double()
    return task, bg, G[0].numpy(), G[1].numpy()


N_DRAWS = 3000
Z_MAX = 5.0  # |z| > 5 has probability < 1e-6 under the normal approximation


def estimates(task, bg, make) -> np.ndarray:
    out = np.empty(N_DRAWS)
    for s in range(N_DRAWS):
        z = make(s).bind(task).compress(bg).double()
        out[s] = float(z[0] @ z[1])
    return out


def check_mean_and_variance(x: np.ndarray, mean: float, var: float | None) -> None:
    """Sample mean within Z_MAX standard errors; sample variance within Z_MAX of its own sd."""
    n = len(x)
    v = var if var is not None else x.var(ddof=1)
    assert abs(x.mean() - mean) <= Z_MAX * math.sqrt(v / n), (x.mean(), mean, v)
    if var is not None:
        mu4 = np.mean((x - x.mean()) ** 4)  # fourth central moment, estimated
        sd = math.sqrt(theory.var_of_sample_variance(var, mu4, n))
        assert abs(x.var(ddof=1) - var) <= Z_MAX * sd, (x.var(ddof=1), var, sd)


@pytest.mark.parametrize("p", [0.3, 0.8])
def test_fixed_dropout_unbiased_with_the_finite_population_variance(pair, p):
    task, bg, a, b = pair
    x = estimates(task, bg, lambda s: di.Dropout(p, seed=s))
    k = round((1 - p) * len(a))
    check_mean_and_variance(x, a @ b, float(theory.fixed_variance(a, b, k)))


@pytest.mark.parametrize("p", [0.3, 0.8])
def test_bernoulli_dropout_unbiased_with_the_bernoulli_variance(pair, p):
    task, bg, a, b = pair
    x = estimates(task, bg, lambda s: di.Dropout(p, mask="bernoulli", seed=s))
    check_mean_and_variance(x, a @ b, float(theory.bernoulli_variance(a, b, 1 - p)))


@pytest.mark.parametrize("mask", ["fixed", "bernoulli"])
def test_factored_dropout_unbiased(pair, mask):
    task, bg, a, b = pair
    x = estimates(task, bg, lambda s: di.Dropout(0.6, factored=True, mask=mask, seed=s))
    check_mean_and_variance(x, a @ b, None)


def test_gaussian_and_sjlt_unbiased_with_their_variances(pair):
    task, bg, a, b = pair
    x = estimates(task, bg, lambda s: di.Gaussian(k=20, seed=s))
    check_mean_and_variance(x, a @ b, float(theory.gaussian_variance(a, b, 20)))
    x = estimates(task, bg, lambda s: di.SJLT(k=20, c=2, seed=s))
    check_mean_and_variance(x, a @ b, float(theory.sjlt_variance(a, b, 20, 2)))
    x = estimates(task, bg, lambda s: di.Gaussian(factored=True, p=0.5, seed=s))
    check_mean_and_variance(x, a @ b, None)


def test_gaussian_preserves_norms_within_the_jl_bound():
    """P(| |Pa|^2/|a|^2 - 1 | > eps) <= 2 exp(-k eps^2 / 8) for eps < 1: union over n vectors."""
    torch.manual_seed(0)
    task = di.Task(models.mlp([16, 32, 10]).eval(), losses.cross_entropy)
    batch = (torch.randn(40, 16), torch.randint(0, 10, (40,)))
    G = grads(task, [batch], di.Identity()).double()
    k, fail = 256, 1e-6
    eps = math.sqrt(8 * math.log(2 * len(G) / fail) / k)
    for seed in range(3):
        Z = grads(task, [batch], di.Gaussian(k=k, seed=seed)).double()
        ratio = Z.pow(2).sum(1) / G.pow(2).sum(1)
        assert (ratio - 1).abs().max() < eps, ((ratio - 1).abs().max(), eps)


# ----------------------------------------------------------------------------- contract


KINDS = {
    "dropout": lambda s: di.Dropout(0.7, seed=s),
    "dropout-factored": lambda s: di.Dropout(0.7, factored=True, seed=s),
    "dropout-bernoulli": lambda s: di.Dropout(0.7, mask="bernoulli", factored=True, seed=s),
    "gaussian": lambda s: di.Gaussian(k=32, seed=s),
    "gaussian-factored": lambda s: di.Gaussian(factored=True, p=0.7, seed=s),
    "sjlt": lambda s: di.SJLT(k=32, c=2, seed=s),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_same_seed_same_output_other_seed_other_output(case, kind):
    task, batches, _ = case
    a, b, c = (grads(task, batches, KINDS[kind](s)) for s in (0, 0, 1))
    assert torch.equal(a, b)
    assert a.shape == c.shape or "bernoulli" in kind
    assert a.shape != c.shape or not torch.allclose(a, c)
    assert KINDS[kind](0).fingerprint == KINDS[kind](0).fingerprint != KINDS[kind](1).fingerprint


def test_map_bytes(case):
    task, _, G = case
    d = task.dim
    assert di.Dropout(0.9, factored=True).bind(task).map_bytes == 0
    assert di.SJLT(k=16).bind(task).map_bytes == 0
    assert di.Gaussian(k=16).bind(task).map_bytes == 16 * d * 4
    assert di.PCA(k=2).fit(G).bind(task).map_bytes == 2 * d * 4
    fac = di.Gaussian(factored=True, p=0.5).bind(task)
    expect = sum(o.numel() + i.numel() for o, i in fac.proj.values()) * 4
    expect += sum(b.numel() for b in fac.flat.blocks.values()) * 4
    assert fac.map_bytes == expect


def test_registry_builds_every_kind():
    assert set(di.REGISTRY) == {"identity", "dropout", "gaussian", "sjlt", "pca", "chain"}
    assert isinstance(di.make("dropout", p=0.5, seed=1), di.Dropout)
    with pytest.raises(ValueError, match="unknown compressor kind 'dct'"):
        di.make("dct")


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: di.Dropout(1.0), r"p=1.0 is outside \[0, 1\)"),
        (lambda: di.Dropout(-0.1), r"p=-0.1 is outside"),
        (lambda: di.Dropout(0.5, mask="gauss"), "mask='gauss'"),
        (lambda: di.Gaussian(k=0), "k=0"),
        (lambda: di.Gaussian(k=4, factored=True), "takes p"),
        (lambda: di.SJLT(k=8, c=0), "c=0"),
        (lambda: di.SJLT(k=8, c=3), "divide k"),
        (lambda: di.SJLT(k=0), "k=0"),
    ],
)
def test_bad_arguments_are_named(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_sizes_checked_against_the_model(case):
    task, _, G = case
    with pytest.raises(ValueError, match=f"exceeds the gradient dimension d={task.dim}"):
        di.Gaussian(k=task.dim + 1).bind(task)
    with pytest.raises(ValueError, match="exceeds the gradient dimension"):
        di.SJLT(k=task.dim + 1).bind(task)
    with pytest.raises(ValueError, match="exceeds what"):
        di.PCA(k=len(G) + 1).fit(G)
    with pytest.raises(RuntimeError, match="fitted"):
        di.PCA(k=2).bind(task)
    with pytest.raises(ValueError, match="fitted on gradients of dimension 5"):
        di.PCA(k=2).fit(torch.randn(4, 5)).bind(task)
    comp = di.Dropout(0.5).bind(task)
    other = di.Task(models.mlp([3, 2]), losses.cross_entropy)
    with pytest.raises(ValueError, match="already bound"):
        comp.bind(other)


class Reusing(nn.Module):
    """A Conv2d with groups=1 (reduced at capture), a Linear called twice, and a Linear fed an
    input shared across the batch (shape (1, T, n), expanded per sample by the hooks)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3, 3)
        self.pos = nn.Linear(2, 3)
        self.head = nn.Linear(3, 4)

    def forward(self, x):
        h = self.conv(x).flatten(2).transpose(1, 2)  # (B, 25, 3)
        h = torch.tanh(self.fc(torch.tanh(self.fc(h))))
        h = h + self.pos(torch.linspace(-1, 1, 50).view(1, 25, 2))
        return self.head(h.mean(1))


@pytest.mark.parametrize(
    "make",
    [
        lambda: di.Dropout(0.5, factored=True, seed=1),
        lambda: di.Dropout(0.6, factored=True, mask="bernoulli", seed=2),
        lambda: di.Gaussian(factored=True, p=0.5, seed=3),
        lambda: di.Dropout(0.5, factored=True, seed=1, block=4),
        lambda: di.Dropout(0.6, factored=True, mask="bernoulli", seed=2, block=4),
        lambda: di.Dropout(0.5, factored=True, seed=1, block=16),
        lambda: di.Dropout(0.6, factored=True, mask="bernoulli", seed=2, block=16),
    ],
    ids=["dropout-fixed", "dropout-bernoulli", "gaussian", "fixed-block4", "bernoulli-block4",
         "fixed-block16", "bernoulli-block16"],
)
@pytest.mark.parametrize("model", ["reusing", "mixed", "gpt2"])
@pytest.mark.filterwarnings("ignore:block=")  # small layers are single blocks
def test_reduction_at_capture_equals_compressing_the_full_factors(make, model):
    if model == "reusing":
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(5, 2, 5, 5, generator=g), torch.randint(0, 4, (5,), generator=g)
        task, batches = di.Task(Reusing().eval(), losses.cross_entropy), [(x, y)]
    else:
        task, batches = CASES[model]()
    comp = make().bind(task)
    with PerSampleGrads(task) as psg:  # full factors, compressed afterwards
        full = comp.compress(psg(batches[0])[0])
    with PerSampleGrads(task, comp) as psg:
        bg = psg(batches[0])[0]
    expected = {"reusing": {"conv", "fc", "pos", "head"}, "mixed": {"fc1", "fc2"}}  # grouped conv
    assert set(psg.reducers) == expected.get(model, {s.module for s in comp.bound.factored})
    assert full.shape[1] > 0, "the draw kept nothing: nothing to compare"
    assert_close(comp.compress(bg), full)
    with pytest.raises(ValueError, match="compressed as it was captured"):
        bg.flat()
    if model == "gpt2" and getattr(comp, "block", 1) == 16 and comp.mask == "fixed":
        # runs of 16 kept units: the reducers copy slices
        assert any(r.outputs.sliced for r in comp.reducers(torch.device("cpu")).values())


def test_gradients_reduce_factors_at_capture(monkeypatch):
    """di.gradients hands the compressor to the capture hooks (the cheap path is the used one)."""
    task, batches = mixed_case()
    calls = []
    original = di.Dropout.reducers

    def counting(self, device):
        calls.append(device)
        return original(self, device)

    monkeypatch.setattr(di.Dropout, "reducers", counting)
    grads(task, batches, di.Dropout(0.5, factored=True))
    assert calls


def test_held_bytes_count_what_a_bound_flat_compressor_holds():
    task, _ = mixed_case()
    d = task.dim
    drop, sj = di.Dropout(0.7, seed=1).bind(task), di.SJLT(12, c=3, seed=1).bind(task)
    assert drop.held_bytes(d) == sum(8 * len(i) for i in drop.flat.index.values())
    assert sj.held_bytes(d) == sum(t.numel() * t.element_size() for pair in sj.hash.values()
                                   for t in pair)
    g = di.Gaussian(5, seed=1)
    assert g.held_bytes(d) == g.bind(task).map_bytes == 4 * 5 * d
    pca = di.PCA(3, n_fit=10)
    assert pca.held_bytes(d) == 4 * 3 * d + 12 * 10 * d + 8 * min(10, d) * d
    with pytest.raises(ValueError, match="flat unit masks"):
        di.Dropout(0.5, factored=True).held_bytes(d)


@pytest.mark.parametrize("make", [lambda: di.Dropout(0.5, factored=True, seed=1),
                                  lambda: di.Gaussian(factored=True, p=0.5, seed=1),
                                  lambda: di.SJLT(6, seed=1)])
def test_reducing_captured_factors_equals_reducing_while_capturing(case, make):
    """``bg.reduced(comp.reducers(...))`` of a full capture is what the hooks give."""
    task, batches, _ = case
    comp = make().bind(task)
    with PerSampleGrads(task) as psg:
        bg = psg(batches[0])[0]
    with PerSampleGrads(task, comp) as psg:
        want = comp.compress(psg(batches[0])[0])
    reducers = comp.reducers(task.device)
    reduced = bg.reduced(reducers)
    held = [getattr(b, "module", None) for b in bg.blocks]
    whole = {m for m in reducers if held.count(m) == 1}  # a grouped conv stays in its blocks
    assert {b.module for b in reduced.blocks if type(b).__name__ == "ReducedFactors"} == whole
    torch.testing.assert_close(comp.compress(reduced), want, rtol=1e-4, atol=1e-6)
