"""Influence scores in blocks: ``score(test, train) = g_test^T (C + lambda I)^{-1} g_train``.

Positive = helpful: removing a training point with a positive score raises that test point's
loss (by about ``score / n``). Training rows may be memory-mapped (a store): each block is read
once per test block.

Precision: the preconditioned queries ``q = (C + lambda I)^{-1} g_test`` have components up to
``1 / lambda`` times larger than the score they give, which cancel in ``q . g_train``. In float32
that product (and rounding q to float32) costs about ``u32 * sum_i |q_i g_i|`` per score, which
at small damping is many times the score itself (a 517-parameter MLP's Fisher scores: errors of
4e-5 of the largest score at damping 1e-3, 4e-3 at 1e-5). So with a preconditioner other than
``identity`` the queries stay in float64 and the products are float64 (``product_dtype``; about
twice the time of float32 products on a CPU): the result's error is then its own rounding to the
output dtype, plus the float64 solve's, about ``u64 * cond(C + lambda I) * |q| |g|``. With
``identity`` nothing is amplified and float32 rows give float32 products (as ``torch.matmul``).
The output is float64 when either input is float64, else float32 (float16/bfloat16 rows
included).

Memory beyond the output: the query block (``block_test * k``, float64 unless identity) and,
when the training rows must be converted (float64 products of float32 rows, 16-bit rows) or the
product rounded into the output, pieces of at most 16 MiB of converted rows and of products,
whatever n.

Checks: test rows, training rows and the preconditioner must come from one compressor, model and
parameter selection where they carry their :class:`~dropinf.curvature.Source` (``Gradients`` do,
and preconditioners fitted on them; plain tensors are not checked); a row with a NaN or inf entry
is refused, naming the argument and the row.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from .curvature import Preconditioner, Source, check_finite, check_sources

_PIECE_BYTES = 1 << 24  # a converted block of training rows, or of products, is at most this


def _rows(G, name: str) -> Tensor:
    G = torch.as_tensor(G)
    if G.ndim != 2:
        raise ValueError(f"{name} must be (n, k) gradients, got shape {tuple(G.shape)}")
    return G


def _check_blocks(**sizes: int) -> None:
    for name, v in sizes.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}={v!r} must be an integer >= 1 (rows per block)")


def _check_pre(pre: Preconditioner, *sources: tuple[str, object]) -> None:
    if not isinstance(pre, Preconditioner):
        raise TypeError(
            f"pre must be a dropinf.Preconditioner (Preconditioner.fit(G_train)), got "
            f"{type(pre).__name__}"
        )
    check_sources(**{name: Source.of(G) for name, G in sources}, pre=pre.source)


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


def _dtypes(
    G_test: Tensor, G_train: Tensor, pre: Preconditioner, product_dtype: torch.dtype | None
) -> tuple[torch.dtype, torch.dtype]:
    """(output dtype, dtype of the queries and products); see the module docstring."""
    out = torch.float64 if torch.float64 in (G_test.dtype, G_train.dtype) else torch.float32
    if product_dtype is None:
        return out, out if pre.kind == "identity" else torch.float64
    if product_dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"product_dtype={product_dtype!r}; use None (float64 unless pre is identity), "
            "torch.float64, or torch.float32 (faster, with errors up to u32 / damping)"
        )
    return out, product_dtype


def _queries(G: Tensor, i: int, block: int, pre: Preconditioner, dtype, name: str) -> Tensor:
    """The preconditioned rows ``i .. i + block`` of G, as ``dtype``."""
    t = G[i : i + block]
    check_finite(t, name, i)
    return pre.apply(t, dtype=dtype)


def _pieces(
    G: Tensor, block: int, dtype: torch.dtype, width: int, direct: bool, check: bool
) -> Iterator[tuple[int, Tensor]]:
    """``(j, G[j : j + rows] as dtype)`` over G. ``rows`` is ``block``, or fewer when the rows
    are converted or (``direct`` False) their product with ``width`` queries is a temporary, so
    that each stays under ``_PIECE_BYTES``. ``check``: refuse NaN/inf rows (as G_train)."""
    rows = block
    if not direct or G.dtype != dtype:
        rows = min(block, max(1, _PIECE_BYTES // (dtype.itemsize * max(G.shape[1], width))))
    for j in range(0, G.shape[0], rows):
        g = G[j : j + rows]
        if check:
            check_finite(g, "G_train", j)
        yield j, g.to(dtype)


def scores(
    G_test,
    G_train,
    pre: Preconditioner,
    block_test: int = 1024,
    block_train: int = 65536,
    product_dtype: torch.dtype | None = None,
) -> Tensor:
    """(n_test, n_train) influence scores; positive = helpful.

    Float64 when either input is float64, else float32. ``product_dtype``: of the queries and
    products, by default float64 unless ``pre`` is ``identity`` (see the module docstring for
    why; ``torch.float32`` is about twice as fast, with errors up to about ``u32 / damping``
    relative to the largest score). Refuses rows or a preconditioner of different sources, and
    rows with a NaN or inf entry (ValueError naming them).
    """
    _check_pre(pre, ("G_test", G_test), ("G_train", G_train))
    G_test, G_train = _rows(G_test, "G_test"), _rows(G_train, "G_train")
    _check_pair(G_test, G_train, pre)
    _check_blocks(block_test=block_test, block_train=block_train)
    dtype, work = _dtypes(G_test, G_train, pre, product_dtype)
    out = torch.empty(G_test.shape[0], G_train.shape[0], dtype=dtype)
    for i in range(0, G_test.shape[0], block_test):
        q = _queries(G_test, i, block_test, pre, work, "G_test")
        rows = _pieces(G_train, block_train, work, len(q), work == dtype, check=i == 0)
        for j, g in rows:
            block = out[i : i + len(q), j : j + len(g)]
            if work == dtype:
                torch.matmul(q, g.T, out=block)
            else:
                block.copy_(q @ g.T)
    return out


def self_influence(
    G_train, pre: Preconditioner, block: int = 4096, product_dtype: torch.dtype | None = None
) -> Tensor:
    """(n,) ``g_i^T (C + lambda I)^{-1} g_i``: how much each point supports its own loss.

    Dtypes, precision and checks as :func:`scores`; memory about ``2 * block * k`` numbers of
    the product dtype."""
    _check_pre(pre, ("G_train", G_train))
    G = _rows(G_train, "G_train")
    _check_pair(G, G, pre)
    _check_blocks(block=block)
    dtype, work = _dtypes(G, G, pre, product_dtype)
    out = torch.empty(G.shape[0], dtype=dtype)
    for i in range(0, G.shape[0], block):
        q = _queries(G, i, block, pre, work, "G_train")
        out[i : i + len(q)] = (q * G[i : i + block].to(work)).sum(1)
    return out


def top_k(
    G_test,
    G_train,
    pre: Preconditioner,
    k: int,
    largest: bool = True,
    block_test: int = 1024,
    block_train: int = 65536,
    product_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Per test point, the k training points with the largest (most helpful) scores, or the
    smallest (most harmful) with ``largest=False``: ``(indices, values)``, each (n_test, k),
    sorted. Equal scores rank by training index, the lower first (so a tie at the k-th place
    keeps the lower index). Never holds the full score matrix. Dtypes, precision and checks as
    :func:`scores` (the ranking uses the product dtype; values are then rounded to the output
    dtype)."""
    idx, val, dtype = _top_k(
        G_test, G_train, pre, k, largest, block_test, block_train, product_dtype
    )
    return idx, val.to(dtype)


