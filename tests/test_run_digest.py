"""``tools/run_digest.py``: two runs of one config give byte-identical tables, and a run that
differs is shown where it differs (issue 19's "two fresh clones, identical tables"), on real
smoke runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl

from nlrw.lib.io import file_digest
from nlrw.lib.rundir import RunDir
from support import run_smoke_pinned

TOOL = Path(__file__).resolve().parent.parent / "tools" / "run_digest.py"


def _digest(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, check=False
    )


def test_a_second_run_of_the_same_config_is_identical(
    finished_smoke_run: Path, tmp_path: Path
) -> None:
    b = run_smoke_pinned(tmp_path / "b")  # as the shared run was made
    written = tmp_path / "digest.json"
    done = _digest(finished_smoke_run, "--write", written)
    assert done.returncode == 0, done.stderr
    digest = json.loads(written.read_text())
    assert "eval/results.parquet" in digest["tables"]
    assert "simulations.parquet" in digest["tables"]
    assert not any(name.endswith(".json") for name in digest["tables"])
    assert digest["torch_cpu_capability"] and digest["versions"]["torch"]
    for against in (written, finished_smoke_run):
        done = _digest(b, "--against", against)
        assert done.returncode == 0, done.stdout + done.stderr
        n = len(digest["tables"])
        assert f"{n} of {n} tables identical" in done.stdout


def _rewrite_as_if_the_stage_made_it(run_dir: Path, stage: str, rel: str, df: pl.DataFrame) -> None:
    path = run_dir / rel
    df.write_parquet(path)
    record_path = RunDir(run_dir).stage_record(stage)
    record = json.loads(record_path.read_text())
    record["outputs"][rel] = [path.stat().st_size, file_digest(path)]
    record_path.write_text(json.dumps(record))


def test_a_run_with_another_result_is_named_by_table_and_column(
    finished_smoke_run: Path, tmp_path: Path
) -> None:
    b = tmp_path / "b"
    shutil.copytree(finished_smoke_run, b)
    results = pl.read_parquet(b / "eval" / "results.parquet")
    shifted = results.with_columns(pl.col("ce") + 0.001)
    _rewrite_as_if_the_stage_made_it(b, "evaluate", "eval/results.parquet", shifted)
    done = _digest(finished_smoke_run, "--against", b)
    assert done.returncode == 1
    line = next(x for x in done.stdout.splitlines() if "eval/results.parquet" in x)
    assert "DIFFERS" in line and "'ce'" in line and "0.001" in line
    assert "same     simulations.parquet" in done.stdout


def test_a_damaged_run_is_refused_naming_the_file(finished_smoke_run: Path, tmp_path: Path) -> None:
    b = tmp_path / "b"
    shutil.copytree(finished_smoke_run, b)
    with open(b / "simulations.parquet", "ab") as f:
        f.write(b"\0")
    done = _digest(b)
    assert done.returncode != 0
    assert "simulations.parquet: changed since stage simulate wrote it" in done.stderr


def test_broken_inputs_are_refused_naming_them(finished_smoke_run: Path, tmp_path: Path) -> None:
    broken = tmp_path / "digest.json"
    broken.write_text("{not json")
    done = _digest(finished_smoke_run, "--against", broken)
    assert done.returncode != 0 and str(broken) in done.stderr
    assert "not a run directory nor a digest file" in done.stderr
    broken.write_text('{"run_dir": "elsewhere"}')
    done = _digest(finished_smoke_run, "--against", broken)
    assert done.returncode != 0 and "no 'tables' object" in done.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    done = _digest(empty)
    assert done.returncode != 0 and "is it a run directory?" in done.stderr
