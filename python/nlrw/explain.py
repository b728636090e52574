"""The ``explain`` stage: an LLM writes a one-sentence explanation of each latent from its top
activating examples (Paulo & Belrose 2025, following EleutherAI delphi).

**Examples.** A latent's top non-overlapping 32-token windows, ranked by their max activation
(from the cache), are split into ``n_bins`` equal-count bins by rank (``np.array_split``: bin 0
holds the strongest windows, sizes differ by at most one; these are the quantile bins of the
windows' max activations), and ``examples_per_bin`` windows are drawn from each without
replacement, seeded by ``(seed, latent)`` so that a latent's examples do not depend on which
other latents run. Paper: 10 bins x 4 = 40 examples. The windows shown are recorded in
``explanations.parquet`` so that scoring can keep its examples disjoint from them.

**Highlighting.** In each example a token is wrapped ``<<…>>`` when its activation **exceeds**
``highlight_threshold x`` that example's own max (paper: 0.2); consecutive highlighted tokens are
merged into one span. An ``Activations:`` line lists every highlighted token with the digit
``floor(10 a / max)`` of the same per-example max, **clipped to 0..9** (``clip_digits``, nlrw's
default; the paper's code does not clip, so the top token of each example gets 10). Newlines and
other control characters in the text are escaped (``\\n``) so each example stays on its lines.

**Top tokens.** Each shown example's *top token* is its token of largest activation (the first
on ties). The prompt tallies them (``Top tokens: " had" 5 times, …``,
:func:`nlrw.prompts.explain.render_top_tokens`), and the consistency check compares the answer
with them.

**Consistency.** For an explanation that quotes words (``"…"``, ``“…”``, ``‘…’``, or ``'…'``
not inside a word; :func:`quoted_words` splits each quote at whitespace and normalizes every word
by removing whitespace and case-folding), with ``Q`` those words and ``t_1 … t_n`` the top
tokens of the ``n`` windows shown to the explainer, normalized the same way::

    consistency = (1/n) * #{ i : t_i in Q }

the share of the latent's shown top activations that sit on a word the explanation names
(exact match after normalization: ``" Had"`` matches ``"had"``, ``"barked"`` does not match
the token ``" bark"``). It is NaN when the explanation quotes nothing (nothing to check), and
for skipped and failed latents. ``explanations.parquet`` records it as ``consistency`` with
the normalized words checked as ``quoted_words``; :func:`consistency` computes it from arrays.

**Contrastive** (``method = "contrastive"``). Beside its activating examples the explainer
sees up to ``min(n_shown, max_near_misses)`` *near-miss* windows on which the latent is 0 on
every token (:func:`near_miss_windows`): half (rounded up) contain one of the shown examples'
top tokens (round-robin over those tokens, most frequent first, a seeded draw among each
token's windows), the other half are the strongest top windows of the ``n_similar_latents``
latents whose decoder rows have the largest cosine with this latent's (round-robin over those
latents, most similar first); when one kind runs short the other fills in. Every candidate
window where the latent fires anywhere is removed, and the chosen ones are checked against the
latent's activations once more. The windows are recorded (``near_miss_windows``, with their
``near_miss_kinds``: ``"token"`` or ``"similar"``) and the chat is
:func:`nlrw.prompts.explain.render_contrastive_chat`; replies, retries and copies are handled
as for the default. A latent with no near-miss window falls back to the default prompt: its
row says ``method = "default"`` and why in ``reason``.

**Skipped latents.** A latent with fewer than ``min_count`` active positions (paper: 200) gets a
row with ``status = "skipped"`` and the reason, and no LLM call.

**Answers.** The reply is cleaned into one sentence (:func:`clean_explanation`: chat debris,
"Sure, here is…", ``Explanation:`` prefixes, quotes and markdown stripped, first sentence, no
final period: the simulator's template adds it, as the paper's does). An empty or malformed
reply is asked again with seed ``seed + attempt`` up to ``retries`` times; then the latent is
recorded with ``status = "failed"`` and the last reply in ``reason``, and the stage goes on.

**Copies.** A small explainer often answers with a demonstration's answer (``The word
"barked" and other forms of "bark"``, from an earlier set of demonstrations, for latents that
never see a dog). A reply that quotes a word of the demonstrations or system prompt and no word
of the latent's own examples counts as unusable (:func:`copied_word`), and so does a reply that
repeats a demonstration's whole answer (``Four-digit years``, :func:`copied_answer`), and one
that keeps a demonstration's template and swaps only the quoted word (``The word "proc" in
Python loops`` on the demo's Jane Austen prose, after ``The word "range" in Python loops``):
it has a word of 4 characters or more outside its quotes that a demonstration's answer holds
and neither the latent's examples nor the system prompt do (:func:`copied_context`; the system
prompt's words, "word", "numbers", "after", belong to every latent, not to a demonstration's
topic). The retry rotates the demonstrations (another one last, next to the examples) as well
as moving the seed, so a greedy explainer does not just repeat itself. After the last attempt
the latent is recorded as failed with the copy in ``reason``.

**Resume.** Latents are explained in parts of ``part_size`` (one batched ``generate`` call per
attempt); each part is written atomically to ``explanations.parts/part-NNNNNN.parquet`` and a
rerun skips the parts on disk, so a kill loses at most one part. The parts are merged into
``explanations.parquet`` (one row per latent) and ``explain.json`` (provenance) at the end.

Why this module is long: the two methods share one path (examples, chat, retries, checks,
rows) and differ only in the near-miss windows beside the examples; the near-miss selection,
the consistency check and the cache reader they need sit next to the stage that records them.

The core functions take arrays (tokens ``[n, w]``, activations ``[n, w]``); the run directory is
read through a :class:`LatentSource` (:class:`CacheSource` for a run's cache; tests use arrays).
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import polars as pl

from nlrw.backends.base import Backend, Generation, Message
from nlrw.config.explain import ExplainConfig, Selection
from nlrw.lib.io import atomic_path, atomic_write_json
from nlrw.lib.parts import PartStore, chunked, remove_tree
from nlrw.lib.progress import progress_bar
from nlrw.lib.provenance import config_hash, stage_record
from nlrw.lib.rundir import RunDir
from nlrw.prompts import explain as prompt
from nlrw.prompts.markup import highlight, highlighted_mask

__all__ = [
    "CacheSource",
    "Examples",
    "ExplainConfig",
    "LatentSource",
    "NearMissSource",
    "NearMisses",
    "activation_digits",
    "bin_ranks",
    "clean_explanation",
    "consistency",
    "copied_answer",
    "copied_context",
    "copied_word",
    "draw_from_bins",
    "explainer_examples",
    "near_miss_windows",
    "quoted_words",
    "render_examples",
    "run",
    "select_latents",
    "top_tokens",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Where examples come from
# --------------------------------------------------------------------------------------------


class LatentSource(Protocol):
    """What the explain and score stages read from a run's latent cache."""

    def counts(self) -> tuple[np.ndarray, np.ndarray]:
        """``(latents, counts)``: every latent id and its number of active positions."""
        ...

    def top_windows(self, latent: int) -> np.ndarray:
        """The latent's top non-overlapping windows, strongest first (int64 window ids)."""
        ...

    def activations(self, latent: int, windows: np.ndarray) -> np.ndarray:
        """float ``[n, window_len]``: the latent's activation at each token of ``windows``."""
        ...

    def tokens(self, windows: np.ndarray) -> np.ndarray:
        """int ``[n, window_len]``: token ids of ``windows``."""
        ...

    def inactive_windows(self, latent: int, n: int, seed: int) -> np.ndarray:
        """``n`` window ids (seeded) where the latent never fires."""
        ...

    def token_strings(self, ids: Sequence[int] | np.ndarray) -> list[str]:
        """The text of each token id, decoded on its own."""
        ...


