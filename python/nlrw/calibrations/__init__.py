"""The calibration methods, one module each with its math, and the registry the calibrate
stage (:mod:`nlrw.calibrate`) dispatches on.

A calibration maps a latent's simulated score ``E ∈ [0, 9]`` on a context to an activation
on the latent's own scale. The methods come in two kinds, by what they are fitted on:

* **every row at once**, from the cache's reference and the simulated scores, no
  calibration split: :mod:`~nlrw.calibrations.uncalibrated` (``E / 9 · max``) and
  :mod:`~nlrw.calibrations.quantile` (``F_real⁻¹(F_sim(E))``, whose ``F_sim`` tables share
  one width across latents, so they are fitted and applied over all rows in one call);
* **per latent**, fitted on the latent's calibration contexts and applied to its eval
  contexts: :mod:`~nlrw.calibrations.isotonic` and :mod:`~nlrw.calibrations.gate` (the gate
  reuses the isotonic fit), both from one :class:`LatentFit`.

:data:`CALIBRATIONS` maps each method's name (``nlrw.config.calibrate.Method``) to how the
stage applies it. The stage fits: ``F_sim`` for every run (``calibration.safetensors`` keeps
it), and :class:`LatentFit` per latent (``nlrw.calibrate.fit_latent``, with the fallbacks,
written to ``calibration_fits.parquet``).

**Adding a method**: one module here with its fit and apply functions and their math in the
docstring, one line in :data:`CALIBRATIONS`, its name in ``nlrw.config.calibrate.Method``.
A method of the second kind whose fit is not the isotonic or gate one also adds its fit to
:class:`LatentFit`, ``fit_latent`` and the fits table's schema in :mod:`nlrw.calibrate`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from nlrw.calibrations.gate import gate_apply
from nlrw.calibrations.isotonic import isotonic_apply
from nlrw.calibrations.uncalibrated import uncalibrated
from nlrw.model.quantiles import quantile_normalize

__all__ = ["CALIBRATIONS", "Calibration", "EveryRow", "LatentFit", "PerLatent", "Rows"]


class Rows(NamedTuple):
    """Every simulated row at once, with what the methods of the first kind map it through."""

    latent: npt.NDArray[np.int64]
    """``[n]`` each row's latent, as an index into the simulated latents (ascending ids)."""
    score: npt.NDArray[np.float32]
    """``[n]`` the simulated score ``E``."""
    max_activation: npt.NDArray[np.float64]
    """``[L]`` each latent's reference maximum (``reference_max``)."""
    sim_table: npt.NDArray[np.float32]
    """``[L, Qs]`` each latent's ``F_sim`` (:func:`nlrw.calibrations.quantile.fit_sim_tables`)."""
    active_table: npt.NDArray[np.float32]
    """``[L, Qr]`` each latent's active-value quantiles (``active_quantiles``)."""
    frequency: npt.NDArray[np.float32]
    """``[L]`` each latent's active frequency (``reference_frequency``)."""
    offsets: npt.NDArray[np.float32] | None
    """``[n]`` the quantile ranks' offsets (``random``), or None (``mid``)."""


class LatentFit(NamedTuple):
    """What a latent's calibration split gives the isotonic and gate methods."""

    xs: npt.NDArray[np.float64]
    """Isotonic fit: distinct calibration scores, ascending (empty for the fallback)."""
    ys: npt.NDArray[np.float64]
    """Isotonic fit: fitted activation at each of ``xs``."""
    threshold: float
    """Gate threshold (``inf`` for the fallback: everything gated)."""
    fill: float
    """Gate value where the isotonic fit is 0."""
    n_calibration: int
    n_calibration_active: int
    fallback: str | None
    """Why the latent was not fitted, or None."""
    gate_fallback: str | None = None
    """Why the gate could not be set (its activations are then 0), or None."""


EveryRow = Callable[[Rows], npt.NDArray[np.float32]]
"""A method of the first kind: the activation of every simulated row at once."""

PerLatent = Callable[[npt.NDArray[np.float32], LatentFit], npt.NDArray[np.float64]]
"""A method of the second kind: one latent's activations at the given scores (its eval
contexts') from its fit."""


class Calibration(NamedTuple):
    """How the calibrate stage applies one method: exactly one of the two is set."""

    every_row: EveryRow | None = None
    per_latent: PerLatent | None = None


CALIBRATIONS: dict[str, Calibration] = {
    "uncalibrated": Calibration(
        every_row=lambda r: uncalibrated(r.score, r.max_activation[r.latent])
    ),
    "quantile": Calibration(
        every_row=lambda r: quantile_normalize(
            r.latent, r.score, r.sim_table, r.active_table, r.frequency, r.offsets
        )
    ),
    "isotonic": Calibration(per_latent=lambda e, fit: isotonic_apply(fit.xs, fit.ys, e)),
    "gate": Calibration(per_latent=lambda e, f: gate_apply(e, f.threshold, f.xs, f.ys, f.fill)),
}
"""Each method's name -> how the stage applies it (the module docstring: adding one)."""
