"""The simulation engines: ``answer_distribution_ids`` on split prompts, and ``split_encode``.

Fast tests run tiny random Llama and Qwen2 models (Qwen2 has attention biases) built in
tests/test_backends.py: the ``"shared-prefix"`` engine (prefix KV computed once, right-padded
suffix batches, head at the last real token) must give what one forward per whole prompt gives
(``"single"``) and what left-padded batches give (``"padded"``). The openai backend's token-id
requests are checked against a small stdlib server. Slow tests use the embedded
Qwen2.5-Coder-0.5B on realistic simulation prompts, through transformers and through
llama-cpp-python's server.
"""

from __future__ import annotations

import http.server
import json
import logging
import threading
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

import nlrw.backends.transformers as tb
from nlrw.backends import base
from nlrw.backends.base import (
    AnswerDistribution,
    Backend,
    SplitPrompt,
    answer_token_ids,
    render,
    split_encode,
)
from nlrw.backends.openai import OpenAIBackend
from nlrw.backends.transformers import TransformersBackend
from support import BYTE_VOCAB, DIGITS, chats, tiny_backend, tiny_lm, tiny_model, tiny_tokenizer

torch.set_num_threads(1)

MARK = "<<<SPLIT>>>"
ANSWERS = list(range(48, 58))  # any ten token ids of the tiny vocabulary


def expected_value(probs: np.ndarray) -> np.ndarray:
    """``Σ_d d · p_d / Σ_d p_d``: the simulation's expected digit."""
    return (probs / probs.sum(1, keepdims=True)) @ np.arange(probs.shape[1])


def random_prompts(n: int, seed: int = 0) -> list[SplitPrompt]:
    """Three prefixes (one empty) interleaved, suffixes of 1..7 tokens."""
    rng = np.random.default_rng(seed)
    prefixes = [tuple(int(t) for t in rng.integers(0, 259, size)) for size in (21, 0, 34)]
    return [
        SplitPrompt(prefixes[i % 3], tuple(int(t) for t in rng.integers(0, 259, 1 + (5 * i) % 7)))
        for i in range(n)
    ]


def reference(model: Any, prompts: list[SplitPrompt], ids: list[int]) -> np.ndarray:
    """The definition: a plain forward of the whole prompt, softmax of the last logits."""
    rows = []
    with torch.no_grad():
        for p in prompts:
            logits = model(input_ids=torch.tensor([[*p.prefix, *p.suffix]])).logits[0, -1]
            rows.append(torch.softmax(logits.float(), -1)[ids].double().numpy())
    return np.stack(rows)


# --------------------------------------------------------------------------------------------
# split_encode


def test_split_encode_cuts_the_rendered_prompt_at_the_marker() -> None:
    tok = tiny_tokenizer()
    chat = [
        {"role": "system", "content": "You rate things."},
        {"role": "user", "content": f"Explanation: dogs.\n{MARK}Text: the <<dog>>"},
    ]
    got = split_encode(tok, chat, MARK, "Rating: ")
    assert isinstance(got, SplitPrompt)
    text = render(tok, chat, answer_prefix="Rating: ")
    head, tail = text.split(MARK)
    assert tok.decode(list(got.prefix)) == head
    assert tok.decode(list(got.suffix)) == tail
    assert tail.endswith("<|im_start|>assistant\nRating: ")
    # The cut is after a newline: the halves tokenize as the whole text does.
    whole = tok(head + tail, add_special_tokens=False)["input_ids"]
    assert [*got.prefix, *got.suffix] == whole
    # Prompts with the same head share the very same prefix ids.
    other = [chat[0], {"role": "user", "content": f"Explanation: dogs.\n{MARK}Text: a cat"}]
    assert split_encode(tok, other, MARK, "Rating: ").prefix == got.prefix


def test_split_encode_marker_at_the_start_gives_an_empty_prefix() -> None:
    tok = tiny_tokenizer(chat_template=False)
    chat = [{"role": "user", "content": "Rate it."}]
    tok.chat_template = "{{ '" + MARK + "' }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    got = split_encode(tok, chat, MARK, "Rating: ")
    assert got.prefix == ()
    assert tok.decode(list(got.suffix)) == "Rate it.Rating: "


