"""The report's opening: the paper's table in miniature, and which of its findings the run
reproduces.

:func:`paper_table` is a pure function of the evaluate stage's summary and ``eval.json``: the
rows of Paulo & Belrose (2025)'s table (clean, the coder, zero ablation, random active latents,
the top 20% and all of the simulated latents per calibration, with the shuffled and matched-zero
controls under each) with mean CE and Δ to zero ablation (CIs, p-values) beside the paper's
numbers (:data:`PAPER_CE`), and a paragraph worded only from those numbers: each of the paper's
findings is "yes", "no", "unclear" or "not measured" by the paired 95% CI of Δ, and similarity
to zero ablation by the summary's equivalence test (TOST). :mod:`nlrw.report.html` and
:mod:`nlrw.report.markdown` render it first, after the cards.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import polars as pl

from nlrw.report.content import CLAIM_ALPHA
from nlrw.report.format import (
    BASELINES,
    as_float,
    baseline_labels,
    calibration_order,
    finite,
    fmt,
    fmt_ci,
    fmt_fraction,
    fmt_p,
    fmt_share,
)

PAPER_CE: dict[tuple[str, str | None, float | None], float] = {
    ("clean", None, None): 3.197,
    ("transcoder", None, None): 3.218,
    ("zero_ablation", None, None): 3.387,
    ("simulated", "uncalibrated", 0.2): 5.535,
    ("simulated", "uncalibrated", 1.0): 7.259,
}
"""The paper's mean CE in nats, keyed by (condition, calibration, fraction): Paulo & Belrose
(2025), a skip transcoder of Pythia-160M's layer-6 MLP, 1,000 Pile contexts, the top latents
by detection score (``../shared/PROTOCOL.md``, "Their numbers")."""

PAPER_SIMILAR = {("simulated", "quantile")}
"""Rows for which the paper reports no number but "statistically similar to zero ablation"."""

PAPER_FRACTIONS = (0.2, 1.0)
"""The paper's headline fractions: the top 20% of the latents simulated, and all of them."""

COVERAGE_TARGET = 0.9
"""Share of the coder's true top-k activation mass the simulated latents must hold for "all
latents simulated" to be a rewrite of (nearly) the whole layer (issue 16)."""

PAPER_HEAD = (
    "condition",
    "calibration",
    "latents",
    "mean CE [95% CI]",
    "Δ vs zero ablation [95% CI]",
    "p",
    "p (Holm)",
    "paper: CE (Δ)",
)

PAPER_CONTROLS = {"shuffled": "shuffled explanations", "matched_zero": "matched zero"}
"""The controls shown under each simulated row of the paper's table, with their labels: what
the explanations add (shuffled) and the zero ablation of just the rewritten latents (matched
zero). The oracles are in the full table and the decomposition sentence under it."""


class PaperRow(NamedTuple):
    """One row of the paper's table: ``kind`` is "baseline", "simulated" or "control"."""

    kind: str
    cells: tuple[str, ...]
    significant: bool
    """Holm-adjusted p < :data:`CLAIM_ALPHA` (the renderers may emphasise it)."""


class Finding(NamedTuple):
    """One of the paper's findings checked on this run."""

    claim: str
    verdict: str
    """"yes" (reproduced), "no" (significantly the other way, or not similar where the paper
    says similar), "unclear" (neither shown) or "not measured" (the run lacks the row)."""
    evidence: str


class PaperTable(NamedTuple):
    """The report's opening: the table, the sentences under it, the findings and the
    paragraph that words them."""

    head: tuple[str, ...]
    rows: list[PaperRow]
    notes: list[str]
    findings: list[Finding]
    paragraph: str


def _same(col: str, value: Any) -> pl.Expr:
    if value is None:
        return pl.col(col).is_null() | (pl.col(col).cast(pl.Utf8) == "")
    if isinstance(value, float):
        return (pl.col(col) - value).abs() < 1e-9
    return pl.col(col) == value


