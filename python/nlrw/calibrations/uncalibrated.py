"""The ``uncalibrated`` calibration: the paper's first mapping from a simulated score to an
activation, with nothing fitted.

For latent ``l`` and ``E ∈ [0, 9]`` its simulated score on a context::

    a = E / 9 · max_l

``max_l`` is the latent's largest activation at the cache's reference positions
(``reference_max`` in ``latents/stats.parquet``: tokens with a window's worth of context, like
the evaluated ones; see :mod:`nlrw.cache`). ``E = 9`` gives ``max_l`` (the paper's code maps
9.0 to 0: a bug, not the protocol). Any ``E > 0`` gives ``a > 0``, so a simulator that rates
inactive contexts above zero (the paper saw ≈ 8.5 on inactive contexts) has **low
specificity**: this is the paper's diagnosis.

Fit: none (``max_l`` comes from the cache's statistics). Apply: :func:`uncalibrated`.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["E_MAX", "uncalibrated"]


E_MAX = 9.0
"""The largest simulated score: the simulator rates a context with a digit 0 … 9."""


def uncalibrated(
    expected_value: npt.ArrayLike, max_activation: npt.ArrayLike
) -> npt.NDArray[np.float32]:
    """The paper's mapping ``a = E / 9 · max`` (``max`` a scalar or one per score)."""
    e = np.asarray(expected_value, dtype=np.float64)
    return (e / E_MAX * np.asarray(max_activation, dtype=np.float64)).astype(np.float32)
