"""Options of the recovery stage (:mod:`nlrw.recovery`)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RecoveryConfig"]


@dataclass(frozen=True)
class RecoveryConfig:
    """How the transcoder's loss recovered is measured on held-out text."""

    n_windows: int = 32
    """Held-out windows evaluated (each ctx_len tokens long, taken in order)."""
    batch_size: int = 8
    """Windows per forward pass."""