class NearMissSource(LatentSource, Protocol):
    """What the contrastive explainer reads beside a :class:`LatentSource`."""

    def active_windows(self, latent: int) -> np.ndarray:
        """Sorted ids of the windows where the latent is > 0 on at least one token."""
        ...

    def token_windows(self, token: int) -> np.ndarray:
        """Sorted ids of the windows that contain token id ``token``."""
        ...

    def similar_latents(self, latent: int, n: int) -> np.ndarray:
        """Up to ``n`` other live latents, largest decoder-row cosine with ``latent`` first."""
        ...


class CacheSource:
    """A :class:`LatentSource` (and :class:`NearMissSource`) over a run directory's cache
    (:mod:`nlrw.cache`), with the subject's tokenizer (the model named in
    ``activations/collect.json``) and the coder the cache was made with."""

    def __init__(self, run_dir: str | Path, tokenizer: Any | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.paths = RunDir(run_dir)
        self._tokenizer = tokenizer
        self._top: pl.DataFrame | None = None
        self._window_tokens: np.ndarray | None = None
        self._directions: np.ndarray | None = None
        self._live: np.ndarray | None = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from nlrw.model.subject import load_tokenizer

            self._tokenizer = load_tokenizer(self.paths.subject_model())
        return self._tokenizer

    def counts(self) -> tuple[np.ndarray, np.ndarray]:
        stats = pl.read_parquet(self.paths.latent_stats, columns=["latent", "count"])
        return stats["latent"].to_numpy().astype(np.int64), stats["count"].to_numpy().astype(
            np.int64
        )

    def top_windows(self, latent: int) -> np.ndarray:
        if self._top is None:
            self._top = pl.read_parquet(
                self.paths.top_windows,
                columns=["latent", "window", "rank"],
            ).sort("latent", "rank")
        rows = self._top.filter(pl.col("latent") == latent)
        return rows["window"].to_numpy().astype(np.int64)

    def activations(self, latent: int, windows: np.ndarray) -> np.ndarray:
        from nlrw.cache import window_activations

        return np.asarray(window_activations(self.run_dir, latent, windows), dtype=np.float64)

    def tokens(self, windows: np.ndarray) -> np.ndarray:
        from nlrw.cache import window_tokens

        return np.asarray(window_tokens(self.run_dir, windows))

    def inactive_windows(self, latent: int, n: int, seed: int) -> np.ndarray:
        from nlrw.cache import random_inactive_windows

        return np.asarray(random_inactive_windows(self.run_dir, latent, n, seed), dtype=np.int64)

    def token_strings(self, ids: Sequence[int] | np.ndarray) -> list[str]:
        return [self.tokenizer.decode([int(i)]) for i in ids]

    def active_windows(self, latent: int) -> np.ndarray:
        from nlrw.cache import active_windows

        return np.asarray(active_windows(self.run_dir, latent), dtype=np.int64)

    def token_windows(self, token: int) -> np.ndarray:
        if self._window_tokens is None:
            from nlrw.cache import window_tokens

            record = self.paths.read_json(self.paths.cache_record, stage="cache")
            n = int(record["result"]["n_windows"])
            self._window_tokens = np.asarray(window_tokens(self.run_dir, np.arange(n)))
        return np.flatnonzero((self._window_tokens == token).any(axis=1)).astype(np.int64)

    def similar_latents(self, latent: int, n: int) -> np.ndarray:
        if self._directions is None:
            from nlrw.model.sparse import load

            record = self.paths.read_json(self.paths.cache_record, stage="cache")
            coder = load(self.paths.coder(str(record["hookpoint"])))
            rows = coder.W_dec.detach().float().cpu().numpy()
            norms = np.linalg.norm(rows, axis=1, keepdims=True)
            self._directions = rows / np.where(norms > 0, norms, 1.0)
            latents, counts = self.counts()
            self._live = np.zeros(len(rows), dtype=bool)
            self._live[latents[counts > 0]] = True
        assert self._live is not None
        return most_similar(self._directions, latent, n, self._live)


def most_similar(
    directions: np.ndarray, latent: int, n: int, live: np.ndarray | None = None
) -> np.ndarray:
    """Up to ``n`` latents other than ``latent`` (and, with ``live``, only those where it is
    true) by descending cosine of their rows of ``directions`` ``[L, d]`` with ``latent``'s
    (ties by the lower id)."""
    d = np.asarray(directions, dtype=np.float64)
    norms = np.linalg.norm(d, axis=1)
    cos = (d @ d[latent]) / np.where(norms * norms[latent] > 0, norms * norms[latent], 1.0)
    keep = np.ones(len(d), dtype=bool) if live is None else np.asarray(live, dtype=bool).copy()
    keep[latent] = False
    ids = np.flatnonzero(keep)
    order = np.lexsort((ids, -cos[ids]))
    return ids[order[:n]].astype(np.int64)


# --------------------------------------------------------------------------------------------
# Examples: bins, sampling, rendering (highlighting is prompts.markup's)
# --------------------------------------------------------------------------------------------


def bin_ranks(n: int, n_bins: int) -> list[np.ndarray]:
    """Split ranks ``0..n-1`` (strongest first) into ``n_bins`` equal-count bins (sizes differ
    by at most one; bins are empty when ``n < n_bins``)."""
    return [np.asarray(b, dtype=np.int64) for b in np.array_split(np.arange(n), n_bins)]


def draw_from_bins(
    n: int,
    n_bins: int,
    per_bin: int,
    rng: np.random.Generator,
    exclude: Iterable[int] = (),
) -> np.ndarray:
    """Ranks drawn from each bin without replacement, ``per_bin`` per bin (all of a bin's ranks
    when it has fewer), skipping ranks in ``exclude``; bin by bin, sorted within a bin."""
    excluded = set(int(e) for e in exclude)
    out: list[np.ndarray] = []
    for ranks in bin_ranks(n, n_bins):
        pool = np.array([r for r in ranks if int(r) not in excluded], dtype=np.int64)
        take = min(per_bin, len(pool))
        out.append(np.sort(rng.choice(pool, size=take, replace=False)) if take else pool[:0])
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def activation_digits(
    tokens: Sequence[str], acts: np.ndarray, threshold: float = 0.2, *, clip: bool = True
) -> list[tuple[str, int]]:
    """``(token, floor(10 a / max))`` for each highlighted token, max being the example's own;
    clipped to 0..9 unless ``clip`` is false (then the top token gets 10)."""
    acts = np.asarray(acts, dtype=np.float64)
    mask = highlighted_mask(acts, threshold)
    if not mask.any():
        return []
    digits = np.floor(10.0 * acts / acts.max()).astype(np.int64)
    if clip:
        digits = np.clip(digits, 0, 9)
    return [(tokens[int(i)], int(digits[i])) for i in np.flatnonzero(mask)]


def render_examples(
    token_strings: Sequence[Sequence[str]],
    acts: np.ndarray,
    *,
    threshold: float = 0.2,
    clip: bool = True,
) -> list[str]:
    """The explainer's rendered examples (text line + ``Activations:`` line) for token strings
    ``[n][w]`` and activations ``[n, w]``."""
    return [
        prompt.render_example(
            i + 1,
            highlight(toks, acts[i], threshold),
            activation_digits(toks, acts[i], threshold, clip=clip),
        )
        for i, toks in enumerate(token_strings)
    ]


def explainer_examples(source: LatentSource, latent: int, cfg: ExplainConfig) -> np.ndarray:
    """The window ids shown to the explainer for ``latent`` (bin by bin, strongest bin first)."""
    top = source.top_windows(latent)
    rng = np.random.default_rng([cfg.seed, latent])
    ranks = draw_from_bins(len(top), cfg.n_bins, cfg.examples_per_bin, rng)
    return top[ranks]


def top_positions(acts: np.ndarray) -> np.ndarray:
    """Each example's top position (its largest activation, the first on ties), ``-1`` for
    an example where the latent is nowhere > 0."""
    acts = np.asarray(acts, dtype=np.float64).reshape(len(acts), -1)
    if acts.shape[1] == 0:
        return np.full(len(acts), -1, dtype=np.int64)
    return np.where(acts.max(axis=1) > 0, acts.argmax(axis=1), -1).astype(np.int64)


def top_tokens(token_strings: Sequence[Sequence[str]], acts: np.ndarray) -> list[str]:
    """The top token of each example (see :func:`top_positions`) that has one."""
    return [token_strings[i][int(p)] for i, p in enumerate(top_positions(acts).tolist()) if p >= 0]


class Examples(NamedTuple):
    """The activating examples shown to the explainer for one latent."""

    windows: np.ndarray
    rendered: list[str]
    """The examples as the prompt writes them (:func:`render_examples`)."""
    top_tokens: list[str]
    """Each example's top token (:func:`top_tokens`)."""
    top_ids: list[int]
    """Their token ids, in the same order."""


def examples_for(
    source: LatentSource, latent: int, windows: np.ndarray, cfg: ExplainConfig
) -> Examples:
    """``windows`` of ``latent`` read, rendered and reduced to their top tokens."""
    ids = np.asarray(source.tokens(windows)).reshape(len(windows), -1)
    acts = np.asarray(source.activations(latent, windows), dtype=np.float64)
    acts = acts.reshape(len(windows), -1)
    strings = [source.token_strings(row) for row in ids]
    top = top_positions(acts)
    return Examples(
        np.asarray(windows, dtype=np.int64),
        render_examples(strings, acts, threshold=cfg.highlight_threshold, clip=cfg.clip_digits),
        [strings[i][int(p)] for i, p in enumerate(top.tolist()) if p >= 0],
        [int(ids[i][int(p)]) for i, p in enumerate(top.tolist()) if p >= 0],
    )


def build_chat(
    source: LatentSource, latent: int, windows: np.ndarray, cfg: ExplainConfig, rotation: int = 0
):
    """The default explainer chat for ``latent`` shown ``windows``, the demonstrations rotated
    by ``rotation`` (see :func:`nlrw.prompts.explain.render_chat`)."""
    return chat_for(examples_for(source, latent, windows, cfg), None, rotation, cfg.prompt)


def chat_for(
    examples: Examples,
    near: NearMisses | None,
    rotation: int = 0,
    style: prompt.Style = "nlrw",
):
    """The explainer chat in prompt ``style``: contrastive when ``near`` holds windows, the
    default otherwise."""
    if near is not None and len(near.windows):
        return prompt.render_contrastive_chat(
            examples.rendered,
            near.rendered,
            rotation,
            top_tokens=examples.top_tokens,
            style=style,
        )
    return prompt.render_chat(
        examples.rendered, rotation, top_tokens=examples.top_tokens, style=style
    )


# --------------------------------------------------------------------------------------------
# Contrastive: near-miss windows
# --------------------------------------------------------------------------------------------


class NearMisses(NamedTuple):
    """The near-miss windows of one latent (none fires it), as the prompt shows them."""

    windows: np.ndarray
    kinds: list[str]
    """``"token"`` (holds a top token of the shown examples) or ``"similar"`` (a top window of
    a latent with a similar decoder direction), per window."""
    rendered: list[str]


def _round_robin(pools: Sequence[Sequence[int]], n: int, taken: set[int]) -> list[int]:
    """Up to ``n`` windows, one from each pool in turn (in pool order), skipping ``taken``
    ones (and adding the picks to it)."""
    out: list[int] = []
    cursors = [0] * len(pools)
    while len(out) < n:
        moved = False
        for k, pool in enumerate(pools):
            while cursors[k] < len(pool) and int(pool[cursors[k]]) in taken:
                cursors[k] += 1
            if cursors[k] < len(pool) and len(out) < n:
                w = int(pool[cursors[k]])
                out.append(w)
                taken.add(w)
                cursors[k] += 1
                moved = True
        if not moved:
            break
    return out


def near_miss_windows(
    source: NearMissSource, latent: int, examples: Examples, cfg: ExplainConfig
) -> tuple[np.ndarray, list[str]]:
    """``(windows, kinds)``: the latent's near-miss windows (see the module's docstring), never
    one where the latent is > 0 on any token; empty when there are none (or nothing shown)."""
    n = min(len(examples.windows), cfg.max_near_misses)
    if n == 0:
        return np.zeros(0, np.int64), []
    active = np.asarray(source.active_windows(latent), dtype=np.int64)
    rng = np.random.default_rng([cfg.seed, latent, 0xC0DE])
    tokens: list[int] = []
    counts: dict[int, int] = {}
    for t in examples.top_ids:
        counts[t] = counts.get(t, 0) + 1
        if counts[t] == 1:
            tokens.append(t)
    tokens.sort(key=lambda t: -counts[t])  # most frequent first, ties by first appearance
    same = []
    for t in tokens:
        pool = np.setdiff1d(source.token_windows(t), active)
        same.append(rng.permutation(pool).tolist())
    taken = set(int(w) for w in examples.windows)
    by_token = _round_robin(same, n, taken)
    similar = []
    for other in source.similar_latents(latent, cfg.n_similar_latents):
        top = np.asarray(source.top_windows(int(other)), dtype=np.int64)
        similar.append(top[~np.isin(top, active)].tolist())
    by_latent = _round_robin(similar, n, taken)
    n_token = min(len(by_token), max(math.ceil(n / 2), n - len(by_latent)))
    n_latent = min(len(by_latent), n - n_token)
    windows = np.asarray(by_token[:n_token] + by_latent[:n_latent], dtype=np.int64)
    kinds = ["token"] * n_token + ["similar"] * n_latent
    if len(windows):  # the invariant, checked on the activations themselves
        acts = np.asarray(source.activations(latent, windows)).reshape(len(windows), -1)
        silent = [not bool(row.any()) for row in acts > 0]
        if not all(silent):
            log.warning(
                "explain: latent %d fires on %d near misses, dropped", latent, silent.count(False)
            )
        windows = windows[np.asarray(silent, dtype=bool)]
        kinds = [k for k, ok in zip(kinds, silent, strict=True) if ok]
    return windows, kinds


def near_misses_for(
    source: NearMissSource, latent: int, examples: Examples, cfg: ExplainConfig
) -> NearMisses:
    """The near-miss windows of ``latent`` (:func:`near_miss_windows`) with their texts."""
    windows, kinds = near_miss_windows(source, latent, examples, cfg)
    ids = np.asarray(source.tokens(windows)).reshape(len(windows), -1) if len(windows) else []
    texts = ["".join(source.token_strings(row)) for row in ids]
    rendered = [prompt.render_counter_example(i + 1, t) for i, t in enumerate(texts)]
    return NearMisses(windows, kinds, rendered)


# --------------------------------------------------------------------------------------------
# Post-processing
# --------------------------------------------------------------------------------------------

_SPECIAL = re.compile(r"<\|[^|>]*\|>|</?s>|\[/?INST\]")
_ROLE = re.compile(r"^\s*(?:assistant|system|user)\s*:?\s*\n", re.IGNORECASE)
_LEAD = re.compile(
    r"^\s*(?:sure|certainly|of course|okay|ok|here(?:'s| is| are)|based on)[^:\n]*:\s*",
    re.IGNORECASE,
)
_LABEL = re.compile(
    r"\[?\s*(?:final\s+)?(?:explanation|answer|pattern|description)\s*\]?\s*:\s*", re.IGNORECASE
)
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'”’)]*\s+(?=[A-Z0-9\"'“(<])|\n")


