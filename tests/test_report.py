"""Tests of the report stage: the page renders from a run directory (the real smoke pipeline up
to ``score`` plus generated-but-plausible tables for the later stages, in the spec's schemas),
it is self-contained, missing inputs are handled, and it loads cleanly in a real headless
Chromium (skipped with a reason when no Chromium is installed)."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from nlrw import evaluate, explain, pipeline, report, score
from nlrw.config.evaluate import SUMMARY_COLUMNS_SINCE_CONTROLS
from nlrw.report import ReportConfig, select_browser_latents, token_spans_html
from nlrw.report.content import claim, decomposition
from nlrw.report.figures import real_simulator_auroc

CALIBRATIONS = ("uncalibrated", "quantile", "isotonic", "gate")
FRACTIONS = (0.001, 0.01, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0)
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# A run directory: the real smoke pipeline up to score, then generated later-stage tables
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke preset up to ``cache``: real statistics and top windows of 256 latents."""
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    pipeline.run(pipeline.load_preset("smoke"), run_dir, until="cache", log=lambda _: None)
    return run_dir


EXPLANATIONS = (
    "Capitalized first names of women, e.g. Elizabeth, Jane",
    'The word "not" & other negations <in dialogue>',
    "Commas after a subordinate clause",
    "Forms of the verb to be",
    "Titles before a surname: Mr, Mrs, Miss",
    "Words about money and fortune",
    "The first token after an opening quotation mark",
    "Adverbs ending in -ly",
    "Pronouns referring to the heroine",
    "~\x07\ufffd]\ufffd Yes\ufffd}",  # what a tiny random explainer writes
    None,  # a failed explanation
    "Punctuation at the end of a sentence",
)


def write_explanations_and_scores(run_dir: Path, rng: np.random.Generator) -> np.ndarray:
    """``explanations.parquet`` and ``scores.parquet`` (explain / score schemas) for the most
    frequent latents of the cache, with plausible texts and detection scores; returns the
    latents with a usable explanation."""
    stats = pl.read_parquet(run_dir / "latents" / "stats.parquet").sort(
        ["count", "latent"], descending=[True, False]
    )
    chosen = stats["latent"].head(len(EXPLANATIONS)).to_list()
    expl_rows, score_rows = [], []
    for lat, text in zip(chosen, EXPLANATIONS, strict=True):
        windows = pl.read_parquet(run_dir / "latents" / "top_windows.parquet").filter(
            pl.col("latent") == lat
        )["window"]
        expl_rows.append(
            {
                "latent": lat,
                "explanation": text,
                "status": "ok" if text else "failed",
                "reason": None if text else "no usable reply after 3 attempts",
                "backend": "transformers",
                "model": "tiny-random-llama",
                "temperature": 0.7,
                "seed": 0,
                "prompt_hash": "0123456789abcdef",
                "prompt_tokens": 800,
                "completion_tokens": 12,
                "attempts": 1 if text else 3,
                "windows": windows.head(2).to_list(),
            }
        )
        if text is None:
            continue
        labels = [True] * 4 + [False] * 4
        probs = np.clip(np.array(labels, float) * 0.5 + rng.uniform(0.1, 0.5, 8), 0, 1)
        score_rows.append(
            {
                "latent": lat,
                "explanation": text,
                "balanced_accuracy": round(float(rng.uniform(0.45, 0.95)), 3),
                "auroc": round(float(rng.uniform(0.5, 1.0)), 3),
                "shuffled_balanced_accuracy": round(float(rng.normal(0.5, 0.04)), 3),
                "shuffled_auroc": round(float(rng.normal(0.5, 0.05)), 3),
                "shuffled_from": chosen[0],
                "n_activating": 4,
                "n_non_activating": 4,
                "mean_mass": 0.9,
                "backend": "transformers",
                "model": "tiny-random-llama",
                "prompt_hash": "fedcba9876543210",
                "windows": list(range(8)),
                "labels": labels,
                "probs": probs.tolist(),
                "shuffled_probs": rng.uniform(0, 1, 8).tolist(),
            }
        )
    pl.DataFrame(expl_rows, schema=explain.SCHEMA).write_parquet(run_dir / "explanations.parquet")
    scores = pl.DataFrame(score_rows, schema=score.SCHEMA)
    scores.write_parquet(run_dir / "scores.parquet")
    return scores["latent"].to_numpy()


