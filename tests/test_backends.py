"""nlrw.backends: prompt rendering, answer tokens, the transformers and openai backends.

Fast tests use a tiny random Qwen2/Llama with a tiny byte-level tokenizer (``support.py``), and
small stdlib HTTP servers for the openai backend's failure handling. Slow tests use the embedded
Qwen2.5-Coder-0.5B: through transformers, and through a real OpenAI-compatible server
(llama-cpp-python's, serving the same GGUF) started on loopback; the two must agree (the
``qwen`` and ``llama_server`` fixtures are in ``conftest.py``).
"""

from __future__ import annotations

import http.server
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from nlrw.backends import (
    AnswerDistribution,
    Backend,
    BackendError,
    Generation,
    answer_token_ids,
    load_backend,
    render,
)
from nlrw.backends.openai import OpenAIBackend
from nlrw.backends.transformers import TransformersBackend
from support import (
    BYTE_VOCAB,
    DIGITS,
    EXAMPLES,
    chats,
    free_port,
    rating_chat,
    tiny_backend,
    tiny_model,
    tiny_tokenizer,
)

torch.set_num_threads(1)

# --------------------------------------------------------------------------------------------
# Prompt text and answer tokens


def test_render_applies_the_chat_template_then_the_answer_prefix() -> None:
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Rate it."},
    ]
    tok = tiny_tokenizer()
    assert render(tok, chat, answer_prefix="Rating: ") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nRate it.<|im_end|>\n"
        "<|im_start|>assistant\nRating: "
    )
    assert render(tok, chat, answer_prefix=None).endswith("<|im_start|>assistant\n")


def test_render_without_a_chat_template_falls_back_to_plain_text_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tok = tiny_tokenizer(chat_template=False)
    tok.name_or_path = "tiny-bytes-plain-render-test"  # a name no other test has logged yet
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Rate it."}]
    with caplog.at_level(logging.WARNING, logger="nlrw.backends.base"):
        a = render(tok, chat, answer_prefix="Rating: ")
        b = render(tok, chat, answer_prefix=None)
    assert a == "System: Be brief.\n\nUser: Rate it.\n\nAssistant: Rating: "
    assert b == "System: Be brief.\n\nUser: Rate it.\n\nAssistant:"
    warnings = [r for r in caplog.records if "no chat template" in r.getMessage()]
    assert len(warnings) == 1


def test_render_rejects_malformed_chats() -> None:
    with pytest.raises(ValueError, match="empty chat"):
        render(tiny_tokenizer(), [], answer_prefix=None)
    with pytest.raises(ValueError, match="malformed message"):
        render(tiny_tokenizer(), [{"role": "robot", "content": "x"}], answer_prefix=None)


def test_answer_token_ids_are_single_tokens_and_multi_piece_answers_are_named() -> None:
    tok = tiny_tokenizer()
    ids = answer_token_ids(tok, DIGITS)
    assert [tok.decode([i]) for i in ids] == DIGITS
    assert tok.decode(answer_token_ids(tok, ["Yes"])) == "Yes"
    # After "Rating: " the digit follows the space token: the bare form is what the model sees.
    assert answer_token_ids(tok, DIGITS, prefix="Rating: ") == ids
    with pytest.raises(ValueError, match=r"'Maybe'.*'10'") as err:
        answer_token_ids(tok, ["Yes", "Maybe", "10"])
    assert "'Yes'" not in str(err.value).split("pieces:")[1]
    with pytest.raises(ValueError, match="repeated token ids"):
        answer_token_ids(tok, ["5", "5"])


