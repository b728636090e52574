"""Options of the report stage (:mod:`nlrw.report`)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ReportConfig"]


@dataclass(frozen=True)
class ReportConfig:
    """Options of the ``report`` stage (what the latent browser shows, figure resolution)."""

    n_browser_latents: int = 6
    """Latents in the browser: a third each from the best, the median and the worst by
    detection balanced accuracy (all of them when fewer are scored)."""

    n_top_windows: int = 5
    """Top activating windows of the cache shown per browsed latent."""

    n_rated_contexts: int = 3
    """Eval contexts shown per browsed latent from each end: the simulator's highest-rated
    ones and the truly most active ones (0: none)."""

    context_tail: int = 16
    """Tokens shown before the marked (last) token of an eval context in the browser."""

    max_scatter_points: int = 2000
    """Points per calibration in a browsed latent's simulated-vs-true scatter (a seeded
    sample when there are more eval contexts)."""

    dpi: int = 110
    """Resolution of the PNG figures."""

    decode_tokens: bool = True
    """Decode token ids with the subject model's tokenizer (False: show the ids)."""

    seed: int = 0
    """Seed of the scatter subsampling and of the jitter in the per-latent metric plots."""

    def __post_init__(self) -> None:
        for name in ("n_browser_latents", "n_top_windows", "n_rated_contexts", "context_tail"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")
        if self.max_scatter_points < 1:
            raise ValueError(
                f"max_scatter_points must be at least 1, got {self.max_scatter_points}"
            )
        if not 20 <= self.dpi <= 600:
            raise ValueError(f"dpi must be in [20, 600], got {self.dpi}")
