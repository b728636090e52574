"""The ``simulate`` stage: an LLM simulator reads each latent's explanation and each context
and predicts how strongly the latent fires on the context's last token (Paulo & Belrose 2025).

**Prompts.** One per (latent, context), for every explained latent and every context of both
splits of ``contexts.parquet`` (:mod:`nlrw.prompts.simulation`: system message, three few-shot
exchanges, the explanation and the context with its last token marked ``<<like this>>``; the
context is decoded with the *subject's* tokenizer). The assistant's answer is prefilled with
``"Rating: "`` (or ``"Rating:"`` where the tokenizer merges a space into the digit, chosen by
:func:`nlrw.prompts.simulation.digit_tokens`) and the next-token probabilities ``p_0 … p_9`` of
the ten digit tokens are read: one prefill per prompt, no sampling, deterministic.

**Expected value.** ``ev = "renormalized"`` (nlrw's default)::

    E = Σ_d d · p_d / Σ_d p_d          (0 when Σ_d p_d = 0)

so ``E`` is a rating in [0, 9] whatever mass the model puts outside the digits; the mass
``Σ_d p_d`` is recorded as ``digit_mass``. ``ev = "paper"``: ``E = Σ_d d · p_d``, not
renormalized, as the paper's code. Their code samples an answer at temperature 0.7 and sums
``p · int(token)`` over the **top-10 logprobs** that parse as integers at the digit's position;
here all ten digits count (a digit outside the top 10 adds its small probability, which theirs
drops) and the distribution is read after the prefilled prefix rather than at a sampled
answer's position. With a simulator that follows the format (mass near 1) both readings agree;
with a low mass "paper" pulls every score towards 0. ``digit_probs`` holds the raw ``p_d``, so
either value can be recomputed. A latent whose **median** digit mass is below
``min_digit_mass`` is warned about (logged once, with the latent and the prompt hash).

**Layouts and the engine.** The prompt is tokenized as a shared ``prefix`` plus a per-prompt
``suffix`` (:func:`nlrw.backends.base.split_encode`). ``"explanation-first"``: the prefix is the
system message, the few-shot exchanges and the explanation, shared by every context of a
latent; prompts run latent by latent. ``"context-first"``: the prefix ends with the context's
text, the question and the label ``Feature explanation:``, shared by every latent of a context,
and a latent's suffix is only its explanation and the answer cue; prompts run context by
context, and the stage chunks this layout **by context** (``chunk_contexts`` contexts x every
latent per part), so each context's prefix serves every simulated latent. The transformers
backend's ``"shared-prefix"`` engine computes each distinct prefix once per call (and, for
context-first, the instructions common to every context's prefix once per backend); the openai
backend sends prompts in prefix order so a server's prefix cache hits.

``"all-at-once"`` (transformers backend only): one prompt per (latent, window) rates **every**
token of the window (:mod:`nlrw.prompts.simulation`: the window listed one token per line, each
followed by a tab and a rating slot; the prefix, shared by every window of a latent, ends with
the explanation; chunked by latent like explanation-first). The slots are located by character
offsets (:func:`nlrw.backends.base.locate_slots`, for every context before anything is
written: a tokenizer that merges a slot stops the run with an error naming the model and the
slot) and the digits read at every slot in one forward
(``TransformersBackend.slot_distribution_ids``); the suffix ends at the last slot's tab. The
pair's ``digit_probs``, ``expected_value`` and ``digit_mass`` are the **last** slot's (the same
token the other layouts rate), so ``simulations.parquet`` has the same columns; the expected
value and digit mass of every position of the window go to ``simulations_positions.parquet``
(``latent, context_id, position, expected_value, digit_mass``; position ``0 … ctx_len − 1``,
the last equal to the pair's raw rating; the context-centered reading is not applied there),
and the shuffled control's to ``simulations_shuffled_positions.parquet``.

**Reading.** ``reading = "context-centered"`` removes the simulator's prior on the text: a
small simulator rates the same few contexts high whatever the explanation (the shuffled
control shows it). Every simulated latent is rated on every context, so the context's mean
rating is free::

    E'(l, c) = clip(E(l, c) − mean_l' E(l', c) + mean_{l', c'} E(l', c'), 0, 9)

(means over the latents of the same table: the real simulation and the shuffled control are
centered separately); ``expected_value_raw`` keeps ``E``. ``"expected"`` (the default) writes
``E`` itself. ``reading = "quoted-word"`` checks the explanation's quoted words against the
marked token (the explain stage's consistency rule: whitespace removed, case-folded, equal)::

    E'(l, c) = (E(l, c) + 9 m(l, c)) / 2,   m = 1 if token(c) is a word l's explanation quotes

and ``E' = E`` for an explanation that quotes no word; the shuffled control checks the
donor's words, the explanation its prompts carried. It keeps the simulator's order within
matching and within non-matching contexts and puts every match above every non-match: a
token-like latent explained by its word is then ranked by the word, which the 0.5B simulator
barely does on its own (README, "Readings").

**Which latents.** Every latent of ``explanations.parquet`` with ``status == "ok"``; with
``max_latents``, the best ``max_latents`` of them by detection score (``balanced_accuracy`` of
``scores.parquet``, highest first, NaN last, ties by latent id) when ``scores.parquet`` exists,
else the lowest latent ids; ``latents`` names them instead (each with a usable explanation,
else an error naming those without). Latents whose explanation is missing (``failed`` or
``skipped`` by the explain stage) are excluded and reported in ``simulate.json``, or stop the
run (``missing_explanations = "error"``). Latents the explain stage never looked at are not
reported; the evaluation keeps their true values.

**Output.** Parts of ``chunk_latents`` latents each (in latent id order; for context-first,
of ``chunk_contexts`` contexts each), written atomically to
``simulations.parts/part-NNNNNN.parquet`` (``latent, context_id, expected_value,
digit_probs[10], digit_mass``); a killed run resumes from the parts on disk. When every part is
there they are merged into ``simulations.parquet``, sorted by ``(latent, context_id)``, with
``true_activation`` (the transcoder's activation from :func:`nlrw.contexts.true_activations`,
not the simulator's), and ``simulate.json`` (provenance, digit tokenization, layout, dtype,
throughput, excluded and low-mass latents). A finished stage with the same config and inputs
is skipped.

**The shuffled-explanation control** (``shuffled_control``): each latent of a seeded subset
is rated with the explanation of another latent of the subset (a seeded derangement), to
``simulations_shuffled.parquet`` with ``explanation_of`` naming the donor. A prompt is a
function of the explanation and the context only, and every donor is a simulated latent rated
on every context, so the control's prompts are exactly the donors' real prompts: its ratings
are the donors' real rows, re-used (:func:`shuffled_rows`), with the latent's own
``true_activation``, and cost no simulator time (before, the control sent every prompt a
second time: 4,800 prompts on the demo instead of 2,400, for the same numbers).

**Shards.** ``shard = "i/n"`` (0-based ``i``) runs only the chunks ``j`` with ``j mod n = i``
of the same chunk list: ``n`` processes (or machines sharing the run directory, or whose parts
are copied into one ``simulations.parts``) together write exactly the parts of one run, with
the same prompts in the same batches, hence the same numbers. The shard that finds every part
present merges; :func:`merge` does it explicitly.

Why this module is long: the stage's plan (which latents, which contexts, which chunks and
shards) and the merge of parts must agree exactly for shards and resumed runs to produce the
same numbers; they are kept in one module.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import polars as pl

from nlrw.backends.base import (
    Backend,
    SplitPrompt,
    encode_prompt,
    locate_slots,
    render,
    split_encode,
)
from nlrw.config.simulate import EV, SimulateConfig, parse_shard
from nlrw.lib.io import atomic_path, atomic_write_json
from nlrw.lib.parts import PartStore, chunked, remove_tree
from nlrw.lib.progress import progress_bar
from nlrw.lib.provenance import config_hash, stage_record
from nlrw.lib.rundir import RunDir
from nlrw.prompts import simulation as prompt
from nlrw.prompts.simulation import DigitTokens, Layout, Style

__all__ = [
    "PART_SCHEMA",
    "POSITIONS_FILE",
    "POSITIONS_SCHEMA",
    "SCHEMA",
    "SHUFFLED_POSITIONS_FILE",
    "Chunk",
    "Plan",
    "SimulateConfig",
    "SlotSuffix",
    "apply_reading",
    "build_prompts",
    "build_slot_prompts",
    "center_by_context",
    "expected_values",
    "finished_outputs",
    "load_simulator",
    "marked_tokens",
    "merge",
    "parse_shard",
    "plan_chunks",
    "quoted_word_matches",
    "read_plan",
    "read_quoted_word",
    "run",
    "select_latents",
    "shard_chunks",
    "slot_prefix",
    "slot_suffixes",
]

log = logging.getLogger(__name__)


_RUN_ONLY_FIELDS = ("shard", "progress")
"""Options that do not change the results (excluded from the stage's identity)."""

PART_SCHEMA: dict[str, Any] = {
    "latent": pl.Int32,
    "context_id": pl.Int32,
    "expected_value": pl.Float32,
    "digit_probs": pl.List(pl.Float32),
    "digit_mass": pl.Float32,
}
"""Columns of a part file."""

SCHEMA: dict[str, Any] = {**PART_SCHEMA, "true_activation": pl.Float32}
"""Columns of ``simulations.parquet``."""

SHUFFLED_FILE = "simulations_shuffled.parquet"
"""The shuffled-explanation control's simulations: the columns of ``simulations.parquet``
plus ``explanation_of`` (the latent whose explanation was shown)."""

POSITIONS_FILE = "simulations_positions.parquet"
"""The all-at-once layout's rating of every position of every window (module docstring)."""
SHUFFLED_POSITIONS_FILE = "simulations_shuffled_positions.parquet"
"""The same for the shuffled control."""

POSITIONS_SCHEMA: dict[str, Any] = {
    "latent": pl.Int32,
    "context_id": pl.Int32,
    "position": pl.Int32,
    "expected_value": pl.Float32,
    "digit_mass": pl.Float32,
}
"""Columns of ``simulations_positions.parquet``."""

_SLOT_COLUMNS: dict[str, Any] = {
    "position_expected_value": pl.List(pl.Float32),
    "position_digit_mass": pl.List(pl.Float32),
}
"""What an all-at-once part holds besides :data:`PART_SCHEMA`: each pair's per-position values
(in the same atomic file, so a resumed run never has one without the other)."""


# --------------------------------------------------------------------------------------------
# Small pure pieces
# --------------------------------------------------------------------------------------------


def expected_values(probs: np.ndarray, ev: EV = "renormalized") -> np.ndarray:
    """Expected rating of each row of digit probabilities ``[n, 10]`` (module docstring):
    ``Σ d p_d / Σ p_d`` (0 where the mass is 0) or, for ``"paper"``, ``Σ d p_d``."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != 10:
        raise ValueError(f"digit probabilities must be [n, 10], got {probs.shape}")
    weighted = probs @ np.arange(10, dtype=np.float64)
    if ev == "paper":
        return weighted
    if ev != "renormalized":
        raise ValueError(f"unknown ev {ev!r}: expected 'renormalized' or 'paper'")
    mass = probs.sum(1)
    return np.divide(weighted, mass, out=np.zeros_like(weighted), where=mass > 0)


def center_by_context(table: pl.DataFrame) -> pl.DataFrame:
    """The context-centered reading (module docstring): ``expected_value`` becomes
    ``clip(E − mean over latents on the context + mean over the table, 0, 9)``, and
    ``expected_value_raw`` keeps ``E``."""
    if table.height == 0:
        return table.with_columns(pl.col("expected_value").alias("expected_value_raw"))
    overall = float(table["expected_value"].cast(pl.Float64).mean())  # pyright: ignore[reportArgumentType]
    centered = (
        pl.col("expected_value").cast(pl.Float64)
        - pl.col("expected_value").cast(pl.Float64).mean().over("context_id")
        + overall
    ).clip(0.0, 9.0)
    return table.with_columns(
        centered.cast(pl.Float32).alias("expected_value"),
        pl.col("expected_value").alias("expected_value_raw"),
    )


def quoted_word_matches(
    explanations: dict[int, str], marked: dict[int, str]
) -> dict[tuple[int, int], bool]:
    """``(latent, context_id) -> m``: whether context ``c``'s marked token (``marked[c]``, its
    text) is a word ``explanations[latent]`` quotes, by :func:`nlrw.explain.consistency`'s
    rule; only latents whose explanation quotes a word have keys."""
    from nlrw.explain import consistency, quoted_words

    out: dict[tuple[int, int], bool] = {}
    for lat, text in explanations.items():
        if quoted_words(text):
            for c, token in marked.items():
                out[(lat, c)] = consistency(text, [token])[0] == 1.0
    return out


def marked_tokens(tokenizer: Any, contexts: pl.DataFrame) -> dict[int, str]:
    """``context_id -> text`` of each context's marked (last) token, decoded on its own with
    the subject's ``tokenizer`` (``contexts`` has ``context_id`` and ``input_ids``)."""
    return {
        int(c): str(tokenizer.decode([int(ids[-1])]))
        for c, ids in zip(contexts["context_id"], contexts["input_ids"].to_list(), strict=True)
    }


