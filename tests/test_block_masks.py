"""Block masks, ``Dropout(..., block=b)``: the draw, its scale, and its statistics.

The block partition of n units (or of a parameter's n flattened coordinates) is re-derived
here from the rule, independently of the library: ``m = max(1, n // b)`` aligned blocks
``[j b, (j+1) b)``, the last one also taking the remainder ``n mod b``
(:func:`partition`). Every check reads the library's draw back through that partition:
kept units must be whole blocks, the number of kept blocks must follow the mask law, the
scale must undo the keep probability, and compressed gradients must be the exact gradients
at the kept coordinates times the scale. The statistics are checked against exact
enumeration of every mask (small populations of blocks) and Monte Carlo over seeds.
"""

from __future__ import annotations

import itertools
import json
import math
import warnings

import numpy as np
import pytest
import torch
from conftest import assert_close
from test_compressors import CASES, grads
from torch import nn

import dropinf as di
from dropinf import losses, theory
from dropinf.compressors import _Columns, _generator
from dropinf.persample import PerSampleGrads

LAWS = ["fixed", "bernoulli"]


def partition(n: int, b: int) -> list[range]:
    """The mask blocks of n units: aligned runs of b, the last one taking the remainder."""
    m = max(1, n // b)
    return [range(j * b, (j + 1) * b) for j in range(m - 1)] + [range((m - 1) * b, n)]


def kept_blocks(units: torch.Tensor, n: int, b: int) -> list[int]:
    """Indices of the blocks of :func:`partition` that ``units`` (of n) covers, asserting that
    ``units`` is sorted, without repeats and exactly a union of whole blocks."""
    u = units.tolist()
    assert u == sorted(set(u)), u
    have = set(u)
    blocks = partition(n, b)
    kept = []
    for j, r in enumerate(blocks):
        inside = [i in have for i in r]
        assert all(inside) or not any(inside), f"block {j} = {r} of n={n}, b={b} is split: {u}"
        if inside and all(inside):
            kept.append(j)
    assert sum(len(blocks[j]) for j in kept) == len(u), f"units outside 0..{n - 1}: {u}"
    return kept


def k_fixed(m: int, p: float) -> int:
    """Blocks a fixed mask keeps out of m at rate p on a factored side (at least one)."""
    return max(1, round((1 - p) * m))


# ----------------------------------------------------------------------------- the draw

DRAWS = [  # (n, b, p): n a multiple of b, with a remainder, n < b, b = 1, 16 + bias unit
    (64, 16, 0.5),
    (23, 5, 0.7),
    (17, 4, 0.5),
    (3, 8, 0.9),
    (9, 4, 0.0),
    (40, 1, 0.75),
]


@pytest.mark.parametrize("mask", LAWS)
@pytest.mark.parametrize(("n", "b", "p"), DRAWS)
def test_units_are_whole_blocks_with_the_law_count_and_scale(n, b, p, mask):
    comp = di.Dropout(p, mask=mask, seed=7, block=b)
    m = len(partition(n, b))
    assert m == max(1, n // b)
    for key in range(20):
        units, scale = comp._units(n, "key", key)
        kept = kept_blocks(units, n, b)
        if mask == "fixed":
            k = k_fixed(m, p)
            assert len(kept) == k, (kept, k)
            assert scale == pytest.approx(math.sqrt(m / k), rel=1e-12)
        else:
            assert scale == pytest.approx(1 / math.sqrt(1 - p), rel=1e-12)
        if n > b:  # the last unit (a bias unit when n = 16 + 1) goes with the last full run
            last = (m - 1) * b
            assert (n - 1 in units.tolist()) == (last in units.tolist())


@pytest.mark.parametrize("mask", LAWS)
@pytest.mark.parametrize(("n", "b", "p"), [(23, 5, 0.7), (17, 4, 0.5), (30, 3, 0.4)])
def test_each_block_is_kept_with_the_probability_its_scale_undoes(n, b, p, mask):
    """Over many draws every block (the remainder block too) is kept with probability
    1/scale^2, so each side's estimate is unbiased: binomial counts within 5 standard errors."""
    comp = di.Dropout(p, mask=mask, seed=3, block=b)
    m, draws = len(partition(n, b)), 600
    counts = np.zeros(m)
    scales = set()
    for key in range(draws):
        units, scale = comp._units(n, "freq", key)
        counts[kept_blocks(units, n, b)] += 1
        scales.add(scale)
    assert len(scales) == 1
    q = 1 / scales.pop() ** 2
    se = math.sqrt(q * (1 - q) / draws)
    assert np.all(np.abs(counts / draws - q) <= 5 * se + 1e-12), (counts / draws, q, se)


@pytest.mark.parametrize("mask", LAWS)
@pytest.mark.parametrize("p", [0.3, 0.8])
def test_block_one_is_the_unit_draw(mask, p):
    """block=1 keeps exactly the units of the default, which are those of the unit draw from
    before blocks existed (same generator stream), so stored results stay reproducible."""
    for n in (1, 7, 50):
        for key in range(5):
            units, scale = di.Dropout(p, mask=mask, seed=11, block=1)._units(n, "k", key)
            default, s0 = di.Dropout(p, mask=mask, seed=11)._units(n, "k", key)
            g = _generator(11, "units", "k", key)
            if mask == "fixed":
                k = max(1, round((1 - p) * n))
                unit = torch.randperm(n, generator=g)[:k].sort().values
            else:
                unit = (torch.rand(n, generator=g) < 1 - p).nonzero().flatten()
            assert torch.equal(units, default) and torch.equal(units, unit)
            assert scale == s0


# ----------------------------------------------------------------------------- flat mask


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    torch.manual_seed(0)
    task, batches = CASES[request.param]()
    return task, batches, grads(task, batches, di.Identity())


@pytest.mark.parametrize("mask", LAWS)
@pytest.mark.parametrize("b", [3, 5, 12])
def test_flat_block_mask_keeps_whole_blocks_of_each_parameter(case, b, mask):
    task, batches, G = case
    p = 0.6
    assert any(q.numel % b for q in task.params), "want parameters that are not multiples of b"
    comp = di.Dropout(p, mask=mask, seed=5, block=b)
    Z = grads(task, batches, comp)
    M = sum(len(partition(q.numel, b)) for q in task.params)
    expect, n_kept = [], 0
    for q in task.params:
        kept = kept_blocks(comp.flat.index[q.name], q.numel, b)
        n_kept += len(kept)
        blocks = partition(q.numel, b)
        expect += [q.offset + i for j in kept for i in blocks[j]]
    idx, scale = comp.kept_indices()
    assert idx.tolist() == expect
    if mask == "fixed":
        K = round((1 - p) * M)
        assert n_kept == K
        assert torch.allclose(scale, torch.tensor(math.sqrt(M / K)))
    else:
        assert torch.allclose(scale, torch.tensor(1 / math.sqrt(1 - p)))
    assert Z.shape[1] == comp.dim == len(expect)
    assert_close(Z, G[:, idx] * scale)


@pytest.mark.parametrize("b", [4, 5])
def test_flat_block_mask_keeps_every_coordinate_with_the_probability_its_scale_undoes(b):
    """Fixed flat mask over the blocks of several parameters: K blocks in all, each of the M
    blocks kept with probability K/M (hypergeometric counts per parameter, then uniform)."""
    task, _ = CASES["mixed"]()
    layout = di.Layout.of(task)
    p, draws = 0.5, 600
    M = sum(len(partition(q.numel, b)) for q in task.params)
    K = round((1 - p) * M)
    counts = {q.name: np.zeros(len(partition(q.numel, b))) for q in task.params}
    for seed in range(draws):
        flat = di.Dropout(p, seed=seed, block=b).bind(layout).flat
        total = 0
        for q in task.params:
            kept = kept_blocks(flat.index[q.name], q.numel, b)
            counts[q.name][kept] += 1
            total += len(kept)
        assert total == K
        assert flat.scale == pytest.approx(math.sqrt(M / K))
    freq = np.concatenate(list(counts.values())) / draws
    q = K / M
    assert np.all(np.abs(freq - q) <= 5 * math.sqrt(q * (1 - q) / draws)), (freq, q)


# ----------------------------------------------------------------------------- factored


@pytest.mark.parametrize("mask", LAWS)
@pytest.mark.parametrize("b", [2, 4, 16])
def test_factored_block_dropout_is_flat_dropout_with_a_kronecker_mask(case, b, mask):
    task, batches, G = case
    p = 0.5
    info = {q.name: q for q in task.params}
    bias_kept = 0
    for seed in range(3):
        comp = di.Dropout(p, factored=True, mask=mask, seed=seed, block=b)
        Z = grads(task, batches, comp)  # factors reduced at capture
        idx, scale = comp.kept_indices()
        assert Z.shape[1] == comp.dim == len(idx) == len(set(idx.tolist()))
        assert_close(Z, G[:, idx] * scale)
        kept = set(idx.tolist())
        assert comp.layout.factored
        for s in comp.layout.factored:
            s_out, s_in, sc = comp.units[s.module]
            ko, ki = kept_blocks(s_out, s.n_out, b), kept_blocks(s_in, s.n_in_aug, b)
            mo, mi = len(partition(s.n_out, b)), len(partition(s.n_in_aug, b))
            if mask == "fixed":
                assert (len(ko), len(ki)) == (k_fixed(mo, p), k_fixed(mi, p))
                assert sc == pytest.approx(math.sqrt(mo / len(ko) * mi / len(ki)))
            else:
                assert sc == pytest.approx(1 / (1 - p))
            w = info[s.weight]
            rows = torch.arange(s.n_out).repeat_interleave(s.n_in)
            cols = torch.arange(s.n_in).repeat(s.n_out)
            if s.transposed:
                rows = torch.arange(s.n_out).repeat(s.n_in)
                cols = torch.arange(s.n_in).repeat_interleave(s.n_out)
            mask_w = torch.tensor([w.offset + j in kept for j in range(w.numel)])
            assert torch.equal(mask_w, torch.isin(rows, s_out) & torch.isin(cols, s_in))
            if s.bias is not None:
                bias_unit = s.n_in in s_in.tolist()
                if bias_unit:  # its whole block, the last, came with it
                    assert set(partition(s.n_in_aug, b)[-1]) <= set(s_in.tolist())
                    bias_kept += 1
                bb = info[s.bias]
                mask_b = torch.tensor([bb.offset + j in kept for j in range(bb.numel)])
                assert torch.equal(mask_b, torch.isin(torch.arange(s.n_out), s_out) & bias_unit)
        rest = comp.layout.rest()
        n_rest = sum(len(kept_blocks(comp.flat.index[q.name], q.numel, b)) for q in rest)
        if mask == "fixed" and rest:
            M = sum(len(partition(q.numel, b)) for q in rest)
            assert n_rest == round((1 - p) * M)
    assert bias_kept, "no draw kept a bias unit: the case does not cover it"


def test_columns_copy_by_slices_or_gather_like_indexing():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 64, 5, generator=g)
    cases = {
        "runs": (torch.cat([torch.arange(3, 19), torch.arange(40, 56)]), True),
        "one-run": (torch.arange(0, 64), True),
        "sparse": (torch.tensor([0, 2, 5, 7, 11, 12, 30, 63]), False),
        "short-runs": (torch.cat([torch.arange(0, 4), torch.arange(8, 12)]), False),
        "empty": (torch.zeros(0, dtype=torch.long), False),
    }
    inputs = {
        "contiguous": base.transpose(1, 2).contiguous(),
        "transposed": base.transpose(1, 2),  # (3, 5, 64), not contiguous
        "bf16": base.transpose(1, 2).to(torch.bfloat16),
        "sliced": torch.randn(3, 5, 80, generator=g)[..., 10:74],  # strided rows
    }
    assert not inputs["transposed"].is_contiguous() and not inputs["sliced"].is_contiguous()
    for name, (idx, sliced) in cases.items():
        cols = _Columns(idx)
        assert cols.sliced == sliced, name
        for kind, t in inputs.items():
            out = cols(t)
            assert out.dtype == torch.float32 and out.is_contiguous(), (name, kind)
            assert out.shape == (3, 5, len(idx))
            assert torch.equal(out, t[..., idx].float()), (name, kind)


# ----------------------------------------------------------------------------- statistics

Z_MEAN = 4.0  # |z| > 4: probability 6e-5 under the normal approximation
Z_VAR = 5.0  # the sample variance of heavy-tailed estimates is skewed: a wider normal band
N_DRAWS = 4000
BASE_SEED = 10_000


def enumerate_law(values: list[float], probs: list[float]) -> tuple[float, float, float]:
    """Exact mean, variance and fourth central moment of a finite distribution."""
    v, w = np.asarray(values), np.asarray(probs)
    assert math.isclose(w.sum(), 1.0)
    mean = float(w @ v)
    return mean, float(w @ (v - mean) ** 2), float(w @ (v - mean) ** 4)


def subsets(m: int, mask: str, k: int, q: float):
    """Every kept set of m blocks with its probability: uniform k-subsets (fixed) or
    independent keeps with probability q (Bernoulli)."""
    if mask == "fixed":
        combos = list(itertools.combinations(range(m), k))
        return [(set(c), 1 / len(combos)) for c in combos]
    out = []
    for bits in itertools.product([0, 1], repeat=m):
        kept = {j for j, x in enumerate(bits) if x}
        out.append((kept, q ** len(kept) * (1 - q) ** (m - len(kept))))
    return out


def check_mean_and_variance(x: np.ndarray, mean: float, var: float, mu4: float) -> None:
    n = len(x)
    assert abs(x.mean() - mean) <= Z_MEAN * math.sqrt(var / n), (x.mean(), mean, var)
    sd = math.sqrt(theory.var_of_sample_variance(var, mu4, n))
    assert abs(x.var(ddof=1) - var) <= Z_VAR * sd, (x.var(ddof=1), var, sd)


def pair_of(model: nn.Module, n_in: int, n_cls: int):
    """A task on ``model`` and the BatchGrads and exact gradients of two samples."""
    torch.manual_seed(0)
    task = di.Task(model.eval(), losses.cross_entropy)
    batch = (torch.randn(2, n_in), torch.tensor([1, n_cls - 1]))
    with PerSampleGrads(task) as psg:
        bg, _ = psg(batch)
    G = bg.flat().double()
    return task, bg, G[0].numpy(), G[1].numpy()


def estimates(layout, bg, make) -> np.ndarray:
    out = np.empty(N_DRAWS)
    for s in range(N_DRAWS):
        z = make(BASE_SEED + s).bind(layout).compress(bg).double()
        out[s] = float(z[0] @ z[1])
    return out


@pytest.mark.parametrize(("mask", "p"), [("fixed", 0.5), ("bernoulli", 0.6)])
def test_flat_block_dropout_unbiased_with_the_block_variance(mask, p):
    """One parameter of 35 coordinates (a Linear without bias, flat mask): blocks of 4 are the
    theory's blocks, M = 8 with the last of 7. The block variance of theory.variance equals the
    exact variance from every mask, and the library's draws match both."""
    b = 4
    task, bg, a, c = pair_of(nn.Linear(7, 5, bias=False), 7, 5)
    layout = di.Layout.of(task)
    assert [q.numel for q in layout.params] == [35]
    blocks = partition(35, b)
    M = len(blocks)
    sums = [float(np.sum(a[list(r)] * c[list(r)])) for r in blocks]
    if mask == "fixed":
        K = round((1 - p) * M)
        scale2, k_theory = M / K, K
    else:
        K, scale2, k_theory = None, 1 / (1 - p), (1 - p) * M
    values, probs = [], []
    for kept, w in subsets(M, mask, K, 1 - p):
        values.append(scale2 * sum(sums[j] for j in kept))
        probs.append(w)
    mean, var, mu4 = enumerate_law(values, probs)
    assert mean == pytest.approx(a @ c, rel=1e-9)
    stats = theory.PairStats.of(a, c, block=b)
    assert stats.d == M
    assert float(theory.variance(stats, mask, k_theory)) == pytest.approx(var, rel=1e-9)
    x = estimates(layout, bg, lambda s: di.Dropout(p, mask=mask, seed=s, block=b))
    check_mean_and_variance(x, a @ c, var, mu4)


@pytest.mark.parametrize(("mask", "p"), [("fixed", 0.5), ("bernoulli", 0.4)])
def test_factored_block_dropout_unbiased_on_a_linear_layer(mask, p):
    """Linear(6, 5) with bias, blocks of 2: outputs {0,1},{2,3,4}; inputs {0,1},{2,3},{4,5,bias}.
    Exact moments by enumerating both sides' block sets; the draws match them."""
    b = 2
    task, bg, a, c = pair_of(nn.Linear(6, 5), 6, 5)
    layout = di.Layout.of(task)
    (s,) = layout.factored
    assert (s.n_out, s.n_in_aug, s.transposed) == (5, 7, False)

    def matrix(g):  # (n_out, n_in + 1): weight row-major, then the bias column
        return np.concatenate([g[:30].reshape(5, 6), g[30:35, None]], 1)

    prod = matrix(a) * matrix(c)
    outs, ins = partition(5, b), partition(7, b)
    mo, mi = len(outs), len(ins)
    values, probs = [], []
    k_o, k_i = (k_fixed(mo, p), k_fixed(mi, p)) if mask == "fixed" else (None, None)
    scale2 = mo / k_o * mi / k_i if mask == "fixed" else 1 / (1 - p) ** 2
    for (ko, wo), (ki, wi) in itertools.product(
        subsets(mo, mask, k_o, 1 - p), subsets(mi, mask, k_i, 1 - p)
    ):
        rows = [r for j in sorted(ko) for r in outs[j]]
        cols = [i for j in sorted(ki) for i in ins[j]]
        values.append(scale2 * float(prod[np.ix_(rows, cols)].sum()) if rows and cols else 0.0)
        probs.append(wo * wi)
    mean, var, mu4 = enumerate_law(values, probs)
    assert mean == pytest.approx(a @ c, rel=1e-9)
    x = estimates(layout, bg, lambda sd: di.Dropout(p, factored=True, mask=mask, seed=sd, block=b))
    check_mean_and_variance(x, a @ c, var, mu4)


# ----------------------------------------------------------------------------- contract


@pytest.mark.parametrize("block", [0, -3, 1.5, True, "4", None])
def test_bad_block_is_named(block):
    with pytest.raises(ValueError, match="block="):
        di.Dropout(0.5, block=block)


def test_a_fixed_block_mask_that_keeps_no_block_is_refused():
    task, _ = CASES["mixed"]()
    M = sum(len(partition(q.numel, 64)) for q in task.params)  # one block per parameter
    with pytest.raises(ValueError, match=r"keeps none of the \d+ blocks of 64 coordinates"):
        di.Dropout(1 - 0.4 / M, block=64).bind(task)


def test_block_is_part_of_the_fingerprint_and_the_draw_is_reproducible():
    task, batches = CASES["mixed"]()
    f1, f4 = di.Dropout(0.5, block=1).fingerprint, di.Dropout(0.5, block=4).fingerprint
    assert f1 != f4 and json.loads(f4)["block"] == 4
    assert di.make("dropout", p=0.5, block=4).fingerprint == f4
    for factored in (False, True):
        a, a2, one = (
            grads(task, batches, di.Dropout(0.5, factored=factored, seed=2, block=b))
            for b in (4, 4, 1)
        )
        assert torch.equal(a, a2)
        assert a.shape != one.shape or not torch.allclose(a, one)


def test_one_block_sides_are_named_in_a_warning():
    model = nn.Sequential(nn.Linear(40, 20), nn.Tanh(), nn.Linear(20, 3))
    task = di.Task(model, di.losses.cross_entropy)
    sides = r"0 \(outputs: 20\), 2 \(outputs: 3\), 2 \(inputs: 21\);"
    with pytest.warns(UserWarning, match="kept whole: " + sides):
        di.Dropout(0.5, factored=True, block=16).bind(task)
    with pytest.warns(UserWarning, match="kept or dropped whole"):
        di.Dropout(0.5, factored=True, block=16, mask="bernoulli").bind(task)
    wide = di.Task(nn.Sequential(nn.Linear(40, 20), nn.Tanh(), nn.Linear(20, 4)),
                   di.losses.cross_entropy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        di.Dropout(0.5, factored=True, block=2).bind(wide)  # every side has two blocks or more


def test_a_bernoulli_mask_that_keeps_nothing_has_empty_indices():
    model = nn.Sequential(nn.Linear(10, 20), nn.Tanh(), nn.Linear(20, 3))
    task = di.Task(model, di.losses.cross_entropy)
    x, y = torch.randn(4, 10), torch.randint(0, 3, (4,))
    empty = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in range(40):
            comp = di.Dropout(0.5, factored=True, block=16, mask="bernoulli", seed=seed)
            comp.bind(task)
            idx, sc = comp.kept_indices()
            z = di.gradients(task, [(x, y)], comp, progress=False).data
            assert z.shape == (4, comp.dim) == (4, len(idx)) and len(sc) == len(idx)
            empty += comp.dim == 0
    assert empty > 0  # each side is one block, dropped with probability 1/2


def test_an_empty_parameter_gets_no_block():
    class WithEmpty(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 3)
            self.nothing = nn.Parameter(torch.zeros(0))

        def forward(self, x):
            return self.fc(x) + self.nothing.sum()

    model = WithEmpty()
    task = di.Task(model, di.losses.cross_entropy)
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    exact = di.gradients(task, [(x, y)], di.Identity(), progress=False).data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the empty parameter goes through torch.func
        for block in (1, 4):
            for seed in range(5):
                comp = di.Dropout(0.5, block=block, seed=seed).bind(task)
                assert len(comp.flat.index["nothing"]) == 0
                idx, sc = comp.kept_indices()
                z = di.gradients(task, [(x, y)], comp, progress=False).data
                torch.testing.assert_close(z, exact[:, idx] * sc)
