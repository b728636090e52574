"""The vLLM half of ``bench_simulate_vllm``: run in the vLLM virtualenv (``.venv-vllm``).

    PYTHONPATH=python python benches/simulate_vllm_worker.py IN.json OUT.json

``IN.json``: ``{"model": folder, "dtype": ..., "rounds": n, "block_size": b, "answers": [...],
"prompts": [[prefix ids, suffix ids], ...]}``. Starts vLLM's offline engine on the CPU (prefix
caching on), answers one prompt to warm it up, then times ``answer_distribution_ids`` on all
prompts ``rounds`` times, the prefix cache emptied before each (every round starts cold, as
nlrw's engine does). ``OUT.json``: the engine's start time, each round's wall and process CPU
seconds, the probabilities of the last round and vLLM's prefix cache counters.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

for _name, _value in {
    "VLLM_TARGET_DEVICE": "cpu",
    "VLLM_CPU_KVCACHE_SPACE": "2",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "HF_HUB_OFFLINE": "1",
}.items():
    os.environ.setdefault(_name, _value)

from nlrw.backends.base import SplitPrompt  # noqa: E402
from nlrw.backends.vllm import VLLMBackend  # noqa: E402


def main(src: Path, dest: Path) -> None:
    job = json.loads(src.read_text())
    prompts = [SplitPrompt(tuple(p), tuple(s)) for p, s in job["prompts"]]
    answers = [int(a) for a in job["answers"]]
    start = time.perf_counter()
    backend = VLLMBackend(
        job["model"],
        dtype=job["dtype"],
        max_model_len=1024,
        engine_options={
            "enforce_eager": True,
            "block_size": int(job["block_size"]),
            "disable_log_stats": False,
        },
    )
    backend.answer_distribution_ids(prompts[:1], answers)
    started = time.perf_counter() - start
    wall, cpu = [], []
    probs = None
    for _ in range(int(job["rounds"])):
        backend.llm.reset_prefix_cache()
        w, c = time.perf_counter(), time.process_time()
        probs = backend.answer_distribution_ids(prompts, answers).probs
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    counters = {
        m.name: float(m.value)
        for m in backend.llm.get_metrics()
        if m.name in ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits")
    }
    backend.close()
    assert probs is not None
    dest.write_text(
        json.dumps(
            {
                "start_s": started,
                "wall_s": wall,
                "cpu_s": cpu,
                "probs": probs.tolist(),
                "prefix_cache": counters,
                "token_ids": backend._token_ids,
            }
        )
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
