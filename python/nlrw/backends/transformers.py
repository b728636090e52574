"""The default backend: a Hugging Face causal LM run in this process (CPU or GPU), batched.

``answer_distribution`` renders each chat with the answer prefix, sorts the prompts by length
(less padding), left-pads batches of ``batch_size``, runs one forward per batch keeping only the
last position's logits, and reads ``softmax(float32(logits))[answer ids]``. Position ids are
computed from the attention mask, so a prompt gets the same result alone or padded in a batch
(tested to 1e-5 in float32). ``generate`` is batched ``model.generate``: greedy at temperature
0, plain temperature sampling (no top-k/top-p/repetition penalty, whatever the model's
generation config says) from a seeded generator otherwise.

``answer_distribution_ids`` takes prompts already tokenized and cut into a shared ``prefix`` and
a per-prompt ``suffix`` (:class:`~nlrw.backends.base.SplitPrompt`), with one of three engines:

* ``"single"``: one forward per prompt on ``prefix + suffix`` (the reference);
* ``"padded"``: left-padded batches of whole prompts, as ``answer_distribution`` (no sharing);
* ``"shared-prefix"`` (default): prompts are grouped by prefix (groups in order of first
  appearance; results in input order). Each distinct prefix runs **once** with a
  :class:`transformers.DynamicCache`; its per-layer keys/values ``K_l, V_l`` ``[1, h, P, d]``
  (``cache.layers[l].keys/.values``) are broadcast (``expand``, a view) to the suffix batch
  and written with ``cache.update(K, V, l)`` into a fresh cache per batch (the forward appends
  to the cache, so it cannot be reused; the cache's ``torch.cat`` materializes the
  ``[B, h, P, d]`` copy a batched attention needs anyway, a few ms next to the forward). The
  suffixes of a batch are **right**-padded to the longest; row ``r`` gets
  ``position_ids = P + [0, 1, ...]`` and the mask ``[1]*P + [1]*len_r + [0]*pad``, so every
  real token attends to exactly the prefix and its own earlier tokens (pads come after it).
  The model body runs without its head; the head is applied to the hidden state at each
  row's last real token only, i.e.
  ``p[r] = softmax(float32(W_out · h[r, len_r - 1]))[answer ids]``: the vocabulary logits of
  the other positions (151k per token for Qwen) are never computed. Per prompt this costs
  ``len(suffix) + P / n_group`` tokens instead of ``P + len(suffix)``. A 4-token check, once
  per backend, compares ``head(body(x))`` with the model's own logits; a model that
  post-processes its logits (soft-capping, scaling) gets the logits of every suffix position
  from its own forward instead (logged). The cache is passed as ``cache=`` (transformers 5)
  or ``past_key_values=`` (4.x), whichever the forward names.

  Prefixes that differ only at their end (the context-first layout: the same system message
  and few-shot exchanges, then each context's text) share more: when a call holds several
  distinct prefixes, the KV cache of their longest common prefix ``B`` is computed once and
  kept across calls, and each prefix runs only its last ``P - |B|`` tokens on top of it. A
  context's prefix then costs its text, not the ~300 tokens of instructions.

  Batch size: ``engine_batch_size`` suffixes per forward (within a group, longest first). On
  CPU it is capped so that the batch's KV cache, activations and attention weights take at
  most half of ``MemAvailable`` (``/proc/meminfo``; see :meth:`TransformersBackend._cpu_rows_cap`);
  on CUDA an out-of-memory error halves it and retries the batch (the halved size is kept
  for later calls). Models whose cache has sliding-window layers (Mistral, Gemma 2/3, Qwen2
  with ``use_sliding_window``) are run with ``"padded"`` instead (logged once): their cache
  keeps only the last window, which this engine does not model.

``slot_distribution_ids`` reads **several positions of each prompt** in its one forward (the
all-at-once simulation layout: a rating slot after every token of a window): the same three
engines, the same prefix-KV sharing and batching, but the head runs on the hidden states of
each suffix's read positions ``k`` (``p[r, k] = softmax(float32(W_out · h[r, k]))[answer
ids]``, in blocks of 256 positions, so a batch's vocabulary logits never all exist at once).
Right padding after a suffix's last token changes nothing before it, so every read position
sees exactly the prefix and its own suffix's earlier tokens (tested against one unshared
forward of the same ids to 1e-5 in float32).

Why this module is long: one engine, whose three ways of running prompts (and the one-answer
and several-slot readings) share the prefix-KV cache, the batching by memory and the head
check; split apart, each piece would need the others' private state.
"""

