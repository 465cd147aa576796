"""Chain: a compressor applied to another's output, against each stage applied on its own."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import dropinf as di
from dropinf import losses, theory
from dropinf.blocks import BatchGrads, DenseGrad
from dropinf.compressors import Layout
from dropinf.task import ParamInfo


class Normed(nn.Module):
    """Two Linear layers (factored) around a LayerNorm (a parameter outside any layer)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(5, 8), nn.LayerNorm(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.norm(torch.tanh(self.fc1(x))))


def mlp():
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))


def case(build, dtype):
    torch.manual_seed(0)
    model = build().to(dtype).eval()
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(7, model[0].in_features if isinstance(model, nn.Sequential) else 5,
                         generator=g, dtype=dtype), torch.randint(0, 3, (7,), generator=g))
    return di.Task(model, losses.cross_entropy), [batch]


def grads(task, batches, comp):
    dtype = task.model.parameters().__next__().dtype
    return di.gradients(task, batches, comp, progress=False, dtype=dtype).data


def matrix(stage: di.Compressor, m: int) -> torch.Tensor:
    """(m, k) matrix of a flat stage bound to ``m`` inputs, from its outputs on identity rows."""
    stage.bind(Layout((ParamInfo(di.Chain.FLAT, (m,), 0),), ()))
    eye = torch.eye(m, dtype=torch.float64)
    return stage.compress(BatchGrads([ParamInfo(di.Chain.FLAT, (m,), 0)],
                                     [DenseGrad(di.Chain.FLAT, eye)], m))


def exact(f: di.Dropout, scale: torch.Tensor) -> torch.Tensor:
    """The float64 scales of ``f`` (kept_indices gives their float32 rounding)."""
    exact = [f.flat.scale] + [u[2] for u in getattr(f, "units", {}).values()]
    return torch.tensor([min(exact, key=lambda e: abs(e - v)) for v in scale.tolist()],
                        dtype=torch.float64)