_QUOTES = {'"': '"', "'": "'", "“": "”", "‘": "’"}


def _unquote(text: str) -> str:
    """``text`` without quotes around the *whole* of it; a quote that closes a quoted word at
    the end (``…start with "but"``) stays, as does an unbalanced one."""
    text = text.strip()
    while len(text) >= 2 and _QUOTES.get(text[0]) == text[-1]:
        inner = text[1:-1]
        if text[0] in inner:  # '"a" and "b"': the outer quotes belong to two words
            break
        text = inner.strip()
    return text


def clean_explanation(text: str) -> str | None:
    """One clean sentence from an explainer's reply, or None when nothing usable is left.

    Removes special tokens and role lines, keeps what follows the last ``Explanation:``-like
    label, drops a leading "Sure, here is …:" phrase, markdown emphasis, backticks and
    quotes around the whole reply (not those of a quoted word at its end), keeps the first
    sentence and removes its final period.
    """
    text = _SPECIAL.sub(" ", text)
    text = _ROLE.sub("", text)
    labels = list(_LABEL.finditer(text))
    if labels:
        text = text[labels[-1].end() :]
    text = text.strip()
    for _ in range(2):
        text = _LEAD.sub("", text).strip()
    text = re.sub(r"[*_`#]+", "", text).strip()
    text = text.lstrip("-•> \t\n")
    sentence = _SENTENCE_END.split(text, maxsplit=1)[0] if text else ""
    sentence = _unquote(" ".join(sentence.split()))
    sentence = _unquote(sentence.rstrip(".").strip())
    if len(sentence) < 3 or not re.search(r"[A-Za-z]", sentence):
        return None
    return sentence[0].upper() + sentence[1:]


