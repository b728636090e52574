"""Tests of the simulate stage: the simulator's prompt text (golden, both layouts, with a chat
template and the plain fallback), the marked context, the digit tokenization, the expected
value, latent selection and shards, then the stage on a smoke run directory (tiny random
models): output schema, true activations, skip/overwrite, resume after a kill, 3 shards merged
== one run byte for byte, engines agreeing, and each bad input. One slow test runs the default
simulator (Qwen2.5-Coder-0.5B)."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from nlrw import simulate
from nlrw.backends.base import AnswerDistribution, SplitPrompt, encode_prompt, render
from nlrw.contexts import read_contexts, true_activations
from nlrw.prompts import simulation as prompt
from nlrw.prompts.markup import mark_last
from nlrw.simulate import (
    SimulateConfig,
    expected_values,
    merge,
    parse_shard,
    select_latents,
    shard_chunks,
)
from support import (
    READABLE_EXPLANATIONS,
    quote_a_marked_word,
    smoke_run_with_readable_explanations,
    tiny_tokenizer,
)

torch.set_num_threads(1)

SYSTEM = (
    "We're studying latents (neurons) of a language model. Each latent looks for one particular "
    "thing in a short text. You will read an explanation of what a latent looks for and a text "
    "whose LAST token is marked <<like this>>.\n"
    "\n"
    "Predict how strongly the latent fires on the marked last token, on a scale from 0 to 9: 0 "
    "means it does not fire at all, 9 means it fires as strongly as it ever does. Judge only the "
    "marked token, using the text before it as context: the latent may fire on other tokens of "
    "the text, which does not count. Most latents fire on very few tokens, so 0 is by far the "
    "most common answer.\n"
    "\n"
    'Answer with "Rating: " and one digit.'
)
QUESTION = "How strongly does the latent fire on the marked last token?"
SHOTS = [
    (
        "Mentions of animals, especially pets",
        "When she came back from her walk, the children were playing in the garden with their "
        "<<dog>>",
        "8",
    ),
    (
        "Words about money, wealth and income",
        "He had a good fortune and a fine house in town, and everyone agreed that he was very "
        "<<generous>>",
        "3",
    ),
    (
        "Closing quotation marks at the end of spoken dialogue",
        '"I shall write to her tomorrow," said Mr. Elliot, taking up his <<pen>>',
        "0",
    ),
]


def _user(explanation: str, text: str, layout: str, cut: str = "") -> str:
    if layout == "explanation-first":
        return f"Feature explanation: {explanation}.\n\n{cut}Text: {text}\n\n{QUESTION}"
    return f"Text: {text}\n\n{QUESTION}\n\nFeature explanation:{cut} {explanation}."


# --------------------------------------------------------------------------------------------
# Prompt text (golden)
# --------------------------------------------------------------------------------------------


def test_golden_simulation_chat_explanation_first() -> None:
    chat = prompt.render_chat("Words about cats.", "the big <<cat>>", "explanation-first")
    assert chat == [
        {"role": "system", "content": SYSTEM},
        {
            "role": "user",
            "content": "Feature explanation: Mentions of animals, especially pets.\n\nText: When "
            "she came back from her walk, the children were playing in the garden with their "
            "<<dog>>\n\nHow strongly does the latent fire on the marked last token?",
        },
        {"role": "assistant", "content": "Rating: 8"},
        {
            "role": "user",
            "content": "Feature explanation: Words about money, wealth and income.\n\nText: He "
            "had a good fortune and a fine house in town, and everyone agreed that he was very "
            "<<generous>>\n\nHow strongly does the latent fire on the marked last token?",
        },
        {"role": "assistant", "content": "Rating: 3"},
        {
            "role": "user",
            "content": "Feature explanation: Closing quotation marks at the end of spoken "
            'dialogue.\n\nText: "I shall write to her tomorrow," said Mr. Elliot, taking up his '
            "<<pen>>\n\nHow strongly does the latent fire on the marked last token?",
        },
        {"role": "assistant", "content": "Rating: 0"},
        {
            "role": "user",
            # one final period, whether or not the explanation had one
            "content": "Feature explanation: Words about cats.\n\nText: the big <<cat>>\n\n"
            "How strongly does the latent fire on the marked last token?",
        },
    ]
    assert len(prompt.PROMPT_HASH) == 16


def test_golden_paper_style_chat() -> None:
    chat = prompt.render_chat(
        "Words about cats.", "the big <<cat>>", "explanation-first", style="paper"
    )
    question = "\n\nRate the marked last token of each text."
    assert chat == [
        {"role": "system", "content": prompt.PAPER_SYSTEM},
        {
            "role": "user",
            "content": "Feature explanation: Mentions of animals, especially pets.\n\nText 1: "
            "When she came back from her walk, the children were playing in the garden with "
            "their <<dog>>\nText 2: In the morning the weather had turned, and the road was "
            "<<cold>>" + question,
        },
        {"role": "assistant", "content": "[8,0]"},
        {
            "role": "user",
            "content": "Feature explanation: Words about money, wealth and income.\n\nText 1: "
            "He had a good fortune and a fine house in town, and everyone agreed that he was "
            "very <<generous>>\nText 2: After the sale of the estate she was left with a large "
            "<<fortune>>" + question,
        },
        {"role": "assistant", "content": "[3,9]"},
        {
            "role": "user",
            "content": "Feature explanation: Closing quotation marks at the end of spoken "
            'dialogue.\n\nText 1: "I shall write to her tomorrow," said Mr. Elliot, taking up '
            'his <<pen>>\nText 2: "Good morning, Anne," said Mr. Elliot, "it is a fine day<<.">>'
            '\nText 3: "I shall come tomorrow<<.">>' + question,
        },
        {"role": "assistant", "content": "[0,0,8]"},
        {
            "role": "user",
            "content": "Feature explanation: Words about cats.\n\nText 1: the big <<cat>>"
            + question,
        },
    ]
    # What the system prompt tells the model, as the authors' does.
    system = prompt.PAPER_SYSTEM
    assert "linguistics researcher" in system and "0 to 9" in system
    assert "no relation" in system and "lower ratings are far more likely" in system
    assert "Python list" in system
    split = prompt.render_chat("x", "y <<z>>", "context-first", split=True, style="paper")
    assert split[-1]["content"].startswith("Text 1: y <<z>>\n\n" + prompt.PAPER_QUESTION)
    assert split[-1]["content"].endswith("Feature explanation:" + prompt.SPLIT + " x.")
    assert prompt.prompt_hash("paper") == prompt.PAPER_PROMPT_HASH != prompt.PROMPT_HASH
    with pytest.raises(ValueError, match="unknown simulation prompt"):
        prompt.render_chat("x", "y", style="poem")  # type: ignore[arg-type]


def test_paper_style_reads_the_digit_after_a_bracket() -> None:
    digits = prompt.digit_tokens(tiny_tokenizer(), "paper")
    assert digits.answer_prefix == "["
    assert digits.tokens == tuple(str(d) for d in range(10))


def test_golden_simulation_text_with_chat_template() -> None:
    tok = tiny_tokenizer(chat_template=True)
    chat = prompt.render_chat(
        "Words about cats", "the big <<cat>>", "explanation-first", split=True
    )
    text = render(tok, chat, answer_prefix="Rating: ")
    expected = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
    for expl, shot_text, rating in SHOTS:
        expected += f"<|im_start|>user\n{_user(expl, shot_text, 'explanation-first')}<|im_end|>\n"
        expected += f"<|im_start|>assistant\nRating: {rating}<|im_end|>\n"
    expected += (
        "<|im_start|>user\nFeature explanation: Words about cats.\n\n\x00Text: the big <<cat>>"
        "\n\nHow strongly does the latent fire on the marked last token?<|im_end|>\n"
        "<|im_start|>assistant\nRating: "
    )
    assert text == expected


def test_golden_simulation_text_plain_fallback_context_first() -> None:
    tok = tiny_tokenizer(chat_template=False)
    chat = prompt.render_chat("Words about cats", "the big <<cat>>", "context-first", split=True)
    text = render(tok, chat, answer_prefix="Rating: ")
    expected = f"System: {SYSTEM}\n\n"
    for expl, shot_text, rating in SHOTS:
        expected += f"User: {_user(expl, shot_text, 'context-first')}\n\n"
        expected += f"Assistant: Rating: {rating}\n\n"
    expected += (
        "User: Text: the big <<cat>>\n\nHow strongly does the latent fire on the marked last "
        "token?\n\nFeature explanation:\x00 Words about cats.\n\nAssistant: Rating: "
    )
    assert text == expected


@pytest.mark.parametrize("chat_template", [True, False])
@pytest.mark.parametrize("layout", ["explanation-first", "context-first"])
def test_split_is_at_the_layout_boundary_and_tokenizes_like_the_whole(
    chat_template: bool, layout: prompt.Layout
) -> None:
    from nlrw.backends.base import split_encode

    tok = tiny_tokenizer(chat_template=chat_template)
    texts = ["the big <<cat>>", "a small <<dog>>"]
    expls = ["Words about cats", "Words about dogs"]
    got: dict[tuple[int, int], SplitPrompt] = {}
    for i, e in enumerate(expls):
        for j, t in enumerate(texts):
            chat = prompt.render_chat(e, t, layout, split=True)
            got[i, j] = split_encode(tok, chat, prompt.SPLIT, "Rating: ")
            whole = render(tok, prompt.render_chat(e, t, layout), answer_prefix="Rating: ")
            assert [*got[i, j].prefix, *got[i, j].suffix] == encode_prompt(tok, whole)
            suffix_text = str(tok.decode(list(got[i, j].suffix)))
            head = "Text: " if layout == "explanation-first" else f" {expls[i]}."
            assert suffix_text.startswith(head)
            assert suffix_text.endswith("Rating: ")
    if layout == "explanation-first":  # contexts of a latent share the prefix
        assert got[0, 0].prefix == got[0, 1].prefix != got[1, 0].prefix
    else:  # latents of a context share it
        assert got[0, 0].prefix == got[1, 0].prefix != got[0, 1].prefix


def test_mark_last_keeps_leading_space_outside_and_escapes() -> None:
    assert mark_last("the big", " cat") == "the big <<cat>>"
    assert mark_last("the big ", "cat") == "the big <<cat>>"
    assert mark_last("line one", "\n") == "line one<<\\n>>"
    assert mark_last("a\tb", " \nx") == "a\\tb <<\\nx>>"
    assert mark_last("two", "  ") == "two<<  >>"  # all spaces: marked as it is
    assert mark_last("", "Hello") == "<<Hello>>"


def test_context_text_decodes_with_the_subject_tokenizer() -> None:
    from transformers import AutoTokenizer

    from nlrw.assets import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("tiny-random-llama"))
    ids = tok("Oh No", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids)[-1] == "ĠNo"
    assert prompt.context_text(tok, ids) == "Oh <<No>>"
    ids = tok("said he.\nYes", add_special_tokens=False)["input_ids"]
    assert prompt.context_text(tok, ids) == "said he.\\n<<Yes>>"
    with pytest.raises(ValueError, match="at least one token"):
        prompt.context_text(tok, [])


# --------------------------------------------------------------------------------------------
# Digit tokens
# --------------------------------------------------------------------------------------------


def _bpe(merges: list[tuple[str, str]], name: str) -> PreTrainedTokenizerFast:
    """Byte-level BPE over the 256 bytes plus ``merges``, no chat template."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)  # pyright: ignore
    tok.decoder = decoders.ByteLevel()  # pyright: ignore
    t = PreTrainedTokenizerFast(tokenizer_object=tok)
    t.name_or_path = name
    return t


