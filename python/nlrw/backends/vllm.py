"""A backend on vLLM's offline engine (``vllm.LLM``): automatic prefix caching, tensor parallelism.

Install with ``pip install 'nlrw[vllm]'`` on a machine with a GPU (vLLM pins its own torch).

* ``answer_distribution_ids`` sends each prompt as token ids (``prefix + suffix``, no
  re-tokenization) and asks for **one** generated token at temperature 0 with logprobs. The
  probability of answer ``j`` is ``exp`` of the logprob vLLM returns for ``answer_ids[j]``:

  - vLLM versions whose ``SamplingParams`` has ``logprob_token_ids`` (0.33 has it) are asked for
    exactly the answer tokens (``logprob_token_ids=answer_ids``): every answer gets its true
    probability, whatever its rank;
  - older versions are asked for the top ``logprobs`` (default 20) tokens; an answer outside
    them gets probability **0**, so the mass ``Σ_i p_i`` may then be underestimated (as the
    openai backend and the paper's top-k reading do; with 10 digit answers and a model that
    follows the format, the digits that matter are in the top 20). Logged once.

  The logprobs are vLLM V1's default ``logprobs_mode="raw_logprobs"``:
  ``log_softmax(float32(logits))`` of the model's own logits, before temperature, penalties or
  any logits processor: the same quantity as the transformers backend's
  ``softmax(float32(logits))``, not renormalized over the answers. ``allowed_token_ids`` is not
  used (on vLLM V0 it renormalized the returned logprobs over the allowed tokens), and
  **prompt logprobs are never requested**: vLLM V1 skips the prefix cache for requests that ask
  for them.

  Requests are ordered by ``(prefix, suffix)`` (:func:`build_requests`): prompts with the same
  prefix are adjacent, and different prefixes that share leading tokens (system prompt,
  few-shot examples) are next to each other, so the engine's automatic prefix cache computes
  each shared block once while it is still cached. Results come back in input order.
* ``answer_distribution`` renders each chat with the tokenizer's chat template and the answer
  prefix (:func:`~nlrw.backends.base.render`), maps answers to token ids
  (:func:`~nlrw.backends.base.answer_token_ids`) and runs the ids path above.
* ``generate`` renders chats the same way (no answer prefix) and samples with
  ``SamplingParams(temperature, seed=seed + i, max_tokens)`` per chat (greedy at temperature 0;
  plain temperature sampling, no top-k/top-p, whatever the model's generation config says).

The prompt tokenizer is the Hugging Face tokenizer of the model folder (the one the transformers
backend uses), so both backends ask the model the very same token ids.

The pure parts, :func:`build_requests`, :func:`answer_sampling_kwargs` and
:func:`parse_outputs`, need no GPU and are tested on real vLLM output objects where vLLM
imports.
"""

from __future__ import annotations

import gc
import importlib
import json
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from nlrw.backends.base import (
    AnswerDistribution,
    BackendError,
    Generation,
    Message,
    SplitPrompt,
    answer_token_ids,
    check_split_prompts,
    encode_prompt,
    render,
)

__all__ = [
    "VLLMBackend",
    "answer_sampling_kwargs",
    "build_requests",
    "parse_outputs",
    "supports_logprob_token_ids",
]

log = logging.getLogger(__name__)

_DTYPES = ("auto", "bfloat16", "float16", "float32")


