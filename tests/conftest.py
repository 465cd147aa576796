"""Shared helpers: an independent per-sample loop to check dropinf against."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def loop_grads(model: nn.Module, loss, samples: list, names: list[str]) -> torch.Tensor:
    """(n, d) per-sample gradients by one backward per example, in the order of ``names``."""
    named = dict(model.named_parameters())
    rows = []
    for s in samples:
        out = loss(model, s)
        assert out.shape == (1,)
        gs = torch.autograd.grad(out.sum(), [named[n] for n in names], allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(named[n]) if g is None else g.to_dense()).flatten()
                    for n, g in zip(names, gs)
                ]
            )
        )
    return torch.stack(rows)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol=1e-4, atol=1e-6) -> None:
    """float32 agreement relative to the scale of the expected gradients."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol + 1e-5 * scale)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