def apply_reading(
    table: pl.DataFrame,
    reading: str,
    matches: dict[tuple[int, int], bool],
    explanation_of: dict[int, int],
) -> pl.DataFrame:
    """``table``'s raw ratings under ``reading`` (module docstring); ``matches`` and
    ``explanation_of`` are read by the quoted-word reading only."""
    if reading == "context-centered":
        return center_by_context(table)
    if reading == "quoted-word":
        return read_quoted_word(table, matches, explanation_of)
    return table


def read_quoted_word(
    table: pl.DataFrame, matches: dict[tuple[int, int], bool], explanation_of: dict[int, int]
) -> pl.DataFrame:
    """The quoted-word reading (module docstring): ``expected_value`` becomes
    ``(E + 9 m) / 2`` for rows whose explanation (that of ``explanation_of[latent]``) quotes a
    word, ``E`` otherwise; ``expected_value_raw`` keeps ``E``."""
    m = [
        matches.get((explanation_of[int(lat)], int(c)))
        for lat, c in zip(table["latent"], table["context_id"], strict=True)
    ]
    flag = pl.Series("m", [None if v is None else float(v) for v in m], dtype=pl.Float64)
    raw = pl.col("expected_value").cast(pl.Float64)
    value = pl.when(flag.is_null()).then(raw).otherwise((raw + 9.0 * flag) / 2.0)
    return table.with_columns(
        value.cast(pl.Float32).alias("expected_value"),
        pl.col("expected_value").alias("expected_value_raw"),
    )