def test_digit_tokens_bare_after_rating_space() -> None:
    digits = prompt.digit_tokens(tiny_tokenizer())
    assert digits.answer_prefix == "Rating: "
    assert digits.tokens == tuple(str(d) for d in range(10))
    assert digits.record()["tokens"] == [str(d) for d in range(10)]


def test_digit_tokens_space_digit_after_rating_colon() -> None:
    # Llama-3 style: a space merges into the digit after it, so "Rating: " cannot be used.
    tok = _bpe([("Ġ", str(d)) for d in range(10)], "space-digits")
    digits = prompt.digit_tokens(tok)
    assert digits.answer_prefix == "Rating:"
    assert digits.tokens == tuple(f"Ġ{d}" for d in range(10))
    assert [tok.decode([i]) for i in digits.ids] == [f" {d}" for d in range(10)]


def test_digit_tokens_that_merge_with_the_prefix_are_refused() -> None:
    merges = [(":", "Ġ")] + [(":Ġ", str(d)) for d in range(10)] + [(":", str(d)) for d in range(10)]
    tok = _bpe(merges, "merging-digits")
    with pytest.raises(ValueError, match="Rating: ") as err:
        prompt.digit_tokens(tok)
    message = str(err.value)
    assert "after 'Rating: '" in message and "after 'Rating:'" in message
    assert "merges with the prefix" in message