def test_answer_token_ids_uses_the_leading_space_form_when_the_tokenizer_has_one() -> None:
    """A Llama-3/SentencePiece-like vocabulary where " 7" is one token and "7" another."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["Ġ7"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "7")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # pyright: ignore
    t = PreTrainedTokenizerFast(tokenizer_object=tok)
    space7, bare7 = vocab["Ġ7"], vocab["7"]
    assert answer_token_ids(t, ["7"]) == [bare7]  # bare first without a prefix
    assert answer_token_ids(t, ["7"], prefix="Rating:") == [space7]  # "Rating: 7" reads " 7"
    with pytest.raises(ValueError, match="merges with the prefix"):
        answer_token_ids(t, ["7"], prefix="Rating: ")  # its space would merge into " 7"


# --------------------------------------------------------------------------------------------
# transformers backend on tiny models


def reference_probs(model: Any, tok: Any, chat: Any, prefix: str, ids: list[int]) -> np.ndarray:
    """One prompt, no padding, no batching: the definition of answer_distribution."""
    text = render(tok, chat, answer_prefix=prefix)
    input_ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits[0, -1]
    return torch.softmax(logits.float(), -1)[ids].double().numpy()


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_batched_answer_distribution_equals_one_prompt_at_a_time(arch: str) -> None:
    prompts = chats(7)
    batched = tiny_backend(arch, batch_size=4)
    single = tiny_backend(arch, batch_size=1)
    a = batched.answer_distribution(prompts, "Rating: ", DIGITS)
    b = single.answer_distribution(prompts, "Rating: ", DIGITS)
    assert isinstance(a, AnswerDistribution)
    assert a.probs.shape == (7, 10) and a.probs.dtype == np.float64
    np.testing.assert_allclose(a.probs, b.probs, rtol=0, atol=1e-5)
    np.testing.assert_allclose(a.mass, a.probs.sum(1))
    ids = answer_token_ids(batched.tokenizer, DIGITS)
    ref = np.stack(
        [reference_probs(batched.lm, batched.tokenizer, c, "Rating: ", ids) for c in prompts]
    )
    np.testing.assert_allclose(a.probs, ref, rtol=0, atol=1e-5)
    # Not renormalized: a random model spreads its mass over the whole vocabulary.
    assert (a.mass < 0.9).all() and (a.mass > 0).all()


def test_answer_distribution_with_a_plain_prompt_tokenizer() -> None:
    backend = tiny_backend(tokenizer=tiny_tokenizer(chat_template=False), batch_size=3)
    prompts = chats(4)
    got = backend.answer_distribution(prompts, "Rating: ", DIGITS)
    ids = answer_token_ids(backend.tokenizer, DIGITS)
    for chat, row in zip(prompts, got.probs, strict=True):
        text = render(backend.tokenizer, chat, answer_prefix="Rating: ")
        input_ids = torch.tensor([backend.tokenizer(text)["input_ids"]])
        with torch.no_grad():
            logits = backend.lm(input_ids=input_ids).logits[0, -1]
        np.testing.assert_allclose(row, torch.softmax(logits, -1)[ids].numpy(), atol=1e-5)


def test_answer_distribution_bad_input() -> None:
    backend = tiny_backend(max_length=40)
    with pytest.raises(ValueError, match="'Maybe'"):
        backend.answer_distribution(chats(2), "Rating: ", ["Yes", "Maybe"])
    with pytest.raises(ValueError, match=r"longer than max_length=40"):
        backend.answer_distribution(chats(10), "Rating: ", DIGITS)


def test_generate_batched_equals_unbatched_and_stops_at_eos() -> None:
    prompts = chats(5)
    batched = tiny_backend(batch_size=4).generate(prompts, max_new_tokens=12)
    single = tiny_backend(batch_size=1).generate(prompts, max_new_tokens=12)
    assert [g.text for g in batched] == [g.text for g in single]
    tok = tiny_tokenizer()
    for g, chat in zip(batched, prompts, strict=True):
        assert isinstance(g, Generation)
        assert g.prompt_tokens == len(
            tok(render(tok, chat, answer_prefix=None), add_special_tokens=False)["input_ids"]
        )
        assert g.finish_reason in {"stop", "length"}
        assert "<|im_start|>" not in g.text and "<|endoftext|>" not in g.text
        if g.finish_reason == "length":
            assert g.completion_tokens == 12
        else:
            assert g.completion_tokens <= 12


class EOSHead(torch.nn.Module):
    """An output layer that always predicts EOS (token 261)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*h.shape[:-1], BYTE_VOCAB, dtype=h.dtype)
        logits[..., 261] = 10.0
        return logits


def test_generate_empty_reply_is_returned_and_flagged() -> None:
    backend = tiny_backend()
    backend.lm.lm_head = EOSHead()
    out = backend.generate(chats(2), max_new_tokens=5)
    assert out == [Generation("", g.prompt_tokens, 1, "stop") for g in out]
    assert not any(g.ok for g in out)
    assert Generation("  \n", 3, 2, "stop").ok is False
    assert Generation("fine", 3, 1, "malformed").ok is False
    assert Generation("fine", 3, 1, "stop").ok


def test_sampling_is_seeded() -> None:
    backend = tiny_backend(batch_size=2)
    a = backend.generate(chats(3), max_new_tokens=8, temperature=1.0, seed=1)
    b = backend.generate(chats(3), max_new_tokens=8, temperature=1.0, seed=1)
    c = backend.generate(chats(3), max_new_tokens=8, temperature=1.0, seed=2)
    assert a == b
    assert a != c


