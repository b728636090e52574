"""The report's opening, the paper's table in miniature (:func:`nlrw.report.paper.paper_table`):
its rows from a hand-made summary, the findings worded from the numbers alone (a run that
reproduces the paper, one that contradicts it, one that lacks rows), the coverage card, the real
demo run's files where this machine has them, and the ``demo-sae`` preset (the paper's SAE
variant of the demo)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from nlrw.config.evaluate import SUMMARY_COLUMNS_SINCE_CONTROLS
from nlrw.pipeline import load_preset, preset_names
from nlrw.report.content import (
    condition_rows,
    coverage_card,
    decomposition,
    headline_cards,
    synthetic_rows,
)
from nlrw.report.format import BASELINES, baseline_labels
from nlrw.report.load import read_summary
from nlrw.report.paper import PAPER_HEAD, paper_table

# The repository's own demo run, where `make run` has made one here (a fresh CI clone has none).
DEMO_RUN = Path(__file__).resolve().parents[1] / "runs" / "demo"
NAN = math.nan


def _row(condition: str, mean: float, diff: float, half: float = 0.05, **extra: Any) -> dict:
    """A summary row: mean CE ± 0.1, Δ to zero ablation ± ``half``, raw p small when the CI
    excludes 0; no equivalence test unless given."""
    zero = condition == "zero_ablation"
    row = {
        "condition": condition,
        "calibration": None,
        "quality": None,
        "fraction": None,
        "choice": None,
        "n_trials": 1,
        "n_contexts": 200,
        "n_simulated_latents": 0,
        "mean_ce": mean,
        "ci_low": mean - 0.1,
        "ci_high": mean + 0.1,
        "diff_vs_zero": diff,
        "diff_ci_low": diff - half,
        "diff_ci_high": diff + half,
        "p_value": 1.0 if zero else (0.001 if abs(diff) > half else 0.4),
        "p_value_holm": NAN if zero else (0.01 if abs(diff) > half else 1.0),
        "p_better": NAN,
        "p_better_holm": NAN,
        "equivalence_margin": 0.04,
        "p_equivalent": NAN,
        "p_equivalent_holm": NAN,
        "equivalent_to_zero": None,
    }
    return row | extra


def _sim(condition: str, cal: str, f: float, mean: float, diff: float, **extra: Any) -> dict:
    n = {0.2: 20, 1.0: 100}.get(f, 5)
    return _row(
        condition,
        mean,
        diff,
        calibration=cal,
        fraction=f,
        choice=extra.pop("choice", "top"),
        n_simulated_latents=n,
        **extra,
    )


def _frame(rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame(
        rows,
        schema_overrides={c: pl.Float64 for c in SUMMARY_COLUMNS_SINCE_CONTROLS}
        | {
            "equivalent_to_zero": pl.Boolean,
            "calibration": pl.Utf8,
            "choice": pl.Utf8,
            "fraction": pl.Float64,
        },
    )


def _baselines(clean=3.20, coder=3.22, zero=3.39) -> list[dict]:
    return [
        _row("clean", clean, clean - zero, half=0.02),
        _row("transcoder", coder, coder - zero, half=0.02),
        _row("zero_ablation", zero, 0.0, half=0.0),
        _row("random_k", zero + 0.6, 0.6),
    ]


def _paper_like() -> pl.DataFrame:
    """The paper's story: uncalibrated far worse than zero ablation, quantile similar to it."""
    similar = {"p_equivalent": 0.001, "p_equivalent_holm": 0.004, "equivalent_to_zero": True}
    return _frame(
        [
            *_baselines(),
            _sim("simulated", "uncalibrated", 0.2, 5.5, 2.1),
            _sim("shuffled", "uncalibrated", 0.2, 5.6, 2.2),
            _sim("matched_zero", "uncalibrated", 0.2, 3.4, 0.01),
            _sim("oracle_support", "uncalibrated", 0.2, 4.0, 0.6),
            _sim("simulated", "uncalibrated", 0.2, 5.9, 2.5, choice="random"),
            _sim("simulated", "uncalibrated", 0.05, 4.0, 0.6),
            _sim("simulated", "uncalibrated", 1.0, 7.3, 3.9),
            _sim("simulated", "quantile", 0.2, 3.39, 0.005, half=0.02, **similar),
            _sim("simulated", "quantile", 1.0, 3.40, 0.01, half=0.02, **similar),
            _sim("simulated", "isotonic", 1.0, 3.6, 0.2),
            _sim("synthetic", "quantile", 1.0, 3.3, -0.1, quality=0.9),
        ]
    )


