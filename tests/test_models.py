"""dropinf.study.models: shapes and parameter counts against closed forms, seeded construction,
and the minibatch trainer (determinism, loss decrease, weight decay and schedule semantics)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, loop_grads
from torch import nn

import dropinf as di
from dropinf import losses
from dropinf.study import models


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def resnet9_count(w: int, k: int, norm: str) -> int:
    """Closed form: 3x3 convs 3->w, w->2w, 2x(2w->2w), 2w->4w, 4w->8w, 2x(8w->8w); two
    parameters per channel for each norm (or a bias per channel without); head 8w x k."""
    convs = [(3, w), (w, 2 * w), (2 * w, 2 * w), (2 * w, 2 * w), (2 * w, 4 * w), (4 * w, 8 * w)]
    convs += [(8 * w, 8 * w)] * 2
    per_channel = 1 if norm == "none" else 2
    return sum(9 * a * b + per_channel * b for a, b in convs) + 8 * w * k


@pytest.mark.parametrize("norm", models.RESNET9_NORMS)
def test_resnet9_shapes_and_parameter_count(norm):
    m = models.resnet9(num_classes=7, width=4, norm=norm, seed=0).eval()
    assert m(torch.randn(3, 3, 32, 32)).shape == (3, 7)
    assert models.num_params(m) == resnet9_count(4, 7, norm)
    kinds = {type(x) for x in m.modules()}
    assert (nn.BatchNorm2d in kinds) == (norm == "batch")
    assert (nn.GroupNorm in kinds) == (norm == "group")


def test_resnet9_full_size_is_the_dawnbench_model():
    m = models.resnet9(seed=0)
    assert models.num_params(m) == resnet9_count(64, 10, "batch") == 6_573_120
    with pytest.raises(ValueError, match="norm"):
        models.resnet9(norm="layer")


def test_cnn_shape_count_and_per_sample_gradients():
    m = models.cnn(channels=(4, 6), num_classes=10, seed=0).eval()
    x, y = torch.randn(5, 1, 8, 8), torch.arange(5)
    assert m(x).shape == (5, 10)
    c1, c2, k, s = 4, 6, 10, 8
    assert models.num_params(m) == 10 * c1 + 9 * c1 * c2 + c2 + (s // 4) ** 2 * c2 * k + k
    assert models.num_params(models.cnn()) == 6090
    task = di.Task(m, losses.cross_entropy)
    g = di.gradients(task, [(x, y)], di.Identity(), progress=False).data
    ref = loop_grads(m, losses.cross_entropy, [(x[i : i + 1], y[i : i + 1]) for i in range(5)],
                     task.param_names)  # fmt: skip
    assert_close(g, ref)
    with pytest.raises(ValueError, match="image_size"):
        models.cnn(image_size=6)


def test_logistic_regression_and_l2_penalty():
    m = models.logistic_regression(30, 2, seed=1)
    assert isinstance(m, nn.Linear) and m(torch.randn(4, 30)).shape == (4, 2)
    by_hand = 0.3 / 2 * (m.weight.detach().pow(2).sum() + m.bias.detach().pow(2).sum())
    torch.testing.assert_close(models.l2_penalty(m, 0.3).detach(), by_hand)
    with pytest.raises(ValueError, match="n_classes"):
        models.logistic_regression(30, 0)


def test_seeded_constructors_are_reproducible_and_leave_the_global_rng_alone():
    torch.manual_seed(11)
    state = torch.get_rng_state()
    a = models.mlp([5, 7, 3], seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert _same_weights(a, models.mlp([5, 7, 3], seed=2))
    assert not _same_weights(a, models.mlp([5, 7, 3], seed=3))
    assert _same_weights(models.gpt2(seed=1), models.gpt2_ladder("nano", seed=1)) is False
    assert _same_weights(models.gpt2_ladder("nano", seed=1), models.gpt2_ladder("nano", seed=1))
    with pytest.raises(TypeError, match="seed"):
        models.mlp([2, 2], seed=1.5)


# Parameter counts of the released GPT-2 checkpoints (tied embeddings), as Hugging Face reports.
RELEASED = {"small": 124_439_808, "medium": 354_823_168, "large": 774_030_080, "xl": 1_557_611_200}


def test_gpt2_ladder_counts_match_the_formula_hugging_face_and_the_releases():
    from transformers import GPT2Config, GPT2LMHeadModel

    counts = []
    for name, s in models.GPT2_LADDER.items():
        cfg = GPT2Config(n_layer=s.n_layer, n_embd=s.n_embd, n_head=s.n_head,
                         vocab_size=s.vocab_size, n_positions=s.n_positions)  # fmt: skip
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            hf = GPT2LMHeadModel(cfg)
        assert s.num_params == models.num_params(hf), name
        assert s.n_embd % s.n_head == 0
        counts.append(s.num_params)
        if name in RELEASED:
            assert s.num_params == RELEASED[name]
    assert counts == sorted(counts)  # a ladder: strictly growing
    nano = models.gpt2_ladder("nano", seed=0)
    assert models.num_params(nano) == models.GPT2_LADDER["nano"].num_params
    assert nano.config.vocab_size == 256 and nano.config.eos_token_id == 255
    with pytest.raises(ValueError, match="rung"):
        models.gpt2_ladder("huge")


# --------------------------------------------------------------------------------------------
# Trainer


def _blobs(n=96, d=6, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    x = torch.randn(n, d, generator=g) + 2.0 * torch.eye(k, d)[y]
    return x, y


def test_train_is_deterministic_and_lowers_the_loss():
    x, y = _blobs()

    def run(seed):
        m = models.mlp([6, 16, 3], seed=0)
        return models.train(m, losses.cross_entropy, (x, y), seed=seed, epochs=8, batch_size=16,
                            lr=1e-2, weight_decay=1e-3, progress=False)  # fmt: skip

    (m1, h1), (m2, h2), (m3, _) = run(5), run(5), run(6)
    assert _same_weights(m1, m2) and h1.epoch_loss == h2.epoch_loss
    assert not _same_weights(m1, m3)  # the seed decides the data order
    assert h1.steps == 8 * 6 and len(h1.epoch_loss) == 8 and not m1.training
    before = losses.cross_entropy(models.mlp([6, 16, 3], seed=0), (x, y)).mean().item()
    after = losses.cross_entropy(m1, (x, y)).mean().item()
    assert after < 0.5 * before and h1.epoch_loss[-1] < h1.epoch_loss[0]


def test_train_with_dict_batches_and_dropout_is_deterministic():
    ids = torch.randint(0, 32, (12, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def run():
        m = models.gpt2(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8, seed=0)
        with models.seeded(0):  # dropout draws come from the global RNG: train seeds it
            net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2))
        xa = torch.randn(10, 4, generator=torch.Generator().manual_seed(1))
        models.train(net, losses.cross_entropy, (xa, torch.arange(10) % 2), seed=3, epochs=2,
                     batch_size=4, progress=False)  # fmt: skip
        models.train(m, losses.causal_lm, batch, seed=3, epochs=2, batch_size=4, progress=False)
        return m, net

    (a, na), (b, nb) = run(), run()
    assert _same_weights(a, b) and _same_weights(na, nb)


def test_train_with_weight_decay_reaches_the_l_bfgs_optimum():
    """Full-batch SGD on mean loss + wd/2 |theta|^2 stops where fit_full_batch(l2=wd) does."""
    from dropinf.study import data

    d = data.breast_cancer(seed=0)
    batch = (d.x_train.double(), d.y_train)
    ref = models.logistic_regression(30, 2, seed=0).double()
    assert models.fit_full_batch(ref, losses.cross_entropy, batch, l2=0.1) < 1e-8
    m = models.logistic_regression(30, 2, seed=0).double()
    models.train(m, losses.cross_entropy, batch, seed=0, epochs=400, batch_size=len(d.y_train),
                 lr=0.2, optimizer="sgd", weight_decay=0.1, progress=False)  # fmt: skip
    for p, q in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("schedule", "warmup", "factor_sum"), [
    ("constant", 0.0, 4.0),  # 1 + 1 + 1 + 1
    ("linear", 0.0, 2.5),  # 4/4 + 3/4 + 2/4 + 1/4
    ("linear", 0.5, 3.0),  # 1/2 + 1 (warm-up), then 2/2 + 1/2
])  # fmt: skip
def test_train_schedule_scales_each_step(schedule, warmup, factor_sum):
    """With a constant unit gradient, SGD without momentum moves a weight by lr * sum of the
    step factors."""
    m = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(m.weight)

    def loss(model, batch):
        (x,) = batch
        return model(x).squeeze(1)  # gradient of the mean w.r.t. the weight: mean(x) = 1

    models.train(m, loss, (torch.ones(8, 1),), seed=0, epochs=2, batch_size=4, lr=0.1,
                 optimizer="sgd", momentum=0.0, schedule=schedule, warmup=warmup,
                 progress=False)  # fmt: skip
    assert m.weight.item() == pytest.approx(-0.1 * factor_sum, abs=1e-6)


def test_train_with_augmentation_is_deterministic():
    from dropinf.study import data

    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.arange(8) % 10

    def run():
        m = models.resnet9(width=2, norm="group", seed=0)
        return models.train(m, losses.cross_entropy, (x, y), seed=1, epochs=1, batch_size=4,
                            augment=data.cifar10_augment, optimizer="sgd", lr=0.05,
                            progress=False)[0]  # fmt: skip

    assert _same_weights(run(), run())


def test_train_rejects_bad_arguments():
    x, y = _blobs(8)
    m = models.mlp([6, 3], seed=0)
    for kwargs, match in [
        ({"optimizer": "lion"}, "optimizer"),
        ({"lr": 0.0}, "lr"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"schedule": "cosine"}, "schedule"),
        ({"epochs": 0}, "epochs"),
    ]:
        with pytest.raises(ValueError, match=match):
            models.train(m, losses.cross_entropy, (x, y), seed=0, progress=False, **kwargs)