_QUOTED = re.compile(r'"([^"]+)"|“([^”]+)”')


def copied_word(explanation: str, chat: Sequence[Message]) -> str | None:
    """A word ``explanation`` quotes from the chat's demonstrations (every message but the
    last) when *none* of its quoted words occurs in the latent's examples (the last message);
    None otherwise. Matching is a case-insensitive substring ("bark" is found in "barked").

    Only words the demonstrations hold count: a quoted word found in neither (``"fancy"``
    for an example's "fancied") is a poor explanation, not a copy, and is left to scoring.
    """
    quoted = [q for a, b in _QUOTED.findall(explanation) if (q := (a or b).strip())]
    examples = chat[-1]["content"].casefold()
    if not quoted or any(q.casefold() in examples for q in quoted):
        return None
    shown = " ".join(m["content"] for m in chat[:-1]).casefold()
    return next((q for q in quoted if q.casefold() in shown), None)


_QUOTED_ANY = re.compile(r'"([^"]+)"|“([^”]+)”|‘([^’]+)’|(?<![\w\'])\'([^\']+)\'(?![\w\'])')


def _normal(text: str) -> str:
    return "".join(text.split()).casefold()


def quoted_words(explanation: str | None) -> list[str]:
    """The words ``explanation`` quotes (``"…"``, ``“…”``, ``‘…’``, or ``'…'`` not inside a
    word), each quote split at whitespace, normalized (whitespace removed, case-folded),
    unique, in order of appearance."""
    words: list[str] = []
    for groups in _QUOTED_ANY.findall(explanation or ""):
        quote = next((g for g in groups if g), "")
        for word in quote.split():
            w = _normal(word)
            if w and w not in words:
                words.append(w)
    return words


