"""The ``score`` stage: detection scoring ranks latents by how well their explanation tells
activating text from non-activating text (Paulo & Belrose 2025, EleutherAI delphi).

**Examples.** Per latent, ``examples_per_bin`` activating windows from each of the ``n_bins``
equal-count bins of its top windows (the explainer's binning, :func:`nlrw.explain.bin_ranks`;
paper: 10 x 10 = 100), plus ``n_non_activating`` random windows where the latent never fires
(paper: 100). Draws are seeded by ``(seed, latent)``. The examples are shuffled together and cut
into prompts of ``examples_per_prompt`` (paper: 5), shown as plain text (no highlighting;
control characters escaped).

**Disjoint from the explainer, by sequence.** The cache cuts each ``ctx_len``-token held-out
sequence into ``W = ctx_len // window_len`` windows (sequence ``s`` holds windows ``s·W …
s·W + W − 1``, :mod:`nlrw.cache`). Windows of one sequence share their text's context (the same
paragraph, names, topic), so a window next to one the explainer saw would test the explanation
on what it was made from. Every window of every sequence that holds a window the explainer
showed (``explanations.parquet``'s ``windows``, and any other ``*windows`` list column, e.g.
contrastive near-misses) is excluded, for the activating and the non-activating examples alike
(the paper's code probably let even the windows overlap). The candidates this removes are
counted per latent (``n_excluded_sequences``, ``n_removed_activating``: top windows besides the
shown ones, ``n_removed_non_activating``: windows where the latent never fires) and summed in
``score.json``. A latent left with fewer candidates than asked for is scored with what remains,
logged, and listed in ``score.json`` (``short_latents``). A source other than the cache's that
does not say ``windows_per_sequence`` is taken to hold one window per sequence.

**Sizing.** ``target_se`` sets the counts so that each latent's balanced accuracy has a
standard error of at most ``target_se`` whatever its rates: ``n = ceil(1 / (8·target_se²))`` per
class (:func:`nlrw.config.score.examples_for_se`; 0.05 → 50 activating and 50 non-activating);
with it a latent whose bins run short after the exclusions is topped up from its other bins.
The cost is linear in the examples: the demo's 8 + 8 examples took 96 s for 16 latents (real
and shuffled, 2 idle AVX512 cores); its ``target_se = 0.05`` (52 + 50) reads 6.4 times the
texts, and took 1,700 s on this project's 2 AVX2 cores (2026-12-04, a fresh ``make run``: 106 s
per latent, the demo's longest stage; the estimate of ~10 min from the 96 s was 3 times too
low). On the demo's cache (8 windows per 256-token sequence, 625 windows), excluding
the explainer's 7-8 sequences leaves 13 of its 15 explained latents 52 activating candidates;
the two rarest (43 and 56 top windows) get 29 and 43.

**Reading the answer** (see :mod:`nlrw.prompts.detection`): for a prompt of k examples the chat is
sent k times with the answer prefilled ``"Example {i}:"``; one forward each reads
``p(Yes)`` and ``p(No)`` from the next-token distribution, and the example's probability is
``p = p(Yes) / (p(Yes) + p(No))`` (renormalized over the two answers; 0.5 when both are zero;
the mass ``p(Yes) + p(No)`` is recorded as ``mean_mass``).

**Metrics.** ``balanced_accuracy = (TPR + TNR) / 2`` with an example predicted activating when
``p > threshold`` (default 0.5, strictly greater); ``auroc`` = P(p of a random activating example >
p of a random non-activating one), ties counting one half (Mann-Whitney). Both are NaN when a
class has no examples.

**Confidence intervals** (per latent, 95%, :func:`balanced_accuracy_interval`). Balanced
accuracy is ``(1 + TPR − FPR) / 2``, a linear function of the difference of two independent
binomial proportions (TPR over the ``n₊`` activating examples, FPR over the ``n₋``
non-activating ones), so the interval is Agresti & Caffo's (2000) for that difference: add one
success and one failure to each class, ``t = (TP + 1) / (n₊ + 2)``, ``s = (TN + 1) / (n₋ + 2)``,
and ::

    balanced_accuracy_se = ½·sqrt(t(1 − t) / (n₊ + 2) + s(1 − s) / (n₋ + 2))
    balanced_accuracy_ci_low/high = (t + s) / 2 ∓ 1.96·se, clipped to [0, 1]

Chosen over the plain Wald interval, whose SE is 0 at rates of 0 or 1 (a perfect 8 + 8 score
would claim certainty), and over a bootstrap over examples, which has the same zero width there
and needs a seed; Agresti–Caffo's coverage stays near nominal from a few examples per class.
The examples are treated as independent: the five in one prompt are read from one shared
context, so where the scorer's answers within a prompt are correlated the interval is somewhat
too narrow. The same interval for the shuffled baseline is ``shuffled_balanced_accuracy_se`` /
``shuffled_balanced_accuracy_ci_low/high``. ``score.json`` holds the mean per-latent SEs and the
mean real − shuffled difference over the latents scored with both, with a paired t interval
over latents (``d̄ ± t_{0.975, n−1}·sd(d)/√n``; it reflects both the example noise and the spread
of latents).

**Chance baseline.** ``shuffled_balanced_accuracy`` / ``shuffled_auroc``: the same examples, in
the same prompts, scored against the explanation of another latent given by a fixed seeded
derangement of the scored latents (a random cyclic order: no latent gets its own explanation);
NaN when only one latent is scored. ``shuffled_from`` names the donor latent.

Output ``scores.parquet`` (one row per scored latent, with each example's window, label and
probability as lists) and ``score.json``; resumable in parts like :mod:`nlrw.explain`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import polars as pl

from nlrw.backends.base import Backend, Message, SplitPrompt, answer_token_ids, split_encode
from nlrw.config.score import ScoreConfig
from nlrw.explain import (
    CacheSource,
    LatentSource,
    draw_from_bins,
)
from nlrw.lib.io import atomic_path, atomic_write_json
from nlrw.lib.metrics import auroc, balanced_accuracy
from nlrw.lib.parts import PartStore, chunked, remove_tree
from nlrw.lib.progress import progress_bar
from nlrw.lib.provenance import config_hash, stage_record
from nlrw.lib.rundir import RunDir
from nlrw.lib.statistics import student_t_cdf
from nlrw.prompts import detection as prompt
from nlrw.prompts.markup import escape

__all__ = [
    "Interval",
    "ScoreConfig",
    "balanced_accuracy_interval",
    "derangement",
    "p_yes",
    "paired_difference",
    "run",
    "scoring_examples",
    "sequence_layout",
]

log = logging.getLogger(__name__)

Z95 = 1.959963984540054
"""The standard normal's 0.975 quantile (two-sided 95% intervals)."""


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def p_yes(probs: np.ndarray) -> np.ndarray:
    """``p(Yes) / (p(Yes) + p(No))`` per row of ``[n, 2]`` answer probabilities; 0.5 when both
    are zero."""
    probs = np.asarray(probs, dtype=np.float64)
    mass = probs.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mass > 0, probs[:, 0] / np.where(mass > 0, mass, 1.0), 0.5)


