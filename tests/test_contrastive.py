"""Tests of contrastive explanations (``--explain.method contrastive``): the near-miss windows
(never one where the latent fires), the fallback to the default method, the rendered prompt
(golden), the stage's records and hash, and the cache reader behind them."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from nlrw import explain
from nlrw.backends.base import Message
from nlrw.explain import ExplainConfig, most_similar, near_miss_windows, render_examples
from nlrw.prompts import explain as prompt
from support import SOURCE_TOKENS, ArraySource, FakeExplainer

CAT, DOG, PERIOD, BIG = 1, 7, 5, 11


class NearMissArraySource(ArraySource):
    """An :class:`ArraySource` with the contrastive reader's methods, over arrays and a
    decoder matrix ``directions`` [L, d]."""

    def __init__(
        self,
        tokens: np.ndarray,
        acts: dict[int, np.ndarray],
        directions: np.ndarray,
    ) -> None:
        super().__init__(tokens, acts, {k: int((v > 0).sum()) for k, v in acts.items()})
        self.directions = directions

    def active_windows(self, latent: int) -> np.ndarray:
        return np.flatnonzero(self._acts[latent].max(1) > 0).astype(np.int64)

    def token_windows(self, token: int) -> np.ndarray:
        return np.flatnonzero((self._tokens == token).any(1)).astype(np.int64)

    def similar_latents(self, latent: int, n: int) -> np.ndarray:
        _, counts = self.counts()
        return most_similar(self.directions, latent, n, counts > 0)


def near_miss_source(n_windows: int = 300, seed: int = 0) -> NearMissArraySource:
    """Latent 0 fires on " cat" right after " big" (so most windows with " cat" are near
    misses), latent 1 on " dog", latent 2 on every " cat" (decoder close to latent 0's),
    latent 3 on "." after " dog"; strengths vary so the top windows rank by them."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, len(SOURCE_TOKENS), size=(n_windows, 8))
    strength = rng.uniform(0.5, 5.0, size=tokens.shape)
    after = np.zeros_like(tokens)
    after[:, 1:] = tokens[:, :-1]
    acts = {
        0: np.where((tokens == CAT) & (after == BIG), strength, 0.0),
        1: np.where(tokens == DOG, strength, 0.0),
        2: np.where(tokens == CAT, strength, 0.0),
        3: np.where((tokens == PERIOD) & (after == DOG), strength, 0.0),
    }
    directions = np.array(
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.9, 0.1, 0.0], [0.1, 0.5, 1.0]], dtype=np.float64
    )
    return NearMissArraySource(tokens, acts, directions)


def shown_examples(
    source: explain.LatentSource, latent: int, cfg: ExplainConfig
) -> explain.Examples:
    return explain.examples_for(
        source, latent, explain.explainer_examples(source, latent, cfg), cfg
    )


# --------------------------------------------------------------------------------------------
# Near misses
# --------------------------------------------------------------------------------------------


def test_most_similar_ranks_decoder_rows_by_cosine() -> None:
    d = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.3], [-1.0, 0.0], [2.0, 0.0]])
    assert most_similar(d, 0, 3).tolist() == [4, 2, 1]  # 4 is parallel (scale does not count)
    assert most_similar(d, 0, 10).tolist() == [4, 2, 1, 3]
    live = np.array([True, True, True, True, False])
    assert most_similar(d, 0, 2, live).tolist() == [2, 1]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("latent", [0, 1, 2, 3])
def test_near_misses_never_include_a_window_where_the_latent_fires(seed: int, latent: int) -> None:
    source = near_miss_source(seed=seed)
    cfg = ExplainConfig(
        n_bins=3, examples_per_bin=3, seed=seed, max_near_misses=8, n_similar_latents=2
    )
    examples = shown_examples(source, latent, cfg)
    windows, kinds = near_miss_windows(source, latent, examples, cfg)
    assert len(windows) == len(kinds) <= min(len(examples.windows), cfg.max_near_misses)
    assert len(set(windows.tolist())) == len(windows)
    assert not set(windows.tolist()) & set(examples.windows.tolist())
    # the latent is 0 on every token of every near miss
    assert (source.activations(latent, windows) == 0).all()
    assert not np.isin(windows, source.active_windows(latent)).any()
    similar = source.similar_latents(latent, cfg.n_similar_latents)
    tops = set(np.concatenate([source.top_windows(int(s)) for s in similar]).tolist())
    for w, kind in zip(windows.tolist(), kinds, strict=True):
        if kind == "token":  # holds one of the shown examples' top tokens
            assert np.isin(source.tokens(np.array([w]))[0], examples.top_ids).any()
        else:
            assert kind == "similar" and w in tops
    assert kinds == sorted(kinds, key=lambda k: k != "token")  # same-token ones first


