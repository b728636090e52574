"""The ``calibrate`` stage: turn the simulator's expected scores into latent activations.

The simulator rates how strongly a latent fires on a context's last token with an expected
digit ``E ∈ [0, 9]`` (``simulations.parquet``). The evaluate stage needs an *activation* on
the latent's own scale, and how a score becomes an activation decides whether the simulated
latents help or hurt. This stage maps every simulated score of an **eval** context through
each calibration method asked for, side by side, and measures on the eval contexts how well
each calibrated activation matches the true one.

**Methods** (per latent ``l``; ``E`` its simulated score on a context):

* ``uncalibrated`` (the paper's first mapping): ``a = E / 9 · max_l``, ``max_l`` the latent's
  largest activation at the cache's reference positions (``reference_max`` in
  ``latents/stats.parquet``: tokens with a window's worth of context, like the evaluated
  ones; see :mod:`nlrw.cache`). ``E = 9`` gives ``max_l`` (the
  paper's code maps 9.0 to 0: a bug, not the protocol). Any ``E > 0`` gives ``a > 0``, so a
  simulator that rates inactive contexts above zero (the paper saw ≈ 8.5 on inactive
  contexts) has **low specificity**: this is the paper's diagnosis.
* ``quantile`` (the paper's calibration): ``a = F_real⁻¹(F_sim(E))``, exact for sparse
  latents (:mod:`nlrw.model.quantiles`): ``F_real`` is the latent's reference distribution as the
  mixture of its active frequency ``q`` (``reference_frequency``) and its active values'
  quantiles (``active_quantiles``), so ``F_real⁻¹(p) = 0`` for ``p ≤ 1 − q``; ``F_sim`` the
  distribution of its simulated scores over the **eval** contexts (``quantile_fit``; the
  paper fits it on the contexts it evaluates, and that is the default) at the mid-rank
  positions ``(r − ½)/n`` (one table entry per context by default, ``sim_quantiles = 0``), so
  the top-scored context never maps to the cache's maximum by construction. Only contexts
  whose score ranks in the top ``≈ q`` get an activation above zero, whether they are the
  truly active ones or not: **sensitivity is low** when the ranking is imperfect (the
  paper's second diagnosis).

  *Ranks and ties* (``quantile_ranks``). ``random`` (default): each score's probability is
  drawn uniformly within the probabilities its rank covers (a run of tied scores covers the
  run's whole range), seeded by ``seed``: the randomized probability integral transform.
  With an uninformative simulator the calibrated activations then have exactly the real
  distribution, active on a fraction ``q`` of contexts at any ``q`` (measured in
  ``tests/test_calibrate.py``). ``mid``: the deterministic rule, the middle of the run for
  ties and ``(r − ½)/n`` otherwise; equal scores give equal activations, but a latent rarer
  than ``1/(2n)`` is never activated (200 contexts: a latent at 0.1% never fires). If 70% of
  the eval contexts share ``E = 0``, ``mid`` gives them all ``p = 0.35``, i.e. 0 for any
  latent inactive on more than 35% of tokens; ``random`` spreads them over ``[0, 0.7]``.
  F_sim uses the eval contexts' *scores* only, never their true activations.
* ``isotonic`` (nlrw's): a per-latent monotone non-decreasing least-squares fit of the true
  activation on ``E`` over the **calibration** split only (:func:`isotonic_fit`,
  pool-adjacent-violators), applied to the eval contexts by linear interpolation between the
  fitted points, constant beyond the first and last (:func:`isotonic_apply`). The fit is a
  conditional mean, so it is ≥ 0 (true activations are) and it learns from held-out
  contexts how often each score range is really active.
* ``gate`` (nlrw's): a threshold ``t_l`` on ``E`` chosen on the calibration split for
  specificity (:func:`gate_threshold`: the smallest ``t`` with ``P(E < t | inactive) ≥ s``),
  then ``a = 0`` when ``E < t_l``, else the isotonic value at ``E``; where that is 0 (the
  isotonic fit is flat at zero up there), ``a`` is the *fill*: the mean true activation of
  the active calibration contexts with ``E ≥ t_l`` (of all active calibration contexts when
  none is above ``t_l``) (:func:`gate_fill`). The specificity ``s`` is **sized by the top-k
  budget**: with ``N`` simulated latents, each latent may let through at most
  ``gate_budget · k / N`` false positives per context, so that the expected number of
  false-positive latents per context stays ≤ ``gate_budget · k`` (default ``k/4``):
  ``s = max(gate_min_specificity, 1 − gate_budget · k / N)`` (:func:`gate_specificity`; the
  budget only tightens the former default 0.9, which it overtakes above ``N = 2.5 k``;
  ``gate_specificity`` overrides both).
  Resolving ``s`` takes at least ``⌈1 / (1 − s)⌉`` inactive calibration contexts; a latent
  with fewer falls back (below), named in ``calibrate.json``.
**Fallback.** A latent with fewer than ``min_calibration_contexts`` calibration contexts, or
fewer than ``min_calibration_active`` active ones among them, cannot be fitted: its
``isotonic`` and ``gate`` activations are all 0 (predict inactive, the zero-ablation value
of that latent). A latent whose gate specificity cannot be resolved (too few inactive
calibration contexts) keeps its isotonic fit and gets ``gate`` = 0 (``gate_fallback``).
Such latents are listed in ``calibration_fits.parquet`` (``fallback``) and
counted in ``calibrate.json``. (With ``quantile_fit = "calibration"`` a latent with too few
calibration contexts gets ``quantile`` = 0 too.)

**Metrics** (``calibration_metrics.parquet``, on the eval contexts; :func:`latent_metrics`):
``pearson`` of calibrated vs true activation (NaN when either is constant, e.g. a method that
predicts 0 everywhere, or with fewer than two contexts), ``specificity = P(a = 0 | true =
0)`` (NaN without inactive contexts), ``sensitivity = P(a > 0 | true > 0)`` (NaN without
active contexts), ``auroc`` of ``E`` for ``true > 0`` against ``true = 0`` (ties count one
half; NaN when a class is empty; the same for every calibration: it rates the simulator's
ranking, which the mappings do not change), ``n_active``, ``n_contexts``.

**Outputs** (run directory, each written atomically; ``calibrate.json`` last, the done mark):

* ``calibration.parquet``: ``latent`` Int32, ``context_id`` Int32 (eval contexts),
  ``calibration`` Utf8, ``activation`` Float32 (≥ 0); sorted by calibration (in the config's
  order), latent, context.
* ``calibration_metrics.parquet``: ``latent``, ``calibration``, ``pearson``, ``specificity``,
  ``sensitivity``, ``auroc``, ``n_active``, ``n_contexts``.
* ``calibration_support.parquet``: what decides the loss, per calibration and eval context,
  when every simulated latent is rewritten and top-k re-applied (:func:`support_diagnostics`):
  ``n_spurious`` (simulated latents with calibrated > 0 where the truth is 0 that survive
  top-k), ``n_surviving`` (simulated latents in the rewritten top-k), ``n_true_active``
  (simulated latents truly active), ``precision`` and ``recall`` of the surviving support
  (NaN where undefined); ``calibrate.json`` holds each calibration's mean and quantiles.
* ``calibration_fits.parquet``: per latent ``n_calibration``, ``n_calibration_active``,
  ``fallback`` (null or the reason), the isotonic fit's points ``isotonic_x``/``isotonic_y``,
  ``gate_threshold``, ``gate_fill``.
* ``calibration_shuffled.parquet`` (when the simulate stage ran the shuffled-explanation
  control, ``simulations_shuffled.parquet``): those simulations calibrated exactly like the real
  ones (same methods, reference and gate specificity; F_sim and the fits from the control's own
  scores), in the schema of ``calibration.parquet``; its mean metrics and support diagnostics
  are under ``shuffled`` in ``calibrate.json``.
* ``calibration.safetensors``: :func:`nlrw.model.quantiles.save_tables` with ``sim`` (the
  simulated-score tables of ``quantile``, mid-rank positions) and the reference ``active``
  and ``frequency`` (from the stats), one row per simulated latent in ascending order;
  metadata ``latents`` (JSON list), ``quantile_fit``.
* ``calibrate.json``: :func:`nlrw.lib.provenance.stage_record` plus the inputs' digests, counts,
  fallbacks and mean metrics per calibration.

**Resume.** Every method is deterministic given ``seed`` (only ``quantile_ranks = random``
draws, from ``numpy.random.default_rng(seed)``). A run
whose outputs are complete and whose config *and inputs* (digests of
``simulations.parquet``, ``contexts.parquet``, ``latents/stats.parquet``) match is skipped;
outputs of another config or inputs raise ``FileExistsError`` unless ``overwrite``.

Memory: the four needed columns of the simulations (≈ 16 bytes a row) plus the output
(≈ 30 bytes per eval row and method); fits run latent by latent.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import polars as pl

from nlrw.config.calibrate import METHODS, SPLITS, CalibrateConfig, Method
from nlrw.contexts import load_context_activations
from nlrw.lib.io import atomic_path, atomic_write_json, file_digest
from nlrw.lib.metrics import auroc, pearson
from nlrw.lib.progress import progress_bar
from nlrw.lib.provenance import config_hash, stage_record
from nlrw.model.quantiles import midrank_tables, quantile_normalize, save_tables

__all__ = [
    "METHODS",
    "CalibrateConfig",
    "LatentFit",
    "Method",
    "fit_latent",
    "gate_apply",
    "gate_fill",
    "gate_specificity",
    "gate_threshold",
    "isotonic_apply",
    "isotonic_fit",
    "latent_metrics",
    "quantile_calibrate",
    "run",
    "support_diagnostics",
    "uncalibrated",
]


SIMULATIONS_FILE = "simulations.parquet"
CONTEXTS_FILE = "contexts.parquet"
STATS_FILE = "latents/stats.parquet"
OUTPUT_FILE = "calibration.parquet"
METRICS_FILE = "calibration_metrics.parquet"
FITS_FILE = "calibration_fits.parquet"
SUPPORT_FILE = "calibration_support.parquet"
SHUFFLED_SIMULATIONS_FILE = "simulations_shuffled.parquet"
SHUFFLED_OUTPUT_FILE = "calibration_shuffled.parquet"
TABLES_FILE = "calibration.safetensors"
RECORD_FILE = "calibrate.json"

E_MAX = 9.0
_E_TOLERANCE = 1e-3  # a renormalized float32 expectation may exceed 9 by rounding


# --------------------------------------------------------------------------------------------
# The methods, as pure functions
# --------------------------------------------------------------------------------------------


def _vector(x: npt.ArrayLike, name: str) -> npt.NDArray[np.float64]:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}[{int(np.argmin(np.isfinite(a)))}] is not finite")
    return a


def uncalibrated(
    expected_value: npt.ArrayLike, max_activation: npt.ArrayLike
) -> npt.NDArray[np.float32]:
    """The paper's mapping ``a = E / 9 · max`` (``max`` a scalar or one per score)."""
    e = np.asarray(expected_value, dtype=np.float64)
    return (e / E_MAX * np.asarray(max_activation, dtype=np.float64)).astype(np.float32)


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
    sim = midrank_tables(fit_index, fit_scores, active.shape[0], sim_quantiles or None)
    return quantile_normalize(index, scores, sim, active, frequency, offsets), sim


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


