"""The ``calibrate`` stage: turn the simulator's expected scores into latent activations.

The simulator rates how strongly a latent fires on a context's last token with an expected
digit ``E ∈ [0, 9]`` (``simulations.parquet``). The evaluate stage needs an *activation* on
the latent's own scale, and how a score becomes an activation decides whether the simulated
latents help or hurt. This stage maps every simulated score of an **eval** context through
each calibration method asked for, side by side, and measures on the eval contexts how well
each calibrated activation matches the true one.

**Methods** (per latent ``l``; ``E`` its simulated score on a context), one module each in
:mod:`nlrw.calibrations` with its math, applied through the registry
:data:`nlrw.calibrations.CALIBRATIONS`:

* ``uncalibrated`` (the paper's first mapping; :mod:`nlrw.calibrations.uncalibrated`):
  ``a = E / 9 · max_l``, ``max_l`` the latent's ``reference_max``; any ``E > 0`` is active, so
  specificity is low (the paper's diagnosis).
* ``quantile`` (the paper's calibration; :mod:`nlrw.calibrations.quantile`):
  ``a = F_real⁻¹(F_sim(E))``, ``F_real`` the cache's reference distribution, ``F_sim`` the
  latent's simulated scores over the eval contexts (``quantile_fit``), ties and ranks as
  ``quantile_ranks`` says; only the top ``≈ q`` scores are active, so sensitivity is low when
  the ranking is imperfect (the paper's second diagnosis).
* ``isotonic`` (nlrw's; :mod:`nlrw.calibrations.isotonic`): a monotone least-squares fit of
  the true activation on ``E`` over the **calibration** split, applied to the eval contexts.
* ``gate`` (nlrw's; :mod:`nlrw.calibrations.gate`): 0 below a threshold ``t_l`` set on the
  calibration split for a specificity sized by the top-k budget (``gate_budget``,
  ``gate_min_specificity``, ``gate_specificity``), the isotonic value (or a fill) above it.
  Resolving specificity ``s`` takes at least ``⌈1 / (1 − s)⌉`` inactive calibration
  contexts; a latent with fewer falls back (below), named in ``calibrate.json``.

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

**Every position** (:func:`calibrate_positions`, for ``evaluate.positions = "all"``): the
all-at-once layout also rates every position of each window (``simulations_positions.parquet``);
the same methods map those ratings, with the isotonic and gate fits made on the calibration
split's last positions (where the truth is stored) and ``F_sim`` from every position's rating.
The evaluate stage calls it; nothing is written here.

**Resume.** Every method is deterministic given ``seed`` (only ``quantile_ranks = random``
draws, from ``numpy.random.default_rng(seed)``). A run
whose outputs are complete and whose config *and inputs* (digests of
``simulations.parquet``, ``contexts.parquet``, ``latents/stats.parquet``) match is skipped;
outputs of another config or inputs raise ``FileExistsError`` unless ``overwrite``.

Memory: the four needed columns of the simulations (≈ 16 bytes a row) plus the output
(≈ 30 bytes per eval row and method); fits run latent by latent.

Why this module is long: the methods live in :mod:`nlrw.calibrations`, but the stage itself
is most of what remains: checking three input files with errors that name the bad row or
latent (≈ 190 lines), the per-latent fit / apply / metrics loop, the support diagnostics,
five output tables with their schemas, and resume. The input checks could be a module of
their own; they are kept here beside the one function that uses them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import polars as pl

from nlrw.calibrations import CALIBRATIONS, LatentFit, PerLatent, Rows
from nlrw.calibrations.gate import (
    gate_apply,
    gate_fill,
    gate_fit,
    gate_specificity,
    gate_threshold,
)
from nlrw.calibrations.isotonic import isotonic_apply, isotonic_fit
from nlrw.calibrations.quantile import fit_sim_tables, quantile_calibrate, random_offsets
from nlrw.calibrations.uncalibrated import E_MAX, uncalibrated
from nlrw.config.calibrate import METHODS, SPLITS, CalibrateConfig, Method
from nlrw.contexts import load_context_activations
from nlrw.lib.io import atomic_path, atomic_write_json, file_digest
from nlrw.lib.metrics import auroc, pearson
from nlrw.lib.progress import progress_bar
from nlrw.lib.provenance import config_hash, stage_record
from nlrw.lib.rundir import RunDir
from nlrw.model.quantiles import save_tables

__all__ = [
    "METHODS",
    "POSITIONS_SCHEMA",
    "CalibrateConfig",
    "LatentFit",
    "Method",
    "calibrate_positions",
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

_E_TOLERANCE = 1e-3  # a renormalized float32 expectation may exceed 9 by rounding


# --------------------------------------------------------------------------------------------
# Fitting one latent (the methods themselves: nlrw.calibrations)
# --------------------------------------------------------------------------------------------


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
    gate = gate_fit(e, t, spec)
    return LatentFit(xs, ys, gate.threshold, gate.fill, n, n_active, None, gate.fallback)


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


def _start_methods(
    methods: Sequence[str], rows_in: Rows
) -> tuple[dict[str, np.ndarray], dict[str, PerLatent]]:
    """Each method's output over ``rows_in``: computed here for the methods that map every row
    at once (uncalibrated, quantile), zeros for those applied latent by latent with the
    latent's fit (isotonic, gate), returned with their functions. Rows a per-latent method
    never fills (the calibration split's) stay 0 and are not used."""
    calibrated: dict[str, np.ndarray] = {}
    per_latent: dict[str, PerLatent] = {}
    for m in methods:
        every_row, apply = CALIBRATIONS[m]
        if every_row is not None:
            calibrated[m] = every_row(rows_in)
        elif apply is not None:
            calibrated[m] = np.zeros(rows_in.score.size, np.float32)
            per_latent[m] = apply
        else:
            raise TypeError(f"calibration {m!r} is registered without a function")
    return calibrated, per_latent


def _too_few_for_quantile(cfg: CalibrateConfig, fit: LatentFit) -> bool:
    """Quantile normalization falls back to 0 for a latent whose F_sim would come from a
    calibration split of fewer than ``min_calibration_contexts`` contexts."""
    return cfg.quantile_fit == "calibration" and fit.n_calibration < cfg.min_calibration_contexts


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
    # F_sim is always fitted: calibration.safetensors keeps it.
    fit_rows = data.is_eval if cfg.quantile_fit == "eval" else ~data.is_eval
    sim_table = fit_sim_tables(
        row_latent[fit_rows], data.score[fit_rows], n_latents, cfg.sim_quantiles
    )
    rows_in = Rows(
        latent=row_latent,
        score=data.score,
        max_activation=data.max_activation,
        sim_table=sim_table,
        active_table=data.active_table,
        frequency=data.frequency,
        offsets=random_offsets(cfg.seed, n_rows) if cfg.quantile_ranks == "random" else None,
    )
    calibrated, per_latent = _start_methods(cfg.methods, rows_in)
    fitted = bool(per_latent)

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
        if "quantile" in calibrated and _too_few_for_quantile(cfg, fit):
            calibrated["quantile"][rows] = 0.0
        if fitted:
            e_eval = e_all[ev]
            idx = np.arange(rows.start, rows.stop)[ev]
            for m, apply in per_latent.items():
                calibrated[m][idx] = apply(e_eval, fit)
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


POSITIONS_SCHEMA: dict[str, Any] = {
    "latent": pl.Int32,
    "context_id": pl.Int32,
    "position": pl.Int32,
    "calibration": pl.String,
    "activation": pl.Float32,
}


def _position_scores(path: Path, data: _Inputs) -> npt.NDArray[np.float32]:
    """``[pairs, ctx_len]`` the rating of every position of every simulated (latent, context)
    pair of ``data``, in its row order, from an all-at-once positions file; refuses a file
    that misses, repeats or adds a position, or holds a rating outside [0, 9]."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: only the all-at-once simulate layout rates every position "
            "(--simulate.layout all-at-once)"
        )
    try:
        columns = ["latent", "context_id", "position", "expected_value"]
        table = pl.read_parquet(path, columns=columns)
    except Exception as e:  # polars raises several error types for a damaged file
        raise ValueError(f"{path}: not a readable positions table: {e}") from e
    table = table.sort("latent", "context_id", "position")
    n = data.latent.size
    position = table["position"].to_numpy().astype(np.int64)
    ctx_len = int(position.max()) + 1 if position.size else 0
    if n == 0 or table.height != n * ctx_len:
        raise ValueError(
            f"{path} has {table.height} rows, not one per position ({ctx_len}) of each of the "
            f"{n} simulated pairs: re-run simulate"
        )
    latent = table["latent"].to_numpy().reshape(n, ctx_len)
    context = table["context_id"].to_numpy().reshape(n, ctx_len)
    position = position.reshape(n, ctx_len)
    bad = (
        (latent != data.latent[:, None])
        | (context != data.context[:, None])
        | (position != np.arange(ctx_len))
    ).any(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"{path}: the pair (latent {data.latent[i]}, context {data.context[i]}) does not have "
            f"exactly the positions 0..{ctx_len - 1}: re-run simulate"
        )
    score = table["expected_value"].cast(pl.Float32).fill_null(np.nan).to_numpy()
    bad = ~np.isfinite(score) | (score < 0) | (score > E_MAX + _E_TOLERANCE)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"{path}: expected_value {score[i]} of latent {latent.ravel()[i]}, context "
            f"{context.ravel()[i]}, position {position.ravel()[i]} is not in [0, 9]"
        )
    return score.reshape(n, ctx_len).astype(np.float32)


def calibrate_positions(
    cfg: CalibrateConfig, run_dir: str | Path, *, k: int, shuffled: bool = False
) -> pl.DataFrame:
    """Every method of ``cfg`` applied to the all-at-once layout's rating of **every
    position** of every eval window (``simulations_positions.parquet``, or the shuffled
    control's with ``shuffled``), for ``evaluate.positions = "all"``; columns
    :data:`POSITIONS_SCHEMA`, eval contexts only.

    The maps are the stage's, fitted where the truth is known:

    * ``isotonic`` and ``gate``: :func:`fit_latent` on the calibration split's **last**
      positions (the only ones whose true activation the contexts stage keeps), with the raw
      last-slot rating of the positions file as ``E`` (the same reading every other position
      gets; ``simulations.parquet`` may hold a context-centered one), gate specificity as the
      stage sets it for top-k ``k``;
    * ``quantile``: ``F_sim`` from the ratings of **every position** of the split
      ``quantile_fit`` names: ``F_real`` is the cache's distribution over all positions, so the
      simulated scores it is matched to are those of all positions too;
    * ``uncalibrated``: ``E / 9 · max`` as everywhere.

    A latent whose calibration split is too small falls back as in the stage (isotonic and
    gate 0; quantile 0 too with ``quantile_fit = "calibration"``).
    """
    run_dir = Path(run_dir)
    data = _load_inputs(run_dir, SHUFFLED_SIMULATIONS_FILE if shuffled else SIMULATIONS_FILE)
    paths = RunDir(run_dir)
    score = _position_scores(
        paths.simulations_shuffled_positions if shuffled else paths.simulations_positions, data
    )
    n_latents, ctx_len = int(data.latents.size), score.shape[1]
    pair_latent = np.repeat(np.arange(n_latents), np.diff(data.bounds))
    fit_pairs = data.is_eval if cfg.quantile_fit == "eval" else ~data.is_eval
    sim_table = fit_sim_tables(
        np.repeat(pair_latent[fit_pairs], ctx_len),
        score[fit_pairs].ravel(),
        n_latents,
        cfg.sim_quantiles,
    )
    ev = np.flatnonzero(data.is_eval)
    row_latent = np.repeat(pair_latent[ev], ctx_len)  # eval rows: pair-major, then position
    row_score = score[ev].ravel()
    rows_in = Rows(
        latent=row_latent,
        score=row_score,
        max_activation=data.max_activation,
        sim_table=sim_table,
        active_table=data.active_table,
        frequency=data.frequency,
        offsets=(
            random_offsets(cfg.seed, row_score.size) if cfg.quantile_ranks == "random" else None
        ),
    )
    specificity = (
        cfg.gate_specificity
        if cfg.gate_specificity is not None
        else gate_specificity(cfg.gate_budget, k, n_latents, cfg.gate_min_specificity)
    )
    calibrated, per_latent = _start_methods(cfg.methods, rows_in)
    row_bounds = np.searchsorted(row_latent, np.arange(n_latents + 1))
    for i in range(n_latents):
        pairs = slice(int(data.bounds[i]), int(data.bounds[i + 1]))
        cal = ~data.is_eval[pairs]
        fit = fit_latent(score[pairs, -1][cal], data.true[pairs][cal], cfg, specificity)
        rows = slice(int(row_bounds[i]), int(row_bounds[i + 1]))
        if "quantile" in calibrated and _too_few_for_quantile(cfg, fit):
            calibrated["quantile"][rows] = 0.0
        for m, apply in per_latent.items():
            calibrated[m][rows] = apply(row_score[rows], fit)
    latent = data.latents[row_latent]
    context = np.repeat(data.context[ev], ctx_len)
    position = np.tile(np.arange(ctx_len), ev.size)
    return pl.concat(
        [
            pl.DataFrame(
                {
                    "latent": latent,
                    "context_id": context,
                    "position": position,
                    "calibration": pl.repeat(m, latent.size, dtype=pl.String, eager=True),
                    "activation": np.maximum(calibrated[m], 0.0),
                },
                schema=POSITIONS_SCHEMA,
            )
            for m in cfg.methods
        ]
    )


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
