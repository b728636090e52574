"""The all-at-once simulation layout: the window listed one token per line, each followed by a
rating slot, every token rated in one forward (issue 16).

Golden text of the rendering; slots located by character offsets on real tokenizers (and the
error for one that merges the slot); the engine's slot reading against one unshared forward
of the same ids; the stage's tables, resume after a kill, shuffled control; and the backends
that cannot read slots, refused when the options are validated.
"""

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
from nlrw.backends import transformers as tf_backend
from nlrw.backends.base import AnswerDistribution, SplitPrompt, locate_slots, render
from nlrw.contexts import read_contexts
from nlrw.prompts import simulation as prompt
from nlrw.simulate import SimulateConfig, expected_values
from support import (
    READABLE_EXPLANATIONS,
    smoke_run_with_readable_explanations,
    tiny_model,
    tiny_tokenizer,
)

torch.set_num_threads(1)

TINY = "tiny-random-llama"
EXPLANATIONS = READABLE_EXPLANATIONS

SYSTEM = (
    "We're studying latents (neurons) of a language model. Each latent looks for one particular "
    "thing in a short text. You will read an explanation of what a latent looks for; then a "
    "text is listed one token per line, each token followed by a tab and how strongly the "
    "latent fires on that token.\n"
    "\n"
    "Rate each token on a scale from 0 to 9: 0 means the latent does not fire at all, 9 means "
    "it fires as strongly as it ever does. Judge each token on its own, using the text before "
    "it as context. Most latents fire on very few tokens, so 0 is by far the most common "
    "rating."
)
REQUEST = "List the text's tokens with their ratings."
SHOTS = [
    (
        "Mentions of animals, especially pets",
        "When\t0\n she\t0\n came\t0\n back\t0\n,\t0\n the\t0\n children\t0\n were\t0\n"
        " playing\t0\n with\t0\n their\t0\n dog\t8\n and\t0\n two\t0\n cats\t7",
    ),
    (
        "Words about money, wealth and income",
        "He\t0\n had\t0\n a\t0\n good\t0\n fortune\t9\n and\t0\n a\t0\n fine\t0\n house\t2\n"
        " in\t0\n town\t0\n,\t0\n and\t0\n was\t0\n very\t0\n generous\t3",
    ),
    (
        "Closing quotation marks at the end of spoken dialogue",
        '"\t0\nI\t0\n shall\t0\n write\t0\n to\t0\n her\t0\n tomorrow\t0\n,"\t9\n said\t0\n'
        " Mr\t0\n.\t0\n Elliot\t0\n,\t0\n taking\t0\n up\t0\n his\t0\n pen\t0",
    ),
]


def _user(explanation: str) -> str:
    return f"Feature explanation: {explanation}.\n\n{REQUEST}"


# --------------------------------------------------------------------------------------------
# Rendering (golden)
# --------------------------------------------------------------------------------------------


def test_golden_listing_and_its_slots() -> None:
    got = prompt.listing(["the", " big", "\n", " cat"])
    assert got.text == "the\t0\n big\t0\n\\n\t0\n cat\t0"
    assert got.slots == (4, 11, 16, 23)
    assert all(got.text[s] == "0" and got.text[s - 1] == "\t" for s in got.slots)
    rated = prompt.listing(["the", " big"], [0, 7])
    assert rated.text == "the\t0\n big\t7" and rated.slots == (4, 11)
    with pytest.raises(ValueError, match="2 tokens but 1 ratings"):
        prompt.listing(["a", "b"], [1])
    with pytest.raises(ValueError, match="at least one token"):
        prompt.listing([])


def test_golden_all_at_once_text_with_chat_template() -> None:
    tok = tiny_tokenizer(chat_template=True)
    chat = prompt.all_at_once_chat("Words about cats.")
    answer = prompt.SPLIT + prompt.listing(["the", " big", " cat"]).text
    expected = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
    for expl, shot in SHOTS:
        expected += f"<|im_start|>user\n{_user(expl)}<|im_end|>\n"
        expected += f"<|im_start|>assistant\n{shot}<|im_end|>\n"
    expected += (
        f"<|im_start|>user\n{_user('Words about cats')}<|im_end|>\n"
        "<|im_start|>assistant\n\x00the\t0\n big\t0\n cat\t0"
    )
    assert render(tok, chat, answer_prefix=answer) == expected


