"""Options of the explain stage (:mod:`nlrw.explain`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from nlrw.prompts.explain import STYLES, Style

__all__ = ["ExplainConfig", "Method", "Selection"]


Selection = Literal["frequent", "random"]

Method = Literal["default", "contrastive"]


@dataclass(frozen=True)
class ExplainConfig:
    """Options of the ``explain`` stage (defaults: the paper's protocol, our explainer)."""

    backend: Literal["transformers", "openai", "vllm"] = "transformers"
    """LLM backend of the explainer (see nlrw.backends)."""

    model: str = "qwen2.5-coder-0.5b"
    """Explainer model: an alias of the embedded default, a hub name, a local folder, or the
    served model's name for the openai backend."""

    n_bins: int = 10
    """Equal-count bins over the latent's top windows ranked by max activation."""

    examples_per_bin: int = 4
    """Examples drawn from each bin and shown to the explainer (paper: 4, 40 in all)."""

    min_count: int = 200
    """Latents with fewer active positions are skipped (the reason is recorded)."""

    max_latents: int | None = None
    """Explain at most this many eligible latents (None: all of them)."""

    selection: Selection = "frequent"
    """Which latents come first: "frequent" (most active positions first, ties by id) or
    "random" (a permutation drawn from seed)."""

    method: Method = "default"
    """"default": the explainer sees the latent's activating examples; "contrastive": also
    near-miss windows where the latent fires nowhere (windows with the same top tokens, and
    windows the latents with the most similar decoder directions fire on), and is asked what
    sets the two apart. A latent without near misses falls back to "default" (recorded)."""

    prompt: Style = "nlrw"
    """Explainer prompt: nlrw (three demonstrations; quote a word only when most examples mark
    it) or single-word (a fourth demonstration in which every example marks one common word,
    answered ``The word "return"``, and the instruction to answer ``The word "WORD"`` when most
    examples mark one word: for token-like latents, see nlrw.prompts.explain)."""

    max_near_misses: int = 16
    """Contrastive: at most this many near-miss windows per latent (no more than its
    activating examples), half with the same top tokens, half from similar latents."""

    n_similar_latents: int = 8
    """Contrastive: the latents with the most similar decoder directions (cosine) whose top
    windows may be shown as near misses."""

    highlight_threshold: float = 0.2
    """A token is highlighted when its activation exceeds this fraction of its example's max."""

    clip_digits: bool = True
    """Clip the activation digits floor(10 a / max) to 0..9 (False: the paper's code, where the
    top token gets 10)."""

    temperature: float = 0.7
    """Sampling temperature of the explainer (paper: 0.7; 0: greedy)."""

    max_new_tokens: int = 200
    """Most tokens the explainer may write per reply."""

    seed: int = 0
    """Seed of example sampling, latent order ("random") and generation (retry r uses seed + r)."""

    retries: int = 3
    """Extra attempts for an empty or malformed reply before the latent is recorded as failed."""

    part_size: int = 8
    """Latents per part (one batched generate call; a kill loses at most one part)."""

    backend_options: tuple[tuple[str, str], ...] = ()
    """Extra keyword options for the backend's constructor, as (name, value) pairs."""

    def __post_init__(self) -> None:
        for name in (
            "n_bins",
            "examples_per_bin",
            "part_size",
            "max_new_tokens",
            "max_near_misses",
            "n_similar_latents",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.min_count < 0 or self.retries < 0:
            raise ValueError("min_count and retries must be non-negative")
        if self.max_latents is not None and self.max_latents < 0:
            raise ValueError(f"max_latents must be non-negative, got {self.max_latents}")
        if self.prompt not in STYLES:
            raise ValueError(f"unknown explain.prompt {self.prompt!r}: expected one of {STYLES}")
        if not 0.0 <= self.highlight_threshold < 1.0:
            raise ValueError(
                f"highlight_threshold must be in [0, 1), got {self.highlight_threshold}"
            )