def write_later_stages(run_dir: Path, n_eval: int = 80, n_calibration: int = 20, seed: int = 0):
    """explanations / scores / contexts / simulations / calibration / eval tables in the
    spec's schemas, generated with the paper's story: false positives uncalibrated,
    low sensitivity calibrated, CE rising with the fraction simulated."""
    rng = np.random.default_rng(seed)
    latents = write_explanations_and_scores(run_dir, rng).astype(np.int32)
    n_lat = len(latents)

    tokens = np.load(run_dir / "activations" / "eval" / "tokens.npy")
    n = n_eval + n_calibration
    ctx_len = 8
    seqs = rng.integers(0, tokens.shape[0], n)
    starts = rng.integers(0, tokens.shape[1] - ctx_len - 1, n)
    ids = [
        tokens[s, o : o + ctx_len].astype(np.int32).tolist()
        for s, o in zip(seqs, starts, strict=True)
    ]
    pl.DataFrame(
        {
            "context_id": np.arange(n, dtype=np.int32),
            "split": ["eval"] * n_eval + ["calibration"] * n_calibration,
            "input_ids": pl.Series(ids, dtype=pl.List(pl.Int32)),
            "target_id": np.array(
                [tokens[s, o + ctx_len] for s, o in zip(seqs, starts, strict=True)], np.int32
            ),
            "source": ["held-out"] * n,
            "document": seqs.astype(np.int64),
            "offset": starts.astype(np.int64),
        }
    ).write_parquet(run_dir / "contexts.parquet")

    true = np.where(rng.random((n_lat, n)) < 0.2, rng.gamma(2.0, 0.5, (n_lat, n)), 0.0).astype(
        np.float32
    )
    active = true > 0
    ev = np.where(
        active,
        np.clip(rng.normal(6.5, 1.5, true.shape), 0, 9),
        np.where(
            rng.random(true.shape) < 0.35,
            np.clip(rng.normal(8.3, 0.5, true.shape), 0, 9),
            np.clip(rng.normal(1.2, 1.0, true.shape), 0, 9),
        ),
    ).astype(np.float32)
    digits = np.arange(10)
    probs = np.exp(-0.5 * (digits[None, None, :] - ev[..., None]) ** 2)
    probs = (0.95 * probs / probs.sum(-1, keepdims=True)).astype(np.float32)
    lat_col = np.repeat(latents, n)
    ctx_col = np.tile(np.arange(n, dtype=np.int32), n_lat)
    pl.DataFrame(
        {
            "latent": lat_col,
            "context_id": ctx_col,
            "expected_value": ev.reshape(-1),
            "digit_probs": pl.Series(probs.reshape(-1, 10).tolist(), dtype=pl.List(pl.Float32)),
            "digit_mass": np.full(n_lat * n, 0.95, np.float32),
            "true_activation": true.reshape(-1),
        }
    ).write_parquet(run_dir / "simulations.parquet")

    maxima = true.max(1, keepdims=True) + 1e-3
    sim = {
        "uncalibrated": ev / 9 * maxima,
        "quantile": np.where(ev > np.quantile(ev, 0.8, axis=1, keepdims=True), ev / 9 * maxima, 0),
        "isotonic": np.where(ev > 7.5, 0.6 * maxima, 0.0),
        "gate": np.where(ev > 8.0, ev / 9 * maxima, 0.0),
    }
    cal_rows, metric_rows = [], []
    for cal in CALIBRATIONS:
        values = sim[cal][:, :n_eval].astype(np.float32)
        cal_rows.append(
            pl.DataFrame(
                {
                    "latent": np.repeat(latents, n_eval),
                    "context_id": np.tile(np.arange(n_eval, dtype=np.int32), n_lat),
                    "calibration": [cal] * (n_lat * n_eval),
                    "activation": values.reshape(-1),
                }
            )
        )
        for i, lat in enumerate(latents):
            t, s = true[i, :n_eval], values[i]
            a = t > 0
            metric_rows.append(
                {
                    "latent": int(lat),
                    "calibration": cal,
                    "pearson": float(np.corrcoef(t, s)[0, 1]) if s.std() > 0 else float("nan"),
                    "specificity": float((s[~a] == 0).mean()) if (~a).any() else float("nan"),
                    "sensitivity": float((s[a] > 0).mean()) if a.any() else float("nan"),
                    "auroc": float(rng.uniform(0.5, 0.9)),
                    "n_active": int(a.sum()),
                    "n_contexts": n_eval,
                }
            )
    pl.concat(cal_rows).write_parquet(run_dir / "calibration.parquet")
    pl.DataFrame(metric_rows).with_columns(pl.col("latent").cast(pl.Int32)).write_parquet(
        run_dir / "calibration_metrics.parquet"
    )
    # What survives top-k per context, computed as the calibrate stage does (k = 4 slots, the
    # other latents' true values drawn).
    from nlrw.calibrate import support_diagnostics

    others = rng.gamma(2.0, 1.0, (n_eval, 4)).astype(np.float32)
    truth_idx = np.tile(1000 + np.arange(4), (n_eval, 1))
    pl.concat(
        [
            support_diagnostics(
                str(cal),
                np.asarray(latents, np.int64),
                frame["latent"].to_numpy().astype(np.int64),
                frame["context_id"].to_numpy().astype(np.int64),
                frame["activation"].to_numpy().astype(np.float32),
                np.arange(n_eval),
                others,
                truth_idx,
            )
            for (cal,), frame in pl.concat(cal_rows).group_by(["calibration"], maintain_order=True)
        ]
    ).write_parquet(run_dir / "calibration_support.parquet")

    # Evaluation: per-context CE of each condition, then the summary of the evaluate stage
    # (nlrw.evaluate.summarize: bootstrap CIs, paired tests against zero ablation).
    base = rng.gamma(4.0, 0.8, n_eval)
    conditions: list[dict[str, Any]] = []
    selected: dict[tuple[Any, ...], int] = {}

    def add(condition, ce, calibration=None, fraction=None, choice=None, trial=0, k=None, q=None):
        conditions.append(
            {
                "condition": condition,
                "calibration": calibration,
                "quality": q,
                "fraction": fraction,
                "choice": choice,
                "trial": trial,
                "ce": ce,
            }
        )
        selected[(condition, calibration, q, fraction, choice)] = k or 0

    add("clean", base)
    add("transcoder", base + rng.normal(0.02, 0.05, n_eval))
    zero = base + rng.normal(0.19, 0.1, n_eval)
    add("zero_ablation", zero)
    add("random_k", base + rng.normal(0.6, 0.2, n_eval))
    harm = {"uncalibrated": 4.0, "quantile": 0.3, "isotonic": 0.25, "gate": 0.2}
    for cal in CALIBRATIONS:
        for choice in ("top", "random"):
            for f in FRACTIONS:
                scale = harm[cal] * f ** (0.6 if choice == "top" else 0.5)
                trials = 1 if choice == "top" else 2
                k = max(1, round(f * n_lat))
                for trial in range(trials):
                    ce = zero + scale + rng.normal(0, 0.1 + 0.2 * scale, n_eval) * 0.3
                    add("simulated", ce, cal, f, choice, trial, k)
                    add("matched_zero", zero - 0.1 * f, cal, f, choice, trial, k)
                    add("oracle_support", ce - 0.5 * scale, cal, f, choice, trial, k)
                    add("oracle_magnitude", ce - 0.2 * scale, cal, f, choice, trial, k)
    for cal in ("uncalibrated", "quantile"):
        for q in (0.5, 0.9, 1.0):
            ce = zero + (1.0 - q) * 2 - 0.15 * q + rng.normal(0, 0.02, n_eval)
            add("synthetic", ce, cal, 1.0, "top", 0, 4096, q)
    results = pl.concat(
        [
            pl.DataFrame(
                {**c, "context_id": np.arange(n_eval, dtype=np.int32)},
                schema=evaluate.RESULTS_SCHEMA,
            )
            for c in conditions
        ]
    )
    summary = evaluate.summarize(
        results, n_bootstrap=200, n_permutations=500, seed=seed, n_selected_of=selected
    )
    (run_dir / "eval").mkdir(exist_ok=True)
    results.write_parquet(run_dir / "eval" / "results.parquet")
    summary.write_parquet(run_dir / "eval" / "summary.parquet")


