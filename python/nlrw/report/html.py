"""The report as one self-contained HTML page: no network, no JavaScript.

The stylesheet is package data (``report.css``, inlined), every figure is embedded as a
base64 PNG data URI, every text from the run is escaped, and tokens are spans whose
background shows their activation; the page opens from a file or an e-mail attachment.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import polars as pl

from nlrw.report.browser import Latent, Rated
from nlrw.report.content import (
    CLAIM_ALPHA,
    SYNTHETIC_HEAD,
    TABLE_HEAD,
    condition_rows,
    decomposition,
    metrics_line,
    synthetic_rows,
)
from nlrw.report.figures import ReportFigure
from nlrw.report.format import (
    BASELINE_LABELS,
    CONTROL_CHAR,
    finite,
    fmt,
    fmt_recovered,
    printable,
)
from nlrw.report.load import lookup
from nlrw.report.paper import PaperTable


def _css() -> str:
    """The page's stylesheet: ``report.css``, shipped beside this module."""
    return resources.files("nlrw.report").joinpath("report.css").read_text(encoding="utf-8")


def png_data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for embedding a PNG in HTML."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _token_text_html(text: str) -> str:
    """A decoded token as HTML: control characters shown as muted symbols."""
    parts = []
    for ch in text:
        if ch == "\n":
            parts.append('<span class="ctl">↵</span>')
        elif ch == "\t":
            parts.append('<span class="ctl">⇥</span>')
        elif CONTROL_CHAR.match(ch):
            parts.append(f'<span class="ctl">{_esc(printable(ch))}</span>')
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


def _figure_html(fig: ReportFigure) -> str:
    return (
        f'<figure><img src="{png_data_uri(fig.png)}" alt="{_esc(fig.alt)}">'
        f"<figcaption>{_esc(fig.caption)}</figcaption></figure>"
    )


def _significant(summary_row: dict[str, Any]) -> bool:
    p = summary_row.get("p_value_holm")
    return isinstance(p, float) and p < CLAIM_ALPHA and summary_row["condition"] != "zero_ablation"