def test_near_misses_split_between_the_two_kinds() -> None:
    source = near_miss_source()
    cfg = ExplainConfig(n_bins=2, examples_per_bin=5, max_near_misses=7, n_similar_latents=1)
    examples = shown_examples(source, 0, cfg)
    assert set(examples.top_ids) == {CAT}
    windows, kinds = near_miss_windows(source, 0, examples, cfg)
    assert kinds == ["token"] * 4 + ["similar"] * 3  # half rounded up, then the rest
    # " cat" without " big" before it: latent 0 silent, the token there
    assert (source.tokens(windows[:4]) == CAT).any(axis=1).all()
    # the similar latent is 2 (every " cat"): its strongest windows where latent 0 is silent
    top2 = source.top_windows(2)
    silent = top2[~np.isin(top2, source.active_windows(0))]
    assert windows[4:].tolist() == [w for w in silent.tolist() if w not in windows[:4]][:3]
    again = near_miss_windows(source, 0, examples, cfg)
    assert np.array_equal(again[0], windows)  # seeded


def test_one_kind_fills_in_for_the_other() -> None:
    source = near_miss_source()
    # latent 1 fires on every " dog": no window holds its top token with it silent
    cfg = ExplainConfig(n_bins=2, examples_per_bin=3, max_near_misses=6, n_similar_latents=2)
    windows, kinds = near_miss_windows(source, 1, shown_examples(source, 1, cfg), cfg)
    assert kinds == ["similar"] * 6
    assert (source.activations(1, windows) == 0).all()


class NoSimilarSource(NearMissArraySource):
    def similar_latents(self, latent: int, n: int) -> np.ndarray:
        return np.zeros(0, np.int64)


def test_a_latent_without_near_misses_falls_back_to_the_default(tmp_path: Path) -> None:
    base = near_miss_source()
    source = NoSimilarSource(base._tokens, base._acts, base.directions)
    cfg = ExplainConfig(n_bins=2, examples_per_bin=2, min_count=5, method="contrastive")
    chats: dict[bool, list[Sequence[Message]]] = {True: [], False: []}

    def reply(chat: Sequence[Message], seed: int) -> str:
        chats["Counter-example" in chat[-1]["content"]].append(chat)
        return "Nouns for animals"

    table = explain.run(cfg, tmp_path, backend=FakeExplainer(reply), source=source, progress=False)
    rows = {r["latent"]: r for r in table.iter_rows(named=True)}
    # latent 1 (every " dog") has no near miss without similar latents: the default prompt
    assert rows[1]["status"] == "ok" and rows[1]["method"] == "default"
    assert rows[1]["reason"] == explain.NO_NEAR_MISSES
    assert rows[1]["near_miss_windows"] == [] and rows[1]["near_miss_kinds"] == []
    # latent 0 (" cat" after " big") has " cat" windows without " big"
    assert rows[0]["method"] == "contrastive" and rows[0]["reason"] is None
    assert rows[0]["near_miss_kinds"] == ["token"] * len(rows[0]["near_miss_windows"])
    assert len(chats[False]) == sum(r["method"] == "default" for r in rows.values())
    assert chats[False][0][0]["content"] == prompt.SYSTEM
    assert all(c[0]["content"] == prompt.CONTRASTIVE_SYSTEM for c in chats[True])