def _top_k(
    G_test,
    G_train,
    pre: Preconditioner,
    k: int,
    largest: bool,
    block_test: int,
    block_train: int,
    product_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor, torch.dtype]:
    """:func:`top_k` with the values in the product dtype, and the output dtype."""
    _check_pre(pre, ("G_test", G_test), ("G_train", G_train))
    G_test, G_train = _rows(G_test, "G_test"), _rows(G_train, "G_train")
    _check_pair(G_test, G_train, pre)
    _check_blocks(block_test=block_test, block_train=block_train)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= G_train.shape[0]:
        raise ValueError(
            f"k={k!r} must be an integer between 1 and the {G_train.shape[0]} training points"
        )
    dtype, work = _dtypes(G_test, G_train, pre, product_dtype)
    idx_out, val_out = [], []
    for i in range(0, G_test.shape[0], block_test):
        q = _queries(G_test, i, block_test, pre, work, "G_test")
        best_v = torch.empty(len(q), 0, dtype=work)
        best_i = torch.empty(len(q), 0, dtype=torch.long)
        for j, g in _pieces(G_train, block_train, work, len(q), False, check=i == 0):
            s = q @ g.T
            v = torch.cat([best_v, s], 1)
            ix = torch.cat([best_i, torch.arange(j, j + s.shape[1]).expand(len(q), -1)], 1)
            best_v, best_i = best(v, ix, k, largest)
        idx_out.append(best_i)
        val_out.append(best_v)
    return torch.cat(idx_out), torch.cat(val_out), dtype


def best(v: Tensor, ix: Tensor, k: int, largest: bool = True) -> tuple[Tensor, Tensor]:
    """The ``min(k, m)`` best entries of each row of ``v`` (r, m) and their ``ix`` (r, m),
    sorted: by value, then equal values by position in the row, the earlier first. With ``ix``
    increasing along the row among equal values, that is the lower index first. O(m) per row
    (a ``topk`` for the k-th value, then the ties at it taken in order)."""
    k = min(k, v.shape[1])
    kth = v.topk(k, dim=1, largest=largest, sorted=True).values[:, -1:]
    better = v > kth if largest else v < kth
    tie = v == kth
    room = k - better.sum(1, keepdim=True)
    keep = better | (tie & (tie.cumsum(1) <= room))
    pos = keep.nonzero()[:, 1].view(len(v), k)  # row by row, positions increasing
    pos = pos.gather(1, v.gather(1, pos).sort(dim=1, descending=largest, stable=True).indices)
    return v.gather(1, pos), ix.gather(1, pos)
