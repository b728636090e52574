"""The training objective of the ``train`` stage (:mod:`nlrw.train`) and its update rule: one
forward pass of a sparse coder and its loss terms, the signum optimizer, sparsify's
learning-rate rule.

With ``ŷ = W_dec z + b_dec (+ W_skip x)``, ``z`` the top-k latents, and the residual ``e = y −
ŷ``, over a (global) batch::

    FVU   = Σ‖e‖² / Σ(y − ȳ)²
    loss  = FVU + auxk_alpha · AuxK + Multi-TopK FVU / 8

where AuxK (:func:`auxk_loss`) makes the dead latents predict ``e`` and Multi-TopK is the FVU
of the same coder with ``4k`` latents (skip connection included). Unlike sparsify 1.3, both
extra terms send their gradient into the encoder too. The variance ``Σ(y − ȳ)²`` of the whole
global batch is passed in, so that under DDP the terms of the ranks' slices add up to those of
the whole batch.

The peak learning rate is sparsify's ``c / sqrt(L / 2^14)`` for L latents (:func:`default_lr`;
c = 2e-4 for Adam, 5e-3 for signum); :class:`Signum` is plain sign-of-momentum.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from nlrw.model.sparse import SparseCoder, decode_train, encode_train, select_values

__all__ = [
    "LossModule",
    "Signum",
    "StepLosses",
    "auxk_loss",
    "compute_losses",
    "default_lr",
]


def default_lr(optimizer: str, num_latents: int) -> float:
    """sparsify's learning-rate rule: ``c / sqrt(L / 2^14)``, c = 2e-4 (Adam), 5e-3 (signum)."""
    base = 2e-4 if optimizer == "adam" else 5e-3
    return base / math.sqrt(num_latents / 2**14)


class Signum(torch.optim.Optimizer):
    """Sign of the momentum (Bernstein et al. 2018): ``m ← βm + (1−β)g;  p ← p − lr·sign(m)``."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float, momentum: float = 0.95):
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # pyright: ignore[reportIncompatibleMethodOverride]
        assert closure is None, "Signum takes no closure"
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                m = state["momentum_buffer"]
                m.lerp_(p.grad, 1 - group["momentum"])
                p.add_(m.sign(), alpha=-group["lr"])


class StepLosses(NamedTuple):
    """Outputs of one training forward pass; the sums run over this process's rows only."""

    output: Tensor
    """ŷ = W_dec·z + b_dec + W_skip x."""
    values: Tensor
    """[B, k] activations of the top-k latents."""
    indices: Tensor
    """[B, k] their indices."""
    fvu: Tensor
    """``Σ‖y − ŷ‖² / total_variance``."""
    auxk_loss: Tensor
    """AuxK loss (0 without dead latents)."""
    multi_topk_fvu: Tensor
    """FVU with the top 4k latents (0 unless Multi-TopK)."""


AUXK_DENSE_BACKWARD = True
"""AuxK's decoder backward takes ``∂values`` from one dense ``g · W_decᵀ`` instead of gathering
its k_aux = d_out / 2 decoder rows for every row (:func:`nlrw.model.sparse._gather_dot`): on the
demo's transcoder (1,024 rows, 8,192 latents, 58% dead, k_aux = 288) a step with AuxK took
1.31 s with the gather and 0.49 s with the product (``make bench``, row ``train_auxk``: 2.7x,
gradients equal to 1e-7 relative), and AuxK runs for 78% of the demo's training. The top-k
and Multi-TopK paths keep the gather (their numbers, and the smoke run's golden tables, are
unchanged)."""


def auxk_loss(
    coder: SparseCoder,
    relu_pre_acts: Tensor,
    encoder_input: Tensor,
    residual: Tensor,
    dead_mask: Tensor,
    total_variance: Tensor,
) -> Tensor:
    """AuxK: the top dead latents should predict what the live ones missed.

    With ``k_aux = d_out // 2`` and n_dead dead latents, the ``min(k_aux, n_dead)`` dead
    latents of largest ``relu(pre_act)`` per row are decoded **without b_dec** into ê
    (the residual ``e = y − ŷ`` already accounts for b_dec) and::

        AuxK = min(n_dead / k_aux, 1) · ‖ê − e.detach()‖² / total_variance

    (sparsify once had ``e`` with the wrong sign and added b_dec to ê.) The scale keeps
    the term small while few latents are dead. Dead latents whose pre-activations are all
    ≤ 0 contribute zero and get no gradient, as in sparsify.
    """
    num_dead = int(dead_mask.sum())
    if num_dead == 0:
        return residual.new_zeros(())
    k_aux = max(1, residual.shape[-1] // 2)
    scale = min(num_dead / k_aux, 1.0)
    k_aux = min(k_aux, num_dead)
    candidates = torch.where(dead_mask[None], relu_pre_acts, -torch.inf)
    values, indices = candidates.topk(k_aux, dim=-1, sorted=False)
    values = select_values(coder, encoder_input, indices, values)
    e_hat = decode_train(coder, values, indices, bias=False, dense_backward=AUXK_DENSE_BACKWARD)
    return scale * (e_hat - residual.detach().to(e_hat.dtype)).pow(2).sum() / total_variance


def compute_losses(
    coder: SparseCoder,
    x: Tensor,
    y: Tensor,
    *,
    total_variance: Tensor,
    dead_mask: Tensor | None = None,
    multi_topk: bool = False,
) -> StepLosses:
    """The training forward pass: ``ŷ``, its FVU, and the optional AuxK and Multi-TopK terms.

    ``total_variance = Σ(y − ȳ)²`` over the whole (global) batch is passed in, so that
    the terms of a batch split over processes add up to those of the whole batch.
    """
    latents = encode_train(coder, x)
    skip = coder.skip(x)
    out = decode_train(coder, latents.values, latents.indices)
    if skip is not None:
        out = out + skip
    residual = y.to(out.dtype) - out
    fvu = residual.pow(2).sum() / total_variance
    aux = (
        auxk_loss(
            coder, latents.pre_acts, latents.encoder_input, residual, dead_mask, total_variance
        )
        if dead_mask is not None
        else fvu.new_zeros(())
    )
    if multi_topk:
        k_multi = min(4 * coder.k, coder.num_latents)
        values, indices = latents.pre_acts.topk(k_multi, dim=-1, sorted=False)
        values = select_values(coder, latents.encoder_input, indices, values)
        multi_out = decode_train(coder, values, indices)
        if skip is not None:
            multi_out = multi_out + skip
        multi = (y.to(multi_out.dtype) - multi_out).pow(2).sum() / total_variance
    else:
        multi = fvu.new_zeros(())
    return StepLosses(out, latents.values, latents.indices, fvu, aux, multi)


class LossModule(nn.Module):
    """The coder's training forward as a module, so that DDP can wrap it."""

    def __init__(self, coder: SparseCoder, multi_topk: bool, autocast: bool) -> None:
        super().__init__()
        self.coder = coder
        self.multi_topk = multi_topk
        self.autocast = autocast

    def forward(
        self, x: Tensor, y: Tensor, total_variance: Tensor, dead_mask: Tensor | None
    ) -> StepLosses:
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return compute_losses(
                self.coder,
                x,
                y,
                total_variance=total_variance,
                dead_mask=dead_mask,
                multi_topk=self.multi_topk,
            )
