"""Exact per-sample gradients: dropinf against one backward per example."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, loop_grads
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dropinf as di
from dropinf import losses
from dropinf.plan import make_plan
from dropinf.study import models


def split(batch, sizes):
    """Cut a batch (tuple of tensors or dict of tensors) into consecutive chunks of ``sizes``."""
    out, start = [], 0
    for s in sizes:
        if isinstance(batch, dict):
            out.append({k: v[start : start + s] for k, v in batch.items()})
        else:
            out.append(tuple(v[start : start + s] for v in batch))
        start += s
    return out


def check_against_loop(model, loss, batch, n, batch_sizes=(3, 4), params=None):
    task = di.Task(model, loss, params=params)
    G = di.gradients(task, split(batch, batch_sizes), di.Identity(), progress=False)
    ref = loop_grads(model, loss, split(batch, [1] * n), task.param_names)
    assert G.shape == (n, task.dim)
    assert_close(G.data, ref)
    return task, G


# ----------------------------------------------------------------------------- models


def test_mlp_with_biases_and_inplace_relu():
    m = nn.Sequential(
        nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)
    ).eval()
    batch = (torch.randn(7, 6), torch.randint(0, 3, (7,)))
    task, _ = check_against_loop(m, losses.cross_entropy, batch, 7)
    assert make_plan(task).func == []


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(4, 6, 3, padding="same", groups=2, bias=False, dilation=2)
        self.c3 = nn.Conv2d(6, 6, (2, 3), stride=(1, 2), padding=(1, 0), groups=3)
        self.c4 = nn.Conv2d(6, 6, 2, padding="same")  # even kernel: asymmetric padding
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x))
        x = self.c4(self.c3(x))
        return self.fc(x.mean((2, 3)))


def test_cnn_stride_padding_groups_dilation():
    batch = (torch.randn(5, 2, 9, 8), torch.randint(0, 5, (5,)))
    task, _ = check_against_loop(CNN().eval(), losses.cross_entropy, batch, 5, (2, 3))
    assert set(make_plan(task).hooked) == {"c1", "c2", "c3", "c4", "fc"}


def lm_batch(n=5, T=9, vocab=128, seed=0):
    """Padded variable-length sequences (right padding, pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, T), generator=g)
    lengths = torch.tensor([T, 3, 6, 2, 8][:n])
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def test_gpt2_padded_sequences_with_tied_embeddings():
    m = models.gpt2(n_layer=2, n_embd=32, n_head=2, vocab_size=128).eval()
    assert m.lm_head.weight is m.transformer.wte.weight
    task, G = check_against_loop(m, losses.causal_lm, lm_batch(), 5, (2, 3))
    plan = make_plan(task)
    assert plan.func == [] and "lm_head" in plan.hooked and "transformer.wte" in plan.hooked


def test_hook_path_computes_no_weight_gradient():
    """Autograd is asked for parameter gradients only by the self-check, once per call."""
    m = models.gpt2().eval()
    fired = []
    for n, p in m.named_parameters():
        p.register_hook(lambda g, n=n: fired.append(n))
    task = di.Task(m, losses.causal_lm)
    di.gradients(task, [lm_batch()] * 3, di.Identity(), progress=False, check=False)
    assert fired == [] and all(p.grad is None for p in m.parameters())
    di.gradients(task, [lm_batch()] * 3, di.Identity(), progress=False)  # checks batch 1 only
    assert sorted(fired) == sorted(n for n, _ in m.named_parameters())
    assert all(p.grad is None for p in m.parameters())
    fired.clear()
    losses.causal_lm(m, lm_batch()).sum().backward()  # the hooks do fire for a normal backward
    assert len(fired) == len(list(m.parameters()))


def test_gpt2_padding_contributes_nothing():
    """Changing the ids under the padding mask changes no gradient."""
    m = models.gpt2().eval()
    task = di.Task(m, losses.causal_lm)
    a = lm_batch()
    b = dict(a, input_ids=torch.where(a["attention_mask"].bool(), a["input_ids"], 77))
    Ga = di.gradients(task, [a], di.Identity(), progress=False)
    Gb = di.gradients(task, [b], di.Identity(), progress=False)
    assert_close(Gb.data, Ga.data)


def test_bert_classifier():
    m = models.bert_classifier(n_layer=2, hidden=32, n_head=2, vocab_size=128).eval()
    batch = dict(lm_batch(), labels=torch.tensor([0, 2, 1, 1, 0]))
    batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
    task, _ = check_against_loop(m, losses.sequence_classification, batch, 5, (4, 1))
    assert make_plan(task).func == []


class Scaled(nn.Module):
    """A module dropinf has no factored rule for: a raw parameter used in forward."""

    def __init__(self, n):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(n))

    def forward(self, x):
        return x * self.scale


def test_unsupported_modules_fall_back_to_torch_func_and_say_which():
    m = nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6), Scaled(6), nn.ReLU(), nn.Linear(6, 2)
    ).eval()
    m[1].running_mean.normal_()
    batch = (torch.randn(6, 4), torch.randint(0, 2, (6,)))
    with pytest.warns(UserWarning, match=r"1 \(BatchNorm1d\), 2 \(Scaled\)"):
        task, _ = check_against_loop(m, losses.cross_entropy, batch, 6, (4, 2))
    assert make_plan(task).func == ["1.weight", "1.bias", "2.scale"]


