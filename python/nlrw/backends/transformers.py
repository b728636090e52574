"""The default backend: a Hugging Face causal LM run in this process (CPU or GPU), batched.

``answer_distribution`` renders each chat with the answer prefix, sorts the prompts by length
(less padding), left-pads batches of ``batch_size``, runs one forward per batch keeping only the
last position's logits, and reads ``softmax(float32(logits))[answer ids]``. Position ids are
computed from the attention mask, so a prompt gets the same result alone or padded in a batch
(tested to 1e-5 in float32). ``generate`` is batched ``model.generate``: greedy at temperature
0, plain temperature sampling (no top-k/top-p/repetition penalty, whatever the model's
generation config says) from a seeded generator otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from nlrw.backends.base import (
    AnswerDistribution,
    Generation,
    Message,
    answer_token_ids,
    encode_prompt,
    render,
)

__all__ = ["TransformersBackend", "resolve_backend_dtype"]

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


def resolve_backend_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``"auto"``: bfloat16 on CUDA, and on a CPU with native bf16 (2.5x faster than float32 for
    Qwen-0.5B prompts on this project's machine, MODELS.md; digit expected values move by up to
    ~0.14), else float32. Tests of equivalence ask for ``"float32"``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda" or (device.type == "cpu" and _cpu_has_bf16()):
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: expected 'auto' or one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


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
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from nlrw.assets import resolve_model

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.batch_size = batch_size
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.dtype = resolve_backend_dtype(dtype, self.device)
        path = resolve_model(model) if model_obj is None else model
        if tokenizer is None or isinstance(tokenizer, str):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer or path)
        self.tokenizer: Any = tokenizer
        if model_obj is None:
            model_obj = AutoModelForCausalLM.from_pretrained(path, dtype=self.dtype)
        else:
            model_obj = model_obj.to(self.dtype)
        self.lm: Any = model_obj.to(self.device).eval()
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

    def _batches(self, encoded: list[list[int]]) -> list[list[int]]:
        """Prompt indices grouped into batches of similar length (longest first)."""
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]

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
        probs = np.zeros((len(encoded), len(targets)), dtype=np.float64)
        index = torch.tensor(targets, device=self.device)
        for batch in self._batches(encoded):
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
        return AnswerDistribution(probs, probs.sum(1))

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
