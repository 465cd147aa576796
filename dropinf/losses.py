"""Per-sample losses in the one signature dropinf uses: ``loss(model, batch) -> (B,)``."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def cross_entropy(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Classification: ``batch = (inputs, labels)``; (B,) cross-entropy of ``model(inputs)``."""
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def causal_lm(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Causal LM (Hugging Face style): mean next-token cross-entropy per sequence, (B,).

    ``batch`` holds ``input_ids`` (B, T) and ``attention_mask`` (B, T); masked (padding)
    positions are neither predicted nor used as context, so they contribute nothing.
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    target, tmask = ids[:, 1:], mask[:, 1:].to(logits.dtype)
    tok = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    return (tok * tmask).sum(1) / tmask.sum(1).clamp_min(1)


def sequence_classification(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Hugging Face sequence classifier: ``batch`` has ``input_ids``, ``attention_mask``,
    ``labels``; (B,) cross-entropy of the logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits, batch["labels"], reduction="none")
