"""Models of the study, built from configurations only (no download)."""

from __future__ import annotations

from torch import nn


def mlp(sizes: list[int], activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Fully connected network with biases, e.g. ``mlp([64, 32, 10])``."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def gpt2(
    n_layer: int = 2,
    n_embd: int = 32,
    n_head: int = 2,
    vocab_size: int = 128,
    n_positions: int = 64,
) -> nn.Module:
    """A Hugging Face GPT-2 LM from a config (tied input/output embeddings), randomly initialised.

    Dropout is configured off so that train and eval mode give the same gradients.
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
    return GPT2LMHeadModel(cfg)


def bert_classifier(
    n_layer: int = 2,
    hidden: int = 32,
    n_head: int = 2,
    vocab_size: int = 128,
    num_labels: int = 3,
    max_positions: int = 64,
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
    return BertForSequenceClassification(cfg)


def fit_full_batch(
    model: nn.Module, loss, batch, l2: float = 0.0, tol: float = 1e-10, max_iter: int = 500
) -> float:
    """Minimise ``mean(loss(model, batch)) + l2/2 |theta|^2`` with L-BFGS to a tight gradient
    norm (convex models; the reference point for exact influence). Returns the final gradient
    norm."""
    import torch

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
        value = loss(model, batch).mean() + l2 / 2 * sum(p.pow(2).sum() for p in params)
        value.backward()
        return value

    opt.step(objective)
    objective()
    return float(torch.cat([p.grad.flatten() for p in params]).norm())