def test_split_encode_rejects_a_missing_repeated_or_final_marker() -> None:
    tok = tiny_tokenizer()
    chat = [{"role": "user", "content": "no marker here"}]
    with pytest.raises(ValueError, match=r"exactly once.*found 0 times"):
        split_encode(tok, chat, MARK, "Rating: ")
    twice = [
        {"role": "system", "content": f"a {MARK}"},
        {"role": "user", "content": f"b {MARK}"},
    ]
    with pytest.raises(ValueError, match=r"found 2 times \(in the contents of messages \[0, 1\]\)"):
        split_encode(tok, twice, MARK, "Rating: ")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="nothing follows the split marker"):
        split_encode(tok, [{"role": "user", "content": f"text{MARK}"}], MARK, None)
    with pytest.raises(ValueError, match="non-empty marker"):
        split_encode(tok, chat, "", None)


# --------------------------------------------------------------------------------------------
# transformers engines on tiny models


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("batch_size", [1, 4, 16])
def test_engines_agree_with_one_forward_per_whole_prompt(arch: str, batch_size: int) -> None:
    backend = tiny_backend(arch)
    prompts = random_prompts(13)
    ref = reference(backend.lm, prompts, ANSWERS)
    for engine in ["single", "padded", "shared-prefix"]:
        got = backend.answer_distribution_ids(
            prompts,
            ANSWERS,
            engine=engine,  # pyright: ignore[reportArgumentType]
            batch_size=batch_size,
        )
        assert isinstance(got, AnswerDistribution)
        assert got.probs.shape == (13, 10) and got.probs.dtype == np.float64
        np.testing.assert_allclose(got.probs, ref, rtol=0, atol=1e-5, err_msg=engine)
        np.testing.assert_allclose(got.mass, got.probs.sum(1))
        assert np.abs(expected_value(got.probs) - expected_value(ref)).max() <= 1e-3
    assert (ref.sum(1) < 0.9).all()  # not renormalized


def test_shared_prefix_equals_answer_distribution_on_the_same_chats() -> None:
    """split_encode + answer_distribution_ids reads the same numbers as answer_distribution
    when the cut does not change the tokenization (it is after a newline here)."""
    backend = tiny_backend()
    split = [
        [*c[:-1], {"role": "user", "content": c[-1]["content"].replace(": ", f":\n{MARK}", 1)}]
        for c in chats(6)
    ]
    whole = [[{**m, "content": m["content"].replace(MARK, "")} for m in c] for c in split]
    prompts = [split_encode(backend.tokenizer, c, MARK, "Rating: ") for c in split]
    ids = answer_token_ids(backend.tokenizer, DIGITS, prefix="Rating: ")
    got = backend.answer_distribution_ids(prompts, ids)
    want = backend.answer_distribution(whole, "Rating: ", DIGITS)
    np.testing.assert_allclose(got.probs, want.probs, rtol=0, atol=1e-5)


def test_shared_prefix_runs_each_prefix_once_and_keeps_the_input_order() -> None:
    backend = tiny_backend("llama", engine_batch_size=4)
    backend._head_applies()  # its one-time check runs a few tokens: not counted below
    prompts = random_prompts(12)
    seen: list[int] = []
    embed = backend.lm.get_input_embeddings()
    hook = embed.register_forward_hook(lambda _m, args, _o: seen.append(args[0].numel()))
    try:
        got = backend.answer_distribution_ids(prompts, ANSWERS)
    finally:
        hook.remove()
    # Each distinct non-empty prefix once, then the suffix batches (4 per prefix group,
    # longest first, right-padded to the longest).
    prefixes = [p for p in dict.fromkeys(p.prefix for p in prompts) if p]
    suffix_tokens = 0
    for prefix in dict.fromkeys(p.prefix for p in prompts):
        lengths = sorted((len(p.suffix) for p in prompts if p.prefix == prefix), reverse=True)
        suffix_tokens += sum(
            len(lengths[i : i + 4]) * lengths[i] for i in range(0, len(lengths), 4)
        )
    assert sum(seen) == sum(len(p) for p in prefixes) + suffix_tokens
    assert sum(seen) < sum(len(p.prefix) + len(p.suffix) for p in prompts)
    order = np.random.default_rng(1).permutation(len(prompts))
    shuffled = backend.answer_distribution_ids([prompts[i] for i in order], ANSWERS)
    np.testing.assert_allclose(shuffled.probs, got.probs[order], rtol=0, atol=1e-6)


