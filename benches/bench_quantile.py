"""Quantile normalization ``F_real⁻¹(F_sim(s))``: nlrw's Rust lookups vs batched torch.

Data shaped like the paper's calibration: 32,768 latents × 1,000 simulated scores each,
Q = 101. Scores are expected digits on a 0..9 scale rounded to 0.01 (so many scores tie
with each other and with table entries, exercising the flat-run rule); the sim table is the
exact quantile table of those scores; the real table is a sparse activation distribution
(a latent-specific majority of exact zeros, then an exponential tail).

Baseline: the fastest exact vectorized version found, in torch (2 threads), exploiting the
bench's layout (scores grouped by latent as an ``[L, n]`` block, which a general caller does
not have): one batched ``torch.searchsorted(right=True)`` over latent chunks; the lower end of
a flat run comes from a per-row "run start" table gathered at the hit instead of a second
search; then gathers for the interpolations. A plain numpy version cannot batch
``searchsorted`` over rows and is far slower. The baseline is checked against ours.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

import common
from nlrw.quantiles import quantile_normalize, quantile_tables


def make_data(
    num_latents: int, per_latent: int, q: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = np.repeat(np.arange(num_latents, dtype=np.uint32), per_latent)
    shape = rng.uniform(0.3, 3.0, size=(num_latents, 1))
    raw = rng.beta(shape, 2.0, size=(num_latents, per_latent)) * 9.0
    scores = (np.round(raw, 2)).astype(np.float32).reshape(-1)
    sim = quantile_tables(ids, scores, num_latents, q)
    p = np.linspace(0.0, 1.0, q)
    active = rng.uniform(0.005, 0.3, size=(num_latents, 1))
    scale = rng.uniform(0.5, 20.0, size=(num_latents, 1))
    tail = np.clip((p - (1.0 - active)) / active, 0.0, 1.0 - 1e-3)
    real = (-scale * np.log1p(-tail)).astype(np.float32)
    return ids, scores, sim, real


def torch_normalize(scores: torch.Tensor, sim: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Exact flat-run semantics for scores laid out as ``[L, n]`` (row l = latent l).

    Uses the same algebra as the Rust path, to be the strongest baseline: the output of a
    score that equals a sim entry is precomputed per entry (one gather instead of a second
    search), and with ``Qs = Qr`` the real segment is the sim segment.
    """
    num_latents, qs = sim.shape
    qr = real.shape[1]
    idx = torch.arange(qs)
    # Run of equal entries around each sim entry: [run_start, run_end].
    new_run = torch.ones_like(sim, dtype=torch.bool)
    new_run[:, 1:] = sim[:, 1:] != sim[:, :-1]
    run_start = torch.where(new_run, idx, torch.zeros_like(idx)).cummax(dim=1).values
    run_last = torch.ones_like(sim, dtype=torch.bool)
    run_last[:, :-1] = new_run[:, 1:]
    rev = torch.where(run_last, idx, torch.full_like(idx, qs - 1)).flip(1)
    run_end = rev.cummin(dim=1).values.flip(1)
    x = (run_start + run_end).double() * 0.5 / (qs - 1) * (qr - 1)
    k = x.long().clamp_(max=qr - 2)
    r0, r1 = real.double().gather(1, k), real.double().gather(1, k + 1)
    hit_values = (r0 + (x - k) * (r1 - r0)).float()

    out = torch.empty_like(scores)
    chunk = max(1, (1 << 22) // max(1, scores.shape[1]))
    for lo in range(0, num_latents, chunk):
        t = sim[lo : lo + chunk]
        r = real[lo : lo + chunk]
        s = scores[lo : lo + chunk]
        ub = torch.searchsorted(t, s, right=True)
        j = (ub - 1).clamp_(0, qs - 2)
        t0 = t.gather(1, j)
        t1 = t.gather(1, j + 1)
        # ±inf from a flat segment clamps to 0 or 1; NaN (s on it) is a hit, replaced below.
        f = ((s - t0) / (t1 - t0).abs()).nan_to_num_(0.0).clamp_(0.0, 1.0)
        if qs == qr:
            k = j
        else:
            xr = (j + f) * ((qr - 1) / (qs - 1))
            k = xr.long().clamp_(max=qr - 2)
            f = xr - k
        r0 = r.gather(1, k)
        interpolated = r0 + f * (r.gather(1, k + 1) - r0)
        # The last entry <= s is j, or j + 1 when s is at or above the top entry.
        top = ub == qs
        hit = (ub > 0) & (torch.where(top, t1, t0) == s)
        hits = hit_values[lo : lo + chunk].gather(1, j + top)
        out[lo : lo + chunk] = torch.where(hit, hits, interpolated)
    return out


def run(quick: bool) -> list[dict[str, Any]]:
    torch.set_num_threads(2)
    num_latents, per_latent, q = (2048, 200, 101) if quick else (32768, 1000, 101)
    ids, scores, sim, real = make_data(num_latents, per_latent, q)
    ts, tsim, treal = (torch.from_numpy(a) for a in (scores, sim, real))
    ts = ts.view(num_latents, per_latent)

    # Ours first: once torch has run, its OpenMP threads busy-wait for a while and take the
    # cores from rayon's threads (ours ran ~1.7x slower right after torch unless
    # OMP_WAIT_POLICY=PASSIVE). The baseline is checked against ours after timing.
    repeats = 3 if quick else 5
    ours = common.median_time(lambda: quantile_normalize(ids, scores, sim, real), repeats)
    ours_out = quantile_normalize(ids, scores, sim, real)
    extra: dict[str, float] = {}
    # Other orders of the same scores, ours only (the baseline needs the [L, n] layout):
    # by context (each score a different latent, as a simulation stage may write them) and
    # shuffled. Both make the lookups reorder by latent block internally.
    by_context = np.arange(ids.shape[0]).reshape(num_latents, per_latent).T.reshape(-1)
    shuffled = np.random.default_rng(1).permutation(ids.shape[0])
    for name, order in (("by_context", by_context), ("shuffled", shuffled)):
        ids_o, scores_o = ids[order], scores[order]
        start = time.perf_counter()
        out_o = quantile_normalize(ids_o, scores_o, sim, real)
        extra[f"ours_{name}_order_s"] = round(time.perf_counter() - start, 4)
        np.testing.assert_array_equal(out_o, ours_out[order])

    base = common.median_time(lambda: torch_normalize(ts, tsim, treal), repeats)
    base_out = torch_normalize(ts, tsim, treal).reshape(-1).numpy()
    scale = float(np.abs(real).max())
    np.testing.assert_allclose(base_out, ours_out, rtol=1e-5, atol=1e-5 * scale)
    return [
        common.result(
            "quantile_normalize",
            ours,
            "torch batched searchsorted [L,n] 2thr",
            base,
            target=4.0,
            shape=f"{num_latents} latents x {per_latent} scores, Q={q}",
            **extra,
        )
    ]
