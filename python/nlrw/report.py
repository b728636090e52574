"""The ``report`` stage: one self-contained page that shows a run's result at a glance.

Reads the run directory the other stages wrote and renders ``report/index.html`` (inline CSS,
every figure embedded as a base64 PNG data URI: no network, no JavaScript; it opens from a
file or an e-mail attachment), ``report/report.md`` (the same content as Markdown, linking the
PNGs beside it) and the PNGs themselves (matplotlib's Agg renderer, no pyplot state).

**Contents.**

* *Header*: models, hookpoint, coder sizes, versions, git revision (``config.json``), the
  transcoder's loss recovered on held-out text (``transcoder/recovery.json``:
  ``1 - (CE_transcoder - CE_clean) / (CE_zero - CE_clean)``) and each stage's time
  (``stages/*.json``).
* *Headline figure* (``eval/summary.parquet``): mean CE against the fraction of latents
  simulated (log x), one line per (calibration, choice of latents), bands from the bootstrap
  95% CIs, horizontal lines with CI bands for the clean model, the transcoder, zero ablation and
  random active latents.
* *Conditions table*: every row of the summary but the synthetic ones (the controls
  ``matched_zero``, ``oracle_support``, ``oracle_magnitude`` beside the simulated rows) with its
  mean CE, CI, paired difference to zero ablation (CI), raw and Holm-adjusted p-values, and a
  claim in words (:func:`claim`): "similar to zero ablation" only where the paired TOST passes
  (``equivalent_to_zero``), "better" / "worse" from the Holm-adjusted one- and two-sided
  tests, "inconclusive" otherwise. A summary from before these columns is refused with the
  command that re-runs ``evaluate``.
* *Synthetic simulators*: their rows at the largest fraction per calibration and quality, the
  lowest quality at which the rewrite's mean CE reaches zero ablation's and the transcoder's,
  and a figure of mean CE against quality with this run's simulator at its measured mean AUROC
  (``calibration_metrics.parquet``).
* *Diagnosis figures*: the simulator's expected digit on eval contexts where the latent truly
  fires vs where it does not (``simulations.parquet``; the false-positive story); per-latent
  Pearson correlation, specificity and sensitivity per calibration
  (``calibration_metrics.parquet``); detection balanced accuracy next to the
  shuffled-explanation baseline (``scores.parquet``).
* *Latent browser*: for the best, median and worst latents by balanced accuracy, the
  explanation, the top activating windows of the cache with every active token highlighted
  (opacity proportional to its activation over the largest one shown), a scatter of simulated
  against true activation on the eval contexts, and the eval contexts the simulator rated
  highest and those where the latent truly fires most.

Only ``eval/summary.parquet`` is required (a clear error names it and the stage to run); any
other missing input leaves its section out with a note saying which file and stage it needs.
Every file is written atomically; ``report.json`` (provenance plus a fingerprint of the inputs)
is written last. An up-to-date report (same config, same input files by size and mtime) is
kept unless ``overwrite``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import polars as pl

from nlrw.lib.io import atomic_write, atomic_write_json, atomic_write_text
from nlrw.lib.provenance import config_hash, stage_record

__all__ = [
    "INPUTS",
    "ReportConfig",
    "png_data_uri",
    "run",
    "select_browser_latents",
    "token_spans_html",
]


@dataclass(frozen=True)
class ReportConfig:
    """Options of the ``report`` stage (what the latent browser shows, figure resolution)."""

    n_browser_latents: int = 6
    """Latents in the browser: a third each from the best, the median and the worst by
    detection balanced accuracy (all of them when fewer are scored)."""

    n_top_windows: int = 5
    """Top activating windows of the cache shown per browsed latent."""

    n_rated_contexts: int = 3
    """Eval contexts shown per browsed latent from each end: the simulator's highest-rated
    ones and the truly most active ones (0: none)."""

    context_tail: int = 16
    """Tokens shown before the marked (last) token of an eval context in the browser."""

    max_scatter_points: int = 2000
    """Points per calibration in a browsed latent's simulated-vs-true scatter (a seeded
    sample when there are more eval contexts)."""

    dpi: int = 110
    """Resolution of the PNG figures."""

    decode_tokens: bool = True
    """Decode token ids with the subject model's tokenizer (False: show the ids)."""

    seed: int = 0
    """Seed of the scatter subsampling and of the jitter in the per-latent metric plots."""

    def __post_init__(self) -> None:
        for name in ("n_browser_latents", "n_top_windows", "n_rated_contexts", "context_tail"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")
        if self.max_scatter_points < 1:
            raise ValueError(
                f"max_scatter_points must be at least 1, got {self.max_scatter_points}"
            )
        if not 20 <= self.dpi <= 600:
            raise ValueError(f"dpi must be in [20, 600], got {self.dpi}")


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

_BASELINES = ("clean", "transcoder", "zero_ablation", "random_k")
_BASELINE_LABELS = {
    "clean": "clean model",
    "transcoder": "transcoder",
    "zero_ablation": "zero ablation",
    "random_k": "random active latents",
}
_BASELINE_COLORS = {
    "clean": "#222222",
    "transcoder": "#7f7f7f",
    "zero_ablation": "#d62728",
    "random_k": "#8c564b",
}
_CALIBRATIONS = ("uncalibrated", "quantile", "isotonic", "gate")
_CALIBRATION_COLORS = {
    "uncalibrated": "#ff7f0e",
    "quantile": "#1f77b4",
    "isotonic": "#2ca02c",
    "gate": "#9467bd",
}
_EXTRA_COLORS = ("#17becf", "#bcbd22", "#e377c2", "#8c564b")
_ACTIVE_COLOR = "#e6550d"
_INACTIVE_COLOR = "#3182bd"
_SUMMARY_COLUMNS = ("condition", "mean_ce", "ci_low", "ci_high")

SUMMARY_COLUMNS_SINCE_CONTROLS = (
    "quality",
    "p_value_holm",
    "p_better",
    "p_better_holm",
    "equivalence_margin",
    "p_equivalent",
    "p_equivalent_holm",
    "equivalent_to_zero",
)
"""The evaluate stage's summary columns of the controls and equivalence tests (the same as
:data:`nlrw.evaluate.SUMMARY_COLUMNS_SINCE_CONTROLS`, kept here so that the report does not
import torch): a summary without them was written before, and is refused."""

CLAIM_ALPHA = 0.05
"""Level at which the report words a claim from a Holm-adjusted p-value."""

_CONTROL_LABELS = {
    "simulated": "simulated",
    "matched_zero": "matched zero (chosen latents = 0)",
    "oracle_support": "oracle support (true support, simulated values)",
    "oracle_magnitude": "oracle magnitude (simulated support, true values)",
    "synthetic": "synthetic simulator",
}


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def png_data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for embedding a PNG in HTML."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _calibration_order(name: str) -> tuple[int, str]:
    return (_CALIBRATIONS.index(name) if name in _CALIBRATIONS else len(_CALIBRATIONS), name)


def _calibration_color(name: str, others: Sequence[str]) -> str:
    if name in _CALIBRATION_COLORS:
        return _CALIBRATION_COLORS[name]
    extra = sorted(o for o in others if o not in _CALIBRATION_COLORS)
    return _EXTRA_COLORS[extra.index(name) % len(_EXTRA_COLORS)] if name in extra else "#333333"


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def _fmt(x: Any, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if _finite(x) else "—"


MIN_RECOVERY_GAP = 0.01
"""Nats per token zero ablation must lie above clean for loss recovered to be shown: below it
the ratio's denominator is noise (a random model's −2724%)."""


def _loss_recovered(result: dict[str, Any]) -> float | None:
    """``loss_recovered`` of a recovery record, None where its denominator vanishes."""
    clean, zero, lr = result.get("ce_clean"), result.get("ce_zero"), result.get("loss_recovered")
    if not (isinstance(clean, int | float) and isinstance(zero, int | float) and _finite(lr)):
        return None
    return lr if abs(zero - clean) >= MIN_RECOVERY_GAP else None  # NaN gaps fail this too


def _fmt_recovered(result: dict[str, Any]) -> str:
    lr = _loss_recovered(result)
    if lr is not None:
        return _fmt(lr, 4)
    return f"— (zero ablation within {MIN_RECOVERY_GAP} nats of clean: the ratio is undefined)"


def _fmt_p(p: Any) -> str:
    if not _finite(p):
        return "—"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _fmt_fraction(f: Any) -> str:
    if not _finite(f):
        return ""
    pct = 100 * f
    return f"{pct:.3g}%"


def _fmt_ci(low: Any, high: Any, digits: int = 3) -> str:
    if not (_finite(low) and _finite(high)):
        return "—"
    return f"[{low:.{digits}f}, {high:.{digits}f}]"


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _printable(text: str) -> str:
    """Control characters other than newline and tab as ``\\xNN`` escapes."""
    return _CONTROL.sub(lambda m: m.group(0).encode("unicode_escape").decode("ascii"), text)


def _md_cell(text: str) -> str:
    return _printable(text).replace("|", "\\|").replace("\n", " ")


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _png(fig: Any, dpi: int) -> bytes:
    buffer = io.BytesIO()
    # No Software/date metadata: the same inputs give the same bytes.
    fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return buffer.getvalue()


class _Figure(NamedTuple):
    name: str
    """File name under report/."""
    png: bytes
    alt: str
    caption: str


# --------------------------------------------------------------------------------------------
# Reading the run directory
# --------------------------------------------------------------------------------------------


class _Run:
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
    order = {c: i for i, c in enumerate((*_BASELINES, *_CONTROL_LABELS))}
    return (
        table.with_columns(
            pl.col("condition")
            .map_elements(lambda c: order.get(c, len(order)), return_dtype=pl.Int64)
            .alias("_c"),
            pl.col("calibration")
            .fill_null("")
            .map_elements(lambda c: _calibration_order(c)[0], return_dtype=pl.Int64)
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


def _fingerprint(run_dir: Path) -> dict[str, Any]:
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


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _choice_label(choice: str | None) -> str:
    return {"top": "top-by-score", "random": "random"}.get(choice or "", choice or "")


def _thinned_labels(fractions: Sequence[float], min_gap: float = 0.15) -> set[float]:
    """Fractions whose tick gets a label: at least ``min_gap`` decades from the previous
    labelled one (0.6 / 0.8 / 1.0 would overlap), the largest always."""
    labelled: list[float] = []
    for f in sorted(fractions, reverse=True):
        if not labelled or math.log10(labelled[-1]) - math.log10(f) >= min_gap:
            labelled.append(f)
    return set(labelled)


def headline_figure(summary: pl.DataFrame, dpi: int, *, paired: bool = False) -> bytes:
    """Mean CE vs fraction simulated: one panel per choice of latents (top-by-score, random),
    one line per calibration with its CI band, baselines as horizontal lines with CI bands.

    ``paired``: the same plot of the paired difference to zero ablation
    (``mean(CE_condition − CE_zero)`` per context, with its bootstrap CI): the spread of CE
    across contexts cancels, so differences far smaller than the CIs of the means show.
    """
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    value, low, high = (
        ("diff_vs_zero", "diff_ci_low", "diff_ci_high")
        if paired
        else ("mean_ce", "ci_low", "ci_high")
    )

    sim = (
        summary.filter((pl.col("condition") == "simulated") & pl.col("fraction").is_not_null())
        .with_columns(
            pl.col("calibration").fill_null("uncalibrated"), pl.col("choice").fill_null("")
        )
        # One point per (calibration, choice, fraction) even if a summary repeats a key.
        .group_by("calibration", "choice", "fraction")
        .agg(pl.col(value, low, high).mean())
    )
    calibrations = sorted(set(sim["calibration"].to_list()), key=_calibration_order)
    choices = sorted(
        set(sim["choice"].to_list()), key=lambda c: ({"top": 0, "random": 1}.get(c, 2), c)
    ) or [""]
    fractions = sorted({float(f) for f in sim["fraction"].to_list() if _finite(f) and f > 0})
    labelled = _thinned_labels(fractions)
    fig = _figure(5.4 * len(choices) + 0.6, 5.0)
    axes = fig.subplots(1, len(choices), sharey=True, squeeze=False)[0]
    handles: dict[str, Any] = {}
    for ax, choice in zip(axes, choices, strict=True):
        for cal in calibrations:
            rows = sim.filter((pl.col("calibration") == cal) & (pl.col("choice") == choice))
            if rows.height == 0:
                continue
            rows = rows.sort("fraction")
            x = rows["fraction"].to_numpy()
            color = _calibration_color(cal, calibrations)
            (line,) = ax.plot(
                x,
                rows[value].to_numpy(),
                color=color,
                marker="o",
                markersize=4,
                linewidth=1.8,
                zorder=3,
            )
            handles.setdefault(cal, line)
            ax.fill_between(
                x,
                rows[low].fill_null(np.nan).to_numpy(),
                rows[high].fill_null(np.nan).to_numpy(),
                color=color,
                alpha=0.18,
                linewidth=0,
                zorder=2,
            )
        for condition in _BASELINES:
            rows = summary.filter(pl.col("condition") == condition)
            if rows.height == 0:
                continue
            row = rows.row(0, named=True)
            if not _finite(row[value]):
                continue
            color = _BASELINE_COLORS[condition]
            if _finite(row[low]) and _finite(row[high]) and row[low] != row[high]:
                ax.axhspan(row[low], row[high], color=color, alpha=0.08, linewidth=0)
            line = ax.axhline(
                row[value],
                color=color,
                linestyle=(0, (2, 2)) if condition == "random_k" else "-",
                linewidth=1.1,
                zorder=1,
            )
            handles.setdefault(f"{_BASELINE_LABELS[condition]} ({_fmt(row[value])})", line)
        if fractions:
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(FixedLocator(fractions))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_major_formatter(
                FuncFormatter(lambda v, _: _fmt_fraction(v) if v in labelled else "")
            )
            ax.set_xlim(fractions[0] / 1.4, fractions[-1] * 1.4)
            ax.tick_params(axis="x", labelsize=8)
        else:
            ax.text(
                0.5,
                0.5,
                "no simulated conditions in the summary",
                transform=ax.transAxes,
                ha="center",
                color="#666666",
            )
            ax.set_xticks([])
        ax.set_xlabel("fraction of latents simulated (log scale)")
        ax.set_title(f"latents chosen {_choice_label(choice)}" if choice else "simulated latents")
        ax.grid(True, which="major", alpha=0.3)
    if paired:
        axes[0].set_ylabel("CE − CE(zero ablation), paired (nats)")
        fig.suptitle("Paired difference to zero ablation when latents are simulated")
    else:
        axes[0].set_ylabel("mean next-token CE (nats)")
        fig.suptitle("Mean CE on the eval contexts when latents are simulated from explanations")
    if handles:
        fig.legend(
            list(handles.values()),
            list(handles),
            loc="outside lower center",
            ncol=min(4, len(handles)),
            fontsize=8,
            frameon=False,
        )
    return _png(fig, dpi)


class _ScoreHistogram(NamedTuple):
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
) -> _ScoreHistogram:
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
    return _ScoreHistogram(
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


def simulated_scores_figure(h: _ScoreHistogram, dpi: int) -> bytes:
    """Density of the expected digit for truly active vs inactive (latent, context) pairs."""
    fig = _figure(7.5, 3.8)
    ax = fig.add_subplot()
    width = np.diff(h.edges)
    for counts, n, mean, color, label in (
        (h.inactive, h.n_inactive, h.mean_inactive, _INACTIVE_COLOR, "truly inactive"),
        (h.active, h.n_active, h.mean_active, _ACTIVE_COLOR, "truly active"),
    ):
        if n == 0:
            continue
        density = counts / (n * width)
        ax.bar(
            h.edges[:-1],
            density,
            width=width,
            align="edge",
            color=color,
            alpha=0.45,
            edgecolor=color,
            linewidth=0.6,
            label=f"{label} (n={n:,}, mean {_fmt(mean, 2)})",
        )
        if math.isfinite(mean):
            ax.axvline(mean, color=color, linestyle="--", linewidth=1.2)
    ax.set_xlim(0, 9)
    ax.set_xticks(range(10))
    ax.set_xlabel("simulated score: expected digit (0–9)")
    ax.set_ylabel("density")
    ax.set_title("Simulator's score on eval contexts, by whether the latent truly fires")
    lines = []
    if h.n_inactive:
        lines.append(f"inactive rated ≥ 4.5: {100 * h.high_inactive / h.n_inactive:.1f}%")
    if h.n_active:
        lines.append(f"active rated < 4.5: {100 * h.low_active / h.n_active:.1f}%")
    if lines:
        ax.text(
            0.99,
            0.97,
            "\n".join(lines),
            transform=ax.transAxes,
            ha="right",
            va="top",
            fontsize=8,
            bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "#cccccc"},
        )
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    ax.grid(True, axis="y", alpha=0.3)
    return _png(fig, dpi)


_METRICS = (
    ("pearson", "Pearson correlation", (-1.0, 1.0)),
    ("specificity", "specificity (TNR)", (0.0, 1.0)),
    ("sensitivity", "sensitivity (TPR)", (0.0, 1.0)),
)


def support_figure(support: pl.DataFrame, dpi: int) -> bytes:
    """Per calibration, the spurious simulated latents that survive top-k per eval context
    (box of the per-context counts, mean marked) and the surviving support's mean precision
    and recall (``calibration_support.parquet``)."""
    fig = _figure(10.5, 3.4)
    axes = fig.subplots(1, 2)
    present = set(support["calibration"].drop_nulls().to_list())
    calibrations = sorted(present, key=_calibration_order)
    colors = [_calibration_color(c, calibrations) for c in calibrations]
    counts = [
        support.filter(pl.col("calibration") == c)["n_spurious"].cast(pl.Float64).to_numpy()
        for c in calibrations
    ]
    positions = np.arange(1, len(calibrations) + 1)
    ax = axes[0]
    if calibrations:
        box = ax.boxplot(
            counts,
            positions=positions,
            widths=0.55,
            showfliers=True,
            patch_artist=True,
            medianprops={"color": "#222222"},
        )
        for patch, color in zip(box["boxes"], colors, strict=True):
            patch.set_facecolor(color)
            patch.set_alpha(0.35)
        ax.scatter(
            positions,
            [c.mean() if c.size else np.nan for c in counts],
            marker="D",
            color="#222222",
            s=18,
            zorder=3,
            label="mean",
        )
        ax.legend(loc="upper right", fontsize=8, frameon=False)
    ax.set_xticks(positions, calibrations, fontsize=8)
    ax.set_ylabel("spurious latents surviving top-k, per context")
    ax.grid(True, axis="y", alpha=0.3)
    ax = axes[1]
    width = 0.38
    for j, (column, hatch) in enumerate((("precision", ""), ("recall", "//"))):
        means = [
            float(np.nanmean(v)) if np.isfinite(v).any() else np.nan
            for v in (
                support.filter(pl.col("calibration") == c)[column]
                .cast(pl.Float64)
                .fill_null(np.nan)
                .to_numpy()
                for c in calibrations
            )
        ]
        ax.bar(
            positions + (j - 0.5) * width,
            means,
            width,
            color=colors,
            alpha=0.55,
            hatch=hatch,
            edgecolor="#444444",
            label=column,
        )
    ax.set_xticks(positions, calibrations, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("mean over eval contexts")
    ax.legend(loc="upper right", fontsize=8, frameon=False)
    ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("What survives top-k when every simulated latent is rewritten")
    return _png(fig, dpi)


def calibration_metrics_figure(metrics: pl.DataFrame, dpi: int, seed: int) -> bytes:
    """Per-latent Pearson / specificity / sensitivity per calibration: boxes plus points."""
    fig = _figure(10.5, 3.6)
    axes = fig.subplots(1, len(_METRICS), sharey=False)
    present = set(metrics["calibration"].drop_nulls().to_list())
    calibrations = sorted(present, key=_calibration_order)
    rng = np.random.default_rng([seed, 0x5E])
    for ax, (column, title, ylim) in zip(axes, _METRICS, strict=True):
        data, labels, colors = [], [], []
        for cal in calibrations:
            values = (
                metrics.filter(pl.col("calibration") == cal)[column]
                .cast(pl.Float64)
                .fill_null(np.nan)
                .to_numpy()
                if column in metrics.columns
                else np.zeros(0)
            )
            values = values[np.isfinite(values)]
            data.append(values)
            labels.append(f"{cal}\n(n={len(values)})")
            colors.append(_calibration_color(cal, calibrations))
        positions = np.arange(1, len(data) + 1)
        nonempty = [k for k, d in enumerate(data) if len(d)]
        if nonempty:
            box = ax.boxplot(
                [data[k] for k in nonempty],
                positions=positions[nonempty],
                widths=0.55,
                showfliers=False,
                patch_artist=True,
                medianprops={"color": "#222222"},
            )
            for patch, k in zip(box["boxes"], nonempty, strict=True):
                patch.set_facecolor(colors[k])
                patch.set_alpha(0.35)
        for k, values in enumerate(data):
            if len(values):
                jitter = rng.uniform(-0.18, 0.18, len(values))
                ax.scatter(
                    positions[k] + jitter, values, s=7, color=colors[k], alpha=0.6, linewidths=0
                )
        ax.set_xticks(positions, labels, fontsize=8)
        ax.set_xlim(0.4, len(data) + 0.6)
        ax.set_ylim(ylim[0] - 0.05, ylim[1] + 0.05)
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("Per-latent agreement of simulated and true activations on eval contexts")
    return _png(fig, dpi)


def detection_figure(scores: pl.DataFrame, dpi: int) -> bytes:
    """Balanced accuracy of detection scoring vs the shuffled-explanation baseline."""
    fig = _figure(7.5, 3.6)
    ax = fig.add_subplot()
    edges = np.linspace(0, 1, 21)
    for column, color, label in (
        ("shuffled_balanced_accuracy", "#9e9e9e", "shuffled explanation (chance)"),
        ("balanced_accuracy", "#1f77b4", "own explanation"),
    ):
        if column not in scores.columns:
            continue
        values = scores[column].cast(pl.Float64).fill_null(np.nan).to_numpy()
        values = values[np.isfinite(values)]
        if not len(values):
            continue
        ax.hist(
            values,
            bins=edges,
            color=color,
            alpha=0.5,
            edgecolor=color,
            label=f"{label}: n={len(values)}, mean {values.mean():.3f}",
        )
    ax.axvline(0.5, color="#444444", linestyle=":", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_xlabel("detection balanced accuracy")
    ax.set_ylabel("latents")
    ax.set_title("Detection scores: own explanation vs another latent's")
    ax.legend(loc="best", fontsize=8, frameon=False)
    ax.grid(True, axis="y", alpha=0.3)
    return _png(fig, dpi)


def latent_scatter_figure(
    latent: int,
    series: dict[str, tuple[np.ndarray, np.ndarray]],
    ylabel: str,
    dpi: int,
    diagonal: bool,
) -> bytes:
    """One latent's simulated (y) vs true (x) activation on the eval contexts: one small
    panel per series (calibration), shared axes, the diagonal y = x where the scales agree."""
    names = sorted(series, key=_calibration_order)
    cols = 1 if len(names) == 1 else 2
    rows = math.ceil(len(names) / cols)
    fig = _figure(3.9, 1.1 + 1.55 * rows if cols == 2 else 3.0)
    axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False).reshape(-1)
    top = max([float(np.nanmax(a)) for x, y in series.values() for a in (x, y) if a.size] or [1.0])
    for ax, name in zip(axes, names, strict=False):
        x, y = series[name]
        ax.scatter(x, y, s=7, alpha=0.5, linewidths=0, color=_calibration_color(name, names))
        if diagonal and top > 0:
            ax.plot([0, top], [0, top], color="#888888", linestyle=":", linewidth=0.9)
        ax.set_title(name, fontsize=8, pad=2)
        ax.tick_params(labelsize=6.5)
        ax.grid(True, alpha=0.3)
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    fig.supxlabel("true activation", fontsize=8)
    fig.supylabel(ylabel, fontsize=8)
    fig.suptitle(f"latent {latent}: eval contexts", fontsize=9)
    return _png(fig, dpi)


# --------------------------------------------------------------------------------------------
# Latent browser
# --------------------------------------------------------------------------------------------


def select_browser_latents(scores: pl.DataFrame, n: int) -> list[tuple[int, str]]:
    """``(latent, "best" | "median" | "worst")`` for ``n`` latents by balanced accuracy.

    Latents with a finite balanced accuracy, ranked descending (ties by latent id); a third
    of ``n`` (rounded up) from the top, as many from around the median, the rest from the
    bottom, each group in rank order. With at most ``n`` latents, all of them, labelled by
    the tercile of their rank.
    """
    ranked = (
        scores.select("latent", pl.col("balanced_accuracy").cast(pl.Float64))
        .filter(pl.col("balanced_accuracy").is_not_null() & pl.col("balanced_accuracy").is_finite())
        .sort(["balanced_accuracy", "latent"], descending=[True, False])["latent"]
        .to_list()
    )
    m = len(ranked)
    if n <= 0 or m == 0:
        return []
    if m <= n:
        labels = ("best", "median", "worst")
        return [(int(lat), labels[min(2, 3 * r // m)]) for r, lat in enumerate(ranked)]
    n_best = math.ceil(n / 3)
    n_median = math.ceil((n - n_best) / 2)
    n_worst = n - n_best - n_median
    start = max(n_best, min(m - n_worst - n_median, (m - n_median) // 2))
    picks = [(r, "best") for r in range(n_best)]
    picks += [(r, "median") for r in range(start, start + n_median)]
    picks += [(r, "worst") for r in range(m - n_worst, m)]
    return [(int(ranked[r]), label) for r, label in picks]


def _token_text_html(text: str) -> str:
    """A decoded token as HTML: control characters shown as muted symbols."""
    parts = []
    for ch in text:
        if ch == "\n":
            parts.append('<span class="ctl">↵</span>')
        elif ch == "\t":
            parts.append('<span class="ctl">⇥</span>')
        elif _CONTROL.match(ch):
            parts.append(f'<span class="ctl">{_esc(_printable(ch))}</span>')
        else:
            parts.append(_esc(ch))
    return "".join(parts) or '<span class="ctl">∅</span>'


def token_spans_html(tokens: Sequence[str], activations: Sequence[float], scale: float) -> str:
    """Tokens as HTML spans; an active token (activation > 0) gets an orange background with
    opacity ``activation / scale`` (at least 0.12 so that every active token shows) and its
    value as a tooltip."""
    out = []
    for tok, act in zip(tokens, activations, strict=True):
        body = _token_text_html(tok)
        if act > 0 and scale > 0:
            alpha = min(1.0, max(0.12, float(act) / scale))
            out.append(
                f'<span class="tok act" style="background:rgba(245,124,0,{alpha:.2f})" '
                f'title="{float(act):.4g}">{body}</span>'
            )
        else:
            out.append(f'<span class="tok">{body}</span>')
    return "".join(out)


def _markdown_tokens(tokens: Sequence[str], activations: Sequence[float]) -> str:
    """Tokens as plain text with active runs wrapped ``<<like this>>``."""
    out, inside = [], False
    for tok, act in zip(tokens, activations, strict=True):
        active = act > 0
        if active and not inside:
            out.append("<<")
        if not active and inside:
            out.append(">>")
        inside = active
        out.append(tok.replace("\n", "↵"))
    if inside:
        out.append(">>")
    return _printable("".join(out)).replace("`", "'")


class _Decoder:
    """Token ids to strings with the subject's tokenizer, or ``[id]`` when unavailable."""

    def __init__(self, model: str | None, enabled: bool, notes: list[str]) -> None:
        self.tokenizer: Any = None
        if not enabled:
            return
        if model is None:
            notes.append("Tokens are shown as ids: the subject model is not named in config.json.")
            return
        try:
            from transformers import AutoTokenizer

            from nlrw.assets import resolve_model

            self.tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
        except Exception as e:  # any failure to load only costs readable tokens
            notes.append(f"Tokens are shown as ids: the tokenizer of {model!r} did not load ({e}).")

    def __call__(self, ids: Sequence[int] | np.ndarray) -> list[str]:
        if self.tokenizer is None:
            return [f"[{int(i)}]" for i in ids]
        return [self.tokenizer.decode([int(i)]) for i in ids]


class _Window(NamedTuple):
    rank: int
    max_activation: float
    tokens: list[str]
    activations: list[float]


class _Rated(NamedTuple):
    context_id: int
    tokens: list[str]
    expected_value: float
    true_activation: float


class _Latent(NamedTuple):
    latent: int
    label: str
    explanation: str | None
    metrics: dict[str, Any]
    """Detection scores and cache statistics."""
    calibration: list[dict[str, Any]]
    windows: list[_Window]
    scatter: _Figure | None
    rated_high: list[_Rated]
    most_active: list[_Rated]


def _top_windows(run_dir: Path, latent: int, n: int, decode: _Decoder) -> list[_Window]:
    from nlrw.cache import read_top_windows, window_activations, window_tokens

    top = read_top_windows(run_dir, latent).sort("rank").head(n)
    if top.height == 0:
        return []
    windows = top["window"].to_numpy().astype(np.int64)
    ids = window_tokens(run_dir, windows)
    acts = window_activations(run_dir, latent, windows)
    return [
        _Window(int(rank), float(mx), decode(row), [float(a) for a in act])
        for rank, mx, row, act in zip(
            top["rank"].to_list(), top["max_activation"].to_list(), ids, acts, strict=True
        )
    ]


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

_CSS = """
*{box-sizing:border-box}
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
 color:#1d232a;margin:0;background:#eef0f3}
main{max-width:1200px;margin:0 auto;padding:28px 36px 64px;background:#fff;min-height:100vh}
h1{font-size:27px;margin:0 0 2px}
h2{font-size:20px;border-bottom:2px solid #e3e6ea;padding-bottom:4px;margin:38px 0 12px}
h3{font-size:16px;margin:0 0 6px}
.sub{color:#5b6570;margin:0 0 16px}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:12px 0}
.card{border:1px solid #dfe3e8;border-radius:8px;padding:8px 14px;min-width:150px;
 background:#fbfcfd}
.card .k{font-size:12px;color:#5b6570;text-transform:uppercase;letter-spacing:.03em}
.card .v{font-size:21px;font-weight:600;font-variant-numeric:tabular-nums}
.card .c{font-size:12px;color:#5b6570}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
table.wide{width:100%}
th,td{padding:3px 9px;border-bottom:1px solid #eceff2;text-align:right;vertical-align:top;
 white-space:nowrap}
th{background:#f3f5f7;font-weight:600}
th.l,td.l{text-align:left}
tbody tr:nth-child(even) td{background:#fafbfc}
td{font-variant-numeric:tabular-nums}
tr.base td{background:#f6f8fb}
td.sig{font-weight:600}
dl.kv{display:grid;grid-template-columns:max-content 1fr;gap:2px 16px;margin:8px 0;font-size:14px}
dl.kv dt{color:#5b6570}
dl.kv dd{margin:0;word-break:break-word}
figure{margin:14px 0}
figure img{max-width:100%;height:auto;display:block;margin:0 auto}
figcaption{font-size:13px;color:#5b6570;margin-top:4px}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:6px 12px;margin:6px 0;font-size:14px}
.latent{border:1px solid #dfe3e8;border-radius:10px;padding:14px 18px;margin:18px 0}
.latent .grid{display:grid;grid-template-columns:minmax(0,1fr) 380px;gap:18px}
.latent .side table{width:100%;font-size:12px}
.latent .side th,.latent .side td{padding:2px 5px}
.badge{display:inline-block;border-radius:10px;padding:0 8px;font-size:12px;font-weight:600;
 vertical-align:middle;margin-left:6px}
.badge.best{background:#d7f0dd;color:#185c2a}
.badge.median{background:#e2ebfb;color:#1f4a8a}
.badge.worst{background:#fbdede;color:#8a1f1f}
.badge.unscored{background:#eceff2;color:#3c4650}
.stats{font-size:13px;color:#3c4650;margin:2px 0 8px}
blockquote.expl{margin:6px 0 10px;padding:6px 12px;border-left:4px solid #1f77b4;background:#f4f8fc;
 font-size:15px}
blockquote.expl.none{border-left-color:#aaa;color:#777;font-style:italic}
.window{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px;
 white-space:pre-wrap;word-break:break-word;padding:3px 0;border-bottom:1px dashed #e8e8e8}
.window .rk{display:inline-block;min-width:74px;color:#8a939c;font-size:11px}
.tok{border-radius:2px}
.ctl{color:#9aa3ad}
.marked{outline:2px solid #1d232a;border-radius:2px;font-weight:700}
.lbl{font-size:12px;color:#5b6570;margin:10px 0 2px;text-transform:uppercase;letter-spacing:.03em}
.fp{color:#b3261e}
.tp{color:#1e7b34}
details{margin:8px 0}
summary{cursor:pointer;color:#1f4a8a}
pre{background:#f6f8fa;padding:10px;overflow:auto;font-size:12px;max-height:480px}
footer{margin-top:40px;font-size:12px;color:#8a939c}
@media (max-width:900px){.latent .grid{grid-template-columns:1fr}}
"""


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _config_items(config: dict[str, Any] | None, contexts: pl.DataFrame | None) -> list[tuple]:
    """(label, value) rows of the run's header."""
    cfg = _get(config, "config") or {}
    collect, train = cfg.get("collect", {}), cfg.get("train", {})
    items: list[tuple[str, Any]] = [
        ("subject model", collect.get("model")),
        ("hookpoint", collect.get("hookpoint")),
        (
            "sparse coder",
            None
            if not train
            else f"{train.get('kind', '?')}, {train.get('num_latents') or '?'} latents, "
            f"k = {train.get('k', '?')}",
        ),
        (
            "activations",
            None
            if not collect
            else f"{collect.get('dataset', '?')}: {collect.get('n_tokens', '?')} training "
            f"tokens, {collect.get('n_eval_tokens', '?')} held out, "
            f"context {collect.get('ctx_len')}",
        ),
        ("explainer", _get(cfg, "explain", "model")),
        ("scorer", _get(cfg, "score", "model")),
        ("simulator", _get(cfg, "simulate", "model")),
    ]
    if contexts is not None and "split" in contexts.columns:
        counts = dict(contexts.group_by("split").len().iter_rows())
        items.append(
            (
                "eval contexts",
                f"{counts.get('eval', 0)} eval + {counts.get('calibration', 0)} calibration",
            )
        )
    versions = _get(config, "versions")
    if isinstance(versions, dict):
        items.append(("versions", ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))))
    items.append(("git revision", _get(config, "git_revision") or "unknown"))
    items.append(("config written", _get(config, "written_at")))
    return [(k, v) for k, v in items if v is not None]


def _stage_times(run: _Run) -> list[tuple[str, str, Any]]:
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


def _cards_html(cards: Sequence[tuple[str, str, str]]) -> str:
    return (
        '<div class="cards">'
        + "".join(
            f'<div class="card"><div class="k">{_esc(k)}</div><div class="v">{_esc(v)}</div>'
            f'<div class="c">{_esc(c)}</div></div>'
            for k, v, c in cards
        )
        + "</div>"
    )


def _figure_html(fig: _Figure) -> str:
    return (
        f'<figure><img src="{png_data_uri(fig.png)}" alt="{_esc(fig.alt)}">'
        f"<figcaption>{_esc(fig.caption)}</figcaption></figure>"
    )


_TABLE_HEAD = (
    "condition",
    "calibration",
    "choice",
    "fraction",
    "latents",
    "contexts",
    "mean CE",
    "95% CI",
    "Δ vs zero ablation",
    "Δ 95% CI",
    "p",
    "p (Holm)",
    "vs zero ablation",
)


def claim(row: dict[str, Any]) -> str:
    """How a summary row compares with zero ablation, in words, from its tests (Holm-adjusted,
    at :data:`CLAIM_ALPHA`): "similar to zero ablation" only when the equivalence test (TOST
    within ±margin) passes, never from a large p-value; "better" / "worse" from the one-sided
    and two-sided tests; "inconclusive" otherwise. Empty for zero ablation itself."""
    if row["condition"] == "zero_ablation":
        return ""
    margin = row.get("equivalence_margin")
    within = f"within ±{margin:.3f} nats" if _finite(margin) else ""
    better = _finite(row.get("p_better_holm")) and row["p_better_holm"] < CLAIM_ALPHA
    worse = (
        _finite(row.get("p_value_holm"))
        and row["p_value_holm"] < CLAIM_ALPHA
        and _finite(row.get("diff_vs_zero"))
        and row["diff_vs_zero"] > 0
    )
    if row.get("equivalent_to_zero") is True:
        return f"{'better than, and ' if better else ''}similar to zero ablation ({within})"
    if better:
        return "better than zero ablation"
    if worse:
        return "worse than zero ablation"
    if not _finite(row.get("p_equivalent")):
        return "no difference shown (no equivalence test)"
    return "inconclusive: neither a difference nor similarity shown"


def _condition_rows(summary: pl.DataFrame) -> list[tuple[bool, list[str]]]:
    """(is_baseline, cells) per summary row."""
    out = []
    for r in summary.iter_rows(named=True):
        baseline = r["condition"] in _BASELINES
        choice = _choice_label(r["choice"])
        label = _BASELINE_LABELS.get(r["condition"]) or _CONTROL_LABELS.get(
            r["condition"], r["condition"]
        )
        if r["condition"] == "synthetic" and _finite(r.get("quality")):
            label = f"{label}, AUROC {r['quality']:g}"
        out.append(
            (
                baseline,
                [
                    label,
                    r["calibration"] or "",
                    choice,
                    _fmt_fraction(r["fraction"]),
                    "" if r["n_simulated_latents"] is None else str(r["n_simulated_latents"]),
                    "" if r["n_contexts"] is None else str(r["n_contexts"]),
                    _fmt(r["mean_ce"]),
                    _fmt_ci(r["ci_low"], r["ci_high"]),
                    ""
                    if r["condition"] == "zero_ablation"
                    else (f"{r['diff_vs_zero']:+.3f}" if _finite(r["diff_vs_zero"]) else "—"),
                    ""
                    if r["condition"] == "zero_ablation"
                    else _fmt_ci(r["diff_ci_low"], r["diff_ci_high"]),
                    "" if r["condition"] == "zero_ablation" else _fmt_p(r["p_value"]),
                    "" if r["condition"] == "zero_ablation" else _fmt_p(r.get("p_value_holm")),
                    claim(r),
                ],
            )
        )
    return out


def _significant(summary_row: dict[str, Any]) -> bool:
    p = summary_row.get("p_value_holm")
    return isinstance(p, float) and p < CLAIM_ALPHA and summary_row["condition"] != "zero_ablation"


def _table_html(summary: pl.DataFrame) -> str:
    head = "".join(
        f'<th class="{"l" if i < 3 else ""}">{_esc(h)}</th>' for i, h in enumerate(_TABLE_HEAD)
    )
    body = []
    for (baseline, cells), row in zip(
        _condition_rows(summary), summary.iter_rows(named=True), strict=True
    ):
        sig = _significant(row)
        last = len(cells) - 1
        classes = [
            "l" if i < 3 or i == last else ("sig" if sig and i >= 8 else "")
            for i in range(len(cells))
        ]
        tds = "".join(
            f'<td class="{k}">{_esc(c)}</td>' for k, c in zip(classes, cells, strict=True)
        )
        body.append(f'<tr class="{"base" if baseline else ""}">{tds}</tr>')
    return (
        f'<table class="wide"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
        '<p class="sub">Δ: mean paired per-context difference ce − ce(zero ablation); p: '
        "two-sided paired sign-flip test against zero ablation, p (Holm): adjusted over every "
        "comparison of the table (bold: p (Holm) &lt; 0.05). The last column words each claim "
        "from the Holm-adjusted tests: <i>similar to zero ablation</i> only when a paired TOST "
        "within the stated margin passes (a large p-value is not similarity); "
        "<i>better</i> from a one-sided test. CIs are bootstrap 95% intervals (contexts, and "
        "trials where latents are drawn at random).</p>"
    )


def _synthetic_rows(summary: pl.DataFrame) -> tuple[list[list[str]], list[str]]:
    """The synthetic simulators at their largest fraction (top choice where present): one
    row per (calibration, quality), and per calibration a sentence saying from which quality
    on the rewrite's mean CE reaches zero ablation's and the transcoder's."""
    synth = summary.filter((pl.col("condition") == "synthetic") & pl.col("quality").is_not_null())
    if synth.height == 0:
        return [], []
    largest = synth["fraction"].max()
    synth = synth.filter(pl.col("fraction") == largest)
    top = synth.filter(pl.col("choice") == "top")
    synth = (top if top.height else synth).sort("calibration", "quality")
    reference = {
        c: summary.filter(pl.col("condition") == c)["mean_ce"].mean()
        for c in ("zero_ablation", "transcoder")
    }
    rows, sentences = [], []
    for (cal,), group in synth.group_by(["calibration"], maintain_order=True):
        reached = {}
        for c, ce in reference.items():
            hits = group.filter(pl.col("mean_ce") <= ce)["quality"] if _finite(ce) else []
            reached[c] = f"AUROC {min(hits):g}" if len(hits) else "none of the levels"
        sentences.append(
            f"{cal}: the rewrite of {_fmt_fraction(largest)} of all latents reaches zero "
            f"ablation's mean CE from {reached['zero_ablation']}, the transcoder's from "
            f"{reached['transcoder']}."
        )
        for r in group.iter_rows(named=True):
            rows.append(
                [
                    str(cal),
                    f"{r['quality']:g}",
                    _fmt(r["mean_ce"]),
                    _fmt_ci(r["ci_low"], r["ci_high"]),
                    f"{r['diff_vs_zero']:+.3f}" if _finite(r["diff_vs_zero"]) else "—",
                    claim(r),
                ]
            )
    return rows, sentences


def decomposition(summary: pl.DataFrame) -> list[str]:
    """Per calibration, at the largest fraction (top choice where present): the rewrite's
    excess CE over the transcoder, split by the oracles: ``oracle_support`` keeps only the
    magnitude error, ``oracle_magnitude`` only the support error; the larger one is said to
    dominate. Empty without the controls or the transcoder."""
    transcoder = summary.filter(pl.col("condition") == "transcoder")["mean_ce"]
    if transcoder.len() == 0:
        return []
    base = float(transcoder[0])
    rows = summary.filter(
        pl.col("condition").is_in(["simulated", "oracle_support", "oracle_magnitude"])
        & pl.col("fraction").is_not_null()
    )
    if rows.filter(pl.col("condition") == "oracle_support").height == 0:
        return []
    largest = rows["fraction"].max()
    rows = rows.filter(pl.col("fraction") == largest)
    top = rows.filter(pl.col("choice") == "top")
    rows = top if top.height else rows
    out = []
    for (cal,), group in rows.group_by(["calibration"], maintain_order=True):
        excess = {}
        for c in ("simulated", "oracle_support", "oracle_magnitude"):
            values = group.filter(pl.col("condition") == c)["mean_ce"].to_numpy()
            excess[c] = float(values.mean()) - base if values.size else math.nan
        if not all(_finite(v) for v in excess.values()):
            continue
        magnitude, support = excess["oracle_support"], excess["oracle_magnitude"]
        dominant = "support error dominates" if support > magnitude else "magnitude error dominates"
        out.append(
            f"{cal}, {_fmt_fraction(largest)} of the simulated latents: {excess['simulated']:+.3f} "
            f"nats over the transcoder; with the true support (magnitude error alone) "
            f"{magnitude:+.3f}, with the true magnitudes (support error alone) {support:+.3f}: "
            f"{dominant}."
        )
    return out


_SYNTHETIC_HEAD = ("calibration", "AUROC", "mean CE", "95% CI", "Δ vs zero ablation", "claim")


def _synthetic_html(summary: pl.DataFrame) -> str:
    rows, sentences = _synthetic_rows(summary)
    if not rows:
        return ""
    head = "".join(f"<th>{_esc(h)}</th>" for h in _SYNTHETIC_HEAD)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return (
        "<h2>Synthetic simulators</h2>"
        '<p class="sub">A positive control without LLM: scores made from the true '
        "activations with seeded noise tuned to each AUROC, for every latent of the coder, "
        "calibrated and rewritten like the real simulations.</p>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        + "".join(f'<p class="sub">{_esc(t)}</p>' for t in sentences)
    )


def _synthetic_md(summary: pl.DataFrame) -> list[str]:
    rows, sentences = _synthetic_rows(summary)
    if not rows:
        return []
    lines = [
        "## Synthetic simulators",
        "",
        "| " + " | ".join(_SYNTHETIC_HEAD) + " |",
        "|" + "|".join("--" for _ in _SYNTHETIC_HEAD) + "|",
    ]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return [*lines, "", *sentences, ""]


def _table_md(summary: pl.DataFrame) -> str:
    lines = [
        "| " + " | ".join(_TABLE_HEAD) + " |",
        "|" + "|".join(":--" if i < 3 else "--:" for i in range(len(_TABLE_HEAD))) + "|",
    ]
    for _, cells in _condition_rows(summary):
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def _metrics_line(m: dict[str, Any]) -> str:
    parts = []
    for key, label in (
        ("balanced_accuracy", "balanced accuracy"),
        ("shuffled_balanced_accuracy", "shuffled"),
        ("auroc", "AUROC"),
    ):
        if key in m:
            parts.append(f"{label} {_fmt(m[key])}")
    if "count" in m:
        parts.append(f"active positions {m['count']:,}")
    if "frequency" in m:
        parts.append(f"frequency {m['frequency']:.2%}" if _finite(m["frequency"]) else "")
    if "max" in m:
        parts.append(f"max activation {_fmt(m['max'])}")
    return " · ".join(p for p in parts if p)


def _marked_html(token: str) -> str:
    """The marked token; a token of spaces only shows as ``␣`` so that the box is not empty."""
    if token and set(token) == {" "}:
        return "␣" * len(token)
    return _token_text_html(token)


def _rated_html(rated: Sequence[_Rated]) -> str:
    out = []
    for r in rated:
        *before, last = r.tokens or ["∅"]
        cls = "fp" if r.true_activation <= 0 else "tp"
        out.append(
            f'<div class="window"><span class="rk">ctx {r.context_id}</span>'
            f"{''.join(f'<span class=tok>{_token_text_html(t)}</span>' for t in before)}"
            f'<span class="tok marked">{_marked_html(last)}</span>'
            f'  <span class="{cls}">score {_fmt(r.expected_value, 2)} · true '
            f"{_fmt(r.true_activation)}</span></div>"
        )
    return "".join(out)


def _latent_html(lat: _Latent) -> str:
    head = (
        f'<h3>Latent {lat.latent}<span class="badge {lat.label}">{_esc(lat.label)}</span></h3>'
        f'<div class="stats">{_esc(_metrics_line(lat.metrics))}</div>'
    )
    if lat.explanation:
        expl = f'<blockquote class="expl">{_esc(_printable(lat.explanation))}</blockquote>'
    else:
        expl = '<blockquote class="expl none">no usable explanation</blockquote>'
    cal = ""
    if lat.calibration:
        rows = "".join(
            f'<tr><td class="l">{_esc(c["calibration"])}</td><td>{_fmt(c.get("pearson"))}</td>'
            f"<td>{_fmt(c.get('specificity'))}</td><td>{_fmt(c.get('sensitivity'))}</td>"
            f"<td>{_fmt(c.get('auroc'))}</td></tr>"
            for c in lat.calibration
        )
        cal = (
            '<table><thead><tr><th class="l">calibration</th><th>pearson</th>'
            "<th>specificity</th><th>sensitivity</th><th>AUROC</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>"
        )
    windows = ""
    if lat.windows:
        scale = max((max(w.activations, default=0.0) for w in lat.windows), default=0.0)
        windows = '<div class="lbl">top activating windows (cache)</div>' + "".join(
            f'<div class="window"><span class="rk">#{w.rank + 1} · {_fmt(w.max_activation, 2)}'
            f"</span>{token_spans_html(w.tokens, w.activations, scale)}</div>"
            for w in lat.windows
        )
    rated = ""
    if lat.rated_high:
        rated += (
            '<div class="lbl">eval contexts the simulator rated highest (marked token boxed)</div>'
            + _rated_html(lat.rated_high)
        )
    if lat.most_active:
        rated += '<div class="lbl">eval contexts where it truly fires most</div>' + _rated_html(
            lat.most_active
        )
    side = _figure_html(lat.scatter) if lat.scatter is not None else ""
    return (
        f'<section class="latent" id="latent-{lat.latent}">{head}'
        f'<div class="grid"><div>{expl}{windows}{rated}</div>'
        f'<div class="side">{side}{cal}</div></div>'
        "</section>"
    )


def _latent_md(lat: _Latent) -> str:
    lines = [f"### Latent {lat.latent} ({lat.label})", "", _metrics_line(lat.metrics), ""]
    lines.append(f"> {_md_cell(lat.explanation)}" if lat.explanation else "> (no explanation)")
    lines.append("")
    if lat.windows:
        lines.append("Top activating windows (active tokens in `<<>>`):")
        lines.append("")
        for w in lat.windows:
            text = _markdown_tokens(w.tokens, w.activations)
            lines.append(f"{w.rank + 1}. ({w.max_activation:.3g}) `{text}`")
        lines.append("")
    if lat.calibration:
        lines.append("| calibration | pearson | specificity | sensitivity |")
        lines.append("|:--|--:|--:|--:|")
        for c in lat.calibration:
            lines.append(
                f"| {c['calibration']} | {_fmt(c.get('pearson'))} | "
                f"{_fmt(c.get('specificity'))} | {_fmt(c.get('sensitivity'))} |"
            )
        lines.append("")
    if lat.scatter is not None:
        lines += [f"![{lat.scatter.alt}]({lat.scatter.name})", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def _eval_ids(contexts: pl.DataFrame | None) -> list[int] | None:
    if contexts is None or "split" not in contexts.columns:
        return None
    return contexts.filter(pl.col("split") == "eval")["context_id"].cast(pl.Int64).to_list()


def _browser(
    cfg: ReportConfig,
    run: _Run,
    scores: pl.DataFrame | None,
    explanations: pl.DataFrame | None,
    contexts: pl.DataFrame | None,
    metrics: pl.DataFrame | None,
    model: str | None,
) -> list[_Latent]:
    if cfg.n_browser_latents == 0:
        return []
    if scores is not None and "balanced_accuracy" in scores.columns:
        picks = select_browser_latents(scores, cfg.n_browser_latents)
    elif explanations is not None:
        run.notes.append("Latent browser: no detection scores, latents shown in latent order.")
        picks = [
            (int(lat), "unscored")
            for lat in sorted(explanations["latent"].to_list())[: cfg.n_browser_latents]
        ]
    else:
        run.notes.append(
            "Latent browser left out: neither scores.parquet (score stage) nor "
            "explanations.parquet (explain stage) is there."
        )
        return []
    if not picks:
        run.notes.append("Latent browser left out: no latent has a finite balanced accuracy.")
        return []
    latents = [lat for lat, _ in picks]
    decode = _Decoder(model, cfg.decode_tokens, run.notes)

    explanation_of: dict[int, str] = {}
    if explanations is not None:
        explanation_of = {
            int(r["latent"]): r["explanation"]
            for r in explanations.iter_rows(named=True)
            if r["explanation"]
        }
    elif scores is not None and "explanation" in scores.columns:
        explanation_of = {
            int(r["latent"]): r["explanation"]
            for r in scores.iter_rows(named=True)
            if r["explanation"]
        }
    info: dict[int, dict[str, Any]] = {lat: {} for lat in latents}
    if scores is not None:
        keep = [
            c
            for c in ("balanced_accuracy", "shuffled_balanced_accuracy", "auroc")
            if c in scores.columns
        ]
        for r in scores.filter(pl.col("latent").is_in(latents)).iter_rows(named=True):
            info[int(r["latent"])].update({k: r[k] for k in keep})
    stats_ok = run.path("latents/stats.parquet").is_file()
    if stats_ok:
        from nlrw.cache import read_stats

        stats = read_stats(run.dir).filter(pl.col("latent").is_in(latents))
        for r in stats.iter_rows(named=True):
            info[int(r["latent"])].update(
                {k: r[k] for k in ("count", "frequency", "max") if k in r}
            )
    else:
        run.missing("latents/stats.parquet", "Cache statistics of the browsed latents")

    top_ok = run.path("latents/top_windows.parquet").is_file()
    if not top_ok:
        run.missing("latents/top_windows.parquet", "Top activating windows")
    calib_of: dict[int, list[dict[str, Any]]] = {lat: [] for lat in latents}
    if metrics is not None:
        rows = metrics.filter(pl.col("latent").is_in(latents))
        for r in sorted(
            rows.iter_rows(named=True), key=lambda r: _calibration_order(r["calibration"])
        ):
            calib_of[int(r["latent"])].append(r)

    sims = _browser_simulations(run, latents, _eval_ids(contexts))
    calibrated = _browser_calibration(run, latents)
    tokens_of: dict[int, list[int]] = {}
    if contexts is not None and "input_ids" in contexts.columns:
        tokens_of = {
            int(cid): ids
            for cid, ids in zip(
                contexts["context_id"].to_list(), contexts["input_ids"].to_list(), strict=True
            )
        }
    rng = np.random.default_rng([cfg.seed, 0x5CA7])
    out = []
    for lat, label in picks:
        windows: list[_Window] = []
        if top_ok:
            try:
                windows = _top_windows(run.dir, lat, cfg.n_top_windows, decode)
            except (FileNotFoundError, ValueError) as e:
                run.notes.append(f"Top windows of latent {lat} left out: {e}")
        scatter, high, active = None, [], []
        s = sims.get(lat) if sims is not None else None
        if s is not None and s.height:
            scatter = _scatter(cfg, lat, s, calibrated, rng)
            if tokens_of and cfg.n_rated_contexts:
                high = _rated(s.sort(["expected_value", "context_id"], descending=[True, False]))
                active = _rated(
                    s.filter(pl.col("true_activation") > 0).sort(
                        ["true_activation", "context_id"], descending=[True, False]
                    )
                )
                high = _decode_rated(high[: cfg.n_rated_contexts], tokens_of, decode, cfg)
                active = _decode_rated(active[: cfg.n_rated_contexts], tokens_of, decode, cfg)
        out.append(
            _Latent(
                lat,
                label,
                explanation_of.get(lat),
                info[lat],
                calib_of[lat],
                windows,
                scatter,
                high,
                active,
            )
        )
    return out


def _browser_simulations(
    run: _Run, latents: list[int], eval_ids: list[int] | None
) -> dict[int, pl.DataFrame] | None:
    path = run.path("simulations.parquet")
    if not path.is_file():
        run.missing("simulations.parquet", "Simulated vs true activation in the latent browser")
        return None
    scan = (
        pl.scan_parquet(path)
        .select("latent", "context_id", "expected_value", "true_activation")
        .filter(pl.col("latent").is_in(latents))
    )
    if eval_ids is not None:
        scan = scan.filter(pl.col("context_id").is_in(eval_ids))
    table = scan.collect()
    return {int(k[0]): g for k, g in table.group_by("latent")}  # pyright: ignore[reportArgumentType]


def _browser_calibration(run: _Run, latents: list[int]) -> pl.DataFrame | None:
    path = run.path("calibration.parquet")
    if not path.is_file():
        return None
    return (
        pl.scan_parquet(path)
        .select("latent", "context_id", "calibration", "activation")
        .filter(pl.col("latent").is_in(latents))
        .collect()
    )


def _scatter(
    cfg: ReportConfig,
    latent: int,
    sims: pl.DataFrame,
    calibrated: pl.DataFrame | None,
    rng: np.random.Generator,
) -> _Figure:
    def sample(n: int) -> np.ndarray:
        return (
            np.sort(rng.choice(n, cfg.max_scatter_points, replace=False))
            if n > cfg.max_scatter_points
            else np.arange(n)
        )

    rows = calibrated.filter(pl.col("latent") == latent) if calibrated is not None else None
    series: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if rows is not None and rows.height:
        joined = rows.join(
            sims.select("context_id", "true_activation"), on="context_id", how="inner"
        )
        for (cal,), g in joined.sort("context_id").group_by("calibration", maintain_order=True):
            pick = sample(g.height)
            series[str(cal)] = (
                g["true_activation"].to_numpy()[pick],
                g["activation"].to_numpy()[pick],
            )
    if series:
        ylabel = "calibrated simulated activation"
        png = latent_scatter_figure(latent, series, ylabel, cfg.dpi, diagonal=True)
    else:
        s = sims.sort("context_id")
        pick = sample(s.height)
        ylabel = "simulated score (expected digit)"
        series = {
            "uncalibrated score": (
                s["true_activation"].to_numpy()[pick],
                s["expected_value"].to_numpy()[pick],
            )
        }
        png = latent_scatter_figure(latent, series, ylabel, cfg.dpi, diagonal=False)
    return _Figure(
        f"latent_{latent}.png",
        png,
        f"latent {latent}: {ylabel} vs true activation on eval contexts",
        f"{ylabel.capitalize()} against the true activation, one point per eval context.",
    )


def _rated(rows: pl.DataFrame) -> list[tuple[int, float, float]]:
    return [
        (int(c), float(e), float(t))
        for c, e, t in rows.select("context_id", "expected_value", "true_activation").iter_rows()
    ]


def _decode_rated(
    rows: list[tuple[int, float, float]],
    tokens_of: dict[int, list[int]],
    decode: _Decoder,
    cfg: ReportConfig,
) -> list[_Rated]:
    out = []
    for cid, ev, true in rows:
        ids = tokens_of.get(cid)
        if ids is None:
            continue
        out.append(_Rated(cid, decode(ids[-(cfg.context_tail + 1) :]), ev, true))
    return out


def _synthetic_curves(summary: pl.DataFrame) -> pl.DataFrame:
    """The synthetic rows at their largest fraction, top choice where present."""
    synth = summary.filter(
        (pl.col("condition") == "synthetic")
        & pl.col("quality").is_not_null()
        & pl.col("mean_ce").is_not_null()
    )
    if synth.height == 0:
        return synth
    synth = synth.filter(pl.col("fraction") == synth["fraction"].max())
    top = synth.filter(pl.col("choice") == "top")
    return (top if top.height else synth).sort("calibration", "quality")


def real_simulator_auroc(metrics: pl.DataFrame | None) -> float | None:
    """Mean over latents of the real simulator's AUROC (``calibration_metrics.parquet``; the
    same for every calibration, which does not change the ranking)."""
    if metrics is None or "auroc" not in metrics.columns:
        return None
    values = metrics.group_by("latent").agg(pl.col("auroc").first())["auroc"].to_numpy()
    values = values[np.isfinite(values.astype(np.float64))]
    return float(values.mean()) if values.size else None


def frontier_figure(summary: pl.DataFrame, real_auroc: float | None, dpi: int) -> bytes:
    """Mean CE of the synthetic simulators against their AUROC, one line per calibration
    (bootstrap 95% bands), zero ablation and the transcoder as horizontal lines, the real
    simulator's measured AUROC as a vertical one."""
    curves = _synthetic_curves(summary)
    fig = _figure(6.4, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    names = [str(c) for c in curves["calibration"].unique().to_list()]
    for (cal,), group in curves.group_by(["calibration"], maintain_order=True):
        q = group["quality"].to_numpy()
        color = _calibration_color(str(cal), names)
        ax.plot(q, group["mean_ce"].to_numpy(), marker="o", label=str(cal), color=color)
        ax.fill_between(
            q, group["ci_low"].to_numpy(), group["ci_high"].to_numpy(), alpha=0.2, color=color
        )
    for condition in ("zero_ablation", "transcoder"):
        rows = summary.filter(pl.col("condition") == condition)
        if rows.height:
            ax.axhline(
                float(rows["mean_ce"][0]),
                color=_BASELINE_COLORS[condition],
                linestyle="--",
                label=_BASELINE_LABELS[condition],
            )
    if real_auroc is not None:
        ax.axvline(real_auroc, color="#555555", linestyle=":", label="this run's simulator")
    ax.set_xlabel("simulator quality: AUROC of active vs inactive contexts")
    ax.set_ylabel("mean next-token CE (nats)")
    fraction = curves["fraction"].max() if curves.height else None
    ax.set_title(
        f"Synthetic simulators, {_fmt_fraction(fraction)} of all latents rewritten"
        if fraction is not None
        else "Synthetic simulators"
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig, dpi)


def _figures(
    cfg: ReportConfig,
    run: _Run,
    summary: pl.DataFrame,
    contexts: pl.DataFrame | None,
    scores: pl.DataFrame | None,
    metrics: pl.DataFrame | None,
) -> tuple[_Figure, list[_Figure]]:
    headline = _Figure(
        "headline.png",
        headline_figure(summary, cfg.dpi),
        "mean CE vs fraction of latents simulated",
        "Mean next-token CE on the eval contexts when a fraction of the simulated latents is "
        "replaced by simulated values (left: the latents with the best detection scores first; "
        "right: latents chosen at random). Bands: bootstrap 95% CIs. Horizontal lines and "
        "bands: the baselines.",
    )
    diagnosis: list[_Figure] = []
    if {"diff_vs_zero", "diff_ci_low", "diff_ci_high"} <= set(summary.columns) and (
        summary.filter(pl.col("condition") == "simulated")["diff_vs_zero"].drop_nulls().len()
    ):
        diagnosis.append(
            _Figure(
                "headline_paired.png",
                headline_figure(summary, cfg.dpi, paired=True),
                "paired difference to zero ablation vs fraction of latents simulated",
                "The headline as paired differences: per context, CE of the condition minus CE "
                "with zero ablation, averaged, with its bootstrap 95% CI. Below 0: better than "
                "zero ablation. The spread of CE across contexts cancels here, so small effects "
                "that the CIs of the means above hide are visible.",
            )
        )
    sims = run.path("simulations.parquet")
    if sims.is_file():
        eval_ids = _eval_ids(contexts)
        if eval_ids is None:
            run.notes.append(
                "Simulated-score distribution uses every context: contexts.parquet (contexts "
                "stage) is not there to pick the eval split."
            )
        try:
            hist = simulated_score_histogram(sims, eval_ids)
        except Exception as e:  # a damaged or foreign file: the section goes, the report stays
            run.notes.append(f"Simulated-score distribution left out: {sims} unreadable ({e}).")
        else:
            diagnosis.append(
                _Figure(
                    "simulated_scores.png",
                    simulated_scores_figure(hist, cfg.dpi),
                    "simulated score distribution, truly active vs inactive",
                    "The simulator's expected digit for every (latent, eval context) pair, split "
                    "by whether the latent truly fires there. Mass of the inactive distribution at "
                    "high scores means false positives (low specificity).",
                )
            )
    else:
        run.missing("simulations.parquet", "Simulated-score distribution")
    if metrics is not None:
        diagnosis.append(
            _Figure(
                "calibration_metrics.png",
                calibration_metrics_figure(metrics, cfg.dpi, cfg.seed),
                "per-latent pearson, specificity and sensitivity per calibration",
                "One point per latent: agreement of its calibrated simulated activations with "
                "the true ones on the eval contexts (active: activation > 0).",
            )
        )
    support_path = run.path("calibration_support.parquet")
    if support_path.is_file():
        try:
            support = pl.read_parquet(support_path)
        except Exception as e:  # a damaged file: the figure goes, the report stays
            run.notes.append(f"Top-k survivors left out: {support_path} unreadable ({e}).")
        else:
            diagnosis.append(
                _Figure(
                    "calibration_support.png",
                    support_figure(support, cfg.dpi),
                    "spurious simulated latents surviving top-k, precision and recall",
                    "Every simulated latent rewritten with its calibrated value and top-k "
                    "re-applied, per eval context: how many simulated latents that are truly "
                    "inactive there survive (they displace real latents), and the precision "
                    "and recall of the simulated latents that survive. These decide the loss "
                    "beside specificity and sensitivity.",
                )
            )
    if _synthetic_curves(summary).height:
        real = real_simulator_auroc(metrics)
        where = (
            f" Dotted: this run's simulator at its measured mean AUROC {real:.3f}."
            if real is not None
            else ""
        )
        diagnosis.append(
            _Figure(
                "frontier.png",
                frontier_figure(summary, real, cfg.dpi),
                "mean CE vs synthetic simulator quality",
                "Synthetic simulators (no LLM): scores from the true activations with seeded "
                "noise tuned to each AUROC, for every latent of the coder, calibrated and "
                "rewritten like the real simulations. Where a line crosses zero ablation is "
                "how faithful a simulator must be for the rewrite to beat it." + where,
            )
        )
    if scores is not None:
        diagnosis.append(
            _Figure(
                "detection.png",
                detection_figure(scores, cfg.dpi),
                "detection balanced accuracy vs shuffled-explanation baseline",
                "Detection scoring: how well each explanation separates activating from "
                "non-activating windows, next to the same examples scored against another "
                "latent's explanation (dotted line: chance).",
            )
        )
    return headline, diagnosis


def _headline_cards(
    summary: pl.DataFrame, recovery: dict[str, Any] | None, evaluation: dict[str, Any] | None
) -> list[tuple[str, str, str]]:
    cards: list[tuple[str, str, str]] = []
    n_simulated = (evaluation or {}).get("n_simulated_latents")
    num_latents = (evaluation or {}).get("num_latents")
    partial = (
        isinstance(n_simulated, int) and isinstance(num_latents, int) and n_simulated < num_latents
    )
    for condition in ("clean", "transcoder", "zero_ablation"):
        rows = summary.filter(pl.col("condition") == condition)
        if rows.height:
            r = rows.row(0, named=True)
            cards.append(
                (
                    f"CE {_BASELINE_LABELS[condition]}",
                    _fmt(r["mean_ce"]),
                    _fmt_ci(r["ci_low"], r["ci_high"]),
                )
            )
    # The paper's headline: every simulated latent replaced (the largest fraction, top choice).
    sim = summary.filter(
        (pl.col("condition") == "simulated")
        & pl.col("mean_ce").is_not_null()
        & pl.col("fraction").is_not_null()
    )
    if sim.height:
        largest = sim["fraction"].max()
        at = sim.filter(pl.col("fraction") == largest).with_columns(
            pl.col("calibration").fill_null("uncalibrated")
        )
        top = at.filter(pl.col("choice") == "top")
        at = top if top.height else at
        # "Fraction" is of the simulated latents; say so when they are not every latent.
        of = f"{n_simulated:,} simulated latents" if partial else "latents"
        what = (
            f"all {of} replaced"
            if largest == 1.0
            else f"{_fmt_fraction(largest)} of the {of} replaced"
        )
        plain = at.filter(pl.col("calibration") == "uncalibrated")
        if plain.height:
            r = plain.row(0, named=True)
            cards.append(
                (
                    f"{what}, uncalibrated",
                    _fmt(r["mean_ce"]),
                    f"{_fmt_ci(r['ci_low'], r['ci_high'])}; {claim(r)}",
                )
            )
        calibrated = at.filter(pl.col("calibration") != "uncalibrated").sort("mean_ce")
        if calibrated.height:
            r = calibrated.row(0, named=True)
            cards.append(
                (
                    f"{what}, best calibration",
                    _fmt(r["mean_ce"]),
                    f"{r['calibration']} {_fmt_ci(r['ci_low'], r['ci_high'])}; {claim(r)}",
                )
            )
    if partial:
        kept = (evaluation or {}).get("never_simulated_active_fraction")
        detail = "every other latent keeps its true activation"
        if isinstance(kept, float) and _finite(kept):
            detail += f", {100 * kept:.1f}% of the eval contexts' nonzero top-k activations"
        cards.append(("latents simulated", f"{n_simulated:,} of {num_latents:,}", detail))
    result = (recovery or {}).get("result")
    recovered = _loss_recovered(result) if isinstance(result, dict) else None
    if isinstance(result, dict) and recovered is not None:
        cards.append(
            (
                "loss recovered",
                f"{100 * recovered:.1f}%",
                f"transcoder, {result.get('n_tokens', '?')} held-out tokens",
            )
        )
    return cards


def _recovery_html(recovery: dict[str, Any] | None) -> str:
    result = (recovery or {}).get("result")
    if not isinstance(result, dict):
        return ""
    rows = [
        ("clean", result.get("ce_clean")),
        ("transcoder", result.get("ce_transcoder")),
        ("zero ablation", result.get("ce_zero")),
    ]
    body = "".join(f'<tr><td class="l">{k}</td><td>{_fmt(v, 4)}</td></tr>' for k, v in rows)
    return (
        '<table><thead><tr><th class="l">splice on every position</th><th>mean CE</th></tr>'
        f"</thead><tbody>{body}</tbody></table>"
        f'<p class="sub">Loss recovered 1 − (CE<sub>transcoder</sub> − CE<sub>clean</sub>) / '
        f"(CE<sub>zero</sub> − CE<sub>clean</sub>) = <b>{_esc(_fmt_recovered(result))}</b> over "
        f"{_esc(result.get('n_tokens', '?'))} held-out tokens "
        "(transcoder/recovery.json).</p>"
    )


def _render_html(
    run_dir: Path,
    config: dict[str, Any] | None,
    items: list[tuple[str, Any]],
    cards: list[tuple[str, str, str]],
    recovery_html: str,
    headline: _Figure,
    summary: pl.DataFrame,
    diagnosis: list[_Figure],
    browser: list[_Latent],
    times: list[tuple[str, str, Any]],
    notes: list[str],
) -> str:
    kv = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in items)
    notes_html = "".join(f'<div class="note">{_esc(n)}</div>' for n in notes)
    times_html = ""
    if times:
        rows = "".join(
            f'<tr><td class="l">{_esc(n)}</td><td class="l">{_esc(s)}</td>'
            f"<td>{_fmt(sec, 1) if _finite(sec) else ''}</td></tr>"
            for n, s, sec in times
        )
        total = sum(sec for _, _, sec in times if _finite(sec))
        times_html = (
            '<table><thead><tr><th class="l">stage</th><th class="l">state</th><th>seconds</th>'
            f'</tr></thead><tbody>{rows}<tr><td class="l"><b>total</b></td><td></td>'
            f"<td><b>{total:.1f}</b></td></tr></tbody></table>"
        )
    config_dump = ""
    if config is not None:
        config_dump = (
            "<details><summary>full resolved config (config.json)</summary><pre>"
            + _esc(json.dumps(config.get("config", config), indent=2, sort_keys=True))
            + "</pre></details>"
        )
    notes_banner = (
        f'<div class="note">{len(notes)} note{"s" if len(notes) > 1 else ""} about inputs that '
        'are missing or partial: see <a href="#notes">Notes</a> at the end.</div>'
        if notes
        else ""
    )
    browser_html = "".join(_latent_html(lat) for lat in browser)
    if not browser_html:
        browser_html = '<p class="sub">No latents to show (see the notes below).</p>'
    diag_html = "".join(_figure_html(f) for f in diagnosis) or (
        '<p class="sub">No diagnosis inputs (see the notes below).</p>'
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>nlrw report: {_esc(run_dir.name)}</title>
<style>{_CSS}</style>
</head>
<body>
<main>
<h1>nlrw report: {_esc(run_dir.name)}</h1>
<p class="sub">Partially rewriting a transformer in natural language: how much next-token loss
rises when transcoder latents are replaced by an LLM's simulation of them from their
explanations. Run directory <code>{_esc(run_dir)}</code>.</p>
{_cards_html(cards)}
{notes_banner}
<h2>Run</h2>
<dl class="kv">{kv}</dl>
{recovery_html}
{config_dump}
<h2>Headline</h2>
{_figure_html(headline)}
<h2>Every condition</h2>
{_table_html(summary.filter(pl.col("condition") != "synthetic"))}
{"".join(f'<p class="sub">{_esc(t)}</p>' for t in decomposition(summary))}
{_synthetic_html(summary)}
<h2>Diagnosis</h2>
{diag_html}
<h2>Latent browser</h2>
<p class="sub">Latents with the best, median and worst detection scores. Top windows come from
the latent cache; a highlighted token is active, its opacity proportional to its activation
(hover for the value). Eval contexts: the simulator rates the boxed last token;
<span class="fp">red</span>: the latent is truly inactive there, <span class="tp">green</span>:
active.</p>
{browser_html}
<h2>Stages</h2>
{times_html or '<p class="sub">No stage records (stages/*.json).</p>'}
{'<h2 id="notes">Notes</h2>' + notes_html if notes else ""}
<footer>Written by nlrw {_esc(_get(config, "versions", "nlrw") or "")} · self-contained: every
figure is embedded; nothing is loaded from the network.</footer>
</main>
</body>
</html>
"""


def _render_md(
    run_dir: Path,
    items: list[tuple[str, Any]],
    cards: list[tuple[str, str, str]],
    recovery: dict[str, Any] | None,
    headline: _Figure,
    summary: pl.DataFrame,
    diagnosis: list[_Figure],
    browser: list[_Latent],
    times: list[tuple[str, str, Any]],
    notes: list[str],
) -> str:
    lines = [f"# nlrw report: {run_dir.name}", ""]
    lines += [f"- **{k}**: {_md_cell(str(v))}" for k, v in items]
    lines.append("")
    if cards:
        lines += ["| " + " | ".join(k for k, _, _ in cards) + " |"]
        lines += ["|" + "|".join("--:" for _ in cards) + "|"]
        lines += ["| " + " | ".join(f"{v} {c}".strip() for _, v, c in cards) + " |", ""]
    result = (recovery or {}).get("result")
    if isinstance(result, dict):
        lines += [
            f"Loss recovered by the transcoder: {_fmt_recovered(result)} "
            f"(CE clean {_fmt(result.get('ce_clean'), 4)}, transcoder "
            f"{_fmt(result.get('ce_transcoder'), 4)}, zero {_fmt(result.get('ce_zero'), 4)}; "
            f"{result.get('n_tokens', '?')} held-out tokens).",
            "",
        ]
    lines += ["## Headline", "", f"![{headline.alt}]({headline.name})", "", headline.caption, ""]
    lines += [
        "## Every condition",
        "",
        _table_md(summary.filter(pl.col("condition") != "synthetic")),
        "",
        *[f"{t}\n" for t in decomposition(summary)],
        *_synthetic_md(summary),
    ]
    lines += ["## Diagnosis", ""]
    for f in diagnosis:
        lines += [f"![{f.alt}]({f.name})", "", f.caption, ""]
    lines += ["## Latent browser", ""]
    lines += [_latent_md(lat) for lat in browser]
    if times:
        lines += ["## Stages", "", "| stage | state | seconds |", "|:--|:--|--:|"]
        lines += [f"| {n} | {s} | {_fmt(sec, 1) if _finite(sec) else ''} |" for n, s, sec in times]
        lines.append("")
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def run(cfg: ReportConfig, run_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Render ``run_dir/report/`` (index.html, report.md, PNGs); returns the index.html path.

    Raises:
        FileNotFoundError: ``eval/summary.parquet`` is missing (run the evaluate stage).
        ValueError: the summary is unreadable or lacks its columns.
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    out = run_dir / "report"
    index = out / "index.html"
    record_path = run_dir / "report.json"
    summary = read_summary(run_dir)
    key = config_hash({"config": cfg, "inputs": _fingerprint(run_dir)})
    if not overwrite and index.is_file():
        try:
            record = json.loads(record_path.read_text())
        except (OSError, json.JSONDecodeError):
            record = None
        if isinstance(record, dict) and record.get("inputs_hash") == key:
            return index

    r = _Run(run_dir)
    config = r.json("config.json")
    if config is None:
        r.notes.append("Run header incomplete: config.json not found or unreadable.")
    recovery = r.json("transcoder/recovery.json")
    if recovery is None:
        r.missing("transcoder/recovery.json", "Loss recovered")
    contexts = r.parquet(
        "contexts.parquet", "Eval-context texts and split", ("context_id", "split")
    )
    scores = r.parquet("scores.parquet", "Detection-score distribution", ("latent",))
    explanations = None
    if r.path("explanations.parquet").is_file():
        from nlrw.explain import explanations_for

        explanations = explanations_for(run_dir)
    else:
        r.missing("explanations.parquet", "Explanations in the latent browser")
    keys = ["condition", "calibration", "quality", "choice", "fraction"]
    repeated = summary.height - summary.unique(subset=keys).height
    if repeated:
        r.notes.append(
            f"eval/summary.parquet repeats {repeated} condition keys ({', '.join(keys)}): the "
            "table lists every row, the headline figure shows their mean."
        )
    metrics = r.parquet(
        "calibration_metrics.parquet", "Per-latent calibration metrics", ("latent", "calibration")
    )
    if metrics is not None:
        present = set(metrics["calibration"].drop_nulls().to_list())
        absent = [c for c in _CALIBRATIONS if c not in present]
        if absent:
            r.notes.append(
                f"Calibrations not in this run: {', '.join(absent)} (calibrate stage options)."
            )
    model = _get(config, "config", "collect", "model")
    if model is None:
        collect_record = r.json("activations/collect.json")
        model = _get(collect_record, "config", "model")

    headline, diagnosis = _figures(cfg, r, summary, contexts, scores, metrics)
    browser = _browser(cfg, r, scores, explanations, contexts, metrics, model)
    items = _config_items(config, contexts)
    cards = _headline_cards(summary, recovery, r.json("eval.json"))
    times = _stage_times(r)
    notes = list(dict.fromkeys(r.notes))

    figures = [headline, *diagnosis, *(lat.scatter for lat in browser if lat.scatter)]
    for fig in figures:
        atomic_write(out / fig.name, lambda f, png=fig.png: f.write(png))
    names = {fig.name for fig in figures}
    for stale in out.glob("*.png"):
        if stale.name not in names:
            stale.unlink(missing_ok=True)
    atomic_write_text(
        out / "report.md",
        _render_md(
            run_dir, items, cards, recovery, headline, summary, diagnosis, browser, times, notes
        ),
    )
    atomic_write_text(
        index,
        _render_html(
            run_dir,
            config,
            items,
            cards,
            _recovery_html(recovery),
            headline,
            summary,
            diagnosis,
            browser,
            times,
            notes,
        ),
    )
    atomic_write_json(
        record_path,
        stage_record(
            "report",
            cfg,
            inputs_hash=key,
            figures=sorted(names),
            browsed_latents=[lat.latent for lat in browser],
            notes=notes,
            seconds=time.perf_counter() - started,
        ),
    )
    return index