def fit_latent(
    scores: npt.ArrayLike,
    true: npt.ArrayLike,
    cfg: CalibrateConfig,
    specificity: float | None = None,
) -> LatentFit:
    """Fit isotonic and gate on one latent's calibration contexts (``scores`` = E,
    ``true`` = true activations), or the fallback when there are too few of them.
    ``specificity``: the gate's (default ``cfg.gate_specificity``, else 0.9)."""
    e = np.asarray(scores, dtype=np.float32)
    t = np.asarray(true, dtype=np.float64)
    n, n_active = int(e.size), int((t > 0).sum())
    reason = None
    if n < cfg.min_calibration_contexts:
        reason = f"fewer than {cfg.min_calibration_contexts} calibration contexts ({n})"
    elif n_active < cfg.min_calibration_active:
        reason = f"fewer than {cfg.min_calibration_active} active calibration contexts ({n_active})"
    if reason is not None:
        empty = np.zeros(0)
        return LatentFit(empty, empty, float("inf"), 0.0, n, n_active, reason, reason)
    xs, ys = isotonic_fit(e, t)
    spec = specificity if specificity is not None else (cfg.gate_specificity or 0.9)
    n_inactive = n - n_active
    # No inactive context: nothing to gate (the threshold is -inf), nothing to resolve.
    if n_inactive and not gate_resolvable(n_inactive, spec):
        need = math.ceil(1.0 / (1.0 - spec) - 1e-9)
        why = (
            f"{n_inactive} inactive calibration contexts cannot resolve gate specificity "
            f"{spec:.6g} (needs {need})"
        )
        return LatentFit(xs, ys, float("inf"), 0.0, n, n_active, None, why)
    # A budget as large as the simulated latents themselves gates nothing (specificity 0).
    threshold = gate_threshold(e, t > 0, spec) if spec > 0 else float("-inf")
    return LatentFit(xs, ys, threshold, gate_fill(e, t, threshold), n, n_active, None)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def latent_metrics(
    calibrated: npt.ArrayLike,
    true: npt.ArrayLike,
    expected_value: npt.ArrayLike,
    *,
    score_auroc: float | None = None,
) -> dict[str, float | int]:
    """One latent's metrics on its eval contexts: ``pearson`` (calibrated vs true),
    ``specificity = P(a = 0 | true = 0)``, ``sensitivity = P(a > 0 | true > 0)``, ``auroc`` of
    the score for ``true > 0``, ``n_active``, ``n_contexts`` (NaN where undefined: see the
    module docstring). ``score_auroc``: the auroc if already known (it does not depend on
    the calibration)."""
    a = np.asarray(calibrated, dtype=np.float64)
    t = np.asarray(true, dtype=np.float64)
    e = np.asarray(expected_value, dtype=np.float64)
    if not a.shape == t.shape == e.shape or a.ndim != 1:
        raise ValueError(
            f"calibrated, true, expected_value must be 1-D of one length, "
            f"got {a.shape}, {t.shape}, {e.shape}"
        )
    active = t > 0
    n_active = int(active.sum())
    n_inactive = int(a.size - n_active)
    return {
        "pearson": pearson(a, t),
        "specificity": float((a[~active] == 0).mean()) if n_inactive else float("nan"),
        "sensitivity": float((a[active] > 0).mean()) if n_active else float("nan"),
        "auroc": auroc(e, active) if score_auroc is None else score_auroc,
        "n_active": n_active,
        "n_contexts": int(a.size),
    }


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------