EVAL = {"n_simulated_latents": 100, "num_latents": 100, "coder_kind": "transcoder"}


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


def test_rows_are_the_papers_with_controls_under_each_simulated_row() -> None:
    table = paper_table(_paper_like(), EVAL | {"coverage": 0.97})
    assert table.head == PAPER_HEAD
    got = [(r.kind, r.cells[0], r.cells[1]) for r in table.rows]
    assert got == [
        ("baseline", "clean model", ""),
        ("baseline", "transcoder", ""),
        ("baseline", "zero ablation", ""),
        ("baseline", "random active latents", ""),
        ("simulated", "top 20% simulated", "uncalibrated"),
        ("control", "↳ shuffled explanations", "uncalibrated"),
        ("control", "↳ matched zero", "uncalibrated"),
        ("simulated", "all simulated", "uncalibrated"),
        ("simulated", "top 20% simulated", "quantile"),
        ("simulated", "all simulated", "quantile"),
        ("simulated", "all simulated", "isotonic"),  # no 20% row in this run: left out
    ]
    cells = {(r.cells[0], r.cells[1]): r.cells for r in table.rows}
    # beside the paper's numbers (Δ to its zero ablation in brackets) where it has them
    assert cells[("clean model", "")][-1] == "3.197 (-0.190)"
    assert cells[("zero ablation", "")][-1] == "3.387"
    assert cells[("top 20% simulated", "uncalibrated")][-1] == "5.535 (+2.148)"
    assert cells[("all simulated", "uncalibrated")][-1] == "7.259 (+3.872)"
    assert cells[("all simulated", "quantile")][-1] == "≈ zero ablation"
    assert cells[("all simulated", "isotonic")][-1] == "—"
    assert cells[("random active latents", "")][-1] == "—"
    # the top choice's row (5.5), not the random one (5.9); CIs, Δ, p
    top20 = cells[("top 20% simulated", "uncalibrated")]
    assert top20[2:7] == ("20", "5.500 [5.400, 5.600]", "+2.100 [2.050, 2.150]", "0.001", "0.010")
    zero = cells[("zero ablation", "")]
    assert zero[4:7] == ("", "", "")
    assert any("Fractions are of all 100 latents" in n for n in table.notes)


def test_a_run_that_reproduces_the_paper_says_so() -> None:
    table = paper_table(_paper_like(), EVAL | {"coverage": 0.97})
    assert [f.verdict for f in table.findings] == ["yes"] * 4
    text = table.paragraph
    assert text.startswith("Of the paper's 4 findings checked here this run reproduces 4 ")
    assert "contradicts" not in text and "unclear" not in text
    assert "Uncalibrated simulation of all latents is worse than zero ablation: yes, " in text
    assert "Δ +3.900 [3.850, 3.950]" in text
    assert "TOST within ±0.040 nats passes (p (Holm) 0.004)" in text
    assert "The transcoder beats zero ablation: yes" in text
    assert "zero ablation costs +0.190 nats over the clean model (paper +0.190)" in text
    assert "The simulated latents hold 97.0% of the coder's true top-k" in text
    assert "partial rewrite" not in text


def test_a_run_that_contradicts_the_paper_says_so_from_its_numbers() -> None:
    rows = [
        *_baselines(clean=4.26, coder=4.40, zero=4.32),  # the coder worse than zero ablation
        _sim("simulated", "uncalibrated", 0.2, 4.29, -0.03, half=0.02),  # better
        _sim("simulated", "uncalibrated", 1.0, 4.33, 0.01, half=0.02),  # CI includes 0
        # TOST fails and the CI excludes 0: not similar, better
        _sim(
            "simulated",
            "quantile",
            1.0,
            4.28,
            -0.04,
            half=0.01,
            p_equivalent=0.6,
            p_equivalent_holm=1.0,
            equivalent_to_zero=False,
        ),
    ]
    evaluation = EVAL | {"n_simulated_latents": 8, "num_latents": 8192, "coverage": 0.031}
    table = paper_table(_frame(rows), evaluation)
    verdicts = {f.claim: (f.verdict, f.evidence) for f in table.findings}
    assert verdicts["the transcoder beats zero ablation"][0] == "no"
    assert verdicts["the transcoder beats zero ablation"][1].startswith("worse than zero")
    top20 = verdicts[
        "uncalibrated simulation of the top 20% of the latents is worse than zero ablation"
    ]
    assert top20 == ("no", "better than zero ablation, Δ -0.030 [-0.050, -0.010]")
    assert verdicts["uncalibrated simulation of all latents is worse than zero ablation"] == (
        "unclear",
        "Δ +0.010 [-0.010, 0.030] includes 0",
    )
    quantile = verdicts[
        "quantile normalization brings all latents simulated back to about zero ablation"
    ]
    assert quantile[0] == "no" and "TOST within ±0.040 nats: p 0.600" in quantile[1]
    assert "against uncalibrated's 4.330" in quantile[1]
    text = table.paragraph
    assert "reproduces 0 and contradicts 3; 1 stay unclear" in text
    assert "3.1% of the coder's true top-k activation mass" in text
    assert "under the 90.0%" in text and "partial rewrite" in text
    assert any("8 simulated latents out of the coder's 8,192" in n for n in table.notes)


