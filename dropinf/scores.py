"""Influence scores in blocks: ``score(test, train) = g_test^T (C + lambda I)^{-1} g_train``.

Positive = helpful: removing a training point with a positive score raises that test point's
loss (by about ``score / n``). Scoring runs in blocks over both sides, and each block's product
is written straight into the output, so peak memory beyond the output is about
``block_test * k`` numbers (the preconditioned queries), plus ``block_train * k`` when the
training rows must be converted (float16/bfloat16 rows, or float64 queries against float32 rows),
whatever n. Training rows may be memory-mapped (a store): each block is read once per test block.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .curvature import Preconditioner


def _rows(G) -> Tensor:
    G = torch.as_tensor(G)
    if G.ndim != 2:
        raise ValueError(f"gradients must be (n, k), got shape {tuple(G.shape)}")
    return G


def _check_blocks(**sizes: int) -> None:
    for name, v in sizes.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}={v!r} must be an integer >= 1 (rows per block)")


def _check_pair(G_test: Tensor, G_train: Tensor, pre: Preconditioner) -> None:
    if G_test.shape[1] != G_train.shape[1]:
        raise ValueError(
            f"test gradients have dimension {G_test.shape[1]} and training gradients "
            f"{G_train.shape[1]}: they must come from the same compressor"
        )
    if pre.dim != G_train.shape[1]:
        raise ValueError(
            f"preconditioner of dimension {pre.dim} does not match gradients of dimension "
            f"{G_train.shape[1]}"
        )


def scores(
    G_test, G_train, pre: Preconditioner, block_test: int = 1024, block_train: int = 65536
) -> Tensor:
    """(n_test, n_train) influence scores (float32, or float64 for float64 gradients);
    positive = helpful."""
    G_test, G_train = _rows(G_test), _rows(G_train)
    _check_pair(G_test, G_train, pre)
    _check_blocks(block_test=block_test, block_train=block_train)
    dtype = torch.promote_types(G_test.dtype, torch.float32)
    out = torch.empty(G_test.shape[0], G_train.shape[0], dtype=dtype)
    for i in range(0, G_test.shape[0], block_test):
        q = pre.apply(G_test[i : i + block_test])
        for j in range(0, G_train.shape[0], block_train):
            g = G_train[j : j + block_train].to(q.dtype)
            torch.matmul(q, g.T, out=out[i : i + len(q), j : j + len(g)])
    return out


def self_influence(G_train, pre: Preconditioner, block: int = 4096) -> Tensor:
    """(n,) ``g_i^T (C + lambda I)^{-1} g_i``: how much each point supports its own loss."""
    G = _rows(G_train)
    _check_pair(G, G, pre)
    _check_blocks(block=block)
    out = torch.empty(G.shape[0], dtype=torch.promote_types(G.dtype, torch.float32))
    for i in range(0, G.shape[0], block):
        q = pre.apply(G[i : i + block])
        out[i : i + len(q)] = (q * G[i : i + block].to(q.dtype)).sum(1)
    return out


def top_k(
    G_test,
    G_train,
    pre: Preconditioner,
    k: int,
    largest: bool = True,
    block_test: int = 1024,
    block_train: int = 65536,
) -> tuple[Tensor, Tensor]:
    """Per test point, the k training points with the largest (most helpful) scores, or the
    smallest (most harmful) with ``largest=False``: ``(indices, values)``, each (n_test, k),
    sorted. Never holds the full score matrix."""
    G_test, G_train = _rows(G_test), _rows(G_train)
    _check_pair(G_test, G_train, pre)
    _check_blocks(block_test=block_test, block_train=block_train)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= G_train.shape[0]:
        raise ValueError(
            f"k={k!r} must be an integer between 1 and the {G_train.shape[0]} training points"
        )
    idx_out, val_out = [], []
    for i in range(0, G_test.shape[0], block_test):
        q = pre.apply(G_test[i : i + block_test])
        best_v = torch.empty(len(q), 0, dtype=q.dtype)
        best_i = torch.empty(len(q), 0, dtype=torch.long)
        for j in range(0, G_train.shape[0], block_train):
            s = q @ G_train[j : j + block_train].to(q.dtype).T
            v = torch.cat([best_v, s], 1)
            ix = torch.cat([best_i, torch.arange(j, j + s.shape[1]).expand(len(q), -1)], 1)
            best_v, pos = v.topk(min(k, v.shape[1]), dim=1, largest=largest, sorted=True)
            best_i = ix.gather(1, pos)
        idx_out.append(best_i)
        val_out.append(best_v)
    return torch.cat(idx_out), torch.cat(val_out)