_SIMULATION_COLUMNS = ("latent", "context_id", "expected_value", "true_activation")
_NEEDED = {
    SIMULATIONS_FILE: (_SIMULATION_COLUMNS, "simulate"),
    SHUFFLED_SIMULATIONS_FILE: (_SIMULATION_COLUMNS, "simulate"),
    CONTEXTS_FILE: (("context_id", "split"), "contexts"),
    STATS_FILE: (("latent", "reference_max", "reference_frequency", "active_quantiles"), "cache"),
}


def _read_input(run_dir: Path, name: str) -> pl.DataFrame:
    columns, stage = _NEEDED[name]
    path = run_dir / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the {stage} stage first")
    try:
        schema = pl.read_parquet_schema(path)
    except Exception as e:  # polars raises several error types for a damaged file
        raise ValueError(f"{path}: not a readable parquet file (truncated or corrupt?): {e}") from e
    missing = [c for c in columns if c not in schema]
    if missing:
        raise ValueError(
            f"{path} lacks column(s) {', '.join(missing)}: it predates this version of nlrw "
            f"or is damaged; re-run `nlrw {stage}`"
        )
    try:
        return pl.read_parquet(path, columns=list(columns))
    except Exception as e:
        raise ValueError(f"{path}: not a readable parquet file (truncated or corrupt?): {e}") from e


