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

**Resume.** Contexts are evaluated in parts of ``part_size``, each written atomically to
``eval/results.parts/part-NNNNNN.parquet``; a rerun skips finished parts (:class:`PartStore`,
tagged with the config hash). ``eval/results.parquet``, ``eval/summary.parquet`` and
``eval.json`` are written at the end.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import polars as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from nlrw.lib import statistics as _stats
from nlrw.lib.io import atomic_path, atomic_write_json
from nlrw.lib.parts import PartStore, remove_tree
from nlrw.lib.provenance import config_hash, stage_record
from nlrw.lib.rundir import RunDir
from nlrw.lib.statistics import paired_sign_flip_p
from nlrw.model import topk as _topk
from nlrw.model.sparse import SparseCoder
from nlrw.model.subject import Subject, splice

__all__ = [
    "CONDITIONS",
    "CONTROLS",
    "DEFAULT_FRACTIONS",
    "DEFAULT_QUALITIES",
    "SYNTHETIC_CALIBRATIONS",
    "EvaluateConfig",
    "Grid",
    "GridRow",
    "Synthetic",
    "equivalence_margin_of",
    "grid_ce",
    "grid_ce_full",
    "n_selected",
    "paired_sign_flip_p",
    "run",
    "summarize",
    "synthetic_scores",
    "synthetic_values",
    "topk_replace_torch",
]

log = logging.getLogger(__name__)

CONDITIONS = (
    "clean",
    "transcoder",
    "zero_ablation",
    "random_k",
    "simulated",
    "matched_zero",
    "oracle_support",
    "oracle_magnitude",
    "synthetic",
    "shuffled",
)
"""Condition names, in the order of the grid and the summary."""

CONTROLS = ("matched_zero", "oracle_support", "oracle_magnitude")
"""The controls evaluated beside each simulated row (same calibration, fraction, choice and
trial)."""

DEFAULT_FRACTIONS = (0.001, 0.01, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0)
"""The paper's fractions of simulated latents."""

DEFAULT_QUALITIES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
"""Target AUROCs of the synthetic simulators."""

SYNTHETIC_CALIBRATIONS = ("uncalibrated", "quantile")
"""Calibrations a synthetic simulator can be given (both need only the cache's statistics)."""

Choice = Literal["top", "random"]
RandomMode = Literal["fixed", "per-context"]

(
    _CLEAN,
    _TRUE,
    _ZERO,
    _RANDOM_K,
    _SIMULATED,
    _MATCHED_ZERO,
    _ORACLE_SUPPORT,
    _ORACLE_MAGNITUDE,
    _SYNTHETIC,
    _SHUFFLED,
) = range(10)
_REWRITES = (
    _SIMULATED,
    _MATCHED_ZERO,
    _ORACLE_SUPPORT,
    _ORACLE_MAGNITUDE,
    _SYNTHETIC,
    _SHUFFLED,
)
# Seed-stream tags, so that the draws of different purposes never share a stream.
(
    _TAG_FIXED,
    _TAG_PER_CONTEXT,
    _TAG_RANDOM_K,
    _TAG_BOOTSTRAP,
    _TAG_PERMUTATION,
    _TAG_SYNTHETIC_NOISE,
    _TAG_SYNTHETIC_FIXED,
    _TAG_SYNTHETIC_PER_CONTEXT,
    _TAG_BOOTSTRAP_TRIALS,
) = range(9)


