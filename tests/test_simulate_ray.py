"""Tests of :mod:`nlrw.simulate_ray`: the simulate stage on a local Ray cluster with 2 CPU
workers matches the single-process result on the smoke preset, and a worker killed after its
first part is restarted by Ray and resumes from that part: nothing lost, nothing doubled.

Skipped when Ray (the ``nlrw[ray]`` extra) is not installed."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import polars as pl
import pytest

from nlrw import simulate
from nlrw.pipeline import load_preset
from nlrw.pipeline import run as run_pipeline
from nlrw.simulate_ray import TEST_KILL_ENV, simulate_distributed

try:
    import ray
except ImportError as e:  # not installed, or a broken install
    pytest.skip(f"Ray is not importable ({e}): pip install 'nlrw[ray]'", allow_module_level=True)


KEY = ["latent", "context_id"]
_OUTPUTS = ("simulations.parquet", "simulate.json", "simulations.parts", "calibrat*", "stages")


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A smoke run up to calibrate: the simulate stage ran in one process."""
    path = tmp_path_factory.mktemp("distributed") / "smoke"
    run_pipeline(load_preset("smoke"), path, until="calibrate", log=lambda _: None)
    return path


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """A local Ray instance of 2 CPUs, shut down after the module."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning")
    try:
        yield
    finally:
        ray.shutdown()


def _inputs(smoke_dir: Path, dest: Path) -> Path:
    """A fresh run directory with the smoke run's inputs and none of the simulate outputs."""
    shutil.copytree(smoke_dir, dest, ignore=shutil.ignore_patterns(*_OUTPUTS))
    return dest


def _cfg() -> simulate.SimulateConfig:
    return load_preset("smoke").simulate


def _check_table(table: pl.DataFrame, reference: pl.DataFrame, run_dir: Path) -> None:
    assert table.select(KEY).is_duplicated().sum() == 0
    assert table.height == reference.height == (3 * 18)  # 3 explained latents x 18 contexts
    assert table.sort(KEY).equals(reference.sort(KEY))
    assert pl.read_parquet(run_dir / "simulations.parquet").sort(KEY).equals(reference.sort(KEY))


def test_two_ray_workers_match_the_single_process_run(
    smoke_dir: Path, cluster: None, tmp_path: Path
) -> None:
    run_dir = _inputs(smoke_dir, tmp_path / "run")
    table = simulate_distributed(_cfg(), run_dir, n_workers=2)
    reference = pl.read_parquet(smoke_dir / "simulations.parquet")
    _check_table(table, reference, run_dir)

    record = json.loads((run_dir / "simulate.json").read_text())
    reference_record = json.loads((smoke_dir / "simulate.json").read_text())
    assert record["key"] == reference_record["key"]  # the same stage, so the pipeline skips it
    info = record["distributed"]
    assert info["n_workers"] == 2
    workers = info["workers"]
    assert [w["shard"] for w in workers] == ["0/2", "1/2"]
    assert len({w["pid"] for w in workers}) == 2  # two worker processes
    assert all(w["threads"] == 1 and not w["restarted"] for w in workers)  # 2 cores / 2
    assert sorted(p.name for p in (run_dir / "simulations.parts").glob("part-*")) == [
        "part-000000.parquet",
        "part-000001.parquet",
    ]
    # Done: a second call returns the table without starting any worker.
    again = simulate_distributed(_cfg(), run_dir, n_workers=2)
    assert again.equals(table)


def test_a_killed_worker_is_restarted_and_resumes_from_its_parts(
    smoke_dir: Path, cluster: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One latent per part: shard 0/2 runs parts 0 and 2, shard 1/2 runs part 1.
    cfg = replace(_cfg(), chunk_latents=1)
    reference = simulate.run(cfg, _inputs(smoke_dir, tmp_path / "single"))

    run_dir = _inputs(smoke_dir, tmp_path / "run")
    marker = tmp_path / "killed.json"
    monkeypatch.setenv(TEST_KILL_ENV, str(marker))
    table = simulate_distributed(cfg, run_dir, n_workers=2, max_retries=2)
    _check_table(table, reference, run_dir)

    # Shard 0's worker died once, right after writing part 0 ...
    killed = json.loads(marker.read_text())
    assert killed["shard"] == "0/2"
    assert killed["part"] == "part-000000.parquet"
    # ... its part 0 was kept (the same file, not rewritten) ...
    part = (run_dir / "simulations.parts" / killed["part"]).stat()
    assert (part.st_ino, part.st_mtime_ns) == (killed["inode"], killed["mtime_ns"])
    # ... and a restarted worker (another process) wrote part 2.
    workers = {
        w["shard"]: w
        for w in json.loads((run_dir / "simulate.json").read_text())["distributed"]["workers"]
    }
    assert workers["0/2"]["restarted"] and workers["0/2"]["pid"] != killed["pid"]
    assert workers["0/2"]["parts"] == 2
    assert not workers["1/2"]["restarted"]
    assert sorted(p.name for p in (run_dir / "simulations.parts").glob("part-*")) == [
        f"part-{i:06d}.parquet" for i in range(3)
    ]


def test_bad_arguments_are_refused_before_ray_starts(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_workers"):
        simulate_distributed(_cfg(), tmp_path, n_workers=0)
    with pytest.raises(FileNotFoundError, match="contexts stage"):
        simulate_distributed(_cfg(), tmp_path, n_workers=2)