def _vllm(module: str = "vllm") -> Any:
    """``importlib.import_module(module)``, with an install hint when vLLM is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"the vllm backend needs vLLM ({e}): pip install 'nlrw[vllm]' on a machine with a "
            "CUDA GPU"
        ) from e


# --------------------------------------------------------------------------------------------
# Pure parts
# --------------------------------------------------------------------------------------------


def build_requests(prompts: Sequence[SplitPrompt]) -> tuple[list[list[int]], list[int]]:
    """The prompts' token ids in the order to submit them, and that order.

    Returns ``(tokens, order)``: ``tokens[j] = prefix + suffix`` of prompt ``order[j]``, sorted
    by ``(prefix, suffix)`` (stable: equal prompts keep their input order). Prompts sharing a
    prefix are adjacent, and prefixes sharing leading tokens are neighbours, so a prefix cache
    sees each shared block in a run. The result of request ``j`` belongs to row ``order[j]``:
    ``rows[order] = results``.
    """
    order = sorted(range(len(prompts)), key=lambda i: (prompts[i].prefix, prompts[i].suffix))
    tokens = [[int(t) for t in (*prompts[i].prefix, *prompts[i].suffix)] for i in order]
    return tokens, order


def supports_logprob_token_ids(sampling_params_cls: Any) -> bool:
    """Whether vLLM's ``SamplingParams`` class takes ``logprob_token_ids`` (0.33 does)."""
    fields = getattr(sampling_params_cls, "__struct_fields__", None)  # a msgspec Struct
    if fields is None:
        fields = getattr(sampling_params_cls, "__dataclass_fields__", {})
    return "logprob_token_ids" in fields


