"""Rows of different compressors, models or parameter selections are not scored together: the
checks of scores, top_k, self_influence and preconditioners against the rows' sources."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

import dropinf as di
from dropinf import losses
from dropinf.curvature import Source
from dropinf.store import Store, model_hash
from dropinf.study import models


@pytest.fixture(scope="module")
def rows():
    torch.manual_seed(0)
    model = models.mlp([5, 8, 3]).eval()
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    train, test = [(x[:30], y[:30])], [(x[30:], y[30:])]
    task = di.Task(model, losses.cross_entropy)
    other = copy.deepcopy(model)  # another weight: another model
    with torch.no_grad():
        other[0].weight[0, 0] += 1e-3

    def grads(comp, data, m=model, **kw):
        return di.gradients(di.Task(m, losses.cross_entropy, **kw), data, comp, progress=False)

    d0 = di.Dropout(p=0.5, seed=0)
    k = d0.bind(task).dim
    return {
        "model": model,
        "train": grads(d0, train),
        "test": grads(di.Dropout(p=0.5, seed=0), test),
        "seed1": grads(di.Dropout(p=0.5, seed=1), test),
        "seed1_train": grads(di.Dropout(p=0.5, seed=1), train),
        "gaussian": grads(di.Gaussian(k=k, seed=0), test),
        "other_model": grads(di.Dropout(p=0.5, seed=0), test, m=other),
        "layer0": grads(di.Identity(), test, params=["0"]),
        "all_identity": grads(di.Identity(), train),
        "other": other,
    }


def calls(G_test, G_train, pre):
    return {
        "scores": lambda: di.scores(G_test, G_train, pre),
        "top_k": lambda: di.top_k(G_test, G_train, pre, k=3),
    }


def test_gradients_carry_their_source(rows, tmp_path):
    G = rows["train"]
    assert G.model == model_hash(rows["model"]) != model_hash(rows["other"])
    assert Source.of(G) == Source(G.compressor, G.model, tuple(G.param_names))
    assert Source.of(G.data) is None and Source.of(G.numpy()) is None
    stored = di.gradients(
        di.Task(rows["model"], losses.cross_entropy),
        [(torch.randn(4, 5), torch.randint(0, 3, (4,)))],
        di.Dropout(p=0.5, seed=0),
        path=tmp_path,
        progress=False,
    )
    loaded = di.Gradients.load(tmp_path)
    assert Source.of(loaded) == Source.of(stored) == Source.of(G)


@pytest.mark.parametrize("kind", ["identity", "fisher"])
@pytest.mark.parametrize(
    "test_rows, shown",
    [
        ("seed1", ['"seed": 0', '"seed": 1', "compressors"]),
        ("gaussian", ['"kind": "gaussian"', '"kind": "dropout"', "compressors"]),
        ("other_model", ["models"]),
    ],
)
def test_test_rows_of_another_source_are_refused(rows, kind, test_rows, shown):
    G_train, T = rows["train"], rows[test_rows]
    pre = di.Preconditioner.fit(G_train, kind=kind, damping=0.1)
    assert pre.source == Source.of(G_train)
    if test_rows == "other_model":
        shown = [*shown, T.model, G_train.model]  # both hashes, in full
    for name, call in calls(T, G_train, pre).items():
        with pytest.raises(ValueError, match="G_test and G_train come from different") as err:
            call()
        assert all(t in str(err.value) for t in shown), (name, str(err.value))
        assert "same" in str(err.value)  # the fix
    # test rows against the preconditioner alone (training rows as a plain tensor)
    with pytest.raises(ValueError, match="G_test and pre come from different"):
        di.scores(T, G_train.data, pre)
    # plain tensors are not checked: their scores are computed, equal to an explicit product
    S = di.scores(T.data, G_train.data, di.Preconditioner.fit(G_train.data, kind, damping=0.1))
    expect = pre.apply(T.data.double()) @ G_train.data.double().T
    torch.testing.assert_close(S.double(), expect, rtol=1e-6, atol=1e-6 * expect.abs().max())


def test_training_rows_against_a_preconditioner_of_another_source(rows):
    pre0 = di.Preconditioner.fit(rows["train"], damping=0.1)
    G1 = rows["seed1_train"]
    with pytest.raises(ValueError, match=r"G_train and pre come from different compressors"):
        di.self_influence(G1, pre0)
    with pytest.raises(ValueError, match=r"G_train and pre come from different compressors"):
        di.scores(G1.data, G1, pre0)
    di.self_influence(G1, di.Preconditioner.fit(G1, damping=0.1))  # its own: accepted
    di.self_influence(G1.data, pre0)  # plain rows: not checked


def test_parameter_selection_is_named_before_the_dimension(rows):
    G = rows["all_identity"]
    T = rows["layer0"]
    pre = di.Preconditioner.fit(G, kind="identity")
    with pytest.raises(ValueError, match=r"(?s)selections.*position 2: G_test \(end\)") as e:
        di.scores(T, G, pre)
    assert "'2.weight'" in str(e.value)


def test_exact_preconditioner_accepts_identity_rows_only(rows):
    """The hook for fit_exact: a full-parameter-space preconditioner whose source names the
    Identity compressor refuses compressed rows."""
    G = rows["all_identity"]
    pre = di.Preconditioner.fit(G.data, damping=0.1)  # stands in for fit_exact: no source
    assert pre.source is None
    exact = dataclasses.replace(pre, source=Source(compressor=di.Identity().fingerprint))
    di.scores(G, G, exact)
    msg = r'(?s)G_train and pre .*"kind": "dropout".*"kind": "identity"'
    with pytest.raises(ValueError, match=msg):
        di.self_influence(rows["train"], dataclasses.replace(exact, dim=rows["train"].shape[1]))


def test_source_survives_the_store_and_old_records_load_without_it(rows, tmp_path):
    st = Store(tmp_path)
    pre = di.Preconditioner.fit(rows["train"], damping=0.1)
    st.save_preconditioner(pre, "fisher")
    back = Store(tmp_path).load_preconditioner("fisher")
    assert back.source == pre.source == Source.of(rows["train"])
    with pytest.raises(ValueError, match="different compressors"):
        di.scores(rows["seed1"], rows["train"], back)
    # a record saved before sources were kept
    m = json.loads((tmp_path / "manifest.json").read_text())
    del m["preconditioners"]["fisher"]["source"]
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    old = Store(tmp_path).load_preconditioner("fisher")
    assert old.source is None
    torch.testing.assert_close(
        di.scores(rows["seed1"], rows["train"].data, old),
        di.scores(rows["seed1"].data, rows["train"].data, pre),
    )
