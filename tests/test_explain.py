"""Tests of the explain stage: prompt text (golden), highlighting, digits, bins, sampling,
post-processing, latent selection, retries and resume, on synthetic latents and a fake backend;
one slow test with the real explainer."""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from nlrw import explain
from nlrw.backends.base import Message
from nlrw.explain import (
    ExplainConfig,
    activation_digits,
    bin_ranks,
    clean_explanation,
    consistency,
    copied_answer,
    copied_context,
    copied_word,
    draw_from_bins,
    quoted_words,
    render_examples,
    select_latents,
    top_tokens,
)
from nlrw.prompts import explain as prompt
from nlrw.prompts.markup import escape, highlight
from support import FakeExplainer, synthetic_source

# --------------------------------------------------------------------------------------------
# Prompt text
# --------------------------------------------------------------------------------------------


def test_golden_explainer_prompt() -> None:
    strings = [["the", " cat", " sat", "\n", " on"], ["a", " big", " big", " dog", "."]]
    acts = np.array([[0.0, 2.0, 0.3, 0.0, 0.5], [0.0, 1.0, 4.0, 0.8, 0.81]])
    chat = prompt.render_chat(render_examples(strings, acts), top_tokens=top_tokens(strings, acts))
    assert chat[0] == {"role": "system", "content": prompt.SYSTEM}
    assert chat[0]["content"] == (
        "You explain what a feature of a language model detects. You see text examples in which "
        "the tokens where the feature fires are marked <<like this>>; after each example, the "
        "marked tokens are listed with how strongly the feature fires on them, from 0 to 9, and "
        "the last line counts the most strongly marked token of each example.\n"
        "\n"
        "Reply with one short phrase that names the words, or the kind of words, that are "
        "marked, and their context when it matters. Quote a word only when most examples mark "
        "it; when the marked words differ, say what they have in common. Do not mention the "
        "markers, the examples or the numbers."
    )
    assert '"had"' not in chat[0]["content"]  # the demo's explainer copied it
    # Three demonstrations as earlier turns, rendered like the latent's own examples.
    assert [m["role"] for m in chat] == ["system"] + ["user", "assistant"] * 3 + ["user"]
    assert chat[1]["content"] == (
        "Example 1: for i in<< range>>(10):\n"
        'Activations: (" range", 9)\n'
        "\n"
        "Example 2: total = sum(x for x in<< range>>(n))\n"
        'Activations: (" range", 8)\n'
        "\n"
        "Example 3: for k in<< range>>(len(items)):\n"
        'Activations: (" range", 9)\n'
        "\n"
        'Top tokens: " range" 3 times\n'
        "\n"
        "What does the feature detect? Answer with one short phrase."
    )
    assert chat[2] == {"role": "assistant", "content": 'The word "range" in Python loops'}
    assert chat[5]["content"] == (
        "Example 1: add 5<< grams>> of salt\n"
        'Activations: (" grams", 9)\n'
        "\n"
        "Example 2: heat it to 200<< degrees>> first<< and>> wait\n"
        'Activations: (" degrees", 8), (" and", 2)\n'
        "\n"
        "Example 3: a 3<< km>> walk to the lake\n"
        'Activations: (" km", 7)\n'
        "\n"
        'Top tokens: " grams" once, " degrees" once, " km" once\n'
        "\n"
        "What does the feature detect? Answer with one short phrase."
    )
    # The demonstration next to the examples names a kind of word, not one quoted word.
    assert chat[6] == {"role": "assistant", "content": "Units of measurement after a number"}
    assert chat[-1] == {
        "role": "user",
        "content": (
            "Example 1: the<< cat>> sat\\n<< on>>\n"
            'Activations: (" cat", 9), (" on", 2)\n'
            "\n"
            "Example 2: a<< big big>> dog<<.>>\n"
            'Activations: (" big", 2), (" big", 9), (".", 2)\n'
            "\n"
            'Top tokens: " cat" once, " big" once\n'
            "\n"
            "What does the feature detect? Answer with one short phrase."
        ),
    }
    assert len(prompt.PROMPT_HASH) == 16
    # Without top tokens there is no tally line.
    plain = prompt.render_chat(render_examples(strings, acts))
    assert "Top tokens" not in plain[-1]["content"]


def test_top_token_tally() -> None:
    assert prompt.render_top_tokens([]) == ""
    assert prompt.render_top_tokens([" had", " gave", " had", "\n", " had"]) == (
        '" had" 3 times, " gave" once, "\\n" once'
    )
    many = [f" w{i}" for i in range(12)] + [" w11"]
    assert prompt.render_top_tokens(many) == (
        '" w11" 2 times, " w0" once, " w1" once, " w2" once, " w3" once, " w4" once, '
        '" w5" once, " w6" once, " w7" once, " w8" once, and 2 more examples'
    )