def shuffled_rows(table: pl.DataFrame, shuffled: dict[int, int]) -> pl.DataFrame:
    """The shuffled control's rows, from the real simulation's: latent ``a``'s rating on a
    context is the rating its donor ``shuffled[a]`` got there with its own explanation.

    A prompt is a function of the explanation and the context only (system message, few-shot,
    explanation, marked context, answer cue; nothing names the latent), and every donor is a
    simulated latent rated on every context, so rating ``a`` with ``shuffled[a]``'s
    explanation would send the very prompts the real simulation sent for ``shuffled[a]``:
    the control re-uses those ratings (every column but ``latent``) instead of paying for
    them twice. Rows sorted by (latent, context_id); the truth is added by the caller."""
    donors = pl.DataFrame(
        {"latent": list(shuffled), "donor": [shuffled[a] for a in shuffled]},
        schema={"latent": table.schema["latent"], "donor": table.schema["latent"]},
    )
    return (
        donors.join(table.rename({"latent": "donor"}), on="donor", how="inner")
        .select(table.columns)
        .sort("latent", "context_id")
    )


def shard_chunks(n_chunks: int, shard: str | None) -> list[int]:
    """The chunk indices shard ``"i/n"`` runs: ``j`` with ``j mod n = i`` (all for None)."""
    if shard is None:
        return list(range(n_chunks))
    i, n = parse_shard(shard)
    return list(range(i, n_chunks, n))


def select_latents(
    explained: Sequence[int], scores: pl.DataFrame | None, max_latents: int | None
) -> list[int]:
    """The latents to simulate, ascending (module docstring: by detection score when
    ``scores`` is given and ``max_latents`` cuts, else by id)."""
    ids = sorted(int(x) for x in explained)
    if max_latents is None or max_latents >= len(ids):
        return ids
    if scores is None or "balanced_accuracy" not in scores.columns:
        return ids[:max_latents]
    score_of: dict[int, float] = {
        int(lat): float(ba) if ba is not None else float("nan")
        for lat, ba in scores.select("latent", "balanced_accuracy").iter_rows()
    }

    def key(lat: int) -> tuple[int, float, int]:
        s = score_of.get(lat, float("nan"))
        return (1, 0.0, lat) if np.isnan(s) else (0, -s, lat)

    return sorted(sorted(ids, key=key)[:max_latents])


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


class Chunk(NamedTuple):
    """One part's pairs: every (latent, context) of ``latents x contexts``."""

    latents: list[int]
    contexts: list[int]

    @property
    def size(self) -> int:
        return len(self.latents) * len(self.contexts)


def plan_chunks(
    layout: Layout,
    latents: Sequence[int],
    context_ids: Sequence[int],
    chunk_latents: int,
    chunk_contexts: int,
) -> list[Chunk]:
    """The parts of one simulation: chunks of ``chunk_latents`` latents x every context for
    explanation-first and all-at-once (a latent's prefix is shared by its contexts), every
    latent x chunks of ``chunk_contexts`` contexts for context-first (a context's prefix by its
    latents)."""
    if not latents:
        return []
    if layout == "context-first":
        return [Chunk(list(latents), c) for c in chunked(list(context_ids), chunk_contexts)]
    return [Chunk(c, list(context_ids)) for c in chunked(list(latents), chunk_latents)]


