"""Options of the contexts stage (:mod:`nlrw.contexts`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["ContextsConfig", "Source"]


Source = Literal["held-out", "from-cache"]


@dataclass(frozen=True)
class ContextsConfig:
    """Options of the ``contexts`` stage (defaults: the paper's sizes)."""

    n_contexts: int = 1000
    """Evaluation contexts (paper: 1,000), one per source sequence."""

    n_calibration: int = 200
    """Further contexts, from other sequences, on which the extra calibrations (isotonic,
    gate) are fitted; 0 disables them."""

    ctx_len: int = 32
    """Tokens each context holds (paper: 32); the last one is the marked token."""

    sequence_len: int = 256
    """Length of the held-out sequences a context is drawn from (paper: 256); the position
    is uniform in [ctx_len, sequence_len - 1]. Ignored for from-cache (the cache's
    sequences are used as they are)."""

    source: Source = "held-out"
    """held-out: held-out documents the cache never saw (nlrw); from-cache: the cache's own
    sequences (the paper's choice)."""

    batch_size: int = 64
    """Contexts per forward pass of the subject."""

    seed: int = 0
    """Seed of the position drawn in each sequence (uniform positions)."""

    positions: Literal["uniform", "paper"] = "uniform"
    """Where each context ends: uniform in [ctx_len, sequence_len - 1] (nlrw) or the paper's
    range 33..223 with its seed 42."""

    def __post_init__(self) -> None:
        for name, minimum in (
            ("n_contexts", 1),
            ("n_calibration", 0),
            ("ctx_len", 1),
            ("sequence_len", 2),
            ("batch_size", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"contexts.{name} must be an integer >= {minimum}, not {value!r}")
        if self.sequence_len <= self.ctx_len:
            raise ValueError(
                f"contexts.sequence_len ({self.sequence_len}) must exceed contexts.ctx_len "
                f"({self.ctx_len}): the context and its next token come from one sequence"
            )
        if self.positions not in ("uniform", "paper"):
            raise ValueError(
                f"contexts.positions must be 'uniform' or 'paper', not {self.positions!r}"
            )
        if self.source not in ("held-out", "from-cache"):
            raise ValueError(
                f"contexts.source must be 'held-out' or 'from-cache', not {self.source!r}"
            )