def test_common_base_of_distinct_prefixes_runs_once_across_calls() -> None:
    """Context-first prefixes: one long common head (instructions), then each context's own
    tokens. The head's KV runs once and is kept; each prefix then runs only its own tail, in
    this call and the next, and the probabilities equal one forward per whole prompt."""
    backend = tiny_backend("qwen2", engine_batch_size=4)
    backend._head_applies()
    rng = np.random.default_rng(3)
    head = tuple(int(t) for t in rng.integers(0, 259, 40))
    tails = [tuple(int(t) for t in rng.integers(0, 259, 5 + i)) for i in range(4)]
    prompts = [
        SplitPrompt(head + tails[c], tuple(int(t) for t in rng.integers(0, 259, 1 + lat)))
        for c in range(4)
        for lat in range(3)
    ]
    seen: list[int] = []
    embed = backend.lm.get_input_embeddings()
    hook = embed.register_forward_hook(lambda _m, args, _o: seen.append(args[0].numel()))
    try:
        first = backend.answer_distribution_ids(prompts[:6], ANSWERS)
        n_first = sum(seen)
        second = backend.answer_distribution_ids(prompts[6:], ANSWERS)
    finally:
        hook.remove()
    suffix_tokens = sum(len(p.suffix) for p in prompts[:3]) + sum(
        len(p.suffix) for p in prompts[3:6]
    )
    # the head once, then the two contexts' tails, then suffix batches (one per context)
    assert n_first == len(head) + len(tails[0]) + len(tails[1]) + 3 * 3 + 3 * 3
    assert sum(seen) - n_first == len(tails[2]) + len(tails[3]) + 3 * 3 + 3 * 3
    assert suffix_tokens < n_first
    got = np.concatenate([first.probs, second.probs])
    np.testing.assert_allclose(got, reference(backend.lm, prompts, ANSWERS), rtol=0, atol=1e-5)
    # a prompt whose prefix does not extend the kept head runs whole, and is still right
    other = [SplitPrompt(tails[0], (1, 2)), SplitPrompt(tails[1], (3,))]
    np.testing.assert_allclose(
        backend.answer_distribution_ids(other, ANSWERS).probs,
        reference(backend.lm, other, ANSWERS),
        rtol=0,
        atol=1e-5,
    )


def test_engine_defaults_and_overrides() -> None:
    backend = tiny_backend(engine="single", engine_batch_size=2)
    assert backend.engine == "single" and backend.engine_batch_size == 2
    prompts = random_prompts(5)
    a = backend.answer_distribution_ids(prompts, ANSWERS)
    b = backend.answer_distribution_ids(prompts, ANSWERS, engine="shared-prefix", batch_size=3)
    np.testing.assert_allclose(a.probs, b.probs, rtol=0, atol=1e-5)
    assert isinstance(backend, Backend)
    empty = backend.answer_distribution_ids([], ANSWERS)
    assert empty.probs.shape == (0, 10) and empty.mass.shape == (0,)


def test_answer_distribution_ids_bad_input() -> None:
    backend = tiny_backend(max_length=30)
    ok = SplitPrompt((1, 2), (3,))
    with pytest.raises(ValueError, match=r"prompts \[1\] have an empty suffix"):
        backend.answer_distribution_ids([ok, SplitPrompt((1, 2), ())], ANSWERS)
    with pytest.raises(ValueError, match=r"longer than max_length=30.*\(1, 31\)"):
        backend.answer_distribution_ids([ok, SplitPrompt(tuple(range(30)), (1,))], ANSWERS)
    with pytest.raises(ValueError, match="unknown engine 'fast'"):
        backend.answer_distribution_ids([ok], ANSWERS, engine="fast")  # pyright: ignore
    with pytest.raises(ValueError, match="unknown engine"):
        tiny_backend(engine="vllm")  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match=r"outside the model's vocabulary \(0..261\)"):
        backend.answer_distribution_ids([ok], [5, 262])
    with pytest.raises(ValueError, match="repeat"):
        backend.answer_distribution_ids([ok], [5, 5])
    with pytest.raises(ValueError, match="no answer ids"):
        backend.answer_distribution_ids([ok], [])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        backend.answer_distribution_ids([ok], ANSWERS, batch_size=0)