class _Inputs(NamedTuple):
    latent: npt.NDArray[np.int64]  # per simulation row, sorted by (latent, context)
    context: npt.NDArray[np.int64]
    score: npt.NDArray[np.float32]
    true: npt.NDArray[np.float32]
    is_eval: npt.NDArray[np.bool_]
    latents: npt.NDArray[np.int64]  # distinct simulated latents, ascending
    bounds: npt.NDArray[np.int64]  # rows of latents[i] are bounds[i]:bounds[i+1]
    max_activation: npt.NDArray[np.float64]  # per latent of `latents`
    active_table: npt.NDArray[np.float32]  # [len(latents), Qr]
    frequency: npt.NDArray[np.float32]  # per latent of `latents`
    n_eval_contexts: int
    n_calibration_contexts: int


def _where(latent: np.ndarray, context: np.ndarray, bad: np.ndarray) -> str:
    i = int(np.argmax(bad))
    return f"latent {int(latent[i])}, context {int(context[i])}"


def _active_tables(stats: pl.DataFrame, path: Path) -> npt.NDArray[np.float32]:
    """The stats' active-value tables as ``[n, Q]``, checked (equal ``Q ≥ 2``, finite,
    ascending), an error naming the latent otherwise."""
    column = stats["active_quantiles"]
    if isinstance(column.dtype, pl.Array):
        column = column.cast(pl.List(pl.Float32))
    if not isinstance(column.dtype, pl.List):
        raise ValueError(
            f"{path}: column active_quantiles must be a list of floats, got {column.dtype}"
        )
    lengths = column.list.len().fill_null(0).to_numpy()
    if stats.height == 0:
        return np.zeros((0, 2), np.float32)
    q = int(lengths[0])
    bad = lengths != q if q >= 2 else np.ones(lengths.size, bool)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"{path}: latent {stats['latent'][i]} has a quantile table of {lengths[i]} entries "
            f"(expected {max(q, 2)} or more, equal for every latent)"
        )
    real = column.explode().cast(pl.Float32).fill_null(np.nan).to_numpy().reshape(-1, q)
    bad = ~np.isfinite(real).all(axis=1) | (np.diff(real, axis=1) < 0).any(axis=1)
    if bad.any():
        raise ValueError(
            f"{path}: the quantile table of latent {stats['latent'][int(np.argmax(bad))]} "
            "is not finite and ascending"
        )
    return np.ascontiguousarray(real, dtype=np.float32)


