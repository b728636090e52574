"""Loss recovered: how much of the subject's behaviour survives the transcoder's splice.

On held-out windows the subject's next-token cross-entropy (nats, mean over predicted
tokens) is measured under three conditions, with the hookpoint's output at every position:

* **clean** — the subject as it is, ``CE_clean``;
* **transcoder** — replaced by the sparse coder's reconstruction
  ``W_dec·topk(relu(W_enc x + b_enc)) + b_dec + W_skip x``, ``CE_transcoder``;
* **zero ablation** — all latents zero, the skip connection and ``b_dec`` kept:
  ``b_dec + W_skip x``, ``CE_zero``;

and summarized as ``loss recovered = 1 − (CE_transcoder − CE_clean) / (CE_zero − CE_clean)``:
1 when the splice costs nothing, 0 when it is as bad as knowing no latent at all. For an SAE
the coder's input is the hookpoint's output (the residual stream) instead of its input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from nlrw.sparse import SparseCoder
from nlrw.subject import Subject, next_token_loss, splice

__all__ = ["RecoveryConfig", "RecoveryResult", "loss_recovered", "zero_ablation"]


@dataclass(frozen=True)
class RecoveryConfig:
    """How the transcoder's loss recovered is measured on held-out text."""

    n_windows: int = 32
    """Held-out windows evaluated (each ctx_len tokens long, taken in order)."""
    batch_size: int = 8
    """Windows per forward pass."""


class RecoveryResult(NamedTuple):
    """Mean next-token cross-entropy (nats) per condition, and the loss recovered."""

    ce_clean: float
    ce_transcoder: float
    ce_zero: float
    loss_recovered: float
    n_tokens: int
    """Predicted tokens each mean is over."""


def zero_ablation(coder: SparseCoder, x: Tensor) -> Tensor:
    """The coder's output with every latent zero: ``b_dec + W_skip x``."""
    out = coder.b_dec.expand(*x.shape[:-1], coder.d_out)
    skip = coder.skip(x)
    return out if skip is None else out + skip


def _rows(fn: Callable[[Tensor], Tensor], coder: SparseCoder) -> Callable[[Tensor], Tensor]:
    """Apply a row-wise map to ``[batch, seq, d]`` activations in the coder's dtype."""

    def apply(a: Tensor) -> Tensor:
        flat = a.reshape(-1, a.shape[-1]).to(coder.dtype)
        return fn(flat).reshape(*a.shape[:-1], -1)

    return apply


def loss_recovered(
    subject: Subject,
    coder: SparseCoder,
    hookpoint: str,
    windows: Tensor | np.ndarray,
    *,
    batch_size: int = 8,
) -> RecoveryResult:
    """Measure the three conditions on ``windows`` (int token ids ``[n, ctx_len]``)."""
    ids = (
        windows.long()
        if isinstance(windows, Tensor)
        else torch.from_numpy(np.array(windows, dtype=np.int64))
    )
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] < 2:
        raise ValueError(f"windows must be a non-empty [n, ctx_len >= 2] array, got {ids.shape}")
    reconstruct = _rows(coder, coder)
    zero = _rows(lambda x: zero_ablation(coder, x), coder)
    sae = coder.cfg.kind == "sae"
    conditions: dict[str, Callable[[Tensor, Tensor], Tensor] | None] = {
        "clean": None,
        "transcoder": (lambda x, y: reconstruct(y if sae else x)),
        "zero": (lambda x, y: zero(y if sae else x)),
    }
    sums = dict.fromkeys(conditions, 0.0)
    n_tokens = 0
    with torch.inference_mode():
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start : start + batch_size].to(subject.device)
            for name, fn in conditions.items():
                if fn is None:
                    losses = next_token_loss(subject.model, batch, reduction="none")
                else:
                    with splice(subject.model, hookpoint, fn):
                        losses = next_token_loss(subject.model, batch, reduction="none")
                sums[name] += float(losses.double().sum())
            n_tokens += batch.shape[0] * (batch.shape[1] - 1)
    ce = {name: total / n_tokens for name, total in sums.items()}
    gap = ce["zero"] - ce["clean"]
    recovered = 1.0 - (ce["transcoder"] - ce["clean"]) / gap if gap != 0 else float("nan")
    return RecoveryResult(ce["clean"], ce["transcoder"], ce["zero"], recovered, n_tokens)
