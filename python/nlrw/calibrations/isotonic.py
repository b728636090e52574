"""The ``isotonic`` calibration (nlrw's): a monotone fit of the true activation on the
simulated score, learned per latent on held-out contexts.

For latent ``l``, a monotone non-decreasing least-squares fit of the true activation on
``E`` over the **calibration** split only (:func:`isotonic_fit`, pool-adjacent-violators)::

    f_l = argmin_{f non-decreasing} Σ_{i ∈ calibration} (true_i − f(E_i))²

applied to the eval contexts by linear interpolation between the fitted points, constant
beyond the first and last (:func:`isotonic_apply`). The fit is a conditional mean, so it is
≥ 0 (true activations are) and it learns from held-out contexts how often each score range
is really active.

Fit: :func:`isotonic_fit`. Apply: :func:`isotonic_apply`. The gate
(:mod:`nlrw.calibrations.gate`) reuses both above its threshold.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["isotonic_apply", "isotonic_fit"]


def _vector(x: npt.ArrayLike, name: str) -> npt.NDArray[np.float64]:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}[{int(np.argmin(np.isfinite(a)))}] is not finite")
    return a


def isotonic_fit(
    x: npt.ArrayLike, y: npt.ArrayLike
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Least-squares monotone non-decreasing regression of ``y`` on ``x``.

    Returns ``(xs, ys)``: ``xs`` the distinct values of ``x`` ascending, ``ys`` the fitted
    value at each, the minimiser of ``Σ_i (y_i − f(x_i))²`` over non-decreasing ``f``.
    Pool-adjacent-violators: the points with equal ``x`` are pooled first (mean of their
    ``y``, weight = their count); going up ``x``, each point starts a block and while a
    block's mean is below the previous block's the two merge (weighted mean). The result is
    the block means; equivalently ``ŷ_i = max_{j ≤ i} min_{k ≥ i} mean(y_j … y_k)`` (pooled
    weights). ``O(n log n)`` for the sort, ``O(n)`` merges. Empty input gives empty arrays.
    """
    xa, ya = _vector(x, "x"), _vector(y, "y")
    if xa.shape != ya.shape:
        raise ValueError(f"x has {xa.shape[0]} values but y has {ya.shape[0]}")
    if xa.size == 0:
        return np.zeros(0), np.zeros(0)
    xs, inverse = np.unique(xa, return_inverse=True)
    weight = np.bincount(inverse, minlength=xs.size).astype(np.float64)
    means = np.bincount(inverse, weights=ya, minlength=xs.size) / weight
    values: list[float] = []
    weights: list[float] = []
    sizes: list[int] = []
    for v, w in zip(means.tolist(), weight.tolist(), strict=True):
        values.append(v)
        weights.append(w)
        sizes.append(1)
        while len(values) > 1 and values[-2] > values[-1]:
            v2, w2, n2 = values.pop(), weights.pop(), sizes.pop()
            w1 = weights[-1]
            values[-1] = (values[-1] * w1 + v2 * w2) / (w1 + w2)
            weights[-1] = w1 + w2
            sizes[-1] += n2
    ys = np.repeat(np.asarray(values), np.asarray(sizes))
    return xs, np.maximum.accumulate(ys)  # exact monotonicity despite rounding in the means


def isotonic_apply(
    xs: npt.ArrayLike, ys: npt.ArrayLike, x: npt.ArrayLike
) -> npt.NDArray[np.float64]:
    """A fit of :func:`isotonic_fit` at ``x``: linear interpolation between the fitted points
    (``numpy.interp``), ``ys[0]`` below ``xs[0]`` and ``ys[-1]`` above ``xs[-1]``; all zeros
    for an empty fit (the fallback: predict inactive)."""
    xs_a, ys_a = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    xa = np.asarray(x, dtype=np.float64)
    if xs_a.shape != ys_a.shape or xs_a.ndim != 1:
        raise ValueError(f"xs and ys must be 1-D of one length, got {xs_a.shape}, {ys_a.shape}")
    if xs_a.size == 0:
        return np.zeros(xa.shape)
    return np.interp(xa, xs_a, ys_a)
