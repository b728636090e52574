"""The report's figures: matplotlib's Agg renderer to PNG bytes, no pyplot state.

One function per figure takes the tables it plots and returns PNG bytes (matplotlib is
imported only when a figure is drawn); :func:`page_figures` decides which of them the run's
inputs allow and words their captions. The same inputs give the same bytes: the PNGs carry
no date or software metadata.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import polars as pl

from nlrw.config.report import ReportConfig
from nlrw.report.format import (
    BASELINE_LABELS,
    BASELINES,
    calibration_order,
    choice_label,
    finite,
    fmt,
    fmt_fraction,
)
from nlrw.report.load import Run, ScoreHistogram, eval_context_ids, simulated_score_histogram

_BASELINE_COLORS = {
    "clean": "#222222",
    "transcoder": "#7f7f7f",
    "zero_ablation": "#d62728",
    "random_k": "#8c564b",
}
_CALIBRATION_COLORS = {
    "uncalibrated": "#ff7f0e",
    "quantile": "#1f77b4",
    "isotonic": "#2ca02c",
    "gate": "#9467bd",
}
_EXTRA_COLORS = ("#17becf", "#bcbd22", "#e377c2", "#8c564b")
_ACTIVE_COLOR = "#e6550d"
_INACTIVE_COLOR = "#3182bd"


def _calibration_color(name: str, others: Sequence[str]) -> str:
    if name in _CALIBRATION_COLORS:
        return _CALIBRATION_COLORS[name]
    extra = sorted(o for o in others if o not in _CALIBRATION_COLORS)
    return _EXTRA_COLORS[extra.index(name) % len(_EXTRA_COLORS)] if name in extra else "#333333"


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _png(fig: Any, dpi: int) -> bytes:
    buffer = io.BytesIO()
    # No Software/date metadata: the same inputs give the same bytes.
    fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return buffer.getvalue()


class ReportFigure(NamedTuple):
    """A figure of the page: written beside it as a PNG and embedded in it."""

    name: str
    """File name under report/."""
    png: bytes
    alt: str
    caption: str


def _thinned_labels(fractions: Sequence[float], min_gap: float = 0.15) -> set[float]:
    """Fractions whose tick gets a label: at least ``min_gap`` decades from the previous
    labelled one (0.6 / 0.8 / 1.0 would overlap), the largest always."""
    labelled: list[float] = []
    for f in sorted(fractions, reverse=True):
        if not labelled or math.log10(labelled[-1]) - math.log10(f) >= min_gap:
            labelled.append(f)
    return set(labelled)


def headline_figure(
    summary: pl.DataFrame,
    dpi: int,
    *,
    paired: bool = False,
    labels: Mapping[str, str] = BASELINE_LABELS,
) -> bytes:
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
    calibrations = sorted(set(sim["calibration"].to_list()), key=calibration_order)
    choices = sorted(
        set(sim["choice"].to_list()), key=lambda c: ({"top": 0, "random": 1}.get(c, 2), c)
    ) or [""]
    fractions = sorted({float(f) for f in sim["fraction"].to_list() if finite(f) and f > 0})
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
        for condition in BASELINES:
            rows = summary.filter(pl.col("condition") == condition)
            if rows.height == 0:
                continue
            row = rows.row(0, named=True)
            if not finite(row[value]):
                continue
            color = _BASELINE_COLORS[condition]
            if finite(row[low]) and finite(row[high]) and row[low] != row[high]:
                ax.axhspan(row[low], row[high], color=color, alpha=0.08, linewidth=0)
            line = ax.axhline(
                row[value],
                color=color,
                linestyle=(0, (2, 2)) if condition == "random_k" else "-",
                linewidth=1.1,
                zorder=1,
            )
            handles.setdefault(f"{labels[condition]} ({fmt(row[value])})", line)
        if fractions:
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(FixedLocator(fractions))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_major_formatter(
                FuncFormatter(lambda v, _: fmt_fraction(v) if v in labelled else "")
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
        ax.set_title(f"latents chosen {choice_label(choice)}" if choice else "simulated latents")
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


def simulated_scores_figure(h: ScoreHistogram, dpi: int) -> bytes:
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
            label=f"{label} (n={n:,}, mean {fmt(mean, 2)})",
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
    calibrations = sorted(present, key=calibration_order)
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
    calibrations = sorted(present, key=calibration_order)
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
    names = sorted(series, key=calibration_order)
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


def frontier_figure(
    summary: pl.DataFrame,
    real_auroc: float | None,
    dpi: int,
    labels: Mapping[str, str] = BASELINE_LABELS,
) -> bytes:
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
                label=labels[condition],
            )
    if real_auroc is not None:
        ax.axvline(real_auroc, color="#555555", linestyle=":", label="this run's simulator")
    ax.set_xlabel("simulator quality: AUROC of active vs inactive contexts")
    ax.set_ylabel("mean next-token CE (nats)")
    fraction = curves["fraction"].max() if curves.height else None
    ax.set_title(
        f"Synthetic simulators, {fmt_fraction(fraction)} of all latents rewritten"
        if fraction is not None
        else "Synthetic simulators"
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig, dpi)


def page_figures(
    cfg: ReportConfig,
    run: Run,
    summary: pl.DataFrame,
    contexts: pl.DataFrame | None,
    scores: pl.DataFrame | None,
    metrics: pl.DataFrame | None,
    labels: Mapping[str, str] = BASELINE_LABELS,
) -> tuple[ReportFigure, list[ReportFigure]]:
    """The headline figure and the diagnosis figures that the inputs allow, with their
    captions; a missing or unreadable input leaves its figure out with a note."""
    headline = ReportFigure(
        "headline.png",
        headline_figure(summary, cfg.dpi, labels=labels),
        "mean CE vs fraction of latents simulated",
        "Mean next-token CE on the eval contexts when a fraction of the simulated latents is "
        "replaced by simulated values (left: the latents with the best detection scores first; "
        "right: latents chosen at random). Bands: bootstrap 95% CIs. Horizontal lines and "
        "bands: the baselines.",
    )
    diagnosis: list[ReportFigure] = []
    if {"diff_vs_zero", "diff_ci_low", "diff_ci_high"} <= set(summary.columns) and (
        summary.filter(pl.col("condition") == "simulated")["diff_vs_zero"].drop_nulls().len()
    ):
        diagnosis.append(
            ReportFigure(
                "headline_paired.png",
                headline_figure(summary, cfg.dpi, paired=True, labels=labels),
                "paired difference to zero ablation vs fraction of latents simulated",
                "The headline as paired differences: per context, CE of the condition minus CE "
                "with zero ablation, averaged, with its bootstrap 95% CI. Below 0: better than "
                "zero ablation. The spread of CE across contexts cancels here, so small effects "
                "that the CIs of the means above hide are visible.",
            )
        )
    sims = run.path("simulations.parquet")
    if sims.is_file():
        eval_ids = eval_context_ids(contexts)
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
                ReportFigure(
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
            ReportFigure(
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
                ReportFigure(
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
            ReportFigure(
                "frontier.png",
                frontier_figure(summary, real, cfg.dpi, labels),
                "mean CE vs synthetic simulator quality",
                "Synthetic simulators (no LLM): scores from the true activations with seeded "
                "noise tuned to each AUROC, for every latent of the coder, calibrated and "
                "rewritten like the real simulations. Where a line crosses zero ablation is "
                "how faithful a simulator must be for the rewrite to beat it." + where,
            )
        )
    if scores is not None:
        diagnosis.append(
            ReportFigure(
                "detection.png",
                detection_figure(scores, cfg.dpi),
                "detection balanced accuracy vs shuffled-explanation baseline",
                "Detection scoring: how well each explanation separates activating from "
                "non-activating windows, next to the same examples scored against another "
                "latent's explanation (dotted line: chance).",
            )
        )
    return headline, diagnosis
