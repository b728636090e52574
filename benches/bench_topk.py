"""Benchmark of ``topk_encode`` (fused ReLU + top-k) against torch and numpy on the CPU.

Baseline = the fastest of ``torch.topk(torch.relu(x), k)``, ``torch.topk(x, k)`` followed by
relu (the same values), and numpy ``argpartition``, all with 2 threads. Also printed: a
plain memory read of the array (``torch.sum``), the physical floor, and our distance to it.
"""

from __future__ import annotations

import numpy as np
import torch

from common import median_time, result
from nlrw import _core


def run(quick: bool) -> list[dict]:
    torch.set_num_threads(2)
    n, d, k = (1024 if quick else 8192), 32768, 32
    x = np.random.default_rng(0).standard_normal((n, d), dtype=np.float32)
    tx = torch.from_numpy(x)

    # Same selection as the baselines (values equal; tie order may differ).
    values, _ = _core.topk_encode(x, k)
    torch_values = torch.topk(tx, k).values.relu().numpy()
    assert np.array_equal(values, torch_values), "topk_encode disagrees with torch.topk"

    repeats = 3 if quick else 7
    baselines = {
        "torch.topk(relu(x))": lambda: torch.topk(torch.relu(tx), k),
        "torch.topk(x) then relu": lambda: torch.topk(tx, k).values.relu_(),
        "np.argpartition": lambda: np.argpartition(-x, k - 1, axis=1)[:, :k],
    }
    times = {name: median_time(fn, repeats=repeats) for name, fn in baselines.items()}
    ours = median_time(lambda: _core.topk_encode(x, k), repeats=repeats)
    mem = median_time(lambda: tx.sum(), repeats=repeats)
    best = min(times, key=times.__getitem__)
    for name, t in times.items():
        print(f"  {name:<26} {t:.4f} s")
    print(f"  {'nlrw topk_encode':<26} {ours:.4f} s   memory read {mem:.4f} s")
    return [
        result(
            "topk",
            ours,
            best,
            times[best],
            target=2.5,
            shape=f"[{n} x {d}] float32, k={k}",
            memory_read_s=round(mem, 4),
            ours_over_memory_read=round(ours / mem, 2),
            all_baselines_s={name: round(t, 4) for name, t in times.items()},
        )
    ]
