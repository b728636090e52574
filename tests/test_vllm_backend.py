"""nlrw.backends.vllm: request building, logprob parsing and the backend's plumbing.

Three kinds of tests:

* pure functions and the backend driven by a **stand-in engine** (``TinyEngine``: a tiny random
  Hugging Face model answering ``generate`` as vLLM's V1 sampler does); run everywhere. The
  stand-in output classes (``StandIn*``) copy the attribute structure of vLLM's and exist only
  for these tests; where vLLM imports, the same tests also run on vLLM's real classes;
* real vLLM objects (``RequestOutput``, ``CompletionOutput``, ``Logprob``, ``FlatLogprobs``,
  ``SamplingParams``): skipped where vLLM is not installed (it is not in the dev environment:
  its wheel pins its own torch); ``make test`` runs this module again in ``.venv-vllm``
  (vLLM's CPU build), where they run;
* the real engine on the embedded Qwen2.5-Coder-0.5B against the transformers backend: needs a
  CUDA device and vLLM (``gpu`` marker). The real engine on the CPU is tested in
  ``test_vllm_cpu.py``.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from nlrw.backends import BackendError, Generation, load_backend
from nlrw.backends.base import (
    SplitPrompt,
    answer_token_ids,
    encode_prompt,
    render,
    split_encode,
)
from nlrw.backends.transformers import TransformersBackend
from nlrw.backends.vllm import (
    VLLMBackend,
    answer_sampling_kwargs,
    build_requests,
    parse_outputs,
    supports_logprob_token_ids,
)
from support import (
    DIGITS,
    EXAMPLES,
    RATING_SYSTEM,
    chats,
    interleaved_prompts,
    rating_chat,
    tiny_model,
    tiny_tokenizer,
)

torch.set_num_threads(1)

HAS_VLLM = importlib.util.find_spec("vllm") is not None
ANSWERS = list(range(48, 58))  # ten token ids of the tiny vocabulary ("0".."9")


def random_prompts(n: int, seed: int = 0) -> list[SplitPrompt]:
    """Prefixes (one empty, two sharing their first 8 tokens) interleaved; suffixes 1..7."""
    return interleaved_prompts(n, seed, 8, (13, 26))


# --------------------------------------------------------------------------------------------
# Stand-ins with vLLM's attribute structure (for the tests only), and the real classes


@dataclass
class StandInLogprob:
    """Same fields as ``vllm.logprobs.Logprob``."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class StandInCompletionOutput:
    """Same fields as ``vllm.outputs.CompletionOutput`` (the ones nlrw reads)."""

    index: int
    text: str
    token_ids: Sequence[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Any]] | None
    finish_reason: str | None = None