@pytest.fixture
def run_dir(smoke_run: Path, tmp_path: Path) -> Path:
    """A copy of the smoke run with the later stages' tables written in."""
    out = tmp_path / "run"
    shutil.copytree(smoke_run, out, symlinks=True)
    write_later_stages(out)
    return out


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

_IMG = re.compile(r'<img src="([^"]*)"')


def _images(page: str) -> list[bytes]:
    out = []
    for src in _IMG.findall(page):
        assert src.startswith("data:image/png;base64,"), src[:60]
        out.append(base64.b64decode(src.split(",", 1)[1], validate=True))
    return out


def _decode_png(data: bytes) -> np.ndarray:
    import matplotlib.image

    return matplotlib.image.imread(io.BytesIO(data), format="png")


def _browser_check() -> Any:
    spec = importlib.util.spec_from_file_location(
        "browser_check", ROOT / "tools" / "browser_check.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------
# Unit tests
# --------------------------------------------------------------------------------------------


def test_browser_latents_are_best_median_worst() -> None:
    scores = pl.DataFrame(
        {"latent": list(range(20)), "balanced_accuracy": [i / 20 for i in range(20)]}
    )
    picks = select_browser_latents(scores, 6)
    assert picks == [
        (19, "best"),
        (18, "best"),
        (10, "median"),
        (9, "median"),
        (1, "worst"),
        (0, "worst"),
    ]
    assert [lab for _, lab in select_browser_latents(scores, 4)] == [
        "best",
        "best",
        "median",
        "worst",
    ]
    few = pl.DataFrame({"latent": [5, 6, 7], "balanced_accuracy": [0.9, float("nan"), 0.6]})
    assert select_browser_latents(few, 6) == [(5, "best"), (7, "median")]
    assert select_browser_latents(few, 0) == []


def test_token_spans_escape_and_scale_opacity() -> None:
    out = token_spans_html(["<b>", " a\n", "x"], [1.0, 0.5, 0.0], scale=1.0)
    assert "&lt;b&gt;" in out and "<b>" not in out
    assert "rgba(245,124,0,1.00)" in out and "rgba(245,124,0,0.50)" in out
    assert "↵" in out
    assert out.count('class="tok act"') == 2  # the inactive token gets no highlight
    assert "0.12" in token_spans_html(["t"], [1e-4], scale=1.0)  # faint but visible


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="n_top_windows"):
        ReportConfig(n_top_windows=-1)
    with pytest.raises(ValueError, match="dpi"):
        ReportConfig(dpi=5)


