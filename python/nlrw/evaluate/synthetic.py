"""Synthetic simulators for the evaluate stage: scores of a chosen AUROC made from the true
activations plus seeded noise, calibrated as the calibrate stage would.

They answer, without an LLM, how faithful a simulator must be for a rewrite to beat zero
ablation: for each target AUROC (``synthetic_qualities``) every latent of the coder gets
scores on every eval context whose AUROC measured on these contexts is the target
(:func:`synthetic_scores`), which :func:`synthetic_values` calibrates (uncalibrated and/or
quantile normalization). The grid rewrites them like simulated values
(:class:`nlrw.evaluate.grid.Synthetic`, ``synthetic`` rows).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from nlrw.evaluate.grid import TAG_SYNTHETIC_NOISE

__all__ = ["synthetic_scores", "synthetic_values"]


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    """Φ(x), the standard normal distribution function, elementwise (float64)."""
    return torch.special.ndtr(torch.from_numpy(np.asarray(x, dtype=np.float64))).numpy()


def synthetic_scores(
    true: np.ndarray,
    quality: float,
    scale: np.ndarray,
    noise: np.ndarray,
    rounding: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Scores ``E`` ``[n_contexts, L]`` of a synthetic simulator of AUROC ``quality``, and the
    AUROC each latent measures (NaN where the contexts hold one class only).

    ``true`` ``[n_contexts, L]``: the true activations; ``scale`` ``[L]`` > 0: the activation
    an ``E = 9`` stands for (the cache's max); ``noise`` ``[n_contexts, L]`` standard normal
    draws (seeded by the caller, the same for every quality so that the levels differ only in
    their signal).

    * ``quality = 1``: the exact simulator ``E = 9 · a / scale`` (uncalibrated maps it back
      to ``a``).
    * ``quality < 1``: a binormal simulator ``E = 9 · Φ(x)``, ``x = z`` on the contexts where
      the latent is inactive and ``x = d_l + z`` where it is active, the active contexts'
      draws sorted in the order of their true activations (so that the ranking among active
      contexts, and with it the magnitudes a quantile calibration gives, is right). The
      shift ``d_l`` is tuned per latent so that the AUROC **measured on these contexts** is
      the target: with ``P`` active and ``N`` inactive contexts, ``AUROC(d) = #{(i, j):
      z_j − z_i < d} / (P·N)``, so ``d`` is taken between the m-th and (m+1)-th smallest
      pairwise difference ``z_j − z_i``, ``m = ⌊quality · P·N + u_l⌋``: the measured AUROC is
      ``m / (P·N)``, one of the two attainable values around the target, and with ``u_l``
      uniform in [0, 1) (``rounding``, seeded by the caller; 0.5 when None: the nearest)
      the rounding is unbiased, ``E[m] = quality · P·N``, so the mean measured AUROC over
      latents is the target even where P·N is small. A latent with one class only gets
      ``x = z`` (pure noise). At ``quality = 0.5`` the active contexts rank among the
      inactive ones as often above as below: uninformative for detection (the order among
      active contexts still follows their magnitudes).

    The score scale is a choice: an inactive context gets ``9 · Φ(z)``, median 4.5 (the
    demo's real simulator rates every context 4.9 ± 0.3). Quantile normalization uses ranks
    only and does not depend on it; the uncalibrated mapping does: it gives inactive contexts
    about half the latent's max below quality 1, so its curve stays high until the exact
    simulator at 1.
    """
    if not 0.5 <= quality <= 1.0:
        raise ValueError(f"synthetic_qualities levels must be in [0.5, 1], got {quality}")
    t = np.asarray(true, dtype=np.float64)
    n_ctx, n_lat = t.shape
    active = t > 0
    n_pos = active.sum(axis=0)
    measured = np.full(n_lat, np.nan)
    both = (n_pos > 0) & (n_pos < n_ctx)
    if quality == 1.0:
        measured[both] = 1.0
        return (9.0 * t / np.asarray(scale, dtype=np.float64)[None, :]), measured
    x = np.array(noise, dtype=np.float64, copy=True)
    for j in np.flatnonzero(both):
        pos = np.flatnonzero(active[:, j])
        neg = np.flatnonzero(~active[:, j])
        z_pos = np.sort(x[pos, j])
        # the largest draws to the largest activations (stable: ties by context)
        x[pos[np.argsort(t[pos, j], kind="stable")], j] = z_pos
        diffs = np.sort((x[neg, j][:, None] - z_pos[None, :]).ravel())
        total = diffs.size
        u = 0.5 if rounding is None else float(rounding[j])
        m = math.floor(quality * total + u)
        if m <= 0:
            d = diffs[0] - 1.0
        elif m >= total:
            d = diffs[-1] + 1.0
        else:
            d = 0.5 * (diffs[m - 1] + diffs[m])
        x[pos, j] += d
        measured[j] = m / total
    return 9.0 * _normal_cdf(x), measured