def _pick(
    summary: pl.DataFrame,
    condition: str,
    calibration: str | None = None,
    fraction: float | None = None,
    choice: str | None = None,
) -> dict[str, Any] | None:
    """The first summary row of a (condition, calibration, fraction, choice), quality unset;
    baselines by condition alone."""
    rows = summary.filter(pl.col("condition") == condition)
    if condition not in BASELINES:
        rows = rows.filter(
            _same("calibration", calibration), _same("fraction", fraction), _same("choice", choice)
        )
        if "quality" in rows.columns:
            rows = rows.filter(pl.col("quality").is_null())
    return rows.row(0, named=True) if rows.height else None


def _paper_cell(condition: str, calibration: str | None, fraction: float | None) -> str:
    ce = PAPER_CE.get((condition, calibration, fraction))
    zero = PAPER_CE[("zero_ablation", None, None)]
    if ce is not None:
        return fmt(ce) if condition == "zero_ablation" else f"{fmt(ce)} ({ce - zero:+.3f})"
    if (condition, calibration) in PAPER_SIMILAR:
        return "≈ zero ablation"
    return "—"


def _paper_cells(kind: str, label: str, r: dict[str, Any], paper: str) -> PaperRow:
    zero = r["condition"] == "zero_ablation"
    n = r.get("n_simulated_latents")
    return PaperRow(
        kind,
        (
            label,
            r.get("calibration") or "",
            "" if kind == "baseline" or n is None else f"{n:,}",
            f"{fmt(r['mean_ce'])} {fmt_ci(r['ci_low'], r['ci_high'])}",
            ""
            if zero
            else (
                f"{r['diff_vs_zero']:+.3f} {fmt_ci(r.get('diff_ci_low'), r.get('diff_ci_high'))}"
                if finite(r.get("diff_vs_zero"))
                else "—"
            ),
            "" if zero else fmt_p(r.get("p_value")),
            "" if zero else fmt_p(r.get("p_value_holm")),
            paper,
        ),
        not zero and finite(r.get("p_value_holm")) and r["p_value_holm"] < CLAIM_ALPHA,
    )


def _delta(r: dict[str, Any]) -> str:
    return f"Δ {r['diff_vs_zero']:+.3f} {fmt_ci(r.get('diff_ci_low'), r.get('diff_ci_high'))}"


def _off(r: dict[str, Any]) -> str | None:
    """ "worse" or "better" than zero ablation where the 95% CI of Δ excludes 0, else None."""
    lo, hi = as_float(r.get("diff_ci_low")), as_float(r.get("diff_ci_high"))
    if lo is None or hi is None:
        return None
    return "worse" if lo > 0 else "better" if hi < 0 else None


def _direction_finding(claim_text: str, r: dict[str, Any] | None, want: str) -> Finding:
    """``want`` ("better" or "worse" than zero ablation) read from the paired 95% CI of Δ."""
    if r is None:
        return Finding(claim_text, "not measured", "the run has no such row")
    if None in (as_float(r.get(c)) for c in ("diff_vs_zero", "diff_ci_low", "diff_ci_high")):
        return Finding(claim_text, "not measured", "no paired difference to zero ablation")
    found = _off(r)
    if found == want:
        return Finding(claim_text, "yes", _delta(r))
    if found is not None:
        return Finding(claim_text, "no", f"{found} than zero ablation, {_delta(r)}")
    return Finding(claim_text, "unclear", f"{_delta(r)} includes 0")


