"""Models of the study, built from configurations only (no download), and seeded training loops.

Every constructor takes ``seed``: with an int the initial weights are a function of it alone
(the global torch RNG is left as it was); with ``None`` they come from the global torch RNG.
:func:`train` (minibatch SGD/Adam) and :func:`fit_full_batch` (L-BFGS) minimise the same
objective, ``mean(loss(model, batch)) + l2/2 |theta|^2`` (:func:`l2_penalty`), so a model
trained by either sits near a stationary point of the regularised loss that exact influence
assumes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._seed import seeded


def l2_penalty(model: nn.Module, l2: float) -> Tensor:
    """``l2 / 2 * |theta|^2`` over the parameters that require gradients (biases included): the
    regulariser of :func:`fit_full_batch` and :func:`train`, a scalar Tensor."""
    params = [p for p in model.parameters() if p.requires_grad]
    return l2 / 2 * sum(p.pow(2).sum() for p in params)


# --------------------------------------------------------------------------------------------
# Small models


def logistic_regression(n_features: int, n_classes: int, seed: int | None = None) -> nn.Linear:
    """Multinomial logistic regression: ``nn.Linear(n_features, n_classes)`` giving logits.

    Use with :func:`dropinf.losses.cross_entropy` and an ``l2 > 0`` (then the objective is
    strictly convex); binary tasks use ``n_classes=2`` (the softmax of two logits is the logistic
    function of their difference). Inputs (B, n_features) float, outputs (B, n_classes).
    """
    _check_positive(n_features=n_features, n_classes=n_classes)
    with seeded(seed):
        return nn.Linear(n_features, n_classes)


def mlp(
    sizes: list[int], activation: type[nn.Module] = nn.ReLU, seed: int | None = None
) -> nn.Sequential:
    """Fully connected network with biases, e.g. ``mlp([64, 32, 10])``."""
    layers: list[nn.Module] = []
    with seeded(seed):
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(activation())
    return nn.Sequential(*layers)


def cnn(
    channels: tuple[int, int] = (16, 32),
    num_classes: int = 10,
    image_size: int = 8,
    seed: int | None = None,
) -> nn.Sequential:
    """Small CNN for the 8x8 digits: two (3x3 conv, ReLU, 2x2 max-pool) stages and a linear head.

    Input (B, 1, s, s) with ``s = image_size`` divisible by 4, output (B, num_classes) logits.
    Parameters: ``10 c1 + 9 c1 c2 + c2 + (s/4)^2 c2 K + K`` (6,090 by default). Only Conv2d
    and Linear carry parameters, so every per-sample gradient takes the hook path.
    """
    c1, c2 = channels
    _check_positive(c1=c1, c2=c2, num_classes=num_classes, image_size=image_size)
    if image_size % 4:
        raise ValueError(f"image_size={image_size} must be divisible by 4 (two 2x2 poolings)")
    with seeded(seed):
        return nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c2 * (image_size // 4) ** 2, num_classes),
        )


class Residual(nn.Module):
    """``x + body(x)``."""

    def __init__(self, *body: nn.Module):
        super().__init__()
        self.body = nn.Sequential(*body)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class Scale(nn.Module):
    """Multiply by a fixed constant (ResNet-9's 0.125 on the logits)."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: Tensor) -> Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


RESNET9_NORMS = ("batch", "group", "none")


def resnet9(
    num_classes: int = 10, width: int = 64, norm: str = "batch", seed: int | None = None
) -> nn.Sequential:
    """The DAWNBench ResNet-9 (Page, "How to train your ResNet") for (B, 3, 32, 32) inputs.

    prep conv(3 -> w); layer1 conv(w -> 2w), max-pool, residual(conv, conv); layer2
    conv(2w -> 4w), max-pool; layer3 conv(4w -> 8w), max-pool, residual(conv, conv); global
    max-pool, linear(8w -> K, no bias), times 0.125. Each conv is 3x3 and followed by a norm and
    a ReLU. ``width=64`` gives 6,573,120 parameters with batch norm.

    ``norm``:
        ``"batch"``: BatchNorm2d, bias-free convs (the original). Per-sample gradients of the
        BatchNorm weights go through dropinf's slower ``torch.func`` path (the convs use hooks);
        select only the conv/linear parameters in :class:`dropinf.Task` to avoid that, or use
        ``"none"``. Featurise in eval mode (running statistics), as dropinf does.
        ``"group"``: GroupNorm with ``gcd(8, channels)`` groups (per-sample statistics, so train
        and eval mode agree); also on the ``torch.func`` path.
        ``"none"``: no normalisation, convs with biases: every parameter takes the hook path.
    """
    if norm not in RESNET9_NORMS:
        raise ValueError(f"norm={norm!r} must be one of {RESNET9_NORMS}")
    _check_positive(num_classes=num_classes, width=width)

    def conv_block(c_in: int, c_out: int) -> list[nn.Module]:
        layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=norm == "none")]
        if norm == "batch":
            layers.append(nn.BatchNorm2d(c_out))
        elif norm == "group":
            layers.append(nn.GroupNorm(math.gcd(8, c_out), c_out))
        return [*layers, nn.ReLU()]

    w = width
    with seeded(seed):
        return nn.Sequential(
            *conv_block(3, w),
            *conv_block(w, 2 * w),
            nn.MaxPool2d(2),
            Residual(*conv_block(2 * w, 2 * w), *conv_block(2 * w, 2 * w)),
            *conv_block(2 * w, 4 * w),
            nn.MaxPool2d(2),
            *conv_block(4 * w, 8 * w),
            nn.MaxPool2d(2),
            Residual(*conv_block(8 * w, 8 * w), *conv_block(8 * w, 8 * w)),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
            nn.Linear(8 * w, num_classes, bias=False),
            Scale(0.125),
        )