def synthetic_values(
    true: np.ndarray,
    qualities: Sequence[float],
    calibrations: Sequence[str],
    *,
    max_activation: np.ndarray,
    active_tables: np.ndarray,
    frequency: np.ndarray,
    seed: int,
) -> tuple[dict[tuple[str, float], np.ndarray], dict[float, np.ndarray]]:
    """Calibrated activations of every synthetic simulator on every latent and context.

    ``true`` ``[n_contexts, L]`` (all L latents of the coder), ``max_activation`` ``[L]``,
    ``active_tables`` ``[L, Q]`` and ``frequency`` ``[L]`` from the cache's statistics (its
    reference: :mod:`nlrw.cache`). Scores from
    :func:`synthetic_scores` (scale: the cache's max, or the largest true activation on these
    contexts for a latent the cache never saw active); calibrations as the calibrate stage
    computes them (:func:`nlrw.calibrate.uncalibrated`, :func:`nlrw.calibrate.
    quantile_calibrate` with F_sim fitted on the evaluated contexts, the paper's protocol),
    clipped at 0. Returns ``{(calibration, quality): float32 [n_contexts, L]}`` and the
    measured AUROC of each latent per quality.
    """
    from nlrw.calibrate import quantile_calibrate, uncalibrated

    t = np.asarray(true, dtype=np.float32)
    n_ctx, n_lat = t.shape
    max_a = np.asarray(max_activation, dtype=np.float64)
    scale = np.where(max_a > 0, max_a, t.max(axis=0, initial=0.0))
    scale = np.where(scale > 0, scale, 1.0)
    noise = np.random.default_rng([seed, TAG_SYNTHETIC_NOISE]).standard_normal((n_ctx, n_lat))
    rounding = np.random.default_rng([seed, TAG_SYNTHETIC_NOISE, 2]).random(n_lat)
    index = np.tile(np.arange(n_lat, dtype=np.int64), n_ctx)
    values: dict[tuple[str, float], np.ndarray] = {}
    measured: dict[float, np.ndarray] = {}
    for q in qualities:
        scores, measured[float(q)] = synthetic_scores(t, float(q), scale, noise, rounding)
        flat = scores.astype(np.float32).reshape(-1)
        for cal in calibrations:
            if cal == "uncalibrated":
                a = uncalibrated(scores, max_a[None, :])
            elif cal == "quantile":
                offsets = np.random.default_rng([seed, TAG_SYNTHETIC_NOISE, 1]).random(flat.size)
                a, _ = quantile_calibrate(
                    index, flat, index, flat, active_tables, frequency, 0, offsets - 0.5
                )
                a = np.asarray(a).reshape(n_ctx, n_lat)
            else:
                raise ValueError(f"unknown synthetic calibration {cal!r}")
            values[(cal, float(q))] = np.maximum(np.asarray(a, dtype=np.float32), 0.0)
    return values, measured