def _load_inputs(run_dir: Path, simulations: str = SIMULATIONS_FILE) -> _Inputs:
    sims = _read_input(run_dir, simulations)
    contexts = _read_input(run_dir, CONTEXTS_FILE)
    stats = _read_input(run_dir, STATS_FILE)
    sim_path, ctx_path, stats_path = (
        run_dir / simulations,
        run_dir / CONTEXTS_FILE,
        run_dir / STATS_FILE,
    )

    # contexts: id -> split
    ctx_ids = contexts["context_id"].to_numpy().astype(np.int64)
    splits = contexts["split"]
    unknown = splits.filter(~splits.is_in(list(SPLITS)) | splits.is_null()).unique().to_list()
    if unknown:
        raise ValueError(
            f"{ctx_path}: unknown split value(s) {unknown[:5]} (expected 'eval' or 'calibration')"
        )
    if np.unique(ctx_ids).size != ctx_ids.size:
        raise ValueError(f"{ctx_path}: a context_id appears more than once")
    ctx_eval = (splits == "eval").to_numpy()

    sims = sims.sort("latent", "context_id")
    latent = sims["latent"].to_numpy().astype(np.int64)
    context = sims["context_id"].to_numpy().astype(np.int64)
    score = sims["expected_value"].cast(pl.Float32).fill_null(np.nan).to_numpy()
    true = sims["true_activation"].cast(pl.Float32).fill_null(np.nan).to_numpy()
    bad = ~np.isfinite(score)
    if bad.any():
        raise ValueError(
            f"{sim_path}: expected_value is NaN or missing ({_where(latent, context, bad)}; "
            f"{int(bad.sum())} rows in all)"
        )
    bad = (score < 0) | (score > E_MAX + _E_TOLERANCE)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"{sim_path}: expected_value {score[i]} outside [0, 9] ({_where(latent, context, bad)})"
        )
    bad = ~np.isfinite(true) | (true < 0)
    if bad.any():
        raise ValueError(
            f"{sim_path}: true_activation is NaN, missing or negative "
            f"({_where(latent, context, bad)})"
        )
    dup = np.r_[False, (latent[1:] == latent[:-1]) & (context[1:] == context[:-1])]
    if dup.any():
        raise ValueError(
            f"{sim_path}: a (latent, context_id) pair appears twice "
            f"({_where(latent, context, dup)})"
        )

    order = np.argsort(ctx_ids)
    pos = np.searchsorted(ctx_ids[order], context)
    found = pos < ctx_ids.size
    found[found] = ctx_ids[order][pos[found]] == context[found]
    if not found.all():
        raise ValueError(
            f"{sim_path}: context {int(context[np.argmin(found)])} is not in {ctx_path}"
        )
    is_eval = ctx_eval[order][pos]

    latents, starts = np.unique(latent, return_index=True)
    bounds = np.r_[starts, latent.size].astype(np.int64)

    stats = stats.sort("latent")
    stat_latents = stats["latent"].to_numpy().astype(np.int64)
    spos = np.searchsorted(stat_latents, latents)
    known = spos < stat_latents.size
    known[known] = stat_latents[spos[known]] == latents[known]
    if not known.all():
        absent = latents[~known]
        raise ValueError(
            f"{sim_path}: latent(s) {absent[:10].tolist()} ({absent.size} in all) are absent "
            f"from {stats_path}: were they simulated from another cache?"
        )
    stats = stats[spos.tolist()] if latents.size else stats.head(0)
    active = _active_tables(stats, stats_path)
    max_act = stats["reference_max"].cast(pl.Float64).fill_null(np.nan).to_numpy()
    bad = ~np.isfinite(max_act) | (max_act < 0)
    if bad.any():
        raise ValueError(
            f"{stats_path}: reference_max of latent {int(latents[np.argmax(bad)])} is "
            f"{max_act[bad][0]}"
        )
    freq = stats["reference_frequency"].cast(pl.Float64).fill_null(np.nan).to_numpy()
    bad = ~np.isfinite(freq) | (freq < 0) | (freq > 1)
    if bad.any():
        raise ValueError(
            f"{stats_path}: reference_frequency of latent {int(latents[np.argmax(bad)])} is "
            f"{freq[bad][0]}, outside [0, 1]"
        )
    in_sims = np.isin(ctx_ids, context)
    return _Inputs(
        latent=latent,
        context=context,
        score=score.astype(np.float32),
        true=true.astype(np.float32),
        is_eval=is_eval,
        latents=latents,
        bounds=bounds,
        max_activation=max_act,
        active_table=active,
        frequency=freq.astype(np.float32),
        n_eval_contexts=int((in_sims & ctx_eval).sum()),
        n_calibration_contexts=int((in_sims & ~ctx_eval).sum()),
    )


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------

OUTPUT_SCHEMA: dict[str, Any] = {
    "latent": pl.Int32,
    "context_id": pl.Int32,
    "calibration": pl.String,
    "activation": pl.Float32,
}
METRICS_SCHEMA: dict[str, Any] = {
    "latent": pl.Int32,
    "calibration": pl.String,
    "pearson": pl.Float64,
    "specificity": pl.Float64,
    "sensitivity": pl.Float64,
    "auroc": pl.Float64,
    "n_active": pl.Int64,
    "n_contexts": pl.Int64,
}
FITS_SCHEMA: dict[str, Any] = {
    "latent": pl.Int32,
    "n_calibration": pl.Int64,
    "n_calibration_active": pl.Int64,
    "fallback": pl.String,
    "isotonic_x": pl.List(pl.Float32),
    "isotonic_y": pl.List(pl.Float32),
    "gate_threshold": pl.Float32,
    "gate_fill": pl.Float32,
    "gate_fallback": pl.String,
}
SUPPORT_SCHEMA: dict[str, Any] = {
    "calibration": pl.String,
    "context_id": pl.Int32,
    "n_spurious": pl.Int32,
    "n_surviving": pl.Int32,
    "n_true_active": pl.Int32,
    "precision": pl.Float64,
    "recall": pl.Float64,
}
_OUTPUTS = (OUTPUT_FILE, METRICS_FILE, FITS_FILE, SUPPORT_FILE, TABLES_FILE)


ACTIVATIONS_FILE = "contexts/activations.safetensors"