def answer_sampling_kwargs(answer_ids: Sequence[int], k: int, *, token_ids: bool) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` for one answer token's logprobs.

    ``max_tokens=1, temperature=0`` and no detokenization; with ``token_ids`` (the engine
    supports ``logprob_token_ids``) the logprobs of exactly ``answer_ids`` (``logprobs`` set to
    their count, which vLLM requires when both are given), else the top ``k``.
    """
    kwargs: dict[str, Any] = {"max_tokens": 1, "temperature": 0.0, "detokenize": False}
    if token_ids:
        ids = [int(a) for a in answer_ids]
        kwargs.update(logprobs=len(ids), logprob_token_ids=ids)
    else:
        kwargs["logprobs"] = int(k)
    return kwargs


def _logprob_value(entry: Any) -> float:
    """A logprob entry's value: a ``vllm.logprobs.Logprob`` (``.logprob``) or a plain float."""
    return float(getattr(entry, "logprob", entry))


def parse_outputs(outputs: Sequence[Any], answer_ids: Sequence[int]) -> np.ndarray:
    """float64 ``[len(outputs), len(answer_ids)]``: ``exp`` of each answer's logprob at the first
    generated position, 0 where an answer is absent (outside the top k) or ``-inf``.

    Reads vLLM's ``RequestOutput.outputs[0].logprobs[0]``: a ``{token id: Logprob}`` dict (or the
    same position of a ``FlatLogprobs``, which indexes to such a dict).

    Raises:
        BackendError: an output with no completion or no logprobs (the request did not ask for
            them, or the engine dropped them).
    """
    ids = [int(a) for a in answer_ids]
    probs = np.zeros((len(outputs), len(ids)), dtype=np.float64)
    for r, out in enumerate(outputs):
        completions = getattr(out, "outputs", None) or []
        logprobs = getattr(completions[0], "logprobs", None) if completions else None
        if logprobs is None or len(logprobs) == 0:
            rid = getattr(out, "request_id", r)
            raise BackendError(
                f"vLLM returned no logprobs for request {rid!r} (output {r}): the request must "
                "ask for 'logprobs' and generate one token"
            )
        position = logprobs[0]
        for j, a in enumerate(ids):
            entry = position.get(a)
            if entry is None:
                continue
            value = _logprob_value(entry)
            probs[r, j] = math.exp(value) if math.isfinite(value) else 0.0
    return probs


# --------------------------------------------------------------------------------------------
# Options given as strings (CLI/TOML backend_options are (name, str) pairs)
# --------------------------------------------------------------------------------------------


def _as_int(name: str, value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _as_float(name: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be a boolean, got {value!r}")


# --------------------------------------------------------------------------------------------
# Backend
# --------------------------------------------------------------------------------------------


class VLLMBackend:
    """vLLM's offline engine behind the :class:`~nlrw.backends.base.Backend` interface.

    Args:
        model: a Hugging Face folder or hub name, or an alias of
            :func:`nlrw.assets.resolve_model` (``"qwen2.5-coder-0.5b"``).
        dtype: ``"auto"`` (bfloat16, as the transformers backend on CUDA), ``"bfloat16"``,
            ``"float16"`` or ``"float32"``.
        tensor_parallel_size: GPUs the model is split over.
        gpu_memory_utilization: fraction of each GPU's memory vLLM may take (weights + KV cache).
        max_model_len: longest prompt + answer in tokens (default: the model's context length);
            a smaller value leaves more memory to the KV cache.
        seed: the engine's seed.
        enable_prefix_caching: vLLM's automatic prefix caching (on: the point of this backend).
        logprobs: top logprobs asked for on vLLM versions without ``logprob_token_ids``
            (module docstring); at most ``max_logprobs``.
        max_logprobs: the engine's cap on logprobs per token (vLLM's default 20); also the most
            answers one call may ask about.
        tokenizer: a tokenizer name/path or a loaded Hugging Face tokenizer that renders prompts
            (default: the model folder's).
        llm: an already built ``vllm.LLM`` (or a stand-in with its ``generate``), used instead of
            starting an engine (tests).
        engine_options: further keyword arguments for ``vllm.LLM`` (e.g. ``enforce_eager``),
            or a JSON object of them (``'{"enforce_eager": true}'``).

    Options may be given as strings (``backend_options`` of the pipeline configs): numbers and
    booleans are parsed.
    """

    name = "vllm"

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        tensor_parallel_size: int | str = 1,
        gpu_memory_utilization: float | str = 0.9,
        max_model_len: int | str | None = None,
        seed: int | str = 0,
        enable_prefix_caching: bool | str = True,
        logprobs: int | str = 20,
        max_logprobs: int | str = 20,
        tokenizer: Any = None,
        llm: Any = None,
        engine_options: dict[str, Any] | str | None = None,
    ) -> None:
        from nlrw.assets import resolve_model

        dtype = str(dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}: expected one of {list(_DTYPES)}")
        self.model = model
        self.dtype = "bfloat16" if dtype == "auto" else dtype
        self.tensor_parallel_size = _as_int("tensor_parallel_size", tensor_parallel_size)
        self.gpu_memory_utilization = _as_float("gpu_memory_utilization", gpu_memory_utilization)
        self.seed = _as_int("seed", seed)
        self.enable_prefix_caching = _as_bool("enable_prefix_caching", enable_prefix_caching)
        self.max_logprobs = _as_int("max_logprobs", max_logprobs)
        self.logprobs = _as_int("logprobs", logprobs)
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if not 1 <= self.logprobs <= self.max_logprobs:
            raise ValueError(
                f"logprobs must be in 1..max_logprobs={self.max_logprobs}, got {self.logprobs}"
            )
        length = None if max_model_len is None else _as_int("max_model_len", max_model_len)
        if isinstance(engine_options, str):  # a JSON object from a (name, str) option pair
            engine_options = json.loads(engine_options)
        if engine_options is not None and not isinstance(engine_options, dict):
            raise ValueError(f"engine_options must be a dict, got {engine_options!r}")
        path = resolve_model(model) if llm is None else model
        tokenizer_path = tokenizer if isinstance(tokenizer, str) else path
        if tokenizer is None or isinstance(tokenizer, str):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.tokenizer: Any = tokenizer
        if llm is None:
            options: dict[str, Any] = {
                "model": path,
                "tokenizer": tokenizer_path,
                "dtype": self.dtype,
                "tensor_parallel_size": self.tensor_parallel_size,
                "gpu_memory_utilization": self.gpu_memory_utilization,
                "enable_prefix_caching": self.enable_prefix_caching,
                "seed": self.seed,
                "max_logprobs": self.max_logprobs,
            }
            if length is not None:
                options["max_model_len"] = length
            options.update(engine_options or {})
            llm = _vllm().LLM(**options)
        self.llm: Any = llm
        self.max_length = length or _engine_max_model_len(llm)
        self._sampling_params_cls: Any = None
        self._token_ids: bool | None = None
        log.info(
            "vllm backend: %s (%s) in %s, tensor parallel %d, prefix caching %s",
            model,
            path,
            self.dtype,
            self.tensor_parallel_size,
            self.enable_prefix_caching,
        )

    # ----------------------------------------------------------------------------------------

    def _params(self, **kwargs: Any) -> Any:
        if self._sampling_params_cls is None:
            self._sampling_params_cls = _vllm().SamplingParams
        return self._sampling_params_cls(**kwargs)

    def _uses_token_ids(self) -> bool:
        if self._token_ids is None:
            self._params(max_tokens=1)  # loads the class
            self._token_ids = supports_logprob_token_ids(self._sampling_params_cls)
            if not self._token_ids:
                log.warning(
                    "this vLLM has no SamplingParams.logprob_token_ids: answer probabilities are "
                    "read from the top %d logprobs, answers outside them count as 0 (the mass "
                    "may be underestimated); a vLLM with logprob_token_ids (0.33) reads exactly "
                    "the answer tokens",
                    self.logprobs,
                )
        return self._token_ids

    def _generate(self, tokens: list[list[int]], params: Any) -> list[Any]:
        prompts = [{"prompt_token_ids": t} for t in tokens]  # a vllm.inputs.TokensPrompt
        try:
            outputs = list(self.llm.generate(prompts, params, use_tqdm=False))
        except (ValueError, TypeError):
            raise
        except Exception as e:  # an engine failure or vLLM's own validation error
            raise BackendError(
                f"vLLM could not answer {len(prompts)} prompts: {type(e).__name__}: {e}"
            ) from e
        if len(outputs) != len(tokens):
            raise BackendError(f"vLLM returned {len(outputs)} outputs for {len(tokens)} prompts")
        for j, out in enumerate(outputs):
            got = getattr(out, "prompt_token_ids", None)
            if got is not None and list(got) != tokens[j]:
                raise BackendError(
                    f"vLLM output {j} belongs to another prompt (its prompt ids differ): "
                    "outputs are out of order"
                )
        return outputs

    def _check_vocab(self, answer_ids: Sequence[int]) -> None:
        vocab = _engine_vocab_size(self.llm)
        if vocab is None:
            return
        bad = [int(a) for a in answer_ids if not 0 <= int(a) < vocab]
        if bad:
            raise ValueError(
                f"answer ids {bad} are outside the model's vocabulary (0..{vocab - 1})"
            )

    def answer_distribution_ids(
        self, prompts: Sequence[SplitPrompt], answer_ids: Sequence[int]
    ) -> AnswerDistribution:
        """``p[i, j] = exp(logprob of answer_ids[j] after prefix+suffix of prompt i)`` (module
        docstring), rows in the order of ``prompts``.

        Raises:
            ValueError: no or repeated answer ids, ids outside the vocabulary, more answers
                than ``max_logprobs``, an empty suffix or a prompt that leaves no room for the
                answer token in ``max_model_len`` (longer than ``max_model_len - 1``).
            BackendError: the engine failed or returned no logprobs.
        """
        room = None if self.max_length is None else self.max_length - 1  # + the answer token
        check_split_prompts(prompts, answer_ids, max_length=room)
        ids = [int(a) for a in answer_ids]
        self._check_vocab(ids)
        token_ids = self._uses_token_ids()
        if token_ids and len(ids) > self.max_logprobs:
            raise ValueError(
                f"{len(ids)} answers exceed max_logprobs={self.max_logprobs}: build the backend "
                f"with max_logprobs={len(ids)}"
            )
        if not prompts:
            return AnswerDistribution(np.zeros((0, len(ids))), np.zeros(0))
        tokens, order = build_requests(prompts)
        params = self._params(**answer_sampling_kwargs(ids, self.logprobs, token_ids=token_ids))
        parsed = parse_outputs(self._generate(tokens, params), ids)
        probs = np.zeros_like(parsed)
        probs[order] = parsed
        return AnswerDistribution(probs, probs.sum(1))

    def answer_distribution(
        self, chats: Sequence[Sequence[Message]], answer_prefix: str, answers: Sequence[str]
    ) -> AnswerDistribution:
        """The probability of each answer token after each chat + prefilled ``answer_prefix``:
        rendered and tokenized as the transformers backend does, then
        :meth:`answer_distribution_ids` (an empty prefix, the whole prompt as suffix)."""
        ids = answer_token_ids(self.tokenizer, answers, prefix=answer_prefix)
        prompts = [SplitPrompt((), tuple(self._encode(c, answer_prefix))) for c in chats]
        return self.answer_distribution_ids(prompts, ids)

    def _encode(self, chat: Sequence[Message], prefix: str | None) -> list[int]:
        return encode_prompt(self.tokenizer, render(self.tokenizer, chat, answer_prefix=prefix))

    def generate(
        self,
        chats: Sequence[Sequence[Message]],
        *,
        max_new_tokens: int = 200,
        temperature: float = 0.0,
        seed: int = 0,
    ) -> list[Generation]:
        """A reply to each chat: greedy at temperature 0, else plain temperature sampling seeded
        with ``seed + i`` for chat ``i`` (independent of the batch it comes in)."""
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        tokens = [self._encode(c, None) for c in chats]
        limit = self.max_length
        too_long = [(i, len(t)) for i, t in enumerate(tokens) if limit and len(t) >= limit]
        if too_long:
            raise ValueError(
                f"prompts leave no room for a reply in max_model_len={limit} tokens "
                f"(index, length): {too_long[:10]}"
            )
        if not tokens:
            return []
        eos = _eos_ids(self.tokenizer)
        params = [
            self._params(
                max_tokens=max_new_tokens,
                temperature=float(temperature),
                seed=seed + i,
                stop_token_ids=eos or None,
            )
            for i in range(len(tokens))
        ]
        results: list[Generation] = []
        for j, out in enumerate(self._generate(tokens, params)):
            completions = getattr(out, "outputs", None) or []
            if not completions or not isinstance(getattr(completions[0], "text", None), str):
                results.append(Generation("", len(tokens[j]), 0, "malformed"))
                continue
            c = completions[0]
            results.append(
                Generation(
                    text=c.text,
                    prompt_tokens=len(tokens[j]),
                    completion_tokens=len(c.token_ids),
                    finish_reason=str(c.finish_reason or "unknown"),
                )
            )
        return results

    def close(self) -> None:
        """Drop the engine (its GPU memory is freed once nothing else holds it)."""
        llm, self.llm = self.llm, None
        del llm
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover - torch is a dependency
            pass


# --------------------------------------------------------------------------------------------
# Engine facts, read defensively (their place moved between vLLM versions)
# --------------------------------------------------------------------------------------------


def _model_config(llm: Any) -> Any:
    engine = getattr(llm, "llm_engine", None)
    config = getattr(llm, "model_config", None) or getattr(engine, "model_config", None)
    if config is None:
        vllm_config = getattr(engine, "vllm_config", None)
        config = getattr(vllm_config, "model_config", None)
    return config


def _engine_max_model_len(llm: Any) -> int | None:
    value = getattr(_model_config(llm), "max_model_len", None)
    return int(value) if isinstance(value, int) else None


def _engine_vocab_size(llm: Any) -> int | None:
    config = _model_config(llm)
    getter = getattr(config, "get_vocab_size", None)
    if getter is None:
        return None
    try:
        return int(getter())
    except Exception:  # a stand-in engine or an unexpected config: skip the check
        return None


def _eos_ids(tokenizer: Any) -> list[int]:
    """The tokenizer's end-of-sequence id(s); vLLM adds the generation config's own."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]