def test_golden_all_at_once_text_plain_fallback() -> None:
    tok = tiny_tokenizer(chat_template=False)
    chat = prompt.all_at_once_chat("Words about cats")
    text = render(tok, chat, answer_prefix=prompt.SPLIT + "the\t0")
    expected = f"System: {SYSTEM}\n\n"
    for expl, shot in SHOTS:
        expected += f"User: {_user(expl)}\n\nAssistant: {shot}\n\n"
    expected += f"User: {_user('Words about cats')}\n\nAssistant: \x00the\t0"
    assert text == expected


def test_template_hash_holds_the_layout_and_render_chat_refuses_it() -> None:
    hashes = {prompt.template_hash("nlrw", layout) for layout in prompt.LAYOUTS}
    assert len(hashes) == len(prompt.LAYOUTS)
    with pytest.raises(ValueError, match="all_at_once_chat"):
        prompt.render_chat("x", "y", "all-at-once")
    with pytest.raises(ValueError, match="own prompt"):
        prompt.template_hash("paper", "all-at-once")


def test_token_texts_are_the_pieces_of_the_decoded_window() -> None:
    from transformers import AutoTokenizer

    from nlrw.assets import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(TINY))
    ids = tok("said he.\nOh No", add_special_tokens=False)["input_ids"]
    pieces = prompt.token_texts(tok, ids)
    assert "".join(pieces) == "said he.\nOh No"
    assert pieces[-1] == " No"
    assert prompt.context_text(tok, ids) == "said he.\\nOh <<No>>"


# --------------------------------------------------------------------------------------------
# Slots located by character offsets
# --------------------------------------------------------------------------------------------

WINDOW = ["When", " she", "\n", " came", "  ", ",", '"', "123", " café", "\t", ""]
"""Awkward tokens: an escaped newline and tab, spaces only, punctuation, digits, a non-ASCII
letter, an empty piece."""


def _check_slots(tok: Any) -> None:
    answer = prompt.listing(WINDOW)
    ids, reads = locate_slots(tok, answer.text, answer.slots, model="m")
    assert len(reads) == len(WINDOW) and reads == sorted(reads)
    for slot, r in zip(answer.slots, reads, strict=True):
        # the read token ends exactly where the slot starts: it is the tab of that line
        assert tok.decode(ids[: r + 1]) == answer.text[:slot]
        assert tok.decode(ids[r : r + 1]) == prompt.SEPARATOR
    digits = prompt.digit_tokens(tok, "nlrw", "all-at-once")
    assert digits.answer_prefix == "\t"
    assert [tok.decode([i]) for i in digits.ids] == [str(d) for d in range(10)]
    # the few-shot answers' digits are those tokens after the tab
    shot = prompt.listing(["a", " b"], [7, 3])
    shot_ids, shot_reads = locate_slots(tok, shot.text, shot.slots)
    assert [shot_ids[r + 1] for r in shot_reads] == [digits.ids[7], digits.ids[3]]


def test_slots_are_located_by_offsets_on_the_tiny_byte_level_tokenizers() -> None:
    from transformers import AutoTokenizer

    from nlrw.assets import resolve_model

    _check_slots(tiny_tokenizer())
    _check_slots(AutoTokenizer.from_pretrained(resolve_model(TINY)))


@pytest.mark.slow
def test_slots_are_located_by_offsets_on_the_embedded_simulator_tokenizer() -> None:
    """Qwen2.5's pre-tokenizer splits "\\t0\\n" into a tab, "0" and a newline: every slot
    starts a token, the digit token the few-shot answers write."""
    from transformers import AutoTokenizer

    from nlrw.assets import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("qwen2.5-coder-0.5b"))
    _check_slots(tok)


