"""What the report says, whatever the markup: the cells of its tables and its sentences.

The run's header rows, the headline cards (the first: the simulated latents' coverage), the
conditions table and the synthetic simulators' table (cells as strings), each comparison with
zero ablation in words (:func:`claim`), the decomposition of the rewrite's excess loss by the
oracle controls (:func:`decomposition`) and a browsed latent's metrics line; the paper's table
in miniature is :mod:`nlrw.report.paper`. :mod:`nlrw.report.html` and
:mod:`nlrw.report.markdown` render the same content, so the page and its Markdown twin cannot
disagree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import polars as pl

from nlrw.report.format import (
    BASELINE_LABELS,
    BASELINES,
    CONTROL_LABELS,
    as_float,
    baseline_labels,
    choice_label,
    finite,
    fmt,
    fmt_ci,
    fmt_fraction,
    fmt_p,
    fmt_share,
    loss_recovered,
)
from nlrw.report.load import lookup

CLAIM_ALPHA = 0.05
"""Level at which the report words a claim from a Holm-adjusted p-value."""


def claim(row: dict[str, Any]) -> str:
    """How a summary row compares with zero ablation, in words, from its tests (Holm-adjusted,
    at :data:`CLAIM_ALPHA`): "similar to zero ablation" only when the equivalence test (TOST
    within ±margin) passes, never from a large p-value; "better" / "worse" from the one-sided
    and two-sided tests; "inconclusive" otherwise. Empty for zero ablation itself."""
    if row["condition"] == "zero_ablation":
        return ""
    margin = row.get("equivalence_margin")
    within = f"within ±{margin:.3f} nats" if finite(margin) else ""
    better = finite(row.get("p_better_holm")) and row["p_better_holm"] < CLAIM_ALPHA
    worse = (
        finite(row.get("p_value_holm"))
        and row["p_value_holm"] < CLAIM_ALPHA
        and finite(row.get("diff_vs_zero"))
        and row["diff_vs_zero"] > 0
    )
    if row.get("equivalent_to_zero") is True:
        return f"{'better than, and ' if better else ''}similar to zero ablation ({within})"
    if better:
        return "better than zero ablation"
    if worse:
        return "worse than zero ablation"
    if not finite(row.get("p_equivalent")):
        return "no difference shown (no equivalence test)"
    return "inconclusive: neither a difference nor similarity shown"


TABLE_HEAD = (
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


def condition_rows(
    summary: pl.DataFrame, labels: Mapping[str, str] = BASELINE_LABELS
) -> list[tuple[bool, list[str]]]:
    """(is_baseline, cells) per summary row; ``labels`` name the baselines
    (:func:`~nlrw.report.format.baseline_labels`)."""
    out = []
    for r in summary.iter_rows(named=True):
        baseline = r["condition"] in BASELINES
        choice = choice_label(r["choice"])
        label = labels.get(r["condition"]) or CONTROL_LABELS.get(r["condition"], r["condition"])
        if r["condition"] == "synthetic" and finite(r.get("quality")):
            label = f"{label}, AUROC {r['quality']:g}"
        out.append(
            (
                baseline,
                [
                    label,
                    r["calibration"] or "",
                    choice,
                    fmt_fraction(r["fraction"]),
                    "" if r["n_simulated_latents"] is None else str(r["n_simulated_latents"]),
                    "" if r["n_contexts"] is None else str(r["n_contexts"]),
                    fmt(r["mean_ce"]),
                    fmt_ci(r["ci_low"], r["ci_high"]),
                    ""
                    if r["condition"] == "zero_ablation"
                    else (f"{r['diff_vs_zero']:+.3f}" if finite(r["diff_vs_zero"]) else "—"),
                    ""
                    if r["condition"] == "zero_ablation"
                    else fmt_ci(r["diff_ci_low"], r["diff_ci_high"]),
                    "" if r["condition"] == "zero_ablation" else fmt_p(r["p_value"]),
                    "" if r["condition"] == "zero_ablation" else fmt_p(r.get("p_value_holm")),
                    claim(r),
                ],
            )
        )
    return out


SYNTHETIC_HEAD = ("calibration", "AUROC", "mean CE", "95% CI", "Δ vs zero ablation", "claim")


def synthetic_rows(
    summary: pl.DataFrame, labels: Mapping[str, str] = BASELINE_LABELS
) -> tuple[list[list[str]], list[str]]:
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
            hits = group.filter(pl.col("mean_ce") <= ce)["quality"] if finite(ce) else []
            reached[c] = f"AUROC {min(hits):g}" if len(hits) else "none of the levels"
        sentences.append(
            f"{cal}: the rewrite of {fmt_fraction(largest)} of all latents reaches zero "
            f"ablation's mean CE from {reached['zero_ablation']}, the {labels['transcoder']}'s "
            f"from {reached['transcoder']}."
        )
        for r in group.iter_rows(named=True):
            rows.append(
                [
                    str(cal),
                    f"{r['quality']:g}",
                    fmt(r["mean_ce"]),
                    fmt_ci(r["ci_low"], r["ci_high"]),
                    f"{r['diff_vs_zero']:+.3f}" if finite(r["diff_vs_zero"]) else "—",
                    claim(r),
                ]
            )
    return rows, sentences


def decomposition(summary: pl.DataFrame, labels: Mapping[str, str] = BASELINE_LABELS) -> list[str]:
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
        if not all(finite(v) for v in excess.values()):
            continue
        magnitude, support = excess["oracle_support"], excess["oracle_magnitude"]
        dominant = "support error dominates" if support > magnitude else "magnitude error dominates"
        out.append(
            f"{cal}, {fmt_fraction(largest)} of the simulated latents: {excess['simulated']:+.3f} "
            f"nats over the {labels['transcoder']}; with the true support (magnitude error "
            f"alone) "
            f"{magnitude:+.3f}, with the true magnitudes (support error alone) {support:+.3f}: "
            f"{dominant}."
        )
    return out


def config_items(config: dict[str, Any] | None, contexts: pl.DataFrame | None) -> list[tuple]:
    """(label, value) rows of the run's header."""
    cfg = lookup(config, "config") or {}
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
        ("explainer", lookup(cfg, "explain", "model")),
        ("scorer", lookup(cfg, "score", "model")),
        ("simulator", lookup(cfg, "simulate", "model")),
    ]
    if contexts is not None and "split" in contexts.columns:
        counts = dict(contexts.group_by("split").len().iter_rows())
        items.append(
            (
                "eval contexts",
                f"{counts.get('eval', 0)} eval + {counts.get('calibration', 0)} calibration",
            )
        )
    versions = lookup(config, "versions")
    if isinstance(versions, dict):
        items.append(("versions", ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))))
    items.append(("git revision", lookup(config, "git_revision") or "unknown"))
    items.append(("config written", lookup(config, "written_at")))
    return [(k, v) for k, v in items if v is not None]