def _table_html(summary: pl.DataFrame, labels: Mapping[str, str]) -> str:
    head = "".join(
        f'<th class="{"l" if i < 3 else ""}">{_esc(h)}</th>' for i, h in enumerate(TABLE_HEAD)
    )
    body = []
    for (baseline, cells), row in zip(
        condition_rows(summary, labels), summary.iter_rows(named=True), strict=True
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


def _paper_html(paper: PaperTable) -> str:
    """The report's opening: the paper's table in miniature, its notes and the findings."""
    head = "".join(
        f'<th class="{"l" if i < 2 else ""}">{_esc(h)}</th>' for i, h in enumerate(paper.head)
    )
    body = []
    for row in paper.rows:
        tds = []
        for i, cell in enumerate(row.cells):
            classes = ["l"] if i < 2 else []
            if row.kind == "control":
                classes.append("ctl")
            if row.significant and i in (4, 6):
                classes.append("sig")
            text = f"<b>{_esc(cell)}</b>" if row.kind == "simulated" and i == 0 else _esc(cell)
            tds.append(f'<td class="{" ".join(classes)}">{text}</td>')
        body.append(f'<tr class="{"base" if row.kind == "baseline" else ""}">{"".join(tds)}</tr>')
    return (
        "<h2>The paper's table in miniature</h2>"
        f'<table class="wide"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
        + "".join(f'<p class="sub">{_esc(n)}</p>' for n in paper.notes)
        + f'<p class="findings"><b>What this run reproduces.</b> {_esc(paper.paragraph)}</p>'
    )


def _synthetic_html(summary: pl.DataFrame, labels: Mapping[str, str]) -> str:
    rows, sentences = synthetic_rows(summary, labels)
    if not rows:
        return ""
    head = "".join(f"<th>{_esc(h)}</th>" for h in SYNTHETIC_HEAD)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return (
        "<h2>Synthetic simulators</h2>"
        '<p class="sub">A positive control without LLM: scores made from the true '
        "activations with seeded noise tuned to each AUROC, for every latent of the coder, "
        "calibrated and rewritten like the real simulations.</p>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        + "".join(f'<p class="sub">{_esc(t)}</p>' for t in sentences)
    )


def _marked_html(token: str) -> str:
    """The marked token; a token of spaces only shows as ``␣`` so that the box is not empty."""
    if token and set(token) == {" "}:
        return "␣" * len(token)
    return _token_text_html(token)


def _rated_html(rated: Sequence[Rated]) -> str:
    out = []
    for r in rated:
        *before, last = r.tokens or ["∅"]
        cls = "fp" if r.true_activation <= 0 else "tp"
        out.append(
            f'<div class="window"><span class="rk">ctx {r.context_id}</span>'
            f"{''.join(f'<span class=tok>{_token_text_html(t)}</span>' for t in before)}"
            f'<span class="tok marked">{_marked_html(last)}</span>'
            f'  <span class="{cls}">score {fmt(r.expected_value, 2)} · true '
            f"{fmt(r.true_activation)}</span></div>"
        )
    return "".join(out)


def _latent_html(lat: Latent) -> str:
    head = (
        f'<h3>Latent {lat.latent}<span class="badge {lat.label}">{_esc(lat.label)}</span></h3>'
        f'<div class="stats">{_esc(metrics_line(lat.metrics))}</div>'
    )
    if lat.explanation:
        expl = f'<blockquote class="expl">{_esc(printable(lat.explanation))}</blockquote>'
    else:
        expl = '<blockquote class="expl none">no usable explanation</blockquote>'
    cal = ""
    if lat.calibration:
        rows = "".join(
            f'<tr><td class="l">{_esc(c["calibration"])}</td><td>{fmt(c.get("pearson"))}</td>'
            f"<td>{fmt(c.get('specificity'))}</td><td>{fmt(c.get('sensitivity'))}</td>"
            f"<td>{fmt(c.get('auroc'))}</td></tr>"
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
            f'<div class="window"><span class="rk">#{w.rank + 1} · {fmt(w.max_activation, 2)}'
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


def _recovery_html(recovery: dict[str, Any] | None, coder: str) -> str:
    result = (recovery or {}).get("result")
    if not isinstance(result, dict):
        return ""
    rows = [
        ("clean", result.get("ce_clean")),
        (coder, result.get("ce_transcoder")),
        ("zero ablation", result.get("ce_zero")),
    ]
    body = "".join(f'<tr><td class="l">{k}</td><td>{fmt(v, 4)}</td></tr>' for k, v in rows)
    return (
        '<table><thead><tr><th class="l">splice on every position</th><th>mean CE</th></tr>'
        f"</thead><tbody>{body}</tbody></table>"
        f'<p class="sub">Loss recovered 1 − (CE<sub>{_esc(coder)}</sub> − CE<sub>clean</sub>) / '
        f"(CE<sub>zero</sub> − CE<sub>clean</sub>) = <b>{_esc(fmt_recovered(result))}</b> over "
        f"{_esc(result.get('n_tokens', '?'))} held-out tokens "
        "(transcoder/recovery.json).</p>"
    )


def render_html(
    run_dir: Path,
    config: dict[str, Any] | None,
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
    """``index.html``: the stylesheet inline, every figure a data URI, no script; it opens
    with the cards and the paper's table in miniature."""
    kv = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in items)
    notes_html = "".join(f'<div class="note">{_esc(n)}</div>' for n in notes)
    times_html = ""
    if times:
        rows = "".join(
            f'<tr><td class="l">{_esc(n)}</td><td class="l">{_esc(s)}</td>'
            f"<td>{fmt(sec, 1) if finite(sec) else ''}</td></tr>"
            for n, s, sec in times
        )
        total = sum(sec for _, _, sec in times if finite(sec))
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
<style>
{_css()}</style>
</head>
<body>
<main>
<h1>nlrw report: {_esc(run_dir.name)}</h1>
<p class="sub">Partially rewriting a transformer in natural language: how much next-token loss
rises when transcoder latents are replaced by an LLM's simulation of them from their
explanations. Run directory <code>{_esc(run_dir)}</code>.</p>
{_cards_html(cards)}
{notes_banner}
{_paper_html(paper)}
<h2>Run</h2>
<dl class="kv">{kv}</dl>
{_recovery_html(recovery, labels["transcoder"])}
{config_dump}
<h2>Mean CE by fraction simulated</h2>
{_figure_html(headline)}
<h2>Every condition</h2>
{_table_html(summary.filter(pl.col("condition") != "synthetic"), labels)}
{"".join(f'<p class="sub">{_esc(t)}</p>' for t in decomposition(summary, labels))}
{_synthetic_html(summary, labels)}
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
<footer>Written by nlrw {_esc(lookup(config, "versions", "nlrw") or "")} · self-contained: every
figure is embedded; nothing is loaded from the network.</footer>
</main>
</body>
</html>
"""