class Plan(NamedTuple):
    """Everything the stage reads, resolved: what to simulate and the identity of the result."""

    run_dir: Path
    latents: list[int]
    explanations: dict[int, str]
    contexts: pl.DataFrame  # context_id, split, input_ids (sorted by context_id)
    missing: dict[str, list[int]]  # status -> latents without a usable explanation
    chunks: list[Chunk]
    key: str
    shuffled: dict[int, int]  # latent -> the latent whose explanation the control gives it


def derangement(latents: Sequence[int], seed: int) -> dict[int, int]:
    """A seeded uniformly random derangement of ``latents`` (>= 2): latent -> the latent
    whose explanation it gets, never itself. Uniform by rejection: random permutations
    until one has no fixed point (about e ≈ 2.7 draws)."""
    lats = list(latents)
    if len(lats) < 2:
        raise ValueError(f"a derangement needs at least two latents, got {len(lats)}")
    rng = np.random.default_rng([seed, 0x5F])
    idx = np.arange(len(lats))
    while True:
        perm = rng.permutation(len(lats))
        if not (perm == idx).any():
            return {lats[i]: lats[int(perm[i])] for i in range(len(lats))}


def read_plan(cfg: SimulateConfig, run_dir: Path) -> Plan:
    from nlrw.contexts import read_contexts

    ctx_path = RunDir(run_dir).contexts
    if not ctx_path.is_file():
        raise FileNotFoundError(
            f"{ctx_path} is missing: run the contexts stage first (`nlrw contexts` or "
            "nlrw.contexts.run)"
        )
    expl_path = RunDir(run_dir).explanations
    if not expl_path.is_file():
        raise FileNotFoundError(
            f"{expl_path} is missing: run the explain stage first (`nlrw explain`)"
        )
    contexts = read_contexts(run_dir).sort("context_id")
    _check_contexts(contexts, run_dir)

    table = pl.read_parquet(expl_path, columns=["latent", "explanation", "status"])
    usable = (
        (pl.col("status") == "ok")
        & pl.col("explanation").is_not_null()
        & (pl.col("explanation").str.strip_chars() != "")
    )
    ok = table.filter(usable).sort("latent")
    bad = table.filter(~usable).sort("latent")
    missing: dict[str, list[int]] = {}
    for lat, status in bad.select("latent", "status").iter_rows():
        missing.setdefault(str(status), []).append(int(lat))
    if missing and cfg.missing_explanations == "error":
        listed = "; ".join(f"{status}: {_few(lats)}" for status, lats in sorted(missing.items()))
        raise ValueError(
            f"{expl_path}: {bad.height} latents have no usable explanation ({listed}); "
            "re-run explain for them, or pass missing_explanations='exclude' to simulate "
            "the others"
        )
    explanations = {int(k): str(v) for k, v in ok.select("latent", "explanation").iter_rows()}
    scores_path = RunDir(run_dir).scores
    scores = pl.read_parquet(scores_path) if scores_path.is_file() else None
    if cfg.latents:
        unusable = sorted(set(cfg.latents) - set(explanations))
        if unusable:
            raise ValueError(
                f"simulate.latents: latents {_few(unusable)} have no usable explanation in "
                f"{expl_path}"
            )
        latents = sorted(cfg.latents)
    else:
        latents = select_latents(list(explanations), scores, cfg.max_latents)
    shuffled: dict[int, int] = {}
    if cfg.shuffled_control:
        n = len(latents) if cfg.shuffled_latents is None else cfg.shuffled_latents
        if min(n, len(latents)) < 2:
            raise ValueError(
                f"simulate.shuffled_control needs at least two simulated latents, and this run "
                f"simulates {len(latents)}: turn it off or explain more latents"
            )
        pick = np.random.default_rng([cfg.seed, 0x5E]).permutation(len(latents))[:n]
        shuffled = derangement(sorted(latents[i] for i in pick), cfg.seed)
    digest = config_hash([contexts["context_id"].to_list(), contexts["input_ids"].to_list()])
    identity = {
        "config": {k: v for k, v in cfg.__dict__.items() if k not in _RUN_ONLY_FIELDS},
        "prompt_hash": prompt.prompt_hash(cfg.prompt),
        "template": prompt.template_hash(cfg.prompt, cfg.layout),
        "latents": [(lat, explanations[lat]) for lat in latents],
        "contexts": digest,
    }
    if shuffled:
        identity["shuffled"] = sorted(shuffled.items())
    ctx_ids = [int(c) for c in contexts["context_id"]]

    return Plan(
        run_dir=run_dir,
        latents=latents,
        explanations={lat: explanations[lat] for lat in latents},
        contexts=contexts.select("context_id", "split", "input_ids"),
        missing=missing,
        chunks=plan_chunks(cfg.layout, latents, ctx_ids, cfg.chunk_latents, cfg.chunk_contexts),
        key=config_hash(identity),
        shuffled=shuffled,
    )


def _few(items: Sequence[int], n: int = 20) -> str:
    shown = ", ".join(str(i) for i in items[:n])
    return f"[{shown}{', ...' if len(items) > n else ''}] ({len(items)})"


def _check_contexts(contexts: pl.DataFrame, run_dir: Path) -> None:
    """Every context has the same number of tokens, the ``ctx_len`` of ``contexts.json``."""
    lengths = contexts["input_ids"].list.len()
    record = RunDir(run_dir).contexts_record
    want: int | None = None
    if record.is_file():
        want = json.loads(record.read_text()).get("config", {}).get("ctx_len")
    if want is None:
        want = int(lengths.max()) if len(lengths) else 0  # pyright: ignore[reportArgumentType]
    bad = contexts.filter(lengths != want)["context_id"].to_list()
    if bad or want < 1:
        raise ValueError(
            f"{run_dir / 'contexts.parquet'}: contexts {_few(bad)} do not have ctx_len = {want} "
            "tokens; re-run the contexts stage"
        )


def _subject_tokenizer(run_dir: Path) -> Any:
    from nlrw.model.subject import load_tokenizer

    return load_tokenizer(RunDir(run_dir).subject_model())