class Interval(NamedTuple):
    """A standard error and a 95% interval (NaN when a class has no examples)."""

    se: float
    low: float
    high: float


def balanced_accuracy_interval(
    scores: npt.ArrayLike, labels: npt.ArrayLike, threshold: float = 0.5
) -> Interval:
    """Agresti–Caffo SE and 95% interval of ``(TPR + TNR) / 2`` with prediction ``scores >
    threshold`` (module docstring): ``t = (TP + 1)/(n₊ + 2)``, ``s = (TN + 1)/(n₋ + 2)``,
    ``se = ½·sqrt(t(1−t)/(n₊+2) + s(1−s)/(n₋+2))``, ``(t + s)/2 ∓ 1.96·se`` clipped to
    [0, 1]."""
    y = np.asarray(labels, dtype=bool)
    pred = np.asarray(scores, dtype=np.float64) > threshold
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return Interval(math.nan, math.nan, math.nan)
    t = (int(pred[y].sum()) + 1) / (n_pos + 2)
    s = (int((~pred[~y]).sum()) + 1) / (n_neg + 2)
    se = 0.5 * math.sqrt(t * (1 - t) / (n_pos + 2) + s * (1 - s) / (n_neg + 2))
    center = (t + s) / 2
    return Interval(se, max(0.0, center - Z95 * se), min(1.0, center + Z95 * se))


