"""Options of the score stage (:mod:`nlrw.score`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["ScoreConfig"]


@dataclass(frozen=True)
class ScoreConfig:
    """Options of the ``score`` stage (defaults: the paper's detection scoring)."""

    backend: Literal["transformers", "openai", "vllm"] = "transformers"
    """LLM backend of the scorer (see nlrw.backends)."""

    model: str = "qwen2.5-coder-0.5b"
    """Scorer model: an alias of the embedded default, a hub name, a local folder, or the served
    model's name for the openai backend."""

    n_bins: int = 10
    """Equal-count bins over the latent's top windows ranked by max activation."""

    examples_per_bin: int = 10
    """Activating examples drawn per bin (paper: 10, 100 in all); the explainer's are excluded."""

    n_non_activating: int = 100
    """Random windows where the latent never fires (paper: 100)."""

    examples_per_prompt: int = 5
    """Examples shown together in one scorer prompt (paper: 5)."""

    threshold: float = 0.5
    """An example is predicted activating when p(yes) exceeds this (balanced accuracy)."""

    max_latents: int | None = None
    """Score at most this many explained latents, in latent order (None: all)."""

    shuffled: bool = True
    """Also score each latent's examples against another latent's explanation (chance
    baseline; doubles the cost)."""

    seed: int = 0
    """Seed of the example draws, their order in prompts, and the derangement."""

    part_size: int = 8
    """Latents per part (a kill loses at most one part)."""

    backend_options: tuple[tuple[str, str], ...] = ()
    """Extra keyword options for the backend's constructor, as (name, value) pairs."""

    def __post_init__(self) -> None:
        for name in ("n_bins", "examples_per_prompt", "part_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.examples_per_bin < 0 or self.n_non_activating < 0:
            raise ValueError("examples_per_bin and n_non_activating must be non-negative")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
