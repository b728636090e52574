"""Options of the cache stage (:mod:`nlrw.cache`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["CacheConfig"]


@dataclass(frozen=True)
class CacheConfig:
    """Options of the ``cache`` stage."""

    source: Literal["eval", "train"] = "eval"
    """Activation split to cache: ``eval`` (held out from transcoder training, nlrw's default)
    or ``train`` (the paper's: explanations from the training distribution)."""
    batch_rows: int = 4096
    """Rows encoded per batch."""
    chunk_rows: int = 65_536
    """Rows per part file (rounded down to whole sequences, at least one): the most a kill
    loses, and the unit of bounded memory."""
    window_len: int = 32
    """Tokens per explanation window (the paper's 32); must not exceed the context length."""
    max_examples: int = 10_000
    """Top activating windows kept per latent (the paper: up to 10,000)."""
    num_quantiles: int = 101
    """Entries of each latent's quantile table of active values (the calibration's
    reference; its zeros are counted in reference_frequency)."""
    reference_min_position: int | None = None
    """The reference distribution (frequency, active quantiles, max) is taken over positions
    of a collected sequence at or after this one; unset: window_len - 1, tokens with a
    window's worth of context like the evaluated last tokens."""
    exact_quantiles: bool | None = None
    """Exact quantile tables (true), a streamed sketch (false), or exact when the cache holds
    rows × k <= EXACT_QUANTILES_MAX_ENTRIES, read back into memory once (unset)."""
    sketch_alpha: float = 0.01
    """Relative accuracy of the quantile sketch when it is used."""
    seed: int = 0
    """Seed recorded for later draws (random non-activating windows use their own seed)."""
    progress: bool = True
    """Show a progress bar (rows/s)."""

    def __post_init__(self) -> None:
        if self.source not in ("eval", "train"):
            raise ValueError(f"source must be 'eval' or 'train', got {self.source!r}")
        for name in ("batch_rows", "chunk_rows", "window_len", "max_examples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.num_quantiles, bool) or not isinstance(self.num_quantiles, int):
            raise ValueError(f"num_quantiles must be an integer, got {self.num_quantiles!r}")
        if self.num_quantiles < 2:
            raise ValueError(f"num_quantiles must be at least 2, got {self.num_quantiles}")
        m = self.reference_min_position
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 0):
            raise ValueError(f"reference_min_position must be an integer >= 0, got {m!r}")
        if not 1e-4 <= self.sketch_alpha <= 0.5:
            raise ValueError(f"sketch_alpha must be in [1e-4, 0.5], got {self.sketch_alpha}")
