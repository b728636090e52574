"""The ``quantile`` calibration: the paper's quantile normalization of simulated scores.

For latent ``l`` and ``E`` its simulated score on a context::

    a = F_real⁻¹(F_sim(E))

exact for sparse latents (:mod:`nlrw.model.quantiles`, which does the work in Rust).
``F_real`` is the latent's reference distribution as the mixture of its active frequency
``q`` (``reference_frequency``) and its active values' quantiles (``active_quantiles``), so
``F_real⁻¹(p) = 0`` for ``p ≤ 1 − q``; ``F_sim`` the distribution of its simulated scores
over the **eval** contexts (``quantile_fit``; the paper fits it on the contexts it evaluates,
and that is the default) at the mid-rank positions ``(r − ½)/n`` (one table entry per context
by default, ``sim_quantiles = 0``), so the top-scored context never maps to the cache's
maximum by construction. Only contexts whose score ranks in the top ``≈ q`` get an activation
above zero, whether they are the truly active ones or not: **sensitivity is low** when the
ranking is imperfect (the paper's second diagnosis).

*Ranks and ties* (``quantile_ranks``). ``random`` (default): each score's probability is
drawn uniformly within the probabilities its rank covers (a run of tied scores covers the
run's whole range), seeded by ``seed`` (:func:`random_offsets`): the randomized probability
integral transform. With an uninformative simulator the calibrated activations then have
exactly the real distribution, active on a fraction ``q`` of contexts at any ``q`` (measured
in ``tests/test_calibrate.py``). ``mid``: the deterministic rule, the middle of the run for
ties and ``(r − ½)/n`` otherwise; equal scores give equal activations, but a latent rarer
than ``1/(2n)`` is never activated (200 contexts: a latent at 0.1% never fires). If 70% of
the eval contexts share ``E = 0``, ``mid`` gives them all ``p = 0.35``, i.e. 0 for any
latent inactive on more than 35% of tokens; ``random`` spreads them over ``[0, 0.7]``.
F_sim uses the eval contexts' *scores* only, never their true activations.

Fit: :func:`fit_sim_tables` (the ``F_sim`` tables of every latent at once: with one entry per
score the table width is the largest latent's count, shared by all). Apply:
:func:`nlrw.model.quantiles.quantile_normalize` (the Rust lookup). Both: :func:`quantile_calibrate`.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from nlrw.model.quantiles import midrank_tables, quantile_normalize

__all__ = ["fit_sim_tables", "quantile_calibrate", "random_offsets"]


_OFFSETS_TAG = 0x9A17  # the offsets' stream of the run's seed


def random_offsets(seed: int, n: int) -> npt.NDArray[np.float32]:
    """``n`` offsets uniform on ``[−½, ½)`` for ``quantile_ranks = random``, drawn from
    ``numpy.random.default_rng([seed, 0x9A17])``: one per simulated row, in row order."""
    rng = np.random.default_rng([seed, _OFFSETS_TAG])
    return (rng.random(n) - 0.5).astype(np.float32)


def fit_sim_tables(
    fit_index: npt.ArrayLike,
    fit_scores: npt.ArrayLike,
    n_latents: int,
    sim_quantiles: int = 0,
) -> npt.NDArray[np.float32]:
    """``F_sim`` of every latent: row ``i`` the mid-rank table (``[n_latents, Qs]``) of the
    ``fit_scores`` with ``fit_index == i`` (``sim_quantiles`` entries, 0 for one per score of
    the latent with the most)."""
    return midrank_tables(fit_index, fit_scores, n_latents, sim_quantiles or None)


def quantile_calibrate(
    fit_index: npt.ArrayLike,
    fit_scores: npt.ArrayLike,
    index: npt.ArrayLike,
    scores: npt.ArrayLike,
    active_table: npt.ArrayLike,
    frequency: npt.ArrayLike,
    sim_quantiles: int = 0,
    offsets: npt.ArrayLike | None = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Quantile normalization ``a = F_real⁻¹(F_sim(E))`` of ``scores``.

    Row ``i`` of ``active_table`` (``[L, Qr]``) and ``frequency[i]`` are latent ``i``'s
    reference; ``F_sim`` of latent ``i`` is the mid-rank table of the ``fit_scores`` with
    ``fit_index == i`` (``sim_quantiles`` entries, 0 for one per score); ``index`` names each
    score's row; ``offsets`` as in :func:`nlrw.model.quantiles.quantile_normalize`. Returns
    ``(activations, sim_table)``.
    """
    active = np.asarray(active_table, dtype=np.float32)
    if active.ndim != 2:
        raise ValueError(f"active_table must be 2-D [L, Q], got shape {active.shape}")
    sim = fit_sim_tables(fit_index, fit_scores, active.shape[0], sim_quantiles)
    return quantile_normalize(index, scores, sim, active, frequency, offsets), sim