def test_load_backend_and_protocol(tmp_path: Path) -> None:
    tiny_model().save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    backend = load_backend("transformers", str(tmp_path), dtype="float32")
    assert isinstance(backend, Backend)
    assert backend.name == "transformers" and backend.model == str(tmp_path)
    assert backend.answer_distribution(chats(2), "Rating: ", DIGITS).probs.shape == (2, 10)
    backend.close()
    with pytest.raises(ValueError, match="unknown backend"):
        load_backend("vllm-typo", "x")  # pyright: ignore[reportArgumentType]


# --------------------------------------------------------------------------------------------
# openai backend: failure handling against small stdlib servers


class Scripted(http.server.BaseHTTPRequestHandler):
    """Answers from a shared script: a list of (status, body or None = hang) per request."""

    script: ClassVar[list[tuple[int, Any]]] = []
    seen: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(
            {"path": self.path, "body": body, "auth": self.headers["Authorization"]}
        )
        status, answer = type(self).script.pop(0) if type(self).script else (200, None)
        if answer == "hang":
            time.sleep(1.0)
            return
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def scripted() -> Iterator[str]:
    Scripted.script, Scripted.seen = [], []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def fast_retry(base_url: str, **kw: Any) -> OpenAIBackend:
    kw.setdefault("tokenizer", tiny_tokenizer())
    return OpenAIBackend(
        "m", base_url=base_url, retry_delay=0.01, max_retry_delay=0.02, timeout=0.5, **kw
    )


def test_openai_server_down_fails_with_the_url_after_retries() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    backend = fast_retry(url, max_retries=2)
    start = time.perf_counter()
    with pytest.raises(BackendError, match=rf"{url}/completions failed after 3 attempts"):
        backend.answer_distribution(chats(1), "Rating: ", DIGITS)
    assert time.perf_counter() - start < 5
    backend.close()