# --------------------------------------------------------------------------------------------
# The stage on a run directory
# --------------------------------------------------------------------------------------------


def test_report_renders_every_section_self_contained(run_dir: Path) -> None:
    index = report.run(ReportConfig(), run_dir)
    assert index == run_dir / "report" / "index.html"
    page = index.read_text()
    out = index.parent
    # Figures: on disk, and the same bytes embedded as valid PNGs.
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {
        "headline.png",
        "headline_paired.png",
        "simulated_scores.png",
        "calibration_metrics.png",
        "calibration_support.png",
        "detection.png",
    } <= set(pngs)
    embedded = _images(page)
    assert len(embedded) == len(pngs)
    assert {bytes(p.read_bytes()) for p in out.glob("*.png")} == set(embedded)
    for data in embedded:
        pixels = _decode_png(data)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert pixels.std() > 0  # not a blank canvas
    # Self-contained: nothing to fetch, no scripts.
    assert not re.search(r'(src|href)="(?!data:|#)', page)
    assert "<script" not in page and "url(" not in page
    # Every summary row is in the table; p-values and the headline numbers shown.
    summary = pl.read_parquet(run_dir / "eval" / "summary.parquet")
    assert page.count("<tr") >= summary.height
    assert f"{summary.filter(pl.col('condition') == 'clean')['mean_ce'][0]:.3f}" in page
    assert "random active latents" in page and "zero ablation" in page
    # Header: models, hookpoint, git revision, loss recovered.
    assert "tiny-random-llama" in page and "model.layers.1.mlp" in page
    assert "git revision" in page and "Loss recovered" in page
    # Browser: 6 latents, best/median/worst, highlighted tokens, a scatter each.
    assert page.count('class="latent"') == 6
    for label in ("best", "median", "worst"):
        assert f'class="badge {label}"' in page
    assert page.count('class="tok act"') > 6
    assert len(list(out.glob("latent_*.png"))) == 6
    assert "rated highest" in page and "marked" in page
    # It opens with the cards (coverage first: this run has no eval.json) and the paper's
    # table in miniature, before the run's header.
    assert page.index('<div class="cards">') < page.index("<h2>The paper's table in miniature")
    assert page.index("<h2>The paper's table in miniature") < page.index("<h2>Run</h2>")
    assert '<div class="k">coverage</div><div class="v">not recorded</div>' in page
    assert "What this run reproduces." in page and "5.535 (+2.148)" in page
    # Markdown twin, and the provenance record written last.
    md = (out / "report.md").read_text()
    assert md.index("| coverage |") < md.index("## The paper's table in miniature")
    assert md.index("## The paper's table in miniature") < md.index("## Run")
    assert md.index("## Run") < md.index("## Every condition")
    assert "**What this run reproduces.** Of the paper's 4 findings" in md
    assert "![mean CE vs fraction of latents simulated](headline.png)" in md
    assert "| condition |" in md and "<<" in md
    record = (run_dir / "report.json").read_text()
    assert '"stage": "report"' in record
    assert "Notes" not in page  # every input present: nothing left out


