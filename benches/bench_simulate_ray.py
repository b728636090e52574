"""The simulate stage on a local Ray cluster (``nlrw.simulate_ray``): 1 vs 2 Ray workers.

The work list is the smoke preset's scaled up: the tiny random subject and simulator, 192
contexts (144 eval + 48 calibration) and 8 latents with plain-English explanations (4 contexts
and 4 latents with ``--quick``), one latent per part, so 1,536 prompts in 8 parts (4 per shard
with 2 workers). One local Ray instance of 2 CPUs (``ray.init(num_cpus=2)``) serves every
timing; each timed call is a whole :func:`simulate_distributed` on fresh parts: actors started
(each imports torch and loads the simulator), shards run, parts merged. With 1 worker it runs
torch on 2 threads, with 2 workers each runs 1 thread (both use the 2 cores), so ``ratio`` is
the speed-up of the second process alone, at most ~2x on this machine.

Also reported: the same work in this process with ``simulate.run`` (no Ray, torch on 2
threads, its imports already warm), the round trip of an empty Ray task and of an empty actor
call (the overhead per task, median of 200), and the start of one worker actor (import torch,
set threads; median of 3). The in-process, 1- and 2-worker runs are interleaved (median of 3,
or 1 with ``--quick``): the 2 cores are shared and noisy. A fresh worker process also pays
once the imports and first-call set-up of transformers (seconds on this machine), which the
warm in-process run does not: the gap between it and 1 Ray worker.
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import polars as pl

from common import result

EXPLANATIONS = [
    "The letter e after a consonant",
    "Commas in lists",
    "Capital letters at the start of a name",
    "The word 'the' before a noun",
    "Punctuation that ends a sentence",
    "Pronouns referring to a woman",
    "Words about money and property",
    "Verbs in the past tense",
]


def _build(root: Path, quick: bool) -> tuple[Path, Any]:
    """A smoke run up to contexts, scaled up, with explanations written for the latents."""
    from nlrw.pipeline import load_preset
    from nlrw.pipeline import run as run_pipeline

    preset = load_preset("smoke")
    # ~10 s of work in one process: with less, starting the workers (~2 s each, importing
    # torch) and their first forward dominate, and the ratio measures start-up, not scaling.
    n_eval, n_cal = (3, 1) if quick else (144, 48)
    n_latents = 4 if quick else 8
    cfg = dataclasses.replace(
        preset,
        contexts=dataclasses.replace(preset.contexts, n_contexts=n_eval, n_calibration=n_cal),
    )
    run_dir = root / "inputs"
    run_pipeline(cfg, run_dir, until="contexts", log=lambda _: None)
    latents = list(range(10, 10 + 16 * n_latents, 16))  # ids of the coder's 256 latents
    pl.DataFrame(
        {
            "latent": latents,
            "explanation": EXPLANATIONS[:n_latents],
            "status": ["ok"] * n_latents,
        }
    ).write_parquet(run_dir / "explanations.parquet")
    return run_dir, dataclasses.replace(preset.simulate, chunk_latents=1)


def _fresh(run_dir: Path) -> Path:
    for name in ("simulations.parquet", "simulate.json"):
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "simulations.parts", ignore_errors=True)
    return run_dir


def _round_trips(fn: Any, n: int = 200) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(quick: bool) -> list[dict[str, Any]]:
    try:
        import ray
    except ImportError:
        print("bench_distributed: Ray is not installed (pip install 'nlrw[ray]'), skipped")
        return []
    from nlrw import simulate
    from nlrw.simulate_ray import _ShardWorker, simulate_distributed

    repeats = 1 if quick else 3
    root = Path(tempfile.mkdtemp(prefix="nlrw-bench-distributed-"))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False)
    try:
        run_dir, cfg = _build(root, quick)

        @ray.remote(num_cpus=0)
        def noop() -> None:
            return None

        @ray.remote(num_cpus=0)
        class Echo:
            def ping(self) -> None:
                return None

        task_s = _round_trips(lambda: ray.get(noop.remote()))
        echo = Echo.remote()
        actor_call_s = _round_trips(lambda: ray.get(echo.ping.remote()))
        ray.kill(echo)

        worker_cls = ray.remote(_ShardWorker).options(num_cpus=1)
        starts = []
        for _ in range(3):
            start = time.perf_counter()
            worker = worker_cls.remote(cfg, 1, None)
            ray.get(worker.close.remote())
            starts.append(time.perf_counter() - start)
            ray.kill(worker)

        # 0: simulate.run in this process (no Ray); 1, 2: Ray workers.
        times: dict[int, list[float]] = {0: [], 1: [], 2: []}
        tables: dict[int, pl.DataFrame] = {}
        for _ in range(repeats):
            for n in (0, 1, 2):
                _fresh(run_dir)
                start = time.perf_counter()
                if n == 0:
                    tables[n] = simulate.run(cfg, run_dir)
                else:
                    tables[n] = simulate_distributed(cfg, run_dir, n_workers=n)
                times[n].append(time.perf_counter() - start)
        table = tables[0]
        assert tables[1].equals(table) and tables[2].equals(table)
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)

    one, two = statistics.median(times[1]), statistics.median(times[2])
    return [
        result(
            "distributed",
            two,
            "1 Ray worker (2 threads)",
            one,
            target=1.5,
            work=f"{table.height} prompts ({table['latent'].n_unique()} latents x "
            f"{table['context_id'].n_unique()} contexts, tiny-random-llama), "
            f"{table['latent'].n_unique()} parts",
            one_worker_runs_s=[round(t, 2) for t in times[1]],
            two_worker_runs_s=[round(t, 2) for t in times[2]],
            in_process_no_ray_runs_s=[round(t, 2) for t in times[0]],
            in_process_no_ray_median_s=round(statistics.median(times[0]), 2),
            empty_task_round_trip_ms=round(task_s * 1e3, 3),
            empty_actor_call_round_trip_ms=round(actor_call_s * 1e3, 3),
            worker_actor_start_s=round(statistics.median(starts), 2),
        )
    ]
