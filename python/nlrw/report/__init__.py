"""The ``report`` stage: one self-contained page that shows a run's result at a glance.

Reads the run directory the other stages wrote and renders ``report/index.html`` (inline CSS,
every figure embedded as a base64 PNG data URI: no network, no JavaScript; it opens from a
file or an e-mail attachment), ``report/report.md`` (the same content as Markdown, linking the
PNGs beside it) and the PNGs themselves (matplotlib's Agg renderer, no pyplot state).

**Contents.**

* *The paper's table in miniature* (:func:`~nlrw.report.paper.paper_table`, first on the
  page after the cards, whose first is the simulated latents' ``coverage`` from ``eval.json``):
  clean, the coder, zero ablation, random active latents, and per calibration the top 20% and
  all of the simulated latents with their controls, mean CE and Δ to zero ablation with CIs and
  p-values beside the paper's numbers, and a paragraph worded from those numbers saying which
  of the paper's findings the run reproduces.
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
  claim in words (:func:`~nlrw.report.content.claim`): "similar to zero ablation" only where
  the paired TOST passes (``equivalent_to_zero``), "better" / "worse" from the Holm-adjusted
  one- and two-sided tests, "inconclusive" otherwise. A summary from before these columns is
  refused with the command that re-runs ``evaluate``.
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

**Modules.** :mod:`~nlrw.report.load` reads the run directory, :mod:`~nlrw.report.figures`
draws the figures, :mod:`~nlrw.report.browser` gathers the latent browser's data,
:mod:`~nlrw.report.content` words the tables and claims, :mod:`~nlrw.report.html` and
:mod:`~nlrw.report.markdown` render them, :mod:`~nlrw.report.format` holds the formatting they
share; the stylesheet is ``report.css``. The options are :class:`ReportConfig`
(:mod:`nlrw.config.report`, importable without torch).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from nlrw.config.report import ReportConfig
from nlrw.lib.io import atomic_write, atomic_write_json, atomic_write_text
from nlrw.lib.provenance import config_hash, stage_record
from nlrw.report.browser import browser_latents, select_browser_latents
from nlrw.report.content import config_items, headline_cards
from nlrw.report.figures import page_figures
from nlrw.report.format import CALIBRATIONS, baseline_labels
from nlrw.report.html import png_data_uri, render_html, token_spans_html
from nlrw.report.load import INPUTS, Run, fingerprint, lookup, read_summary, stage_times
from nlrw.report.markdown import render_md
from nlrw.report.paper import paper_table

__all__ = [
    "INPUTS",
    "ReportConfig",
    "png_data_uri",
    "run",
    "select_browser_latents",
    "token_spans_html",
]


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
    key = config_hash({"config": cfg, "inputs": fingerprint(run_dir)})
    if not overwrite and index.is_file():
        try:
            record = json.loads(record_path.read_text())
        except (OSError, json.JSONDecodeError):
            record = None
        if isinstance(record, dict) and record.get("inputs_hash") == key:
            return index

    r = Run(run_dir)
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
        absent = [c for c in CALIBRATIONS if c not in present]
        if absent:
            r.notes.append(
                f"Calibrations not in this run: {', '.join(absent)} (calibrate stage options)."
            )
    model = lookup(config, "config", "collect", "model")
    if model is None:
        collect_record = r.json("activations/collect.json")
        model = lookup(collect_record, "config", "model")

    evaluation = r.json("eval.json")
    labels = baseline_labels(evaluation)
    headline, diagnosis = page_figures(cfg, r, summary, contexts, scores, metrics, labels)
    browser = browser_latents(cfg, r, scores, explanations, contexts, metrics, model)
    items = config_items(config, contexts)
    cards = headline_cards(summary, recovery, evaluation)
    paper = paper_table(summary, evaluation)
    times = stage_times(r)
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
        render_md(
            run_dir,
            items,
            cards,
            paper,
            recovery,
            headline,
            summary,
            diagnosis,
            browser,
            times,
            notes,
            labels,
        ),
    )
    atomic_write_text(
        index,
        render_html(
            run_dir,
            config,
            items,
            cards,
            paper,
            recovery,
            headline,
            summary,
            diagnosis,
            browser,
            times,
            notes,
            labels,
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