def test_top_tokens_are_each_examples_argmax() -> None:
    strings = [["a", "b", "c"], ["d", "e", "f"], ["g", "h", "i"]]
    acts = np.array([[0.0, 2.0, 2.0], [0.0, 0.0, 0.0], [3.0, 0.0, 1.0]])
    assert explain.top_positions(acts).tolist() == [1, -1, 0]  # first on ties; -1: silent
    assert top_tokens(strings, acts) == ["b", "g"]


def test_golden_prompt_for_a_synthetic_latent() -> None:
    source = synthetic_source()
    cfg = ExplainConfig(n_bins=2, examples_per_bin=1, seed=3)
    windows = explain.explainer_examples(source, 0, cfg)
    assert len(windows) == 2
    chat = explain.build_chat(source, 0, windows, cfg)
    user = chat[-1]["content"]
    assert user.count("Example ") == 2
    assert user.count("Activations: ") == 2
    for line in user.split("\n"):
        if line.startswith("Activations: "):
            assert set(line.removeprefix("Activations: ").split(", ")) <= {
                '(" cat"',
                *[f"{d})" for d in range(10)],
            }
    assert "<< cat>>" in user


# --------------------------------------------------------------------------------------------
# Highlighting and digits
# --------------------------------------------------------------------------------------------


def test_highlight_merges_consecutive_tokens() -> None:
    toks = ["a", " b", " c", " d", " e", " f"]
    assert highlight(toks, np.array([0, 1, 1, 0.1, 1, 1])) == "a<< b c>> d<< e f>>"
    assert highlight(toks, np.array([1, 1, 1, 1, 1, 1])) == "<<a b c d e f>>"
    assert highlight(toks, np.zeros(6)) == "a b c d e f"


def test_highlight_threshold_is_strict_and_per_example() -> None:
    toks = ["x", "y", "z"]
    # exactly 0.2 x max is not highlighted; just above is
    assert highlight(toks, np.array([10.0, 2.0, 2.0001])) == "<<x>>y<<z>>"
    # the max is the example's own: a weak example still gets its top token highlighted
    assert highlight(toks, np.array([0.01, 0.0, 0.0])) == "<<x>>yz"
    assert highlight(toks, np.array([10.0, 5.0, 0.0]), threshold=0.6) == "<<x>>yz"


def test_activation_digits_are_floored_and_clipped() -> None:
    toks = ["a", "b", "c", "d"]
    acts = np.array([4.0, 3.99, 0.79, 2.0])
    assert activation_digits(toks, acts) == [("a", 9), ("b", 9), ("d", 5)]
    assert activation_digits(toks, acts, clip=False) == [("a", 10), ("b", 9), ("d", 5)]
    assert activation_digits(toks, np.zeros(4)) == []
    # 0.81 / 4 = 0.2025 > 0.2: highlighted, digit floor(2.025) = 2
    assert activation_digits(toks, np.array([4.0, 0.81, 0.0, 0.0])) == [("a", 9), ("b", 2)]


def test_escape_keeps_examples_on_their_lines() -> None:
    assert escape("a\nb\tc\r") == "a\\nb\\tc\\r"
    assert escape("naïve — ok") == "naïve — ok"


# --------------------------------------------------------------------------------------------
# Bins and sampling
# --------------------------------------------------------------------------------------------


def test_bins_have_equal_counts_in_rank_order() -> None:
    bins = bin_ranks(23, 10)
    assert [len(b) for b in bins] == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    assert np.array_equal(np.concatenate(bins), np.arange(23))
    assert [len(b) for b in bin_ranks(4, 10)] == [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]