# --------------------------------------------------------------------------------------------
# Expected value, selection, shards
# --------------------------------------------------------------------------------------------


def test_expected_values_by_hand() -> None:
    probs = np.zeros((3, 10))
    probs[0, [0, 9]] = [0.25, 0.25]  # mass 0.5
    probs[1, 3] = 0.8
    # row 2: zero mass
    assert expected_values(probs) == pytest.approx([4.5, 3.0, 0.0])
    assert expected_values(probs, "paper") == pytest.approx([2.25, 2.4, 0.0])
    with pytest.raises(ValueError, match=r"\[n, 10\]"):
        expected_values(np.zeros((2, 9)))


def test_select_latents_by_score_then_id() -> None:
    scores = pl.DataFrame(
        {"latent": [1, 2, 3, 4, 5], "balanced_accuracy": [0.6, float("nan"), 0.9, 0.6, 0.7]}
    )
    assert select_latents([5, 3, 1, 2, 4], scores, None) == [1, 2, 3, 4, 5]
    assert select_latents([5, 3, 1, 2, 4], scores, 3) == [1, 3, 5]  # 0.9, 0.7, 0.6 (tie: id 1)
    assert select_latents([5, 3, 1, 2, 4], scores, 5) == [1, 2, 3, 4, 5]
    assert select_latents([5, 3, 1, 2, 4, 9], scores, 5) == [1, 2, 3, 4, 5]  # NaN, none: by id
    assert select_latents([5, 3, 1], None, 2) == [1, 3]


def test_shards_partition_the_chunks() -> None:
    assert parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "1", "-1/2", "a/b", "0/0"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)
    parts = [shard_chunks(10, f"{i}/3") for i in range(3)]
    assert sorted(c for part in parts for c in part) == list(range(10))
    assert parts[0] == [0, 3, 6, 9]
    assert shard_chunks(4, None) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="shard"):
        SimulateConfig(shard="2/2")


# --------------------------------------------------------------------------------------------
# The stage on a smoke run directory
# --------------------------------------------------------------------------------------------