def _similar_finding(
    claim_text: str, r: dict[str, Any] | None, alpha: float, reference: dict[str, Any] | None
) -> Finding:
    """Similarity to zero ablation from the summary's TOST (Holm-adjusted, as the table's
    claims), else from whether the 95% CI of Δ lies inside the margin."""
    if r is None:
        return Finding(claim_text, "not measured", "the run has no such row")
    if None in (as_float(r.get(c)) for c in ("diff_vs_zero", "diff_ci_low", "diff_ci_high")):
        return Finding(claim_text, "not measured", "no paired difference to zero ablation")
    margin = as_float(r.get("equivalence_margin"))
    within = f"±{margin:.3f} nats" if margin is not None else "a margin"
    extra = ""
    if reference is not None and finite(reference.get("mean_ce")) and finite(r.get("mean_ce")):
        extra = f"; mean CE {fmt(r['mean_ce'])} against uncalibrated's {fmt(reference['mean_ce'])}"
    off = _off(r)
    p, p_holm = as_float(r.get("p_equivalent")), r.get("p_equivalent_holm")
    if r.get("equivalent_to_zero") is True:
        return Finding(
            claim_text,
            "yes",
            f"TOST within {within} passes (p (Holm) {fmt_p(p_holm)}), {_delta(r)}{extra}",
        )
    if p is not None:
        tost = f"TOST within {within}: p {fmt_p(p)}, p (Holm) {fmt_p(p_holm)}"
        if p < alpha:
            return Finding(
                claim_text,
                "unclear",
                f"{tost}: it passes unadjusted, not after Holm's adjustment; {_delta(r)}{extra}",
            )
        if off is not None:
            return Finding(
                claim_text, "no", f"{off} than zero ablation, {_delta(r)}; {tost}{extra}"
            )
        return Finding(claim_text, "unclear", f"{tost} fails, {_delta(r)}{extra}")
    lo, hi = r["diff_ci_low"], r["diff_ci_high"]
    if margin is not None and -margin < lo and hi < margin:
        return Finding(claim_text, "yes", f"{_delta(r)} inside {within} (no TOST){extra}")
    if off is not None:
        return Finding(claim_text, "no", f"{off} than zero ablation, {_delta(r)}{extra}")
    return Finding(
        claim_text, "unclear", f"{_delta(r)} includes 0, no equivalence test shows it{extra}"
    )


def paper_table(summary: pl.DataFrame, evaluation: dict[str, Any] | None) -> PaperTable:
    """The paper's table in miniature from the evaluate stage's summary and ``eval.json``:
    clean, the coder, zero ablation, random active latents, then per calibration (in the
    report's order) the top 20% and all of the simulated latents (choice "top", else the one
    the run has), each followed by its controls (:data:`PAPER_CONTROLS`) where they
    exist; beside the paper's numbers (:data:`PAPER_CE`). The findings and the paragraph are
    worded from the rows' CIs and tests, nothing else."""
    evaluation = evaluation or {}
    sae = evaluation.get("coder_kind") == "sae"
    labels = baseline_labels(evaluation)
    coder = f"the {labels['transcoder']}"
    rows: list[PaperRow] = []
    base: dict[str, dict[str, Any] | None] = {}
    for condition in BASELINES:
        r = base[condition] = _pick(summary, condition)
        if r is not None:
            rows.append(
                _paper_cells("baseline", labels[condition], r, _paper_cell(condition, None, None))
            )
    simulated = summary.filter(pl.col("condition") == "simulated")
    calibrations = sorted(
        {c for c in simulated["calibration"].to_list() if c}, key=calibration_order
    )
    controls = [c for c in PAPER_CONTROLS if c in set(summary["condition"].to_list())]
    picked: dict[tuple[str, float], dict[str, Any]] = {}
    for cal in calibrations:
        choices = set(simulated.filter(pl.col("calibration") == cal)["choice"].to_list())
        choice = "top" if "top" in choices else min((c for c in choices if c), default=None)
        for f in PAPER_FRACTIONS:
            r = _pick(summary, "simulated", cal, f, choice)
            if r is None:
                continue
            picked[(cal, f)] = r
            what = (
                "all" if f == 1.0 else f"{'top' if choice == 'top' else choice} {fmt_fraction(f)}"
            )
            rows.append(
                _paper_cells("simulated", f"{what} simulated", r, _paper_cell("simulated", cal, f))
            )
            for c in controls:
                rc = _pick(summary, c, cal, f, choice)
                if rc is not None:
                    rows.append(_paper_cells("control", f"↳ {PAPER_CONTROLS[c]}", rc, "—"))

    n_sim, n_all = evaluation.get("n_simulated_latents"), evaluation.get("num_latents")
    partial = isinstance(n_sim, int) and isinstance(n_all, int) and n_sim < n_all
    notes = [
        (
            f"Fractions are of the {n_sim:,} simulated latents out of the coder's {n_all:,}: "
            "every other latent keeps its true value."
            if partial
            else f"Fractions are of all {n_all:,} latents of the coder."
            if isinstance(n_all, int)
            else "Fractions are of the simulated latents."
        )
        + " Latents: how many were rewritten; the controls (↳) rewrite the same ones.",
        "Δ: mean paired difference to zero ablation on the same contexts, with its bootstrap 95% "
        "CI; p: two-sided sign-flip test; p (Holm): adjusted over every row of the full table.",
        "Paper: Paulo & Belrose (2025), a skip transcoder of Pythia-160M's layer-6 MLP on 1,000 "
        "Pile contexts, uncalibrated unless said (PROTOCOL.md), Δ to its zero ablation in "
        "brackets; another model and text, so compare the sign and size of Δ, not the CE."
        + (" This run's coder is an SAE: the paper's SAE variant behaves the same." if sae else ""),
    ]

    config = evaluation.get("config")
    alpha = as_float(config.get("alpha")) if isinstance(config, dict) else None
    findings = [
        _direction_finding(f"{coder} beats zero ablation", base["transcoder"], "better"),
        _direction_finding(
            "uncalibrated simulation of the top 20% of the latents is worse than zero ablation",
            picked.get(("uncalibrated", 0.2)),
            "worse",
        ),
        _direction_finding(
            "uncalibrated simulation of all latents is worse than zero ablation",
            picked.get(("uncalibrated", 1.0)),
            "worse",
        ),
        _similar_finding(
            "quantile normalization brings all latents simulated back to about zero ablation",
            picked.get(("quantile", 1.0)),
            CLAIM_ALPHA if alpha is None else alpha,
            picked.get(("uncalibrated", 1.0)),
        ),
    ]
    return PaperTable(
        PAPER_HEAD, rows, notes, findings, _paragraph(findings, base, evaluation, partial, coder)
    )