def test_draw_from_bins_is_seeded_and_per_bin() -> None:
    a = draw_from_bins(1000, 10, 4, np.random.default_rng(1))
    b = draw_from_bins(1000, 10, 4, np.random.default_rng(1))
    c = draw_from_bins(1000, 10, 4, np.random.default_rng(2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert len(a) == 40 and len(set(a.tolist())) == 40
    assert np.array_equal(np.bincount(a // 100, minlength=10), np.full(10, 4))
    # small bins give what they have; excluded ranks are never drawn
    d = draw_from_bins(15, 10, 4, np.random.default_rng(0), exclude=[0, 1])
    assert 0 not in d and 1 not in d and len(d) == 13


def test_explainer_examples_do_not_depend_on_other_latents() -> None:
    source = synthetic_source()
    cfg = ExplainConfig(n_bins=5, examples_per_bin=2, seed=7)
    w = explain.explainer_examples(source, 1, cfg)
    assert np.array_equal(w, explain.explainer_examples(source, 1, cfg))
    assert len(w) == 10
    assert set(w.tolist()) <= set(source.top_windows(1).tolist())


def test_select_latents() -> None:
    latents = np.array([0, 1, 2, 3, 4])
    counts = np.array([500, 10, 900, 500, 300])
    sel, skipped = select_latents(
        latents, counts, min_count=200, max_latents=3, selection="frequent", seed=0
    )
    assert sel.tolist() == [2, 0, 3] and skipped.tolist() == [1]
    r1, _ = select_latents(
        latents, counts, min_count=0, max_latents=None, selection="random", seed=1
    )
    r2, _ = select_latents(
        latents, counts, min_count=0, max_latents=None, selection="random", seed=1
    )
    assert r1.tolist() == r2.tolist() and sorted(r1.tolist()) == [0, 1, 2, 3, 4]


# --------------------------------------------------------------------------------------------
# Post-processing
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("The word cat.", "The word cat"),
        ("Sure, here is the explanation: the word 'cat' in stories.", "The word 'cat' in stories"),
        ("Explanation: Mentions of cats. They appear often.", "Mentions of cats"),
        ("[EXPLANATION]: periods ending sentences", "Periods ending sentences"),
        ('"The token dog after an adjective."<|im_end|>', "The token dog after an adjective"),
        ("**Explanation:** *Animal nouns*, e.g. cat and dog.", "Animal nouns, e.g. cat and dog"),
        ("assistant\nSure! Here's the pattern:\n\nNouns for pets", "Nouns for pets"),
        ("Certainly.\nExplanation: dogs running", "Dogs running"),
        ("First line about cats\nsecond line", "First line about cats"),
        ("", None),
        ("   \n  ", None),
        ("<|im_end|>", None),
        ('"."', None),
        # A quoted word at the end keeps its closing quote; only whole-reply quotes go.
        ('Words that start with "but".', 'Words that start with "but"'),
        ('"a" and "b"', '"a" and "b"'),
        ("“Quoted whole”.", "Quoted whole"),
    ],
)
def test_clean_explanation(raw: str, clean: str | None) -> None:
    assert clean_explanation(raw) == clean


def test_the_latent_browser_shows_the_check_next_to_the_explanation(tmp_path: Path) -> None:
    from nlrw.report.browser import explanation_with_check

    def reply(chat: Sequence[Message], seed: int) -> str:
        return "Nouns" if "<<.>>" in chat[-1]["content"] else 'The word "cat"'

    cfg = ExplainConfig(n_bins=2, examples_per_bin=2, min_count=10)
    table = explain.run(
        cfg, tmp_path, backend=FakeExplainer(reply), source=synthetic_source(), progress=False
    )
    shown = {r["latent"]: explanation_with_check(r) for r in table.iter_rows(named=True)}
    assert (
        shown[0] == 'The word "cat" [check: "cat" is the top token of 4 of 4 examples shown (100%)]'
    )
    assert (
        shown[1] == 'The word "cat" [check: "cat" is the top token of 0 of 4 examples shown (0%)]'
    )
    assert shown[2] == "Nouns [check: quotes no word]"
    row = {"explanation": "Nouns", "method": "contrastive", "near_miss_windows": [3, 4]}
    assert explanation_with_check(row) == "Nouns [contrastive, 2 near misses]"
    assert explanation_with_check({"explanation": "Old table"}) == "Old table"


# --------------------------------------------------------------------------------------------
# The stage: output, skipped latents, retries, resume
# --------------------------------------------------------------------------------------------


def test_run_writes_explanations(tmp_path: Path) -> None:
    source = synthetic_source()
    cfg = ExplainConfig(n_bins=4, examples_per_bin=2, min_count=10, part_size=2, seed=1)
    backend = FakeExplainer()
    table = explain.run(cfg, tmp_path, backend=backend, source=source, progress=False)
    assert table.columns == list(explain.SCHEMA)
    on_disk = pl.read_parquet(tmp_path / "explanations.parquet")
    assert on_disk.equals(table)
    ok = table.filter(pl.col("status") == "ok")
    assert ok["latent"].to_list() == [0, 1, 2]
    assert ok["explanation"].to_list() == ["The word cat"] * 3
    assert ok["prompt_hash"].to_list() == [prompt.PROMPT_HASH] * 3
    assert (ok["prompt_tokens"] == 100).all() and (ok["attempts"] == 1).all()
    assert all(len(w) == 8 for w in ok["windows"].to_list())
    skipped = table.filter(pl.col("status") == "skipped")
    assert skipped["latent"].to_list() == [3]
    assert skipped["reason"].item() == "count 3 < min_count 10"
    assert (tmp_path / "explain.json").is_file()
    assert backend.calls == [2, 1]  # parts of 2 latents: one batched call each


def test_max_latents_most_frequent_first(tmp_path: Path) -> None:
    source = synthetic_source()
    _, counts = source.counts()
    cfg = ExplainConfig(n_bins=2, examples_per_bin=1, min_count=10, max_latents=1)
    table = explain.run(cfg, tmp_path, backend=FakeExplainer(), source=source, progress=False)
    ok = table.filter(pl.col("status") == "ok")
    assert ok["latent"].to_list() == [int(np.argmax(counts))]


def test_retry_then_recorded_failure(tmp_path: Path) -> None:
    def reply(chat: Sequence[Message], seed: int) -> str:
        if "<< dog>>" in chat[-1]["content"]:  # latent 1: never a usable reply
            return "  " if seed % 2 else "<|im_end|>"
        if "<<.>>" in chat[-1]["content"] and seed == 0:  # latent 2: usable on the 2nd try
            return ""
        return "Mentions of cats."

    source = synthetic_source()
    cfg = ExplainConfig(n_bins=2, examples_per_bin=2, min_count=10, retries=2, part_size=8)
    backend = FakeExplainer(reply)
    table = explain.run(cfg, tmp_path, backend=backend, source=source, progress=False)
    rows = {r["latent"]: r for r in table.iter_rows(named=True)}
    assert rows[0]["status"] == "ok" and rows[0]["attempts"] == 1
    assert rows[2]["status"] == "ok" and rows[2]["attempts"] == 2
    assert rows[2]["prompt_tokens"] == 200
    assert rows[1]["status"] == "failed" and rows[1]["explanation"] is None
    assert rows[1]["attempts"] == 3 and "after 3 attempts" in rows[1]["reason"]
    assert backend.calls == [3, 2, 1]  # only the pending chats are asked again


@pytest.mark.parametrize(
    ("explanation", "copied"),
    [
        ('The word "grams" and other units like "km"', "grams"),
        ("The word “range” in loops", "range"),
        ('The word "Cat"', None),  # in the examples (case-insensitive)
        ('The word "ca"', None),  # a substring of a shown word counts
        ('Forms of "gram" after "cat"', None),  # one quoted word in the examples is enough
        ('The word "fancy"', None),  # in neither: a poor explanation, not a copy
        ("Nouns for pets", None),  # nothing quoted: nothing to check
        ('Quotes ""', None),
    ],
)
def test_copied_word_is_quoted_from_the_demonstrations_not_the_examples(
    explanation: str, copied: str | None
) -> None:
    chat = prompt.render_chat(['Example 1: the<< cat>> sat\nActivations: (" cat", 9)'])
    assert copied_word(explanation, chat) == copied


def test_rotation_puts_another_demonstration_last() -> None:
    chats = [prompt.render_chat(["Example 1: x"], r) for r in range(len(prompt.FEW_SHOT) + 1)]
    last_answers = [chat[-2]["content"] for chat in chats]
    assert last_answers[0] == prompt.FEW_SHOT[-1][1]  # rotation 0 is the plain prompt
    assert len(set(last_answers[: len(prompt.FEW_SHOT)])) == len(prompt.FEW_SHOT)
    assert chats[len(prompt.FEW_SHOT)] == chats[0]
    for chat in chats:  # same messages, another order
        assert sorted(m["content"] for m in chat) == sorted(m["content"] for m in chats[0])


def test_copied_answer_is_a_demonstrations_whole_answer() -> None:
    chat = prompt.render_chat(["Example 1: x"])
    assert copied_answer("Four-digit years", chat) == "Four-digit years"
    assert copied_answer("four-digit years.", chat) == "Four-digit years"
    assert copied_answer("Four-digit years in letters", chat) is None
    assert copied_answer("Example 1: x", chat) is None  # user turns are not answers


def test_a_copied_demonstration_is_retried_with_another_one_last(tmp_path: Path) -> None:
    """An explainer that copies the demonstration next to the examples (what the 0.5B default
    does) until its third attempt: the first copy repeats a whole answer (units), the
    rotation then puts "range" last, whose quoted word the examples lack."""

    def copy_last_demonstration(chat: Sequence[Message], seed: int) -> str:
        if "<< dog>>" in chat[-1]["content"]:
            return 'The word "dog"'  # grounded: kept at once
        return chat[-2]["content"] if seed < 2 else "Mentions of cats"

    source = synthetic_source()
    cfg = ExplainConfig(n_bins=2, examples_per_bin=2, min_count=10, retries=3, part_size=8)
    table = explain.run(
        cfg, tmp_path, backend=FakeExplainer(copy_last_demonstration), source=source, progress=False
    )
    rows = {r["latent"]: r for r in table.iter_rows(named=True)}
    assert rows[1]["explanation"] == 'The word "dog"' and rows[1]["attempts"] == 1
    for latent in (0, 2):
        assert rows[latent]["status"] == "ok"
        assert rows[latent]["explanation"] == "Mentions of cats"
        assert rows[latent]["attempts"] == 3

    for retries, why in [
        (0, "repeats a demonstration's answer: 'Units of measurement after a number'"),
        (1, "copies 'range' from the demonstrations, not in its examples"),
    ]:
        cfg = ExplainConfig(n_bins=2, examples_per_bin=2, min_count=10, retries=retries)
        table = explain.run(
            cfg,
            tmp_path / f"retries-{retries}",
            backend=FakeExplainer(copy_last_demonstration),
            source=source,
            progress=False,
        )
        row = table.filter(pl.col("latent") == 0).row(0, named=True)
        assert row["status"] == "failed" and row["explanation"] is None
        assert why in row["reason"]


# Jane Austen's prose, as the demo's latents show it: no Python, no years, no units.
PROSE = [
    ["It", " is", " a", " truth", " universally", " acknowledged", ",", " that", " a", " single"],
    [" She", " was", " ill", " and", " could", " not", " come", " down", " to", " dinner"],
    [" Mrs", ".", " Bennet", " was", " more", " vexed", " than", " ever", " by", " it"],
]
PROSE_COUNTER = ["Her sister was in good spirits.", "They walked to Meryton on Tuesday."]


def prose_chats(prose: Sequence[Sequence[str]] = PROSE) -> dict[str, list[list[Message]]]:
    """The default and contrastive explainer chats for ``prose`` (rows of equal length; " ill",
    " more" and "on" marked), in every rotation of the demonstrations."""
    acts = np.array([[0.0] * (len(row) - 1) + [1.0] for row in prose])
    for row, tokens in zip(acts, prose, strict=True):
        for i, tok in enumerate(tokens):
            if tok in (" ill", " more", "on"):
                row[i] = 5.0
    shown = render_examples(prose, acts)
    tops = top_tokens(prose, acts)
    rotations = range(len(prompt.FEW_SHOT))
    return {
        "default": [prompt.render_chat(shown, r, top_tokens=tops) for r in rotations],
        "contrastive": [
            prompt.render_contrastive_chat(
                shown,
                [prompt.render_counter_example(i + 1, t) for i, t in enumerate(PROSE_COUNTER)],
                r,
                top_tokens=tops,
            )
            for r in rotations
        ],
    }


@pytest.mark.parametrize(
    ("explanation", "default", "contrastive"),
    [
        # The demo's 0.5B explainer on Austen latents: "range" swapped, the rest kept.
        ('The word "proc" in Python loops', "python", "python"),
        ('The word "ru" in Python for-loops', "python", "python"),
        ('The word "in" in Python loops', "python", "python"),
        # A hyphenated word and its parts: "for-loops" is the contrastive answer's, "loops"
        # the default's (and a part of the contrastive "for-loops").
        ('The word "her" in for-loops', "loops", "for-loops"),
        ("Words in loops", "loops", "loops"),
        ("Four-digit years", "four-digit", "four-digit"),
        ("Four-digit numbers", "four-digit", "four-digit"),
        ("Units of measurement after a number", "units", "units"),
        ("Measurement of feelings", "measurement", "measurement"),
        # What the demo's explainer wrote with no template copied.
        ("Numbers in sentences", None, None),  # "numbers": the system prompt's word
        ("Words that appear more than once", None, None),  # "that" too
        ("Words that are not numbers", None, None),
        ('The word "and" in English', None, None),
        ('The word "more" in the context of a person\'s feelings', None, None),
        ('The word "ill" in Italian', None, None),
        ('The word "of" in the context of a number', None, None),  # "numbers" in the system
        ('The word "range"', None, None),  # quoted words are copied_word's to check
        ("Nouns", None, None),
        ("Words used for emphasis", None, None),  # "for" (of "for-loops"): under 4 letters
    ],
)
def test_copied_context_is_a_demonstrations_template_with_another_word(
    explanation: str, default: str | None, contrastive: str | None
) -> None:
    chats, n = prose_chats(), len(prompt.FEW_SHOT)  # every rotation alike
    assert [copied_context(explanation, c) for c in chats["default"]] == [default] * n
    assert [copied_context(explanation, c) for c in chats["contrastive"]] == [contrastive] * n


def test_copied_context_counts_only_the_demonstrations_topic_words() -> None:
    answers = [a for *_, a in prompt.FEW_SHOT + prompt.CONTRASTIVE_FEW_SHOT]
    # The demo's own words are in no demonstration's answer: nothing to borrow.
    for word in ("english", "italian", "context", "sentence", "person", "feelings"):
        assert not any(word in a.casefold() for a in answers), word
    # The answers' generic words are the system prompts' too, so they are never borrowed.
    for system in (prompt.SYSTEM, prompt.CONTRASTIVE_SYSTEM):
        assert all(w in system for w in ("word", "numbers", "after"))
    assert "that" in prompt.CONTRASTIVE_SYSTEM
    # The same word is grounded once the examples hold it (the highlight markers do not
    # split it: " Pyth<<on>>").
    python = [*PROSE, [" we", " wrote", " it", " for", " x", " in", " Pyth", "on", " loops", "."]]
    for chat in prose_chats(python)["default"]:
        assert " Pyth<<on>> loops" in chat[-1]["content"]
        assert copied_context('The word "on" in Python loops', chat) is None
        assert copied_context("Units of measurement in Python", chat) == "units"
    years = [
        *PROSE,
        [" some", " twenty", " years", " ago", ",", " when", " she", " was", " young", "."],
    ]
    for chat in prose_chats(years)["contrastive"]:
        assert copied_context("Spans of years", chat) is None
    assert copied_context("Spans of years", prose_chats()["contrastive"][0]) == "years"


def test_a_template_copy_is_retried_then_failed_with_the_reason(tmp_path: Path) -> None:
    """The demo's copy (``The word "proc" in Python loops`` for a latent without Python):
    retried with the demonstrations rotated, kept once grounded, the latent failed with the
    borrowed word when it never is."""

    def keep_the_template(chat: Sequence[Message], seed: int) -> str:
        user = chat[-1]["content"]
        if "<< cat>>" in user:  # latent 0: the template until the third attempt
            return 'The word "cat" in Python loops' if seed < 2 else 'The word "cat"'
        if "<< dog>>" in user:  # latent 1: always the template
            return 'The word "dog" in Python for-loops'
        return 'The word "." in English'  # latent 2: no demonstration's word, kept at once

    source = synthetic_source()
    cfg = ExplainConfig(n_bins=2, examples_per_bin=2, min_count=10, retries=2, part_size=8)
    backend = FakeExplainer(keep_the_template)
    table = explain.run(cfg, tmp_path, backend=backend, source=source, progress=False)
    rows = {r["latent"]: r for r in table.iter_rows(named=True)}
    assert rows[0]["status"] == "ok" and rows[0]["explanation"] == 'The word "cat"'
    assert rows[0]["attempts"] == 3
    assert rows[2]["status"] == "ok" and rows[2]["attempts"] == 1
    assert rows[1]["status"] == "failed" and rows[1]["explanation"] is None
    assert rows[1]["attempts"] == 3
    assert rows[1]["reason"] == (
        "no usable reply after 3 attempts (last: borrows 'python' from a demonstration's "
        "answer, not in its examples: 'The word \"dog\" in Python for-loops')"
    )
    assert backend.calls == [3, 2, 2]  # latents 0 and 1 asked again, twice


# --------------------------------------------------------------------------------------------
# Consistency: the quoted words against each shown example's top token
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("explanation", "words"),
    [
        ('The word "had"', ["had"]),
        ("The word “Had” and ‘been’", ["had", "been"]),
        ("The word 'cat' in stories", ["cat"]),
        ("Don't say 'no'", ["no"]),  # the apostrophe inside a word opens nothing
        ('"had" or "HAD" or " had "', ["had"]),
        ('The phrase "of the"', ["of", "the"]),
        ("Nouns for pets", []),
        ("Austen's heroines' names", []),  # apostrophes are not quotes
        ('Quotes ""', []),
        (None, []),
    ],
)
def test_quoted_words(explanation: str | None, words: list[str]) -> None:
    assert quoted_words(explanation) == words


def test_consistency_is_the_share_of_top_tokens_on_quoted_words() -> None:
    tokens = [" separation", " gave", " than", " Had", " to", "had", " a", " had "]
    share, words = consistency('The word "had"', tokens)
    assert words == ["had"] and share == pytest.approx(3 / 8)
    assert consistency('The words "gave" and "than"', tokens)[0] == pytest.approx(2 / 8)
    assert consistency('"barked"', [" bark", "ed"])[0] == 0.0  # exact words, not pieces
    share, words = consistency("Past tense verbs", tokens)
    assert np.isnan(share) and words == []  # nothing quoted: nothing to check
    assert np.isnan(consistency('The word "had"', [])[0])
    assert np.isnan(consistency(None, tokens)[0])


def test_consistency_from_arrays() -> None:
    """The latent's top activations as arrays: the check reads each example's argmax."""
    strings = [[" he", " had", " gone"], [" she", " gave", " it"], [" they", " had", " had"]]
    acts = np.array([[0.0, 3.0, 1.0], [0.2, 1.0, 0.0], [0.0, 0.5, 2.0]])
    assert consistency('The word "had"', top_tokens(strings, acts))[0] == pytest.approx(2 / 3)


def test_run_records_consistency(tmp_path: Path) -> None:
    def reply(chat: Sequence[Message], seed: int) -> str:
        return "Nouns" if "<<.>>" in chat[-1]["content"] else 'The word "cat"'

    source = synthetic_source()
    cfg = ExplainConfig(n_bins=2, examples_per_bin=2, min_count=10)
    table = explain.run(cfg, tmp_path, backend=FakeExplainer(reply), source=source, progress=False)
    rows = {r["latent"]: r for r in table.iter_rows(named=True)}
    assert rows[0]["consistency"] == 1.0 and rows[0]["quoted_words"] == ["cat"]  # fires on cat
    assert rows[1]["consistency"] == 0.0 and rows[1]["quoted_words"] == ["cat"]  # on dog
    assert np.isnan(rows[2]["consistency"]) and rows[2]["quoted_words"] == []
    assert np.isnan(rows[3]["consistency"])  # skipped
    assert [rows[k]["method"] for k in range(4)] == ["default"] * 3 + [None]
    assert all(rows[k]["near_miss_windows"] == [] for k in range(4))


def test_resume_after_a_kill(tmp_path: Path) -> None:
    source = synthetic_source()
    cfg = ExplainConfig(n_bins=2, examples_per_bin=2, min_count=10, part_size=1)
    with pytest.raises(KeyboardInterrupt):
        explain.run(
            cfg, tmp_path, backend=FakeExplainer(fail_after=2), source=source, progress=False
        )
    parts = sorted(p.name for p in (tmp_path / "explanations.parts").glob("part-*.parquet"))
    assert parts == ["part-000000.parquet", "part-000001.parquet", "part-000002.parquet"]
    assert not (tmp_path / "explanations.parquet").exists()
    assert not list((tmp_path / "explanations.parts").glob(".*tmp"))
    backend = FakeExplainer()
    table = explain.run(cfg, tmp_path, backend=backend, source=source, progress=False)
    assert backend.calls == [1]  # only the third latent is left
    assert table.filter(pl.col("status") == "ok").height == 3
    fresh = explain.run(
        cfg, tmp_path / "fresh", backend=FakeExplainer(), source=source, progress=False
    )
    assert fresh.equals(table)
    # a different config refuses the old parts instead of mixing them
    with pytest.raises(FileExistsError, match="another config"):
        explain.run(
            ExplainConfig(n_bins=3, min_count=10, part_size=1),
            tmp_path,
            backend=FakeExplainer(),
            source=source,
            progress=False,
        )


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="n_bins"):
        ExplainConfig(n_bins=0)
    with pytest.raises(ValueError, match="highlight_threshold"):
        ExplainConfig(highlight_threshold=1.5)