def consistency(explanation: str | None, tokens: Sequence[str]) -> tuple[float, list[str]]:
    """``(share, words)``: the share of ``tokens`` (each shown example's top token) that, with
    whitespace removed and case-folded, equal one of the words ``explanation`` quotes
    (:func:`quoted_words`), and those words; NaN when it quotes nothing or ``tokens`` is
    empty. See the module's docstring."""
    words = quoted_words(explanation)
    if not words or not tokens:
        return math.nan, words
    quoted = set(words)
    return sum(_normal(t) in quoted for t in tokens) / len(tokens), words


def copied_answer(explanation: str, chat: Sequence[Message]) -> str | None:
    """The demonstration answer (an assistant turn of ``chat``) that ``explanation`` repeats
    word for word (case-insensitive, final period ignored), or None."""
    own = explanation.strip().rstrip(".").casefold()
    for message in chat[:-1]:
        answer = message["content"]
        if message["role"] == "assistant" and answer.strip().rstrip(".").casefold() == own:
            return answer
    return None


_WORD = re.compile(r"[^\W\d_]+(?:[-'’][^\W\d_]+)*")
"""An alphabetic word: letters, with hyphens and apostrophes allowed inside."""

_MARKERS = re.compile(r"<<|>>")


def _word_forms(text: str) -> list[str]:
    """The case-folded words of ``text`` (:data:`_WORD`) of 4 characters or more, each
    hyphenated word followed by its parts of 4 or more ("for-loops", "loops"), unique, in
    order of appearance."""
    forms: list[str] = []
    for match in _WORD.finditer(text):
        word = match.group().casefold()
        for form in (word, *word.split("-")) if "-" in word else (word,):
            if len(form) >= 4 and form not in forms:
                forms.append(form)
    return forms