@dataclass
class StandInRequestOutput:
    """Same fields as ``vllm.outputs.RequestOutput`` (the ones nlrw reads)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    prompt_logprobs: Any
    outputs: list[Any]
    finished: bool


@dataclass
class StandInSamplingParams:
    """``vllm.SamplingParams`` with ``logprob_token_ids`` (vLLM 0.33)."""

    max_tokens: int | None = 16
    temperature: float = 1.0
    seed: int | None = None
    logprobs: int | None = None
    logprob_token_ids: list[int] | None = None
    detokenize: bool = True
    stop_token_ids: list[int] | None = field(default=None)


@dataclass
class OldStandInSamplingParams:
    """``vllm.SamplingParams`` of a version without ``logprob_token_ids``: top-k logprobs only."""

    max_tokens: int | None = 16
    temperature: float = 1.0
    seed: int | None = None
    logprobs: int | None = None
    detokenize: bool = True
    stop_token_ids: list[int] | None = field(default=None)


@dataclass
class Classes:
    logprob: Any
    completion: Any
    request: Any
    sampling_params: Any


def stand_in_classes(old: bool = False) -> Classes:
    params = OldStandInSamplingParams if old else StandInSamplingParams
    return Classes(StandInLogprob, StandInCompletionOutput, StandInRequestOutput, params)


def vllm_classes() -> Classes:
    pytest.importorskip("vllm.outputs", reason="vLLM is not installed (pip install 'nlrw[vllm]')")
    from vllm import SamplingParams  # pyright: ignore[reportMissingImports]
    from vllm.logprobs import Logprob  # pyright: ignore[reportMissingImports]
    from vllm.outputs import CompletionOutput, RequestOutput  # pyright: ignore[reportMissingImports]

    return Classes(Logprob, CompletionOutput, RequestOutput, SamplingParams)


def request_output(cls: Classes, rid: str, prompt: list[int], position: dict[int, Any]) -> Any:
    sampled = next(iter(position))
    completion = cls.completion(
        index=0,
        text="",
        token_ids=[sampled],
        cumulative_logprob=position[sampled].logprob,
        logprobs=[position],
        finish_reason="length",
    )
    return cls.request(
        request_id=rid,
        prompt=None,
        prompt_token_ids=prompt,
        prompt_logprobs=None,
        outputs=[completion],
        finished=True,
    )


class ModelConfig:
    def __init__(self, vocab: int, max_len: int) -> None:
        self.vocab, self.max_model_len = vocab, max_len

    def get_vocab_size(self) -> int:
        return self.vocab


class TinyEngine:
    """A stand-in for ``vllm.LLM``: a tiny Hugging Face model answers ``generate`` as vLLM V1's
    sampler does: ``log_softmax(float32(logits))`` of the last position ("raw_logprobs"); the
    sampled (greedy) token first, then the ``logprob_token_ids`` or the top ``logprobs``."""

    def __init__(self, cls: Classes, model: Any = None) -> None:
        self.cls = cls
        self.model = model if model is not None else tiny_model("qwen2")
        self.model_config = ModelConfig(int(self.model.config.vocab_size), 256)
        self.calls: list[list[list[int]]] = []
        self.params: list[Any] = []

    @torch.no_grad()
    def generate(self, prompts: list[dict[str, Any]], params: Any, use_tqdm: bool = True) -> Any:
        tokens = [list(p["prompt_token_ids"]) for p in prompts]
        self.calls.append(tokens)
        each = params if isinstance(params, list) else [params] * len(prompts)
        self.params.extend(each)
        outputs = []
        for i, (ids, sp) in enumerate(zip(tokens, each, strict=True)):
            logits = self.model(input_ids=torch.tensor([ids])).logits[0, -1]
            lp = torch.log_softmax(logits.float(), -1)
            sampled = int(lp.argmax())
            if sp.max_tokens != 1:  # generation: a fixed three-token reply
                new = [72, 105, 33][: sp.max_tokens]
                completion = self.cls.completion(
                    index=0,
                    text="Hi!"[: len(new)],
                    token_ids=new,
                    cumulative_logprob=None,
                    logprobs=None,
                    finish_reason="length",
                )
                outputs.append(self.cls.request(str(i), None, ids, None, [completion], True))
                continue
            wanted = getattr(sp, "logprob_token_ids", None)
            keys = list(wanted) if wanted else lp.topk(sp.logprobs).indices.tolist()
            position = {k: self.cls.logprob(logprob=float(lp[k])) for k in [sampled, *keys]}
            outputs.append(request_output(self.cls, str(i), ids, position))
        return outputs


def engine_backend(cls: Classes, **kw: Any) -> tuple[VLLMBackend, TinyEngine]:
    engine = TinyEngine(cls)
    backend = VLLMBackend("tiny-qwen2", tokenizer=tiny_tokenizer(), llm=engine, **kw)
    backend._sampling_params_cls = cls.sampling_params  # the stand-in (or vLLM's own) class
    return backend, engine


def reference(model: Any, prompts: list[SplitPrompt], ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        rows = [
            torch.softmax(
                model(input_ids=torch.tensor([[*p.prefix, *p.suffix]])).logits[0, -1], -1
            )[ids].double()
            for p in prompts
        ]
    return torch.stack(rows).numpy()


# --------------------------------------------------------------------------------------------
# Pure parts


def test_build_requests_groups_shared_prefixes_and_inverts_to_input_order() -> None:
    prompts = random_prompts(30)
    prompts.append(prompts[4])  # a duplicate keeps its input order (stable)
    tokens, order = build_requests(prompts)
    assert sorted(order) == list(range(len(prompts)))
    assert tokens == [[*prompts[i].prefix, *prompts[i].suffix] for i in order]
    assert all(isinstance(t, int) for row in tokens for t in row)
    # each prefix's prompts form one run, and the two prefixes sharing a head are neighbours
    runs = [prompts[order[0]].prefix]
    for i in order[1:]:
        if prompts[i].prefix != runs[-1]:
            runs.append(prompts[i].prefix)
    assert len(runs) == 3 and runs[0] == ()
    assert runs[1][:8] == runs[2][:8]
    assert order.index(4) < order.index(30)
    # scattering results by order gives them back in input order
    rows = np.zeros(len(prompts), dtype=np.int64)
    rows[order] = np.arange(len(prompts))
    assert [tokens[r] for r in rows] == [[*p.prefix, *p.suffix] for p in prompts]
    assert build_requests([]) == ([], [])


def test_answer_sampling_kwargs_asks_for_exactly_the_answers_or_the_top_k() -> None:
    got = answer_sampling_kwargs([5, 7], 20, token_ids=True)
    assert got == {
        "max_tokens": 1,
        "temperature": 0.0,
        "detokenize": False,
        "logprobs": 2,
        "logprob_token_ids": [5, 7],
    }
    got = answer_sampling_kwargs([5, 7], 20, token_ids=False)
    assert got == {"max_tokens": 1, "temperature": 0.0, "detokenize": False, "logprobs": 20}
    assert "prompt_logprobs" not in got  # V1 would skip the prefix cache
    assert supports_logprob_token_ids(StandInSamplingParams)
    assert not supports_logprob_token_ids(OldStandInSamplingParams)


def test_parse_outputs_on_stand_in_objects() -> None:
    """The parser on plain objects shaped like vLLM's (``StandIn*``); real ones below."""
    cls = stand_in_classes()
    position = {
        3: StandInLogprob(-0.1, rank=1),
        5: StandInLogprob(float(np.log(0.25)), rank=2),
        7: StandInLogprob(float("-inf")),
    }
    outputs = [
        request_output(cls, "0", [1, 2], position),
        request_output(cls, "1", [1], {9: StandInLogprob(-0.5)}),
    ]
    got = parse_outputs(outputs, [5, 3, 7, 11])
    np.testing.assert_allclose(got[0], [0.25, np.exp(-0.1), 0.0, 0.0])
    np.testing.assert_array_equal(got[1], [0.0, 0.0, 0.0, 0.0])  # answers outside the top k
    assert got.dtype == np.float64 and got.shape == (2, 4)
    plain = request_output(cls, "2", [1], {3: StandInLogprob(-1.0)})
    plain.outputs[0].logprobs = [{3: -1.0}]  # a bare float is read too
    assert parse_outputs([plain], [3])[0, 0] == pytest.approx(np.exp(-1.0))
    assert parse_outputs([], [3]).shape == (0, 1)


