"""The ``score`` stage: detection scoring ranks latents by how well their explanation tells
activating text from non-activating text (Paulo & Belrose 2025, EleutherAI delphi).

**Examples.** Per latent, ``examples_per_bin`` activating windows from each of the ``n_bins``
equal-count bins of its top windows (the explainer's binning, :func:`nlrw.explain.bin_ranks`;
paper: 10 x 10 = 100), **excluding every window the explainer saw** (recorded in
``explanations.parquet``; the paper's code probably let them overlap), plus ``n_non_activating``
random windows where the latent never fires (paper: 100). Draws are seeded by ``(seed, latent)``.
The examples are shuffled together and cut into prompts of ``examples_per_prompt`` (paper: 5),
shown as plain text (no highlighting; control characters escaped).

**Reading the answer** (see :mod:`nlrw.prompts.detection`): for a prompt of k examples the chat is
sent k times with the answer prefilled ``"Example {i}:"``; one forward each reads
``p(Yes)`` and ``p(No)`` from the next-token distribution, and the example's probability is
``p = p(Yes) / (p(Yes) + p(No))`` (renormalized over the two answers; 0.5 when both are zero;
the mass ``p(Yes) + p(No)`` is recorded as ``mean_mass``).

**Metrics.** ``balanced_accuracy = (TPR + TNR) / 2`` with an example predicted activating when
``p > threshold`` (default 0.5, strictly greater); ``auroc`` = P(p of a random activating example >
p of a random non-activating one), ties counting one half (Mann-Whitney). Both are NaN when a
class has no examples.

**Chance baseline.** ``shuffled_balanced_accuracy`` / ``shuffled_auroc``: the same examples, in
the same prompts, scored against the explanation of another latent given by a fixed seeded
derangement of the scored latents (a random cyclic order: no latent gets its own explanation);
NaN when only one latent is scored. ``shuffled_from`` names the donor latent.

Output ``scores.parquet`` (one row per scored latent, with each example's window, label and
probability as lists) and ``score.json``; resumable in parts like :mod:`nlrw.explain`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
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
from nlrw.prompts import detection as prompt
from nlrw.prompts.markup import escape

__all__ = [
    "ScoreConfig",
    "derangement",
    "p_yes",
    "run",
    "scoring_examples",
]


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


class Examples:
    """One latent's scoring examples, in prompt order: window ids, labels, texts."""

    def __init__(self, windows: np.ndarray, labels: np.ndarray, texts: list[str]) -> None:
        self.windows = windows
        self.labels = labels
        self.texts = texts


def scoring_examples(
    source: LatentSource, latent: int, seen: Sequence[int], cfg: ScoreConfig
) -> Examples:
    """Activating examples from the bins minus the ``seen`` (explainer's) windows, and random
    non-activating windows, shuffled together (seeded by ``(seed, latent)``)."""
    top = source.top_windows(latent)
    seen_set = {int(w) for w in seen}
    exclude = [r for r, w in enumerate(top.tolist()) if w in seen_set]
    rng = np.random.default_rng([cfg.seed, latent, 1])
    ranks = draw_from_bins(len(top), cfg.n_bins, cfg.examples_per_bin, rng, exclude=exclude)
    active = top[ranks]
    inactive = (
        source.inactive_windows(latent, cfg.n_non_activating, cfg.seed)
        if cfg.n_non_activating
        else np.zeros(0, np.int64)
    )
    windows = np.concatenate([active, inactive]).astype(np.int64)
    labels = np.concatenate([np.ones(len(active), bool), np.zeros(len(inactive), bool)])
    order = rng.permutation(len(windows))
    windows, labels = windows[order], labels[order]
    ids = source.tokens(windows) if len(windows) else np.zeros((0, 0), np.int64)
    texts = [escape("".join(source.token_strings(row))) for row in ids]
    return Examples(windows, labels, texts)


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
    "auroc": pl.Float64,
    "shuffled_balanced_accuracy": pl.Float64,
    "shuffled_auroc": pl.Float64,
    "shuffled_from": pl.Int64,
    "n_activating": pl.Int64,
    "n_non_activating": pl.Int64,
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
    seen = table["windows"].to_list()
    donor = derangement(len(latents), cfg.seed)
    source = source if source is not None else CacheSource(run_dir)
    store = PartStore(parts_dir, config_hash((cfg, table.select("latent", "explanation").rows())))
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
            examples = [scoring_examples(source, latents[i], seen[i], cfg) for i in chunk]
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
                rows.append(
                    {
                        "latent": int(latents[i]),
                        "explanation": explanations[i],
                        "balanced_accuracy": balanced_accuracy(probs, ex.labels, cfg.threshold),
                        "auroc": auroc(probs, ex.labels),
                        "shuffled_balanced_accuracy": balanced_accuracy(
                            sprobs, ex.labels, cfg.threshold
                        )
                        if sprobs is not None
                        else float("nan"),
                        "shuffled_auroc": auroc(sprobs, ex.labels)
                        if sprobs is not None
                        else float("nan"),
                        "shuffled_from": int(latents[int(donor[i])]) if shuffle else None,
                        "n_activating": int(ex.labels.sum()),
                        "n_non_activating": int((~ex.labels).sum()),
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
    atomic_write_json(
        RunDir(run_dir).score_record,
        stage_record(
            "score",
            cfg,
            prompt_hash=prompt.PROMPT_HASH,
            n_latents=scores.height,
            mean_balanced_accuracy=_mean(scores["balanced_accuracy"]),
            mean_shuffled_balanced_accuracy=_mean(scores["shuffled_balanced_accuracy"]),
            seconds=time.perf_counter() - started,
        ),
    )
    return scores


def _mean(column: pl.Series) -> float | None:
    values = column.drop_nans().drop_nulls()
    return float(values.mean()) if len(values) else None  # type: ignore[arg-type]