def test_openai_retries_5xx_and_timeouts_then_succeeds(
    scripted: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NLRW_TEST_KEY", "sekret")
    top = {"5": -0.1, "7": -3.0, "hello": -4.0}
    ok = {"choices": [{"text": "5", "logprobs": {"top_logprobs": [top]}}]}
    Scripted.script = [(503, {"error": "busy"}), (200, "hang"), (200, ok)]
    backend = fast_retry(scripted, max_retries=3, concurrency=1, api_key_env="NLRW_TEST_KEY")
    got = backend.answer_distribution(chats(1), "Rating: ", DIGITS)
    expected = np.zeros(10)
    expected[5], expected[7] = np.exp(-0.1), np.exp(-3.0)
    np.testing.assert_allclose(got.probs[0], expected)
    np.testing.assert_allclose(got.mass, [expected.sum()])
    assert len(Scripted.seen) == 3
    body = Scripted.seen[-1]["body"]
    assert body["prompt"] == render(tiny_tokenizer(), chats(1)[0], answer_prefix="Rating: ")
    assert body["max_tokens"] == 1 and body["logprobs"] == 20 and body["temperature"] == 0
    assert Scripted.seen[-1]["auth"] == "Bearer sekret"
    # Persistent 5xx: the error names the URL and the status.
    Scripted.script = [(502, {"error": "bad gateway"})] * 3
    with pytest.raises(BackendError, match=r"completions failed after 3 attempts.*HTTP 502"):
        fast_retry(scripted, max_retries=2).answer_distribution(chats(1), "Rating: ", DIGITS)
    # A 4xx is not retried.
    Scripted.script, Scripted.seen = [(400, {"error": "unknown model"})], []
    with pytest.raises(BackendError, match=r"HTTP 400.*unknown model"):
        fast_retry(scripted).answer_distribution(chats(1), "Rating: ", DIGITS)
    assert len(Scripted.seen) == 1


def test_openai_generate_returns_malformed_replies_flagged(scripted: str) -> None:
    good = {
        "choices": [{"message": {"content": "An explanation."}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 3},
    }
    Scripted.script = [(200, good), (200, {"choices": []})]
    out = fast_retry(scripted, concurrency=1).generate(chats(2), max_new_tokens=7, seed=3)
    assert out[0] == Generation("An explanation.", 11, 3, "stop") and out[0].ok
    assert out[1].finish_reason == "malformed" and not out[1].ok
    assert Scripted.seen[0]["body"]["messages"] == chats(2)[0]
    assert Scripted.seen[0]["body"]["max_tokens"] == 7


# --------------------------------------------------------------------------------------------
# Slow: the embedded Qwen2.5-Coder-0.5B, through transformers and a real server


@pytest.mark.slow
def test_qwen_gives_a_sensible_digit_distribution(qwen: TransformersBackend) -> None:
    got = qwen.answer_distribution([rating_chat(*e) for e in EXAMPLES], "Rating: ", DIGITS)
    assert (got.mass > 0.3).all(), got.mass
    ev = (got.probs / got.mass[:, None]) @ np.arange(10)
    assert ev[0] > ev[1], ev  # a dog is more dog-like than a falling market
    out = qwen.generate(
        [[{"role": "user", "content": "What is the capital of France?"}]], max_new_tokens=16
    )
    assert "Paris" in out[0].text and out[0].ok


@pytest.mark.slow
def test_openai_backend_on_a_real_server_agrees_with_transformers(
    llama_server: str, qwen: TransformersBackend
) -> None:
    """Same GGUF, same prompt text: llama.cpp runs the quantized weights (Q4_K/Q5_0/Q6_K/Q8_0)
    with activations quantized to 8 bits in its matmuls; transformers the dequantized weights in
    float32 (the tolerances are justified below)."""
    from nlrw.assets import SIMULATOR_ALIAS

    backend = OpenAIBackend(
        SIMULATOR_ALIAS, base_url=llama_server, concurrency=2, tokenizer=qwen.tokenizer
    )
    prompts = [rating_chat(*e) for e in EXAMPLES]
    theirs = backend.answer_distribution(prompts, "Rating: ", DIGITS)
    ours = qwen.answer_distribution(prompts, "Rating: ", DIGITS)
    # Tolerances. Both sides hold the very same quantized weight values; llama.cpp also
    # quantizes the activations entering each matmul to 8-bit blocks (Q8_0/Q8_K: ~0.4%
    # relative error per product, accumulated over 24 layers), transformers computes in
    # float32. Measured on these prompts: max |dp| = 0.007 per digit, |d mass| < 1e-4,
    # |d E[digit]| = 0.046, the same size as bfloat16 vs float32 in transformers (0.010, 2e-5,
    # 0.044). The bounds are about 4x that, for other CPUs' kernels (AVX2 vs AVX512 paths).
    np.testing.assert_allclose(theirs.probs, ours.probs, rtol=0, atol=0.03)
    np.testing.assert_allclose(theirs.mass, ours.mass, rtol=0, atol=0.02)
    ev = lambda d: (d.probs / d.mass[:, None]) @ np.arange(10)  # noqa: E731
    np.testing.assert_allclose(ev(theirs), ev(ours), rtol=0, atol=0.2)
    out = backend.generate(
        [[{"role": "user", "content": "What is the capital of France?"}]], max_new_tokens=16
    )
    assert "Paris" in out[0].text and out[0].ok and out[0].completion_tokens > 0
    backend.close()


def test_concurrent_dtype_measurements_agree_and_keep_every_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Processes (here threads, each with its own lock file description) that start together
    measure a (model, machine) once and agree; entries of other models are not lost."""

    from nlrw.backends import transformers as tb

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls: list[str] = []

    def slow_measure(model: Any) -> dict[str, Any]:
        # Alternate the choice: two measurements of one model would disagree.
        chosen = ("float32", "bfloat16")[len(calls) % 2]
        calls.append(chosen)
        time.sleep(0.3)
        return {"chosen": chosen, "float32_s": 1.0, "bfloat16_s": 1.0}

    monkeypatch.setattr(tb, "measure_cpu_dtype", slow_measure)
    results: dict[str, dict[str, Any]] = {}

    def load(tag: str, name: str) -> None:
        results[tag] = tb.cpu_dtype(torch.nn.Linear(2, 2), name)

    threads = [
        threading.Thread(target=load, args=(tag, name))
        for tag, name in (("a1", "model-a"), ("a2", "model-a"), ("b", "model-b"))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 2  # model-a once, model-b once
    assert results["a1"]["chosen"] == results["a2"]["chosen"]
    assert sorted([results["a1"]["cached"], results["a2"]["cached"]]) == [False, True]
    known = json.loads((tmp_path / "nlrw" / "cpu_dtype.json").read_text())
    assert sorted(k.split("|")[0] for k in known) == ["model-a", "model-b"]


def test_auto_dtype_on_a_cpu_is_measured_once_and_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    backend = tiny_backend(dtype="auto", device="cpu")
    measured = backend.dtype_measurement
    assert measured is not None and measured["chosen"] in ("float32", "bfloat16")
    assert measured["float32_s"] > 0 and measured["bfloat16_s"] > 0
    assert not measured["cached"]
    assert str(backend.dtype) == f"torch.{measured['chosen']}"
    assert next(backend.lm.parameters()).dtype == backend.dtype
    # The next load on this machine reuses the choice: every run and resume agrees.
    again = tiny_backend(dtype="auto", device="cpu")
    assert again.dtype_measurement is not None and again.dtype_measurement["cached"]
    assert again.dtype == backend.dtype
    assert (tmp_path / "nlrw" / "cpu_dtype.json").is_file()
    assert tiny_backend(dtype="float32").dtype_measurement is None