def _inputs_digest(run_dir: Path) -> dict[str, str]:
    names = [n for n in _NEEDED if n != SHUFFLED_SIMULATIONS_FILE] + [ACTIVATIONS_FILE]
    if (run_dir / SHUFFLED_SIMULATIONS_FILE).is_file():
        names.append(SHUFFLED_SIMULATIONS_FILE)
    return {name: file_digest(run_dir / name) for name in names}


def _previous(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / RECORD_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class _Calibrated(NamedTuple):
    """One set of simulations calibrated with every method (the stage's tables)."""

    table: pl.DataFrame
    metrics: pl.DataFrame
    fits: pl.DataFrame
    support: pl.DataFrame
    sim_table: npt.NDArray[np.float32]
    fallbacks: dict[int, str]
    gate_fallbacks: dict[int, str]
    n_rows: int


def _calibrate(
    cfg: CalibrateConfig,
    data: _Inputs,
    truth: Any,
    specificity: float,
    *,
    progress: bool,
    desc: str = "calibrate",
) -> _Calibrated:
    """Every method of ``cfg`` on ``data`` (module docstring), with the gate at
    ``specificity``; ``truth`` the contexts' true top-k (for the support diagnostics)."""
    n_rows, n_latents = data.latent.size, data.latents.size
    row_latent = np.repeat(np.arange(n_latents), np.diff(data.bounds))  # index into latents
    calibrated: dict[str, np.ndarray] = {}
    if "uncalibrated" in cfg.methods:
        calibrated["uncalibrated"] = uncalibrated(data.score, data.max_activation[row_latent])
    # The simulated-score tables are always computed: calibration.safetensors keeps them.
    fit_rows = data.is_eval if cfg.quantile_fit == "eval" else ~data.is_eval
    offsets = None
    if cfg.quantile_ranks == "random":
        rng = np.random.default_rng([cfg.seed, 0x9A17])
        offsets = (rng.random(n_rows) - 0.5).astype(np.float32)
    acts, sim_table = quantile_calibrate(
        row_latent[fit_rows],
        data.score[fit_rows],
        row_latent,
        data.score,
        data.active_table,
        data.frequency,
        cfg.sim_quantiles,
        offsets,
    )
    if "quantile" in cfg.methods:
        calibrated["quantile"] = acts
    fitted = any(m in cfg.methods for m in ("isotonic", "gate"))
    for m in ("isotonic", "gate"):
        if m in cfg.methods:
            calibrated[m] = np.zeros(n_rows, np.float32)

    fits: list[dict[str, Any]] = []
    fallbacks: dict[int, str] = {}
    gate_fallbacks: dict[int, str] = {}
    metric_rows: dict[str, list[dict[str, Any]]] = {m: [] for m in cfg.methods}
    bar = progress_bar(n_latents, desc, enabled=progress)
    for i, lat in enumerate(data.latents.tolist()):
        rows = slice(int(data.bounds[i]), int(data.bounds[i + 1]))
        ev = data.is_eval[rows]
        e_all, t_all = data.score[rows], data.true[rows]
        e_cal, t_cal = e_all[~ev], t_all[~ev]
        fit = fit_latent(e_cal, t_cal, cfg, specificity)
        if fit.fallback is not None:
            fallbacks[lat] = fit.fallback
        if fit.gate_fallback is not None:
            gate_fallbacks[lat] = fit.gate_fallback
        if (
            "quantile" in calibrated
            and cfg.quantile_fit == "calibration"
            and fit.n_calibration < cfg.min_calibration_contexts
        ):
            calibrated["quantile"][rows] = 0.0
        if fitted:
            e_eval = e_all[ev]
            idx = np.arange(rows.start, rows.stop)[ev]
            if "isotonic" in calibrated:
                calibrated["isotonic"][idx] = isotonic_apply(fit.xs, fit.ys, e_eval)
            if "gate" in calibrated:
                calibrated["gate"][idx] = gate_apply(
                    e_eval, fit.threshold, fit.xs, fit.ys, fit.fill
                )
            fits.append(
                {
                    "latent": lat,
                    "n_calibration": fit.n_calibration,
                    "n_calibration_active": fit.n_calibration_active,
                    "fallback": fit.fallback,
                    "isotonic_x": fit.xs.tolist(),
                    "isotonic_y": fit.ys.tolist(),
                    "gate_threshold": fit.threshold,
                    "gate_fill": fit.fill,
                    "gate_fallback": fit.gate_fallback,
                }
            )
        score_auroc = auroc(e_all[ev], t_all[ev] > 0)
        for m, values in calibrated.items():
            a = values[rows]
            np.maximum(a, 0.0, out=a)  # activations are >= 0 (a NaN-free no-op in theory)
            metric_rows[m].append(
                {
                    "latent": lat,
                    "calibration": m,
                    **latent_metrics(a[ev], t_all[ev], e_all[ev], score_auroc=score_auroc),
                }
            )
        if bar:
            bar.update(1)
    if bar:
        bar.close()

    eval_rows = np.flatnonzero(data.is_eval)
    table = pl.concat(
        [
            pl.DataFrame(
                {
                    "latent": data.latent[eval_rows],
                    "context_id": data.context[eval_rows],
                    "calibration": pl.repeat(m, eval_rows.size, dtype=pl.String, eager=True),
                    "activation": calibrated[m][eval_rows],
                },
                schema=OUTPUT_SCHEMA,
            )
            for m in cfg.methods
        ]
    )
    metrics = pl.DataFrame([r for m in cfg.methods for r in metric_rows[m]], schema=METRICS_SCHEMA)
    fits_table = pl.DataFrame(fits, schema=FITS_SCHEMA)
    eval_contexts = np.unique(data.context[eval_rows])
    support = pl.concat(
        [
            support_diagnostics(
                m,
                data.latents,
                data.latent[eval_rows],
                data.context[eval_rows],
                calibrated[m][eval_rows],
                eval_contexts,
                truth.values.numpy()[eval_contexts],
                truth.indices.numpy()[eval_contexts],
            )
            for m in cfg.methods
        ]
    )

    return _Calibrated(
        table,
        metrics,
        fits_table,
        support,
        sim_table,
        fallbacks,
        gate_fallbacks,
        int(eval_rows.size) * len(cfg.methods),
    )


def run(
    cfg: CalibrateConfig,
    run_dir: str | Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> pl.DataFrame:
    """Calibrate ``run_dir/simulations.parquet`` with every method of ``cfg``; writes the
    outputs listed in the module docstring and returns the metrics table.

    Raises:
        FileNotFoundError: an input is missing (naming it and the stage that writes it).
        ValueError: an unreadable input, a NaN or out-of-range score, an unknown split, a
            simulated latent absent from the stats (each naming the file).
        FileExistsError: outputs of another config or other inputs exist and not
            ``overwrite``.
    """
    run_dir = Path(run_dir)
    started = time.perf_counter()
    data = _load_inputs(run_dir)  # bad inputs are reported first, whatever is on disk
    shuffled_data = (
        _load_inputs(run_dir, SHUFFLED_SIMULATIONS_FILE)
        if (run_dir / SHUFFLED_SIMULATIONS_FILE).is_file()
        else None
    )
    inputs_digest = _inputs_digest(run_dir)
    key = config_hash({"config": cfg, "inputs": inputs_digest})
    previous = _previous(run_dir)
    if previous is not None and not overwrite:
        outputs = [*_OUTPUTS, *([SHUFFLED_OUTPUT_FILE] if shuffled_data is not None else [])]
        if previous.get("key") == key and all((run_dir / f).is_file() for f in outputs):
            return pl.read_parquet(run_dir / METRICS_FILE)
        if previous.get("key") != key:
            raise FileExistsError(
                f"{run_dir / RECORD_FILE}: calibration of another config or other inputs "
                "exists; pass overwrite=True to replace it"
            )

    (run_dir / RECORD_FILE).unlink(missing_ok=True)  # the done mark goes last
    if shuffled_data is None:
        (run_dir / SHUFFLED_OUTPUT_FILE).unlink(missing_ok=True)  # a stale control's

    truth = load_context_activations(run_dir)
    k = int(truth.values.shape[1])
    specificity = (
        cfg.gate_specificity
        if cfg.gate_specificity is not None
        else gate_specificity(cfg.gate_budget, k, int(data.latents.size), cfg.gate_min_specificity)
    )
    result = _calibrate(cfg, data, truth, specificity, progress=progress)
    shuffled = None
    if shuffled_data is not None:
        shuffled = _calibrate(
            cfg, shuffled_data, truth, specificity, progress=progress, desc="calibrate shuffled"
        )
    table, metrics, fits_table, support, sim_table, fallbacks, gate_fallbacks, n_rows = result
    n_latents = int(data.latents.size)
    if shuffled is not None:
        with atomic_path(run_dir / SHUFFLED_OUTPUT_FILE) as tmp:
            shuffled.table.write_parquet(tmp, statistics=True)

    with atomic_path(run_dir / OUTPUT_FILE) as tmp:
        table.write_parquet(tmp, statistics=True)
    with atomic_path(run_dir / METRICS_FILE) as tmp:
        metrics.write_parquet(tmp)
    with atomic_path(run_dir / FITS_FILE) as tmp:
        fits_table.write_parquet(tmp)
    with atomic_path(run_dir / SUPPORT_FILE) as tmp:
        support.write_parquet(tmp)
    save_tables(
        run_dir / TABLES_FILE,
        sim=sim_table,
        active=data.active_table,
        frequency=data.frequency,
        latents=json.dumps(data.latents.tolist()),
        quantile_fit=cfg.quantile_fit,
    )
    atomic_write_json(
        run_dir / RECORD_FILE,
        stage_record(
            "calibrate",
            cfg,
            key=key,
            inputs=inputs_digest,
            n_latents=n_latents,
            n_eval_contexts=data.n_eval_contexts,
            n_calibration_contexts=data.n_calibration_contexts,
            n_rows=n_rows,
            n_fallback_latents=len(fallbacks),
            fallback_latents={str(k): v for k, v in fallbacks.items()},
            gate_specificity=specificity,
            top_k=k,
            n_gate_fallback_latents=len(gate_fallbacks),
            gate_fallback_latents={str(k): v for k, v in gate_fallbacks.items()},
            mean_metrics=_mean_metrics(metrics),
            support=_support_summary(support),
            shuffled=None
            if shuffled is None
            else {
                "n_latents": int(shuffled_data.latents.size) if shuffled_data else 0,
                "mean_metrics": _mean_metrics(shuffled.metrics),
                "support": _support_summary(shuffled.support),
            },
            seconds=time.perf_counter() - started,
        ),
    )
    return metrics


def support_diagnostics(
    calibration: str,
    simulated: npt.NDArray[np.int64],
    latent: npt.NDArray[np.int64],
    context: npt.NDArray[np.int64],
    activation: npt.NDArray[np.float32],
    context_ids: npt.NDArray[np.int64],
    true_values: npt.NDArray[np.float32],
    true_indices: npt.NDArray[np.int64],
) -> pl.DataFrame:
    """Per eval context, what survives when every simulated latent is rewritten.

    The rewritten latent vector of context ``c`` holds the true top-k values of the latents
    that were not simulated and the calibrated ``activation`` of the simulated ones; top-k
    (``k`` = the width of ``true_values``) is re-applied (ties broken towards the lower
    latent id). Among the simulated latents: ``n_spurious`` = in the new top-k with
    calibrated > 0 but true 0; ``n_surviving`` = in the new top-k with calibrated > 0;
    ``n_true_active`` = true > 0; ``precision = (n_surviving − n_spurious) / n_surviving``,
    ``recall = (n_surviving − n_spurious) / n_true_active`` (NaN when the denominator is 0).

    ``latent``, ``context``, ``activation``: the calibrated rows; ``true_values`` /
    ``true_indices`` ``[len(context_ids), k]``: the true top-k of each context.
    """
    k = true_values.shape[1]
    sim_set = np.zeros(int(max(simulated.max(initial=-1), true_indices.max(initial=-1))) + 1, bool)
    sim_set[simulated] = True
    order = np.argsort(context, kind="stable")
    ctx_sorted = context[order]
    rows: dict[str, list[Any]] = {c: [] for c in SUPPORT_SCHEMA}
    for i, c in enumerate(context_ids.tolist()):
        lo, hi = np.searchsorted(ctx_sorted, [c, c + 1])
        pick = order[lo:hi]
        a_lat, a_val = latent[pick], activation[pick].astype(np.float64)
        pos = a_val > 0
        t_idx, t_val = true_indices[i], true_values[i].astype(np.float64)
        t_active = t_val > 0
        truly = set(t_idx[t_active & sim_set[t_idx]].tolist())
        keep = t_active & ~sim_set[t_idx]
        cand_lat = np.concatenate([t_idx[keep], a_lat[pos]])
        cand_val = np.concatenate([t_val[keep], a_val[pos]])
        top = np.lexsort((cand_lat, -cand_val))[:k]
        survivors = [int(x) for x in cand_lat[top] if sim_set[x]]
        n_surv = len(survivors)
        n_spur = sum(1 for x in survivors if x not in truly)
        hits = n_surv - n_spur
        rows["calibration"].append(calibration)
        rows["context_id"].append(c)
        rows["n_spurious"].append(n_spur)
        rows["n_surviving"].append(n_surv)
        rows["n_true_active"].append(len(truly))
        rows["precision"].append(hits / n_surv if n_surv else float("nan"))
        rows["recall"].append(hits / len(truly) if truly else float("nan"))
    return pl.DataFrame(rows, schema=SUPPORT_SCHEMA)


def _support_summary(support: pl.DataFrame) -> dict[str, dict[str, float | None]]:
    """Per calibration: mean and quantiles of spurious survivors, mean precision / recall."""
    out: dict[str, dict[str, float | None]] = {}
    for (method,), g in support.group_by(["calibration"], maintain_order=True):
        spur = g["n_spurious"].to_numpy().astype(np.float64)
        entry: dict[str, float | None] = {
            "spurious_mean": float(spur.mean()) if spur.size else None,
        }
        for q in (0.5, 0.9, 1.0):
            entry[f"spurious_q{int(q * 100)}"] = float(np.quantile(spur, q)) if spur.size else None
        for col in ("precision", "recall"):
            v = g[col].drop_nans().drop_nulls()
            entry[col] = float(v.mean()) if len(v) else None  # type: ignore[arg-type]
        out[str(method)] = entry
    return out


def _mean_metrics(metrics: pl.DataFrame) -> dict[str, dict[str, float | None]]:
    """Per calibration, the mean of each metric over the latents where it is defined."""
    out: dict[str, dict[str, float | None]] = {}
    for (method,), group in metrics.group_by(["calibration"], maintain_order=True):
        out[str(method)] = {}
        for col in ("pearson", "specificity", "sensitivity", "auroc"):
            values = group[col].drop_nans().drop_nulls()
            out[str(method)][col] = float(values.mean()) if len(values) else None  # type: ignore[arg-type]
    return out
