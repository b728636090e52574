"""The ``gate`` calibration (nlrw's): the isotonic fit behind a per-latent threshold chosen
for specificity, so that a simulated latent rarely fires where the true one is silent.

For latent ``l`` and ``E`` its simulated score on a context: a threshold ``t_l`` on ``E``
chosen on the calibration split for specificity ``s`` (:func:`gate_threshold`: the smallest
``t`` with ``P(E < t | inactive) ≥ s``), then::

    a = 0                  if E < t_l
      = f_l(E)             if E ≥ t_l and f_l(E) > 0   (f_l the isotonic fit,
      = fill_l             otherwise                     :mod:`nlrw.calibrations.isotonic`)

where ``fill_l`` (:func:`gate_fill`) is the mean true activation of the active calibration
contexts with ``E ≥ t_l`` (of all active calibration contexts when none is above ``t_l``):
the value where the isotonic fit is flat at zero above the threshold.

The specificity ``s`` is **sized by the top-k budget**: with ``N`` simulated latents, each
latent may let through at most ``gate_budget · k / N`` false positives per context, so that
the expected number of false-positive latents per context stays ≤ ``gate_budget · k``
(default ``k/4``)::

    s = max(gate_min_specificity, 1 − gate_budget · k / N)

(:func:`gate_specificity`; the budget only tightens the former default 0.9, which it
overtakes above ``N = 2.5 k``; ``gate_specificity`` overrides both). Resolving ``s`` takes
at least ``⌈1 / (1 − s)⌉`` inactive calibration contexts (:func:`gate_resolvable`); a latent
with fewer gets no gate (:func:`gate_fit` says why; the stage then predicts 0).

Fit: :func:`gate_fit` (threshold and fill; the isotonic fit comes from
:func:`nlrw.calibrations.isotonic.isotonic_fit`). Apply: :func:`gate_apply`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from nlrw.calibrations.isotonic import isotonic_apply

__all__ = [
    "GateFit",
    "gate_apply",
    "gate_fill",
    "gate_fit",
    "gate_resolvable",
    "gate_specificity",
    "gate_threshold",
]


def gate_threshold(scores: npt.ArrayLike, active: npt.ArrayLike, specificity: float) -> float:
    """The smallest ``t`` with ``#{inactive i: E_i < t} / #inactive ≥ specificity``.

    With the inactive scores sorted ``e_(1) ≤ … ≤ e_(n)`` and ``m`` the smallest count with
    ``m / n ≥ specificity``, the condition is ``e_(m) < t``; scores are float32, so the
    smallest such ``t`` is the next float32 above ``e_(m)`` (then ``E < t ⟺ E ≤ e_(m)``).
    ``-inf`` (gate nothing) when no context is inactive.
    """
    e = np.asarray(scores, dtype=np.float32)
    act = np.asarray(active, dtype=bool)
    if e.shape != act.shape or e.ndim != 1:
        raise ValueError(f"scores and active must be 1-D of one length, got {e.shape}, {act.shape}")
    if not 0.0 < specificity <= 1.0:
        raise ValueError(f"specificity must be in (0, 1], got {specificity}")
    inactive = np.sort(e[~act])
    n = inactive.size
    if n == 0:
        return float("-inf")
    m = max(1, math.ceil(specificity * n))
    while m > 1 and (m - 1) / n >= specificity:  # ceil of a rounded product may be one high
        m -= 1
    while m < n and m / n < specificity:
        m += 1
    return float(np.nextafter(inactive[m - 1], np.float32(np.inf)))


def gate_specificity(budget: float, k: int, n_latents: int, minimum: float = 0.0) -> float:
    """The per-latent specificity that keeps the expected false-positive latents per context
    at ``budget · k`` over ``n_latents`` simulated latents: ``1 − budget · k / n_latents``, and
    at least ``minimum`` (the budget only tightens a gate; floored at 0)."""
    if n_latents <= 0:
        return 1.0
    return max(minimum, 0.0, 1.0 - budget * k / n_latents)


def gate_resolvable(n_inactive: int, specificity: float) -> bool:
    """Whether ``n_inactive`` contexts resolve ``specificity``: one false positive among them
    must be a rate of at most ``1 − specificity`` (``n ≥ 1 / (1 − s)``)."""
    if specificity <= 0.0:
        return True
    if specificity >= 1.0:
        return n_inactive > 0
    return n_inactive * (1.0 - specificity) >= 1.0 - 1e-9


def gate_fill(scores: npt.ArrayLike, true: npt.ArrayLike, threshold: float) -> float:
    """The gate's value where the isotonic fit is 0: the mean true activation of the active
    contexts with ``E ≥ threshold``, of all active contexts when none is, 0 when none is
    active."""
    e = np.asarray(scores, dtype=np.float64)
    t = np.asarray(true, dtype=np.float64)
    active = t > 0
    above = active & (e >= threshold)
    pick = above if above.any() else active
    return float(t[pick].mean()) if pick.any() else 0.0


class GateFit(NamedTuple):
    """A latent's gate, from its calibration contexts (:func:`gate_fit`)."""

    threshold: float
    """``t_l``: ``-inf`` gates nothing, ``inf`` (no gate) gates everything."""
    fill: float
    """The value above the threshold where the isotonic fit is 0."""
    fallback: str | None
    """Why no gate could be set (its activations are then 0), or None."""


def gate_fit(scores: npt.ArrayLike, true: npt.ArrayLike, specificity: float) -> GateFit:
    """The gate of one latent from its calibration contexts (``scores`` = E, ``true`` = true
    activations) at ``specificity``: no gate (``inf``, a reason) when too few contexts are
    inactive to resolve it; ``-inf`` (gate nothing) when none is inactive or the specificity
    is 0 (a budget as large as the simulated latents themselves)."""
    e = np.asarray(scores, dtype=np.float32)
    t = np.asarray(true, dtype=np.float64)
    n_inactive = int(e.size) - int((t > 0).sum())
    # No inactive context: nothing to gate (the threshold is -inf), nothing to resolve.
    if n_inactive and not gate_resolvable(n_inactive, specificity):
        need = math.ceil(1.0 / (1.0 - specificity) - 1e-9)
        why = (
            f"{n_inactive} inactive calibration contexts cannot resolve gate specificity "
            f"{specificity:.6g} (needs {need})"
        )
        return GateFit(float("inf"), 0.0, why)
    threshold = gate_threshold(e, t > 0, specificity) if specificity > 0 else float("-inf")
    return GateFit(threshold, gate_fill(e, t, threshold), None)


def gate_apply(
    scores: npt.ArrayLike,
    threshold: float,
    xs: npt.ArrayLike,
    ys: npt.ArrayLike,
    fill: float,
) -> npt.NDArray[np.float64]:
    """``a = 0`` where ``E < threshold``; else the isotonic value, or ``fill`` where that is
    0."""
    e = np.asarray(scores, dtype=np.float64)
    iso = isotonic_apply(xs, ys, e)
    return np.where(e < threshold, 0.0, np.where(iso > 0, iso, fill))
