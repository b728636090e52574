"""Reading the run directory: the inputs the report needs, and notes about those it lacks.

:data:`INPUTS` names every file the report reads with the stage that writes it. Only
``eval/summary.parquet`` is required (:func:`read_summary` raises with the command to run);
:class:`Run` reads the others on demand and records a note for each one missing or
unreadable, so that its section is left out rather than the report failing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import polars as pl

from nlrw.config.evaluate import SUMMARY_COLUMNS_SINCE_CONTROLS
from nlrw.report.format import BASELINES, CONTROL_LABELS, calibration_order

INPUTS: dict[str, str] = {
    "config.json": "any stage (nlrw run)",
    "stages": "any stage (nlrw run)",
    "transcoder/recovery.json": "recovery",
    "latents/stats.parquet": "cache",
    "latents/top_windows.parquet": "cache",
    "explanations.parquet": "explain",
    "scores.parquet": "score",
    "contexts.parquet": "contexts",
    "simulations.parquet": "simulate",
    "calibration.parquet": "calibrate",
    "calibration_metrics.parquet": "calibrate",
    "calibration_support.parquet": "calibrate",
    "eval/summary.parquet": "evaluate",
}
"""The files the report reads (relative to the run directory), with the stage writing each."""


REQUIRED = "eval/summary.parquet"
_SUMMARY_COLUMNS = ("condition", "mean_ce", "ci_low", "ci_high")


def lookup(d: Any, *keys: str) -> Any:
    """``d[keys[0]][keys[1]]...`` of a JSON record; None where a key or a level is missing."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