from __future__ import annotations

import contextlib
import fcntl
import inspect
import json
import logging
import os
import platform
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch

from nlrw.backends.base import (
    AnswerDistribution,
    Generation,
    Message,
    SplitPrompt,
    answer_token_ids,
    check_split_prompts,
    encode_prompt,
    render,
)

__all__ = ["Engine", "TransformersBackend", "resolve_backend_dtype"]

Engine = Literal["shared-prefix", "padded", "single"]
"""How :meth:`TransformersBackend.answer_distribution_ids` runs prompts (module docstring)."""
_ENGINES: tuple[str, ...] = get_args(Engine)
_HEAD_ROWS = 256
"""Read positions per block when the head runs at several positions of each suffix."""

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _cpu_has_bf16() -> bool:
    """Whether the CPU computes bfloat16 natively (AVX512-BF16 or AMX), so bf16 is faster."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _mem_available() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def resolve_backend_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``"auto"``: bfloat16 on CUDA; on a CPU, bfloat16 when it computes bf16 natively, else
    float32, a guess that :class:`TransformersBackend` replaces by a measurement
    (:func:`measure_cpu_dtype`: whichever of float32 and bfloat16 runs the model faster on the
    machine at hand, recorded in the simulate stage's output; with torch 2.15 bf16 ran at
    0.65x of float32 here, where a measurement on torch 2.13 had found 2.5x). Tests of
    equivalence ask for ``"float32"``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda" or (device.type == "cpu" and _cpu_has_bf16()):
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: expected 'auto' or one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def _dtype_cache() -> Path:
    """Where the measured CPU dtype choices are kept (one per model, torch and CPU)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "nlrw" / "cpu_dtype.json"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_dtype(model: Any, name: str) -> dict[str, Any]:
    """The dtype ``auto`` gives ``model`` on this CPU: measured once (:func:`measure_cpu_dtype`)
    per (model, torch version, CPU, threads) and then reused from ``~/.cache/nlrw``, so that
    every run and every resume of a run on one machine uses the same dtype (a measurement
    near a tie could otherwise flip between runs and change the results). The model is left
    in the chosen dtype. Returns the measurement, with ``"cached": true`` when reused."""
    key = f"{name}|torch {torch.__version__}|{_cpu_name()}|{torch.get_num_threads()} threads"
    path = _dtype_cache()
    # Read, measure and write under one lock: two processes starting together would
    # otherwise both measure (and may choose differently near a tie), and the second write
    # would drop the first's entry.
    with _dtype_cache_lock(path):
        try:
            known = json.loads(path.read_text())
        except (OSError, ValueError):
            known = {}
        if isinstance(known, dict) and isinstance(known.get(key), dict):
            entry = known[key]
            if entry.get("chosen") in ("float32", "bfloat16"):
                model.to(_DTYPES[entry["chosen"]])
                return {**entry, "cached": True}
        measured = measure_cpu_dtype(model)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
            known = known if isinstance(known, dict) else {}
            tmp.write_text(json.dumps({**known, key: measured}))
            os.replace(tmp, path)
        except OSError:  # a read-only home: measured again next time
            pass
    return {**measured, "cached": False}