# --------------------------------------------------------------------------------------------
# Transformers (Hugging Face, from configs)


def gpt2(
    n_layer: int = 2,
    n_embd: int = 32,
    n_head: int = 2,
    vocab_size: int = 128,
    n_positions: int = 64,
    seed: int | None = None,
) -> nn.Module:
    """A Hugging Face GPT-2 LM from a config (tied input/output embeddings), randomly initialised.

    Dropout is configured off so that train and eval mode give the same gradients. The last
    token id, ``vocab_size - 1``, is the BOS/EOS token (byte 255 for a byte-level vocabulary,
    which never occurs in UTF-8 text: :func:`dropinf.study.data.stdlib_corpus` uses it as
    separator).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        vocab_size=vocab_size,
        n_positions=n_positions,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=vocab_size - 1,
        eos_token_id=vocab_size - 1,
    )
    with seeded(seed):
        return GPT2LMHeadModel(cfg)


@dataclass(frozen=True)
class GPT2Shape:
    """A GPT-2 architecture: layers, width, heads, vocabulary and context length."""

    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    n_positions: int

    @property
    def num_params(self) -> int:
        """Parameter count with tied embeddings: each block has ``12 d^2 + 13 d`` (attention
        ``4 d^2 + 4 d``, MLP ``8 d^2 + 5 d``, two layer norms ``4 d``), plus token and position
        embeddings ``(V + P) d`` and the final layer norm ``2 d``."""
        d = self.n_embd
        return (
            self.n_layer * (12 * d * d + 13 * d) + (self.vocab_size + self.n_positions) * d + 2 * d
        )

    def build(self, seed: int | None = None) -> nn.Module:
        """The randomly initialised :func:`gpt2` of this shape."""
        return gpt2(
            n_layer=self.n_layer,
            n_embd=self.n_embd,
            n_head=self.n_head,
            vocab_size=self.vocab_size,
            n_positions=self.n_positions,
            seed=seed,
        )


# From tiny (byte-level vocabulary, for models trained here on dropinf.study.data.stdlib_corpus) to
# the released GPT-2 shapes (BPE vocabulary of 50,257, context 1,024); "distil" is distilgpt2's
# shape.
GPT2_LADDER: dict[str, GPT2Shape] = {
    "nano": GPT2Shape(2, 32, 2, 256, 256),
    "micro": GPT2Shape(2, 64, 4, 256, 256),
    "mini": GPT2Shape(4, 128, 4, 256, 256),
    "distil": GPT2Shape(6, 768, 12, 50257, 1024),
    "small": GPT2Shape(12, 768, 12, 50257, 1024),
    "medium": GPT2Shape(24, 1024, 16, 50257, 1024),
    "large": GPT2Shape(36, 1280, 20, 50257, 1024),
    "xl": GPT2Shape(48, 1600, 25, 50257, 1024),
}


def gpt2_ladder(name: str, seed: int | None = None) -> nn.Module:
    """The :data:`GPT2_LADDER` model ``name``, randomly initialised from ``seed``."""
    if name not in GPT2_LADDER:
        raise ValueError(
            f"name={name!r} is not a GPT-2 ladder rung; choose from {list(GPT2_LADDER)}"
        )
    return GPT2_LADDER[name].build(seed)


def bert_classifier(
    n_layer: int = 2,
    hidden: int = 32,
    n_head: int = 2,
    vocab_size: int = 128,
    num_labels: int = 3,
    max_positions: int = 64,
    seed: int | None = None,
) -> nn.Module:
    """A tiny Hugging Face BERT with a sequence-classification head, from a config."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=n_layer,
        num_attention_heads=n_head,
        intermediate_size=2 * hidden,
        max_position_embeddings=max_positions,
        num_labels=num_labels,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    with seeded(seed):
        return BertForSequenceClassification(cfg)