def test_shared_prefix_with_logits_post_processed_after_the_head() -> None:
    """A model whose forward scales the head's logits (as Gemma's soft-capping does): the
    one-time check notices and the engine falls back to the model's own logits."""
    backend = tiny_backend()
    lm = backend.lm
    original = type(lm).forward

    def scaled(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        out.logits = 2.0 * out.logits
        return out

    lm.forward = scaled.__get__(lm)
    prompts = random_prompts(7)
    got = backend.answer_distribution_ids(prompts, ANSWERS, batch_size=3)
    assert backend._head_ok is False
    single = backend.answer_distribution_ids(prompts, ANSWERS, engine="single")
    np.testing.assert_allclose(got.probs, single.probs, rtol=0, atol=1e-5)
    assert not np.allclose(single.probs, reference(tiny_model(), prompts, ANSWERS), atol=1e-3)


def test_sliding_window_models_fall_back_to_whole_prompts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = tiny_lm(
        "qwen2",
        vocab_size=BYTE_VOCAB,
        init_std=None,  # the default init
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=0,
    )
    backend = TransformersBackend(
        "tiny-sliding", model_obj=model, tokenizer=tiny_tokenizer(), dtype="float32"
    )
    prompts = random_prompts(6)
    with caplog.at_level(logging.WARNING, logger="nlrw.backends.transformers"):
        got = backend.answer_distribution_ids(prompts, ANSWERS)
    assert any("sliding-window" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(got.probs, reference(backend.lm, prompts, ANSWERS), atol=1e-5)


def test_cpu_batch_size_is_capped_by_available_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = tiny_backend()
    assert backend._cpu_rows_cap(250, 50) >= 16  # a tiny model fits many rows
    monkeypatch.setattr(tb, "_mem_available", lambda: 1)
    assert backend._cpu_rows_cap(250, 50) == 1
    prompts = random_prompts(8)
    got = backend.answer_distribution_ids(prompts, ANSWERS)
    np.testing.assert_allclose(got.probs, reference(backend.lm, prompts, ANSWERS), atol=1e-5)
    monkeypatch.setattr(tb, "_mem_available", lambda: None)
    assert backend._cpu_rows_cap(250, 50) >= 1 << 20


def test_cuda_out_of_memory_halves_the_batch_and_retries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend = tiny_backend(engine_batch_size=8)
    calls: list[int] = []
    real = backend._suffix_probs

    def fake(kv: Any, prefix_len: int, suffixes: list[tuple[int, ...]]) -> torch.Tensor:
        calls.append(len(suffixes))
        if len(suffixes) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(kv, prefix_len, suffixes)

    monkeypatch.setattr(backend, "_suffix_probs", fake)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    # As on CUDA: the cap is whatever the out-of-memory errors left.
    monkeypatch.setattr(backend, "_rows_cap", lambda _p, _s: backend._cuda_rows_cap or 1 << 30)
    prompts = [SplitPrompt((1, 2, 3), (4 + i, 5)) for i in range(7)]
    got = backend.answer_distribution_ids(prompts, ANSWERS)
    assert calls[:3] == [7, 3, 1] and backend._cuda_rows_cap == 1
    np.testing.assert_allclose(got.probs, reference(backend.lm, prompts, ANSWERS), atol=1e-5)

    def always(*_args: Any) -> torch.Tensor:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(backend, "_suffix_probs", always)
    with pytest.raises(torch.cuda.OutOfMemoryError):  # one row does not fit: give up
        backend.answer_distribution_ids(prompts[:1], ANSWERS)


def test_mem_available_reads_proc_meminfo() -> None:
    value = tb._mem_available()
    assert value is None or value > 0


# --------------------------------------------------------------------------------------------
# openai backend: token-id prompts against a small stdlib server


class IdServer(http.server.BaseHTTPRequestHandler):
    """Answers completions with top logprobs that encode the request: digit ``d`` gets
    logprob ``-(d + 1 + len(prompt) % 5)``; refuses token-id prompts when ``text_only``."""

    bodies: ClassVar[list[dict[str, Any]]] = []
    text_only: ClassVar[bool] = False

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append(body)
        prompt = body["prompt"]
        if self.text_only and not isinstance(prompt, str):  # as llama.cpp's server does
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b'{"detail": "prompt: Input should be a valid string"}')
            return
        shift = len(prompt) % 5
        top = {str(d): -(d + 1.0 + shift) for d in range(10)}
        answer = {
            "choices": [{"text": "0", "logprobs": {"top_logprobs": [top]}}],
            "usage": {"prompt_tokens": len(prompt) if isinstance(prompt, list) else 1},
        }
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def id_server() -> Iterator[str]:
    IdServer.bodies = []
    IdServer.text_only = False
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), IdServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_openai_sends_token_ids_grouped_by_prefix_and_returns_input_order(id_server: str) -> None:
    tok = tiny_tokenizer()
    backend = OpenAIBackend("m", base_url=id_server, concurrency=1, tokenizer=tok)
    prompts = random_prompts(7)
    ids = answer_token_ids(tok, DIGITS)
    got = backend.answer_distribution_ids(prompts, ids)
    assert backend.prompt_format == "ids"
    probe, *asked = IdServer.bodies  # "auto" probes with a 1-token id prompt first
    assert probe["prompt"] == [*prompts[0].prefix, *prompts[0].suffix][:1]
    sent = [b["prompt"] for b in asked]
    assert all(b["max_tokens"] == 1 and b["temperature"] == 0 for b in asked)
    # Grouped by prefix, groups in order of first appearance, stable within a group.
    want = [i for g in range(3) for i in range(7) if i % 3 == g]
    assert sent == [[*prompts[i].prefix, *prompts[i].suffix] for i in want]
    for i, p in enumerate(prompts):
        shift = (len(p.prefix) + len(p.suffix)) % 5
        np.testing.assert_allclose(got.probs[i], np.exp(-(np.arange(10) + 1.0 + shift)))
    np.testing.assert_allclose(got.mass, got.probs.sum(1))
    backend.close()