def _merging_tokenizer(name: str = "tab-merges-slot") -> PreTrainedTokenizerFast:
    """A real byte-level BPE (no pre-tokenizer regex) with one merge, tab + "0": the slot's
    text merges with the tab before it."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["ĉ0"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("ĉ", "0")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)  # pyright: ignore
    tok.decoder = decoders.ByteLevel()  # pyright: ignore
    t = PreTrainedTokenizerFast(tokenizer_object=tok)
    t.name_or_path = name
    return t


def test_a_tokenizer_that_merges_the_slot_is_refused_naming_the_model_and_the_slot() -> None:
    tok = _merging_tokenizer()
    answer = prompt.listing(["the", " cat"])
    with pytest.raises(ValueError) as err:
        locate_slots(tok, answer.text, answer.slots)
    message = str(err.value)
    assert "\n" not in message
    assert "tab-merges-slot" in message and "'0'" in message
    assert "not a token boundary" in message
    with pytest.raises(ValueError, match="my-simulator"):
        locate_slots(tok, answer.text, answer.slots, model="my-simulator")


# --------------------------------------------------------------------------------------------
# The engine: every slot in one forward
# --------------------------------------------------------------------------------------------


def _slot_prompts(tok: Any) -> tuple[list[SplitPrompt], list[tuple[int, ...]]]:
    """Two latents x three windows of different lengths (so suffixes are padded)."""
    windows = {
        0: ["The", " cat", " sat", ".", " It", " purred"],
        1: ["Yes", ",", " she", " said"],
        2: ["No", " more", " tea", " for", " me", ",", " thank", " you", "!"],
    }
    suffixes = simulate.slot_suffixes(tok, windows)
    explanations = {3: "Animals", 7: "Polite refusals"}
    _, prompts, reads = simulate.build_slot_prompts(
        tok, explanations, suffixes, sorted(explanations), sorted(windows)
    )
    return prompts, reads


def _unshared(backend: Any, p: SplitPrompt, reads: Sequence[int], ids: Sequence[int]) -> Any:
    """The answers' probabilities at ``reads`` from one forward of the whole prompt, no cache,
    no padding: the reference."""
    whole = torch.tensor([[*p.prefix, *p.suffix]])
    with torch.inference_mode():
        logits = backend.lm(input_ids=whole, use_cache=False).logits[0].float()
    at = [len(p.prefix) + k for k in reads]
    return torch.softmax(logits[at], -1)[:, list(ids)].double().numpy()


def _tiny_backend(arch: str = "qwen2") -> Any:
    """A tiny random model over the byte-level vocabulary: the all-at-once prompts are ~2,000
    bytes, hence its 4,096 positions."""
    from nlrw.backends.transformers import TransformersBackend

    return TransformersBackend(
        f"tiny-{arch}",
        model_obj=tiny_model(arch, max_position_embeddings=4096),
        tokenizer=tiny_tokenizer(),
        dtype="float32",
        device="cpu",
        engine_batch_size=4,
    )


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_slot_reading_equals_one_unshared_forward(
    arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = _tiny_backend(arch)
    tok = backend.tokenizer
    prompts, reads = _slot_prompts(tok)
    digits = prompt.digit_tokens(tok, "nlrw", "all-at-once")
    monkeypatch.setattr(tf_backend, "_HEAD_ROWS", 5)  # the head's blocks cut across rows
    got = backend.slot_distribution_ids(prompts, reads, list(digits.ids))
    assert len(got) == len(prompts)
    for p, at, answer in zip(prompts, reads, got, strict=True):
        ref = _unshared(backend, p, at, digits.ids)
        assert answer.probs.shape == (len(at), 10)
        np.testing.assert_allclose(answer.probs[-1], ref[-1], atol=1e-5, rtol=0)  # last slot
        np.testing.assert_allclose(answer.probs, ref, atol=1e-5, rtol=0)  # every slot
        np.testing.assert_allclose(answer.mass, answer.probs.sum(1))
    # The suffix ends at the last slot's tab: its last row is what the one-answer engine reads.
    last = backend.answer_distribution_ids(prompts, list(digits.ids))
    np.testing.assert_allclose(np.stack([a.probs[-1] for a in got]), last.probs, atol=1e-5)
    for engine in ("padded", "single"):
        other = backend.slot_distribution_ids(prompts, reads, list(digits.ids), engine=engine)
        for a, b in zip(got, other, strict=True):
            np.testing.assert_allclose(a.probs, b.probs, atol=1e-5, rtol=0)


def test_slot_reading_with_logits_post_processed_after_the_head() -> None:
    """A model that scales its logits after the head (soft-capping): the slots are read from
    the model's own logits, still equal to one unshared forward."""
    backend = _tiny_backend()
    lm = backend.lm
    original = type(lm).forward

    def scaled(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        out.logits = 2.0 * out.logits
        return out

    lm.forward = scaled.__get__(lm)
    prompts, reads = _slot_prompts(backend.tokenizer)
    ids = list(prompt.digit_tokens(backend.tokenizer, "nlrw", "all-at-once").ids)
    got = backend.slot_distribution_ids(prompts, reads, ids)
    assert backend._head_ok is False  # pyright: ignore[reportPrivateUsage]
    for p, at, answer in zip(prompts, reads, got, strict=True):
        np.testing.assert_allclose(answer.probs, _unshared(backend, p, at, ids), atol=1e-5)


def test_slot_reading_on_a_sliding_window_model_runs_whole_prompts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from nlrw.backends.transformers import TransformersBackend

    model = tiny_model(
        "qwen2",
        max_position_embeddings=4096,
        use_sliding_window=True,
        sliding_window=64,
        max_window_layers=0,
    )
    backend = TransformersBackend(
        "tiny-sliding", model_obj=model, tokenizer=tiny_tokenizer(), dtype="float32"
    )
    prompts, reads = _slot_prompts(backend.tokenizer)
    ids = list(prompt.digit_tokens(backend.tokenizer, "nlrw", "all-at-once").ids)
    with caplog.at_level(logging.WARNING, logger="nlrw.backends.transformers"):
        got = backend.slot_distribution_ids(prompts, reads, ids)
    assert any("sliding-window" in r.getMessage() for r in caplog.records)
    for p, at, answer in zip(prompts, reads, got, strict=True):
        np.testing.assert_allclose(answer.probs, _unshared(backend, p, at, ids), atol=1e-5)


def test_slot_reading_checks_its_inputs() -> None:
    backend = _tiny_backend()
    p = SplitPrompt((1, 2), (3, 4, 5))
    with pytest.raises(ValueError, match="slot lists"):
        backend.slot_distribution_ids([p], [], [10, 11])
    with pytest.raises(ValueError, match="outside their suffix"):
        backend.slot_distribution_ids([p], [[3]], [10, 11])
    with pytest.raises(ValueError, match="no slot"):
        backend.slot_distribution_ids([p], [[]], [10, 11])


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A smoke run up to score, its explanations replaced by readable ones for three latents
    (as tests/test_simulate.py)."""
    return smoke_run_with_readable_explanations(tmp_path_factory.mktemp("all_at_once") / "run")


@pytest.fixture
def run_dir(base_dir: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(base_dir, dest)
    return dest


class FakeSlotSimulator:
    """A backend whose digit probabilities at each slot are a deterministic function of the
    prompt's ids; records each call's prompts; raises KeyboardInterrupt after ``fail_after``
    calls."""

    name = "fake"
    model = "fake-simulator"

    def __init__(self, fail_after: int | None = None, tokenizer: Any = None) -> None:
        from transformers import AutoTokenizer

        from nlrw.assets import resolve_model

        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(resolve_model(TINY))
        self.fail_after = fail_after
        self.calls: list[list[SplitPrompt]] = []

    def slot_distribution_ids(
        self,
        prompts: Sequence[SplitPrompt],
        slots: Sequence[Sequence[int]],
        answer_ids: Sequence[int],
    ) -> list[AnswerDistribution]:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls.append(list(prompts))
        out = []
        for p, at in zip(prompts, slots, strict=True):
            probs = np.stack(
                [
                    np.random.default_rng([sum(p.prefix) % 2**31, *p.suffix[: k + 1]]).dirichlet(
                        np.ones(len(answer_ids))
                    )
                    * 0.9
                    for k in at
                ]
            )
            out.append(AnswerDistribution(probs, probs.sum(1)))
        return out

    def answer_distribution_ids(self, *a: Any, **k: Any) -> Any:
        raise AssertionError("the all-at-once layout reads slots")

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
    kw.setdefault("layout", "all-at-once")
    kw.setdefault("min_digit_mass", 0.0)
    return SimulateConfig(**kw)


def _check_positions(table: pl.DataFrame, positions: pl.DataFrame, ctx_len: int) -> None:
    """The per-position table: every position of every pair, the last one the pair's rating."""
    assert positions.schema == pl.Schema(simulate.POSITIONS_SCHEMA)
    assert positions.height == table.height * ctx_len
    keys = table.select("latent", "context_id").rows()
    assert positions.select("latent", "context_id", "position").rows() == [
        (lat, c, k) for lat, c in keys for k in range(ctx_len)
    ]
    last = positions.filter(pl.col("position") == ctx_len - 1)
    np.testing.assert_array_equal(last["expected_value"], table["expected_value"])
    np.testing.assert_allclose(last["digit_mass"], table["digit_mass"], rtol=1e-6)


def test_stage_with_the_tiny_simulator_writes_both_tables(run_dir: Path) -> None:
    from nlrw.backends.transformers import TransformersBackend

    backend = TransformersBackend(TINY, dtype="float32", device="cpu", engine_batch_size=8)
    table = simulate.run(_cfg(shuffled_control=True), run_dir, backend=backend)
    n_ctx, ctx_len = read_contexts(run_dir).height, 8
    assert table.schema == pl.Schema(simulate.SCHEMA)  # calibrate and evaluate read it unchanged
    assert table.height == 3 * n_ctx
    probs = np.asarray(table["digit_probs"].to_list(), dtype=np.float64)
    np.testing.assert_allclose(table["expected_value"], expected_values(probs), atol=1e-4)
    positions = pl.read_parquet(run_dir / simulate.POSITIONS_FILE)
    _check_positions(table, positions, ctx_len)
    assert positions["expected_value"].n_unique() > ctx_len  # the positions differ

    # The control: a prompt depends only on the explanation and the window, so the control
    # re-uses its donor's ratings, every position's included.
    control = pl.read_parquet(run_dir / simulate.SHUFFLED_FILE)
    source = dict(control.select("latent", "explanation_of").unique().rows())
    real = {
        (lat, c): e for lat, c, e in table.select("latent", "context_id", "expected_value").rows()
    }
    for lat, c, e in control.select("latent", "context_id", "expected_value").rows():
        assert e == real[(source[lat], c)]
    real_positions = positions.rename({"latent": "donor"})
    control_positions = pl.read_parquet(run_dir / simulate.SHUFFLED_POSITIONS_FILE)
    donors = control_positions.with_columns(
        pl.col("latent")
        .replace_strict(source, return_dtype=real_positions["donor"].dtype)
        .alias("donor")
    )
    joined = donors.join(real_positions, on=["donor", "context_id", "position"], suffix="_real")
    assert joined.height == control_positions.height
    assert joined["expected_value"].equals(joined["expected_value_real"])
    _check_positions(
        control.drop("explanation_of"),
        pl.read_parquet(run_dir / simulate.SHUFFLED_POSITIONS_FILE),
        ctx_len,
    )

    record = json.loads((run_dir / "simulate.json").read_text())
    assert record["layout"] == "all-at-once"
    assert record["digit_tokens"]["answer_prefix"] == "\t"
    assert record["positions_per_prompt"] == ctx_len
    assert record["positions_files"] == [simulate.POSITIONS_FILE, simulate.SHUFFLED_POSITIONS_FILE]
    assert record["throughput"]["prompts"] == 3 * n_ctx  # the control's rows are re-used
    # A finished stage is skipped; without its positions table it is not finished.
    again = simulate.run(_cfg(shuffled_control=True), run_dir, backend=FakeSlotSimulator())
    assert again.equals(table)
    (run_dir / simulate.POSITIONS_FILE).unlink()
    assert simulate.finished_outputs(run_dir, record["key"]) is None


def test_the_pipeline_records_the_positions_table(run_dir: Path) -> None:
    from nlrw.lib import outputs

    simulate.run(_cfg(), run_dir, backend=FakeSlotSimulator())
    assert simulate.POSITIONS_FILE in outputs.stage_files(run_dir, "simulate")


def _unsimulated_copy(run_dir: Path, dst: Path) -> Path:
    shutil.copytree(run_dir, dst)
    shutil.rmtree(dst / "simulations.parts")
    for name in ("simulations.parquet", "simulate.json", simulate.POSITIONS_FILE):
        (dst / name).unlink()
    return dst


def test_killed_run_resumes_without_simulating_a_pair_twice_or_losing_one(
    run_dir: Path, tmp_path: Path
) -> None:
    cfg = _cfg()  # one latent per part, one backend call per part
    n_ctx = read_contexts(run_dir).height
    reference = simulate.run(cfg, run_dir, backend=FakeSlotSimulator())
    ref_positions = pl.read_parquet(run_dir / simulate.POSITIONS_FILE)
    _check_positions(reference, ref_positions, 8)
    first = pl.read_parquet(run_dir / "simulations.parts" / "part-000000.parquet")
    assert first["latent"].unique().to_list() == [min(EXPLANATIONS)]  # chunked by latent

    other = _unsimulated_copy(run_dir, tmp_path / "other")
    with pytest.raises(KeyboardInterrupt):
        simulate.run(cfg, other, backend=FakeSlotSimulator(fail_after=2))
    parts = sorted(p.name for p in (other / "simulations.parts").glob("part-*.parquet"))
    assert parts == ["part-000000.parquet", "part-000001.parquet"]
    assert not (other / "simulations.parquet").exists()
    assert not (other / simulate.POSITIONS_FILE).exists()

    fake = FakeSlotSimulator()
    resumed = simulate.run(cfg, other, backend=fake)
    asked = [(p.prefix, p.suffix) for call in fake.calls for p in call]
    assert len(asked) == len(set(asked)) == n_ctx  # only the third latent's windows, once each
    assert resumed.equals(reference)
    assert pl.read_parquet(other / simulate.POSITIONS_FILE).equals(ref_positions)


def test_a_simulator_whose_tokenizer_merges_the_slot_stops_before_any_output(
    run_dir: Path,
) -> None:
    fake = FakeSlotSimulator(tokenizer=_merging_tokenizer())
    with pytest.raises(
        ValueError, match=r"tokenizer of tiny-random-llama merges the rating slot '0'"
    ):
        simulate.run(_cfg(), run_dir, backend=fake)
    assert not fake.calls
    assert not list((run_dir / "simulations.parts").glob("part-*"))
    assert not (run_dir / "simulations.parts" / "simulator.json").exists()
    assert not (run_dir / "simulations.parquet").exists()


# --------------------------------------------------------------------------------------------
# Backends that cannot read slots
# --------------------------------------------------------------------------------------------


def test_vllm_and_openai_are_refused_when_the_options_are_validated() -> None:
    with pytest.raises(ValueError, match="needs the transformers backend") as err:
        SimulateConfig(layout="all-at-once", backend="vllm")
    assert "\n" not in str(err.value) and "'vllm'" in str(err.value)
    with pytest.raises(ValueError, match="needs the transformers backend"):
        SimulateConfig(layout="all-at-once", backend="openai", base_url="http://127.0.0.1:1/v1")
    with pytest.raises(ValueError, match="own prompt"):
        SimulateConfig(layout="all-at-once", prompt="paper")
    SimulateConfig(layout="all-at-once")  # the transformers backend is fine


def test_the_cli_refuses_the_layout_with_vllm_before_any_stage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from nlrw.cli import main

    run = tmp_path / "run"
    argv = ["run", "--preset", "smoke", "--run-dir", str(run)]
    with pytest.raises(SystemExit) as exit_info:  # tyro's parse error, status 2
        main([*argv, "--simulate.layout", "all-at-once", "--simulate.backend", "vllm"])
    assert exit_info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())  # tyro wraps the message in a box
    assert "needs the transformers backend" in err and "'vllm'" in err
    assert not (run / "stages").exists()


class OneAnswerSimulator:
    """A backend that reads one answer per prompt only (as the vllm and openai ones)."""

    name = "one-answer"
    model = "one-answer"

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.calls = 0

    def answer_distribution_ids(self, *a: Any, **k: Any) -> Any:
        self.calls += 1
        raise AssertionError("not to be called")

    def close(self) -> None:
        pass


def test_a_backend_without_slot_reading_is_refused_before_any_output(run_dir: Path) -> None:
    fake = OneAnswerSimulator(FakeSlotSimulator().tokenizer)
    with pytest.raises(ValueError, match="needs the transformers backend: backend 'one-answer'"):
        simulate.run(_cfg(), run_dir, backend=fake)  # pyright: ignore[reportArgumentType]
    assert not fake.calls
    assert not list((run_dir / "simulations.parts").glob("part-*"))
    assert not (run_dir / "simulations.parquet").exists()