def test_report_is_kept_when_up_to_date_and_redone_when_an_input_changes(run_dir: Path) -> None:
    index = report.run(ReportConfig(n_browser_latents=2, dpi=40), run_dir)
    first = index.stat().st_mtime_ns
    assert report.run(ReportConfig(n_browser_latents=2, dpi=40), run_dir) == index
    assert index.stat().st_mtime_ns == first
    report.run(ReportConfig(n_browser_latents=1, dpi=40), run_dir)  # another config re-renders
    assert index.read_text().count('class="latent"') == 1
    assert len(list(index.parent.glob("latent_*.png"))) == 1  # stale scatters removed
    summary = pl.read_parquet(run_dir / "eval" / "summary.parquet")
    summary.filter(pl.col("condition") != "random_k").write_parquet(
        run_dir / "eval" / "summary.parquet"
    )
    page = report.run(ReportConfig(n_browser_latents=1, dpi=40), run_dir).read_text()
    assert "random active latents" not in page
    again = report.run(ReportConfig(n_browser_latents=1, dpi=40), run_dir, overwrite=True)
    assert again.stat().st_mtime_ns > first


def test_report_opens_with_the_papers_table_worded_from_the_numbers(run_dir: Path) -> None:
    evaluation = {"coverage": 0.031, "n_simulated_latents": 11, "num_latents": 256}
    (run_dir / "eval.json").write_text(json.dumps(evaluation))
    page = report.run(ReportConfig(n_browser_latents=1, dpi=40), run_dir).read_text()
    md = (run_dir / "report" / "report.md").read_text()
    summary = pl.read_parquet(run_dir / "eval" / "summary.parquet")
    assert '<div class="k">coverage</div><div class="v">3.1%</div>' in page
    assert "3.1% of the true top-k mass" in md
    opening = md.split("## The paper's table in miniature")[1].split("## Run")[0]
    rows = [ln for ln in opening.splitlines() if ln.startswith("| ")][1:]
    # clean, transcoder, zero ablation, random-k, then 20% and all per calibration, each with
    # its matched-zero control (the fixture has no shuffled control)
    assert len(rows) == 4 + 4 * 2 * 2
    uncalibrated = summary.filter(
        (pl.col("condition") == "simulated")
        & (pl.col("calibration") == "uncalibrated")
        & (pl.col("choice") == "top")
        & (pl.col("fraction") == 1.0)
    ).row(0, named=True)
    assert f"{uncalibrated['mean_ce']:.3f}" in rows[6] and "7.259 (+3.872)" in rows[6]
    # the fixture's uncalibrated rewrite is far worse than zero ablation: the paragraph says
    # so from its CI, and that the 8 simulated latents are a partial rewrite
    assert (
        "Uncalibrated simulation of all latents is worse than zero ablation: yes, "
        f"Δ {uncalibrated['diff_vs_zero']:+.3f}" in opening
    )
    assert "hold 3.1% of the coder's true top-k activation mass" in opening
    assert "Fractions are of the 11 simulated latents out of the coder's 256" in opening