@dataclass(frozen=True)
class EvaluateConfig:
    """Options of the ``evaluate`` stage (defaults: the paper's grid, nlrw's fixed trials)."""

    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    """Fractions f in (0, 1] of the simulated latents given simulated values
    (n_sel = max(1, round(f x number simulated)))."""

    choices: tuple[Choice, ...] = ("top", "random")
    """How the n_sel latents are chosen: "top" by balanced accuracy (scores.parquet), "random"
    seeded (see n_trials and random)."""

    n_trials: int = 5
    """Random choices drawn per fraction (seeded); their CE is averaged per context."""

    random: RandomMode = "fixed"
    """"fixed": one random subset per trial for every context (a coherent rewrite);
    "per-context": a fresh subset per trial and context (the paper's code)."""

    calibrations: tuple[str, ...] | None = None
    """Calibrations of calibration.parquet to evaluate (None: all present)."""

    missing_explanations: Literal["exclude", "error"] = "exclude"
    """Latents active on eval contexts that were never simulated (no usable explanation), and
    simulated latents without a balanced accuracy when "top" is a choice: "exclude" keeps their
    true values (their number is recorded), "error" refuses to evaluate."""

    max_contexts: int | None = None
    """Evaluate only the first this many eval contexts (None: all)."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """Precision of the subject model (recorded; "auto" is bfloat16 on a GPU)."""

    device: str = "auto"
    """Device of the subject and the coder ("auto": the first GPU, else the CPU)."""

    batch_size: int = 256
    """Rows (context x condition) per single-token forward; contexts are grouped so that
    their conditions fill a batch. Memory: each row holds its own copy of the prefix's KV
    cache (2 x layers x ctx_len x kv width floats)."""

    part_size: int = 16
    """Contexts per checkpointed part (a kill loses at most one part)."""

    n_bootstrap: int = 1000
    """Bootstrap resamples of the contexts for the 95 % confidence intervals."""

    n_permutations: int = 10000
    """Random sign flips of the paired sign-flip tests against zero ablation."""

    shuffled: bool | None = None
    """The shuffled-explanation control (condition shuffled, beside every simulated row):
    the latents of the simulate stage's control take their calibrated simulations made with
    another latent's explanation (calibration_shuffled.parquet), the others their real ones.
    None: when the run has the control; true: required (an error says how to make it)."""

    controls: tuple[str, ...] = CONTROLS
    """Controls evaluated beside every simulated row: matched_zero (the rewritten latents set
    to 0), oracle_support (simulated values on the true support), oracle_magnitude (the
    simulated support with true magnitudes; needs the cache's mean active values)."""

    synthetic_qualities: tuple[float, ...] = DEFAULT_QUALITIES
    """Target AUROCs in [0.5, 1] of the synthetic simulators, evaluated on every latent of the
    coder (empty: no synthetic condition)."""

    synthetic_calibrations: tuple[str, ...] = SYNTHETIC_CALIBRATIONS
    """Calibrations of the synthetic scores: uncalibrated and/or quantile."""

    synthetic_fractions: tuple[float, ...] | None = (1.0,)
    """Fractions of all the coder's latents rewritten by the synthetic simulators (None: the
    same as fractions). Default: every latent, the frontier's question; each further
    fraction costs a row per quality, calibration, choice and trial."""

    equivalence_margin: float = 0.25
    """TOST margin against zero ablation, as a fraction of the gap mean CE(zero ablation) -
    mean CE(transcoder) measured on the same contexts; > 0."""

    equivalence_margin_nats: float | None = None
    """TOST margin in nats, instead of the fraction of the gap (None: use
    equivalence_margin); > 0."""

    alpha: float = 0.05
    """Level of the equivalence test and of the Holm-adjusted claims, in (0, 1)."""

    seed: int = 0
    """Seed of the random choices, random_k latents, bootstrap and permutation test."""

    progress: bool = True
    """Show a progress bar (contexts/s)."""

    def __post_init__(self) -> None:
        if not self.fractions:
            raise ValueError("fractions must not be empty")
        for f in self.fractions:
            if not (isinstance(f, int | float) and 0.0 < f <= 1.0):
                raise ValueError(f"every fraction must be in (0, 1], got {f!r}")
        if len(set(self.fractions)) != len(self.fractions):
            raise ValueError(f"fractions must be distinct, got {self.fractions}")
        if not self.choices or any(c not in ("top", "random") for c in self.choices):
            raise ValueError(f"choices must be a non-empty subset of top, random: {self.choices}")
        if len(set(self.choices)) != len(self.choices):
            raise ValueError(f"choices must be distinct, got {self.choices}")
        if self.random not in ("fixed", "per-context"):
            raise ValueError(f"random must be 'fixed' or 'per-context', not {self.random!r}")
        if self.missing_explanations not in ("exclude", "error"):
            raise ValueError(
                "missing_explanations must be 'exclude' or 'error', "
                f"not {self.missing_explanations!r}"
            )
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16: {self.dtype!r}")
        for name in ("n_trials", "batch_size", "part_size", "n_bootstrap", "n_permutations"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_contexts is not None and self.max_contexts < 1:
            raise ValueError(f"max_contexts must be at least 1, got {self.max_contexts}")
        if self.calibrations is not None and not self.calibrations:
            raise ValueError("calibrations must be None (all) or name at least one")
        unknown = [c for c in self.controls if c not in CONTROLS]
        if unknown or len(set(self.controls)) != len(self.controls):
            raise ValueError(
                f"controls must be distinct names among {', '.join(CONTROLS)}, got {self.controls}"
            )
        for q in self.synthetic_qualities:
            if not (isinstance(q, int | float) and 0.5 <= q <= 1.0):
                raise ValueError(f"every synthetic_qualities level must be in [0.5, 1], got {q!r}")
        if len(set(self.synthetic_qualities)) != len(self.synthetic_qualities):
            raise ValueError(f"synthetic_qualities must be distinct: {self.synthetic_qualities}")
        bad = [c for c in self.synthetic_calibrations if c not in SYNTHETIC_CALIBRATIONS]
        if bad or len(set(self.synthetic_calibrations)) != len(self.synthetic_calibrations):
            raise ValueError(
                "synthetic_calibrations must be distinct names among "
                f"{', '.join(SYNTHETIC_CALIBRATIONS)}, got {self.synthetic_calibrations}"
            )
        if self.synthetic_qualities and not self.synthetic_calibrations:
            raise ValueError("synthetic_calibrations must name at least one calibration")
        if self.synthetic_fractions is not None:
            if not self.synthetic_fractions:
                raise ValueError("synthetic_fractions must be None (as fractions) or not empty")
            for f in self.synthetic_fractions:
                if not (isinstance(f, int | float) and 0.0 < f <= 1.0):
                    raise ValueError(
                        f"every synthetic_fractions entry must be in (0, 1], got {f!r}"
                    )
            if len(set(self.synthetic_fractions)) != len(self.synthetic_fractions):
                raise ValueError(
                    f"synthetic_fractions must be distinct: {self.synthetic_fractions}"
                )
        _check_margin("equivalence_margin", self.equivalence_margin)
        if self.equivalence_margin_nats is not None:
            _check_margin("equivalence_margin_nats", self.equivalence_margin_nats)
        if not (isinstance(self.alpha, int | float) and 0.0 < self.alpha < 1.0):
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha!r}")


def _check_margin(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0 (an equivalence margin), got {value!r}")


# --------------------------------------------------------------------------------------------
# The grid of conditions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridRow:
    """One condition evaluated on every context."""

    condition: str
    """One of :data:`CONDITIONS`."""
    calibration: str | None = None
    """The calibration whose values are used (rewrites only)."""
    fraction: float | None = None
    """Fraction of the rewritable latents rewritten (rewrites only)."""
    choice: str | None = None
    """"top" or "random" (rewrites only)."""
    trial: int = 0
    """Trial of a random choice (0 otherwise)."""
    n_selected: int = 0
    """Latents rewritten (rewrites only)."""
    quality: float | None = None
    """Target AUROC of the synthetic simulator (synthetic only)."""


def n_selected(fraction: float, n_simulated: int) -> int:
    """``max(1, ⌊f·N + ½⌋)``: latents rewritten at fraction f of N simulated (half rounds up)."""
    return max(1, math.floor(fraction * n_simulated + 0.5))


def topk_replace_torch(
    values: Tensor,
    indices: Tensor,
    rows: Tensor,
    latents: Tensor,
    new_values: Tensor,
    k: int,
    num_latents: int,
) -> tuple[Tensor, Tensor]:
    """:func:`nlrw.model.topk.topk_replace` in torch (any device), with the same contract.

    Dense ``[n, num_latents]`` rows, the replacements written in (no duplicate (row, latent)
    pairs may be given), then a **stable** descending sort: ties go to the lower latent index
    and a row with fewer than k positive entries is padded with zeros at its lowest unused
    indices, as the Rust kernel does.
    """
    dense = torch.zeros(values.shape[0], num_latents, dtype=torch.float32, device=values.device)
    dense.scatter_(1, indices.long(), values.float().clamp_min(0))
    # Padding entries (value 0) scattered above are harmless: zero is zero.
    dense[rows.long(), latents.long()] = new_values.float()
    dense.clamp_(min=0)
    sorted_v, sorted_i = torch.sort(dense, dim=1, descending=True, stable=True)
    return sorted_v[:, :k].contiguous(), sorted_i[:, :k].contiguous()


# --------------------------------------------------------------------------------------------
# Synthetic simulators
# --------------------------------------------------------------------------------------------


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    return torch.special.ndtr(torch.from_numpy(np.asarray(x, dtype=np.float64))).numpy()


def synthetic_scores(
    true: np.ndarray,
    quality: float,
    scale: np.ndarray,
    noise: np.ndarray,
    rounding: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Scores ``E`` ``[n_contexts, L]`` of a synthetic simulator of AUROC ``quality``, and the
    AUROC each latent measures (NaN where the contexts hold one class only).

    ``true`` ``[n_contexts, L]``: the true activations; ``scale`` ``[L]`` > 0: the activation
    an ``E = 9`` stands for (the cache's max); ``noise`` ``[n_contexts, L]`` standard normal
    draws (seeded by the caller, the same for every quality so that the levels differ only in
    their signal).

    * ``quality = 1``: the exact simulator ``E = 9 · a / scale`` (uncalibrated maps it back
      to ``a``).
    * ``quality < 1``: a binormal simulator ``E = 9 · Φ(x)``, ``x = z`` on the contexts where
      the latent is inactive and ``x = d_l + z`` where it is active, the active contexts'
      draws sorted in the order of their true activations (so that the ranking among active
      contexts, and with it the magnitudes a quantile calibration gives, is right). The
      shift ``d_l`` is tuned per latent so that the AUROC **measured on these contexts** is
      the target: with ``P`` active and ``N`` inactive contexts, ``AUROC(d) = #{(i, j):
      z_j − z_i < d} / (P·N)``, so ``d`` is taken between the m-th and (m+1)-th smallest
      pairwise difference ``z_j − z_i``, ``m = ⌊quality · P·N + u_l⌋``: the measured AUROC is
      ``m / (P·N)``, one of the two attainable values around the target, and with ``u_l``
      uniform in [0, 1) (``rounding``, seeded by the caller; 0.5 when None: the nearest)
      the rounding is unbiased, ``E[m] = quality · P·N``, so the mean measured AUROC over
      latents is the target even where P·N is small. A latent with one class only gets
      ``x = z`` (pure noise). At ``quality = 0.5`` the active contexts rank among the
      inactive ones as often above as below: uninformative for detection (the order among
      active contexts still follows their magnitudes).

    The score scale is a choice: an inactive context gets ``9 · Φ(z)``, median 4.5 (the
    demo's real simulator rates every context 4.9 ± 0.3). Quantile normalization uses ranks
    only and does not depend on it; the uncalibrated mapping does: it gives inactive contexts
    about half the latent's max below quality 1, so its curve stays high until the exact
    simulator at 1.
    """
    if not 0.5 <= quality <= 1.0:
        raise ValueError(f"synthetic_qualities levels must be in [0.5, 1], got {quality}")
    t = np.asarray(true, dtype=np.float64)
    n_ctx, n_lat = t.shape
    active = t > 0
    n_pos = active.sum(axis=0)
    measured = np.full(n_lat, np.nan)
    both = (n_pos > 0) & (n_pos < n_ctx)
    if quality == 1.0:
        measured[both] = 1.0
        return (9.0 * t / np.asarray(scale, dtype=np.float64)[None, :]), measured
    x = np.array(noise, dtype=np.float64, copy=True)
    for j in np.flatnonzero(both):
        pos = np.flatnonzero(active[:, j])
        neg = np.flatnonzero(~active[:, j])
        z_pos = np.sort(x[pos, j])
        # the largest draws to the largest activations (stable: ties by context)
        x[pos[np.argsort(t[pos, j], kind="stable")], j] = z_pos
        diffs = np.sort((x[neg, j][:, None] - z_pos[None, :]).ravel())
        total = diffs.size
        u = 0.5 if rounding is None else float(rounding[j])
        m = math.floor(quality * total + u)
        if m <= 0:
            d = diffs[0] - 1.0
        elif m >= total:
            d = diffs[-1] + 1.0
        else:
            d = 0.5 * (diffs[m - 1] + diffs[m])
        x[pos, j] += d
        measured[j] = m / total
    return 9.0 * _normal_cdf(x), measured


def synthetic_values(
    true: np.ndarray,
    qualities: Sequence[float],
    calibrations: Sequence[str],
    *,
    max_activation: np.ndarray,
    active_tables: np.ndarray,
    frequency: np.ndarray,
    seed: int,
) -> tuple[dict[tuple[str, float], np.ndarray], dict[float, np.ndarray]]:
    """Calibrated activations of every synthetic simulator on every latent and context.

    ``true`` ``[n_contexts, L]`` (all L latents of the coder), ``max_activation`` ``[L]``,
    ``active_tables`` ``[L, Q]`` and ``frequency`` ``[L]`` from the cache's statistics (its
    reference: :mod:`nlrw.cache`). Scores from
    :func:`synthetic_scores` (scale: the cache's max, or the largest true activation on these
    contexts for a latent the cache never saw active); calibrations as the calibrate stage
    computes them (:func:`nlrw.calibrate.uncalibrated`, :func:`nlrw.calibrate.
    quantile_calibrate` with F_sim fitted on the evaluated contexts, the paper's protocol),
    clipped at 0. Returns ``{(calibration, quality): float32 [n_contexts, L]}`` and the
    measured AUROC of each latent per quality.
    """
    from nlrw.calibrate import quantile_calibrate, uncalibrated

    t = np.asarray(true, dtype=np.float32)
    n_ctx, n_lat = t.shape
    max_a = np.asarray(max_activation, dtype=np.float64)
    scale = np.where(max_a > 0, max_a, t.max(axis=0, initial=0.0))
    scale = np.where(scale > 0, scale, 1.0)
    noise = np.random.default_rng([seed, _TAG_SYNTHETIC_NOISE]).standard_normal((n_ctx, n_lat))
    rounding = np.random.default_rng([seed, _TAG_SYNTHETIC_NOISE, 2]).random(n_lat)
    index = np.tile(np.arange(n_lat, dtype=np.int64), n_ctx)
    values: dict[tuple[str, float], np.ndarray] = {}
    measured: dict[float, np.ndarray] = {}
    for q in qualities:
        scores, measured[float(q)] = synthetic_scores(t, float(q), scale, noise, rounding)
        flat = scores.astype(np.float32).reshape(-1)
        for cal in calibrations:
            if cal == "uncalibrated":
                a = uncalibrated(scores, max_a[None, :])
            elif cal == "quantile":
                offsets = np.random.default_rng([seed, _TAG_SYNTHETIC_NOISE, 1]).random(flat.size)
                a, _ = quantile_calibrate(
                    index, flat, index, flat, active_tables, frequency, 0, offsets - 0.5
                )
                a = np.asarray(a).reshape(n_ctx, n_lat)
            else:
                raise ValueError(f"unknown synthetic calibration {cal!r}")
            values[(cal, float(q))] = np.maximum(np.asarray(a, dtype=np.float32), 0.0)
    return values, measured


class Synthetic:
    """The synthetic simulators of a grid: every latent of the coder, on every context.

    ``values[(calibration, quality)]`` float32 ``[n_contexts, num_latents]``; ``auroc[quality]``
    the AUROC each latent measures (NaN: one class), which ranks the latents for the "top"
    choice (highest first, NaN last, ties by latent id).
    """

    def __init__(
        self, values: dict[tuple[str, float], np.ndarray], auroc: dict[float, np.ndarray]
    ) -> None:
        self.values = values
        self.auroc = auroc
        self._top: dict[float, np.ndarray] = {}

    def top_order(self, quality: float) -> np.ndarray:
        if quality not in self._top:
            a = self.auroc[quality]
            key = np.where(np.isnan(a), -np.inf, a)
            self._top[quality] = np.lexsort((np.arange(len(a)), -key))
        return self._top[quality]


class Grid:
    """The conditions of an evaluation and everything they need per context.

    Args:
        rows: the conditions (see :meth:`build`).
        latents: the N simulated latent ids, ascending.
        values: calibration name -> float32 ``[n_contexts, N]`` calibrated simulated
            activations, row i for ``context_ids[i]``, column j for ``latents[j]``.
        context_ids: the contexts the value rows belong to.
        top_order: positions into ``latents``, best balanced accuracy first (None without
            "top").
        random: "fixed" or "per-context".
        seed: seed of every random draw.
        k, num_latents: the coder's.
        mean_active: ``[N]`` each simulated latent's mean active value in the cache (needed by
            ``oracle_magnitude`` rows).
        synthetic: the synthetic simulators (needed by ``synthetic`` rows).
        shuffled: calibration name -> float32 ``[n_contexts, N]`` like ``values``, the
            shuffled-explanation control's columns in place (needed by ``shuffled`` rows).

    Attribute ``torch_topk``: re-apply top-k with :func:`topk_replace_torch` even on the CPU
    (what a GPU always uses; the tests compare both paths).
    """

    def __init__(
        self,
        rows: Sequence[GridRow],
        latents: npt.ArrayLike,
        values: dict[str, np.ndarray],
        context_ids: npt.ArrayLike,
        *,
        top_order: np.ndarray | None,
        random: RandomMode,
        seed: int,
        k: int,
        num_latents: int,
        mean_active: npt.ArrayLike | None = None,
        synthetic: Synthetic | None = None,
        shuffled: dict[str, np.ndarray] | None = None,
    ) -> None:
        self.rows = list(rows)
        self.shuffled = shuffled
        self.latents = np.asarray(latents, dtype=np.int64)
        self.values = values
        self.context_ids = np.asarray(context_ids, dtype=np.int64)
        self.top_order = top_order
        self.random = random
        self.seed = seed
        self.k = k
        self.num_latents = num_latents
        self.mean_active = (
            None if mean_active is None else np.asarray(mean_active, dtype=np.float32)
        )
        self.synthetic = synthetic
        self._all_latents = np.arange(num_latents, dtype=np.int64)
        self._ctx_pos = {int(c): i for i, c in enumerate(self.context_ids)}
        self._kind = np.array([CONDITIONS.index(r.condition) for r in self.rows], dtype=np.int64)
        self._fixed: dict[tuple[bool, int], np.ndarray] = {}
        self.torch_topk = False
        n = len(self.latents)
        if (self._kind == _SHUFFLED).any() and shuffled is None:
            raise ValueError("shuffled rows need the shuffled control's calibrated values")
        for name, v in [*values.items(), *(shuffled or {}).items()]:
            if v.shape != (len(self.context_ids), n):
                raise ValueError(
                    f"values of calibration {name!r} have shape {v.shape}, expected "
                    f"{(len(self.context_ids), n)}"
                )
        if (self._kind == _ORACLE_MAGNITUDE).any() and (
            self.mean_active is None or self.mean_active.shape != (n,)
        ):
            raise ValueError("oracle_magnitude rows need the mean active value of each latent")
        if (self._kind == _SYNTHETIC).any():
            if synthetic is None:
                raise ValueError("synthetic rows need the synthetic simulators' values")
            for key, v in synthetic.values.items():
                if v.shape != (len(self.context_ids), num_latents):
                    raise ValueError(
                        f"synthetic values {key} have shape {v.shape}, expected "
                        f"{(len(self.context_ids), num_latents)}"
                    )

    @classmethod
    def build(
        cls,
        cfg: EvaluateConfig,
        latents: npt.ArrayLike,
        values: dict[str, np.ndarray],
        context_ids: npt.ArrayLike,
        *,
        balanced_accuracy: npt.ArrayLike | None,
        k: int,
        num_latents: int,
        mean_active: npt.ArrayLike | None = None,
        synthetic: Synthetic | None = None,
        shuffled: dict[str, np.ndarray] | None = None,
    ) -> Grid:
        """The grid of ``cfg``: the four baselines; then for each calibration (sorted),
        choice and fraction the simulated rows (``n_trials`` of them for "random"), each
        followed by its ``cfg.controls`` (same calibration, fraction, choice and trial); then,
        when ``synthetic`` is given, for each quality, synthetic calibration, choice and
        synthetic fraction the synthetic rows over all ``num_latents`` latents.

        ``balanced_accuracy[j]`` ranks ``latents[j]`` for the "top" choice (NaN ranks last).
        """
        lat = np.asarray(latents, dtype=np.int64)
        if lat.ndim != 1 or len(lat) == 0:
            raise ValueError("a grid needs at least one simulated latent")
        rows = [GridRow(c) for c in CONDITIONS[:4]]
        for cal in sorted(values):
            for choice in cfg.choices:
                for f in cfg.fractions:
                    trials = range(cfg.n_trials) if choice == "random" else range(1)
                    for t in trials:
                        n_sel = n_selected(f, len(lat))
                        also = ("shuffled",) if shuffled is not None and cal in shuffled else ()
                        for condition in ("simulated", *cfg.controls, *also):
                            rows.append(GridRow(condition, cal, float(f), choice, t, n_sel))
        if synthetic is not None and cfg.synthetic_qualities:
            fractions = cfg.synthetic_fractions or cfg.fractions
            for q in cfg.synthetic_qualities:
                for cal in cfg.synthetic_calibrations:
                    for choice in cfg.choices:
                        for f in fractions:
                            trials = range(cfg.n_trials) if choice == "random" else range(1)
                            for t in trials:
                                n_sel = n_selected(f, num_latents)
                                rows.append(
                                    GridRow("synthetic", cal, float(f), choice, t, n_sel, float(q))
                                )
        top_order = None
        if "top" in cfg.choices:
            if balanced_accuracy is None:
                raise ValueError("the 'top' choice needs balanced accuracies")
            ba = np.asarray(balanced_accuracy, dtype=np.float64)
            key = np.where(np.isnan(ba), -np.inf, ba)
            top_order = np.lexsort((lat, -key))
        return cls(
            rows,
            lat,
            values,
            context_ids,
            top_order=top_order,
            random=cfg.random,
            seed=cfg.seed,
            k=k,
            num_latents=num_latents,
            mean_active=mean_active,
            synthetic=synthetic,
            shuffled=shuffled,
        )

    def canonical_rows(self) -> np.ndarray:
        """For each row, the first row that makes the same replacement on every context (so
        that :func:`grid_ce` runs it once): a rewrite's latents depend on its choice, trial
        and number selected only, and when it selects all of its latents not even on those;
        ``matched_zero`` does not depend on the calibration. :func:`grid_ce_full` evaluates
        every row, and the tests compare the two."""
        first: dict[tuple[Any, ...], int] = {}
        out = np.arange(len(self.rows))
        for i, r in enumerate(self.rows):
            if r.condition in CONDITIONS[:4]:
                continue
            n_all = self.num_latents if r.quality is not None else len(self.latents)
            which = ("all",) if r.n_selected >= n_all else (r.choice, r.trial, r.n_selected)
            calibration = None if r.condition == "matched_zero" else r.calibration
            out[i] = first.setdefault((r.condition, calibration, r.quality, *which), i)
        return out

    # ---------------------------------------------------------------- draws
    def order(
        self, choice: str, trial: int, context_id: int, *, quality: float | None = None
    ) -> np.ndarray:
        """Positions in the order a choice takes them (prefix = chosen): into :attr:`latents`,
        or, for a synthetic row (``quality`` given), into all ``num_latents`` latents."""
        synthetic = quality is not None
        if choice == "top":
            if synthetic:
                assert self.synthetic is not None
                return self.synthetic.top_order(quality)
            assert self.top_order is not None
            return self.top_order
        n = self.num_latents if synthetic else len(self.latents)
        if self.random == "fixed":
            if (synthetic, trial) not in self._fixed:
                tag = _TAG_SYNTHETIC_FIXED if synthetic else _TAG_FIXED
                rng = np.random.default_rng([self.seed, tag, trial])
                self._fixed[(synthetic, trial)] = rng.permutation(n)
            return self._fixed[(synthetic, trial)]
        tag = _TAG_SYNTHETIC_PER_CONTEXT if synthetic else _TAG_PER_CONTEXT
        rng = np.random.default_rng([self.seed, tag, trial, context_id])
        return rng.permutation(n)

    def random_k_latents(self, context_id: int) -> np.ndarray:
        """The k distinct random latents of ``random_k`` on a context (seeded by its id)."""
        rng = np.random.default_rng([self.seed, _TAG_RANDOM_K, context_id])
        return rng.choice(self.num_latents, size=self.k, replace=False)

    # ---------------------------------------------------------------- replacement
    def replacement(
        self,
        coder: SparseCoder,
        src: Tensor,
        y: Tensor,
        row_index: np.ndarray,
        context_ids: np.ndarray,
    ) -> Tensor:
        """The hookpoint's output at the last position for each row ``[R, d_out]``.

        ``src`` ``[R, d_in]`` is the coder's input seen by row r (the MLP input for a
        transcoder, the hookpoint output for an SAE), ``y`` ``[R, d_out]`` the real output,
        ``row_index[r]`` the grid row and ``context_ids[r]`` the context of row r. The true
        latents of a context are encoded once, from its first row.
        """
        kinds = self._kind[row_index]
        out_dtype = y.dtype
        uniq, first, inverse = np.unique(context_ids, return_index=True, return_inverse=True)
        true_v, true_i = coder.encode(src[torch.as_tensor(first, device=src.device)])
        true_v, true_i = true_v.float(), true_i.long()
        inv = torch.as_tensor(inverse, device=true_v.device)
        values, indices = true_v[inv].clone(), true_i[inv].clone()

        zero = np.flatnonzero(kinds == _ZERO)
        if len(zero):
            values[torch.as_tensor(zero, device=values.device)] = 0.0
        rand = np.flatnonzero(kinds == _RANDOM_K)
        if len(rand):
            drawn = np.stack([self.random_k_latents(int(context_ids[r])) for r in rand])
            indices[torch.as_tensor(rand, device=indices.device)] = torch.as_tensor(
                drawn, device=indices.device
            )
        sim = np.flatnonzero(np.isin(kinds, _REWRITES))
        if len(sim):
            new_v, new_i = self._rewritten(
                values[torch.as_tensor(sim, device=values.device)],
                indices[torch.as_tensor(sim, device=values.device)],
                row_index[sim],
                context_ids[sim],
                true_v,
                true_i,
                {int(c): j for j, c in enumerate(uniq)},
            )
            sim_t = torch.as_tensor(sim, device=values.device)
            values[sim_t], indices[sim_t] = new_v, new_i

        out = coder.decode(values, indices)
        skip = coder.skip(src)
        if skip is not None:
            out = out + skip
        out = out.to(out_dtype)
        clean = np.flatnonzero(kinds == _CLEAN)
        if len(clean):
            c = torch.as_tensor(clean, device=out.device)
            out[c] = y[c]
        return out

    def rewrite_values(
        self, condition: str, simulated: np.ndarray, true: np.ndarray, mean_active: np.ndarray
    ) -> np.ndarray:
        """The values the chosen latents take in a rewrite row, given their calibrated
        simulated values ``s``, true values ``a`` (0 where inactive) and cache mean active
        values ``μ`` (elementwise):

        * ``simulated``, ``synthetic``, ``shuffled``: ``s`` (for ``shuffled`` the control's
          calibrated simulations);
        * ``matched_zero``: ``0``;
        * ``oracle_support``: ``s`` where ``a > 0``, else 0 (the true support, simulated
          magnitudes);
        * ``oracle_magnitude``: where ``s > 0``: ``a`` if ``a > 0`` else ``μ``; 0 where
          ``s = 0`` (the simulated support, true magnitudes).
        """
        if condition in ("simulated", "synthetic", "shuffled"):
            return simulated
        if condition == "matched_zero":
            return np.zeros_like(simulated)
        if condition == "oracle_support":
            return np.where(true > 0, simulated, 0).astype(simulated.dtype)
        if condition == "oracle_magnitude":
            magnitude = np.where(true > 0, true, mean_active)
            return np.where(simulated > 0, magnitude, 0).astype(simulated.dtype)
        raise ValueError(f"{condition!r} is not a rewrite condition")

    def _rewritten(
        self,
        values: Tensor,
        indices: Tensor,
        row_index: np.ndarray,
        context_ids: np.ndarray,
        true_v: Tensor,
        true_i: Tensor,
        slot: dict[int, int],
    ) -> tuple[Tensor, Tensor]:
        """Top-k after the chosen latents of each rewrite row take their values
        (:meth:`rewrite_values`).

        A replacement by 0 of a latent that is not active on the context changes nothing, so
        only nonzero values and currently active latents are passed to the top-k kernel.
        """
        tv, ti = true_v.cpu().numpy(), true_i.cpu().numpy()
        true_dense = np.zeros((len(tv), self.num_latents), dtype=np.float32)
        for j in range(len(tv)):
            on = tv[j] > 0
            true_dense[j, ti[j][on]] = tv[j][on]
        prepared: dict[tuple[Any, ...], tuple[np.ndarray, ...]] = {}
        rows_m: list[np.ndarray] = []
        lat_m: list[np.ndarray] = []
        val_m: list[np.ndarray] = []
        for r, (g, ctx) in enumerate(zip(row_index.tolist(), context_ids.tolist(), strict=True)):
            row = self.rows[g]
            assert row.calibration is not None and row.choice is not None
            key = (ctx, row.condition, row.calibration, row.quality, row.choice, row.trial)
            if key not in prepared:
                order = self.order(row.choice, row.trial, ctx, quality=row.quality)
                if row.quality is not None:
                    assert self.synthetic is not None
                    sim = self.synthetic.values[(row.calibration, row.quality)]
                    lat = self._all_latents[order]
                else:
                    source = self.shuffled if row.condition == "shuffled" else self.values
                    assert source is not None
                    sim = source[row.calibration]
                    lat = self.latents[order]
                true = true_dense[slot[ctx], lat]
                mean = (
                    self.mean_active[order]
                    if self.mean_active is not None and row.condition == "oracle_magnitude"
                    else np.zeros(0, np.float32)
                )
                vals = self.rewrite_values(
                    row.condition, sim[self._ctx_pos[ctx], order], true, mean
                )
                keep = np.flatnonzero((vals != 0) | (true > 0))
                prepared[key] = (keep, lat[keep], vals[keep])
            keep, lat, vals = prepared[key]
            m = int(np.searchsorted(keep, row.n_selected))
            rows_m.append(np.full(m, r, dtype=np.int64))
            lat_m.append(lat[:m])
            val_m.append(vals[:m])
        rows_a, lat_a, val_a = (np.concatenate(a) for a in (rows_m, lat_m, val_m))
        if values.device.type == "cpu" and not self.torch_topk:
            out_v, out_i = _topk.topk_replace(
                values.numpy(),
                indices.numpy(),
                rows_a,
                lat_a,
                val_a.astype(np.float32),
                self.k,
                self.num_latents,
            )
            return torch.from_numpy(np.asarray(out_v)), torch.from_numpy(
                np.asarray(out_i).astype(np.int64)
            )
        dev = values.device
        return topk_replace_torch(
            values,
            indices,
            torch.as_tensor(rows_a, device=dev),
            torch.as_tensor(lat_a, device=dev),
            torch.as_tensor(val_a, device=dev),
            self.k,
            self.num_latents,
        )


# --------------------------------------------------------------------------------------------
# Forward passes
# --------------------------------------------------------------------------------------------


def _cache_kwarg(fn: Callable[..., Any]) -> str:
    """The name under which this transformers version passes a KV cache (``cache`` since
    transformers 5, ``past_key_values`` before)."""
    params = inspect.signature(fn).parameters
    return "cache" if "cache" in params else "past_key_values"


def _prefix_cache(model: Any, prefix: Tensor) -> Any:
    """The KV cache of ``prefix`` ``[B, T]`` (the base model only: no logits are needed)."""
    base = model.base_model
    out = base(input_ids=prefix, use_cache=True, **{_cache_kwarg(base.forward): None})
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    if cache is None:
        raise RuntimeError(f"{type(base).__name__} returned no KV cache with use_cache=True")
    return cache


def _rows_of_cache(prefix: Any, rows: Tensor) -> Any:
    """A fresh cache whose batch row r is row ``rows[r]`` of ``prefix`` (left untouched).

    Dynamic cache layers (transformers >= 4.56) rebind their tensors on selection and on
    update, so shallow copies of the layers suffice; older caches keep key/value lists that
    are modified in place, and are deep-copied.
    """
    layers = getattr(prefix, "layers", None)
    if isinstance(layers, list):
        cache = copy.copy(prefix)
        cache.layers = [copy.copy(layer) for layer in layers]
    else:
        cache = copy.deepcopy(prefix)
    cache.batch_select_indices(rows)
    return cache


def _last_position_splice(
    grid: Grid,
    coder: SparseCoder,
    row_index: np.ndarray,
    context_ids: np.ndarray,
) -> Callable[[Tensor, Tensor], Tensor]:
    """A :func:`nlrw.model.subject.splice` function replacing the last position of row r."""
    sae = coder.cfg.kind == "sae"

    def fn(x: Tensor, y: Tensor) -> Tensor:
        src = (y if sae else x)[:, -1]
        rep = grid.replacement(coder, src, y[:, -1], row_index, context_ids)
        new = y.clone()
        new[:, -1] = rep.to(y.dtype)
        return new

    return fn


def _as_ids(input_ids: Tensor | np.ndarray, device: torch.device) -> Tensor:
    ids = input_ids if isinstance(input_ids, Tensor) else torch.from_numpy(np.asarray(input_ids))
    return ids.long().to(device)


def grid_ce(
    model: Any,
    coder: SparseCoder,
    hookpoint: str,
    grid: Grid,
    input_ids: Tensor | np.ndarray,
    targets: Tensor | np.ndarray,
    context_ids: npt.ArrayLike,
    *,
    batch_size: int = 256,
) -> np.ndarray:
    """CE ``[n_contexts, n_rows]`` of every grid row on every context, sharing the prefix.

    ``input_ids`` ``[n, ctx_len]``, ``targets`` ``[n]`` (the token after each window),
    ``context_ids`` ``[n]`` (for the per-context seeds and values). See the module docstring.
    """
    device = next(model.parameters()).device
    ids, tgt = _as_ids(input_ids, device), _as_ids(targets, device)
    ctx = np.asarray(context_ids, dtype=np.int64)
    n, length = ids.shape
    n_rows = len(grid.rows)
    out = np.empty((n, n_rows), dtype=np.float64)
    canonical = grid.canonical_rows()
    unique = np.unique(canonical)  # rows that differ; the others copy their canonical row
    per_group = max(1, batch_size // len(unique))
    kw = _cache_kwarg(model.forward)
    with torch.inference_mode():
        for g0 in range(0, n, per_group):
            group = ids[g0 : g0 + per_group]
            b = group.shape[0]
            prefix = _prefix_cache(model, group[:, :-1]) if length > 1 else None
            row_ctx = np.repeat(np.arange(b), len(unique))
            row_idx = np.tile(unique, b)
            for c0 in range(0, b * len(unique), batch_size):
                rc, ri = row_ctx[c0 : c0 + batch_size], row_idx[c0 : c0 + batch_size]
                select = torch.as_tensor(rc, device=device)
                cache = None if prefix is None else _rows_of_cache(prefix, select)
                fn = _last_position_splice(grid, coder, ri, ctx[g0 + rc])
                with splice(model, hookpoint, fn):
                    logits = model(input_ids=group[select, -1:], use_cache=True, **{kw: cache})
                ce = F.cross_entropy(
                    logits.logits[:, -1].float(), tgt[g0 + select], reduction="none"
                )
                out[g0 + rc, ri] = ce.double().cpu().numpy()
    return out[:, canonical]


def grid_ce_full(
    model: Any,
    coder: SparseCoder,
    hookpoint: str,
    grid: Grid,
    input_ids: Tensor | np.ndarray,
    targets: Tensor | np.ndarray,
    context_ids: npt.ArrayLike,
    *,
    rows_per_forward: int | None = 1,
) -> np.ndarray:
    """The reference for :func:`grid_ce`: full forward passes over the whole window.

    ``rows_per_forward=1`` is the naive way, one forward per condition and context;
    ``None`` batches all conditions of a context as copies of its window (no KV sharing).
    """
    device = next(model.parameters()).device
    ids, tgt = _as_ids(input_ids, device), _as_ids(targets, device)
    ctx = np.asarray(context_ids, dtype=np.int64)
    n_rows = len(grid.rows)
    step = n_rows if rows_per_forward is None else rows_per_forward
    out = np.empty((ids.shape[0], n_rows), dtype=np.float64)
    with torch.inference_mode():
        for i in range(ids.shape[0]):
            for r0 in range(0, n_rows, step):
                ri = np.arange(r0, min(r0 + step, n_rows))
                batch = ids[i : i + 1].expand(len(ri), -1)
                fn = _last_position_splice(grid, coder, ri, np.full(len(ri), ctx[i]))
                with splice(model, hookpoint, fn):
                    logits = model(input_ids=batch, use_cache=False).logits
                ce = F.cross_entropy(
                    logits[:, -1].float(), tgt[i].expand(len(ri)), reduction="none"
                )
                out[i, ri] = ce.double().cpu().numpy()
    return out


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


_SUMMARY_KEYS = ("condition", "calibration", "quality", "fraction", "choice")
_HOLM_COLUMNS = (("p_value", "p_value_holm"), ("p_better", "p_better_holm"))


def equivalence_margin_of(
    ce_zero: float,
    ce_transcoder: float | None,
    *,
    fraction: float = 0.25,
    nats: float | None = None,
) -> float:
    """The TOST margin in nats: ``nats`` when given, else ``fraction · (CE_zero −
    CE_transcoder)`` (NaN without a transcoder row or when that gap is not positive: the
    equivalence test is then not made)."""
    _check_margin("equivalence_margin", fraction)
    if nats is not None:
        _check_margin("equivalence_margin_nats", nats)
        return float(nats)
    if ce_transcoder is None:
        return math.nan
    gap = ce_zero - ce_transcoder
    return fraction * gap if gap > 0 else math.nan


def summarize(
    results: pl.DataFrame,
    *,
    n_bootstrap: int = 1000,
    n_permutations: int = 10000,
    seed: int = 0,
    n_selected_of: dict[tuple[Any, ...], int] | None = None,
    equivalence_margin: float = 0.25,
    equivalence_margin_nats: float | None = None,
    alpha: float = 0.05,
) -> pl.DataFrame:
    """``eval/summary.parquet`` from ``eval/results.parquet``.

    Per condition key (condition, calibration, quality, fraction, choice), with ``d_c`` the
    per-context difference to zero ablation (trials averaged per context first):

    * ``mean_ce``, ``diff_vs_zero``: means over contexts (and trials);
    * ``ci_low``/``ci_high``, ``diff_ci_low``/``diff_ci_high``: percentile 95 % intervals of a
      hierarchical bootstrap (:func:`nlrw.lib.statistics.hierarchical_bootstrap_means`): the
      same ``n_bootstrap`` resamples of the contexts for every condition, and for a condition
      with T > 1 trials (random choices) a resample of its trials too, the same for every
      condition with T trials;
    * ``p_value``: two-sided sign-flip test of ``d``; ``p_better``: one-sided sign-flip test
      of "lower CE than zero ablation"; ``p_equivalent``: paired TOST within
      ``±equivalence_margin`` nats (the margin used is in the column of that name, see
      :func:`equivalence_margin_of`), NaN when the margin is undefined;
    * ``*_holm``: Holm's adjustment of each p-value column over the rows of this summary
      other than zero ablation (one family per column); ``equivalent_to_zero`` is
      ``p_equivalent_holm < alpha`` (null when not tested).

    Zero ablation's own row has ``p_value = 1`` and no other test. Contexts missing from a
    condition, or a trial missing on some context, are an error (the tests are paired).
    See :mod:`nlrw.lib.statistics` for the formulas.
    """
    if not (0.0 < alpha < 1.0):
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    results = results.sort("context_id", "trial")
    contexts = np.sort(results["context_id"].unique().to_numpy())
    n = len(contexts)
    zero = (
        results.filter(pl.col("condition") == "zero_ablation")
        .group_by("context_id")
        .agg(pl.col("ce").mean())
        .sort("context_id")
    )
    if zero.height != n:
        raise ValueError("results lack the zero_ablation condition on some contexts")
    ce_zero = zero["ce"].to_numpy()
    transcoder = results.filter(pl.col("condition") == "transcoder")["ce"]
    margin = equivalence_margin_of(
        float(ce_zero.mean()),
        float(transcoder.to_numpy().mean()) if transcoder.len() else None,
        fraction=equivalence_margin,
        nats=equivalence_margin_nats,
    )
    if not math.isfinite(margin):
        log.warning(
            "evaluate: no equivalence test (the zero-ablation - transcoder gap is not positive "
            "or there is no transcoder row); pass equivalence_margin_nats to set a margin"
        )
    boot = np.random.default_rng([seed, _TAG_BOOTSTRAP]).integers(0, n, size=(n_bootstrap, n))
    signs = np.random.default_rng([seed, _TAG_PERMUTATION]).choice(
        np.array([-1.0, 1.0]), size=(n_permutations, n)
    )
    trial_draws: dict[int, np.ndarray] = {}
    rows: list[dict[str, Any]] = []
    for key, group in results.group_by(list(_SUMMARY_KEYS), maintain_order=True):
        trials = np.sort(group["trial"].unique().to_numpy())
        t = len(trials)
        group = group.sort("context_id", "trial")
        ctx = group["context_id"].to_numpy()
        if group.height != n * t or not np.array_equal(ctx[::t], contexts):
            raise ValueError(f"condition {key} was not evaluated on every context and trial")
        if not (group["trial"].to_numpy().reshape(n, t) == trials[None, :]).all():
            raise ValueError(f"condition {key} was not evaluated on every context and trial")
        ce_m = group["ce"].to_numpy().reshape(n, t)
        diff_m = ce_m - ce_zero[:, None]
        if t not in trial_draws:
            trial_draws[t] = np.random.default_rng([seed, _TAG_BOOTSTRAP_TRIALS, t]).integers(
                0, t, size=(n_bootstrap, t)
            )
        means = _stats.hierarchical_bootstrap_means(ce_m, boot, trial_draws[t])
        diff_means = _stats.hierarchical_bootstrap_means(diff_m, boot, trial_draws[t])
        ce, diff = ce_m.mean(axis=1), diff_m.mean(axis=1)
        condition, calibration, quality, fraction, choice = key
        reference = condition == "zero_ablation"
        tested = not reference and math.isfinite(margin) and n >= 2
        rows.append(
            {
                "condition": condition,
                "calibration": calibration,
                "quality": quality,
                "fraction": fraction,
                "choice": choice,
                "n_trials": t,
                "n_contexts": n,
                "n_simulated_latents": (n_selected_of or {}).get(tuple(key), 0),
                "mean_ce": float(ce.mean()),
                "ci_low": float(np.percentile(means, 2.5)),
                "ci_high": float(np.percentile(means, 97.5)),
                "diff_vs_zero": float(diff.mean()),
                "diff_ci_low": float(np.percentile(diff_means, 2.5)),
                "diff_ci_high": float(np.percentile(diff_means, 97.5)),
                "p_value": 1.0 if reference else paired_sign_flip_p(diff, signs),
                "p_better": math.nan if reference else _stats.sign_flip_p_less(diff, signs),
                "equivalence_margin": margin,
                "p_equivalent": (
                    _stats.tost_paired(diff, margin, alpha).p_value if tested else math.nan
                ),
            }
        )
    table = pl.DataFrame(
        rows,
        schema={
            k: v for k, v in SUMMARY_SCHEMA.items() if "holm" not in k and k != "equivalent_to_zero"
        },
    )
    family = (table["condition"] != "zero_ablation").to_numpy()
    adjusted: dict[str, np.ndarray] = {}
    for raw, name in (*_HOLM_COLUMNS, ("p_equivalent", "p_equivalent_holm")):
        p = table[raw].to_numpy().astype(np.float64)
        adj = np.full(len(p), np.nan)
        adj[family] = _stats.holm(p[family])
        adjusted[name] = adj
    equivalent = [None if math.isnan(p) else bool(p < alpha) for p in adjusted["p_equivalent_holm"]]
    table = table.with_columns(
        *(pl.Series(name, values, dtype=pl.Float64) for name, values in adjusted.items()),
        pl.Series("equivalent_to_zero", equivalent, dtype=pl.Boolean),
    ).select(list(SUMMARY_SCHEMA))
    order = {c: i for i, c in enumerate(CONDITIONS)}
    return (
        table.with_columns(
            pl.col("condition").replace_strict(order, return_dtype=pl.Int32).alias("_order")
        )
        .sort("_order", "calibration", "quality", "choice", "fraction", nulls_last=False)
        .drop("_order")
    )


RESULTS_SCHEMA: dict[str, Any] = {
    "condition": pl.String,
    "calibration": pl.String,
    "quality": pl.Float64,
    "fraction": pl.Float64,
    "choice": pl.String,
    "trial": pl.Int32,
    "context_id": pl.Int32,
    "ce": pl.Float64,
}

SUMMARY_SCHEMA: dict[str, Any] = {
    "condition": pl.String,
    "calibration": pl.String,
    "quality": pl.Float64,
    "fraction": pl.Float64,
    "choice": pl.String,
    "n_trials": pl.Int32,
    "n_contexts": pl.Int32,
    "n_simulated_latents": pl.Int32,
    "mean_ce": pl.Float64,
    "ci_low": pl.Float64,
    "ci_high": pl.Float64,
    "diff_vs_zero": pl.Float64,
    "diff_ci_low": pl.Float64,
    "diff_ci_high": pl.Float64,
    "p_value": pl.Float64,
    "p_value_holm": pl.Float64,
    "p_better": pl.Float64,
    "p_better_holm": pl.Float64,
    "equivalence_margin": pl.Float64,
    "p_equivalent": pl.Float64,
    "p_equivalent_holm": pl.Float64,
    "equivalent_to_zero": pl.Boolean,
}
"""Columns of ``eval/summary.parquet`` (see :func:`summarize`)."""

SUMMARY_COLUMNS_SINCE_CONTROLS = (
    "quality",
    "p_value_holm",
    "p_better",
    "p_better_holm",
    "equivalence_margin",
    "p_equivalent",
    "p_equivalent_holm",
    "equivalent_to_zero",
)
"""Summary columns added with the controls (issue 17): a summary without them predates them."""


def _results_frame(grid: Grid, ce: np.ndarray, context_ids: np.ndarray) -> pl.DataFrame:
    """Long table of a ``[n_contexts, n_rows]`` CE matrix (context-major)."""
    n_ctx, n_rows = ce.shape
    col = {name: [getattr(r, name) for r in grid.rows] for name in GridRow.__dataclass_fields__}
    return pl.DataFrame(
        {
            "condition": col["condition"] * n_ctx,
            "calibration": col["calibration"] * n_ctx,
            "quality": col["quality"] * n_ctx,
            "fraction": col["fraction"] * n_ctx,
            "choice": col["choice"] * n_ctx,
            "trial": col["trial"] * n_ctx,
            "context_id": np.repeat(context_ids, n_rows).tolist(),
            "ce": ce.reshape(-1),
        },
        schema=RESULTS_SCHEMA,
    )


# --------------------------------------------------------------------------------------------
# Inputs from the run directory
# --------------------------------------------------------------------------------------------


class _Inputs:
    """What :func:`run` reads and validates before any forward pass."""

    def __init__(self) -> None:
        self.context_ids = np.zeros(0, np.int64)
        self.input_ids = np.zeros((0, 0), np.int64)
        self.targets = np.zeros(0, np.int64)
        self.latents = np.zeros(0, np.int64)
        self.values: dict[str, np.ndarray] = {}
        self.balanced_accuracy: np.ndarray | None = None
        self.mean_active: np.ndarray | None = None
        self.synthetic: Synthetic | None = None
        self.shuffled: dict[str, np.ndarray] | None = None
        self.notes: dict[str, Any] = {}


def _ctx_len(run_dir: Path, lengths: np.ndarray) -> int:
    """ctx_len as the contexts stage recorded it, else the longest eval context."""
    record = run_dir / "contexts.json"
    if record.is_file():
        with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
            value = json.loads(record.read_text()).get("config", {}).get("ctx_len")
            if isinstance(value, int) and value > 0:
                return value
    return int(lengths.max())


def _read_eval_contexts(run_dir: Path, cfg: EvaluateConfig, inputs: _Inputs) -> None:
    from nlrw.contexts import read_contexts

    table = read_contexts(run_dir, "eval").sort("context_id")
    if table.height == 0:
        raise ValueError(f"{run_dir / 'contexts.parquet'} holds no eval contexts")
    if cfg.max_contexts is not None:
        table = table.head(cfg.max_contexts)
    lengths = table["input_ids"].list.len().to_numpy()
    ctx_len = _ctx_len(run_dir, lengths)
    bad = np.flatnonzero(lengths != ctx_len)
    if len(bad):
        i = int(bad[0])
        what = "shorter than" if lengths[i] < ctx_len else "longer than"
        raise ValueError(
            f"context {table['context_id'][i]} of {run_dir / 'contexts.parquet'} has "
            f"{lengths[i]} tokens, {what} ctx_len {ctx_len} ({len(bad)} such contexts): "
            "re-run the contexts stage"
        )
    if table["target_id"].null_count():
        raise ValueError(f"{run_dir / 'contexts.parquet'}: some eval contexts have no target_id")
    inputs.context_ids = table["context_id"].to_numpy().astype(np.int64)
    inputs.input_ids = np.array(table["input_ids"].to_list(), dtype=np.int64).reshape(
        table.height, ctx_len
    )
    inputs.targets = table["target_id"].to_numpy().astype(np.int64)
    inputs.notes["ctx_len"] = ctx_len


def _read_calibration(run_dir: Path, cfg: EvaluateConfig, inputs: _Inputs) -> None:
    path = run_dir / "calibration.parquet"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: run simulate and calibrate first (nlrw simulate, nlrw calibrate)"
        )
    table = pl.read_parquet(path)
    missing = {"latent", "context_id", "calibration", "activation"} - set(table.columns)
    if missing:
        raise ValueError(f"{path} lacks the columns {sorted(missing)}")
    present = sorted(table["calibration"].unique().drop_nulls().to_list())
    names = present if cfg.calibrations is None else list(cfg.calibrations)
    unknown = [c for c in names if c not in present]
    if unknown:
        raise ValueError(f"{path} has no calibration {unknown}; it has {present}")
    if not names:
        raise ValueError(f"{path} holds no calibrations")
    table = table.filter(
        pl.col("calibration").is_in(names) & pl.col("context_id").is_in(inputs.context_ids)
    )
    latents = np.sort(table["latent"].unique().to_numpy().astype(np.int64))
    if len(latents) == 0:
        raise ValueError(f"{path} holds no latent simulated on the eval contexts")
    act = table["activation"].to_numpy()
    if table["activation"].null_count() or not np.isfinite(act).all() or (act < 0).any():
        raise ValueError(f"{path}: activations must be finite and >= 0 (found null/NaN/<0)")
    values: dict[str, np.ndarray] = {}
    n_ctx = len(inputs.context_ids)
    for name in names:
        part = table.filter(pl.col("calibration") == name)
        lat = part["latent"].to_numpy().astype(np.int64)
        ctx = part["context_id"].to_numpy().astype(np.int64)
        col = np.searchsorted(latents, lat)
        row = np.searchsorted(inputs.context_ids, ctx)
        filled = np.bincount(row * len(latents) + col, minlength=n_ctx * len(latents))
        filled = filled.reshape(n_ctx, len(latents))
        if (filled != 1).any():
            r, c = np.argwhere(filled != 1)[0]
            state = "missing" if filled[r, c] == 0 else "duplicated"
            raise ValueError(
                f"{path}: calibration {name!r} has latent {latents[c]} on context "
                f"{inputs.context_ids[r]} {state} ({int((filled == 0).sum())} missing, "
                f"{int((filled > 1).sum())} duplicated pairs); every simulated latent needs one "
                "value per eval context"
            )
        dense = np.zeros((n_ctx, len(latents)), dtype=np.float32)
        dense[row, col] = part["activation"].to_numpy().astype(np.float32)
        values[name] = dense
    inputs.latents = latents
    inputs.values = values


def _read_shuffled(run_dir: Path, cfg: EvaluateConfig, inputs: _Inputs) -> None:
    """The shuffled control's calibrated values, as ``inputs.values`` with the control's
    latents' columns replaced (the others keep their real simulations)."""
    path = run_dir / "calibration_shuffled.parquet"
    if cfg.shuffled is False:
        return
    if not path.is_file():
        if cfg.shuffled:
            raise FileNotFoundError(
                f"{path} is missing: the run's simulations predate the shuffled-explanation "
                f"control; make it with `nlrw simulate {run_dir} --simulate.shuffled-control "
                f"true --overwrite` and `nlrw calibrate {run_dir} --overwrite`, or pass "
                "--evaluate.shuffled false"
            )
        return
    try:
        table = pl.read_parquet(path, columns=["latent", "context_id", "calibration", "activation"])
    except Exception as e:  # polars raises several error types for a damaged file
        raise ValueError(f"{path}: not a readable calibration table: {e}") from e
    table = table.filter(pl.col("context_id").is_in(inputs.context_ids))
    out: dict[str, np.ndarray] = {}
    for name, real in inputs.values.items():
        part = table.filter(pl.col("calibration") == name)
        dense = real.copy()
        lat = part["latent"].to_numpy().astype(np.int64)
        col = np.searchsorted(inputs.latents, lat)
        known = (col < len(inputs.latents)) & (
            inputs.latents[np.minimum(col, len(inputs.latents) - 1)] == lat
        )
        if not known.all():
            raise ValueError(
                f"{path}: latent {int(lat[np.argmin(known)])} of the shuffled control was not "
                "simulated in calibration.parquet: re-run calibrate"
            )
        row = np.searchsorted(inputs.context_ids, part["context_id"].to_numpy().astype(np.int64))
        act = part["activation"].to_numpy().astype(np.float32)
        if not np.isfinite(act).all() or (act < 0).any():
            raise ValueError(f"{path}: activations must be finite and >= 0")
        dense[:, np.unique(col)] = 0.0
        dense[row, col] = act
        out[name] = dense
    inputs.shuffled = out
    inputs.notes["shuffled_latents"] = int(table["latent"].n_unique())


def _read_scores(run_dir: Path, cfg: EvaluateConfig, inputs: _Inputs) -> None:
    if "top" not in cfg.choices:
        return
    path = run_dir / "scores.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the 'top' choice needs the score stage")
    scores = pl.read_parquet(path, columns=["latent", "balanced_accuracy"])
    ba_of = {
        int(lat): float(ba)
        for lat, ba in scores.iter_rows()
        if ba is not None and not math.isnan(ba)
    }
    unscored = [int(lat) for lat in inputs.latents if int(lat) not in ba_of]
    if unscored:
        if cfg.missing_explanations == "error":
            raise ValueError(
                f"{len(unscored)} simulated latents have no balanced_accuracy in {path} "
                f"(e.g. {unscored[:5]}): score them, drop 'top' from choices, or pass "
                "missing_explanations='exclude'"
            )
        keep = np.isin(inputs.latents, unscored, invert=True)
        if not keep.any():
            raise ValueError(f"no simulated latent has a balanced_accuracy in {path}")
        inputs.latents = inputs.latents[keep]
        inputs.values = {k: v[:, keep] for k, v in inputs.values.items()}
        log.warning("evaluate: %d simulated latents without a score excluded", len(unscored))
    inputs.notes["n_unscored_excluded"] = len(unscored)
    inputs.balanced_accuracy = np.array([ba_of[int(lat)] for lat in inputs.latents])


def _check_coder(run_dir: Path, coder: SparseCoder, hookpoint: str, inputs: _Inputs) -> None:
    """The coder must be the one whose latents the contexts stage stored."""
    from nlrw.contexts import load_context_activations

    where = run_dir / "contexts" / "activations.safetensors"
    acts = load_context_activations(run_dir)
    values, indices, x = acts.values, acts.indices, acts.x
    if values.shape[1] != coder.k:
        raise ValueError(
            f"the coder at {hookpoint!r} has k = {coder.k} but {where} stores "
            f"{values.shape[1]} latents per context: re-run the contexts stage with this coder"
        )
    if x.shape[1] != coder.d_in:
        raise ValueError(
            f"the coder at {hookpoint!r} reads width d_in = {coder.d_in} but {where} stores "
            f"x of width {x.shape[1]}: re-run the contexts stage with this coder"
        )
    if indices.numel() and int(indices.max()) >= coder.num_latents:
        raise ValueError(
            f"{where} stores latent {int(indices.max())}, but the coder at {hookpoint!r} has "
            f"{coder.num_latents} latents: re-run the contexts stage with this coder"
        )
    if max(inputs.context_ids) >= values.shape[0]:
        raise ValueError(f"{where} has {values.shape[0]} rows, fewer than the contexts")
    rows = torch.as_tensor(inputs.context_ids)
    v, i = values[rows].float(), indices[rows].long()
    with torch.inference_mode():
        ev, ei = coder.encode(x[rows].to(coder.device, coder.dtype))
    ev, ei = ev.float().cpu(), ei.long().cpu()
    same = [
        set(i[j][v[j] > 0].tolist()) == set(ei[j][ev[j] > 0].tolist()) for j in range(len(rows))
    ]
    agreement = float(np.mean(same))
    inputs.notes["stored_latents_agreement"] = agreement
    if agreement < 0.5:
        raise ValueError(
            f"the coder at {hookpoint!r} does not reproduce the latents stored in {where} "
            f"(same top-k on {agreement:.0%} of eval contexts): the contexts were built with "
            "another coder; re-run the contexts stage"
        )
    active = i[v > 0].numpy()
    never = np.setdiff1d(np.unique(active), inputs.latents)
    inputs.notes["n_never_simulated_active_latents"] = len(never)
    inputs.notes["never_simulated_active_fraction"] = (
        float(np.isin(active, never).mean()) if len(active) else 0.0
    )
    inputs.notes["n_active_latents"] = len(np.unique(active))


def _read_cache_stats(
    run_dir: Path, cfg: EvaluateConfig, inputs: _Inputs, coder: SparseCoder
) -> None:
    """The cache's per-latent statistics that ``oracle_magnitude`` (mean active values) and
    ``synthetic`` (max, quantile tables, and the true activations of every latent on the eval
    contexts) need; the synthetic simulators are generated and calibrated here."""
    need_mean = "oracle_magnitude" in cfg.controls
    if not (need_mean or cfg.synthetic_qualities):
        return
    path = run_dir / "latents" / "stats.parquet"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the oracle_magnitude control and the synthetic simulators "
            f"need the cache stage's statistics (run `nlrw cache {run_dir}`), or pass "
            "controls without oracle_magnitude and synthetic_qualities=()"
        )
    stats = pl.read_parquet(path).sort("latent")
    missing = {
        "latent",
        "mean",
        "reference_max",
        "reference_frequency",
        "active_quantiles",
    } - set(stats.columns)
    if missing:
        raise ValueError(f"{path} lacks the columns {sorted(missing)}: re-run the cache stage")
    if not np.array_equal(stats["latent"].to_numpy(), np.arange(coder.num_latents)):
        raise ValueError(
            f"{path} has {stats.height} latents, the coder {coder.num_latents}: the cache was "
            "built with another coder; re-run the cache stage"
        )
    mean = stats["mean"].fill_null(0.0).to_numpy().astype(np.float32)
    if not np.isfinite(mean).all() or (mean < 0).any():
        raise ValueError(f"{path}: mean active values must be finite and >= 0")
    inputs.mean_active = mean[inputs.latents]
    if not cfg.synthetic_qualities:
        return
    from nlrw.contexts import true_activations

    started = time.perf_counter()
    tables = np.array(stats["active_quantiles"].to_list(), dtype=np.float32)
    if tables.ndim != 2 or tables.shape[0] != coder.num_latents:
        raise ValueError(f"{path}: the quantile tables must have one length for every latent")
    true = true_activations(run_dir, np.arange(coder.num_latents), inputs.context_ids).T
    values, auroc = synthetic_values(
        true,
        cfg.synthetic_qualities,
        cfg.synthetic_calibrations,
        max_activation=stats["reference_max"].fill_null(0.0).to_numpy(),
        active_tables=tables,
        frequency=stats["reference_frequency"].fill_null(0.0).to_numpy().astype(np.float32),
        seed=cfg.seed,
    )
    inputs.synthetic = Synthetic(values, auroc)
    measured = {
        str(q): (float(np.nanmean(a)) if np.isfinite(a).any() else None) for q, a in auroc.items()
    }
    inputs.notes["synthetic_measured_auroc"] = measured
    inputs.notes["synthetic_latents_with_both_classes"] = int(
        np.isfinite(next(iter(auroc.values()))).sum()
    )
    inputs.notes["synthetic_seconds"] = time.perf_counter() - started


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def _parts_hash(cfg: EvaluateConfig, hookpoint: str, model: str, inputs: _Inputs) -> str:
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