def _t_quantile(p: float, df: int) -> float:
    """Student's t quantile ``T_df⁻¹(p)`` for ``p ≥ 0.5``, by bisection on the cdf."""
    lo, hi = 0.0, 1e4
    for _ in range(200):
        mid = (lo + hi) / 2
        if student_t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def paired_difference(real: npt.ArrayLike, shuffled: npt.ArrayLike) -> dict[str, Any]:
    """Mean of ``real − shuffled`` over the latents where both are finite, with its paired t
    95% interval over latents (``d̄ ± t_{0.975, n−1}·sd(d)/√n``); None where undefined (fewer
    than two latents)."""
    d = np.asarray(real, dtype=np.float64) - np.asarray(shuffled, dtype=np.float64)
    d = d[np.isfinite(d)]
    out: dict[str, Any] = {"n_latents": int(d.size), "mean": None, "se": None}
    out.update(ci_low=None, ci_high=None)
    if d.size == 0:
        return out
    out["mean"] = float(d.mean())
    if d.size < 2:
        return out
    se = float(d.std(ddof=1)) / math.sqrt(d.size)
    half = _t_quantile(0.975, d.size - 1) * se
    out.update(se=se, ci_low=out["mean"] - half, ci_high=out["mean"] + half)
    return out


def derangement(n: int, seed: int) -> np.ndarray:
    """``d[i]``: whose explanation position i is scored against; a random cyclic order, so
    ``d[i] != i`` for every i when ``n >= 2`` (``[0]`` for n = 1)."""
    order = np.random.default_rng([seed, 0xDE7A]).permutation(n)
    d = np.empty(n, dtype=np.int64)
    d[order] = np.roll(order, -1)
    return d


# --------------------------------------------------------------------------------------------
# Examples
# --------------------------------------------------------------------------------------------


def sequence_layout(source: LatentSource) -> tuple[int, int | None]:
    """``(windows_per_sequence, n_windows)`` of a source's windows: from ``latents/cache.json``
    for a :class:`nlrw.explain.CacheSource`, else from the source's ``windows_per_sequence``
    and ``n_windows`` attributes; ``(1, None)`` when it says neither (a window per sequence)."""
    wps = getattr(source, "windows_per_sequence", None)
    n_windows = getattr(source, "n_windows", None)
    if wps is None and isinstance(source, CacheSource):
        record = json.loads(RunDir(source.run_dir).cache_record.read_text())
        wps, n_windows = record["windows_per_sequence"], record["result"]["n_windows"]
    return (int(wps) if wps else 1), (int(n_windows) if n_windows is not None else None)


class Examples:
    """One latent's scoring examples, in prompt order: window ids, labels, texts; and what the
    exclusion of the explainer's sequences removed from the candidates."""

    def __init__(
        self,
        windows: np.ndarray,
        labels: np.ndarray,
        texts: list[str],
        *,
        n_excluded_sequences: int = 0,
        n_removed_activating: int = 0,
        n_removed_non_activating: int = 0,
    ) -> None:
        self.windows = windows
        self.labels = labels
        self.texts = texts
        self.n_excluded_sequences = n_excluded_sequences
        self.n_removed_activating = n_removed_activating
        self.n_removed_non_activating = n_removed_non_activating


