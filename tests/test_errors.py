"""Bad input gets a ValueError/TypeError naming the argument; edge cases found in review."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

import dropinf as di
from dropinf import losses
from dropinf._io import write_json


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).eval()
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    return model, [(x[:6], y[:6]), (x[6:], y[6:])]


def test_scores_arguments_are_checked(small):
    G = torch.randn(5, 3)
    pre = di.Preconditioner.fit(G, kind="identity")
    with pytest.raises(ValueError, match="block_train=0"):
        di.scores(G, G, pre, block_train=0)
    with pytest.raises(ValueError, match="block=-1"):
        di.self_influence(G, pre, block=-1)
    with pytest.raises(ValueError, match="k=2.5"):
        di.top_k(G, G, pre, k=2.5)


@pytest.mark.parametrize("damping", [float("nan"), float("inf"), -1.0, True, "1e-3"])
def test_damping_must_be_a_finite_non_negative_number(damping):
    with pytest.raises(ValueError, match="damping="):
        di.Preconditioner.fit(torch.randn(6, 3), kind="fisher", damping=damping)


def test_empty_gradients_are_refused():
    with pytest.raises(ValueError, match="n >= 1"):
        di.Preconditioner.fit(torch.zeros(0, 3), kind="fisher")


def test_pca_needs_at_least_k_fit_rows():
    with pytest.raises(ValueError, match="n_fit=4"):
        di.PCA(k=8, n_fit=4).fit(torch.randn(20, 30))
    with pytest.raises(ValueError, match="n_fit=0"):
        di.PCA(k=8, n_fit=0)


def test_a_bind_that_raises_leaves_the_compressor_unbound(small):
    """An unfitted PCA refuses to bind; fitted afterwards, it binds (it was not left 'bound'
    to the layout of the failed call with no draw behind it)."""
    model, batches = small
    task = di.Task(model, losses.cross_entropy)
    pca = di.PCA(k=2, n_fit=8)
    with pytest.raises(RuntimeError, match="must be fitted"):
        pca.bind(task)
    assert pca.layout is None
    G = di.gradients(task, batches, di.Identity(), progress=False).data
    assert pca.fit(G).bind(task).dim == 2


def test_gradients_dtype_must_be_floating(small):
    model, batches = small
    task = di.Task(model, losses.cross_entropy)
    with pytest.raises(ValueError, match="dtype=torch.int32"):
        di.gradients(task, batches, di.Identity(), dtype=torch.int32, progress=False)


def test_factored_dropout_with_only_a_bias_selected_keeps_the_task_dimension(small):
    """A layer whose weight is not selected has no factored gradient: its bias goes flat."""
    model, batches = small
    task = di.Task(model, losses.cross_entropy, params=["0.bias"])
    comp = di.Dropout(0.5, factored=True, seed=1)
    Z = di.gradients(task, batches, comp, progress=False).data
    G = di.gradients(task, batches, di.Identity(), progress=False).data
    idx, scale = comp.kept_indices()
    assert comp.dim == len(idx) <= task.dim == 4
    torch.testing.assert_close(Z, G[:, idx] * scale)


def test_user_split_losses_are_told_apart():
    def out(m, b):
        return m(b[0])

    a = losses.SplitLoss(out, lambda z, b: z.sum(1))
    b = losses.SplitLoss(out, lambda z, b: z.mean(1))
    assert repr(a) != repr(losses.cross_entropy) and "SplitLoss(" in repr(a)
    assert repr(a) == repr(a) and repr(b).startswith("SplitLoss(")


def test_write_json_writes_arrays_and_scalars(tmp_path):
    p = write_json(
        tmp_path / "x.json", {"a": np.arange(3), "b": np.float32(0.5), "c": torch.ones(2)}
    )
    assert json.loads(p.read_text()) == {"a": [0, 1, 2], "b": 0.5, "c": [1.0, 1.0]}


def test_cg_info_describes_the_last_call(small):
    model, batches = small
    task = di.Task(copy.deepcopy(model).double(), losses.cross_entropy)
    batches = [(x.double(), y) for x, y in batches]
    pre = di.Preconditioner.fit_exact(task, batches, l2=1e-2, kind="ggn", solver="cg")
    q = torch.randn(3, task.dim, dtype=torch.float64)
    pre.apply(q)
    pre.apply(q[:2])
    assert len(pre.info["cg_residuals"]) == len(pre.info["cg_iterations"]) == 2


@pytest.mark.parametrize("make", [lambda v: di.Dropout(0.5, factored=v),
                                  lambda v: di.Dropout(0.5, importance=v),
                                  lambda v: di.Gaussian(4, factored=v)])
def test_flags_must_be_bools_not_strings(make):
    """bool("False") is True: a flag given as a string would silently pick the other method."""
    with pytest.raises(TypeError, match="must be True or False"):
        make("False")


def test_command_line_values_read_python_spellings():
    """`--compressor-arg factored=False` builds the flat mask (it once built the factored)."""
    from dropinf import cli

    args = cli._pairs(["p=0.9", "factored=False", "seed=3", "mask=fixed"], "--compressor-arg")
    assert args == {"p": 0.9, "factored": False, "seed": 3, "mask": "fixed"}
    assert di.make("dropout", **args).factored is False
    assert cli._pairs(["x=None", "y=true", "z=[1, 2]"], "--arg") == {"x": None, "y": True,
                                                                     "z": [1, 2]}