def test_similarity_only_from_an_equivalence_test_or_a_ci_inside_the_margin() -> None:
    def verdict(**extra: Any) -> tuple[str, str]:
        rows = [*_baselines(), _sim("simulated", "quantile", 1.0, 3.39, 0.0, **extra)]
        finding = paper_table(_frame(rows), EVAL).findings[3]
        return finding.verdict, finding.evidence

    # the unadjusted TOST passes, the Holm-adjusted one (the table's claims) does not
    v, why = verdict(half=0.02, p_equivalent=0.01, p_equivalent_holm=0.3, equivalent_to_zero=False)
    assert v == "unclear" and "passes unadjusted, not after Holm's adjustment" in why
    # no TOST: the 95% CI inside ±margin is similarity, a CI merely including 0 is not
    assert verdict(half=0.02)[0] == "yes" and "(no TOST)" in verdict(half=0.02)[1]
    v, why = verdict(half=0.1)
    assert v == "unclear" and "includes 0, no equivalence test" in why


def test_missing_rows_are_not_measured_and_a_random_only_run_uses_its_choice() -> None:
    rows = [
        _row("clean", 3.2, -0.19),
        _row("zero_ablation", 3.39, 0.0, half=0.0),
        _sim("simulated", "quantile", 0.2, 3.4, 0.01, choice="random"),
    ]
    table = paper_table(_frame(rows), None)
    assert [r.cells[0] for r in table.rows] == [
        "clean model",
        "zero ablation",
        "random 20% simulated",
    ]
    assert [f.verdict for f in table.findings] == ["not measured"] * 4
    assert "4 cannot be checked (rows missing)" in table.paragraph
    assert "Fractions are of the simulated latents." in table.notes[0]
    assert "hold" not in table.paragraph  # no coverage, no claim about it


def test_an_sae_run_names_its_coder() -> None:
    table = paper_table(_paper_like(), EVAL | {"coder_kind": "sae"})
    assert table.rows[1].cells[0] == "SAE reconstruction"
    assert table.findings[0].claim == "the SAE reconstruction beats zero ablation"
    assert "the paper's SAE variant behaves the same" in table.notes[-1]


def test_an_sae_run_names_its_coder_everywhere_the_report_speaks_of_it() -> None:
    """Cards, the full table, the decomposition and synthetic sentences say "SAE
    reconstruction" for an SAE run, "transcoder" for a transcoder run."""
    oracles = [
        _sim("oracle_support", "uncalibrated", 1.0, 4.0, 0.6),
        _sim("oracle_magnitude", "uncalibrated", 1.0, 6.0, 2.6),
    ]
    summary = _frame([*_paper_like().to_dicts(), *oracles])
    recovery = {"result": {"ce_clean": 3.0, "ce_transcoder": 3.1, "ce_zero": 4.0}}
    recovery["result"] |= {"loss_recovered": 0.9, "n_tokens": 8}
    for kind, label in (("sae", "SAE reconstruction"), ("transcoder", "transcoder")):
        evaluation = EVAL | {"coder_kind": kind}
        labels = baseline_labels(evaluation)
        cards = headline_cards(summary, recovery, evaluation)
        assert f"CE {label}" in [c[0] for c in cards]
        assert cards[-1][0] == "loss recovered" and cards[-1][2].startswith(f"{label}, ")
        assert [r[1][0] for r in condition_rows(summary, labels)][:2] == ["clean model", label]
        sentences = [*decomposition(summary, labels), *synthetic_rows(summary, labels)[1]]
        assert sentences and all(f"the {label}" in t or f"over the {label}" in t for t in sentences)
        if kind == "sae":
            assert not any("transcoder" in t for t in sentences)
            assert not any("transcoder" in c[0] + c[2] for c in cards)