def num_params(model: nn.Module) -> int:
    """Number of parameters (each shared tensor counted once)."""
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# Training


def fit_full_batch(
    model: nn.Module, loss, batch, l2: float = 0.0, tol: float = 1e-10, max_iter: int = 500
) -> float:
    """Minimise ``mean(loss(model, batch)) + l2/2 |theta|^2`` with L-BFGS to a tight gradient
    norm (convex models; the reference point for exact influence). Returns the final gradient
    norm."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tol,
        tolerance_change=0.0,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def objective():
        opt.zero_grad()
        value = loss(model, batch).mean() + l2_penalty(model, l2)
        value.backward()
        return value

    opt.step(objective)
    objective()
    return float(torch.cat([p.grad.flatten() for p in params]).norm())


@dataclass
class History:
    """What :func:`train` did: the mean training loss of each epoch (without the L2 term, over
    the samples seen), the number of optimiser steps and the seed."""

    epoch_loss: list[float] = field(default_factory=list)
    steps: int = 0
    seed: int = 0


OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "linear")


def train(
    model: nn.Module,
    loss: Callable[[nn.Module, object], Tensor],
    data: object,
    *,
    seed: int,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-3,
    optimizer: str = "adam",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    schedule: str = "constant",
    warmup: float = 0.0,
    augment: Callable[[object, torch.Generator], object] | None = None,
    progress: bool = True,
    desc: str = "train",
) -> tuple[nn.Module, History]:
    """Minibatch training of ``model`` in place on ``mean(loss) + weight_decay/2 |theta|^2``.

    Args:
        model: trained where its parameters live (batches are moved there); left in eval mode.
        loss: ``loss(model, batch) -> (B,)`` per-sample losses (:mod:`dropinf.losses`).
        data: what :func:`dropinf.study.data.tensor_loader` accepts: a tuple of tensors such as
            ``(x, y)``, a dict of tensors (``input_ids``...), or a map-style Dataset.
        seed: decides the data order, ``augment``'s draws and any randomness inside the model
            (dropout); the global RNG is restored afterwards. Initialise the model from its own
            seed (``mlp(..., seed=s)``). Same seed on CPU gives bit-identical weights.
        epochs, batch_size, lr: as usual; the last partial batch is kept.
        optimizer: ``"adam"`` or ``"sgd"`` (with ``momentum``, Nesterov when momentum > 0).
        weight_decay: the L2 coefficient, coupled into the gradient (not AdamW's decoupled decay)
            so that training targets the same stationary point as ``fit_full_batch(l2=...)``.
        schedule: ``"constant"``, or ``"linear"``: warm up linearly over the first ``warmup``
            fraction of the steps, then decay linearly to zero (the ResNet-9 recipe).
        augment: ``augment(batch, generator) -> batch`` applied to each training batch on the
            model's device, e.g. :func:`dropinf.study.data.cifar10_augment`.

    Returns:
        ``(model, history)``.
    """
    from ..task import to_device
    from .data import tensor_loader

    _check_positive(epochs=epochs, batch_size=batch_size)
    if not lr > 0:
        raise ValueError(f"lr={lr} must be positive")
    if weight_decay < 0:
        raise ValueError(f"weight_decay={weight_decay} must be >= 0")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} must be one of {OPTIMIZERS}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} must be one of {SCHEDULES}")
    if not 0 <= warmup < 1:
        raise ValueError(f"warmup={warmup} must be in [0, 1)")

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    loader = tensor_loader(data, batch_size=batch_size, shuffle=True, seed=seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(
            params, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay
        )
    total = epochs * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(schedule, warmup, total))
    gen = torch.Generator(device=device).manual_seed(seed)
    history = History(seed=seed)

    model.train()
    with seeded(seed, device):
        bar = tqdm(range(epochs), desc=desc, disable=not progress, unit="epoch")
        for _ in bar:
            total_loss, count = 0.0, 0
            for batch in loader:
                batch = to_device(batch, device)
                if augment is not None:
                    batch = augment(batch, gen)
                per_sample = loss(model, batch)
                value = per_sample.mean()
                opt.zero_grad(set_to_none=True)
                value.backward()
                opt.step()
                sched.step()
                total_loss += float(value.detach()) * per_sample.shape[0]
                count += per_sample.shape[0]
                history.steps += 1
            history.epoch_loss.append(total_loss / count)
            bar.set_postfix(loss=f"{history.epoch_loss[-1]:.4g}")
    model.eval()
    return model, history


def _lr_factor(schedule: str, warmup: float, total: int) -> Callable[[int], float]:
    if schedule == "constant":
        return lambda step: 1.0
    n_warm = round(warmup * total)

    def factor(step: int) -> float:  # step counts the steps taken so far
        if step < n_warm:
            return (step + 1) / n_warm
        return max(0.0, (total - step) / max(1, total - n_warm))

    return factor


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r} must be a positive int")
