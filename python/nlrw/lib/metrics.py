"""The metrics every stage reports, defined once, all with the order ``(scores, labels)``.

* :func:`auroc`: ``P(s_pos > s_neg) + P(s_pos = s_neg) / 2`` over all (positive, negative)
  pairs, from average ranks (Mann-Whitney ``U / (n_pos n_neg)``), ``O(n log n)``.
* :func:`balanced_accuracy`: ``(TPR + TNR) / 2`` with prediction ``score > threshold``.
* :func:`pearson`: the correlation of two vectors.

Each is NaN when it is undefined (a class empty, a vector constant), never an exception.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

__all__ = ["auroc", "balanced_accuracy", "pearson"]


def auroc(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """``P(s_pos > s_neg) + P(s_pos = s_neg) / 2`` over all (positive, negative) pairs, from
    average ranks (Mann-Whitney U), ``O(n log n)``; NaN when a class is empty."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="stable")
    sorted_s = s[order]
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], s.size]
    run = np.repeat(np.arange(starts.size), ends - starts)
    ranks = np.empty(s.size)
    ranks[order] = ((starts + ends + 1) / 2.0)[run]  # 1-based average rank of each tie run
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def balanced_accuracy(
    scores: npt.ArrayLike, labels: npt.ArrayLike, threshold: float = 0.5
) -> float:
    """``(TPR + TNR) / 2`` with prediction ``scores > threshold``; NaN if a class is empty."""
    y = np.asarray(labels, dtype=bool)
    pred = np.asarray(scores, dtype=np.float64) > threshold
    if y.all() or not y.any():
        return float("nan")
    return float((pred[y].mean() + (~pred[~y]).mean()) / 2)


def pearson(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Pearson correlation; NaN when either vector is constant or shorter than 2."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.size < 2:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    sxx, syy = float(dx @ dx), float(dy @ dy)
    if sxx == 0.0 or syy == 0.0:
        return float("nan")
    return float(np.clip((dx @ dy) / math.sqrt(sxx * syy), -1.0, 1.0))