def test_contrastive_run_records_its_near_misses(tmp_path: Path) -> None:
    source = near_miss_source()
    cfg = ExplainConfig(
        n_bins=2, examples_per_bin=3, min_count=5, method="contrastive", max_near_misses=4
    )
    seen: list[str] = []

    def reply(chat: Sequence[Message], seed: int) -> str:
        seen.append(chat[-1]["content"])
        return '"cat" after "big"' if seed else 'The word "range"'  # a copy, then an answer

    table = explain.run(cfg, tmp_path, backend=FakeExplainer(reply), source=source, progress=False)
    assert table.columns == list(explain.SCHEMA)
    assert (table["method"] == "contrastive").all() and (table["status"] == "ok").all()
    assert (table["attempts"] == 2).all()  # same retries as the default method
    for row in table.iter_rows(named=True):
        lat, near = row["latent"], np.array(row["near_miss_windows"], dtype=np.int64)
        assert 1 <= len(near) <= 4 and len(row["near_miss_kinds"]) == len(near)
        assert (source.activations(lat, near) == 0).all()
        examples = shown_examples(source, lat, cfg)
        assert np.array_equal(near, near_miss_windows(source, lat, examples, cfg)[0])
        assert row["windows"] == examples.windows.tolist()
    assert all(text.count("Counter-example ") >= 1 for text in seen)
    cat = table.filter(pl.col("latent") == 0).row(0, named=True)
    assert cat["quoted_words"] == ["cat", "big"] and cat["consistency"] == 1.0


def test_a_source_without_the_near_miss_reader_is_refused(tmp_path: Path) -> None:
    base = near_miss_source()
    plain = ArraySource(base._tokens, base._acts, base._counts)
    with pytest.raises(TypeError, match="active_windows, token_windows, similar_latents"):
        explain.run(
            ExplainConfig(min_count=5, method="contrastive"),
            tmp_path,
            backend=FakeExplainer(),
            source=plain,
            progress=False,
        )


# --------------------------------------------------------------------------------------------
# The prompt (golden) and the hash
# --------------------------------------------------------------------------------------------

GOLDEN_CONTRASTIVE = """\
[system]
You explain what a feature of a language model detects. You see text examples in which the \
tokens where the feature fires are marked <<like this>>; after each example, the marked tokens \
are listed with how strongly the feature fires on them, from 0 to 9, and a line counts the most \
strongly marked token of each example. Then you see counter-examples: similar texts, often \
with the same words, where the feature does not fire at all.

Reply with one short phrase that says what the marked tokens have that the counter-examples \
lack: the words, the kind of words, or the context that matters. Quote a word only when most \
examples mark it. Do not mention the markers, the examples, the counter-examples or the numbers.

[user]
Example 1: for i in<< range>>(10):
Activations: (" range", 9)

Example 2: total = sum(x for x in<< range>>(n))
Activations: (" range", 8)

Example 3: for k in<< range>>(len(items)):
Activations: (" range", 9)

Top tokens: " range" 3 times

The feature does not fire anywhere in these texts:

Counter-example 1: the range of values is wide
Counter-example 2: a mountain range to the north

What sets the marked tokens apart from the texts where the feature does not fire? Answer with \
one short phrase.

[assistant]
The word "range" in Python for-loops

[user]
Example 1: he was born in<< 1815>> near
Activations: (" 1815", 9)

Example 2: the census of<< 1901>> counted
Activations: (" 1901", 7)

Example 3: prices fell after<< 2008>>, and
Activations: (" 2008", 8)

Top tokens: " 1815" once, " 1901" once, " 2008" once

The feature does not fire anywhere in these texts:

Counter-example 1: call 1815 for the desk
Counter-example 2: order number 2008 was lost

What sets the marked tokens apart from the texts where the feature does not fire? Answer with \
one short phrase.

[assistant]
Four-digit numbers that are years

[user]
Example 1: add 5<< grams>> of salt
Activations: (" grams", 9)

Example 2: heat it to 200<< degrees>> first<< and>> wait
Activations: (" degrees", 8), (" and", 2)

Example 3: a 3<< km>> walk to the lake
Activations: (" km", 7)

Top tokens: " grams" once, " degrees" once, " km" once

The feature does not fire anywhere in these texts:

Counter-example 1: weigh it in grams or ounces
Counter-example 2: a few degrees of freedom

What sets the marked tokens apart from the texts where the feature does not fire? Answer with \
one short phrase.

[assistant]
Units of measurement right after a number

[user]
Example 1: the<< cat>> sat\\n<< on>>
Activations: (" cat", 9), (" on", 2)

Example 2: a<< big big>> dog<<.>>
Activations: (" big", 2), (" big", 9), (".", 2)

Top tokens: " cat" once, " big" once

The feature does not fire anywhere in these texts:

Counter-example 1: the cat ran\\n
Counter-example 2: a big hat

What sets the marked tokens apart from the texts where the feature does not fire? Answer with \
one short phrase."""