@contextlib.contextmanager
def _progress(total: int, done: int, enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=done, desc="evaluate", unit="ctx", dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


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
    from nlrw.model import sparse
    from nlrw.model.subject import load_subject

    run_dir = Path(run_dir)
    out_dir = run_dir / "eval"
    parts_dir = out_dir / "results.parts"
    if overwrite:
        remove_tree(parts_dir)
    inputs = _Inputs()
    _read_eval_contexts(run_dir, cfg, inputs)
    _read_calibration(run_dir, cfg, inputs)
    _read_shuffled(run_dir, cfg, inputs)
    _read_scores(run_dir, cfg, inputs)
    coder = sparse.load(RunDir(run_dir).coder(hookpoint))
    _check_coder(run_dir, coder, hookpoint, inputs)
    _read_cache_stats(run_dir, cfg, inputs, coder)
    never = inputs.notes["n_never_simulated_active_latents"]
    if never and cfg.missing_explanations == "error":
        raise ValueError(
            f"{never} latents active on eval contexts were never simulated (no usable "
            "explanation, or left out of simulate): pass missing_explanations='exclude' to "
            "keep their true values"
        )
    grid = Grid.build(
        cfg,
        inputs.latents,
        inputs.values,
        inputs.context_ids,
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
    with _progress(n, done, cfg.progress) as bar:
        for p in todo:
            sl = slice(starts[p], starts[p] + cfg.part_size)
            assert subject is not None
            ce = grid_ce(
                subject.model,
                coder,
                hookpoint,
                grid,
                inputs.input_ids[sl],
                inputs.targets[sl],
                inputs.context_ids[sl],
                batch_size=cfg.batch_size,
            )
            frame = _results_frame(grid, ce, inputs.context_ids[sl])
            with atomic_path(store.path(p)) as tmp:
                frame.write_parquet(tmp)
            evaluated += ce.shape[0]
            if bar is not None:
                bar.update(ce.shape[0])
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
    with atomic_path(out_dir / "results.parquet") as tmp:
        results.write_parquet(tmp)
    with atomic_path(out_dir / "summary.parquet") as tmp:
        summary.write_parquet(tmp)
    atomic_write_json(
        run_dir / "eval.json",
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
                "target_id: the token after the ctx_len window, predicted from the logits at "
                "the window's last position (where the hookpoint output is replaced)"
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