def copied_context(explanation: str, chat: Sequence[Message]) -> str | None:
    """The first word ``explanation`` borrows from a demonstration's answer, or None.

    With ``W(s)`` the case-folded alphabetic words of ``s`` (letters; hyphens and apostrophes
    inside a word), 4 characters or more, each hyphenated word together with its parts of 4
    or more (``for-loops`` gives ``for-loops`` and ``loops``)::

        own      = W(explanation with its quotes removed, the quotes quoted_words reads)
        answers  = the union of W(a) over the assistant turns a of chat[:-1]
        borrowed = { w in own : w in answers,
                                w not a substring of the examples (chat[-1]),
                                w not a substring of the system prompt (chat[0]) }

    the substrings case-insensitive; the first borrowed word in ``explanation``'s order.

    ``The word "proc" in Python loops`` on prose borrows ``python`` from ``The word "range"
    in Python loops``: the template was kept and only the quoted word swapped, which
    :func:`copied_word` (quoted words) and :func:`copied_answer` (whole answers) miss. The
    system prompt's words ("word", "numbers", "after", "context") are generic, not a
    demonstration's topic, so they never count; a word that is in the examples is grounded.
    The examples are read without the ``<<``/``>>`` highlight markers, so a word split by
    them is still found.
    """
    own = _word_forms(_QUOTED_ANY.sub(" ", explanation))
    answers = {w for m in chat[:-1] if m["role"] == "assistant" for w in _word_forms(m["content"])}
    examples = _MARKERS.sub("", chat[-1]["content"]).casefold() if chat else ""
    system = chat[0]["content"].casefold() if chat and chat[0]["role"] == "system" else ""
    return next((w for w in own if w in answers and w not in examples and w not in system), None)


# --------------------------------------------------------------------------------------------
# Latent selection
# --------------------------------------------------------------------------------------------