class SameText:
    """A tokenizer whose tokens all read the same."""

    def decode(self, ids: list[int], **_kw: Any) -> str:
        return "7"


def test_openai_falls_back_to_text_when_the_server_refuses_ids(
    id_server: str, caplog: pytest.LogCaptureFixture
) -> None:
    IdServer.text_only = True
    tok = tiny_tokenizer()
    backend = OpenAIBackend("m", base_url=id_server, concurrency=2, tokenizer=tok)
    prompts = random_prompts(4)
    with caplog.at_level(logging.WARNING, logger="nlrw.backends.openai"):
        got = backend.answer_distribution_ids(prompts, answer_token_ids(tok, DIGITS))
    assert backend.prompt_format == "text"
    assert any("refuses token-id prompts" in r.getMessage() for r in caplog.records)
    texts = sorted(b["prompt"] for b in IdServer.bodies if isinstance(b["prompt"], str))
    assert texts == sorted(tok.decode([*p.prefix, *p.suffix]) for p in prompts)
    assert got.probs.shape == (4, 10)
    strict = OpenAIBackend(
        "m", base_url=id_server, tokenizer=tok, prompt_format="ids", max_retries=1, retry_delay=0
    )
    with pytest.raises(base.BackendError, match="HTTP 500"):
        strict.answer_distribution_ids(prompts[:1], answer_token_ids(tok, DIGITS))
    same = OpenAIBackend("m", base_url=id_server, tokenizer=SameText())
    with pytest.raises(ValueError, match="decode to repeated texts"):
        same.answer_distribution_ids(prompts[:1], [1, 2])
    with pytest.raises(ValueError, match="unknown prompt_format"):
        OpenAIBackend("m", base_url=id_server, prompt_format="json")  # pyright: ignore
    for b in (backend, strict, same):
        b.close()


# --------------------------------------------------------------------------------------------
# Slow: the embedded Qwen2.5-Coder-0.5B on realistic simulation prompts

SIM_SYSTEM = (
    "You are a meticulous AI researcher simulating a neuron of a language model. You will see "
    "an explanation of what the neuron detects, then a short excerpt of text whose last token "
    "is marked <<like this>>. Predict how strongly the neuron fires on the marked token, on a "
    "scale from 0 (it does not fire at all) to 9 (it fires as strongly as it ever does). Most "
    "tokens do not activate a neuron, so 0 is the most common answer. Answer with one digit."
)
SIM_SHOTS = [
    ("words about weather, especially rain and storms", "the clouds gathered and the <<rain>>", 8),
    ("words about weather, especially rain and storms", "she opened the door and <<smiled>>", 0),
    ("closing brackets in code and math", "print(len(items)<<)>>", 9),
]
SIM_EXPLANATIONS = [
    "formal words about marriage, engagements and suitors in nineteenth-century prose",
    "the end of a sentence of dialogue: closing quotation marks and the punctuation before them",
]
SIM_PASSAGE = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
    "on his first entering a neighbourhood, this truth is so well fixed in the minds of the "
    "surrounding families, that he is considered the rightful property of some one or other of "
    "their daughters."
)


