"""Agreement between attributions, and fidelity against retraining, each with its spread.

Sign convention: a positive score means the training point is helpful to the test point
(removing it raises that test point's loss by about ``score / n``). Score matrices are
(n_test, n_train). Every metric returns an :class:`Estimate`: the value, a confidence interval
and the per-unit values it was averaged from, with how the interval was made in ``method``.

Constant rows: a correlation of a row with zero spread (every entry equal, in either input) is
undefined. It is NaN in the per-unit values, a ``RuntimeWarning`` says how many, and it is
excluded from the mean, the standard deviation and the interval (``n_excluded`` counts them).
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import torch
from scipy.stats import norm, rankdata


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A metric with its sampling spread.

    Attributes:
        value: the estimate (a mean over units, or a single statistic).
        low, high: the confidence interval at ``level``.
        std: standard deviation of the per-unit values (NaN for a single statistic).
        sem: ``std / sqrt(n)`` (NaN for a single statistic).
        n: units that entered the estimate (test points, or pairs for a single statistic).
        n_excluded: units left out as undefined (constant rows).
        method: how ``low, high`` were made.
        values: the per-unit values, NaN where excluded; None for a single statistic.
    """

    value: float
    low: float
    high: float
    level: float
    std: float
    sem: float
    n: int
    n_excluded: int
    method: str
    values: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict:
        """Every field but ``values``: one row of a results table."""
        names = [f.name for f in dataclasses.fields(self) if f.name != "values"]
        return {name: getattr(self, name) for name in names}


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _array(x, name: str, ndim: int) -> np.ndarray:
    a = _numpy(x)
    if a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {a.shape}")
    if a.dtype == bool or not np.issubdtype(a.dtype, np.number):
        raise TypeError(f"{name} must be numeric, got dtype {a.dtype}")
    return a.astype(np.float64, copy=False)


def _same_shape(a: np.ndarray, b: np.ndarray, names: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names} must have the same shape, got {a.shape} and {b.shape}")


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be in (0, 1), e.g. 0.95")


def _check_boot(n_boot: int) -> None:
    if not isinstance(n_boot, int) or n_boot < 0:
        raise ValueError(f"n_boot={n_boot!r} must be a non-negative int (0 skips the bootstrap)")


def ranks(a, axis: int = -1) -> np.ndarray:
    """Ranks along ``axis`` (1 = smallest), ties given the average of their ranks."""
    return rankdata(np.asarray(a), axis=axis)


def rowwise_pearson(A, B) -> np.ndarray:
    """(n_rows,) Pearson correlation of each row of A with the same row of B, both
    (n_rows, n_cols); NaN (with a ``RuntimeWarning``) for a row that is constant in either."""
    A, B = _array(A, "A", 2), _array(B, "B", 2)
    _same_shape(A, B, "A and B")
    if A.shape[1] < 2:
        raise ValueError(f"rows need at least 2 entries to correlate, got {A.shape[1]}")
    a = A - A.mean(1, keepdims=True)
    b = B - B.mean(1, keepdims=True)
    constant = (np.ptp(A, axis=1) == 0) | (np.ptp(B, axis=1) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))
    r = np.clip(r, -1.0, 1.0)
    r[constant] = np.nan
    if constant.any():
        warnings.warn(
            f"{int(constant.sum())} of {len(r)} rows are constant: their correlation is "
            f"undefined (NaN) and left out of averages",
            RuntimeWarning,
            stacklevel=3,
        )
    return r


def rowwise_spearman(A, B) -> np.ndarray:
    """(n_rows,) Spearman correlation per row: Pearson of the average-tie ranks."""
    A, B = _array(A, "A", 2), _array(B, "B", 2)
    _same_shape(A, B, "A and B")
    return rowwise_pearson(ranks(A, axis=1), ranks(B, axis=1))


def _rowwise(method: str):
    if method == "pearson":
        return rowwise_pearson
    if method == "spearman":
        return rowwise_spearman
    raise ValueError(f"method={method!r} must be 'pearson' or 'spearman'")