@pytest.mark.parametrize("broken", ["no completion", "no logprobs", "empty logprobs"])
def test_parse_outputs_refuses_outputs_without_logprobs(broken: str) -> None:
    cls = stand_in_classes()
    out = request_output(cls, "r7", [1], {3: StandInLogprob(-1.0)})
    if broken == "no completion":
        out.outputs = []
    elif broken == "no logprobs":
        out.outputs[0].logprobs = None
    else:
        out.outputs[0].logprobs = []
    with pytest.raises(BackendError, match="no logprobs for request 'r7'"):
        parse_outputs([out], [3])


def test_load_backend_names_vllm_and_says_how_to_install_it(tmp_path: Path) -> None:
    if HAS_VLLM:
        pytest.skip("vLLM is installed here: loading would start a real engine")
    tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ImportError, match=r"nlrw\[vllm\]"):
        load_backend("vllm", str(tmp_path))
    with pytest.raises(ValueError, match="'transformers', 'openai' or 'vllm'"):
        load_backend("nope", "x")  # pyright: ignore[reportArgumentType]


def test_options_given_as_strings_are_parsed_and_checked() -> None:
    engine = TinyEngine(stand_in_classes())
    backend = VLLMBackend(
        "tiny",
        tokenizer=tiny_tokenizer(),
        llm=engine,
        tensor_parallel_size="2",
        gpu_memory_utilization="0.5",
        enable_prefix_caching="false",
        max_model_len="128",
        logprobs="5",
    )
    assert backend.tensor_parallel_size == 2 and backend.gpu_memory_utilization == 0.5
    assert backend.enable_prefix_caching is False and backend.max_length == 128
    assert backend.logprobs == 5 and backend.dtype == "bfloat16" and backend.name == "vllm"
    assert VLLMBackend("tiny", tokenizer=tiny_tokenizer(), llm=engine).max_length == 256
    bad_options: list[dict[str, Any]] = [
        {"dtype": "int8"},
        {"tensor_parallel_size": "two"},
        {"gpu_memory_utilization": 1.5},
        {"enable_prefix_caching": "maybe"},
        {"logprobs": 21},
        {"engine_options": "[1]"},
    ]
    for bad in bad_options:
        with pytest.raises(ValueError):
            VLLMBackend("tiny", tokenizer=tiny_tokenizer(), llm=engine, **bad)


