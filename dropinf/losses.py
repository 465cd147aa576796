"""Per-sample losses in the one signature dropinf uses: ``loss(model, batch) -> (B,)``.

The losses here are :class:`SplitLoss` objects: still called as ``loss(model, batch)``, they
also expose the model output and the loss as a function of that output, which is what the
Gauss-Newton curvature (``Preconditioner.fit_exact(..., kind="ggn")``) needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class SplitLoss:
    """``loss(model, batch) = from_output(output(model, batch), batch)``, (B,) per-sample.

    ``output`` returns the model's raw output for the batch (logits, with the samples along
    dimension 0); ``from_output`` maps it to per-sample losses (B,). The Gauss-Newton matrix
    is ``J^T H J`` with J the Jacobian of ``output`` and H the Hessian of ``from_output`` in
    the output, which is positive semi-definite for these (convex in the output) losses.
    """

    output: Callable[[nn.Module, object], Tensor]
    from_output: Callable[[Tensor, object], Tensor]
    name: str = "loss"

    def __call__(self, model: nn.Module, batch: object) -> Tensor:
        return self.from_output(self.output(model, batch), batch)

    def __repr__(self) -> str:
        if self.name != "loss":  # the ones defined here
            return f"dropinf.losses.{self.name}"
        parts = (
            getattr(f, "__module__", "?") + "." + getattr(f, "__qualname__", repr(f))
            for f in (self.output, self.from_output)
        )
        return f"SplitLoss({', '.join(parts)})"


def _ce_from_logits(logits: Tensor, batch: tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(logits, batch[1], reduction="none")


# Classification: ``batch = (inputs, labels)``; (B,) cross-entropy of ``model(inputs)``.
cross_entropy = SplitLoss(lambda model, batch: model(batch[0]), _ce_from_logits, "cross_entropy")


def _lm_output(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _lm_from_logits(logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
    ids, mask = batch["input_ids"], batch["attention_mask"]
    target, tmask = ids[:, 1:], mask[:, 1:].to(logits.dtype)
    tok = F.cross_entropy(logits[:, :-1].transpose(1, 2), target, reduction="none")
    return (tok * tmask).sum(1) / tmask.sum(1).clamp_min(1)


# Causal LM (Hugging Face style): mean next-token cross-entropy per sequence, (B,). ``batch``
# holds ``input_ids`` (B, T) and ``attention_mask`` (B, T); masked (padding) positions are
# neither predicted nor used as context, so they contribute nothing.
causal_lm = SplitLoss(_lm_output, _lm_from_logits, "causal_lm")


def _cls_from_logits(logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
    return F.cross_entropy(logits, batch["labels"], reduction="none")


# Hugging Face sequence classifier: ``batch`` has ``input_ids``, ``attention_mask`` and
# ``labels``; (B,) cross-entropy of the logits.
sequence_classification = SplitLoss(_lm_output, _cls_from_logits, "sequence_classification")