# --------------------------------------------------------------------------------------------
# Slow: the real explainer and scorer
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_explainer_and_scorer_on_synthetic_latents(tmp_path: Path) -> None:
    if importlib.util.find_spec("nlrw.backends.transformers") is None:
        pytest.skip("nlrw.backends.transformers is not available yet")
    from nlrw import score
    from nlrw.backends import load_backend

    try:
        backend = load_backend("transformers", "qwen2.5-coder-0.5b")
    except Exception as err:  # the embedded model's packages may be missing
        pytest.skip(f"qwen2.5-coder-0.5b cannot be loaded: {err}")
    source = synthetic_source(n_windows=200)
    try:
        table = explain.run(
            ExplainConfig(n_bins=2, examples_per_bin=3, min_count=10, max_new_tokens=40),
            tmp_path,
            backend=backend,
            source=source,
            progress=False,
        )
        ok = table.filter(pl.col("status") == "ok")
        assert ok.height == 3, table
        for text in ok["explanation"]:
            assert 3 <= len(text) < 400 and "\n" not in text
        scores = score.run(
            score.ScoreConfig(n_bins=2, examples_per_bin=3, n_non_activating=6),
            tmp_path,
            backend=backend,
            source=source,
            progress=False,
        )
    finally:
        backend.close()
    print(ok.select("latent", "explanation", "attempts", "completion_tokens"))
    print(
        scores.select(
            "latent", "balanced_accuracy", "auroc", "shuffled_balanced_accuracy", "mean_mass"
        )
    )
    assert scores.height == 3
    assert scores["balanced_accuracy"].is_between(0, 1).all()
    assert scores["auroc"].is_between(0, 1).all()
    assert (scores["mean_mass"] > 0.5).all()