@contextlib.contextmanager
def _dtype_cache_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path``'s lock file (blocking: the holder measures
    for a few seconds at most); without a writable cache folder, no lock."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def measure_cpu_dtype(model: Any, *, tokens: int = 64, rows: int = 4) -> dict[str, Any]:
    """Time one forward of ``rows × tokens`` random ids in float32 and in bfloat16 (median of
    two after a warm-up each) and pick the faster; the model is left in the chosen dtype.
    Returns ``{"chosen": name, "float32_s": t, "bfloat16_s": t}`` for the stage's record."""
    vocab = int(getattr(model.config, "vocab_size", 1000))
    ids = torch.randint(0, vocab, (rows, tokens), generator=torch.Generator().manual_seed(0))
    seconds: dict[str, float] = {}
    with torch.inference_mode():
        for name in ("float32", "bfloat16"):
            model.to(_DTYPES[name])
            model(input_ids=ids, use_cache=False)  # warm-up: kernels, allocator
            times = []
            for _ in range(2):
                started = time.perf_counter()
                model(input_ids=ids, use_cache=False)
                times.append(time.perf_counter() - started)
            seconds[name] = float(np.median(times))
    chosen = min(seconds, key=lambda n: seconds[n])
    model.to(_DTYPES[chosen])
    return {"chosen": chosen, **{f"{n}_s": round(t, 4) for n, t in seconds.items()}}


