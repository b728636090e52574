"""A backend for any OpenAI-compatible HTTP server (``vllm serve``, llama.cpp's server, ...).

Only the standard library talks to the server (``urllib`` in a thread pool of ``concurrency``
workers, one request per prompt):

* ``answer_distribution`` renders each chat *locally* with the tokenizer (the ``tokenizer``
  option; by default the same model name through :func:`nlrw.assets.resolve_model`), appends
  the answer prefix and asks the **completions** endpoint for ``max_tokens=1, logprobs=20,
  temperature=0``. The probability of an answer is ``exp`` of its entry in the top-20
  logprobs of that one token; an answer outside the top 20 gets **0**. This truncates the mass
  like the paper's top-k reading (their simulator read the top 10); with 10 digit answers and a
  model that follows the format, the digits are in the top 20 whenever they matter.
* ``answer_distribution_ids`` sends prompts already tokenized
  (:class:`~nlrw.backends.base.SplitPrompt`, ``prefix + suffix``) to the same completions
  request, read the same way. ``prompt_format="ids"`` sends the token ids as the ``prompt``
  (the OpenAI API and vLLM accept a list of ids: no re-tokenization); ``"text"`` sends
  ``tokenizer.decode(ids)`` (the server re-tokenizes; llama.cpp's server accepts only text);
  ``"auto"`` (default) first sends a 1-token id prompt and switches to text for good when the
  server answers it with any HTTP error status (logged).
  Requests are submitted grouped by prefix (groups in order of first appearance) so that a
  server's prefix cache (vLLM's automatic prefix caching, llama.cpp's reuse of the last
  prompt) hits; results come back in input order.
* ``generate`` posts each chat to **chat completions** (the server applies its own template).

Failures: connection errors, timeouts and HTTP 408/429/5xx are retried ``max_retries`` times
with exponential backoff (``retry_delay * 2**attempt``, capped at ``max_retry_delay``, with
jitter), then raise :class:`~nlrw.backends.base.BackendError` naming the URL and the last
status or error. Other HTTP errors (a bad request, an unknown model) fail at once with the
server's message.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypeVar

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

__all__ = ["OpenAIBackend"]

log = logging.getLogger(__name__)

_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
T = TypeVar("T")


class _Fatal(Exception):
    """An HTTP error that retrying will not fix (4xx other than 408/429)."""


class _Refused(BackendError):
    """The server refused a request with an HTTP status that retrying will not fix."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class OpenAIBackend:
    """An OpenAI-compatible server behind the :class:`~nlrw.backends.base.Backend` interface.

    Args:
        model: the model name the server serves (sent as ``"model"``).
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1``.
        api_key_env: environment variable holding the API key; unset: no ``Authorization``
            header (local servers need none).
        concurrency: requests in flight at once.
        timeout: seconds per request.
        max_retries: retries after the first attempt of a request.
        retry_delay: first backoff delay in seconds (doubles each retry).
        max_retry_delay: cap of one backoff delay.
        logprobs: top logprobs requested for answer_distribution (vLLM's default cap is 20).
        tokenizer: name/path of the tokenizer that renders prompts, or a loaded tokenizer;
            default: ``resolve_model(model)``.
        prompt_format: how ``answer_distribution_ids`` sends token ids: ``"ids"``, ``"text"``
            or ``"auto"`` (module docstring).
    """

    name = "openai"

    def __init__(
        self,
        model: str,
        *,
        base_url: str,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 8,
        timeout: float = 60,
        max_retries: int = 5,
        retry_delay: float = 0.5,
        max_retry_delay: float = 30.0,
        logprobs: int = 20,
        tokenizer: Any = None,
        prompt_format: Literal["auto", "ids", "text"] = "auto",
    ) -> None:
        if prompt_format not in ("auto", "ids", "text"):
            raise ValueError(
                f"unknown prompt_format {prompt_format!r}: expected 'auto', 'ids' or 'text'"
            )
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.api_key = os.environ.get(api_key_env) or None
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.retry_delay = retry_delay
        self.max_retry_delay = max_retry_delay
        self.logprobs = logprobs
        self._tokenizer_spec = tokenizer
        self._tokenizer: Any = (
            None if tokenizer is None or isinstance(tokenizer, str) else tokenizer
        )
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="nlrw-openai")
        self._warned_count = False
        self.prompt_format = prompt_format
        self._warned_ids_count = False

    @property
    def tokenizer(self) -> Any:
        """The tokenizer that renders prompts (loaded on first use)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            from nlrw.assets import resolve_model

            self._tokenizer = AutoTokenizer.from_pretrained(
                resolve_model(self._tokenizer_spec or self.model)
            )
        return self._tokenizer

    # ----------------------------------------------------------------------------------------
    # HTTP

    def _post(self, path: str, body: dict[str, Any], *, retry_http: bool = True) -> dict[str, Any]:
        """POST ``body`` as JSON with retries; the decoded JSON answer. ``retry_http=False``:
        any HTTP error status raises at once (connection errors and timeouts still retry)."""
        url = f"{self.base_url}/{path}"
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                delay = min(self.max_retry_delay, self.retry_delay * 2 ** (attempt - 1))
                time.sleep(delay * (0.5 + random.random()))
            request = urllib.request.Request(url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:500]
                last = f"HTTP {e.code} {e.reason}: {detail}"
                if e.code not in _RETRY_STATUS or not retry_http:
                    raise _Refused(f"POST {url} failed: {last}", e.code) from e
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                reason = getattr(e, "reason", e)
                last = f"{type(reason).__name__}: {reason}"
                if isinstance(reason, (TimeoutError, socket.timeout)):
                    last = f"timed out after {self.timeout} s ({reason})"
            except json.JSONDecodeError as e:
                last = f"malformed JSON answer: {e}"
            log.debug("POST %s attempt %d failed: %s", url, attempt + 1, last)
        raise BackendError(
            f"POST {url} failed after {self.max_retries + 1} attempts; last error: {last}"
        )

    def _map(self, fn: Callable[[int], T], n: int) -> list[T]:
        return list(self._pool.map(fn, range(n)))

    # ----------------------------------------------------------------------------------------

    def answer_distribution(
        self, chats: Sequence[Sequence[Message]], answer_prefix: str, answers: Sequence[str]
    ) -> AnswerDistribution:
        """``exp`` of each answer token's top-``logprobs`` entry (0 when absent); see module doc."""
        tok = self.tokenizer
        ids = answer_token_ids(tok, answers, prefix=answer_prefix)
        pieces = [tok.decode([i]) for i in ids]
        prompts = [render(tok, c, answer_prefix=answer_prefix) for c in chats]

        def one(i: int) -> np.ndarray:
            body = {
                "model": self.model,
                "prompt": prompts[i],
                "max_tokens": 1,
                "temperature": 0,
                "logprobs": self.logprobs,
            }
            answer = self._post("completions", body)
            self._check_prompt_tokens(prompts[i], answer)
            return self._answer_probs(answer, pieces)

        rows = self._map(one, len(prompts))
        probs = np.stack(rows) if rows else np.zeros((0, len(ids)))
        return AnswerDistribution(probs.astype(np.float64), probs.sum(1))

    def _answer_probs(self, answer: Any, pieces: Sequence[str]) -> np.ndarray:
        """``exp(logprob)`` of each answer text among a completion's top logprobs (0 when
        absent)."""
        top = _top_logprobs(answer)
        if top is None:
            raise BackendError(
                f"POST {self.base_url}/completions: no top logprobs in the answer "
                f"(does the server support 'logprobs'?): {json.dumps(answer)[:300]}"
            )
        return np.array([math.exp(top[p]) if p in top else 0.0 for p in pieces])

    def answer_distribution_ids(
        self, prompts: Sequence[SplitPrompt], answer_ids: Sequence[int]
    ) -> AnswerDistribution:
        """``exp`` of each answer id's top-``logprobs`` entry (0 when absent), one completions
        request per prompt; see the module docstring for the prompt format and the order.

        Raises:
            ValueError: no or repeated answer ids, answer ids that decode to the same text (the
                top logprobs are keyed by text), or an empty suffix.
            BackendError: the server failed or gave no top logprobs.
        """
        check_split_prompts(prompts, answer_ids)
        tok = self.tokenizer
        pieces = [tok.decode([int(i)]) for i in answer_ids]
        if len(set(pieces)) != len(pieces):
            raise ValueError(
                f"answer ids {list(answer_ids)} decode to repeated texts {pieces}: the server's "
                "top logprobs are keyed by token text"
            )
        tokens = [[int(t) for t in (*p.prefix, *p.suffix)] for p in prompts]
        first: dict[tuple[int, ...], int] = {}
        for i, p in enumerate(prompts):
            first.setdefault(tuple(p.prefix), i)
        order = sorted(range(len(prompts)), key=lambda i: (first[tuple(prompts[i].prefix)], i))

        def one(i: int) -> np.ndarray:
            answer = self._complete_ids(tokens[i])
            return self._answer_probs(answer, pieces)

        probs = np.zeros((len(prompts), len(pieces)), dtype=np.float64)
        if order and self.prompt_format == "auto":
            self._settle_prompt_format(tokens[order[0]][:1])
        for i, row in zip(order, self._pool.map(one, order), strict=True):
            probs[i] = row
        return AnswerDistribution(probs, probs.sum(1))

    def _settle_prompt_format(self, probe: list[int]) -> None:
        """``"auto"``: one 1-token request with a token-id prompt; any HTTP error status
        (llama.cpp's server answers 500 with a validation message) settles it to ``"text"``."""
        body = {"model": self.model, "prompt": probe, "max_tokens": 1, "temperature": 0}
        try:
            self._post("completions", body, retry_http=False)
        except _Refused as refused:
            self.prompt_format = "text"
            log.warning(
                "%s refuses token-id prompts (%s): sending decoded text instead; the server "
                "re-tokenizes it",
                self.base_url,
                str(refused)[:300],
            )
        else:
            self.prompt_format = "ids"

    def _complete_ids(self, ids: list[int]) -> dict[str, Any]:
        """One ``max_tokens=1`` completion of the prompt ``ids`` (as ids or decoded text)."""
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": self.logprobs,
        }
        if self.prompt_format != "text":
            return self._post("completions", {**body, "prompt": ids})
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        answer = self._post("completions", {**body, "prompt": text})
        n = (answer.get("usage") or {}).get("prompt_tokens")
        if isinstance(n, int) and n != len(ids) and not self._warned_ids_count:
            self._warned_ids_count = True
            log.warning(
                "the server tokenized a decoded prompt of %d token ids into %d tokens: its "
                "tokenizer differs, or the split prompt's halves tokenize differently joined",
                len(ids),
                n,
            )
        return answer

    def _check_prompt_tokens(self, prompt: str, answer: dict[str, Any]) -> None:
        """Warn once when the server counts the prompt's tokens differently from us."""
        usage = answer.get("usage") or {}
        n = usage.get("prompt_tokens")
        if self._warned_count or not isinstance(n, int):
            return
        local = len(encode_prompt(self.tokenizer, prompt))
        if n != local:
            self._warned_count = True
            log.warning(
                "the server counts %d prompt tokens where the local tokenizer counts %d: "
                "its tokenizer or special-token handling differs, answers may not match",
                n,
                local,
            )

    def generate(
        self,
        chats: Sequence[Sequence[Message]],
        *,
        max_new_tokens: int = 200,
        temperature: float = 0.0,
        seed: int = 0,
    ) -> list[Generation]:
        """Chat completions, one request per chat; ``seed + i`` seeds chat ``i``."""

        def one(i: int) -> Generation:
            body = {
                "model": self.model,
                "messages": [dict(m) for m in chats[i]],
                "max_tokens": max_new_tokens,
                "temperature": temperature,
                "seed": seed + i,
            }
            answer = self._post("chat/completions", body)
            usage = answer.get("usage") or {}
            try:
                choice = answer["choices"][0]
                text = choice["message"]["content"]
                if not isinstance(text, str):
                    raise TypeError(type(text))
            except (KeyError, IndexError, TypeError):
                return Generation("", int(usage.get("prompt_tokens") or 0), 0, "malformed")
            return Generation(
                text,
                int(usage.get("prompt_tokens") or 0),
                int(usage.get("completion_tokens") or 0),
                str(choice.get("finish_reason") or "unknown"),
            )

        return self._map(one, len(chats))

    def close(self) -> None:
        """Stop the worker threads."""
        self._pool.shutdown(wait=True)


def _top_logprobs(answer: dict[str, Any]) -> dict[str, float] | None:
    """The first generated token's top logprobs as ``{token text: logprob}``.

    Reads the completions format (``logprobs.top_logprobs[0]`` is a dict) and the chat format
    that some servers return there too (``logprobs.content[0].top_logprobs`` is a list).
    """
    try:
        lp = answer["choices"][0]["logprobs"]
    except (KeyError, IndexError, TypeError):
        return None
    if not isinstance(lp, dict):
        return None
    top = lp.get("top_logprobs")
    if isinstance(top, list) and top and isinstance(top[0], dict):
        return {str(k): float(v) for k, v in top[0].items()}
    content = lp.get("content")
    if isinstance(content, list) and content and isinstance(content[0], dict):
        entries = content[0].get("top_logprobs") or []
        return {str(e["token"]): float(e["logprob"]) for e in entries}
    return None