# --------------------------------------------------------------------------------------------
# The backend on a stand-in engine (and on vLLM's real classes where vLLM imports)


def classes_for(kind: str) -> Classes:
    return vllm_classes() if kind == "vllm" else stand_in_classes()


@pytest.mark.parametrize("kind", ["stand-in", "vllm"])
def test_answer_distribution_ids_matches_the_definition_in_input_order(kind: str) -> None:
    backend, engine = engine_backend(classes_for(kind))
    prompts = random_prompts(17)
    got = backend.answer_distribution_ids(prompts, ANSWERS)
    np.testing.assert_allclose(got.probs, reference(engine.model, prompts, ANSWERS), atol=1e-6)
    np.testing.assert_allclose(got.mass, got.probs.sum(1))
    # one generate call, prompts grouped by prefix, the answers asked for by id
    assert len(engine.calls) == 1
    assert engine.calls[0] == build_requests(prompts)[0]
    params = engine.params[0]
    assert params.logprob_token_ids == ANSWERS and params.max_tokens == 1
    assert params.temperature == 0 and params.logprobs == len(ANSWERS)
    assert getattr(params, "prompt_logprobs", None) is None
    empty = backend.answer_distribution_ids([], ANSWERS)
    assert empty.probs.shape == (0, 10) and empty.mass.shape == (0,)


@pytest.mark.parametrize("kind", ["stand-in", "vllm"])
def test_answer_distribution_matches_the_transformers_backend(kind: str) -> None:
    backend, engine = engine_backend(classes_for(kind))
    reference_backend = TransformersBackend(
        "tiny-qwen2", model_obj=engine.model, tokenizer=tiny_tokenizer(), dtype="float32"
    )
    want = reference_backend.answer_distribution(chats(6), "Rating: ", DIGITS)
    got = backend.answer_distribution(chats(6), "Rating: ", DIGITS)
    np.testing.assert_allclose(got.probs, want.probs, atol=1e-6)
    tok = backend.tokenizer
    prompts = [encode_prompt(tok, render(tok, c, answer_prefix="Rating: ")) for c in chats(6)]
    assert sorted(map(tuple, engine.calls[0])) == sorted(map(tuple, prompts))
    # split prompts too
    mark = "<<<SPLIT>>>"
    split = [
        split_encode(tok, [{"role": "user", "content": f"Rules.{mark} item {i}"}], mark, "R: ")
        for i in range(5)
    ]
    np.testing.assert_allclose(
        backend.answer_distribution_ids(split, ANSWERS).probs,
        reference_backend.answer_distribution_ids(split, ANSWERS).probs,
        atol=1e-6,
    )