def summarize(values, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> Estimate:
    """Mean of per-unit values (NaN excluded) with their std, ``std / sqrt(n)`` and a
    percentile bootstrap interval of the mean over units (``n_boot`` resamples from ``seed``;
    ``n_boot=0`` gives a normal interval ``mean +- z sem`` instead)."""
    _check_level(level)
    _check_boot(n_boot)
    values = _array(values, "values", 1)
    ok = values[np.isfinite(values)]
    n = len(ok)
    mean = float(ok.mean()) if n else math.nan
    std = float(ok.std(ddof=1)) if n > 1 else math.nan
    sem = std / math.sqrt(n) if n > 1 else math.nan
    alpha = (1 - level) / 2
    if n_boot and n > 1:
        rng = np.random.default_rng(seed)
        means = np.empty(n_boot)
        for i in range(0, n_boot, 256):  # bounded memory: 256 resamples of n at a time
            draw = rng.integers(0, n, size=(min(256, n_boot - i), n))
            means[i : i + len(draw)] = ok[draw].mean(1)
        low, high = np.quantile(means, [alpha, 1 - alpha])
        method = (f"percentile bootstrap of the mean over {n} units ({n_boot} resamples, "
                  f"seed {seed})")
    else:
        z = norm.ppf(1 - alpha)
        low, high = mean - z * sem, mean + z * sem
        method = "normal interval mean +- z * std / sqrt(n)"
    return Estimate(mean, float(low), float(high), level, std, sem, n, len(values) - n, method,
                    values)


def per_test_correlation(
    A, B, method: str = "spearman", n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> Estimate:
    """Correlation between the rows of two (n_test, n_train) score matrices, one per test
    point, averaged over test points; spread over test points (:func:`summarize`)."""
    return summarize(_rowwise(method)(A, B), n_boot=n_boot, level=level, seed=seed)


def overall_correlation(
    A, B, method: str = "spearman", n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> Estimate:
    """Correlation of two (n_test, n_train) score matrices flattened into one sample.

    The interval is a bootstrap over test points (whole rows resampled, since the entries of a
    row share their test point and are not independent), computed from per-row sums so each
    resample costs O(n_test). For Spearman the ranks are those of the full sample, held fixed
    across resamples (so the interval is that of the Pearson correlation of those ranks).
    """
    _check_level(level)
    _check_boot(n_boot)
    A, B = _array(A, "A", 2), _array(B, "B", 2)
    _same_shape(A, B, "A and B")
    _rowwise(method)  # validates the name
    if method == "spearman":
        A, B = ranks(A, axis=None).reshape(A.shape), ranks(B, axis=None).reshape(B.shape)
    n_test, n_train = A.shape
    if np.ptp(A) == 0 or np.ptp(B) == 0:
        warnings.warn("a score matrix is constant: its correlation is undefined (NaN)",
                      RuntimeWarning, stacklevel=2)
        return Estimate(math.nan, math.nan, math.nan, level, math.nan, math.nan, 0, A.size,
                        "undefined")
    a, b = A - A.mean(), B - B.mean()
    # per-row sums: count, sum a, sum b, sum a^2, sum b^2, sum ab
    stats = np.stack([np.full(n_test, float(n_train)), a.sum(1), b.sum(1), (a * a).sum(1),
                      (b * b).sum(1), (a * b).sum(1)], axis=1)

    def corr(s: np.ndarray) -> np.ndarray:
        cnt, sa, sb, saa, sbb, sab = s.T
        cov = sab - sa * sb / cnt
        with np.errstate(invalid="ignore", divide="ignore"):
            return cov / np.sqrt((saa - sa**2 / cnt) * (sbb - sb**2 / cnt))

    r = float(corr(stats.sum(0, keepdims=True))[0])
    if n_boot and n_test > 1:
        rng = np.random.default_rng(seed)
        counts = rng.multinomial(n_test, np.full(n_test, 1 / n_test), size=n_boot)
        boot = corr(counts @ stats)
        alpha = (1 - level) / 2
        low, high = np.nanquantile(boot, [alpha, 1 - alpha])
        how = (f"percentile bootstrap over {n_test} test points ({n_boot} resamples, seed {seed})"
               + (", ranks of the full sample held fixed" if method == "spearman" else ""))
    else:
        low = high = math.nan
        how = "no interval (n_boot=0 or a single test point)"
    return Estimate(r, float(low), float(high), level, math.nan, math.nan, A.size, 0, how)


def topk_overlap(
    A, B, k: int = 10, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> Estimate:
    """Per test point, ``|topk(A) & topk(B)| / k`` over the k largest (most helpful) scores of
    each (n_test, n_train) matrix, averaged over test points. Ties are broken in favour of the
    lower training index. Random scores give ``k / n_train`` on average."""
    A, B = _array(A, "A", 2), _array(B, "B", 2)
    _same_shape(A, B, "A and B")
    n_test, n_train = A.shape
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= n_train:
        raise ValueError(f"k={k!r} must be an int between 1 and the {n_train} training points")
    top_a = np.argsort(-A, axis=1, kind="stable")[:, :k]
    top_b = np.argsort(-B, axis=1, kind="stable")[:, :k]
    in_a = np.zeros(A.shape, dtype=bool)
    np.put_along_axis(in_a, top_a, True, axis=1)
    overlap = np.take_along_axis(in_a, top_b, axis=1).sum(1) / k
    return summarize(overlap, n_boot=n_boot, level=level, seed=seed)


def agreement(
    A, B, k: int = 10, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> dict[str, Estimate]:
    """How well scores ``A`` reproduce reference scores ``B`` (both (n_test, n_train)):
    per-test and overall Pearson and Spearman, and top-k overlap."""
    kw = dict(n_boot=n_boot, level=level, seed=seed)
    return {
        "pearson": per_test_correlation(A, B, "pearson", **kw),
        "spearman": per_test_correlation(A, B, "spearman", **kw),
        "pearson_overall": overall_correlation(A, B, "pearson", **kw),
        "spearman_overall": overall_correlation(A, B, "spearman", **kw),
        f"top{k}_overlap": topk_overlap(A, B, k, **kw),
    }


def fisher_z_interval(r: float, n: int, method: str, level: float = 0.95) -> tuple[float, float]:
    """Interval for a correlation of ``n`` independent pairs through ``atanh``: standard error
    ``1 / sqrt(n - 3)`` for Pearson, ``sqrt((1 + r^2 / 2) / (n - 3))`` for Spearman (Bonett and
    Wright, 2000)."""
    _check_level(level)
    _rowwise(method)
    if n <= 3 or not np.isfinite(r):
        return math.nan, math.nan
    se = (1.0 if method == "pearson" else math.sqrt(1 + r * r / 2)) / math.sqrt(n - 3)
    z, q = math.atanh(min(max(r, -1 + 1e-15), 1 - 1e-15)), norm.ppf((1 + level) / 2)
    return math.tanh(z - q * se), math.tanh(z + q * se)


def loo_correlation(
    predicted, actual, method: str = "pearson", n_boot: int = 1000, level: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """Leave-one-out correlation between predicted and retrained effects of removing points.

    Both in the same units and sign, e.g. ``predicted = scores / n`` and ``actual`` from
    :func:`dropinf.study.retrain.loo_effects` (how much the test output, higher = better, falls when
    the point is removed): positive = helpful.

    Shapes: (n_removed,) for one effect per removed point (e.g. summed over the test set): a
    single correlation with a Fisher-z interval over the pairs (:func:`fisher_z_interval`);
    or (n_removed, n_test): one correlation per test point across the removed points, averaged,
    with a bootstrap over test points (:func:`summarize`).
    """
    if _numpy(predicted).ndim == 2:
        return per_test_correlation(_array(predicted, "predicted", 2).T,
                                    _array(actual, "actual", 2).T, method, n_boot, level, seed)
    p, a = _array(predicted, "predicted", 1), _array(actual, "actual", 1)
    _same_shape(p, a, "predicted and actual")
    r = float(_rowwise(method)(p[None], a[None])[0])
    low, high = fisher_z_interval(r, len(p), method, level)
    return Estimate(r, low, high, level, math.nan, math.nan, len(p), 0,
                    f"Fisher z interval over {len(p)} pairs")


def lds_subsets(n_train: int, m: int, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """(m, n_train) bool masks: ``m`` subsets of exactly ``round(fraction * n_train)`` training
    points each, uniform without replacement, independent across subsets, from ``seed``."""
    if not isinstance(n_train, (int, np.integer)) or n_train < 2:
        raise ValueError(f"n_train={n_train!r} must be an int of at least 2")
    if not isinstance(m, (int, np.integer)) or m < 1:
        raise ValueError(f"m={m!r} must be a positive int (the number of subsets)")
    size = round(fraction * n_train)
    if not 0 < fraction < 1 or not 1 <= size < n_train:
        raise ValueError(
            f"fraction={fraction} must be in (0, 1) and keep between 1 and {n_train - 1} of the "
            f"{n_train} points (it keeps {size}); 0.5 is the usual choice"
        )
    keys = np.random.default_rng(seed).random((m, n_train))
    kept = np.argpartition(keys, size - 1, axis=1)[:, :size]
    masks = np.zeros((m, n_train), dtype=bool)
    np.put_along_axis(masks, kept, True, axis=1)
    return masks


def lds(
    scores, masks, outputs, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> Estimate:
    """Linear datamodeling score.

    For subset j (row of ``masks``) and test point t the attribution predicts
    ``sum_{i in S_j} scores[t, i]``; LDS for t is the Spearman correlation, across the m
    subsets, between that prediction and ``outputs[j, t]``, the output measured on a model
    retrained on S_j. The estimate is the mean over test points.

    Sign: ``outputs`` must grow as the model gets better at the test point, e.g. the negated
    test loss or the correct-class margin (``dropinf.study.retrain.negative_loss``). With positive =
    helpful scores, a subset keeping more helpful points then has a higher output, so a perfect
    attribution gives LDS near +1 (passing test losses instead would give near -1).

    Args:
        scores: (n_test, n_train).
        masks: (m, n_train) bool, e.g. from :func:`lds_subsets`.
        outputs: (m, n_test), averaged over retraining seeds where training is random.

    Returns:
        :class:`Estimate` whose ``values`` are the (n_test,) per-test LDS; ``sem`` is
        ``std / sqrt(n_test)`` and the interval a bootstrap over test points.

    Null spread: against outputs unrelated to the subsets each per-test value has variance
    ``1 / (m - 1)``. Random scores against outputs that do follow the subsets add their chance
    alignment with the true attribution, about ``(3 / pi)^2 / (n_train - 1)`` more, so a
    random baseline's per-test sd is about ``sqrt(1 / (m - 1) + 0.91 / (n_train - 1))``.
    """
    S = _array(scores, "scores", 2)
    M = _numpy(masks)
    if M.ndim != 2 or M.dtype != bool:
        raise TypeError(f"masks must be a 2-D bool array (m, n_train), got {M.dtype} {M.shape}")
    Y = _array(outputs, "outputs", 2)
    if M.shape[1] != S.shape[1]:
        raise ValueError(f"masks cover {M.shape[1]} training points but scores have {S.shape[1]}")
    if Y.shape != (M.shape[0], S.shape[0]):
        raise ValueError(
            f"outputs must be (m, n_test) = {(M.shape[0], S.shape[0])} for {M.shape[0]} subsets "
            f"and {S.shape[0]} test points, got {Y.shape}"
        )
    if M.shape[0] < 3:
        raise ValueError(f"LDS needs at least 3 subsets to rank, got {M.shape[0]}")
    predicted = M.astype(np.float64) @ S.T  # (m, n_test)
    per_test = rowwise_pearson(ranks(predicted, axis=0).T, ranks(Y, axis=0).T)
    return summarize(per_test, n_boot=n_boot, level=level, seed=seed)