def load_simulator(cfg: SimulateConfig) -> Backend:
    from nlrw.backends import load_backend

    options: dict[str, Any] = {}
    if cfg.backend == "transformers":
        options = {"dtype": cfg.dtype, "engine": cfg.engine, "engine_batch_size": cfg.batch_size}
    elif cfg.backend == "openai":
        options = {"base_url": cfg.base_url}
    elif cfg.backend == "vllm":
        options = {"dtype": cfg.dtype}
    return load_backend(cfg.backend, cfg.model, **{**options, **dict(cfg.backend_options)})


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def build_prompts(
    tokenizer: Any,
    layout: Layout,
    explanations: dict[int, str],
    texts: dict[int, str],
    latents: Sequence[int],
    context_ids: Sequence[int],
    answer_prefix: str,
    style: Style = "nlrw",
) -> tuple[list[tuple[int, int]], list[SplitPrompt]]:
    """``(keys, prompts)`` for every (latent, context) pair, ordered for prefix sharing:
    latent by latent for ``"explanation-first"``, context by context for ``"context-first"``.
    Equal prefixes are the same tuple object (they are compared and hashed a lot)."""
    if layout == "explanation-first":
        keys = [(lat, c) for lat in latents for c in context_ids]
    else:
        keys = [(lat, c) for c in context_ids for lat in latents]
    shared: dict[tuple[int, ...], tuple[int, ...]] = {}
    prompts: list[SplitPrompt] = []
    for lat, c in keys:
        chat = prompt.render_chat(explanations[lat], texts[c], layout, split=True, style=style)
        p = split_encode(tokenizer, chat, prompt.SPLIT, answer_prefix)
        prompts.append(SplitPrompt(shared.setdefault(p.prefix, p.prefix), p.suffix))
    return keys, prompts


def _slices(keys: list[tuple[int, int]], layout: Layout, at_least: int) -> list[range]:
    """Consecutive ranges of whole prefix groups holding at least ``at_least`` prompts each
    (the last may hold fewer): one backend call each, so progress moves and prefixes stay
    whole."""
    group = (lambda k: k[1]) if layout == "context-first" else (lambda k: k[0])
    out: list[range] = []
    start = 0
    for i in range(1, len(keys) + 1):
        end_of_group = i == len(keys) or group(keys[i]) != group(keys[i - 1])
        if (end_of_group and i - start >= at_least) or i == len(keys):
            out.append(range(start, i))
            start = i
    return [r for r in out if len(r)]


class SlotSuffix(NamedTuple):
    """A window's all-at-once suffix: the token ids of its listing up to the last slot's tab,
    and the suffix index read for each position's slot."""

    ids: tuple[int, ...]
    reads: tuple[int, ...]


def slot_suffixes(
    tokenizer: Any, tokens: dict[int, list[str]], model: str | None = None
) -> dict[int, SlotSuffix]:
    """Each context's :class:`SlotSuffix` from its tokens' texts
    (:func:`nlrw.prompts.simulation.token_texts`): the :func:`~nlrw.prompts.simulation.listing`
    with :data:`~nlrw.prompts.simulation.SLOT` slots, tokenized alone (it follows the shared
    prefix's cut), its slots located by character offsets and the ids cut after the last read
    position.

    Raises:
        ValueError: a slot the tokenizer merges with the text before it (naming ``model`` and
            the slot text).
    """
    out: dict[int, SlotSuffix] = {}
    for c, texts in tokens.items():
        answer = prompt.listing(texts)
        ids, reads = locate_slots(tokenizer, answer.text, answer.slots, model=model)
        out[c] = SlotSuffix(tuple(ids[: reads[-1] + 1]), tuple(reads))
    return out


def slot_prefix(tokenizer: Any, explanation: str) -> tuple[int, ...]:
    """The all-at-once prefix of a latent: the chat (system, few-shot, the explanation)
    rendered up to where the prefilled listing starts, tokenized as
    :func:`nlrw.backends.base.split_encode` tokenizes a prefix."""
    text = render(tokenizer, prompt.all_at_once_chat(explanation), answer_prefix=prompt.SPLIT)
    if text.count(prompt.SPLIT) != 1 or not text.endswith(prompt.SPLIT):
        raise ValueError(
            f"the split marker {prompt.SPLIT!r} must end the rendered all-at-once prompt once"
        )
    return tuple(encode_prompt(tokenizer, text[: -len(prompt.SPLIT)]))


def build_slot_prompts(
    tokenizer: Any,
    explanations: dict[int, str],
    suffixes: dict[int, SlotSuffix],
    latents: Sequence[int],
    context_ids: Sequence[int],
) -> tuple[list[tuple[int, int]], list[SplitPrompt], list[tuple[int, ...]]]:
    """``(keys, prompts, reads)`` of the all-at-once layout for every (latent, context) pair,
    latent by latent (a latent's prefix serves all its windows)."""
    keys = [(lat, c) for lat in latents for c in context_ids]
    prefixes = {lat: slot_prefix(tokenizer, explanations[lat]) for lat in latents}
    prompts = [SplitPrompt(prefixes[lat], suffixes[c].ids) for lat, c in keys]
    return keys, prompts, [suffixes[c].reads for _, c in keys]


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