def test_without_logprob_token_ids_answers_outside_the_top_k_count_as_zero(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend, engine = engine_backend(stand_in_classes(old=True), logprobs=3)
    prompts = random_prompts(6)
    with caplog.at_level(logging.WARNING, logger="nlrw.backends.vllm"):
        got = backend.answer_distribution_ids(prompts, ANSWERS)
        backend.answer_distribution_ids(prompts, ANSWERS)
    assert sum("top 3 logprobs" in r.getMessage() for r in caplog.records) == 1  # once
    assert engine.params[0].logprobs == 3
    want = reference(engine.model, prompts, ANSWERS)
    full = torch.softmax(
        torch.stack(
            [
                engine.model(input_ids=torch.tensor([[*p.prefix, *p.suffix]])).logits[0, -1]
                for p in prompts
            ]
        ).detach(),
        -1,
    )
    top3 = full.topk(3, -1).indices.numpy()
    for r in range(len(prompts)):
        for j, a in enumerate(ANSWERS):
            expected = want[r, j] if a in top3[r] else 0.0
            assert got.probs[r, j] == pytest.approx(expected, abs=1e-6)
    assert (got.mass <= want.sum(1) + 1e-9).all()  # the mass can only be underestimated


def test_answer_distribution_ids_checks_its_inputs() -> None:
    backend, _ = engine_backend(stand_in_classes())
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        backend.answer_distribution_ids(random_prompts(2), [5, 262])
    with pytest.raises(ValueError, match="repeat"):
        backend.answer_distribution_ids(random_prompts(2), [5, 5])
    with pytest.raises(ValueError, match="empty suffix"):
        backend.answer_distribution_ids([SplitPrompt((1,), ())], [5])
    backend.answer_distribution_ids([SplitPrompt((1,) * 250, (2,) * 5)], [5])  # 255 + 1 fit
    with pytest.raises(ValueError, match="longer than max_length=255"):  # no room for the answer
        backend.answer_distribution_ids([SplitPrompt((1,) * 250, (2,) * 6)], [5])
    with pytest.raises(ValueError, match="no room for a reply"):
        backend.generate([[{"role": "user", "content": "x" * 300}]])
    with pytest.raises(ValueError, match="exceed max_logprobs=20"):
        backend.answer_distribution_ids(random_prompts(2), list(range(21)))


def test_outputs_of_another_prompt_are_refused() -> None:
    backend, engine = engine_backend(stand_in_classes())
    real = engine.generate

    def shuffled(prompts: list[dict[str, Any]], params: Any, use_tqdm: bool = True) -> Any:
        return list(reversed(real(prompts, params, use_tqdm)))

    engine.generate = shuffled  # pyright: ignore[reportAttributeAccessIssue]
    with pytest.raises(BackendError, match="out of order"):
        backend.answer_distribution_ids(random_prompts(4), ANSWERS)


@pytest.mark.parametrize("kind", ["stand-in", "vllm"])
def test_generate_renders_chats_and_seeds_each_one(kind: str) -> None:
    backend, engine = engine_backend(classes_for(kind))
    got = backend.generate(chats(3), max_new_tokens=3, temperature=0.7, seed=11)
    tok = backend.tokenizer
    prompts = [encode_prompt(tok, render(tok, c, answer_prefix=None)) for c in chats(3)]
    assert engine.calls[0] == prompts  # in input order, no sorting
    assert got == [Generation("Hi!", len(p), 3, "length") for p in prompts]
    assert [p.seed for p in engine.params] == [11, 12, 13]
    assert all(p.temperature == 0.7 and p.max_tokens == 3 for p in engine.params)
    assert all(p.stop_token_ids == [tok.eos_token_id] for p in engine.params)
    assert backend.generate([], max_new_tokens=3) == []
    with pytest.raises(ValueError, match="temperature"):
        backend.generate(chats(1), temperature=-1)


# --------------------------------------------------------------------------------------------
# vLLM's real classes (skipped where vLLM is not installed)


def test_parse_outputs_reads_real_vllm_request_outputs() -> None:
    cls = vllm_classes()
    from vllm.logprobs import FlatLogprobs, Logprob  # pyright: ignore[reportMissingImports]

    position = {3: Logprob(-0.1, rank=1, decoded_token="a"), 5: Logprob(-2.0, rank=4)}
    dict_output = request_output(cls, "0", [1, 2, 3], position)
    flat = FlatLogprobs()
    flat.append(position)
    flat_output = request_output(cls, "1", [1, 2, 3], position)
    flat_output.outputs[0].logprobs = flat
    got = parse_outputs([dict_output, flat_output], [5, 3, 9])
    want = [np.exp(-2.0), np.exp(-0.1), 0.0]
    np.testing.assert_allclose(got, [want, want])


def test_parse_outputs_reads_logprobs_built_by_vllms_own_code() -> None:
    """The container vLLM's output processor fills (``create_sample_logprobs`` +
    ``append_logprobs_for_next_position``), as for a request with ``logprob_token_ids``: the
    sampled token first, then the requested ids."""
    cls = vllm_classes()
    import vllm.logprobs as vlp  # pyright: ignore[reportMissingImports]

    if not hasattr(vlp, "append_logprobs_for_next_position"):
        pytest.skip("this vLLM builds its logprobs differently")
    for flat in (False, True):
        container = vlp.create_sample_logprobs(flat)
        vlp.append_logprobs_for_next_position(
            container, [7, 5, 7, 9], [-0.3, -1.5, -0.3, -4.0], [None] * 4, 1, 3
        )
        out = request_output(cls, "0", [1], {7: vlp.Logprob(-0.3)})
        out.outputs[0].logprobs = container
        np.testing.assert_allclose(
            parse_outputs([out], [9, 7, 5]), [[np.exp(-4.0), np.exp(-0.3), np.exp(-1.5)]]
        )


def test_real_sampling_params_and_tokens_prompt_take_what_the_backend_sends() -> None:
    cls = vllm_classes()
    from vllm.inputs import TokensPrompt  # pyright: ignore[reportMissingImports]

    assert "prompt_token_ids" in TokensPrompt.__annotations__
    token_ids = supports_logprob_token_ids(cls.sampling_params)
    assert token_ids == hasattr(cls.sampling_params(), "logprob_token_ids")
    params = cls.sampling_params(**answer_sampling_kwargs(ANSWERS, 20, token_ids=token_ids))
    assert params.max_tokens == 1 and params.temperature == 0 and params.prompt_logprobs is None
    if token_ids:
        assert params.logprob_token_ids == ANSWERS and params.logprobs == len(ANSWERS)
        # no prompt logprobs, so the request reads the prefix cache
        assert not getattr(params, "skip_reading_prefix_cache", False)
    else:
        assert params.logprobs == 20
    sampled = cls.sampling_params(max_tokens=5, temperature=0.7, seed=3, stop_token_ids=[2])
    assert sampled.top_p == 1.0 and sampled.top_k in (0, -1)  # plain temperature sampling


# --------------------------------------------------------------------------------------------
# The real engine on a GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_vllm_matches_the_transformers_backend_on_qwen() -> None:
    """vLLM (bfloat16) against the transformers backend in float32 on the GPU, Qwen2.5-Coder-0.5B,
    the same token ids: chats (``answer_distribution``) and split prompts sharing prefixes.

    Tolerance: expected digit values within 0.15 on the 0-9 scale; digit probabilities and
    masses within 0.1 (a sanity bound). Both read ``softmax(float32(logits))`` at the same
    position; what differs is only the arithmetic of the forward: vLLM runs in bfloat16 (8
    mantissa bits) with its own fused kernels. The bfloat16 vs float32 change of this model's
    expected values was measured at up to ~0.14 (shared/MODELS.md, transformers on CPU); vLLM's
    bfloat16 has the same precision with a different order of operations, so the same bound
    applies, hence 0.15. (Two bfloat16 implementations are not compared with each other: their
    rounding errors do not cancel, which could double the bound.)
    """
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'nlrw[vllm]')")
    from nlrw.simulate import expected_values

    chats_ = [rating_chat(*e) for e in EXAMPLES]
    hf = TransformersBackend("qwen2.5-coder-0.5b", dtype="float32", device="cuda")
    want = hf.answer_distribution(chats_, "Rating: ", DIGITS)
    mark = "<<<SPLIT>>>"
    split_chats = [
        [
            {"role": "system", "content": RATING_SYSTEM},
            {"role": "user", "content": f"Neuron explanation: {e[0]}.{mark}\nText: {e[1]}"},
        ]
        for e in EXAMPLES
    ]
    split = [split_encode(hf.tokenizer, c, mark, "Rating: ") for c in split_chats]
    digit_ids = answer_token_ids(hf.tokenizer, DIGITS, prefix="Rating: ")
    want_ids = hf.answer_distribution_ids(split, digit_ids)
    hf.close()
    torch.cuda.empty_cache()

    vl = VLLMBackend(
        "qwen2.5-coder-0.5b", dtype="bfloat16", gpu_memory_utilization=0.3, max_model_len=2048
    )
    try:
        got = vl.answer_distribution(chats_, "Rating: ", DIGITS)
        got_ids = vl.answer_distribution_ids(split, digit_ids)
        replies = vl.generate(chats_[:2], max_new_tokens=8)
    finally:
        vl.close()
    for g, w in ((got, want), (got_ids, want_ids)):
        np.testing.assert_allclose(expected_values(g.probs), expected_values(w.probs), atol=0.15)
        np.testing.assert_allclose(g.probs, w.probs, atol=0.1)
        np.testing.assert_allclose(g.mass, w.mass, atol=0.1)
    assert all(r.ok for r in replies)