def scoring_examples(
    source: LatentSource,
    latent: int,
    seen: Sequence[int],
    cfg: ScoreConfig,
    *,
    windows_per_sequence: int = 1,
    n_windows: int | None = None,
) -> Examples:
    """Activating examples from the bins and random non-activating windows, none in a sequence
    that holds a ``seen`` (explainer's) window, shuffled together (seeded by ``(seed,
    latent)``). Windows ``s·W … s·W + W − 1`` form sequence ``s`` (``W =
    windows_per_sequence``; 1: the window-level exclusion only)."""
    wps = max(int(windows_per_sequence), 1)
    top = source.top_windows(latent)
    seen_set = {int(w) for w in seen}
    sequences = np.unique(np.asarray(sorted(seen_set), dtype=np.int64) // wps)
    blocked = np.isin(top // wps, sequences)
    exclude = np.flatnonzero(blocked).tolist()
    removed_active = int(sum(1 for w in top[blocked].tolist() if w not in seen_set))
    rng = np.random.default_rng([cfg.seed, latent, 1])
    ranks = draw_from_bins(len(top), cfg.n_bins, cfg.examples_per_bin, rng, exclude=exclude)
    wanted = cfg.n_bins * cfg.examples_per_bin
    if cfg.target_se is not None and len(ranks) < wanted:
        # Top up from the other bins (the bins then no longer count equally).
        left = np.setdiff1d(np.flatnonzero(~blocked), ranks)
        extra = rng.choice(left, size=min(wanted - len(ranks), len(left)), replace=False)
        ranks = np.concatenate([ranks, np.sort(extra)]).astype(np.int64)
    active = top[ranks]
    # Windows of the excluded sequences where the latent never fires: the non-activating
    # candidates removed. Asking the source for that many more draws and dropping the excluded
    # ones keeps the draw uniform over the remaining candidates.
    near = (sequences[:, None] * wps + np.arange(wps)).reshape(-1)
    if n_windows is not None:
        near = near[near < n_windows]
    removed_idle = 0
    if len(near):
        removed_idle = int((np.asarray(source.activations(latent, near)).max(1) <= 0).sum())
    inactive = (
        source.inactive_windows(latent, cfg.n_non_activating + removed_idle, cfg.seed)
        if cfg.n_non_activating
        else np.zeros(0, np.int64)
    )
    inactive = inactive[~np.isin(inactive // wps, sequences)][: cfg.n_non_activating]
    windows = np.concatenate([active, inactive]).astype(np.int64)
    labels = np.concatenate([np.ones(len(active), bool), np.zeros(len(inactive), bool)])
    order = rng.permutation(len(windows))
    windows, labels = windows[order], labels[order]
    ids = source.tokens(windows) if len(windows) else np.zeros((0, 0), np.int64)
    texts = [escape("".join(source.token_strings(row))) for row in ids]
    return Examples(
        windows,
        labels,
        texts,
        n_excluded_sequences=len(sequences),
        n_removed_activating=removed_active,
        n_removed_non_activating=removed_idle,
    )


def _groups(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


_CUT = "\x00"  # never in a prompt: example texts have their control characters escaped


def score_texts(
    backend: Backend,
    jobs: Sequence[tuple[str, Sequence[str]]],
    examples_per_prompt: int,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each job ``(explanation, texts)``: ``(p_yes, mass)`` per text. The texts are cut into
    prompts of ``examples_per_prompt``; example i of a prompt is read after the prefilled
    answer ``"Example {i}:"``.

    The i answers of one prompt differ only after the chat, so with a backend that takes split
    prompts (``answer_distribution_ids``) the chat is the shared prefix and each
    ``<end of turn><assistant>Example {i}:`` a suffix: the chat's KV cache is computed once
    for its ``examples_per_prompt`` answers instead of once per answer.
    """
    chats: list[tuple[int, range, list[Message]]] = []
    for j, (explanation, texts) in enumerate(jobs):
        for group in _groups(len(texts), examples_per_prompt):
            chats.append((j, group, prompt.render_chat(explanation, [texts[k] for k in group])))
    out = [(np.full(len(t), np.nan), np.full(len(t), np.nan)) for _, t in jobs]
    tokenizer = getattr(backend, "tokenizer", None)
    if tokenizer is not None and hasattr(backend, "answer_distribution_ids"):
        split: list[SplitPrompt] = []
        where: list[tuple[int, int]] = []
        ids_of: dict[int, list[int]] = {}
        for j, group, chat in chats:
            cut = [*chat[:-1], {**chat[-1], "content": chat[-1]["content"] + _CUT}]
            for pos, k in enumerate(group):
                answer = prompt.answer_prefix(pos + 1)
                ids_of.setdefault(pos, answer_token_ids(tokenizer, prompt.ANSWERS, prefix=answer))
                split.append(split_encode(tokenizer, cut, _CUT, answer))
                where.append((j, k))
        if all(ids == ids_of[0] for ids in ids_of.values()):
            dist = backend.answer_distribution_ids(split, ids_of[0])
            py = p_yes(dist.probs)
            for row, (j, k) in enumerate(where):
                out[j][0][k] = py[row]
                out[j][1][k] = dist.mass[row]
            return out
    for pos in range(examples_per_prompt):
        batch = [(j, g[pos], chat) for j, g, chat in chats if pos < len(g)]
        if not batch:
            break
        dist = backend.answer_distribution(
            [chat for _, _, chat in batch], prompt.answer_prefix(pos + 1), prompt.ANSWERS
        )
        py = p_yes(dist.probs)
        for row, (j, k, _) in enumerate(batch):
            out[j][0][k] = py[row]
            out[j][1][k] = dist.mass[row]
    return out


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------

SCHEMA: dict[str, Any] = {
    "latent": pl.Int64,
    "explanation": pl.String,
    "balanced_accuracy": pl.Float64,
    "balanced_accuracy_se": pl.Float64,
    "balanced_accuracy_ci_low": pl.Float64,
    "balanced_accuracy_ci_high": pl.Float64,
    "auroc": pl.Float64,
    "shuffled_balanced_accuracy": pl.Float64,
    "shuffled_balanced_accuracy_se": pl.Float64,
    "shuffled_balanced_accuracy_ci_low": pl.Float64,
    "shuffled_balanced_accuracy_ci_high": pl.Float64,
    "shuffled_auroc": pl.Float64,
    "shuffled_from": pl.Int64,
    "n_activating": pl.Int64,
    "n_non_activating": pl.Int64,
    "n_excluded_sequences": pl.Int64,
    "n_removed_activating": pl.Int64,
    "n_removed_non_activating": pl.Int64,
    "mean_mass": pl.Float64,
    "backend": pl.String,
    "model": pl.String,
    "prompt_hash": pl.String,
    "windows": pl.List(pl.Int64),
    "labels": pl.List(pl.Boolean),
    "probs": pl.List(pl.Float64),
    "shuffled_probs": pl.List(pl.Float64),
}


def run(
    cfg: ScoreConfig,
    run_dir: str | Path,
    *,
    backend: Backend | None = None,
    source: LatentSource | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> pl.DataFrame:
    """Score every usable explanation of ``run_dir/explanations.parquet``; writes
    ``scores.parquet`` and ``score.json``."""
    run_dir = Path(run_dir)
    parts_dir = RunDir(run_dir).scores_parts
    if overwrite:
        remove_tree(parts_dir)
    table = pl.read_parquet(RunDir(run_dir).explanations)
    table = table.filter(pl.col("status") == "ok").sort("latent")
    if cfg.max_latents is not None:
        table = table.head(cfg.max_latents)
    latents = table["latent"].to_list()
    explanations = table["explanation"].to_list()
    seen = _shown_windows(table)
    donor = derangement(len(latents), cfg.seed)
    source = source if source is not None else CacheSource(run_dir)
    wps, n_windows = sequence_layout(source)
    store = PartStore(
        parts_dir,
        config_hash((cfg, table.select("latent", "explanation").rows(), seen, wps)),
    )
    chunks = chunked(list(range(len(latents))), cfg.part_size)
    todo = [i for i in range(len(chunks)) if not store.done(i)]
    started = time.perf_counter()
    own_backend = backend is None
    if todo and backend is None:
        from nlrw.backends import load_backend

        backend = load_backend(cfg.backend, cfg.model, **dict(cfg.backend_options))
    try:
        bar = progress_bar(len(latents), "score", enabled=progress)
        if bar is not None:
            bar.update(len(latents) - sum(len(chunks[i]) for i in todo))
        for index in todo:
            assert backend is not None
            chunk = chunks[index]
            examples = [
                scoring_examples(
                    source,
                    latents[i],
                    seen[i],
                    cfg,
                    windows_per_sequence=wps,
                    n_windows=n_windows,
                )
                for i in chunk
            ]
            jobs = [(explanations[i], ex.texts) for i, ex in zip(chunk, examples, strict=True)]
            shuffle = cfg.shuffled and len(latents) > 1
            if shuffle:
                jobs += [
                    (explanations[int(donor[i])], ex.texts)
                    for i, ex in zip(chunk, examples, strict=True)
                ]
            results = score_texts(backend, jobs, cfg.examples_per_prompt)
            rows = []
            for n, (i, ex) in enumerate(zip(chunk, examples, strict=True)):
                probs, mass = results[n]
                sprobs = results[len(chunk) + n][0] if shuffle else None
                real_ci = balanced_accuracy_interval(probs, ex.labels, cfg.threshold)
                nan = Interval(math.nan, math.nan, math.nan)
                shuffled_ci = (
                    balanced_accuracy_interval(sprobs, ex.labels, cfg.threshold)
                    if sprobs is not None
                    else nan
                )
                rows.append(
                    {
                        "latent": int(latents[i]),
                        "explanation": explanations[i],
                        "balanced_accuracy": balanced_accuracy(probs, ex.labels, cfg.threshold),
                        "balanced_accuracy_se": real_ci.se,
                        "balanced_accuracy_ci_low": real_ci.low,
                        "balanced_accuracy_ci_high": real_ci.high,
                        "auroc": auroc(probs, ex.labels),
                        "shuffled_balanced_accuracy": balanced_accuracy(
                            sprobs, ex.labels, cfg.threshold
                        )
                        if sprobs is not None
                        else float("nan"),
                        "shuffled_balanced_accuracy_se": shuffled_ci.se,
                        "shuffled_balanced_accuracy_ci_low": shuffled_ci.low,
                        "shuffled_balanced_accuracy_ci_high": shuffled_ci.high,
                        "shuffled_auroc": auroc(sprobs, ex.labels)
                        if sprobs is not None
                        else float("nan"),
                        "shuffled_from": int(latents[int(donor[i])]) if shuffle else None,
                        "n_activating": int(ex.labels.sum()),
                        "n_non_activating": int((~ex.labels).sum()),
                        "n_excluded_sequences": ex.n_excluded_sequences,
                        "n_removed_activating": ex.n_removed_activating,
                        "n_removed_non_activating": ex.n_removed_non_activating,
                        "mean_mass": float(mass.mean()) if len(mass) else float("nan"),
                        "backend": cfg.backend,
                        "model": cfg.model,
                        "prompt_hash": prompt.PROMPT_HASH,
                        "windows": ex.windows.tolist(),
                        "labels": ex.labels.tolist(),
                        "probs": probs.tolist(),
                        "shuffled_probs": sprobs.tolist() if sprobs is not None else [],
                    }
                )
            store.write(index, rows, SCHEMA)
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
    finally:
        if own_backend and backend is not None:
            backend.close()
    scores = store.merge(SCHEMA).sort("latent")
    with atomic_path(RunDir(run_dir).scores) as tmp:
        scores.write_parquet(tmp)
    short = _short_latents(scores, cfg)
    if short:
        log.warning(
            "score: %d of %d latents have fewer examples than asked for (%d activating, %d "
            "non-activating) once the explainer's sequences are excluded; scored with what "
            "remains: %s",
            len(short),
            scores.height,
            cfg.n_bins * cfg.examples_per_bin,
            cfg.n_non_activating,
            ", ".join(
                f"latent {r['latent']} ({r['n_activating']} + {r['n_non_activating']})"
                for r in short
            ),
        )
    atomic_write_json(
        RunDir(run_dir).score_record,
        stage_record(
            "score",
            cfg,
            prompt_hash=prompt.PROMPT_HASH,
            n_latents=scores.height,
            mean_balanced_accuracy=_mean(scores["balanced_accuracy"]),
            mean_shuffled_balanced_accuracy=_mean(scores["shuffled_balanced_accuracy"]),
            mean_balanced_accuracy_se=_mean(scores["balanced_accuracy_se"]),
            mean_shuffled_balanced_accuracy_se=_mean(scores["shuffled_balanced_accuracy_se"]),
            real_minus_shuffled_balanced_accuracy=paired_difference(
                scores["balanced_accuracy"].to_numpy(),
                scores["shuffled_balanced_accuracy"].to_numpy(),
            ),
            examples_asked={
                "activating": cfg.n_bins * cfg.examples_per_bin,
                "non_activating": cfg.n_non_activating,
            },
            sequence_exclusion={
                "windows_per_sequence": wps,
                "excluded_sequences": _total(scores["n_excluded_sequences"]),
                "removed_activating_candidates": _total(scores["n_removed_activating"]),
                "removed_non_activating_candidates": _total(scores["n_removed_non_activating"]),
            },
            short_latents=short,
            seconds=time.perf_counter() - started,
        ),
    )
    return scores


def _shown_windows(table: pl.DataFrame) -> list[list[int]]:
    """Per row, every window the explainer showed: ``windows`` and any other ``*windows``
    list-of-integers column (e.g. a contrastive explainer's near-misses)."""
    columns = [
        c
        for c, dtype in table.schema.items()
        if c.endswith("windows")
        and isinstance(dtype, pl.List)
        and dtype.inner is not None
        and dtype.inner.is_integer()
    ]
    out: list[list[int]] = [[] for _ in range(table.height)]
    for c in sorted(columns):
        for i, ws in enumerate(table[c].to_list()):
            out[i].extend(int(w) for w in ws or [] if w is not None)
    return [sorted(set(ws)) for ws in out]


def _short_latents(scores: pl.DataFrame, cfg: ScoreConfig) -> list[dict[str, int]]:
    """The latents scored on fewer examples than asked for."""
    short = scores.filter(
        (pl.col("n_activating") < cfg.n_bins * cfg.examples_per_bin)
        | (pl.col("n_non_activating") < cfg.n_non_activating)
    )
    return [
        {k: int(r[k]) for k in ("latent", "n_activating", "n_non_activating")}
        for r in short.iter_rows(named=True)
    ]


def _total(column: pl.Series) -> int:
    return int(column.fill_null(0).sum())


def _mean(column: pl.Series) -> float | None:
    values = column.drop_nans().drop_nulls()
    return float(values.mean()) if len(values) else None  # type: ignore[arg-type]
