"""Benchmark of one transcoder training step on the CPU: nlrw's sparse path vs a dense one.

A step = forward (encoder matmul, top-k, decode, skip), FVU loss, backward, Adam step.

* ours: :func:`nlrw.train.compute_losses` (what the trainer runs): ``torch.topk``
  selection without autograd, then hand-written backward passes over the B·k selected
  (row, latent) pairs (embedding-bag gathers and per-latent bags) and an embedding-bag
  decoder.
* baseline ("dense eager reference"): the formula written densely, ``z = relu(W_enc x +
  b_enc) ⊙ mask_topk``, ``y = z W_dec + b_dec + W_skip x``, differentiated by autograd; its
  backward does three more [B, L] × [L, d]-sized matmuls.

Both start from the same weights, run with 2 threads, interleaved, and report medians.
The two agree on the loss and gradients (checked below; ``tests/test_sparse.py`` checks
the gradients exactly in float64).

Row ``train_auxk``: the same step with AuxK on, 58% of the latents dead (the demo's
transcoder when AuxK starts), so that each row also decodes its k_aux = 288 top dead latents.
ours: the trainer's path, where AuxK's decoder backward multiplies ``g · W_decᵀ`` densely
(:data:`nlrw.train.losses.AUXK_DENSE_BACKWARD`); baseline: the same step gathering the 288
decoder rows of every row, as the top-k path does (the path before).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from common import result
from nlrw.model.sparse import SparseCoder, SparseCoderConfig
from nlrw.train import compute_losses
from nlrw.train import losses as train_losses


def _dense_loss(
    coder: SparseCoder, x: torch.Tensor, y: torch.Tensor, tv: torch.Tensor
) -> torch.Tensor:
    pre = torch.relu(x @ coder.encoder.weight.T + coder.encoder.bias)
    mask = torch.zeros_like(pre).scatter_(1, torch.topk(pre, coder.k, dim=1).indices, 1.0)
    assert coder.W_skip is not None
    y_hat = (pre * mask) @ coder.W_dec + coder.b_dec + x @ coder.W_skip.T
    return (y - y_hat).pow(2).sum() / tv


def _step(opt: torch.optim.Optimizer, loss_fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    loss = loss_fn()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def _bench(batch: int, d: int, num_latents: int, k: int, repeats: int) -> tuple[float, float]:
    """Median seconds per step (ours, dense) on one size, after checking they agree."""
    cfg = SparseCoderConfig.create("transcoder", d, k=k, num_latents=num_latents)
    gen = torch.Generator().manual_seed(0)
    ours_coder = SparseCoder(cfg, seed=0)
    with torch.no_grad():  # a trained-looking decoder, not the all-zero initial one
        ours_coder.W_dec.normal_(0, 0.05, generator=gen)
    dense_coder = SparseCoder(cfg, seed=0)
    dense_coder.load_state_dict(ours_coder.state_dict())
    x = torch.randn(batch, d, generator=gen)
    y = torch.randn(batch, d, generator=gen)
    tv = (y - y.mean(0)).pow(2).sum()

    def ours_loss() -> torch.Tensor:
        return compute_losses(ours_coder, x, y, total_variance=tv).fvu

    def dense_loss() -> torch.Tensor:
        return _dense_loss(dense_coder, x, y, tv)

    # Same loss and gradients before timing.
    lo, ld = ours_loss(), dense_loss()
    torch.testing.assert_close(lo, ld, rtol=1e-4, atol=1e-6)
    lo.backward()
    ld.backward()
    params = zip(ours_coder.named_parameters(), dense_coder.parameters(), strict=True)
    for (name, p), q in params:
        assert p.grad is not None and q.grad is not None
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=name)
        p.grad, q.grad = None, None

    # The trainer's optimizer (fused Adam) for both: the optimizer is not what is compared.
    ours_opt = torch.optim.Adam(ours_coder.parameters(), lr=1e-4, fused=True)
    dense_opt = torch.optim.Adam(dense_coder.parameters(), lr=1e-4, fused=True)
    runs = {
        "ours": lambda: _step(ours_opt, ours_loss),
        "dense": lambda: _step(dense_opt, dense_loss),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():  # warm-up (allocates Adam's state)
        fn()
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return statistics.median(times["ours"]), statistics.median(times["dense"])


def _bench_auxk(
    batch: int, d: int, num_latents: int, k: int, repeats: int
) -> tuple[float, float, float]:
    """Median seconds per AuxK step: (dense decoder gather, row gather, largest relative
    gradient difference between the two)."""
    cfg = SparseCoderConfig.create("transcoder", d, k=k, num_latents=num_latents)
    gen = torch.Generator().manual_seed(0)
    coder = SparseCoder(cfg, seed=0)
    with torch.no_grad():
        coder.W_dec.normal_(0, 0.05, generator=gen)
    x = torch.randn(batch, d, generator=gen)
    y = torch.randn(batch, d, generator=gen)
    tv = (y - y.mean(0)).pow(2).sum()
    dead = torch.zeros(num_latents, dtype=torch.bool)
    dead[torch.randperm(num_latents, generator=gen)[: int(0.58 * num_latents)]] = True

    def step(dense: bool) -> list[torch.Tensor]:
        train_losses.AUXK_DENSE_BACKWARD = dense
        coder.zero_grad(set_to_none=True)
        losses = compute_losses(coder, x, y, total_variance=tv, dead_mask=dead)
        (losses.fvu + 0.03125 * losses.auxk_loss).backward()
        return [p.grad.detach().clone() for p in coder.parameters() if p.grad is not None]

    try:
        grads = [step(True), step(False)]
        diff = max(
            float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
            for a, b in zip(*grads, strict=True)
        )
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(repeats):
            for dense in times:
                start = time.perf_counter()
                step(dense)
                times[dense].append(time.perf_counter() - start)
    finally:
        train_losses.AUXK_DENSE_BACKWARD = True
    return statistics.median(times[True]), statistics.median(times[False]), diff


def run(quick: bool) -> list[dict]:
    torch.set_num_threads(2)
    d, k = (128, 32) if quick else (576, 32)
    sizes = [(256, 2048)] if quick else [(1024, 8192), (1024, 16384)]
    rows = []
    for batch, num_latents in sizes:
        ours_s, dense_s = _bench(batch, d, num_latents, k, repeats=3 if quick else 7)
        print(
            f"  B={batch} d={d} L={num_latents} k={k}: ours {ours_s:.4f} s/step "
            f"({batch / ours_s:,.0f} tok/s), dense {dense_s:.4f} s/step"
        )
        rows.append(
            result(
                "train_step" if num_latents == sizes[-1][1] else f"train_step_L{num_latents}",
                ours_s,
                "dense eager reference",
                dense_s,
                shape=f"B={batch}, d_in=d_out={d}, L={num_latents}, k={k}, skip, Adam",
                ours_tokens_per_s=round(batch / ours_s),
            )
        )
    batch, num_latents = sizes[0]
    ours_s, gather_s, diff = _bench_auxk(batch, d, num_latents, k, repeats=3 if quick else 5)
    print(
        f"  AuxK, 58% dead, B={batch} d={d} L={num_latents} k_aux={d // 2}: dense gather "
        f"{ours_s:.3f} s/step, row gather {gather_s:.3f} s/step, gradients agree to {diff:.1e}"
    )
    rows.append(
        result(
            "train_auxk",
            ours_s,
            "gathered decoder rows (the path before)",
            gather_s,
            shape=f"B={batch}, d_in=d_out={d}, L={num_latents}, k={k}, k_aux={d // 2}, 58% dead",
            ours_tokens_per_s=round(batch / ours_s),
            max_relative_gradient_difference=diff,
        )
    )
    return rows