def finished_outputs(run_dir: Path, key: str) -> pl.DataFrame | None:
    try:
        record = json.loads(RunDir(run_dir).simulate_record.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    path = RunDir(run_dir).simulations
    if record.get("key") != key or not path.is_file():
        return None
    if record.get("n_shuffled_latents") and not (run_dir / SHUFFLED_FILE).is_file():
        return None
    if record.get("layout") == "all-at-once":
        wanted = [POSITIONS_FILE] + (
            [SHUFFLED_POSITIONS_FILE] if record.get("n_shuffled_latents") else []
        )
        if not all((run_dir / name).is_file() for name in wanted):
            return None
    return pl.read_parquet(path)


def run(
    cfg: SimulateConfig,
    run_dir: str | Path,
    *,
    backend: Backend | None = None,
    overwrite: bool = False,
    subject_tokenizer: Any = None,
) -> pl.DataFrame:
    """Simulate the run's explained latents on its contexts; writes ``simulations.parquet`` and
    ``simulate.json`` (module docstring).

    ``backend`` defaults to the one ``cfg`` names and ``subject_tokenizer`` to the tokenizer of
    the model in ``activations/collect.json``; both are parameters so tests can pass their own.
    Returns the merged table, or with ``shard`` while other shards' parts are still missing,
    the rows of this shard's parts.

    Raises:
        FileNotFoundError: no ``contexts.parquet`` or ``explanations.parquet`` (naming the file
            and the stage to run).
        ValueError: contexts of different lengths, latents without an explanation with
            ``missing_explanations = "error"`` (naming them), a simulator whose digits are not
            single tokens, ``overwrite`` with ``shard``.
    """
    run_dir = Path(run_dir)
    plan = read_plan(cfg, run_dir)
    parts_dir = RunDir(run_dir).simulations_parts
    if overwrite:
        if cfg.shard is not None:
            raise ValueError(
                "overwrite=True with a shard would delete the other shards' parts: delete "
                f"{parts_dir} once, then run the shards without overwrite"
            )
        remove_tree(parts_dir)
        for name in (
            "simulations.parquet",
            "simulate.json",
            SHUFFLED_FILE,
            POSITIONS_FILE,
            SHUFFLED_POSITIONS_FILE,
        ):
            (run_dir / name).unlink(missing_ok=True)
    elif (done := finished_outputs(run_dir, plan.key)) is not None:
        log.info("simulate: %s is up to date", RunDir(run_dir).simulations)
        return done

    store = PartStore(parts_dir, plan.key)
    mine = shard_chunks(len(plan.chunks), cfg.shard)
    todo = [i for i in mine if not store.done(i)]
    own_backend = backend is None
    started = time.perf_counter()
    n_prompts, busy = 0, 0.0
    try:
        if todo:
            if backend is None:
                backend = load_simulator(cfg)
            all_at_once = cfg.layout == "all-at-once"
            if all_at_once and not hasattr(backend, "slot_distribution_ids"):
                raise ValueError(
                    f"simulate.layout = 'all-at-once' needs the transformers backend: backend "
                    f"{backend.name!r} cannot read the digits at several slots of one prompt"
                )
            tokenizer = (
                subject_tokenizer if subject_tokenizer is not None else _subject_tokenizer(run_dir)
            )
            ids = plan.contexts["input_ids"].to_list()
            context_ids = [int(c) for c in plan.contexts["context_id"]]
            suffixes: dict[int, SlotSuffix] = {}
            texts: dict[int, str] = {}
            if all_at_once:  # every slot located before anything is written
                suffixes = slot_suffixes(
                    _tokenizer_of(backend),
                    {
                        c: prompt.token_texts(tokenizer, row)
                        for c, row in zip(context_ids, ids, strict=True)
                    },
                    cfg.model,
                )
            else:
                texts = {
                    c: prompt.context_text(tokenizer, row)
                    for c, row in zip(context_ids, ids, strict=True)
                }
            digits = prompt.digit_tokens(_tokenizer_of(backend), cfg.prompt, cfg.layout)
            _write_simulator(
                parts_dir,
                digits,
                _dtype_of(backend, cfg),
                getattr(backend, "dtype_measurement", None),
            )
            bar = progress_bar(
                sum(plan.chunks[i].size for i in mine),
                "simulate",
                "prompt",
                enabled=cfg.progress,
            )
            if bar is not None:
                bar.update(sum(plan.chunks[i].size for i in mine if i not in todo))
            for index in todo:
                t0 = time.perf_counter()
                if all_at_once:
                    frame = _simulate_chunk_slots(
                        cfg,
                        backend,
                        digits,
                        plan,
                        plan.chunks[index],
                        suffixes,
                        bar,
                    )
                else:
                    frame = _simulate_chunk(
                        cfg,
                        backend,
                        digits,
                        plan,
                        plan.chunks[index],
                        texts,
                        bar,
                    )
                busy += time.perf_counter() - t0
                n_prompts += frame.height
                with atomic_path(store.path(index)) as tmp:
                    frame.write_parquet(tmp)
            if bar is not None:
                bar.close()
    finally:
        if own_backend and backend is not None:
            backend.close()
    throughput = {
        "prompts": n_prompts,
        "seconds": busy,
        "prompts_per_second": n_prompts / busy if busy > 0 else None,
    }
    absent = [i for i in range(len(plan.chunks)) if not store.done(i)]
    if absent:
        log.info(
            "simulate: shard %s done; %d of %d parts still missing (other shards), merge when "
            "they finish",
            cfg.shard,
            len(absent),
            len(plan.chunks),
        )
        frames = [pl.read_parquet(store.path(i)) for i in mine]
        return pl.concat(frames) if frames else pl.DataFrame(schema=PART_SCHEMA)
    throughput["wall_seconds"] = time.perf_counter() - started
    return _finish(cfg, plan, store, throughput=throughput)


def merge(cfg: SimulateConfig, run_dir: str | Path) -> pl.DataFrame:
    """Merge the parts of every shard into ``simulations.parquet`` and ``simulate.json``.

    Raises:
        FileNotFoundError: parts are missing (naming the chunks and their shards).
    """
    run_dir = Path(run_dir)
    plan = read_plan(cfg, run_dir)
    store = PartStore(RunDir(run_dir).simulations_parts, plan.key)
    absent = [i for i in range(len(plan.chunks)) if not store.done(i)]
    if absent:
        _, n = parse_shard(cfg.shard) if cfg.shard else (0, 1)
        raise FileNotFoundError(
            f"{store.folder} lacks {len(absent)} of {len(plan.chunks)} parts: chunks "
            f"{_few(absent)}, of shards {sorted({i % n for i in absent})} (of {n}); run them "
            "before merging"
        )
    return _finish(cfg, plan, store, throughput=None)


def _tokenizer_of(backend: Backend) -> Any:
    tokenizer = getattr(backend, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(
            f"backend {backend.name!r} exposes no tokenizer: the simulator's prompts are "
            "tokenized locally"
        )
    return tokenizer


def _dtype_of(backend: Backend | None, cfg: SimulateConfig) -> str | None:
    dtype = getattr(backend, "dtype", None)
    if dtype is not None:
        return str(dtype).removeprefix("torch.")
    return None if cfg.backend == "transformers" else "server"


def _write_simulator(
    parts_dir: Path, digits: DigitTokens, dtype: str | None, measured: Any = None
) -> None:
    """``simulations.parts/simulator.json``: the digit tokenization and dtype (with the
    measurement that chose it, for ``dtype = auto`` on a CPU), for the record written at the
    merge (which may run in another process)."""
    atomic_write_json(
        parts_dir / "simulator.json",
        {"digit_tokens": digits.record(), "dtype": dtype, "dtype_measurement": measured},
    )


def _simulate_chunk(
    cfg: SimulateConfig,
    backend: Backend,
    digits: DigitTokens,
    plan: Plan,
    chunk: Chunk,
    texts: dict[int, str],
    bar: Any,
) -> pl.DataFrame:
    """One part: every (latent, context) prompt of ``chunk``, in backend calls of whole prefix
    groups; rows sorted by (latent, context_id)."""
    tokenizer = _tokenizer_of(backend)
    if cfg.layout == "explanation-first":
        keys = [(lat, c) for lat in chunk.latents for c in chunk.contexts]
    else:
        keys = [(lat, c) for c in chunk.contexts for lat in chunk.latents]
    probs = np.zeros((len(keys), 10), dtype=np.float64)
    for span in _slices(keys, cfg.layout, 8 * cfg.batch_size):
        part = [keys[i] for i in span]
        lats = sorted({k[0] for k in part})
        ctxs = list(dict.fromkeys(k[1] for k in part))
        got, prompts = build_prompts(
            tokenizer,
            cfg.layout,
            plan.explanations,
            texts,
            lats,
            ctxs,
            digits.answer_prefix,
            cfg.prompt,
        )
        assert got == part  # the same order as the keys
        answer = backend.answer_distribution_ids(prompts, list(digits.ids))
        probs[span.start : span.stop] = answer.probs
        if bar is not None:
            bar.update(len(span))
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    probs = probs[order]
    mass = probs.sum(1)
    frame = pl.DataFrame(_pair_columns(keys, order, probs, cfg.ev), schema=PART_SCHEMA)
    # context-first parts hold a slice of contexts: _finish warns once on the whole table
    if cfg.layout == "explanation-first":
        _warn_low_mass(cfg, chunk, mass)
    return frame


def _pair_columns(
    keys: Sequence[tuple[int, int]], order: Sequence[int], probs: np.ndarray, ev: EV
) -> dict[str, Any]:
    """A part's :data:`PART_SCHEMA` columns: the pairs ``keys`` in ``order`` and their digit
    probabilities ``probs`` (already in that order)."""
    return {
        "latent": [keys[i][0] for i in order],
        "context_id": [keys[i][1] for i in order],
        "expected_value": expected_values(probs, ev),
        "digit_probs": probs.astype(np.float32),
        "digit_mass": probs.sum(1),
    }


def _warn_low_mass(cfg: SimulateConfig, chunk: Chunk, mass: np.ndarray) -> None:
    """Warn about each latent of a by-latent chunk whose median digit mass (rows sorted by
    latent, then context) is below ``min_digit_mass``."""
    n = len(chunk.contexts)
    for r, lat in enumerate(sorted(chunk.latents)):
        median = float(np.median(mass[r * n : (r + 1) * n])) if n else float("nan")
        if median < cfg.min_digit_mass:
            log.warning(
                "simulate: latent %d has median digit mass %.3f < min_digit_mass %.2f "
                "(prompt %s, simulator %s): the simulator rarely answers with a digit, its "
                "ratings mean little",
                lat,
                median,
                cfg.min_digit_mass,
                prompt.prompt_hash(cfg.prompt),
                cfg.model,
            )


def _simulate_chunk_slots(
    cfg: SimulateConfig,
    backend: Backend,
    digits: DigitTokens,
    plan: Plan,
    chunk: Chunk,
    suffixes: dict[int, SlotSuffix],
    bar: Any,
) -> pl.DataFrame:
    """One all-at-once part: every (latent, window) prompt of ``chunk``, each rating every
    position of its window; the pair's columns are the last slot's, the per-position values
    ride along as list columns (:data:`_SLOT_COLUMNS`). Rows sorted by (latent, context_id)."""
    tokenizer = _tokenizer_of(backend)
    read_slots = getattr(backend, "slot_distribution_ids")  # noqa: B009 (checked by run)
    keys = [(lat, c) for lat in sorted(chunk.latents) for c in chunk.contexts]
    slot_probs: list[np.ndarray] = [np.zeros((0, 10))] * len(keys)
    for span in _slices(keys, cfg.layout, 8 * cfg.batch_size):
        part = [keys[i] for i in span]
        lats = list(dict.fromkeys(k[0] for k in part))
        ctxs = list(dict.fromkeys(k[1] for k in part))
        got, prompts, reads = build_slot_prompts(tokenizer, plan.explanations, suffixes, lats, ctxs)
        assert got == part  # the same order as the keys
        answers = read_slots(prompts, reads, list(digits.ids))
        for i, answer in zip(span, answers, strict=True):
            slot_probs[i] = np.asarray(answer.probs, dtype=np.float64)
        if bar is not None:
            bar.update(len(span))
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    probs = np.stack([slot_probs[i][-1] for i in order]) if keys else np.zeros((0, 10))
    mass = probs.sum(1)
    frame = pl.DataFrame(
        {
            **_pair_columns(keys, order, probs, cfg.ev),
            "position_expected_value": [
                expected_values(slot_probs[i], cfg.ev).astype(np.float32) for i in order
            ],
            "position_digit_mass": [slot_probs[i].sum(1).astype(np.float32) for i in order],
        },
        schema={**PART_SCHEMA, **_SLOT_COLUMNS},
    )
    _warn_low_mass(cfg, chunk, mass)
    return frame


def _positions(table: pl.DataFrame) -> pl.DataFrame:
    """The per-position table of merged all-at-once parts (sorted by latent, context_id)."""
    return (
        table.select(
            "latent",
            "context_id",
            pl.int_ranges(0, pl.col("position_expected_value").list.len())
            .cast(pl.List(pl.Int32))
            .alias("position"),
            pl.col("position_expected_value").alias("expected_value"),
            pl.col("position_digit_mass").alias("digit_mass"),
        )
        .explode("position", "expected_value", "digit_mass")
        .cast(POSITIONS_SCHEMA)  # pyright: ignore[reportArgumentType]
    )


def _slot_record(
    cfg: SimulateConfig, plan: Plan, throughput: dict[str, Any] | None
) -> dict[str, Any]:
    """What simulate.json adds for the all-at-once layout (nothing for the others)."""
    if cfg.layout != "all-at-once":
        return {}
    ctx_len = int(plan.contexts["input_ids"].list.len().max() or 0)  # pyright: ignore
    files = [POSITIONS_FILE] + ([SHUFFLED_POSITIONS_FILE] if plan.shuffled else [])
    out: dict[str, Any] = {"positions_files": files, "positions_per_prompt": ctx_len}
    if throughput is not None and throughput.get("seconds"):
        out["position_ratings_per_second"] = throughput["prompts"] * ctx_len / throughput["seconds"]
    return out


def _finish(
    cfg: SimulateConfig,
    plan: Plan,
    store: PartStore,
    *,
    throughput: dict[str, Any] | None,
) -> pl.DataFrame:
    """Merge the parts, add the true activations, write the table and the record."""
    from nlrw.contexts import true_activations

    run_dir = plan.run_dir
    context_ids = plan.contexts["context_id"].to_numpy()
    matches: dict[tuple[int, int], bool] = {}
    if cfg.reading == "quoted-word":
        marked = marked_tokens(_subject_tokenizer(run_dir), plan.contexts)
        matches = quoted_word_matches(plan.explanations, marked)

    slots = cfg.layout == "all-at-once"
    part_schema = {**PART_SCHEMA, **_SLOT_COLUMNS} if slots else PART_SCHEMA

    frames = [pl.read_parquet(store.path(i)) for i in range(len(plan.chunks))]
    raw = (pl.concat(frames) if frames else pl.DataFrame(schema=part_schema)).sort(
        "latent", "context_id"
    )
    expected = len(plan.latents) * len(context_ids)
    if raw.height != expected:
        raise RuntimeError(
            f"{store.folder}: the parts hold {raw.height} rows, expected {expected} "
            f"({len(plan.latents)} latents x {len(context_ids)} contexts); delete the folder "
            "and re-run"
        )

    def finished(
        table: pl.DataFrame, positions_file: str, explanation_of: dict[int, int]
    ) -> pl.DataFrame:
        """Write the per-position table (all-at-once), add each row latent's own true
        activation and apply the reading (``explanation_of``: row latent -> the latent whose
        explanation its prompts carried)."""
        latents = table["latent"].unique(maintain_order=True).to_numpy().astype(np.int64)
        if len(latents) and len(context_ids):
            true = true_activations(run_dir, latents, context_ids)  # [latents, contexts]
            # the table is sorted by (latent, context_id) and context_ids ascending
            true_column = true.reshape(-1)
        else:
            true_column = np.zeros(0, np.float32)
        if slots:
            with atomic_path(run_dir / positions_file) as tmp:
                _positions(table).write_parquet(tmp)
            table = table.drop(list(_SLOT_COLUMNS))
        table = table.with_columns(pl.Series("true_activation", true_column, dtype=pl.Float32))
        return apply_reading(table, cfg.reading, matches, explanation_of)

    table = finished(raw, POSITIONS_FILE, {lat: lat for lat in plan.latents})
    n_control = 0
    if plan.shuffled:
        control = finished(
            shuffled_rows(raw, plan.shuffled), SHUFFLED_POSITIONS_FILE, plan.shuffled
        )
        source = pl.Series([plan.shuffled[int(lat)] for lat in control["latent"]], dtype=pl.Int32)
        with atomic_path(run_dir / SHUFFLED_FILE) as tmp:
            control.with_columns(source.alias("explanation_of")).write_parquet(tmp)
        n_control = control.height
    with atomic_path(RunDir(run_dir).simulations) as tmp:
        table.write_parquet(tmp)

    info_path = store.folder / "simulator.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    medians = table.group_by("latent").agg(pl.col("digit_mass").median().alias("m")).sort("latent")
    low = medians.filter(pl.col("m") < cfg.min_digit_mass)["latent"].to_list()
    if low and cfg.layout == "context-first":
        log.warning(
            "simulate: latents %s have median digit mass < min_digit_mass %.2f (prompt %s, "
            "simulator %s): the simulator rarely answers with a digit, their ratings mean little",
            _few(low),
            cfg.min_digit_mass,
            prompt.prompt_hash(cfg.prompt),
            cfg.model,
        )
    splits = {str(s): int(n) for s, n in plan.contexts["split"].value_counts().iter_rows()}
    mass = table["digit_mass"]
    atomic_write_json(
        RunDir(run_dir).simulate_record,
        stage_record(
            "simulate",
            replace(cfg, shard=None),
            key=plan.key,
            prompt_hash=prompt.prompt_hash(cfg.prompt),
            layout=cfg.layout,
            ev=cfg.ev,
            reading=cfg.reading,
            digit_tokens=info.get("digit_tokens"),
            dtype=info.get("dtype"),
            dtype_measurement=info.get("dtype_measurement"),
            n_latents=len(plan.latents),
            n_contexts=len(context_ids),
            contexts_per_split=splits,
            n_prompts=table.height,
            n_shuffled_latents=len(plan.shuffled),
            n_shuffled_rows=n_control,
            shuffled_explanations={str(k): v for k, v in sorted(plan.shuffled.items())},
            throughput=throughput,
            **_slot_record(cfg, plan, throughput),
            mean_digit_mass=float(mass.mean()) if len(mass) else None,  # pyright: ignore
            low_mass_latents=low,
            missing_explanations={
                "count": sum(len(v) for v in plan.missing.values()),
                "policy": cfg.missing_explanations,
                "by_status": plan.missing,
            },
        ),
    )
    return table
