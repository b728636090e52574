"""The latent browser's data: which latents it shows and what is known about each.

For the best, median and worst latents by detection balanced accuracy: the explanation (with
its consistency check and method, :func:`explanation_with_check`), the scores and cache
statistics, the top activating windows of the cache, the per-calibration metrics, a scatter
of simulated against true activation on the eval contexts, and the eval contexts the
simulator rated highest and those where the latent truly fires most. Token ids
are decoded with the subject model's tokenizer when it loads (ids otherwise). The markup is
:mod:`nlrw.report.html`'s and :mod:`nlrw.report.markdown`'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import polars as pl

from nlrw.config.report import ReportConfig
from nlrw.report.figures import ReportFigure, latent_scatter_figure
from nlrw.report.format import calibration_order
from nlrw.report.load import Run, eval_context_ids


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


class Window(NamedTuple):
    """A top activating window of the cache, decoded, with the latent's activations."""

    rank: int
    max_activation: float
    tokens: list[str]
    activations: list[float]


class Rated(NamedTuple):
    """An eval context's tail, decoded (its last token is the one rated), with the
    simulator's score and the true activation there."""

    context_id: int
    tokens: list[str]
    expected_value: float
    true_activation: float


class Latent(NamedTuple):
    """Everything the browser shows of one latent."""

    latent: int
    label: str
    explanation: str | None
    metrics: dict[str, Any]
    """Detection scores and cache statistics."""
    calibration: list[dict[str, Any]]
    windows: list[Window]
    scatter: ReportFigure | None
    rated_high: list[Rated]
    most_active: list[Rated]


def browser_latents(
    cfg: ReportConfig,
    run: Run,
    scores: pl.DataFrame | None,
    explanations: pl.DataFrame | None,
    contexts: pl.DataFrame | None,
    metrics: pl.DataFrame | None,
    model: str | None,
) -> list[Latent]:
    """The browsed latents (:func:`select_browser_latents`, or the first explained ones in
    latent order without scores), each with what the inputs tell about it; a missing input
    leaves its part out with a note."""
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
            int(r["latent"]): explanation_with_check(r)
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
            for s in ("balanced_accuracy", "shuffled_balanced_accuracy", "auroc")
            for c in (s, f"{s}_ci_low", f"{s}_ci_high")
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
            rows.iter_rows(named=True), key=lambda r: calibration_order(r["calibration"])
        ):
            calib_of[int(r["latent"])].append(r)

    sims = _browser_simulations(run, latents, eval_context_ids(contexts))
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
        windows: list[Window] = []
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
            Latent(
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


def explanation_with_check(row: dict[str, Any]) -> str:
    """An ``explanations.parquet`` row's explanation as the browser shows it: followed by the
    explain stage's consistency check (how many of the examples shown to the explainer have
    their top token among the words the explanation quotes, :func:`nlrw.explain.consistency`)
    and, for a contrastive explanation, how many near misses it saw. Tables written before
    the check, or imported, show the explanation alone."""
    text = str(row["explanation"])
    notes = []
    if row.get("method") == "contrastive":
        notes.append(f"contrastive, {len(row.get('near_miss_windows') or [])} near misses")
    words = row.get("quoted_words")
    share = row.get("consistency")
    n = len(row.get("windows") or [])
    if words and share is not None and math.isfinite(share) and n:
        quoted = ", ".join(f'"{w}"' for w in words)
        notes.append(
            f"check: {quoted} is the top token of {round(share * n)} of {n} examples shown "
            f"({share:.0%})"
        )
    elif words is not None and not words and "consistency" in row:
        notes.append("check: quotes no word")
    return f"{text} [{'; '.join(notes)}]" if notes else text


def _top_windows(run_dir: Path, latent: int, n: int, decode: _Decoder) -> list[Window]:
    from nlrw.cache import read_top_windows, window_activations, window_tokens

    top = read_top_windows(run_dir, latent).sort("rank").head(n)
    if top.height == 0:
        return []
    windows = top["window"].to_numpy().astype(np.int64)
    ids = window_tokens(run_dir, windows)
    acts = window_activations(run_dir, latent, windows)
    return [
        Window(int(rank), float(mx), decode(row), [float(a) for a in act])
        for rank, mx, row, act in zip(
            top["rank"].to_list(), top["max_activation"].to_list(), ids, acts, strict=True
        )
    ]


def _browser_simulations(
    run: Run, latents: list[int], eval_ids: list[int] | None
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


def _browser_calibration(run: Run, latents: list[int]) -> pl.DataFrame | None:
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
) -> ReportFigure:
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
    return ReportFigure(
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
) -> list[Rated]:
    out = []
    for cid, ev, true in rows:
        ids = tokens_of.get(cid)
        if ids is None:
            continue
        out.append(Rated(cid, decode(ids[-(cfg.context_tail + 1) :]), ev, true))
    return out