# --------------------------------------------------------------------------------------------
# The single-word prompt
# --------------------------------------------------------------------------------------------


def test_golden_single_word_prompt() -> None:
    strings = [["I", " had", " no"], ["there", " was", " no"]]
    acts = np.array([[0.0, 0.0, 3.0], [0.0, 0.0, 2.0]])
    chat = prompt.render_chat(
        render_examples(strings, acts), top_tokens=top_tokens(strings, acts), style="single-word"
    )
    assert chat[0]["content"] == prompt.SYSTEM.replace(
        "Quote a word only when most examples mark it;",
        'When most examples mark the same word, answer: The word "WORD";',
    )
    assert "Quote a word only" not in chat[0]["content"]
    # Four demonstrations; the one-word one first, the default's three after it in order.
    assert [m["role"] for m in chat] == ["system"] + ["user", "assistant"] * 4 + ["user"]
    assert chat[1]["content"] == (
        "Example 1: def f(x):<< return>> x + 1\n"
        'Activations: (" return", 9)\n'
        "\n"
        "Example 2: if done:<< return>> None\n"
        'Activations: (" return", 8)\n'
        "\n"
        "Example 3: else:<< return>> total\n"
        'Activations: (" return", 9)\n'
        "\n"
        'Top tokens: " return" 3 times\n'
        "\n"
        "What does the feature detect? Answer with one short phrase."
    )
    assert chat[2] == {"role": "assistant", "content": 'The word "return"'}
    default = prompt.render_chat(
        render_examples(strings, acts), top_tokens=top_tokens(strings, acts)
    )
    assert chat[3:] == default[1:]
    assert chat[-1]["content"].endswith(
        'Top tokens: " no" 2 times\n\nWhat does the feature detect? Answer with one short phrase.'
    )
    # A retry rotates the four demonstrations like the default's three.
    rotated = prompt.render_chat(["Example 1: x"], 1, style="single-word")
    assert rotated[-2]["content"] == 'The word "return"'