STAGES = {
    "mlp, flat dropout then SJLT": (mlp, lambda: di.Dropout(0.6, seed=2),
                                    lambda: di.SJLT(16, c=2, seed=5)),
    "normed, factored dropout then Gaussian": (Normed, lambda: di.Dropout(0.5, factored=True,
                                                                          seed=3),
                                               lambda: di.Gaussian(9, seed=4)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(STAGES))
def test_chain_is_the_second_stage_of_the_first(name, dtype):
    build, first, second = STAGES[name]
    task, batches = case(build, dtype)
    G = grads(task, batches, di.Identity()).double()
    chain = di.Chain(first(), second())
    Z = grads(task, batches, chain)
    f = first().bind(task)  # the same arguments make the same draw
    idx, scale = f.kept_indices()
    expected = (G[:, idx] * exact(f, scale)) @ matrix(second(), f.dim).double()
    assert Z.shape == (G.shape[0], chain.dim) and chain.dim == second().k
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(Z.double(), expected, rtol=tol, atol=tol * expected.abs().max())
    assert (chain.reducers(torch.device("cpu")).keys()
            == f.reducers(torch.device("cpu")).keys())


def test_map_bytes_adds_both_stages():
    task, _ = case(mlp, torch.float32)
    chain = di.Chain(di.Gaussian(20, seed=1), di.Gaussian(5, seed=2)).bind(task)
    assert chain.map_bytes == 4 * 20 * task.dim + 4 * 5 * 20
    assert di.Chain(di.Dropout(0.5), di.SJLT(4)).bind(task).map_bytes == 0


def test_fingerprint_nests_both_stages_and_make_rebuilds_it():
    a = di.Chain(di.Dropout(0.5, seed=1), di.SJLT(8, seed=2))
    b = di.Chain(di.Dropout(0.5, seed=1), di.SJLT(8, seed=3))
    c = di.Chain(di.Dropout(0.6, seed=1), di.SJLT(8, seed=2))
    assert len({a.fingerprint, b.fingerprint, c.fingerprint}) == 3
    again = di.make("chain", **a.config())
    assert again.fingerprint == a.fingerprint
    task, batches = case(mlp, torch.float32)
    torch.testing.assert_close(grads(task, batches, again), grads(task, batches, a))


def test_store_refuses_another_chain(tmp_path):
    task, batches = case(mlp, torch.float32)
    a = di.Chain(di.Dropout(0.5, seed=1), di.SJLT(8, seed=2))
    di.gradients(task, batches, a, path=tmp_path / "g", progress=False)
    with pytest.raises(ValueError, match="compressor"):
        di.gradients(task, batches, di.Chain(di.Dropout(0.5, seed=1), di.SJLT(8, seed=3)),
                     path=tmp_path / "g", progress=False)


def test_refusals_name_the_argument():
    task, _ = case(mlp, torch.float32)
    with pytest.raises(ValueError, match="second=.*factored"):
        di.Chain(di.Dropout(0.5), di.Dropout(0.5, factored=True))
    with pytest.raises(ValueError, match="first=PCA.*not fitted"):
        di.Chain(di.PCA(3), di.SJLT(2))
    with pytest.raises(ValueError, match="second=PCA.*not fitted"):
        di.Chain(di.Dropout(0.5), di.PCA(3))
    with pytest.raises(ValueError, match="k=40 outputs, more than the 20"):
        di.Chain(di.Dropout(1 - 20 / task.dim), di.SJLT(40)).bind(task)
    with pytest.raises(TypeError, match="first="):
        di.Chain("dropout", di.SJLT(2))
    with pytest.raises(ValueError, match="already bound"):
        di.Chain(di.Dropout(0.5).bind(task), di.SJLT(2))


# ----------------------------------------------------------------------------- statistics


def pair_layout(d: int) -> tuple[Layout, BatchGrads]:
    """Two fixed vectors a, b of R^d as a two-sample batch of a two-parameter layout."""
    rng = np.random.default_rng(0)
    ab = torch.as_tensor(rng.standard_normal((2, d)) * rng.exponential(1.0, d))
    params = (ParamInfo("u", (d - 7,), 0), ParamInfo("v", (7,), d - 7))
    blocks = [DenseGrad("u", ab[:, : d - 7]), DenseGrad("v", ab[:, d - 7 :])]
    return Layout(params, ()), BatchGrads(list(params), blocks, 2)


@pytest.fixture
def one_thread():
    """Thousands of tiny matrix products: threads only wait for each other on them."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("proj", ["sjlt", "gaussian"])
def test_chain_dot_products_are_unbiased_with_the_closed_form_variance(proj, one_thread):
    d, m, k, n = 40, 20, 6, 3000
    layout, bg = pair_layout(d)
    a, b = (r.numpy() for r in bg.flat())
    st = theory.PairStats.of(a, b)
    second = {"sjlt": lambda s: di.SJLT(k, seed=s), "gaussian": lambda s: di.Gaussian(k, seed=s)}
    x = np.empty(n)
    for s in range(n):
        z = di.Chain(di.Dropout(1 - m / d, seed=s), second[proj](10_000 + s)).bind(layout)
        z = z.compress(bg)
        x[s] = float(z[0] @ z[1])
    var = float(theory.chain_variance(st, "fixed", m, proj, k))
    # mean within 4.5 standard errors; the sample variance within 25% (n = 3000: its relative
    # sd is about sqrt(2 / n) times the kurtosis factor, a few percent)
    assert abs(x.mean() - float(st.ab)) < 4.5 * math.sqrt(var / n)
    assert x.var(ddof=1) == pytest.approx(var, rel=0.25)
    assert var > float(theory.variance(st, proj, k))  # the mask adds variance


def test_chain_variance_reduces_to_its_stages():
    rng = np.random.default_rng(1)
    st = theory.PairStats.of(rng.standard_normal(30), rng.standard_normal(30))
    for proj in ("sjlt", "gaussian"):
        assert theory.chain_variance(st, "fixed", 30, proj, 5) == pytest.approx(
            theory.variance(st, proj, 5))
    with pytest.raises(ValueError, match="k=12 must be in"):
        theory.chain_variance(st, "fixed", 10, "sjlt", 12)
    with pytest.raises(ValueError, match="proj="):
        theory.chain_variance(st, "fixed", 10, "pca", 2)


def test_held_bytes_add_both_stages_at_the_first_output_size():
    d = 1000
    assert di.Chain(di.Dropout(0.75), di.SJLT(50, c=2)).held_bytes(d) == 8 * 250 + 12 * 2 * 250
    assert di.Chain(di.SJLT(100), di.Gaussian(10)).held_bytes(d) == 12 * d + 4 * 10 * 100
    task, _ = case(mlp, torch.float32)  # a flat Gaussian holds what it stores
    g = di.Gaussian(7, seed=1)
    assert g.held_bytes(task.dim) == g.bind(task).map_bytes