# --------------------------------------------------------------------------------------------
# Coverage on the first card
# --------------------------------------------------------------------------------------------


def test_ce_cards_say_when_every_position_was_scored() -> None:
    summary = _paper_like()
    last = {c[0]: c[2] for c in headline_cards(summary, None, EVAL)}
    every = {
        c[0]: c[2] for c in headline_cards(summary, None, EVAL | {"positions_per_context": 32})
    }
    ce_cards = [title for title in every if title.startswith("CE ")]
    assert len(ce_cards) == 3
    for title in ce_cards:
        assert every[title] == last[title] + " · mean of 32 positions"
        assert "positions" not in last[title]


def test_coverage_is_the_first_card_or_not_recorded() -> None:
    summary = _paper_like()
    cards = headline_cards(summary, None, EVAL | {"coverage": 0.031})
    assert cards[0] == ("coverage", "3.1%", "of the true top-k mass (eval contexts)")
    assert headline_cards(summary, None, None)[0][:2] == ("coverage", "not recorded")
    assert coverage_card({"coverage": 0.99999})[1] == "> 99.9%"
    assert coverage_card({"coverage": 1.0})[1] == "100.0%"
    for bad in (1.5, -0.1, "0.5", True, NAN, {"mass": 0.5}):
        _, value, detail = coverage_card({"coverage": bad})
        assert value == "not recorded" and "unreadable" in detail


# --------------------------------------------------------------------------------------------
# The real demo run, where this machine has one (CI does not)
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(
    not (DEMO_RUN / "eval" / "summary.parquet").is_file(), reason=f"no demo run at {DEMO_RUN}"
)
def test_the_demo_runs_own_files() -> None:
    summary = read_summary(DEMO_RUN)
    evaluation = json.loads((DEMO_RUN / "eval.json").read_text())
    table = paper_table(summary, evaluation)
    present = set(summary["condition"].to_list())
    kinds = [r.kind for r in table.rows]
    assert kinds[: len(set(BASELINES) & present)] == ["baseline"] * len(set(BASELINES) & present)
    simulated = summary.filter(pl.col("condition") == "simulated")
    calibrations = {c for c in simulated["calibration"].to_list() if c}
    rows = {(r.cells[0], r.cells[1]) for r in table.rows if r.kind == "simulated"}
    for cal in calibrations:
        fractions = set(simulated.filter(pl.col("calibration") == cal)["fraction"].to_list())
        assert (("all simulated", cal) in rows) == (1.0 in fractions)
        assert (("top 20% simulated", cal) in rows) == (0.2 in fractions)
    assert {f.verdict for f in table.findings} <= {"yes", "no", "unclear", "not measured"}
    # the paragraph quotes the run's own numbers
    coder = summary.filter(pl.col("condition") == "transcoder").row(0, named=True)
    assert f"Δ {coder['diff_vs_zero']:+.3f}" in table.paragraph
    card = coverage_card(evaluation)
    assert (card[1] == "not recorded") == ("coverage" not in evaluation)


# --------------------------------------------------------------------------------------------
# The demo-sae preset: the demo's protocol with an SAE on the residual stream
# --------------------------------------------------------------------------------------------


def test_demo_sae_is_the_demo_with_an_sae_after_the_same_layer() -> None:
    assert "demo-sae" in preset_names()
    demo, sae = load_preset("demo"), load_preset("demo-sae")
    assert sae.collect.kind == sae.train.kind == "sae"
    # the residual stream after the demo's layer: the decoder layer whose MLP the demo rewrites
    assert demo.collect.hookpoint.endswith(".mlp")
    assert sae.collect.hookpoint == demo.collect.hookpoint.removesuffix(".mlp")
    # everything else the same (a change to demo.toml must be made in demo-sae.toml too)
    for stage in ("cache", "contexts", "explain", "score", "simulate", "calibrate", "evaluate"):
        assert getattr(sae, stage) == getattr(demo, stage), stage
    for cfg, same in ((sae.collect, demo.collect), (sae.train, demo.train)):
        differ = {k for k, v in vars(cfg).items() if v != getattr(same, k) and k not in ("kind",)}
        assert differ <= {"hookpoint"}, differ
    assert sae.report == demo.report and sae.recovery == demo.recovery
