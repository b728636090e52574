"""The ``evaluate`` stage: how much next-token loss the subject loses when latents are rewritten
from their explanations (Paulo & Belrose 2025, section "partially rewriting").

**What is predicted.** An evaluation context is a window ``t_0 … t_{n-1}`` of ``n = ctx_len``
tokens (``contexts.parquet``, split ``"eval"``; ``t_{n-1}`` is the token the simulator saw
marked). The subject runs on the whole window; at the hookpoint the module's output **at the
last position n-1 only** is replaced; the loss is the cross-entropy (nats) of the logits at
position n-1 against ``target_id``, the token that follows the window in the source text,
``t_n``::

    CE = −log softmax(logits_{n-1})[t_n]

(the paper's "prompt" is our window plus its target: they run on ``prompt[:-1]`` and score
``prompt[-1]``, the same thing).

**Conditions** (one row of ``eval/results.parquet`` each, per context). For a transcoder
``ŷ(z) = W_dec z + b_dec + W_skip x`` with x the MLP input at that position; for an SAE on the
residual stream ``ŷ(z) = W_dec z + b_dec`` with x the hookpoint's output:

* ``clean`` — nothing replaced;
* ``transcoder`` — ``ŷ(z)`` with z the true ``topk(relu(W_enc x + b_enc))``;
* ``zero_ablation`` — ``ŷ(0)`` (``b_dec`` and the skip connection kept);
* ``random_k`` — the true top-k values (descending) placed on k distinct latents drawn
  uniformly at random, seeded by ``(seed, context_id)`` (nlrw's fix of the paper's buggy
  "random active latents");
* ``simulated`` — for each calibration in ``calibration.parquet``, each fraction f and each
  choice: ``n_sel = max(1, ⌊f·N + ½⌋)`` of the N *simulated* latents (those present in
  calibration.parquet) take their calibrated simulated value on the context, every other
  latent keeps its true value, then top-k is re-applied (k of the coder) and decoded:
  ``z' = topk(relu(z with z_l ← s_l for the chosen l))``, ``ŷ(z')``. Latents never simulated
  (no explanation, or not simulated) always keep their true values; their number is recorded.
  Choice ``"top"`` takes the n_sel best by ``balanced_accuracy`` (``scores.parquet``; ties by
  latent id); ``"random"`` takes them from a seeded permutation of the simulated latents, one
  per trial (``n_trials``), the same for every context (``random="fixed"``, so a trial is one
  coherent rewrite, and the subsets of a trial are nested across fractions), or a fresh one
  per (trial, context) with ``random="per-context"`` (the paper's code).

**Controls** (``controls``; each row beside a ``simulated`` row, with its calibration,
fraction, choice, trial and so its chosen latents L; ``s_l`` the calibrated value, ``a_l`` the
true value (0 where the latent is not in the context's true top-k), ``μ_l`` the latent's mean
active value in the cache, ``latents/stats.parquet``); top-k re-applied as for ``simulated``:

* ``matched_zero`` — ``z_l ← 0`` for l ∈ L: zero ablation of just what was rewritten, the
  baseline a partial rewrite must beat;
* ``oracle_support`` — ``z_l ← s_l`` where ``a_l > 0``, else 0: the true support with the
  simulated magnitudes (magnitude error alone);
* ``oracle_magnitude`` — where ``s_l > 0``: ``z_l ← a_l`` if ``a_l > 0`` else ``μ_l``; 0 where
  ``s_l = 0``: the simulated support with true magnitudes (support error alone).
* ``shuffled`` (when the simulate stage ran the shuffled-explanation control, ``shuffled``) —
  as ``simulated``, but the control's latents take their calibrated simulations made with
  another latent's explanation (``calibration_shuffled.parquet``; a seeded derangement), the
  other simulated latents their real ones: its gap to ``simulated`` is what the explanations
  explain, beyond the simulator's prior on the text.

**Synthetic simulators** (``synthetic``, column ``quality``): for each target AUROC in
``synthetic_qualities``, scores made from the true activations of **every latent of the coder**
on every eval context plus seeded noise, tuned so that each latent's AUROC measured on these
contexts is the target (:func:`synthetic_scores`), calibrated as the calibrate stage would
(``synthetic_calibrations``: uncalibrated ``E/9 · max`` and/or quantile normalization with
F_sim fitted on the eval contexts) and rewritten like ``simulated`` rows, with fractions of all
``num_latents`` latents (``synthetic_fractions``). "top" ranks the latents by their measured
synthetic AUROC. No LLM is involved: the map of how faithful a simulator must be for a rewrite
to beat zero ablation.

The true latents are those of the coder applied to the activation the forward pass actually
sees (recomputed in the splice, so the skip term and z use the same x); the latents stored by
the contexts stage only validate the inputs (the agreement is recorded in ``eval.json``).
Top-k re-application uses :func:`nlrw.model.topk.topk_replace` (Rust) on the CPU and a stable sort
on other devices: ties go to the lower latent index in both.

**Efficiency.** Attention is causal, so positions 0…n-2 are the same in every condition: per
group of contexts the model runs once on ``t_0 … t_{n-2}`` (batched; all windows have the same
length, so no padding), keeping the KV cache; then every condition of those contexts runs as one
batch of single-token forwards of ``t_{n-1}`` against that cache, each row's cache selected
from its context's (``Cache.batch_select_indices`` on a fresh copy per batch), with a
:func:`nlrw.model.subject.splice` that gives row r condition r's replacement. This equals the
naive way (a full forward per condition, :func:`grid_ce_full` with ``rows_per_forward=1``)
to float32 rounding, and costs one token per condition instead of ``ctx_len``
(``benches/bench_evaluate.py`` measures the ratio). Rows that make the same replacement run
once (:meth:`Grid.canonical_rows`: every choice and trial of a rewrite of all its latents,
``matched_zero`` across calibrations).

**Statistics** (``eval/summary.parquet``, one row per condition x calibration x quality x
fraction x choice; :func:`summarize`, formulas in :mod:`nlrw.lib.statistics`): mean CE over
contexts (random choice: the trials are averaged per context first) with a percentile bootstrap
95 % CI that resamples the contexts (``n_bootstrap``, seeded, the same resamples for every
condition) and, where latents are drawn at random, the trials too (hierarchical); the paired
difference to zero ablation ``mean_c(CE_c − CE_zero,c)`` with its CI; a two-sided sign-flip
permutation test of that difference (``p_value``; ``n_permutations`` random sign vectors,
seeded), a one-sided one for "better than zero ablation" (``p_better``), a paired TOST of
equivalence to zero ablation within a margin (``p_equivalent``; default margin 25 % of the
zero-ablation − transcoder gap), Holm-adjusted p-values over the summary's comparisons beside
the raw ones, and ``equivalent_to_zero`` (Holm-adjusted TOST p < ``alpha``).

**Every position** (``positions = "all"``, :mod:`nlrw.evaluate.positions`): with the
all-at-once simulate layout, every condition rewrites the hookpoint at every position of the
window and CE is the mean next-token loss over the window; ``last`` (above) is the default.

**Resume.** Contexts are evaluated in parts of ``part_size``, each written atomically to
``eval/results.parts/part-NNNNNN.parquet``; a rerun skips finished parts (:class:`PartStore`,
tagged with the config hash). ``eval/results.parquet``, ``eval/summary.parquet`` and
``eval.json`` are written at the end.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl

from nlrw.config.evaluate import (
    CONTROLS,
    DEFAULT_FRACTIONS,
    DEFAULT_QUALITIES,
    SYNTHETIC_CALIBRATIONS,
    EvaluateConfig,
)
from nlrw.evaluate.forward import grid_ce, grid_ce_full, grid_ce_positions
from nlrw.evaluate.grid import CONDITIONS, Grid, GridRow, Synthetic, n_selected, topk_replace_torch
from nlrw.evaluate.inputs import Inputs, read_inputs
from nlrw.evaluate.positions import check_layout, position_ids, position_values
from nlrw.evaluate.statistics import (
    RESULTS_SCHEMA,
    SUMMARY_COLUMNS_SINCE_CONTROLS,
    SUMMARY_SCHEMA,
    equivalence_margin_of,
    results_frame,
    summarize,
)
from nlrw.evaluate.synthetic import synthetic_scores, synthetic_values
from nlrw.lib.io import atomic_path, atomic_write_json
from nlrw.lib.parts import PartStore, remove_tree
from nlrw.lib.progress import progress_bar
from nlrw.lib.provenance import config_hash, stage_record
from nlrw.lib.rundir import RunDir
from nlrw.lib.statistics import paired_sign_flip_p
from nlrw.model.subject import Subject

__all__ = [
    "CONDITIONS",
    "CONTROLS",
    "DEFAULT_FRACTIONS",
    "DEFAULT_QUALITIES",
    "RESULTS_SCHEMA",
    "SUMMARY_COLUMNS_SINCE_CONTROLS",
    "SUMMARY_SCHEMA",
    "SYNTHETIC_CALIBRATIONS",
    "EvaluateConfig",
    "Grid",
    "GridRow",
    "Synthetic",
    "equivalence_margin_of",
    "grid_ce",
    "grid_ce_full",
    "grid_ce_positions",
    "n_selected",
    "paired_sign_flip_p",
    "run",
    "summarize",
    "synthetic_scores",
    "synthetic_values",
    "topk_replace_torch",
]


def _parts_hash(cfg: EvaluateConfig, hookpoint: str, model: str, inputs: Inputs) -> str:
    """The tag of the checkpointed parts: a resumed run mixes in only parts of the same grid."""
    # Options that cannot change a result (up to float rounding) stay out of the hash, so a
    # resumed run may change them.
    stable = replace(cfg, progress=True, batch_size=1)
    return config_hash(
        {
            "config": stable,
            "hookpoint": hookpoint,
            "model": model,
            "latents": inputs.latents.tolist(),
            "contexts": inputs.context_ids.tolist(),
            "shuffled": inputs.shuffled is not None,
        }
    )


def run(
    cfg: EvaluateConfig,
    run_dir: str | Path,
    *,
    hookpoint: str,
    model: str,
    overwrite: bool = False,
    subject: Subject | None = None,
) -> pl.DataFrame:
    """Evaluate the grid on the run's eval contexts; returns the summary.

    Reads ``contexts.parquet`` + ``contexts/activations.safetensors``, ``calibration.parquet``,
    ``scores.parquet`` (for "top"), the coder at ``transcoder/<hookpoint>``; writes
    ``eval/results.parquet``, ``eval/summary.parquet`` and ``eval.json``. ``subject`` may be
    passed already loaded (else ``load_subject(model, dtype=cfg.dtype)``).
    """
    from nlrw.model.subject import load_subject

    paths = RunDir(run_dir)
    parts_dir = paths.eval / "results.parts"
    if overwrite:
        remove_tree(parts_dir)
    every_position = cfg.positions == "all"
    if every_position:
        check_layout(paths)
    # positions = all: the synthetic simulators need every latent's truth at every position,
    # which no stage stores; they are left out (recorded).
    inputs, coder = read_inputs(
        paths, replace(cfg, synthetic_qualities=()) if every_position else cfg, hookpoint
    )
    grid_ids = inputs.context_ids
    if every_position:
        inputs.values, inputs.shuffled = position_values(paths, inputs, coder.k)
        grid_ids = position_ids(inputs.context_ids, int(inputs.notes["ctx_len"]))
    ce_of = grid_ce_positions if every_position else grid_ce
    grid = Grid.build(
        cfg,
        inputs.latents,
        inputs.values,
        grid_ids,
        balanced_accuracy=inputs.balanced_accuracy,
        k=coder.k,
        num_latents=coder.num_latents,
        mean_active=inputs.mean_active,
        synthetic=inputs.synthetic,
        shuffled=inputs.shuffled,
    )
    store = PartStore(parts_dir, _parts_hash(cfg, hookpoint, model, inputs))
    n = len(inputs.context_ids)
    starts = list(range(0, n, cfg.part_size))
    todo = [p for p in range(len(starts)) if not store.done(p)]
    done = n - sum(min(cfg.part_size, n - starts[p]) for p in todo)
    if subject is None and todo:
        device = None if cfg.device == "auto" else cfg.device
        subject = load_subject(model, dtype=cfg.dtype, device=device)
    if subject is not None:
        coder = coder.to(subject.device)
    started = time.perf_counter()
    evaluated = 0
    bar = progress_bar(n, "evaluate", "ctx", enabled=cfg.progress, initial=done)
    try:
        for p in todo:
            sl = slice(starts[p], starts[p] + cfg.part_size)
            assert subject is not None
            ce = ce_of(
                subject.model,
                coder,
                hookpoint,
                grid,
                inputs.input_ids[sl],
                inputs.targets[sl],
                inputs.context_ids[sl],
                batch_size=cfg.batch_size,
            )
            frame = results_frame(grid, ce, inputs.context_ids[sl])
            with atomic_path(store.path(p)) as tmp:
                frame.write_parquet(tmp)
            evaluated += ce.shape[0]
            if bar is not None:
                bar.update(ce.shape[0])
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - started
    results = store.merge(RESULTS_SCHEMA).sort("context_id", maintain_order=True)
    selected = {
        (r.condition, r.calibration, r.quality, r.fraction, r.choice): r.n_selected
        for r in grid.rows
    }
    summary = summarize(
        results,
        n_bootstrap=cfg.n_bootstrap,
        n_permutations=cfg.n_permutations,
        seed=cfg.seed,
        n_selected_of=selected,
        equivalence_margin=cfg.equivalence_margin,
        equivalence_margin_nats=cfg.equivalence_margin_nats,
        alpha=cfg.alpha,
    )
    with atomic_path(paths.eval / "results.parquet") as tmp:
        results.write_parquet(tmp)
    with atomic_path(paths.eval / "summary.parquet") as tmp:
        summary.write_parquet(tmp)
    atomic_write_json(
        paths.eval_record,
        stage_record(
            "evaluate",
            cfg,
            hookpoint=hookpoint,
            model=model,
            coder_kind=coder.cfg.kind,
            k=coder.k,
            num_latents=coder.num_latents,
            dtype=cfg.dtype if subject is None else str(subject.dtype).removeprefix("torch."),
            device=cfg.device if subject is None else str(subject.device),
            predicted_token=(
                "every next token of the window (t_1 .. t_n, t_n = target_id), predicted at "
                "every position, the hookpoint output replaced at every position; CE is the "
                "mean over the window"
                if every_position
                else "target_id: the token after the ctx_len window, predicted from the logits "
                "at the window's last position (where the hookpoint output is replaced)"
            ),
            positions_per_context=int(inputs.notes["ctx_len"]) if every_position else 1,
            synthetic=(
                "left out: positions = all (the synthetic simulators know the last position only)"
                if every_position and cfg.synthetic_qualities
                else None
            ),
            n_contexts=n,
            n_conditions_per_context=len(grid.rows),
            n_distinct_conditions_per_context=len(np.unique(grid.canonical_rows())),
            calibrations=sorted(inputs.values),
            n_simulated_latents=len(inputs.latents),
            contexts_evaluated_now=evaluated,
            seconds=seconds,
            contexts_per_s=evaluated / seconds if evaluated and seconds > 0 else None,
            **inputs.notes,
        ),
    )
    return summary
