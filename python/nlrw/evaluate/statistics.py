"""The tables of the evaluate stage: ``eval/results.parquet`` (one CE per grid row and
context) and its summary ``eval/summary.parquet`` (:func:`summarize`).

The summary has one row per condition x calibration x quality x fraction x choice. With
``CE_c`` a condition's cross-entropy on context c (random choices: the T trials averaged per
context first) and ``d_c = CE_c − CE_zero,c`` the paired difference to zero ablation on the
same context, over n contexts:

* ``mean_ce = mean_c CE_c`` and ``diff_vs_zero = mean_c d_c``, each with a percentile
  bootstrap 95 % CI: ``n_bootstrap`` resamples of the contexts (seeded, the same for every
  condition) and, where T > 1, of the trials too (hierarchical; the same for every condition
  with T trials);
* ``p_value``: two-sided sign-flip permutation test of d (``n_permutations`` random sign
  vectors σ, seeded): ``p = (1 + #{|mean(σ·d)| ≥ |d̄|}) / (1 + B)``; ``p_better``: the
  one-sided test of "lower CE than zero ablation", ``p = (1 + #{mean(σ·d) ≤ d̄}) / (1 + B)``;
* ``p_equivalent``: paired TOST of ``|μ_d| < m`` with the margin m (:func:`equivalence_margin_of`:
  ``equivalence_margin · (mean CE_zero − mean CE_transcoder)`` by default, or
  ``equivalence_margin_nats``);
* ``*_holm``: Holm's step-down adjustment of each p-value column over the rows other than zero
  ablation, ``p̃_(i) = max_{j ≤ i} min(1, (m − j + 1) p_(j))``; ``equivalent_to_zero`` is
  ``p_equivalent_holm < alpha``.

The generic tests and the bootstrap are :mod:`nlrw.lib.statistics`; this module wires them to
the evaluate stage's tables and seeds.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import polars as pl

from nlrw.config.evaluate import SUMMARY_COLUMNS_SINCE_CONTROLS, check_margin
from nlrw.evaluate.grid import (
    CONDITIONS,
    TAG_BOOTSTRAP,
    TAG_BOOTSTRAP_TRIALS,
    TAG_PERMUTATION,
    Grid,
    GridRow,
)
from nlrw.lib import statistics as _stats
from nlrw.lib.statistics import paired_sign_flip_p

__all__ = [
    "RESULTS_SCHEMA",
    "SUMMARY_COLUMNS_SINCE_CONTROLS",
    "SUMMARY_SCHEMA",
    "equivalence_margin_of",
    "results_frame",
    "summarize",
]

log = logging.getLogger(__name__)

_SUMMARY_KEYS = ("condition", "calibration", "quality", "fraction", "choice")
_HOLM_COLUMNS = (("p_value", "p_value_holm"), ("p_better", "p_better_holm"))


def equivalence_margin_of(
    ce_zero: float,
    ce_transcoder: float | None,
    *,
    fraction: float = 0.25,
    nats: float | None = None,
) -> float:
    """The TOST margin in nats: ``nats`` when given, else ``fraction · (CE_zero −
    CE_transcoder)`` (NaN without a transcoder row or when that gap is not positive: the
    equivalence test is then not made)."""
    check_margin("equivalence_margin", fraction)
    if nats is not None:
        check_margin("equivalence_margin_nats", nats)
        return float(nats)
    if ce_transcoder is None:
        return math.nan
    gap = ce_zero - ce_transcoder
    return fraction * gap if gap > 0 else math.nan


def summarize(
    results: pl.DataFrame,
    *,
    n_bootstrap: int = 1000,
    n_permutations: int = 10000,
    seed: int = 0,
    n_selected_of: dict[tuple[Any, ...], int] | None = None,
    equivalence_margin: float = 0.25,
    equivalence_margin_nats: float | None = None,
    alpha: float = 0.05,
) -> pl.DataFrame:
    """``eval/summary.parquet`` from ``eval/results.parquet``.

    Per condition key (condition, calibration, quality, fraction, choice), with ``d_c`` the
    per-context difference to zero ablation (trials averaged per context first):

    * ``mean_ce``, ``diff_vs_zero``: means over contexts (and trials);
    * ``ci_low``/``ci_high``, ``diff_ci_low``/``diff_ci_high``: percentile 95 % intervals of a
      hierarchical bootstrap (:func:`nlrw.lib.statistics.hierarchical_bootstrap_means`): the
      same ``n_bootstrap`` resamples of the contexts for every condition, and for a condition
      with T > 1 trials (random choices) a resample of its trials too, the same for every
      condition with T trials;
    * ``p_value``: two-sided sign-flip test of ``d``; ``p_better``: one-sided sign-flip test
      of "lower CE than zero ablation"; ``p_equivalent``: paired TOST within
      ``±equivalence_margin`` nats (the margin used is in the column of that name, see
      :func:`equivalence_margin_of`), NaN when the margin is undefined;
    * ``*_holm``: Holm's adjustment of each p-value column over the rows of this summary
      other than zero ablation (one family per column); ``equivalent_to_zero`` is
      ``p_equivalent_holm < alpha`` (null when not tested).

    Zero ablation's own row has ``p_value = 1`` and no other test. Contexts missing from a
    condition, or a trial missing on some context, are an error (the tests are paired).
    See :mod:`nlrw.lib.statistics` for the formulas.
    """
    if not (0.0 < alpha < 1.0):
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    results = results.sort("context_id", "trial")
    contexts = np.sort(results["context_id"].unique().to_numpy())
    n = len(contexts)
    zero = (
        results.filter(pl.col("condition") == "zero_ablation")
        .group_by("context_id")
        .agg(pl.col("ce").mean())
        .sort("context_id")
    )
    if zero.height != n:
        raise ValueError("results lack the zero_ablation condition on some contexts")
    ce_zero = zero["ce"].to_numpy()
    transcoder = results.filter(pl.col("condition") == "transcoder")["ce"]
    margin = equivalence_margin_of(
        float(ce_zero.mean()),
        float(transcoder.to_numpy().mean()) if transcoder.len() else None,
        fraction=equivalence_margin,
        nats=equivalence_margin_nats,
    )
    if not math.isfinite(margin):
        log.warning(
            "evaluate: no equivalence test (the zero-ablation - transcoder gap is not positive "
            "or there is no transcoder row); pass equivalence_margin_nats to set a margin"
        )
    boot = np.random.default_rng([seed, TAG_BOOTSTRAP]).integers(0, n, size=(n_bootstrap, n))
    signs = np.random.default_rng([seed, TAG_PERMUTATION]).choice(
        np.array([-1.0, 1.0]), size=(n_permutations, n)
    )
    trial_draws: dict[int, np.ndarray] = {}
    rows: list[dict[str, Any]] = []
    for key, group in results.group_by(list(_SUMMARY_KEYS), maintain_order=True):
        trials = np.sort(group["trial"].unique().to_numpy())
        t = len(trials)
        group = group.sort("context_id", "trial")
        ctx = group["context_id"].to_numpy()
        if group.height != n * t or not np.array_equal(ctx[::t], contexts):
            raise ValueError(f"condition {key} was not evaluated on every context and trial")
        if not (group["trial"].to_numpy().reshape(n, t) == trials[None, :]).all():
            raise ValueError(f"condition {key} was not evaluated on every context and trial")
        ce_m = group["ce"].to_numpy().reshape(n, t)
        diff_m = ce_m - ce_zero[:, None]
        if t not in trial_draws:
            trial_draws[t] = np.random.default_rng([seed, TAG_BOOTSTRAP_TRIALS, t]).integers(
                0, t, size=(n_bootstrap, t)
            )
        means = _stats.hierarchical_bootstrap_means(ce_m, boot, trial_draws[t])
        diff_means = _stats.hierarchical_bootstrap_means(diff_m, boot, trial_draws[t])
        ce, diff = ce_m.mean(axis=1), diff_m.mean(axis=1)
        condition, calibration, quality, fraction, choice = key
        reference = condition == "zero_ablation"
        tested = not reference and math.isfinite(margin) and n >= 2
        rows.append(
            {
                "condition": condition,
                "calibration": calibration,
                "quality": quality,
                "fraction": fraction,
                "choice": choice,
                "n_trials": t,
                "n_contexts": n,
                "n_simulated_latents": (n_selected_of or {}).get(tuple(key), 0),
                "mean_ce": float(ce.mean()),
                "ci_low": float(np.percentile(means, 2.5)),
                "ci_high": float(np.percentile(means, 97.5)),
                "diff_vs_zero": float(diff.mean()),
                "diff_ci_low": float(np.percentile(diff_means, 2.5)),
                "diff_ci_high": float(np.percentile(diff_means, 97.5)),
                "p_value": 1.0 if reference else paired_sign_flip_p(diff, signs),
                "p_better": math.nan if reference else _stats.sign_flip_p_less(diff, signs),
                "equivalence_margin": margin,
                "p_equivalent": (
                    _stats.tost_paired(diff, margin, alpha).p_value if tested else math.nan
                ),
            }
        )
    table = pl.DataFrame(
        rows,
        schema={
            k: v for k, v in SUMMARY_SCHEMA.items() if "holm" not in k and k != "equivalent_to_zero"
        },
    )
    family = (table["condition"] != "zero_ablation").to_numpy()
    adjusted: dict[str, np.ndarray] = {}
    for raw, name in (*_HOLM_COLUMNS, ("p_equivalent", "p_equivalent_holm")):
        p = table[raw].to_numpy().astype(np.float64)
        adj = np.full(len(p), np.nan)
        adj[family] = _stats.holm(p[family])
        adjusted[name] = adj
    equivalent = [None if math.isnan(p) else bool(p < alpha) for p in adjusted["p_equivalent_holm"]]
    table = table.with_columns(
        *(pl.Series(name, values, dtype=pl.Float64) for name, values in adjusted.items()),
        pl.Series("equivalent_to_zero", equivalent, dtype=pl.Boolean),
    ).select(list(SUMMARY_SCHEMA))
    order = {c: i for i, c in enumerate(CONDITIONS)}
    return (
        table.with_columns(
            pl.col("condition").replace_strict(order, return_dtype=pl.Int32).alias("_order")
        )
        .sort("_order", "calibration", "quality", "choice", "fraction", nulls_last=False)
        .drop("_order")
    )


RESULTS_SCHEMA: dict[str, Any] = {
    "condition": pl.String,
    "calibration": pl.String,
    "quality": pl.Float64,
    "fraction": pl.Float64,
    "choice": pl.String,
    "trial": pl.Int32,
    "context_id": pl.Int32,
    "ce": pl.Float64,
}

SUMMARY_SCHEMA: dict[str, Any] = {
    "condition": pl.String,
    "calibration": pl.String,
    "quality": pl.Float64,
    "fraction": pl.Float64,
    "choice": pl.String,
    "n_trials": pl.Int32,
    "n_contexts": pl.Int32,
    "n_simulated_latents": pl.Int32,
    "mean_ce": pl.Float64,
    "ci_low": pl.Float64,
    "ci_high": pl.Float64,
    "diff_vs_zero": pl.Float64,
    "diff_ci_low": pl.Float64,
    "diff_ci_high": pl.Float64,
    "p_value": pl.Float64,
    "p_value_holm": pl.Float64,
    "p_better": pl.Float64,
    "p_better_holm": pl.Float64,
    "equivalence_margin": pl.Float64,
    "p_equivalent": pl.Float64,
    "p_equivalent_holm": pl.Float64,
    "equivalent_to_zero": pl.Boolean,
}
"""Columns of ``eval/summary.parquet`` (see :func:`summarize`)."""


def results_frame(grid: Grid, ce: np.ndarray, context_ids: np.ndarray) -> pl.DataFrame:
    """Long table of a ``[n_contexts, n_rows]`` CE matrix (context-major)."""
    n_ctx, n_rows = ce.shape
    col = {name: [getattr(r, name) for r in grid.rows] for name in GridRow.__dataclass_fields__}
    return pl.DataFrame(
        {
            "condition": col["condition"] * n_ctx,
            "calibration": col["calibration"] * n_ctx,
            "quality": col["quality"] * n_ctx,
            "fraction": col["fraction"] * n_ctx,
            "choice": col["choice"] * n_ctx,
            "trial": col["trial"] * n_ctx,
            "context_id": np.repeat(context_ids, n_rows).tolist(),
            "ce": ce.reshape(-1),
        },
        schema=RESULTS_SCHEMA,
    )
