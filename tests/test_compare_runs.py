"""``tools/compare_runs.py``: the paired Δ of two runs on the same evaluation contexts (issue
18's default-vs-contrastive comparison), on real smoke runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "compare_runs.py"


def _compare(a: Path, b: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(TOOL), str(a), str(b)], capture_output=True, text=True, check=False
    )


def test_a_shifted_rewrite_shows_as_its_shift(finished_smoke_run: Path, tmp_path: Path) -> None:
    b = tmp_path / "b"
    shutil.copytree(finished_smoke_run, b)
    results = pl.read_parquet(b / "eval" / "results.parquet")
    shifted = results.with_columns(
        pl.when((pl.col("condition") == "simulated") & (pl.col("calibration") == "quantile"))
        .then(pl.col("ce") + 0.25)
        .otherwise(pl.col("ce"))
        .alias("ce")
    )
    shifted.write_parquet(b / "eval" / "results.parquet")
    done = _compare(finished_smoke_run, b)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["same_latents"]
    quantile = report["paired_b_minus_a"]["simulated/quantile"]
    assert quantile["diff"] == pytest.approx(0.25)
    assert quantile["ci_low"] == pytest.approx(0.25) and quantile["p"] < 0.01
    assert report["paired_b_minus_a"]["simulated/uncalibrated"]["diff"] == 0.0
    real = report["simulation_auroc"][str(finished_smoke_run)]["real"]
    assert set(real) == {"calibration", "eval"}


def test_runs_on_other_contexts_are_refused(finished_smoke_run: Path, tmp_path: Path) -> None:
    b = tmp_path / "b"
    shutil.copytree(finished_smoke_run, b)
    contexts = pl.read_parquet(b / "contexts.parquet")
    contexts.with_columns(pl.col("input_ids").list.reverse()).write_parquet(b / "contexts.parquet")
    done = _compare(finished_smoke_run, b)
    assert done.returncode != 0 and "evaluate different contexts" in done.stderr


def test_runs_scoring_other_positions_are_refused(finished_smoke_run: Path, tmp_path: Path) -> None:
    b = tmp_path / "b"
    shutil.copytree(finished_smoke_run, b)
    record = json.loads((b / "eval.json").read_text())
    assert record["positions_per_context"] == 1
    record["positions_per_context"] = 32
    (b / "eval.json").write_text(json.dumps(record))
    done = _compare(finished_smoke_run, b)
    assert done.returncode != 0 and "different quantities" in done.stderr