def test_missing_summary_names_the_file_and_the_stage(run_dir: Path) -> None:
    (run_dir / "eval" / "summary.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=r"eval/summary\.parquet.*evaluate"):
        report.run(ReportConfig(), run_dir)
    assert not (run_dir / "report" / "index.html").exists()


def test_summary_without_its_columns_is_a_clear_error(run_dir: Path) -> None:
    pl.DataFrame({"condition": ["clean"], "ce": [1.0]}).write_parquet(
        run_dir / "eval" / "summary.parquet"
    )
    with pytest.raises(ValueError, match="lacks the columns"):
        report.run(ReportConfig(), run_dir)


def test_summary_from_before_the_controls_is_refused(run_dir: Path) -> None:
    path = run_dir / "eval" / "summary.parquet"
    old = pl.read_parquet(path).drop(SUMMARY_COLUMNS_SINCE_CONTROLS)
    old.write_parquet(path)
    with pytest.raises(ValueError, match=r"predates the controls.*nlrw evaluate"):
        report.run(ReportConfig(), run_dir)
    assert not (run_dir / "report" / "index.html").exists()


def _row(**values: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "condition": "simulated",
        "diff_vs_zero": 0.01,
        "p_value_holm": 0.5,
        "p_better_holm": 0.9,
        "equivalence_margin": 0.04,
        "p_equivalent": 0.01,
        "equivalent_to_zero": False,
    }
    return row | values


def test_claims_come_from_the_tests() -> None:
    assert claim(_row(condition="zero_ablation")) == ""
    # similarity only from a passed TOST, never from a large p-value alone
    assert claim(_row()) == "inconclusive: neither a difference nor similarity shown"
    assert claim(_row(p_value_holm=0.99)).startswith("inconclusive")
    similar = claim(_row(equivalent_to_zero=True))
    assert similar == "similar to zero ablation (within ±0.040 nats)"
    both = claim(_row(equivalent_to_zero=True, p_better_holm=0.001, diff_vs_zero=-0.01))
    assert both.startswith("better than, and similar to zero ablation")
    assert claim(_row(p_better_holm=0.01, diff_vs_zero=-0.3)) == "better than zero ablation"
    assert claim(_row(p_value_holm=0.01, diff_vs_zero=0.3)) == "worse than zero ablation"
    untested = claim(_row(p_equivalent=float("nan"), equivalent_to_zero=None))
    assert "similar" not in untested and "no equivalence test" in untested


def test_report_words_similarity_only_where_tost_passes(run_dir: Path) -> None:
    page = report.run(ReportConfig(n_browser_latents=1, dpi=40), run_dir).read_text()
    md = (run_dir / "report" / "report.md").read_text()
    summary = pl.read_parquet(run_dir / "eval" / "summary.parquet")
    equivalent = summary.filter(pl.col("equivalent_to_zero").fill_null(False))
    assert 0 < equivalent.height < summary.height - 1  # the fixture has both kinds
    # the conditions table: one claim per row, "similar" exactly on the equivalent rows
    table = md.split("## Every condition")[1].split("## Synthetic simulators")[0]
    lines = [ln for ln in table.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    not_synthetic = summary.filter(pl.col("condition") != "synthetic")
    assert len(lines) == not_synthetic.height
    n_similar = sum("similar to zero ablation" in ln for ln in lines)
    assert n_similar == equivalent.filter(pl.col("condition") != "synthetic").height
    assert "similar to zero ablation" in page and "p (Holm)" in page
    # the synthetic simulators' own table and where they reach the baselines
    assert "## Synthetic simulators" in md and "reaches zero ablation's mean CE from" in md
    assert "oracle support" in page and "matched zero" in page
    # the decomposition of the loss by the oracles, per calibration at fraction 1 (the
    # fixture: oracle_support removes half the excess of the simulated rows, oracle_magnitude
    # a fifth, so what remains with the true support is the smaller error)
    lines = decomposition(summary)
    assert len(lines) == 4 and all("support error dominates" in ln for ln in lines)
    assert lines[0] in md
    # the frontier figure, with the real simulator at its measured mean AUROC
    real = real_simulator_auroc(pl.read_parquet(run_dir / "calibration_metrics.parquet"))
    assert real is not None and f"measured mean AUROC {real:.3f}" in page
    assert (run_dir / "report" / "frontier.png").is_file()


def test_missing_optional_inputs_leave_sections_out_with_notes(run_dir: Path) -> None:
    for rel in ("simulations.parquet", "calibration.parquet", "scores.parquet", "contexts.parquet"):
        (run_dir / rel).unlink()
    metrics = pl.read_parquet(run_dir / "calibration_metrics.parquet")
    metrics.filter(pl.col("calibration") != "isotonic").write_parquet(
        run_dir / "calibration_metrics.parquet"
    )
    (run_dir / "transcoder" / "recovery.json").unlink()
    page = report.run(ReportConfig(n_browser_latents=3), run_dir).read_text()
    assert "Notes" in page
    assert "simulations.parquet not found (written by the simulate stage)" in page
    assert "scores.parquet not found (written by the score stage)" in page
    assert "transcoder/recovery.json not found (written by the recovery stage)" in page
    assert "Calibrations not in this run: isotonic" in page
    # The headline, the table and the calibration metrics stay; the browser falls back to
    # latent order with the explanations and top windows.
    assert "headline.png" not in page  # embedded, not linked
    # headline, paired headline, calibration metrics, calibration support, frontier
    assert len(_images(page)) == 5
    assert page.count('class="latent"') == 3 and "unscored" in page
    assert 'class="tok act"' in page


def test_report_of_a_run_with_only_the_summary(tmp_path: Path) -> None:
    run_dir = tmp_path / "bare"
    (run_dir / "eval").mkdir(parents=True)
    pl.DataFrame(
        {
            "condition": ["clean", "zero_ablation", "simulated"],
            "calibration": [None, None, "uncalibrated"],
            "fraction": [None, None, 1.0],
            "choice": [None, None, "top"],
            "mean_ce": [3.2, 3.4, 7.3],
            "ci_low": [3.1, 3.3, 7.0],
            "ci_high": [3.3, 3.5, 7.6],
            **{c: [None, None, None] for c in SUMMARY_COLUMNS_SINCE_CONTROLS},
        },
        schema_overrides={c: pl.Float64 for c in SUMMARY_COLUMNS_SINCE_CONTROLS}
        | {"equivalent_to_zero": pl.Boolean},
    ).write_parquet(run_dir / "eval" / "summary.parquet")
    page = report.run(ReportConfig(), run_dir).read_text()
    assert len(_images(page)) == 1
    assert "config.json not found" in page and "7.300" in page


# --------------------------------------------------------------------------------------------
# A real browser
# --------------------------------------------------------------------------------------------


def test_report_loads_cleanly_in_headless_chromium(run_dir: Path, tmp_path: Path) -> None:
    browser_check = _browser_check()
    if browser_check.find_chromium() is None:
        pytest.skip(
            "no Chromium on PATH: install it with `apt-get install -y --no-install-recommends "
            "chromium` (the Makefile's test target does this when it is missing)"
        )
    index = report.run(ReportConfig(), run_dir)
    shot = tmp_path / "report.png"
    result = browser_check.check_page(index, shot, width=1280, timeout=90)
    assert result.problems() == []
    assert result.title == "nlrw report: run"
    assert len(result.images) == len(_images(index.read_text())) >= 10
    assert all(img["src"].startswith("data:image/png;base64,") for img in result.images)
    assert result.requests == [] and result.console_errors == []
    pixels = _decode_png(shot.read_bytes())
    if os.environ.get("NLRW_REPORT_SCREENSHOT"):  # keep it for a human to look at
        shutil.copyfile(shot, os.environ["NLRW_REPORT_SCREENSHOT"])
    assert pixels.shape[1] == 1280 and pixels.shape[0] == pytest.approx(result.height, abs=2)
    assert pixels.shape[0] > 3000  # the whole page, not the first screen


def test_browser_check_reports_a_broken_page(tmp_path: Path) -> None:
    browser_check = _browser_check()
    if browser_check.find_chromium() is None:
        pytest.skip("no Chromium on PATH (apt-get install -y --no-install-recommends chromium)")
    page = tmp_path / "broken.html"
    page.write_text(
        "<!DOCTYPE html><title>x</title><p>hi</p>"
        '<img alt="bad" src="data:image/png;base64,AAAA">'
        "<script>console.error('boom')</script>"
    )
    result = browser_check.check_page(page, tmp_path / "broken.png", timeout=60)
    problems = "\n".join(result.problems())
    assert "boom" in problems and "image not loaded: bad" in problems
    assert (tmp_path / "broken.png").is_file()
