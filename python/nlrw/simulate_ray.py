"""The ``simulate`` stage spread over a Ray cluster (the ``nlrw[ray]`` extra).

:func:`simulate_distributed` starts a local Ray instance (or connects to a running cluster
with ``address``) and runs ``n`` Ray **actors**, one per shard ``i/n`` of the stage's chunk
list (:func:`nlrw.simulate.shard_chunks`). Each actor is one worker process that loads its
simulator backend once and runs ``simulate.run(replace(cfg, shard=f"{i}/{n}"), run_dir)``:
the parts it writes are exactly the parts a single-process run writes, with the same prompts
in the same batches, hence the same numbers. When every shard has returned, the driver merges
the parts with :func:`nlrw.simulate.merge` into ``simulations.parquet`` and ``simulate.json``
(which gains a ``distributed`` entry: workers, hosts, restarts, wall time).

**Failures.** Scheduling, restarts and retries are Ray's own: an actor whose process dies
(killed, out of memory, its node lost) is restarted up to ``max_retries`` times
(``max_restarts``) and its pending call is re-sent (``max_task_retries``). Parts are written
atomically and finished parts are skipped, so the retried shard resumes from the parts it had
finished: nothing is lost, nothing is computed twice. A Python exception inside a shard (a bad
input, a backend error) is not retried: it is raised by :func:`simulate_distributed`.

**Resources.** Each actor reserves ``num_cpus = threads`` and ``num_gpus_per_worker``; torch
runs ``threads = max(1, cpus // n)`` threads in it (``cpus``: the cluster's CPUs, capped at the
largest node's), so 2 workers on 2 cores do not oversubscribe them. An actor is killed as soon
as its shard is done, which frees its resources for the next one when ``n_workers`` exceeds
what the cluster holds at once.

**The run directory** is read and written by every worker: on one machine they share it; on a
multi-node cluster ``run_dir`` must be a shared filesystem (NFS, Lustre, GPFS, a Kubernetes
ReadWriteMany volume) mounted at the same path on every node, and nlrw must be installed in the
same environment on every node.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import re
import socket
import threading
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import polars as pl

from nlrw import simulate
from nlrw.lib.io import atomic_write_json
from nlrw.lib.parts import PartStore
from nlrw.lib.rundir import RunDir
from nlrw.simulate import SimulateConfig

__all__ = ["TEST_KILL_ENV", "simulate_distributed"]

log = logging.getLogger(__name__)

TEST_KILL_ENV = "NLRW_TEST_KILL_AFTER_FIRST_PART"
"""Test hook (fault injection), read by the driver: when this environment variable names a
file that does not exist yet, the worker of shard 0 (the one with the most chunks), right
after writing its first part, creates that file (recording the part and its process) and exits
with ``os._exit(1)``, as a killed worker would. It dies once; Ray restarts it and the retry must
finish the shard."""

_PART = re.compile(r"^part-(\d+)\.parquet$")


def _require_ray() -> Any:
    """The ``ray`` module (imported dynamically: Ray is an optional extra, so neither importing
    nlrw nor type-checking it needs Ray installed)."""
    try:
        ray = importlib.import_module("ray")
    except ImportError as e:
        raise ImportError(
            "simulate_distributed needs Ray: pip install 'nlrw[ray]' (or pip install "
            "'ray[default]')"
        ) from e
    return ray


def _shard_parts(parts_dir: Path, i: int, n: int) -> set[str]:
    """Names of the part files of shard ``i/n`` present in ``parts_dir``."""
    try:
        names = os.listdir(parts_dir)
    except FileNotFoundError:
        return set()
    return {name for name in names if (m := _PART.match(name)) and int(m[1]) % n == i}


def _die_after_first_part(parts_dir: Path, i: int, n: int, marker: Path) -> None:
    """The :data:`TEST_KILL_ENV` hook: a thread that kills this process once a new part of
    shard ``i/n`` appears, unless another worker (or an earlier attempt) already died."""
    before = _shard_parts(parts_dir, i, n)

    def watch() -> None:
        while not marker.exists():
            new = sorted(_shard_parts(parts_dir, i, n) - before)
            if new:
                try:
                    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    return
                stat = (parts_dir / new[0]).stat()
                record = {
                    "shard": f"{i}/{n}",
                    "pid": os.getpid(),
                    "part": new[0],
                    "inode": stat.st_ino,
                    "mtime_ns": stat.st_mtime_ns,
                }
                os.write(fd, json.dumps(record).encode())
                os.close(fd)
                os._exit(1)
            time.sleep(0.002)

    threading.Thread(target=watch, name="nlrw-test-kill", daemon=True).start()


class _ShardWorker:
    """One worker process (a Ray actor): its own backend, loaded once, runs one or more shards
    of the simulate stage."""

    def __init__(self, cfg: SimulateConfig, threads: int, kill_marker: str | None) -> None:
        import torch

        torch.set_num_threads(threads)
        self.cfg = cfg
        self.threads = threads
        self.kill_marker = kill_marker
        self.backend: Any = None

    def run(self, shard: str, run_dir: str) -> dict[str, Any]:
        ray = _require_ray()
        started = time.perf_counter()
        i, n = simulate.parse_shard(shard)
        parts_dir = RunDir(run_dir).simulations_parts
        if i == 0 and self.kill_marker is not None and not Path(self.kill_marker).exists():
            _die_after_first_part(parts_dir, i, n, Path(self.kill_marker))
        if self.backend is None:
            self.backend = simulate.load_simulator(self.cfg)
        simulate.run(replace(self.cfg, shard=shard), run_dir, backend=self.backend)
        with warnings.catch_warnings():  # Ray's own use of a deprecated API inside it
            warnings.simplefilter("ignore", DeprecationWarning)
            restarted = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        return {
            "shard": shard,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "threads": self.threads,
            "restarted": restarted,
            "parts": len(_shard_parts(parts_dir, i, n)),
            "seconds": time.perf_counter() - started,
        }

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
            self.backend = None


def _threads_per_worker(ray: Any, n: int) -> int:
    """``max(1, cpus // n)`` with the cluster's CPUs, capped at the largest node's CPUs (an
    actor lives on one node)."""
    total = float(ray.cluster_resources().get("CPU", 1.0))
    largest = max(
        (float(node["Resources"].get("CPU", 0.0)) for node in ray.nodes() if node.get("Alive")),
        default=total,
    )
    return max(1, min(int(largest), int(total // n)))


def simulate_distributed(
    cfg: SimulateConfig,
    run_dir: str | Path,
    *,
    n_workers: int,
    address: str | None = None,
    max_retries: int = 2,
    num_gpus_per_worker: float = 0,
) -> pl.DataFrame:
    """Run the simulate stage as ``n_workers`` Ray actors, one per shard ``i/n_workers``, and
    merge their parts into ``simulations.parquet`` (module docstring).

    Args:
        cfg: the stage's options (its ``shard`` is ignored: the workers get ``i/n``).
        run_dir: the run directory, on a filesystem every Ray node sees at the same path.
        n_workers: worker processes (actors), hence shards; at most the number of chunks
            (``ceil(latents / chunk_latents)``) are used.
        address: the Ray cluster to join: ``"auto"`` (the cluster that ``ray start`` runs on
            this machine), ``"HOST:6379"``, ``"ray://HOST:10001"``; None starts a local
            instance for this call (unless Ray is already initialized in this process).
        max_retries: restarts of a dead worker and re-sends of its shard.
        num_gpus_per_worker: GPUs each worker reserves (e.g. 1: one worker per GPU; 0.5: two
            small simulators per GPU).

    Returns:
        The merged table (as :func:`nlrw.simulate.run`).

    Raises:
        ValueError: ``n_workers < 1``, ``max_retries < 0`` or ``num_gpus_per_worker < 0``.
        ImportError: Ray is not installed.
        ConnectionError: Ray cannot reach the cluster at ``address`` (with token
            authentication, also set ``RAY_AUTH_MODE=token`` where this runs).
        FileNotFoundError: the stage's inputs are missing (naming the stage to run).
        FileExistsError: ``simulations.parts`` holds parts of another config.
        RuntimeError: a shard failed (its worker died more than ``max_retries`` times, or
            raised); the parts written so far stay, and a new call resumes from them.
    """
    if n_workers < 1:
        raise ValueError(f"n_workers must be at least 1, got {n_workers}")
    if max_retries < 0:
        raise ValueError(f"max_retries must be non-negative, got {max_retries}")
    if num_gpus_per_worker < 0:
        raise ValueError(f"num_gpus_per_worker must be non-negative, got {num_gpus_per_worker}")
    ray = _require_ray()
    run_dir = Path(run_dir).resolve()
    cfg = replace(cfg, shard=None)
    # Fail fast on missing inputs, and skip a stage that is already done, before any Ray work.
    plan = simulate.read_plan(cfg, run_dir)
    done = simulate.finished_outputs(run_dir, plan.key)
    if done is not None:
        log.info("simulate: %s is up to date", RunDir(run_dir).simulations)
        return done
    parts_dir = RunDir(run_dir).simulations_parts
    store = PartStore(parts_dir, plan.key)  # refuses another config's parts
    n = max(1, min(n_workers, len(plan.chunks)))
    if n < n_workers:
        log.info("simulate: %d chunks of latents, so %d workers, not %d", n, n, n_workers)

    started_here = not ray.is_initialized()
    if started_here:
        if address is None:
            ray.init(include_dashboard=False)
        else:
            ray.init(address=address)
    try:
        wall = time.perf_counter()
        summaries = _run_shards(
            ray, cfg, run_dir, store, len(plan.chunks), n, max_retries, num_gpus_per_worker
        )
        wall = time.perf_counter() - wall
    finally:
        if started_here:
            ray.shutdown()

    table = simulate.merge(cfg, run_dir)
    record_path = RunDir(run_dir).simulate_record
    record = json.loads(record_path.read_text())
    record["distributed"] = {
        "engine": "ray",
        "ray_version": ray.__version__,
        "n_workers": n,
        "address": address,
        "max_retries": max_retries,
        "num_gpus_per_worker": num_gpus_per_worker,
        "wall_seconds": wall,
        "workers": summaries,
    }
    atomic_write_json(record_path, record)
    return table


def _run_shards(
    ray: Any,
    cfg: SimulateConfig,
    run_dir: Path,
    store: PartStore,
    n_chunks: int,
    n: int,
    max_retries: int,
    num_gpus: float,
) -> list[dict[str, Any]]:
    """Start one actor per shard, wait for them (a progress bar of parts), kill each as its
    shard finishes; the shards' summaries in shard order."""
    threads = _threads_per_worker(ray, n)
    worker_cls = ray.remote(_ShardWorker).options(
        num_cpus=threads,
        num_gpus=num_gpus,
        max_restarts=max_retries,
        max_task_retries=max_retries,
    )
    kill_marker = os.environ.get(TEST_KILL_ENV) or None
    worker_cfg = replace(cfg, progress=False)  # one bar, the driver's, not n interleaved ones
    actors = [worker_cls.remote(worker_cfg, threads, kill_marker) for _ in range(n)]
    pending = {
        actor.run.remote(f"{i}/{n}", str(run_dir)): (i, actor) for i, actor in enumerate(actors)
    }
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_chunks, desc=f"simulate ({n} Ray workers)", unit="part")
    summaries: dict[int, dict[str, Any]] = {}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for ref in ready:
                i, actor = pending.pop(ref)
                try:
                    summaries[i] = ray.get(ref)
                except ray.exceptions.RayError as e:
                    raise RuntimeError(
                        f"simulate: shard {i}/{n} failed (after up to {max_retries} restarts of "
                        f"its worker): {e}; the finished parts stay in {store.folder}, call again "
                        "to resume"
                    ) from e
                with contextlib.suppress(Exception):
                    ray.get(actor.close.remote())
                ray.kill(actor, no_restart=True)
            if bar is not None:
                bar.n = sum(store.done(j) for j in range(n_chunks))
                bar.refresh()
    finally:
        if bar is not None:
            bar.close()
        for _, actor in pending.values():
            ray.kill(actor, no_restart=True)
    return [summaries[i] for i in range(n)]
