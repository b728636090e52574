"""The report as Markdown (``report.md``): the page's content, the PNGs linked beside it.

Tables are pipe tables (cells with control characters escaped and pipes and newlines made
safe), a browsed latent's active tokens are wrapped ``<<like this>>`` in code spans.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from nlrw.report.browser import Latent
from nlrw.report.content import (
    SYNTHETIC_HEAD,
    TABLE_HEAD,
    condition_rows,
    decomposition,
    metrics_line,
    synthetic_rows,
)
from nlrw.report.figures import ReportFigure
from nlrw.report.format import BASELINE_LABELS, finite, fmt, fmt_recovered, printable
from nlrw.report.paper import PaperTable


def _md_cell(text: str) -> str:
    return printable(text).replace("|", "\\|").replace("\n", " ")


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
    return printable("".join(out)).replace("`", "'")


def _table_md(summary: pl.DataFrame, labels: Mapping[str, str]) -> str:
    lines = [
        "| " + " | ".join(TABLE_HEAD) + " |",
        "|" + "|".join(":--" if i < 3 else "--:" for i in range(len(TABLE_HEAD))) + "|",
    ]
    for _, cells in condition_rows(summary, labels):
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def _synthetic_md(summary: pl.DataFrame, labels: Mapping[str, str]) -> list[str]:
    rows, sentences = synthetic_rows(summary, labels)
    if not rows:
        return []
    lines = [
        "## Synthetic simulators",
        "",
        "| " + " | ".join(SYNTHETIC_HEAD) + " |",
        "|" + "|".join("--" for _ in SYNTHETIC_HEAD) + "|",
    ]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return [*lines, "", *sentences, ""]


def _paper_md(paper: PaperTable) -> list[str]:
    """The report's opening: the paper's table in miniature, its notes and the findings."""
    lines = [
        "## The paper's table in miniature",
        "",
        "| " + " | ".join(paper.head) + " |",
        "|" + "|".join(":--" if i < 2 else "--:" for i in range(len(paper.head))) + "|",
    ]
    for row in paper.rows:
        cells = [_md_cell(c) for c in row.cells]
        if row.kind == "simulated":
            cells[0] = f"**{cells[0]}**"
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for note in paper.notes:
        lines += [note, ""]
    return [*lines, f"**What this run reproduces.** {paper.paragraph}", ""]


def _latent_md(lat: Latent) -> str:
    lines = [f"### Latent {lat.latent} ({lat.label})", "", metrics_line(lat.metrics), ""]
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
                f"| {c['calibration']} | {fmt(c.get('pearson'))} | "
                f"{fmt(c.get('specificity'))} | {fmt(c.get('sensitivity'))} |"
            )
        lines.append("")
    if lat.scatter is not None:
        lines += [f"![{lat.scatter.alt}]({lat.scatter.name})", ""]
    return "\n".join(lines)


def render_md(
    run_dir: Path,
    items: list[tuple[str, Any]],
    cards: list[tuple[str, str, str]],
    paper: PaperTable,
    recovery: dict[str, Any] | None,
    headline: ReportFigure,
    summary: pl.DataFrame,
    diagnosis: list[ReportFigure],
    browser: list[Latent],
    times: list[tuple[str, str, Any]],
    notes: list[str],
    labels: Mapping[str, str] = BASELINE_LABELS,
) -> str:
    """``report.md``: the page's content, its figures linked as the PNGs beside it; it opens
    with the cards and the paper's table in miniature."""
    lines = [f"# nlrw report: {run_dir.name}", ""]
    if cards:
        lines += ["| " + " | ".join(k for k, _, _ in cards) + " |"]
        lines += ["|" + "|".join("--:" for _ in cards) + "|"]
        lines += ["| " + " | ".join(f"{v} {c}".strip() for _, v, c in cards) + " |", ""]
    lines += _paper_md(paper)
    lines += ["## Run", ""]
    lines += [f"- **{k}**: {_md_cell(str(v))}" for k, v in items]
    lines.append("")
    result = (recovery or {}).get("result")
    if isinstance(result, dict):
        lines += [
            f"Loss recovered by the {labels['transcoder']}: {fmt_recovered(result)} "
            f"(CE clean {fmt(result.get('ce_clean'), 4)}, {labels['transcoder']} "
            f"{fmt(result.get('ce_transcoder'), 4)}, zero {fmt(result.get('ce_zero'), 4)}; "
            f"{result.get('n_tokens', '?')} held-out tokens).",
            "",
        ]
    lines += [
        "## Mean CE by fraction simulated",
        "",
        f"![{headline.alt}]({headline.name})",
        "",
        headline.caption,
        "",
    ]
    lines += [
        "## Every condition",
        "",
        _table_md(summary.filter(pl.col("condition") != "synthetic"), labels),
        "",
        *[f"{t}\n" for t in decomposition(summary, labels)],
        *_synthetic_md(summary, labels),
    ]
    lines += ["## Diagnosis", ""]
    for f in diagnosis:
        lines += [f"![{f.alt}]({f.name})", "", f.caption, ""]
    lines += ["## Latent browser", ""]
    lines += [_latent_md(lat) for lat in browser]
    if times:
        lines += ["## Stages", "", "| stage | state | seconds |", "|:--|:--|--:|"]
        lines += [f"| {n} | {s} | {fmt(sec, 1) if finite(sec) else ''} |" for n, s, sec in times]
        lines.append("")
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)