def test_weight_tied_to_an_unsupported_module_goes_through_torch_func():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 5)
            self.extra = Scaled(5)
            self.extra.scale = self.fc.bias  # one parameter, two owners

        def forward(self, x):
            return self.extra(self.fc(x))

    batch = (torch.randn(4, 5), torch.randint(0, 5, (4,)))
    with pytest.warns(UserWarning, match="Scaled"):
        task, _ = check_against_loop(Tied().eval(), losses.cross_entropy, batch, 4, (4,))
    plan = make_plan(task)
    assert plan.func == ["fc.weight", "fc.bias"] and "fc" not in plan.hooked


def test_layer_called_twice_sums_both_uses():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(torch.tanh(self.fc(x)))

    batch = (torch.randn(5, 4), torch.randint(0, 4, (5,)))
    check_against_loop(Twice().eval(), losses.cross_entropy, batch, 5)


def test_parameter_selection_by_module_and_by_name():
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    batch = (torch.randn(4, 3), torch.randint(0, 2, (4,)))
    task, _ = check_against_loop(m, losses.cross_entropy, batch, 4, (4,), params=["2", "0.bias"])
    assert task.param_names == ["0.bias", "2.weight", "2.bias"]
    assert task.dim == 4 + 8 + 2


# ----------------------------------------------------------------------------- invariances


@pytest.fixture
def mlp_data():
    torch.manual_seed(1)
    m = models.mlp([5, 6, 3]).eval()
    ds = TensorDataset(torch.randn(23, 5), torch.randint(0, 3, (23,)))
    return di.Task(m, losses.cross_entropy), ds


@pytest.mark.parametrize("bs", [1, 7, 23])
def test_batch_size_does_not_change_gradients(mlp_data, bs):
    task, ds = mlp_data
    ref = di.gradients(task, DataLoader(ds, batch_size=23), di.Identity(), progress=False)
    G = di.gradients(task, DataLoader(ds, batch_size=bs), di.Identity(), progress=False)
    assert_close(G.data, ref.data)
    assert torch.equal(G.indices, torch.arange(23))


def test_shuffled_loader_rows_follow_dataset_indices(mlp_data):
    task, ds = mlp_data
    ref = di.gradients(task, DataLoader(ds, batch_size=5), di.Identity(), progress=False)
    shuffled = DataLoader(
        ds, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(3)
    )
    G = di.gradients(task, shuffled, di.Identity(), progress=False)
    assert torch.equal(G.indices, torch.arange(23))
    assert_close(G.data, ref.data)
    assert_close(G.losses, ref.losses)
    sub = DataLoader(ds, batch_size=4, sampler=[20, 3, 11, 7, 0])
    Gs = di.gradients(task, sub, di.Identity(), progress=False)
    assert Gs.indices.tolist() == [0, 3, 7, 11, 20]
    assert_close(Gs.data, ref.data[Gs.indices])


def test_converts_to_tensor_and_array(mlp_data):
    task, ds = mlp_data
    G = di.gradients(task, DataLoader(ds, batch_size=8), di.Identity(), progress=False)
    t, a = torch.as_tensor(G), np.asarray(G)
    assert t.shape == a.shape == (23, task.dim)
    assert torch.equal(t, G.data) and np.array_equal(a, G.data.numpy())


# ----------------------------------------------------------------------------- bad input


def test_loss_must_be_per_sample(mlp_data):
    task, ds = mlp_data
    batches = [ds[:4]]
    scalar = di.Task(task.model, lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    with pytest.raises(ValueError, match=r"scalar.*reduction='none'"):
        di.gradients(scalar, batches, di.Identity(), progress=False)
    wrong = di.Task(task.model, lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")[:2])
    with pytest.raises(ValueError, match=r"shape \(2,\) for a batch of 4"):
        di.gradients(wrong, batches, di.Identity(), progress=False)
    with pytest.raises(TypeError, match="loss"):
        di.Task(task.model, "cross_entropy")


def test_train_mode_with_dropout_warns_and_uses_eval_mode():
    m = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    batch = [(torch.randn(6, 5), torch.randint(0, 3, (6,)))]
    task = di.Task(m, losses.cross_entropy)
    with pytest.warns(UserWarning, match="train mode with Dropout"):
        G = di.gradients(task, batch, di.Identity(), progress=False)
    assert m.training  # mode restored
    m.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ref = di.gradients(task, batch, di.Identity(), progress=False)
    assert torch.equal(G.data, ref.data)


def test_nonfinite_gradient_names_the_sample(mlp_data):
    task, ds = mlp_data
    x, y = ds[:10]
    x = x.clone()
    x[6, 2] = math.inf
    with pytest.raises(ValueError, match="sample 6"):
        di.gradients(task, split((x, y), [5, 5]), di.Identity(), progress=False)


def test_empty_loader_and_bad_params(mlp_data):
    task, _ = mlp_data
    with pytest.raises(ValueError, match="no batch"):
        di.gradients(task, [], di.Identity(), progress=False)
    with pytest.raises(ValueError, match="neither a parameter nor a module"):
        di.Task(task.model, losses.cross_entropy, params=["nope"])
    task.model[0].weight.requires_grad_(False)
    try:
        with pytest.raises(ValueError, match="requires_grad=False"):
            di.Task(task.model, losses.cross_entropy, params=["0.weight"])
        # default selection skips it, and the layer keeps its bias gradient
        t = di.Task(task.model, losses.cross_entropy)
        assert "0.weight" not in t.param_names and "0.bias" in t.param_names
    finally:
        task.model[0].weight.requires_grad_(True)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad"):
        di.Task(frozen, losses.cross_entropy)
    with pytest.raises(TypeError, match="compressor"):
        di.gradients(task, [], "identity")