def headline_cards(
    summary: pl.DataFrame, recovery: dict[str, Any] | None, evaluation: dict[str, Any] | None
) -> list[tuple[str, str, str]]:
    """(title, value, detail) of the cards atop the page: the simulated latents' coverage
    (:func:`coverage_card`), the baselines' CE, the rewrite at the largest fraction
    (uncalibrated and best calibration), how many latents were simulated when not all of them,
    and the transcoder's loss recovered."""
    cards: list[tuple[str, str, str]] = [coverage_card(evaluation)]
    labels = baseline_labels(evaluation)
    n_simulated = (evaluation or {}).get("n_simulated_latents")
    num_latents = (evaluation or {}).get("num_latents")
    partial = (
        isinstance(n_simulated, int) and isinstance(num_latents, int) and n_simulated < num_latents
    )
    # evaluate.positions = all scores every position of the window: another quantity than
    # the paper's last-position CE, so every CE card says so.
    positions = (evaluation or {}).get("positions_per_context")
    scope = (
        f" · mean of {positions} positions" if isinstance(positions, int) and positions > 1 else ""
    )
    for condition in ("clean", "transcoder", "zero_ablation"):
        rows = summary.filter(pl.col("condition") == condition)
        if rows.height:
            r = rows.row(0, named=True)
            cards.append(
                (
                    f"CE {labels[condition]}",
                    fmt(r["mean_ce"]),
                    fmt_ci(r["ci_low"], r["ci_high"]) + scope,
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
            else f"{fmt_fraction(largest)} of the {of} replaced"
        )
        plain = at.filter(pl.col("calibration") == "uncalibrated")
        if plain.height:
            r = plain.row(0, named=True)
            cards.append(
                (
                    f"{what}, uncalibrated",
                    fmt(r["mean_ce"]),
                    f"{fmt_ci(r['ci_low'], r['ci_high'])}; {claim(r)}",
                )
            )
        calibrated = at.filter(pl.col("calibration") != "uncalibrated").sort("mean_ce")
        if calibrated.height:
            r = calibrated.row(0, named=True)
            cards.append(
                (
                    f"{what}, best calibration",
                    fmt(r["mean_ce"]),
                    f"{r['calibration']} {fmt_ci(r['ci_low'], r['ci_high'])}; {claim(r)}",
                )
            )
    if partial:
        kept = (evaluation or {}).get("never_simulated_active_fraction")
        detail = "every other latent keeps its true activation"
        if isinstance(kept, float) and finite(kept):
            detail += f", {100 * kept:.1f}% of the eval contexts' nonzero top-k activations"
        cards.append(("latents simulated", f"{n_simulated:,} of {num_latents:,}", detail))
    result = (recovery or {}).get("result")
    recovered = loss_recovered(result) if isinstance(result, dict) else None
    if isinstance(result, dict) and recovered is not None:
        cards.append(
            (
                "loss recovered",
                f"{100 * recovered:.1f}%",
                f"{labels['transcoder']}, {result.get('n_tokens', '?')} held-out tokens",
            )
        )
    return cards


def metrics_line(m: dict[str, Any]) -> str:
    """A browsed latent's detection scores and cache statistics on one line."""
    parts = []
    for key, label in (
        ("balanced_accuracy", "balanced accuracy"),
        ("shuffled_balanced_accuracy", "shuffled"),
        ("auroc", "AUROC"),
    ):
        if key in m:
            low, high = m.get(f"{key}_ci_low"), m.get(f"{key}_ci_high")
            ci = f" {fmt_ci(low, high)}" if finite(low) and finite(high) else ""
            parts.append(f"{label} {fmt(m[key])}{ci}")
    if "count" in m:
        parts.append(f"active positions {m['count']:,}")
    if "frequency" in m:
        parts.append(f"frequency {m['frequency']:.2%}" if finite(m["frequency"]) else "")
    if "max" in m:
        parts.append(f"max activation {fmt(m['max'])}")
    return " · ".join(p for p in parts if p)


def coverage_card(evaluation: dict[str, Any] | None) -> tuple[str, str, str]:
    """The first card: the share of the coder's true top-k activation mass on the eval
    contexts held by the simulated latents (``eval.json``'s ``coverage``)."""
    raw = (evaluation or {}).get("coverage")
    value = as_float(raw)
    if value is None or not 0.0 <= value <= 1.0:
        detail = "(no coverage in eval.json)" if raw is None else f"(unreadable: {raw!r})"
        return ("coverage", "not recorded", detail)
    return ("coverage", fmt_share(value), "of the true top-k mass (eval contexts)")