def _paragraph(
    findings: list[Finding],
    base: dict[str, dict[str, Any] | None],
    evaluation: dict[str, Any],
    partial: bool,
    coder: str,
) -> str:
    """The findings in words, with the layer's range and the coverage that qualify them."""
    measured = [f for f in findings if f.verdict != "not measured"]
    by = {v: [f.claim for f in findings if f.verdict == v] for v in ("yes", "no", "unclear")}
    parts = [
        f"Of the paper's {len(findings)} findings checked here this run reproduces "
        f"{len(by['yes'])}"
        + (f" and contradicts {len(by['no'])}" if by["no"] else "")
        + (f"; {len(by['unclear'])} stay unclear" if by["unclear"] else "")
        + (
            f"; {len(findings) - len(measured)} cannot be checked (rows missing)"
            if len(measured) < len(findings)
            else ""
        )
        + " (paired 95% CIs of Δ to zero ablation; similarity from the equivalence test)."
    ]
    for f in findings:
        claim_text = f.claim[0].upper() + f.claim[1:]
        parts.append(f"{claim_text}: {f.verdict}, {f.evidence}.")
    clean, reconstruction, zero = base["clean"], base["transcoder"], base["zero_ablation"]
    paper_zero = PAPER_CE[("zero_ablation", None, None)]
    if clean is not None and zero is not None and finite(clean.get("diff_vs_zero")):
        text = (
            f"The layer's range: zero ablation costs {-clean['diff_vs_zero']:+.3f} nats over the "
            f"clean model (paper {paper_zero - PAPER_CE[('clean', None, None)]:+.3f})"
        )
        if reconstruction is not None and finite(reconstruction.get("diff_vs_zero")):
            text += (
                f" and {coder} sits {-reconstruction['diff_vs_zero']:.3f} below it (paper "
                f"{paper_zero - PAPER_CE[('transcoder', None, None)]:.3f})"
            )
        parts.append(text + ".")
    coverage = as_float(evaluation.get("coverage"))
    n_sim, n_all = evaluation.get("n_simulated_latents"), evaluation.get("num_latents")
    if coverage is not None and 0.0 <= coverage <= 1.0:
        text = (
            f"The simulated latents hold {fmt_share(coverage)} of the coder's true top-k "
            "activation mass on the eval contexts"
        )
        if coverage < COVERAGE_TARGET:
            text += (
                f", under the {fmt_share(COVERAGE_TARGET)} at which rewriting all simulated "
                "latents is a rewrite of the layer: the rest keep their true values, so these "
                "rows measure a partial rewrite"
            )
        parts.append(text + ".")
    elif partial:
        parts.append(
            f"Coverage not recorded; {n_sim:,} of {n_all:,} latents were simulated and the rest "
            "keep their true values, so these rows measure a partial rewrite."
        )
    return " ".join(parts)