def sim_chat(explanation: str, window: Sequence[str]) -> list[dict[str, str]]:
    chat = [{"role": "system", "content": SIM_SYSTEM}]
    for expl, text, rating in SIM_SHOTS:
        chat.append({"role": "user", "content": f"Explanation: {expl}.\nText: {text}"})
        chat.append({"role": "assistant", "content": f"Rating: {rating}"})
    words = [*window[:-1], f"<<{window[-1]}>>"]
    chat.append(
        {
            "role": "user",
            "content": f"Explanation: {explanation}.\n{MARK}Text: {' '.join(words)}\n"
            "How strongly does the neuron fire on the marked token?",
        }
    )
    return chat


def sim_prompts(tokenizer: Any, n_contexts: int) -> list[SplitPrompt]:
    """Two explanations x ``n_contexts`` windows: ~250-token prefixes, ~50-token suffixes."""
    words = SIM_PASSAGE.split()
    return [
        split_encode(tokenizer, sim_chat(e, words[c : c + 24 + c % 5]), MARK, "Rating: ")
        for e in SIM_EXPLANATIONS
        for c in range(n_contexts)
    ]


@pytest.mark.slow
def test_qwen_shared_prefix_equals_single_on_realistic_prompts(
    qwen: TransformersBackend,
) -> None:
    prompts = sim_prompts(qwen.tokenizer, 3)
    assert 200 <= len(prompts[0].prefix) <= 300, len(prompts[0].prefix)
    assert all(35 <= len(p.suffix) <= 70 for p in prompts), [len(p.suffix) for p in prompts]
    ids = answer_token_ids(qwen.tokenizer, DIGITS, prefix="Rating: ")
    single = qwen.answer_distribution_ids(prompts, ids, engine="single")
    shared = qwen.answer_distribution_ids(prompts, ids, engine="shared-prefix", batch_size=4)
    padded = qwen.answer_distribution_ids(prompts, ids, engine="padded", batch_size=4)
    assert np.abs(expected_value(shared.probs) - expected_value(single.probs)).max() <= 1e-3
    assert np.abs(expected_value(padded.probs) - expected_value(single.probs)).max() <= 1e-3
    np.testing.assert_allclose(shared.probs, single.probs, rtol=0, atol=1e-4)
    assert (single.mass > 0.3).all(), single.mass  # the model follows the format


@pytest.mark.slow
def test_openai_answer_distribution_ids_on_a_real_server_agrees_with_transformers(
    llama_server: str,
    qwen: TransformersBackend,
) -> None:
    """Same tolerances and reasons as test_backends' answer_distribution test (llama.cpp runs
    the same quantized weights with 8-bit activations in its matmuls). llama.cpp's server takes
    only text prompts: the backend falls back to decoded text, which re-tokenizes to the same
    ids because split_encode cuts after a newline."""
    from nlrw.assets import SIMULATOR_ALIAS

    backend = OpenAIBackend(  # ~300-token prompts on 2 shared cores: be patient, not retrying
        SIMULATOR_ALIAS,
        base_url=llama_server,
        concurrency=1,
        timeout=900,
        max_retries=0,
        tokenizer=qwen.tokenizer,
    )
    prompts = sim_prompts(qwen.tokenizer, 2)
    for p in prompts:
        text = qwen.tokenizer.decode([*p.prefix, *p.suffix])
        assert qwen.tokenizer(text, add_special_tokens=False)["input_ids"] == [*p.prefix, *p.suffix]
    ids = answer_token_ids(qwen.tokenizer, DIGITS, prefix="Rating: ")
    theirs = backend.answer_distribution_ids(prompts, ids)
    assert backend.prompt_format == "text"
    ours = qwen.answer_distribution_ids(prompts, ids)
    np.testing.assert_allclose(theirs.probs, ours.probs, rtol=0, atol=0.03)
    np.testing.assert_allclose(theirs.mass, ours.mass, rtol=0, atol=0.02)
    np.testing.assert_allclose(expected_value(theirs.probs), expected_value(ours.probs), atol=0.2)
    backend.close()
