"""Shared helpers of the benchmarks: median timings and the result rows ``run.py`` collects.

Every benchmark times nlrw's path and its baseline in the same process, interleaved, and
reports medians: this machine is shared and noisy, so single times mean little.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from typing import Any


def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def result(
    name: str,
    ours_median_s: float,
    baseline: str,
    baseline_median_s: float,
    target: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One row of ``benches/results.json``; ``ratio`` = baseline / ours (higher is better)."""
    row: dict[str, Any] = {
        "name": name,
        "ours_median_s": ours_median_s,
        "baseline": baseline,
        "baseline_median_s": baseline_median_s,
        "ratio": baseline_median_s / ours_median_s,
    }
    if target is not None:
        row["target"] = target
    row.update(extra)
    return row


def smollm2_subject() -> tuple[Any, str]:
    """The embedded default subject in float32 on the CPU and its name; without the asset
    package, a randomly initialised LlamaConfig of its shape (timings do not depend on the
    weights) and a name that says so."""
    import torch

    try:
        from nlrw.model.subject import load_subject

        return load_subject("smollm2-135m", dtype="float32", device="cpu").model, "SmolLM2-135M"
    except (ImportError, OSError, RuntimeError) as e:  # no asset package (AssetError et al.)
        from transformers import LlamaConfig, LlamaForCausalLM

        print(f"  embedded default unavailable ({type(e).__name__}: {e}); random weights")
        config = LlamaConfig(
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            max_position_embeddings=8192,
            tie_word_embeddings=True,
        )
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval(), "random LlamaConfig of SmolLM2-135M's shape"
