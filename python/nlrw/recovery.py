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
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from nlrw.config.recovery import RecoveryConfig
from nlrw.lib.io import atomic_write_json
from nlrw.lib.provenance import stage_record
from nlrw.lib.rundir import RunDir
from nlrw.model.sparse import SparseCoder
from nlrw.model.subject import Subject, next_token_loss, splice

if TYPE_CHECKING:
    from nlrw.collect import CollectConfig

__all__ = ["RecoveryConfig", "RecoveryResult", "loss_recovered", "run", "zero_ablation"]


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


def run(cfg: RecoveryConfig, run_dir: str | Path, collect: CollectConfig) -> dict[str, Any]:
    """The recovery stage: :func:`loss_recovered` of the run's coder on the first
    ``cfg.n_windows`` held-out windows, written to ``transcoder/recovery.json``."""
    from nlrw.model import sparse
    from nlrw.model.subject import load_subject

    paths = RunDir(run_dir)
    windows = np.load(paths.split("eval") / "tokens.npy", mmap_mode="r")
    device = None if collect.device == "auto" else collect.device
    subject = load_subject(collect.model, dtype=collect.dtype, device=device)
    coder = sparse.load(paths.coder(collect.hookpoint), device=subject.device)
    result = loss_recovered(
        subject,
        coder,
        collect.hookpoint,
        np.asarray(windows[: cfg.n_windows]),
        batch_size=cfg.batch_size,
    )
    summary = result._asdict()
    atomic_write_json(paths.recovery_record, stage_record("recovery", cfg, result=summary))
    return summary