def test_single_word_prompt_has_its_own_hash_and_the_default_keeps_its_own() -> None:
    assert prompt.prompt_hash("nlrw") == prompt.PROMPT_HASH == "a2759137d3f7eb64"
    assert len(prompt.prompt_hash("single-word")) == 16
    assert prompt.prompt_hash("single-word") != prompt.PROMPT_HASH
    with pytest.raises(ValueError, match=r"unknown explain\.prompt 'terse'"):
        prompt.prompt_hash("terse")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"unknown explain\.prompt 'terse'"):
        ExplainConfig(prompt="terse")  # type: ignore[arg-type]


def test_quoting_the_one_word_demonstration_is_a_copy() -> None:
    chat = prompt.render_chat(["Example 1: she<< had>> gone"], style="single-word")
    assert copied_word('The word "return"', chat) == "return"
    assert copied_word('The word "had"', chat) is None


def test_run_with_the_single_word_prompt_records_its_hash(tmp_path: Path) -> None:
    from nlrw.pipeline import HASH_NEUTRAL_DEFAULTS, RunConfig, chained_hashes

    source = synthetic_source()
    cfg = ExplainConfig(
        n_bins=4, examples_per_bin=2, min_count=10, part_size=2, seed=1, prompt="single-word"
    )
    backend = FakeExplainer()
    table = explain.run(cfg, tmp_path, backend=backend, source=source, progress=False)
    ok = table.filter(pl.col("status") == "ok")
    assert ok["prompt_hash"].to_list() == [prompt.prompt_hash("single-word")] * 3
    # The stage hash: the default prompt leaves an older run's hash as it was; the other
    # prompt changes it.
    assert HASH_NEUTRAL_DEFAULTS["explain"] == {"prompt": "nlrw"}
    default = RunConfig()
    single = dataclasses.replace(
        default, explain=dataclasses.replace(default.explain, prompt="single-word")
    )
    assert chained_hashes(default)["explain"] != chained_hashes(single)["explain"]
    assert chained_hashes(default)["contexts"] == chained_hashes(single)["contexts"]
