"""Options of the score stage (:mod:`nlrw.score`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = ["ScoreConfig", "examples_for_se"]


def examples_for_se(target_se: float) -> int:
    """Examples per class that bound the standard error of balanced accuracy by ``target_se``
    whatever the rates: ``SE = ½·sqrt(TPR(1−TPR)/n_pos + TNR(1−TNR)/n_neg)`` is largest at
    rates of 0.5, where with ``n`` examples per class it is ``½·sqrt(0.5/n)``, so
    ``n = ceil(1 / (8·target_se²))`` (0.05 → 50, 0.1 → 13, 0.03 → 139)."""
    if not (math.isfinite(target_se) and target_se > 0):
        raise ValueError(f"score.target_se must be a positive number, got {target_se}")
    return max(1, math.ceil(1.0 / (8.0 * target_se * target_se) - 1e-9))


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
    """Activating examples drawn per bin (paper: 10, 100 in all); the explainer's are excluded.
    Replaced by the sizing when target_se is set."""

    n_non_activating: int = 100
    """Random windows where the latent never fires (paper: 100). Replaced by the sizing when
    target_se is set."""

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

    target_se: float | None = None
    """Size the examples for this standard error of each latent's balanced accuracy (None: use
    examples_per_bin and n_non_activating as given). When set it replaces both: n =
    ceil(1 / (8 target_se^2)) non-activating examples (the worst case, rates of 0.5, has SE =
    0.5 sqrt(0.5 / n); 0.05 -> 50) and ceil(n / n_bins) per bin, a latent's activating examples
    topped up from its other bins when a bin runs short. The cost is linear in the examples
    (2 x (activating + non-activating) texts per latent with the shuffled baseline)."""

    part_size: int = 8
    """Latents per part (a kill loses at most one part)."""

    backend_options: tuple[tuple[str, str], ...] = ()
    """Extra keyword options for the backend's constructor, as (name, value) pairs."""

    def __post_init__(self) -> None:
        if self.target_se is not None:
            if isinstance(self.target_se, bool) or not (
                isinstance(self.target_se, int | float)
                and math.isfinite(self.target_se)
                and self.target_se > 0
            ):
                raise ValueError(
                    f"score.target_se must be a positive number (a standard error of balanced "
                    f"accuracy, e.g. 0.05) or None, got {self.target_se!r}"
                )
            n = examples_for_se(float(self.target_se))
            # The sizing is folded into the two counts, so that everything reading them (the
            # stage, the pipeline's plan, the config hash) sees the examples that are drawn.
            object.__setattr__(self, "examples_per_bin", -(-n // max(self.n_bins, 1)))
            object.__setattr__(self, "n_non_activating", n)
        for name in ("n_bins", "examples_per_prompt", "part_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.examples_per_bin < 0 or self.n_non_activating < 0:
            raise ValueError("examples_per_bin and n_non_activating must be non-negative")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
