"""``nlrw run`` killed with SIGKILL at several points and started again ends with the same tables
as an uninterrupted run, and a simulation part finished before the kill is not redone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest

TABLES = (
    "contexts.parquet",
    "explanations.parquet",
    "scores.parquet",
    "simulations.parquet",
    "calibration.parquet",
    "calibration_metrics.parquet",
    "eval/results.parquet",
    "eval/summary.parquet",
)


def _start(run_dir: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    return subprocess.Popen(
        [sys.executable, "-m", "nlrw", "run", "--preset", "smoke", "--run-dir", str(run_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )


def _running(run_dir: Path, stage: str) -> Callable[[], bool]:
    record = run_dir / "stages" / f"{stage}.json"
    return lambda: record.is_file() and '"running"' in record.read_text()


def _kill_when(proc: subprocess.Popen[bytes], ready: Callable[[], bool], timeout: float) -> bool:
    """SIGKILL ``proc`` as soon as ``ready()``; False if it finished first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if ready():
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
        except OSError:  # a file replaced while read
            pass
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"nothing to kill within {timeout} s")


def _sorted(path: Path) -> pl.DataFrame:
    table = pl.read_parquet(path)
    return table.sort(table.columns)


@pytest.mark.slow
def test_killed_runs_resume_to_the_uninterrupted_result(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    assert (
        subprocess.run(
            [sys.executable, "-m", "nlrw", "run", "--preset", "smoke", "--run-dir", str(reference)],
            capture_output=True,
            env={**os.environ, "PYTHONHASHSEED": "0"},
        ).returncode
        == 0
    )

    killed = tmp_path / "killed"
    kills = 0
    for stage in ("train", "explain", "simulate"):
        proc = _start(killed)
        kills += _kill_when(proc, _running(killed, stage), timeout=600)
    # Mid-simulation, after its first part is on disk: that part must survive the restart.
    first_part = killed / "simulations.parts" / "part-000000.parquet"
    if not (killed / "simulations.parquet").exists():
        proc = _start(killed)
        _kill_when(proc, first_part.is_file, timeout=600)
    stamp = first_part.stat().st_mtime_ns if first_part.exists() else None
    assert kills >= 2, "the smoke run finished before it could be killed"

    final = _start(killed)
    assert final.wait(timeout=900) == 0
    if stamp is not None and first_part.exists():
        assert first_part.stat().st_mtime_ns == stamp, "a finished simulation part was redone"
    for name in TABLES:
        assert _sorted(killed / name).equals(_sorted(reference / name)), name
    assert (killed / "report" / "index.html").is_file()


def _limit_file_size(limit: int) -> Callable[[], None]:
    def apply() -> None:
        import resource

        # A write past the limit fails with EFBIG, as one on a full disk fails with ENOSPC;
        # SIGXFSZ (which would kill the process instead) is ignored, and stays so across exec.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow
def test_a_failed_write_fails_its_stage_keeps_earlier_ones_and_resumes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "nlrw", "run", "--preset", "smoke", "--run-dir", str(run_dir)]
    assert subprocess.run([*cmd, "--until", "evaluate"], capture_output=True).returncode == 0
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*.parquet")}
    # The report's PNGs are the first file over 16 KiB that the remaining stage writes.
    failed = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=_limit_file_size(16384))
    assert failed.returncode != 0
    assert "File too large" in failed.stderr
    assert '"running"' in (run_dir / "stages" / "report.json").read_text()
    assert not (run_dir / "report" / "index.html").exists()
    assert not [p for p in run_dir.rglob("*") if ".tmp" in p.name], "a temporary file was left"
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*.parquet")} == before
    resumed = subprocess.run(cmd, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "[evaluate] done already" in resumed.stdout
    assert (run_dir / "report" / "index.html").is_file()