def test_golden_contrastive_prompt() -> None:
    strings = [["the", " cat", " sat", "\n", " on"], ["a", " big", " big", " dog", "."]]
    acts = np.array([[0.0, 2.0, 0.3, 0.0, 0.5], [0.0, 1.0, 4.0, 0.8, 0.81]])
    counter = [
        prompt.render_counter_example(1, "the cat ran\n"),
        prompt.render_counter_example(2, "a big hat"),
    ]
    chat = prompt.render_contrastive_chat(
        render_examples(strings, acts), counter, top_tokens=explain.top_tokens(strings, acts)
    )
    text = "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in chat)
    assert text == GOLDEN_CONTRASTIVE
    # a retry rotates the demonstrations like the default prompt's
    rotated = prompt.render_contrastive_chat(render_examples(strings, acts), counter, 1)
    assert rotated[-2]["content"] == prompt.CONTRASTIVE_FEW_SHOT[0][2]


def test_the_stage_hash_changes_with_the_method(tmp_path: Path) -> None:
    from nlrw.pipeline import RunConfig, chained_hashes

    default = RunConfig()
    contrastive = dataclasses.replace(
        default, explain=dataclasses.replace(default.explain, method="contrastive")
    )
    assert chained_hashes(default)["explain"] != chained_hashes(contrastive)["explain"]
    assert chained_hashes(default)["contexts"] == chained_hashes(contrastive)["contexts"]
    # and the stage's own parts of a default run are not reused by a contrastive one
    source = near_miss_source()
    cfg = ExplainConfig(n_bins=2, examples_per_bin=2, min_count=5, part_size=1)
    explain.run(cfg, tmp_path, backend=FakeExplainer(), source=source, progress=False)
    with pytest.raises(FileExistsError, match="another config"):
        explain.run(
            dataclasses.replace(cfg, method="contrastive"),
            tmp_path,
            backend=FakeExplainer(),
            source=source,
            progress=False,
        )


# --------------------------------------------------------------------------------------------
# The cache reader (a smoke run's cache and coder)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cached_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nlrw import pipeline

    run_dir = tmp_path_factory.mktemp("contrastive") / "run"
    pipeline.run(pipeline.load_preset("smoke"), run_dir, until="cache", log=lambda _: None)
    return run_dir


def test_cache_source_near_misses(cached_run: Path) -> None:
    from nlrw.cache import active_windows, window_activations, window_tokens

    source = explain.CacheSource(cached_run)
    latents, counts = source.counts()
    latent = int(latents[np.argmax(counts)])
    similar = source.similar_latents(latent, 4)
    assert len(similar) == 4 and latent not in similar.tolist()
    assert (counts[np.isin(latents, similar)] > 0).all()
    token = int(window_tokens(cached_run, source.top_windows(latent)[:1])[0][0])
    hits = source.token_windows(token)
    every = source._window_tokens
    assert every is not None
    assert np.array_equal(hits, np.flatnonzero((every == token).any(1)))
    cfg = ExplainConfig(n_bins=2, examples_per_bin=2, method="contrastive", max_near_misses=4)
    examples = shown_examples(source, latent, cfg)
    windows, kinds = near_miss_windows(source, latent, examples, cfg)
    assert len(windows) == len(kinds) >= 1
    assert not np.isin(windows, active_windows(cached_run, latent)).any()
    assert (window_activations(cached_run, latent, windows) == 0).all()
    # the stage end to end on the cache (the subject's tokenizer, the coder's decoder)
    cfg = ExplainConfig(
        n_bins=2, examples_per_bin=2, min_count=4, max_latents=3, method="contrastive"
    )
    table = explain.run(cfg, cached_run, backend=FakeExplainer(), progress=False)
    ok = table.filter(pl.col("status") == "ok")
    assert ok.height == 3 and (ok["method"] == "contrastive").all()
    for row in ok.iter_rows(named=True):
        near = np.array(row["near_miss_windows"], dtype=np.int64)
        assert len(near) >= 1
        assert not np.isin(near, active_windows(cached_run, row["latent"])).any()