def select_latents(
    latents: np.ndarray,
    counts: np.ndarray,
    *,
    min_count: int,
    max_latents: int | None,
    selection: Selection,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``(selected, skipped)``: eligible latents (``count >= min_count``) in the chosen order,
    cut to ``max_latents``, and every ineligible latent (ascending)."""
    latents = np.asarray(latents, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    eligible = counts >= min_count
    skipped = np.sort(latents[~eligible])
    lat, cnt = latents[eligible], counts[eligible]
    if selection == "frequent":
        order = np.lexsort((lat, -cnt))
    elif selection == "random":
        order = np.random.default_rng([seed, 0x5E1EC7]).permutation(len(lat))
    else:
        raise ValueError(f"unknown selection {selection!r}: expected 'frequent' or 'random'")
    selected = lat[order]
    if max_latents is not None:
        selected = selected[:max_latents]
    return selected, skipped


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------

SCHEMA: dict[str, Any] = {
    "latent": pl.Int64,
    "explanation": pl.String,
    "status": pl.String,
    "reason": pl.String,
    "backend": pl.String,
    "model": pl.String,
    "temperature": pl.Float64,
    "seed": pl.Int64,
    "prompt_hash": pl.String,
    "prompt_tokens": pl.Int64,
    "completion_tokens": pl.Int64,
    "attempts": pl.Int64,
    "windows": pl.List(pl.Int64),
    "method": pl.String,
    "near_miss_windows": pl.List(pl.Int64),
    "near_miss_kinds": pl.List(pl.String),
    "consistency": pl.Float64,
    "quoted_words": pl.List(pl.String),
}
"""One row per latent. ``windows``: the activating examples shown; ``method``: the prompt the
latent got ("default" or "contrastive"; null when skipped); ``near_miss_windows`` and
``near_miss_kinds``: the contrastive near misses shown; ``consistency`` and
``quoted_words``: the check of the module's docstring."""

NO_NEAR_MISSES = (
    "contrastive fell back to default: no near-miss window (none holds a shown top token "
    "with the latent silent, and no similar latent's top window is silent)"
)


def _copy_of_a_demonstration(text: str, chat: Sequence[Message]) -> str | None:
    """Why ``text`` copies a demonstration of ``chat`` (a quoted word, :func:`copied_word`; a
    whole answer, :func:`copied_answer`; a word of an answer's template,
    :func:`copied_context`; checked in that order), or None when it does not."""
    if (word := copied_word(text, chat)) is not None:
        return f"copies {word!r} from the demonstrations, not in its examples: {text!r}"
    if (answer := copied_answer(text, chat)) is not None:
        return f"repeats a demonstration's answer: {answer!r}"
    if (borrowed := copied_context(text, chat)) is not None:
        return f"borrows {borrowed!r} from a demonstration's answer, not in its examples: {text!r}"
    return None


def generate_with_retries(
    backend: Backend, chat_for: Callable[[int, int], Any], n: int, cfg: ExplainConfig
) -> list[tuple[str | None, Generation, int, int, int, str | None]]:
    """For each of ``n`` chats (``chat_for(i, attempt)``) ``(explanation or None, last reply,
    attempts, prompt tokens, completion tokens, why the last reply was unusable)``: replies
    that are empty, malformed, clean to nothing, copy a quoted word from the demonstrations
    (:func:`copied_word`), repeat a demonstration's answer (:func:`copied_answer`) or borrow
    a word of a demonstration's answer that the examples lack (its template with another
    quoted word, :func:`copied_context`) are asked again (seed + r, chat ``chat_for(i, r)``),
    up to ``cfg.retries`` more times, all still-pending chats of the batch together."""
    result: list[Any] = [None] * n
    used = [[0, 0] for _ in range(n)]
    pending = list(range(n))
    for attempt in range(cfg.retries + 1):
        if not pending:
            break
        chats = [chat_for(i, attempt) for i in pending]
        replies = backend.generate(
            chats,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            seed=cfg.seed + attempt,
        )
        still: list[int] = []
        for i, chat, reply in zip(pending, chats, replies, strict=True):
            used[i][0] += reply.prompt_tokens
            used[i][1] += reply.completion_tokens
            text = clean_explanation(reply.text) if reply.ok else None
            why = None if text is None else _copy_of_a_demonstration(text, chat)
            if why is not None:
                text = None
            result[i] = (text, reply, attempt + 1, why)
            if text is None:
                still.append(i)
        if still:
            log.info("explain: %d of %d replies unusable, attempt %d", len(still), n, attempt + 1)
        pending = still
    return [(*result[i][:3], used[i][0], used[i][1], result[i][3]) for i in range(n)]


def run(
    cfg: ExplainConfig,
    run_dir: str | Path,
    *,
    backend: Backend | None = None,
    source: LatentSource | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> pl.DataFrame:
    """Explain the run's latents; writes ``explanations.parquet`` and ``explain.json``.

    ``backend`` defaults to ``load_backend(cfg.backend, cfg.model)`` and ``source`` to the run's
    cache (:class:`CacheSource`); both are parameters so that tests can pass fakes.
    """
    run_dir = Path(run_dir)
    out_path = RunDir(run_dir).explanations
    parts_dir = RunDir(run_dir).explanations_parts
    if overwrite:
        remove_tree(parts_dir)
    source = source if source is not None else CacheSource(run_dir)
    if cfg.method == "contrastive":
        _near_miss_source(source)  # fails before any LLM is loaded
    latents, counts = source.counts()
    selected, skipped = select_latents(
        latents,
        counts,
        min_count=cfg.min_count,
        max_latents=cfg.max_latents,
        selection=cfg.selection,
        seed=cfg.seed,
    )
    count_of = dict(zip(latents.tolist(), counts.tolist(), strict=True))
    store = PartStore(parts_dir, config_hash(cfg))
    chunks = chunked(selected.tolist(), cfg.part_size)
    todo = [i for i in range(len(chunks)) if not store.done(i + 1)]
    started = time.perf_counter()
    own_backend = backend is None
    if todo and backend is None:
        from nlrw.backends import load_backend

        backend = load_backend(cfg.backend, cfg.model, **dict(cfg.backend_options))
    base = {
        "backend": cfg.backend,
        "model": cfg.model,
        "temperature": float(cfg.temperature),
        "seed": cfg.seed,
        "prompt_hash": prompt.prompt_hash(cfg.prompt),
    }
    try:
        if not store.done(0):  # part 0: skipped latents, no LLM call
            rows = [
                {
                    **base,
                    "latent": int(lat),
                    "explanation": None,
                    "status": "skipped",
                    "reason": f"count {count_of[int(lat)]} < min_count {cfg.min_count}",
                    "prompt_tokens": 0,
                    "completion_tokens": 0,
                    "attempts": 0,
                    "windows": [],
                    "method": None,
                    "near_miss_windows": [],
                    "near_miss_kinds": [],
                    "consistency": math.nan,
                    "quoted_words": [],
                }
                for lat in skipped
            ]
            store.write(0, rows, SCHEMA)
        bar = progress_bar(len(selected), "explain", enabled=progress)
        if bar is not None:
            bar.update(sum(len(chunks[i]) for i in range(len(chunks)) if i not in set(todo)))
        for index in todo:
            assert backend is not None
            chunk = chunks[index]
            shown = [
                examples_for(source, lat, explainer_examples(source, lat, cfg), cfg)
                for lat in chunk
            ]
            near: list[NearMisses | None] = [None] * len(chunk)
            if cfg.method == "contrastive":
                near = [
                    near_misses_for(_near_miss_source(source), lat, ex, cfg)
                    for lat, ex in zip(chunk, shown, strict=True)
                ]
            answers = generate_with_retries(
                backend,
                lambda i, attempt, ex=shown, nm=near: chat_for(ex[i], nm[i], attempt, cfg.prompt),
                len(chunk),
                cfg,
            )
            rows = []
            for lat, ex, nm, (text, reply, attempts, p_tok, c_tok, why) in zip(
                chunk, shown, near, answers, strict=True
            ):
                contrastive = nm is not None and len(nm.windows) > 0
                fallback = NO_NEAR_MISSES if nm is not None and not contrastive else None
                failure = None
                if text is None:
                    failure = f"no usable reply after {attempts} attempts " + (
                        f"(last: {why})"
                        if why
                        else f"(finish_reason {reply.finish_reason!r}, last: {reply.text[:200]!r})"
                    )
                check, words = consistency(text, ex.top_tokens)
                rows.append(
                    {
                        **base,
                        "latent": int(lat),
                        "explanation": text,
                        "status": "ok" if text is not None else "failed",
                        "reason": "; ".join(r for r in (failure, fallback) if r) or None,
                        "prompt_tokens": p_tok,
                        "completion_tokens": c_tok,
                        "attempts": attempts,
                        "windows": [int(w) for w in ex.windows],
                        "method": "contrastive" if contrastive else "default",
                        "near_miss_windows": [int(w) for w in nm.windows] if nm else [],
                        "near_miss_kinds": list(nm.kinds) if nm else [],
                        "consistency": check,
                        "quoted_words": words,
                    }
                )
            store.write(index + 1, rows, SCHEMA)
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
    finally:
        if own_backend and backend is not None:
            backend.close()
    table = store.merge(SCHEMA).sort("latent")
    with atomic_path(out_path) as tmp:
        table.write_parquet(tmp)
    status = table["status"].value_counts()
    atomic_write_json(
        RunDir(run_dir).explain_record,
        stage_record(
            "explain",
            cfg,
            prompt_hash=prompt.prompt_hash(cfg.prompt),
            n_latents=table.height,
            status={str(s): int(c) for s, c in status.iter_rows()},
            methods={
                str(m): int(c)
                for m, c in table.filter(pl.col("method").is_not_null())["method"]
                .value_counts()
                .iter_rows()
            },
            mean_consistency=_finite_mean(table["consistency"]),
            seconds=time.perf_counter() - started,
        ),
    )
    return table


def _finite_mean(values: pl.Series) -> float | None:
    """The mean of the finite values (None when there are none: JSON has no NaN)."""
    v = values.drop_nulls().to_numpy().astype(np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else None


def _near_miss_source(source: LatentSource) -> NearMissSource:
    missing = [
        m
        for m in ("active_windows", "token_windows", "similar_latents")
        if not callable(getattr(source, m, None))
    ]
    if missing:
        raise TypeError(
            f"method 'contrastive' needs a source with {', '.join(missing)} "
            f"({type(source).__name__} has none)"
        )
    return source  # pyright: ignore[reportReturnType]


def explanations_for(run_dir: str | Path) -> pl.DataFrame:
    """The usable explanations of a run (``status == "ok"``)."""
    table = pl.read_parquet(RunDir(run_dir).explanations)
    return table.filter(pl.col("status") == "ok")