class TransformersBackend:
    """A Hugging Face causal LM behind the :class:`~nlrw.backends.base.Backend` interface.

    Args:
        model: a name or path for ``from_pretrained``, or an alias of
            :func:`nlrw.assets.resolve_model` (``"qwen2.5-coder-0.5b"``).
        dtype: ``"auto"`` (see :func:`resolve_backend_dtype`), ``"float32"``, ``"bfloat16"``,
            ``"float16"`` or a ``torch.dtype``.
        device: ``"auto"`` (CUDA if available), or any torch device.
        batch_size: prompts per forward (answer_distribution) or per ``generate`` call.
        max_length: longest prompt accepted, in tokens (default: the model's context length);
            longer prompts raise instead of being silently truncated.
        tokenizer: a tokenizer name/path when the model folder has none; or a loaded one.
        model_obj: an already loaded model (tests), used instead of loading ``model``.
        engine: how ``answer_distribution_ids`` runs (``"shared-prefix"``, ``"padded"`` or
            ``"single"``; module docstring); a call may override it.
        engine_batch_size: prompts (suffixes, for ``"shared-prefix"``) per forward in
            ``answer_distribution_ids``, before the memory caps; a call may override it.
    """

    name = "transformers"

    def __init__(
        self,
        model: str,
        *,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "auto",
        batch_size: int = 8,
        max_length: int | None = None,
        tokenizer: Any = None,
        model_obj: Any = None,
        engine: Engine = "shared-prefix",
        engine_batch_size: int = 16,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from nlrw.assets import resolve_model

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if engine_batch_size < 1:
            raise ValueError(f"engine_batch_size must be >= 1, got {engine_batch_size}")
        self.model = model
        self.batch_size = batch_size
        self.engine: Engine = _check_engine(engine)
        self.engine_batch_size = engine_batch_size
        self._cuda_rows_cap: int | None = None  # lowered by out-of-memory errors
        self._head_ok: bool | None = None  # head(body(x)) == the model's own logits?
        self._warned: set[str] = set()
        # The KV cache of the longest prefix common to a call's distinct prefixes (module
        # docstring): prefixes that extend it are computed from it, across calls.
        self._base: tuple[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.dtype = resolve_backend_dtype(dtype, self.device)
        # On a CPU the faster dtype depends on the CPU and the torch build: load in float32
        # and time both.
        measure = dtype == "auto" and self.device.type == "cpu"
        if measure:
            self.dtype = torch.float32
        self.dtype_measurement: dict[str, Any] | None = None
        path = resolve_model(model) if model_obj is None else model
        if tokenizer is None or isinstance(tokenizer, str):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer or path)
        self.tokenizer: Any = tokenizer
        if model_obj is None:
            model_obj = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype)
        else:
            model_obj = model_obj.to(self.dtype)
        self.lm: Any = model_obj.to(self.device).eval()
        if measure:
            self.dtype_measurement = cpu_dtype(self.lm, str(path))
            self.dtype = _DTYPES[self.dtype_measurement["chosen"]]
        cfg = self.lm.config
        self.max_length = max_length or int(getattr(cfg, "max_position_embeddings", 1 << 30))
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.pad_id = int(pad)
        eos: set[int] = set()
        for source in (getattr(self.lm, "generation_config", None), cfg, tokenizer):
            e = getattr(source, "eos_token_id", None)
            if e is not None:
                eos.update([e] if isinstance(e, int) else e)
        self.eos_ids = sorted(eos)
        log.info("transformers backend: %s (%s) on %s in %s", model, path, self.device, self.dtype)

    # ----------------------------------------------------------------------------------------

    def _encode(self, chats: Sequence[Sequence[Message]], prefix: str | None) -> list[list[int]]:
        encoded = [
            encode_prompt(self.tokenizer, render(self.tokenizer, c, answer_prefix=prefix))
            for c in chats
        ]
        too_long = [(i, len(e)) for i, e in enumerate(encoded) if len(e) > self.max_length]
        if too_long:
            raise ValueError(
                f"prompts longer than max_length={self.max_length} tokens (index, length): "
                f"{too_long[:10]}"
            )
        return encoded

    def _batches(self, encoded: list[list[int]], size: int | None = None) -> list[list[int]]:
        """Prompt indices grouped into batches of similar length (longest first)."""
        size = size or self.batch_size
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        return [order[i : i + size] for i in range(0, len(order), size)]

    def _pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ``input_ids`` and ``attention_mask``."""
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            if s:
                ids[r, width - len(s) :] = torch.tensor(s, dtype=torch.long)
                mask[r, width - len(s) :] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def answer_distribution(
        self, chats: Sequence[Sequence[Message]], answer_prefix: str, answers: Sequence[str]
    ) -> AnswerDistribution:
        """``p[i, j] = softmax(logits of prompt i's last position)[answer j]`` in float32.

        Answer tokens: :func:`~nlrw.backends.base.answer_token_ids` with the prefix.
        """
        targets = answer_token_ids(self.tokenizer, answers, prefix=answer_prefix)
        encoded = self._encode(chats, answer_prefix)
        probs = self._padded_probs(encoded, self._answer_index(targets), self.batch_size)
        return AnswerDistribution(probs, probs.sum(1))

    def _answer_index(self, answer_ids: Sequence[int]) -> torch.Tensor:
        vocab = int(self.lm.get_output_embeddings().weight.shape[0])
        bad = [int(a) for a in answer_ids if not 0 <= int(a) < vocab]
        if bad:
            raise ValueError(
                f"answer ids {bad} are outside the model's vocabulary (0..{vocab - 1})"
            )
        return torch.tensor([int(a) for a in answer_ids], dtype=torch.long, device=self.device)

    def _padded_probs(
        self, encoded: list[list[int]], index: torch.Tensor, batch_size: int
    ) -> np.ndarray:
        """Left-padded batches, one forward each, logits of the last position only."""
        probs = np.zeros((len(encoded), len(index)), dtype=np.float64)
        for batch in self._batches(encoded, batch_size):
            ids, mask = self._pad([encoded[i] for i in batch])
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            out = self.lm(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=False,
                logits_to_keep=1,
            )
            p = torch.softmax(out.logits[:, -1].float(), dim=-1)[:, index]
            probs[batch] = p.double().cpu().numpy()
        return probs

    # ----------------------------------------------------------------------------------------
    # answer_distribution_ids: the simulation engines

    @torch.inference_mode()
    def answer_distribution_ids(
        self,
        prompts: Sequence[SplitPrompt],
        answer_ids: Sequence[int],
        *,
        engine: Engine | None = None,
        batch_size: int | None = None,
    ) -> AnswerDistribution:
        """``p[i, j] = softmax(float32 logits after prefix+suffix of prompt i)[answer_ids[j]]``.

        Not renormalized; rows in the order of ``prompts``. ``engine`` and ``batch_size``
        override the constructor's ``engine`` and ``engine_batch_size`` for this call; all
        engines agree up to float rounding (module docstring).

        Raises:
            ValueError: an unknown engine, no or repeated answer ids, ids outside the
                vocabulary, an empty suffix or a prompt longer than ``max_length``.
        """
        engine = _check_engine(engine or self.engine)
        size = self.engine_batch_size if batch_size is None else batch_size
        if size < 1:
            raise ValueError(f"batch_size must be >= 1, got {size}")
        check_split_prompts(prompts, answer_ids, max_length=self.max_length)
        index = self._answer_index(answer_ids)
        if not prompts:
            return AnswerDistribution(np.zeros((0, len(index))), np.zeros(0))
        if engine == "single":
            probs = self._single_probs(prompts, index)
        elif engine == "padded":
            probs = self._padded_probs([[*p.prefix, *p.suffix] for p in prompts], index, size)
        else:
            probs = self._shared_prefix_probs(prompts, index, size)
        return AnswerDistribution(probs, probs.sum(1))

    @torch.inference_mode()
    def slot_distribution_ids(
        self,
        prompts: Sequence[SplitPrompt],
        slots: Sequence[Sequence[int]],
        answer_ids: Sequence[int],
        *,
        engine: Engine | None = None,
        batch_size: int | None = None,
    ) -> list[AnswerDistribution]:
        """The answers' probabilities at several positions of each prompt, one forward per
        prompt: ``out[i].probs[k, j] = softmax(float32 logits after suffix token
        slots[i][k] of prompt i)[answer_ids[j]]`` (the all-at-once simulation layout reads
        the digits at every rating slot of a window this way; ``slots`` come from
        :func:`nlrw.backends.base.locate_slots`). Not renormalized.

        Engines as :meth:`answer_distribution_ids`: ``"shared-prefix"`` runs each distinct
        prefix once and batches of suffixes on its KV cache, the head applied at the read
        positions only; ``"padded"`` batches of whole prompts (right-padded, no sharing);
        ``"single"`` one forward per whole prompt (the reference). A suffix's last token
        need not be read, but nothing after its last read position matters.

        Raises:
            ValueError: as :meth:`answer_distribution_ids`, a ``slots`` list not of the
                prompts' length, or a prompt with no slot or a slot outside its suffix.
        """
        engine = _check_engine(engine or self.engine)
        size = self.engine_batch_size if batch_size is None else batch_size
        if size < 1:
            raise ValueError(f"batch_size must be >= 1, got {size}")
        check_split_prompts(prompts, answer_ids, max_length=self.max_length)
        if len(slots) != len(prompts):
            raise ValueError(f"{len(slots)} slot lists for {len(prompts)} prompts")
        bad = [
            i
            for i, (p, at) in enumerate(zip(prompts, slots, strict=True))
            if not len(at) or any(not 0 <= int(k) < len(p.suffix) for k in at)
        ]
        if bad:
            raise ValueError(
                f"prompts {bad[:10]} have no slot or a slot outside their suffix: slots are "
                "suffix token indices"
            )
        index = self._answer_index(answer_ids)
        reads = [[int(k) for k in at] for at in slots]
        if engine == "shared-prefix":
            flat = self._shared_prefix_probs(prompts, index, size, reads)
            first = np.cumsum([0, *(len(r) for r in reads)])
            out = [flat[first[i] : first[i + 1]] for i in range(len(prompts))]
        else:
            whole = [SplitPrompt((), (*p.prefix, *p.suffix)) for p in prompts]
            shifted = [
                [len(p.prefix) + k for k in at] for p, at in zip(prompts, reads, strict=True)
            ]
            out = self._padded_slot_probs(whole, shifted, index, 1 if engine == "single" else size)
        return [AnswerDistribution(p, p.sum(1)) for p in out]

    def _padded_slot_probs(
        self,
        prompts: Sequence[SplitPrompt],
        reads: Sequence[Sequence[int]],
        index: torch.Tensor,
        batch_size: int,
    ) -> list[np.ndarray]:
        """Whole prompts (empty prefixes) in batches of similar length, right-padded, no cache:
        the answers' probabilities at each prompt's read positions."""
        out: list[np.ndarray] = [np.zeros((0, len(index)))] * len(prompts)
        encoded = [list(p.suffix) for p in prompts]
        for batch in self._batches(encoded, batch_size):
            p = self._suffix_probs(
                [], 0, [prompts[i].suffix for i in batch], [reads[i] for i in batch], index
            )
            got = p.double().cpu().numpy()
            start = 0
            for i in batch:
                out[i] = got[start : start + len(reads[i])]
                start += len(reads[i])
        return out

    def _single_probs(self, prompts: Sequence[SplitPrompt], index: torch.Tensor) -> np.ndarray:
        probs = np.zeros((len(prompts), len(index)), dtype=np.float64)
        for i, p in enumerate(prompts):
            ids = torch.tensor([[*p.prefix, *p.suffix]], dtype=torch.long, device=self.device)
            out = self.lm(input_ids=ids, use_cache=False, logits_to_keep=1)
            probs[i] = torch.softmax(out.logits[0, -1].float(), -1)[index].double().cpu().numpy()
        return probs

    def _shared_prefix_probs(
        self,
        prompts: Sequence[SplitPrompt],
        index: torch.Tensor,
        batch_size: int,
        reads: Sequence[Sequence[int]] | None = None,
    ) -> np.ndarray:
        """Rows of answer probabilities: one per prompt, after its last token; with ``reads``,
        one per read position of each prompt (suffix indices), prompt by prompt."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(tuple(p.prefix), []).append(i)
        if len(groups) > 1:
            self._remember_base(_common_prefix(list(groups)))
        first = np.cumsum([0, *(len(r) for r in reads)]) if reads is not None else None
        n_rows = len(prompts) if first is None else int(first[-1])
        probs = np.zeros((n_rows, len(index)), dtype=np.float64)
        for prefix, rows in groups.items():
            kv = self._prefix_kv(prefix)
            if kv is None:  # sliding-window cache: no sharing (logged once)
                if reads is None or first is None:
                    encoded = [[*prefix, *prompts[i].suffix] for i in rows]
                    probs[rows] = self._padded_probs(encoded, index, batch_size)
                else:
                    whole = [SplitPrompt((), (*prefix, *prompts[i].suffix)) for i in rows]
                    shifted = [[len(prefix) + k for k in reads[i]] for i in rows]
                    out = self._padded_slot_probs(whole, shifted, index, batch_size)
                    for i, got in zip(rows, out, strict=True):
                        probs[first[i] : first[i + 1]] = got
                continue
            rows = sorted(rows, key=lambda i: -len(prompts[i].suffix))  # less padding
            start = 0
            while start < len(rows):
                width = len(prompts[rows[start]].suffix)  # the longest left (sorted)
                size = min(batch_size, self._rows_cap(len(prefix), width))
                batch = rows[start : start + size]
                try:
                    suffixes = [prompts[i].suffix for i in batch]
                    if reads is None:
                        p = self._suffix_probs(kv, len(prefix), suffixes)[:, index]
                    else:
                        at = [reads[i] for i in batch]
                        p = self._suffix_probs(kv, len(prefix), suffixes, at, index)
                except torch.cuda.OutOfMemoryError:
                    if len(batch) == 1:
                        raise
                    self._cuda_rows_cap = max(1, len(batch) // 2)
                    log.warning(
                        "CUDA out of memory with %d suffixes per batch: retrying with %d",
                        len(batch),
                        self._cuda_rows_cap,
                    )
                    torch.cuda.empty_cache()
                    continue
                if first is None:
                    probs[batch] = p.double().cpu().numpy()
                else:
                    out_rows = np.concatenate([np.arange(first[i], first[i + 1]) for i in batch])
                    probs[out_rows] = p.double().cpu().numpy()
                start += len(batch)
        return probs

    def _rows_cap(self, prefix_len: int, suffix_len: int) -> int:
        if self.device.type == "cuda":
            return self._cuda_rows_cap or (1 << 30)
        if self.device.type == "cpu":
            return self._cpu_rows_cap(prefix_len, suffix_len)
        return 1 << 30

    def _cpu_rows_cap(self, prefix_len: int, suffix_len: int) -> int:
        """Suffix rows whose forward fits in half of ``MemAvailable``.

        Bytes per row, an upper estimate: the batch's cache ``2 · layers · kv_heads · head_dim
        · (P + S)`` elements, counted twice (the filled cache and the forward's concatenated
        copy), one layer's activations ``S · (8 · hidden + 3 · intermediate)`` elements and
        its float32 attention weights ``heads · S · (P + S)``.
        """
        avail = _mem_available()
        if avail is None:
            return 1 << 30
        cfg = self.lm.config
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        heads = int(getattr(cfg, "num_attention_heads", 1))
        hidden = int(getattr(cfg, "hidden_size", 1024))
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
        layers = int(getattr(cfg, "num_hidden_layers", 1))
        inter = int(getattr(cfg, "intermediate_size", None) or 4 * hidden)
        elem = torch.finfo(self.dtype).bits // 8
        total = prefix_len + suffix_len
        per_row = (
            2 * (2 * layers * kv_heads * head_dim * total) * elem
            + suffix_len * (8 * hidden + 3 * inter) * elem
            + heads * suffix_len * total * 4
        )
        return max(1, int(avail // 2 // per_row))

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.lm.config)
        except TypeError:  # older transformers: layers are created on first update
            return DynamicCache()

    def _body(self, ids: torch.Tensor, *, cache: Any = None, **kw: Any) -> torch.Tensor:
        """The model without its head: last hidden states ``[B, T, hidden]``."""
        body = self.lm.base_model
        name = _cache_kwarg(body)
        out = body(input_ids=ids, use_cache=cache is not None, **{name: cache}, **kw)
        return out.last_hidden_state

    def _remember_base(self, base: tuple[int, ...]) -> None:
        """Keep the KV cache of ``base``, the longest prefix common to a call's distinct
        prefixes, unless it is already kept or too short to be worth it (under 16 tokens):
        with the context-first layout every context's prefix is the same system message and
        few-shot exchanges followed by its own text, so each context then runs only its
        text instead of the whole prefix."""
        if len(base) < 16 or (self._base is not None and self._base[0] == base):
            return
        self._base = None
        kv = self._prefix_kv(base)
        if kv:
            self._base = (base, kv)

    def _prefix_kv(self, prefix: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Per-layer keys/values ``[1, kv_heads, P, head_dim]`` of ``prefix`` ([] if empty);
        None for a sliding-window cache (the caller falls back to whole prompts).

        When the kept base prefix (:meth:`_remember_base`) starts ``prefix``, only the rest
        runs, on top of the base's keys and values: causal attention makes the result the
        same up to float rounding."""
        if not prefix:
            return []
        cache = self._new_cache()
        start = 0
        if self._base is not None:
            base, kv = self._base
            if len(base) < len(prefix) and prefix[: len(base)] == base:
                for layer, (k, v) in enumerate(kv):
                    cache.update(k, v, layer)
                start = len(base)
        ids = torch.tensor([prefix[start:]], dtype=torch.long, device=self.device)
        self._body(ids, cache=cache)
        layers = getattr(cache, "layers", None)
        if layers is None:  # transformers < 4.56
            return list(zip(cache.key_cache, cache.value_cache, strict=True))
        if any(getattr(layer, "is_sliding", False) for layer in layers):
            if "sliding" not in self._warned:
                self._warned.add("sliding")
                log.warning(
                    "%s has sliding-window attention layers: the shared-prefix engine runs "
                    "whole prompts ('padded') instead",
                    self.model,
                )
            return None
        return [(layer.keys, layer.values) for layer in layers]

    def _suffix_probs(
        self,
        kv: list[tuple[torch.Tensor, torch.Tensor]],
        prefix_len: int,
        suffixes: list[tuple[int, ...]],
        reads: Sequence[Sequence[int]] | None = None,
        index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """float32 next-token probabilities ``[B, vocab]`` after each suffix, the prefix's
        ``kv`` shared by the batch (module docstring). With ``reads`` (suffix indices per row)
        and ``index`` (answer ids): ``[Σ len(reads[r]), len(index)]``, the answers' probabilities
        after each read position, row by row (the head runs on those positions only, in
        blocks of :data:`_HEAD_ROWS`, so a batch's vocabulary logits never all exist at once)."""
        n = len(suffixes)
        lengths = torch.tensor([len(s) for s in suffixes], device=self.device)
        width = int(lengths.max())
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        for r, s in enumerate(suffixes):
            ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
        ids = ids.to(self.device)
        steps = torch.arange(width, device=self.device)
        suffix_mask = (steps[None, :] < lengths[:, None]).long()
        mask = torch.cat(
            [torch.ones((n, prefix_len), dtype=torch.long, device=self.device), suffix_mask], 1
        )
        positions = (prefix_len + steps).expand(n, width)
        cache = None
        if kv:
            cache = self._new_cache()
            for layer, (k, v) in enumerate(kv):
                cache.update(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1), layer)
        if reads is None:
            rows, cols = torch.arange(n, device=self.device), lengths - 1
        else:
            rows = torch.tensor(
                [r for r, at in enumerate(reads) for _ in at], dtype=torch.long, device=self.device
            )
            cols = torch.tensor(
                [k for at in reads for k in at], dtype=torch.long, device=self.device
            )
        if not self._head_applies():
            out = self.lm(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=cache is not None,
                **{_cache_kwarg(self.lm.base_model): cache},
            )
            logits = out.logits[rows, cols]
            if reads is None or index is None:
                return torch.softmax(logits.float(), -1)
            return torch.softmax(logits.float(), -1)[:, index]
        hidden = self._body(ids, cache=cache, attention_mask=mask, position_ids=positions)
        picked = hidden[rows, cols]
        head = self.lm.get_output_embeddings()
        if reads is None or index is None:
            return torch.softmax(head(picked).float(), -1)
        return torch.cat(
            [
                torch.softmax(head(picked[b : b + _HEAD_ROWS]).float(), -1)[:, index]
                for b in range(0, len(picked), _HEAD_ROWS)
            ]
        )

    def _head_applies(self) -> bool:
        """Whether ``output_embeddings(body(x))`` gives the model's logits (checked once on a
        4-token input): false for models that scale or soft-cap logits after the head, where
        the engine computes full logits of every suffix position instead (logged)."""
        if self._head_ok is None:
            ids = torch.arange(4, device=self.device)[None]
            ref = self.lm(input_ids=ids, use_cache=False, logits_to_keep=1).logits[0, -1]
            got = self.lm.get_output_embeddings()(self._body(ids)[0, -1])
            self._head_ok = bool(torch.allclose(got.float(), ref.float(), rtol=1e-3, atol=1e-3))
            if not self._head_ok:
                log.warning(
                    "%s post-processes its logits after the output layer: the shared-prefix "
                    "engine computes the logits of every suffix position (slower)",
                    self.model,
                )
        return self._head_ok

    @torch.inference_mode()
    def generate(
        self,
        chats: Sequence[Sequence[Message]],
        *,
        max_new_tokens: int = 200,
        temperature: float = 0.0,
        seed: int = 0,
    ) -> list[Generation]:
        """Batched greedy (temperature 0) or seeded sampling; the prompt stripped, cut at EOS."""
        from transformers import GenerationConfig

        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        encoded = self._encode(chats, None)
        sample = temperature > 0
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_k=None,
            top_p=None,
            eos_token_id=self.eos_ids or None,
            pad_token_id=self.pad_id,
        )
        results: list[Generation | None] = [None] * len(encoded)
        eos = set(self.eos_ids)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for batch in self._batches(encoded):
                ids, mask = self._pad([encoded[i] for i in batch])
                out = self.lm.generate(input_ids=ids, attention_mask=mask, generation_config=config)
                new = out[:, ids.shape[1] :].tolist()
                for r, i in enumerate(batch):
                    tokens = new[r]
                    stop = next((k for k, t in enumerate(tokens) if t in eos), None)
                    kept = tokens if stop is None else tokens[:stop]
                    text = self.tokenizer.decode(kept, skip_special_tokens=True)
                    results[i] = Generation(
                        text=text,
                        prompt_tokens=len(encoded[i]),
                        completion_tokens=len(tokens) if stop is None else stop + 1,
                        finish_reason="length" if stop is None else "stop",
                    )
        return [g for g in results if g is not None]

    def close(self) -> None:
        """Drop the model (frees GPU memory once nothing else holds it)."""
        self.lm = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _common_prefix(seqs: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
    """The longest common prefix of token sequences."""
    first, last = min(seqs), max(seqs)  # the lexicographic extremes bound every other pair
    n = 0
    for a, b in zip(first, last, strict=False):
        if a != b:
            break
        n += 1
    return first[:n]


def _check_engine(engine: str) -> Engine:
    if engine not in _ENGINES:
        raise ValueError(f"unknown engine {engine!r}: expected one of {list(_ENGINES)}")
    return engine  # pyright: ignore[reportReturnType]


def _cache_kwarg(module: Any) -> str:
    """The forward's name for the KV cache: ``cache`` (transformers >= 5.2x) or
    ``past_key_values`` (older)."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