TINY = "tiny-random-llama"
EXPLANATIONS = READABLE_EXPLANATIONS


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A smoke run up to score (contexts included), its explanations replaced by readable ones
    for three latents (the others are 'skipped' by explain's min_count)."""
    return smoke_run_with_readable_explanations(tmp_path_factory.mktemp("simulate") / "run")


@pytest.fixture
def run_dir(base_dir: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(base_dir, dest)
    return dest


@pytest.fixture(scope="module")
def tiny_backend() -> Any:
    from nlrw.backends.transformers import TransformersBackend

    return TransformersBackend(TINY, dtype="float32", device="cpu", engine_batch_size=8)


class FakeSimulator:
    """A backend whose digit probabilities are a deterministic function of the prompt's ids;
    records the prompts of each call; raises KeyboardInterrupt after ``fail_after`` calls."""

    name = "fake"
    model = "fake-simulator"

    def __init__(self, fail_after: int | None = None) -> None:
        from transformers import AutoTokenizer

        from nlrw.assets import resolve_model

        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model(TINY))
        self.fail_after = fail_after
        self.calls: list[list[SplitPrompt]] = []

    def answer_distribution_ids(
        self, prompts: Sequence[SplitPrompt], answer_ids: Sequence[int]
    ) -> AnswerDistribution:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls.append(list(prompts))
        probs = np.zeros((len(prompts), len(answer_ids)))
        for r, p in enumerate(prompts):
            rng = np.random.default_rng([len(p.prefix), *p.suffix])
            probs[r] = rng.dirichlet(np.ones(len(answer_ids))) * 0.9
        return AnswerDistribution(probs, probs.sum(1))

    def generate(self, *a: Any, **k: Any) -> Any:
        raise NotImplementedError

    def answer_distribution(self, *a: Any, **k: Any) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _cfg(**kw: Any) -> SimulateConfig:
    kw.setdefault("model", TINY)
    kw.setdefault("dtype", "float32")
    kw.setdefault("progress", False)
    kw.setdefault("chunk_latents", 1)
    kw.setdefault("batch_size", 8)
    return SimulateConfig(**kw)


def test_stage_writes_the_table_and_the_record(
    run_dir: Path, tiny_backend: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="nlrw.simulate"):
        table = simulate.run(_cfg(), run_dir, backend=tiny_backend)
    contexts = read_contexts(run_dir)
    n_ctx = contexts.height
    assert n_ctx == 18  # both splits
    assert table.schema == pl.Schema(simulate.SCHEMA)
    assert table.equals(pl.read_parquet(run_dir / "simulations.parquet"))
    assert table.height == 3 * n_ctx
    assert table.select("latent", "context_id").rows() == [
        (lat, c) for lat in sorted(EXPLANATIONS) for c in range(n_ctx)
    ]
    probs = np.asarray(table["digit_probs"].to_list()).astype(np.float64)
    assert probs.shape == (table.height, 10)
    np.testing.assert_allclose(table["digit_mass"], probs.sum(1), rtol=1e-5)
    np.testing.assert_allclose(table["expected_value"], expected_values(probs), atol=1e-4)
    true = true_activations(run_dir, sorted(EXPLANATIONS), np.arange(n_ctx))
    np.testing.assert_array_equal(table["true_activation"].to_numpy(), true.reshape(-1))
    assert (table["true_activation"] > 0).any()

    record = json.loads((run_dir / "simulate.json").read_text())
    assert record["stage"] == "simulate"
    assert record["digit_tokens"]["answer_prefix"] == "Rating: "
    assert record["digit_tokens"]["tokens"] == [str(d) for d in range(10)]
    assert record["layout"] == "explanation-first"
    assert record["dtype"] == "float32"
    assert record["prompt_hash"] == prompt.PROMPT_HASH
    assert record["throughput"]["prompts"] == 3 * n_ctx
    assert record["throughput"]["prompts_per_second"] > 0
    assert record["missing_explanations"]["policy"] == "exclude"
    assert set(record["missing_explanations"]["by_status"]) == {"skipped"}
    assert record["contexts_per_split"] == {"eval": 12, "calibration": 6}
    # A random tiny model barely answers with digits: each latent warned about, once.
    assert record["low_mass_latents"] == sorted(EXPLANATIONS)
    warnings = [r.getMessage() for r in caplog.records if "digit mass" in r.getMessage()]
    assert len(warnings) == 3
    for lat, message in zip(sorted(EXPLANATIONS), warnings, strict=True):
        assert f"latent {lat} " in message and prompt.PROMPT_HASH in message


def test_stage_with_the_paper_prompt(run_dir: Path, tiny_backend: Any, tmp_path: Path) -> None:
    target = tmp_path / "paper"
    shutil.copytree(run_dir, target)
    (target / "simulations.parquet").unlink(missing_ok=True)
    (target / "simulate.json").unlink(missing_ok=True)
    shutil.rmtree(target / "simulations", ignore_errors=True)
    table = simulate.run(_cfg(prompt="paper"), target, backend=tiny_backend)
    assert table.height == 3 * 18
    record = json.loads((target / "simulate.json").read_text())
    assert record["digit_tokens"]["answer_prefix"] == "["
    assert record["prompt_hash"] == prompt.PAPER_PROMPT_HASH
    assert record["config"]["prompt"] == "paper"
    with pytest.raises(ValueError, match=r"simulate\.prompt"):
        SimulateConfig(prompt="haiku")  # type: ignore[arg-type]


def test_prompts_are_grouped_for_prefix_sharing(run_dir: Path) -> None:
    n_ctx = read_contexts(run_dir).height
    fake = FakeSimulator()
    simulate.run(_cfg(chunk_latents=3), run_dir, backend=fake)
    # calls hold whole prefix groups, at least 8 x batch_size prompts (64 > 3 x 18)
    assert [len(c) for c in fake.calls] == [3 * n_ctx]
    assert len({id(p.prefix) for p in fake.calls[0]}) == 3

    fake = FakeSimulator()
    first = simulate.run(_cfg(chunk_latents=3, batch_size=1), run_dir, backend=fake, overwrite=True)
    # explanation-first: one call per latent (8 x batch_size <= n_ctx), one prefix each
    assert [len(c) for c in fake.calls] == [n_ctx] * 3
    assert all(len({id(p.prefix) for p in call}) == 1 for call in fake.calls)

    fake = FakeSimulator()
    second = simulate.run(
        _cfg(layout="context-first", batch_size=1, chunk_contexts=n_ctx),  # one part
        run_dir,
        backend=fake,
        overwrite=True,
    )
    # context-first: calls of whole contexts (>= 8 prompts), each context's 3 latents together
    for call in fake.calls:
        assert (len(call) % 3 == 0 and len(call) >= 8) or call is fake.calls[-1]
        prefixes = [p.prefix for p in call]
        assert all(prefixes[i] == prefixes[i - i % 3] for i in range(len(call)))
        assert len({id(p) for p in prefixes}) == len(call) // 3
    assert sum(len(c) for c in fake.calls) == 3 * n_ctx
    assert second.select("latent", "context_id").equals(first.select("latent", "context_id"))


def test_rerun_skips_and_overwrite_reruns(run_dir: Path) -> None:
    fake = FakeSimulator()
    first = simulate.run(_cfg(), run_dir, backend=fake)
    n_calls = len(fake.calls)
    again = simulate.run(_cfg(), run_dir, backend=fake)
    assert len(fake.calls) == n_calls and again.equals(first)
    simulate.run(_cfg(progress=True), run_dir, backend=fake)  # progress: not part of the key
    assert len(fake.calls) == n_calls
    simulate.run(_cfg(), run_dir, backend=fake, overwrite=True)
    assert len(fake.calls) == 2 * n_calls
    with pytest.raises(FileExistsError, match="another config"):  # other parts, no overwrite
        (run_dir / "simulate.json").unlink()
        simulate.run(_cfg(ev="paper"), run_dir, backend=fake)
    paper = simulate.run(_cfg(ev="paper"), run_dir, backend=fake, overwrite=True)
    probs = np.asarray(paper["digit_probs"].to_list()).astype(np.float64)
    np.testing.assert_allclose(paper["expected_value"], expected_values(probs, "paper"), atol=1e-5)
    assert (paper["expected_value"] < first["expected_value"]).all()  # mass 0.9 < 1


def _unsimulated_copy(run_dir: Path, dst: Path) -> Path:
    """A copy of ``run_dir`` without the simulate stage's outputs."""
    shutil.copytree(run_dir, dst)
    shutil.rmtree(dst / "simulations.parts")
    (dst / "simulations.parquet").unlink()
    (dst / "simulate.json").unlink()
    return dst


def test_killed_run_resumes_from_the_last_part(run_dir: Path, tmp_path: Path) -> None:
    reference = simulate.run(_cfg(), run_dir, backend=FakeSimulator())
    other = _unsimulated_copy(run_dir, tmp_path / "other")

    with pytest.raises(KeyboardInterrupt):
        simulate.run(_cfg(), other, backend=FakeSimulator(fail_after=2))
    parts = sorted(p.name for p in (other / "simulations.parts").glob("part-*.parquet"))
    assert parts == ["part-000000.parquet", "part-000001.parquet"]
    assert not (other / "simulations.parquet").exists()
    assert not list((other / "simulations.parts").glob(".*tmp"))  # nothing half-written

    fake = FakeSimulator()
    resumed = simulate.run(_cfg(), other, backend=fake)
    assert len(fake.calls) == 1  # only the third latent
    assert resumed.equals(reference)


def test_context_first_chunks_by_context_and_resumes_after_a_kill(
    run_dir: Path, tmp_path: Path
) -> None:
    """context-first parts hold every latent on a slice of contexts; a kill mid-way keeps the
    finished parts, and the resumed run simulates each remaining pair once, none twice."""
    cfg = _cfg(layout="context-first", chunk_contexts=4)  # one backend call per part
    n_ctx = read_contexts(run_dir).height
    reference = simulate.run(cfg, run_dir, backend=FakeSimulator())
    n_parts = len(list((run_dir / "simulations.parts").glob("part-*.parquet")))
    assert n_parts == -(-n_ctx // 4)
    first = pl.read_parquet(run_dir / "simulations.parts" / "part-000000.parquet")
    assert sorted(set(first["latent"])) == sorted(EXPLANATIONS)  # every latent
    assert first["context_id"].n_unique() == 4

    other = _unsimulated_copy(run_dir, tmp_path / "other")
    with pytest.raises(KeyboardInterrupt):
        simulate.run(cfg, other, backend=FakeSimulator(fail_after=1))
    done = sorted((other / "simulations.parts").glob("part-*.parquet"))
    assert len(done) == 1
    fake = FakeSimulator()
    resumed = simulate.run(cfg, other, backend=fake)
    asked = [(p.prefix, p.suffix) for call in fake.calls for p in call]
    assert len(asked) == len(set(asked)) == len(EXPLANATIONS) * (n_ctx - 4)
    assert resumed.equals(reference)
    # the same pairs as explanation-first, and a different stage identity
    by_latent = simulate.run(_cfg(), run_dir, backend=FakeSimulator(), overwrite=True)
    assert by_latent.select("latent", "context_id").equals(reference.select("latent", "context_id"))
    assert prompt.template_hash("nlrw", "context-first") != prompt.template_hash(
        "nlrw", "explanation-first"
    )


def test_context_centered_reading_removes_the_context_prior(run_dir: Path) -> None:
    raw = simulate.run(_cfg(), run_dir, backend=FakeSimulator())
    centered = simulate.run(
        _cfg(reading="context-centered"), run_dir, backend=FakeSimulator(), overwrite=True
    )
    assert centered["expected_value_raw"].equals(raw["expected_value"].alias("expected_value_raw"))
    e = raw["expected_value"].to_numpy().astype(np.float64)
    ctx = raw["context_id"].to_numpy()
    means = {c: e[ctx == c].mean() for c in np.unique(ctx)}
    want = np.clip(e - np.array([means[c] for c in ctx]) + e.mean(), 0, 9)
    np.testing.assert_allclose(centered["expected_value"].to_numpy(), want, atol=1e-5)
    # a context's latents now average the overall mean (no clipping in this table)
    by_ctx = centered.group_by("context_id").agg(pl.col("expected_value").mean())
    np.testing.assert_allclose(by_ctx["expected_value"].to_numpy(), e.mean(), atol=1e-5)
    record = json.loads((run_dir / "simulate.json").read_text())
    assert record["reading"] == "context-centered"
    with pytest.raises(ValueError, match=r"simulate\.reading"):
        SimulateConfig(reading="median")  # type: ignore[arg-type]


def test_quoted_word_reading_puts_the_quoted_word_above_the_rest(run_dir: Path) -> None:
    """Latent 41's explanation quotes the marked token of the first context (so it matches
    there and wherever that token ends a context); 85 and 91 quote nothing and keep E. The
    shuffled control checks the donor's words."""
    _, matching = quote_a_marked_word(run_dir, 41)
    assert 0 < len(matching) < read_contexts(run_dir).height

    raw = simulate.run(_cfg(shuffled_control=True), run_dir, backend=FakeSimulator())
    raw_control = pl.read_parquet(run_dir / "simulations_shuffled.parquet")
    read = simulate.run(
        _cfg(shuffled_control=True, reading="quoted-word"),
        run_dir,
        backend=FakeSimulator(),
        overwrite=True,
    )
    assert read["expected_value_raw"].equals(raw["expected_value"].alias("expected_value_raw"))
    for (lat, c, e), got in zip(
        raw.select("latent", "context_id", "expected_value").iter_rows(),
        read["expected_value"],
        strict=True,
    ):
        want = (e + 9.0 * (c in matching)) / 2.0 if lat == 41 else e
        assert got == pytest.approx(want, abs=1e-5), (lat, c)
    rows = read.filter(pl.col("latent") == 41)
    hits = rows.filter(pl.col("context_id").is_in(sorted(matching)))["expected_value"]
    misses = rows.filter(~pl.col("context_id").is_in(sorted(matching)))["expected_value"]
    assert hits.min() >= 4.5 > misses.max()  # every match above every non-match
    control = pl.read_parquet(run_dir / "simulations_shuffled.parquet")
    for (lat, c, donor, e), got in zip(
        raw_control.select("latent", "context_id", "explanation_of", "expected_value").iter_rows(),
        control["expected_value"],
        strict=True,
    ):
        want = (e + 9.0 * (c in matching)) / 2.0 if donor == 41 else e
        assert got == pytest.approx(want, abs=1e-5), (lat, c, donor)
    assert json.loads((run_dir / "simulate.json").read_text())["reading"] == "quoted-word"


def test_three_shards_merged_equal_one_run_byte_for_byte(
    run_dir: Path, tiny_backend: Any, tmp_path: Path
) -> None:
    sharded = tmp_path / "sharded"
    shutil.copytree(run_dir, sharded)
    one = simulate.run(_cfg(), run_dir, backend=tiny_backend)

    for i in (2, 0):
        rows = simulate.run(_cfg(shard=f"{i}/3"), sharded, backend=tiny_backend)
        assert rows["latent"].unique().to_list() == [sorted(EXPLANATIONS)[i]]
        assert not (sharded / "simulations.parquet").exists()
    with pytest.raises(FileNotFoundError, match=r"lacks 1 of 3 parts.*shards \[1\]"):
        merge(_cfg(shard="0/3"), sharded)
    with pytest.raises(ValueError, match="other shards' parts"):
        simulate.run(_cfg(shard="1/3"), sharded, backend=tiny_backend, overwrite=True)
    merged = simulate.run(_cfg(shard="1/3"), sharded, backend=tiny_backend)  # the last merges
    assert merged.equals(one)
    a = (run_dir / "simulations.parquet").read_bytes()
    assert a == (sharded / "simulations.parquet").read_bytes()
    (sharded / "simulations.parquet").unlink()
    assert merge(_cfg(), sharded).equals(one)
    assert a == (sharded / "simulations.parquet").read_bytes()


def test_shared_prefix_engine_matches_one_prompt_per_forward(run_dir: Path) -> None:
    from nlrw.backends.transformers import TransformersBackend

    results = {}
    for engine in ("shared-prefix", "single"):
        backend = TransformersBackend(TINY, dtype="float32", device="cpu", engine=engine)
        results[engine] = simulate.run(
            _cfg(engine=engine, max_latents=1), run_dir, backend=backend, overwrite=True
        )
    a, b = results["shared-prefix"], results["single"]
    assert a.height == b.height == read_contexts(run_dir).height
    diff = (a["expected_value"] - b["expected_value"]).abs().max()
    assert diff is not None and float(diff) <= 1e-3  # pyright: ignore[reportArgumentType]


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_missing_explanations_are_excluded_or_stop_the_run(run_dir: Path) -> None:
    table = pl.read_parquet(run_dir / "explanations.parquet")
    table = table.with_columns(
        pl.when(pl.col("latent") == 85).then(pl.lit("failed")).otherwise("status").alias("status"),
        pl.when(pl.col("latent") == 85).then(None).otherwise("explanation").alias("explanation"),
    )
    table.write_parquet(run_dir / "explanations.parquet")
    skipped = sorted(set(table["latent"].to_list()) - set(EXPLANATIONS))
    with pytest.raises(ValueError, match=r"failed: \[85\] \(1\)") as err:
        simulate.run(_cfg(missing_explanations="error"), run_dir, backend=FakeSimulator())
    assert f"skipped: [{', '.join(map(str, skipped))}]" in str(err.value)
    assert not (run_dir / "simulations.parts").exists()

    out = simulate.run(_cfg(), run_dir, backend=FakeSimulator())
    assert out["latent"].unique().sort().to_list() == [41, 91]
    record = json.loads((run_dir / "simulate.json").read_text())
    assert record["missing_explanations"]["by_status"] == {"failed": [85], "skipped": skipped}
    assert record["missing_explanations"]["count"] == 1 + len(skipped)


def test_max_latents_takes_the_best_scored(run_dir: Path) -> None:
    scores = pl.read_parquet(run_dir / "scores.parquet")
    order = {41: 0.55, 85: 0.9, 91: 0.7}
    scores = scores.with_columns(
        pl.col("latent").replace_strict(order, return_dtype=pl.Float64).alias("balanced_accuracy")
    )
    scores.write_parquet(run_dir / "scores.parquet")
    out = simulate.run(_cfg(max_latents=2), run_dir, backend=FakeSimulator())
    assert out["latent"].unique().sort().to_list() == [85, 91]


def test_named_latents_are_simulated_whatever_their_score(run_dir: Path) -> None:
    out = simulate.run(_cfg(max_latents=1, latents=(91, 41)), run_dir, backend=FakeSimulator())
    assert out["latent"].unique().sort().to_list() == [41, 91]


def test_a_named_latent_without_explanation_is_refused_by_id(run_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"simulate\.latents: latents \[7\].*explanations"):
        simulate.run(_cfg(latents=(41, 7)), run_dir, backend=FakeSimulator())
    assert not (run_dir / "simulations.parquet").exists()
    with pytest.raises(ValueError, match="distinct non-negative"):
        SimulateConfig(latents=(3, 3))


def test_no_contexts_names_the_file_and_the_stage(run_dir: Path) -> None:
    (run_dir / "contexts.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=r"contexts\.parquet.*contexts stage"):
        simulate.run(_cfg(), run_dir, backend=FakeSimulator())


def test_no_explanations_names_the_file_and_the_stage(run_dir: Path) -> None:
    (run_dir / "explanations.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=r"explanations\.parquet.*explain stage"):
        simulate.run(_cfg(), run_dir, backend=FakeSimulator())


def test_contexts_of_the_wrong_length_are_refused(run_dir: Path) -> None:
    path = run_dir / "contexts.parquet"
    table = pl.read_parquet(path)
    short = table.with_columns(
        pl.when(pl.col("context_id") == 3)
        .then(pl.col("input_ids").list.head(5))
        .otherwise("input_ids")
        .alias("input_ids")
    )
    short.write_parquet(path)
    with pytest.raises(ValueError, match="different lengths"):
        simulate.run(_cfg(), run_dir, backend=FakeSimulator())
    # all equally short: disagrees with contexts.json's ctx_len
    table.with_columns(pl.col("input_ids").list.head(5)).write_parquet(path)
    with pytest.raises(ValueError, match=r"ctx_len = 8"):
        simulate.run(_cfg(), run_dir, backend=FakeSimulator())
    assert not (run_dir / "simulations.parquet").exists()


def test_digits_that_split_stop_the_run_before_any_output(run_dir: Path) -> None:
    merges = [(":", "Ġ")] + [(":Ġ", str(d)) for d in range(10)] + [(":", str(d)) for d in range(10)]
    fake = FakeSimulator()
    fake.tokenizer = _bpe(merges, "merging-digits")
    with pytest.raises(ValueError, match="single-token digit"):
        simulate.run(_cfg(), run_dir, backend=fake)
    assert not fake.calls
    assert not list((run_dir / "simulations.parts").glob("part-*"))
    assert not (run_dir / "simulations.parquet").exists()


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="layout"):
        SimulateConfig(layout="sideways")  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="ev"):
        SimulateConfig(ev="max")  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match="base_url"):
        SimulateConfig(backend="openai")
    with pytest.raises(ValueError, match="chunk_latents"):
        SimulateConfig(chunk_latents=0)
    with pytest.raises(ValueError, match="chunk_contexts"):
        SimulateConfig(chunk_contexts=0)
    with pytest.raises(ValueError, match="min_digit_mass"):
        SimulateConfig(min_digit_mass=2.0)


# --------------------------------------------------------------------------------------------
# The default simulator
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_simulator_reads_digits_with_most_of_the_mass(run_dir: Path) -> None:
    from nlrw.backends.transformers import TransformersBackend

    path = run_dir / "contexts.parquet"
    pl.read_parquet(path).head(3).write_parquet(path)
    backend = TransformersBackend("qwen2.5-coder-0.5b", dtype="float32", device="cpu")
    cfg = SimulateConfig(max_latents=1, dtype="float32", progress=False)
    table = simulate.run(cfg, run_dir, backend=backend)
    assert table.height == 3
    record = json.loads((run_dir / "simulate.json").read_text())
    assert record["digit_tokens"] == {
        "answer_prefix": "Rating: ",
        "ids": record["digit_tokens"]["ids"],
        "tokens": [str(d) for d in range(10)],
    }
    assert (table["digit_mass"] > 0.5).all()
    assert record["low_mass_latents"] == []
    # The paper's prompt reads its digit after "[" with most of the mass too.
    (run_dir / "simulations.parquet").unlink()
    (run_dir / "simulate.json").unlink()
    cfg = SimulateConfig(max_latents=1, dtype="float32", progress=False, prompt="paper")
    table = simulate.run(cfg, run_dir, backend=backend, overwrite=True)
    assert (table["digit_mass"] > 0.5).all()


def test_derangements_have_no_fixed_point_and_are_seeded() -> None:
    for seed in range(200):
        d = simulate.derangement([3, 7, 9, 12], seed)
        assert sorted(d) == sorted(d.values()) == [3, 7, 9, 12]
        assert all(k != v for k, v in d.items())
    assert simulate.derangement([1, 2, 3], 5) == simulate.derangement([1, 2, 3], 5)
    assert simulate.derangement([1, 2], 0) == {1: 2, 2: 1}
    with pytest.raises(ValueError, match="at least two latents"):
        simulate.derangement([4], 0)


def test_shuffled_control_rates_each_latent_with_another_ones_explanation(
    run_dir: Path, tiny_backend: Any
) -> None:
    table = simulate.run(_cfg(shuffled_control=True), run_dir, backend=tiny_backend)
    control = pl.read_parquet(run_dir / simulate.SHUFFLED_FILE)
    assert control.height == table.height  # all three latents, every context
    source = dict(control.select("latent", "explanation_of").unique().rows())
    assert sorted(source) == sorted(EXPLANATIONS) and all(k != v for k, v in source.items())
    # A prompt depends only on the explanation and the context: latent l's control rating on
    # a context is the real rating of the latent whose explanation it was shown, re-used.
    real = {
        (lat, c): (e, probs)
        for lat, c, e, probs in table.select(
            "latent", "context_id", "expected_value", "digit_probs"
        ).rows()
    }
    for lat, c, e, probs in control.select(
        "latent", "context_id", "expected_value", "digit_probs"
    ).rows():
        assert (e, probs) == real[(source[lat], c)]
    # The truth is the latent's own.
    np.testing.assert_array_equal(
        control["true_activation"].to_numpy(), table["true_activation"].to_numpy()
    )
    # Rating the deranged prompts with the engine (what the control meant before it was
    # re-used) gives the same digits, up to the rounding of other batch shapes.
    contexts = read_contexts(run_dir).sort("context_id")
    subject = simulate._subject_tokenizer(run_dir)  # pyright: ignore[reportPrivateUsage]
    texts = {
        int(c): prompt.context_text(subject, ids)
        for c, ids in contexts.select("context_id", "input_ids").iter_rows()
    }
    digits = prompt.digit_tokens(tiny_backend.tokenizer, "nlrw", "explanation-first")
    deranged = {lat: EXPLANATIONS[src] for lat, src in source.items()}
    keys, prompts = simulate.build_prompts(
        tiny_backend.tokenizer,
        "explanation-first",
        deranged,
        texts,
        sorted(deranged),
        sorted(texts),
        digits.answer_prefix,
    )
    fresh = tiny_backend.answer_distribution_ids(prompts, list(digits.ids)).probs
    stored = {
        (lat, c): probs
        for lat, c, probs in control.select("latent", "context_id", "digit_probs").rows()
    }
    np.testing.assert_allclose(
        fresh, np.array([stored[key] for key in keys], dtype=np.float64), atol=1e-5
    )
    record = json.loads((run_dir / "simulate.json").read_text())
    assert record["n_shuffled_latents"] == 3
    # The simulator rated the real prompts only; the control's rows cost nothing.
    assert record["n_prompts"] == table.height == record["n_shuffled_rows"]
    assert record["throughput"]["prompts"] == table.height
    # Asked for, with fewer than two latents: an error naming the option, nothing written.
    with pytest.raises(ValueError, match=r"simulate\.shuffled_control needs at least two"):
        simulate.run(_cfg(shuffled_control=True, max_latents=1), run_dir, backend=tiny_backend)
    with pytest.raises(ValueError, match=r"simulate\.shuffled_latents must be at least 2"):
        SimulateConfig(shuffled_control=True, shuffled_latents=1)