class Run:
    """The run directory's inputs, read on demand, with notes about what is missing."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir
        self.notes: list[str] = []

    def path(self, rel: str) -> Path:
        return self.dir / rel

    def missing(self, rel: str, section: str) -> None:
        self.notes.append(
            f"{section} left out: {rel} not found (written by the {INPUTS.get(rel, '?')} stage)."
        )

    def parquet(self, rel: str, section: str, columns: Sequence[str] = ()) -> pl.DataFrame | None:
        path = self.path(rel)
        if not path.is_file():
            self.missing(rel, section)
            return None
        try:
            table = pl.read_parquet(path)
        except Exception as e:  # polars raises several types for a damaged file
            self.notes.append(f"{section} left out: {rel} is not readable ({e}).")
            return None
        lacking = [c for c in columns if c not in table.columns]
        if lacking:
            self.notes.append(f"{section} left out: {rel} lacks the columns {lacking}.")
            return None
        return table

    def json(self, rel: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path(rel).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return data if isinstance(data, dict) else None


def read_summary(run_dir: Path) -> pl.DataFrame:
    """``eval/summary.parquet`` with the calibration of baselines normalized to null and rows
    in display order (baselines, then simulated by calibration, choice, fraction)."""
    path = run_dir / REQUIRED
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the report needs the evaluate stage's summary; run "
            f"`nlrw evaluate {run_dir}` (or `nlrw run`) first"
        )
    try:
        table = pl.read_parquet(path)
    except Exception as e:  # polars raises several types for a damaged file
        raise ValueError(f"{path} is not a readable parquet file: {e}") from e
    lacking = [c for c in _SUMMARY_COLUMNS if c not in table.columns]
    if lacking:
        raise ValueError(f"{path} lacks the columns {lacking}: re-run the evaluate stage")
    lacking = [c for c in SUMMARY_COLUMNS_SINCE_CONTROLS if c not in table.columns]
    if lacking:
        raise ValueError(
            f"{path} predates the controls and equivalence tests (it lacks the columns "
            f"{lacking}): re-run the evaluate stage, `nlrw evaluate {run_dir} --overwrite` "
            f"(or `nlrw run --run-dir {run_dir} --rerun`)"
        )
    for name, dtype in (
        ("calibration", pl.Utf8),
        ("choice", pl.Utf8),
        ("fraction", pl.Float64),
        ("n_contexts", pl.Int64),
        ("diff_vs_zero", pl.Float64),
        ("diff_ci_low", pl.Float64),
        ("diff_ci_high", pl.Float64),
        ("p_value", pl.Float64),
        ("n_simulated_latents", pl.Int64),
    ):
        if name not in table.columns:
            table = table.with_columns(pl.lit(None, dtype=dtype).alias(name))
    table = table.with_columns(
        pl.when(pl.col("calibration") == "")
        .then(None)
        .otherwise(pl.col("calibration"))
        .alias("calibration"),
        pl.col("fraction").cast(pl.Float64),
    )
    order = {c: i for i, c in enumerate((*BASELINES, *CONTROL_LABELS))}
    return (
        table.with_columns(
            pl.col("condition")
            .map_elements(lambda c: order.get(c, len(order)), return_dtype=pl.Int64)
            .alias("_c"),
            pl.col("calibration")
            .fill_null("")
            .map_elements(lambda c: calibration_order(c)[0], return_dtype=pl.Int64)
            .alias("_k"),
        )
        .with_columns(
            pl.col("choice")
            .map_elements(lambda c: {"top": 0, "random": 1}.get(c, 2), return_dtype=pl.Int64)
            .alias("_h")
        )
        .sort(
            "_c",
            "condition",
            "_k",
            "calibration",
            "quality",
            "_h",
            "choice",
            "fraction",
            nulls_last=False,
        )
        .drop("_c", "_k", "_h")
    )


def fingerprint(run_dir: Path) -> dict[str, Any]:
    """Size and mtime of every input (the stage records' too): a changed input re-renders."""
    out: dict[str, Any] = {}
    for rel in INPUTS:
        path = run_dir / rel
        files = sorted(path.glob("*.json")) if path.is_dir() else [path]
        for f in files:
            # The pipeline's own record of this stage changes around every render.
            if f.is_file() and f != run_dir / "stages" / "report.json":
                st = f.stat()
                out[str(f.relative_to(run_dir))] = [st.st_size, st.st_mtime_ns]
    return out


def stage_times(run: Run) -> list[tuple[str, str, Any]]:
    """(stage, state, seconds) of every record under ``stages/``, in the order they ran."""
    folder = run.path("stages")
    rows = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        record = run.json(str(path.relative_to(run.dir)))
        if record is None:
            continue
        when = record.get("finished_at") or record.get("started_at") or ""
        state, seconds = record.get("status", "?"), record.get("seconds")
        if path.stem == "report" and state == "running":
            state = "done"  # this page is its last step: the record says so once it is written
        rows.append((when, path.stem, state, seconds))
    rows.sort()
    return [(name, state, seconds) for _, name, state, seconds in rows]


def eval_context_ids(contexts: pl.DataFrame | None) -> list[int] | None:
    """The eval split's context ids; None without ``contexts.parquet`` or its split."""
    if contexts is None or "split" not in contexts.columns:
        return None
    return contexts.filter(pl.col("split") == "eval")["context_id"].cast(pl.Int64).to_list()


class ScoreHistogram(NamedTuple):
    edges: np.ndarray
    active: np.ndarray
    inactive: np.ndarray
    n_active: int
    n_inactive: int
    mean_active: float
    mean_inactive: float
    high_inactive: int
    """Inactive contexts rated >= 4.5 (false positives at the scale's midpoint)."""
    low_active: int


def simulated_score_histogram(
    simulations: Path, eval_ids: Sequence[int] | None, bins_per_unit: int = 4
) -> ScoreHistogram:
    """Histogram of ``expected_value`` on eval contexts, split by ``true_activation > 0``;
    aggregated in polars without loading the file (it holds latents × contexts rows)."""
    scan = pl.scan_parquet(simulations).select("context_id", "expected_value", "true_activation")
    if eval_ids is not None:
        scan = scan.filter(pl.col("context_id").is_in(list(eval_ids)))
    n_bins = 9 * bins_per_unit
    scan = scan.filter(pl.col("expected_value").is_not_nan()).with_columns(
        (pl.col("true_activation") > 0).alias("active"),
        (pl.col("expected_value") * bins_per_unit)
        .floor()
        .clip(0, n_bins - 1)
        .cast(pl.Int32)
        .alias("bin"),
    )
    counts = scan.group_by("active", "bin").agg(pl.len().alias("n")).collect()
    stats = (
        scan.group_by("active")
        .agg(
            pl.len().alias("n"),
            pl.col("expected_value").mean().alias("mean"),
            (pl.col("expected_value") >= 4.5).sum().alias("high"),
        )
        .collect()
    )
    hist = {True: np.zeros(n_bins), False: np.zeros(n_bins)}
    for active, b, n in counts.iter_rows():
        hist[bool(active)][int(b)] = n
    by = {bool(r["active"]): r for r in stats.iter_rows(named=True)}
    empty = {"n": 0, "mean": float("nan"), "high": 0}
    a, i = by.get(True, empty), by.get(False, empty)
    return ScoreHistogram(
        edges=np.linspace(0, 9, n_bins + 1),
        active=hist[True],
        inactive=hist[False],
        n_active=int(a["n"]),
        n_inactive=int(i["n"]),
        mean_active=float(a["mean"]) if a["mean"] is not None else float("nan"),
        mean_inactive=float(i["mean"]) if i["mean"] is not None else float("nan"),
        high_inactive=int(i["high"]),
        low_active=int(a["n"]) - int(a["high"]),
    )
