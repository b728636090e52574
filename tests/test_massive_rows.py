"""``tools/massive_rows.py``: a coder's error and splice cost split by the norm of the rows, on
a real smoke run, checked against what the train and recovery stages recorded themselves."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "massive_rows.py"


def _measure(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, check=False
    )


def _result(*args: str | Path) -> dict:
    done = _measure(*args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_all_rows_agree_with_the_train_and_recovery_stages(finished_smoke_run: Path) -> None:
    run = finished_smoke_run
    train = json.loads((run / "stages" / "train.json").read_text())["summary"]
    recovery = json.loads((run / "transcoder" / "recovery.json").read_text())
    windows = recovery["config"]["n_windows"]
    got = _result(run, "--windows", str(windows), "--ratio", "1e9")
    # the train stage's held-out FVU is over every eval row: the tool's "all"
    assert got["rows"] == train["eval"][2]
    assert got["fvu"]["all"] == pytest.approx(train["eval"][0], rel=1e-6)
    # the recovery stage splices the coder at every position of the same first windows
    assert got["ce"]["clean"] == pytest.approx(recovery["result"]["ce_clean"], rel=1e-6)
    assert got["ce"]["coder_every_row"] == pytest.approx(
        recovery["result"]["ce_transcoder"], rel=1e-6
    )
    # nothing is massive at this ratio: the ordinary rows are all the rows
    assert got["massive_rows"] == 0 and got["massive_share_at_position_0"] is None
    assert got["fvu"]["ordinary"] == pytest.approx(got["fvu"]["all"], rel=1e-12)
    assert got["fvu"]["massive"] is None
    assert got["ce"]["coder_ordinary_rows"] == pytest.approx(got["ce"]["coder_every_row"])
    assert 0.0 < got["top_dimension_variance_share"] <= 1.0


def test_a_ratio_of_one_splits_the_rows_at_the_median(finished_smoke_run: Path) -> None:
    got = _result(finished_smoke_run, "--ratio", "1", "--windows", "2")
    n = got["rows"]
    assert got["limit"] == pytest.approx(got["median_norm"])
    assert n // 2 - 1 <= got["massive_rows"] <= n // 2
    assert got["fvu"]["massive"] is not None and got["fvu"]["ordinary"] is not None
    assert 0.0 <= got["massive_share_at_position_0"] <= 1.0
    # half the rows keep the subject's own output: the splice's cost moves
    assert got["ce"]["coder_ordinary_rows"] != got["ce"]["coder_every_row"]


def test_broken_inputs_are_refused_naming_them(finished_smoke_run: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-run"
    done = _measure(missing)
    assert done.returncode == 2 and str(missing) in done.stderr and "collect" in done.stderr

    done = _measure(finished_smoke_run, "--ratio", "0")
    assert done.returncode == 2 and "--ratio must be > 0" in done.stderr

    done = _measure(finished_smoke_run, "--windows", "-1")
    assert done.returncode == 2 and "--windows must be >= 0" in done.stderr

    no_coder = tmp_path / "no-coder"
    shutil.copytree(finished_smoke_run / "activations", no_coder / "activations")
    done = _measure(no_coder)
    assert done.returncode == 2 and str(no_coder / "transcoder") in done.stderr

    no_eval = tmp_path / "no-eval"
    shutil.copytree(finished_smoke_run, no_eval)
    shutil.rmtree(no_eval / "activations" / "eval")
    done = _measure(no_eval, "--windows", "0")
    assert done.returncode == 2 and "manifest.json is missing" in done.stderr


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_retrain_leaves_out_the_massive_rows_and_only_reads_the_run(
    finished_smoke_run: Path, tmp_path: Path
) -> None:
    before = _listing(finished_smoke_run)
    out = tmp_path / "retrained"
    got = _result(finished_smoke_run, "--ratio", "1", "--windows", "2", "--retrain", out)
    assert _listing(finished_smoke_run) == before
    run_record = json.loads((finished_smoke_run / "transcoder" / "train.json").read_text())
    new_record = json.loads((out / "train.json").read_text())
    run_cfg, new_cfg = run_record["config"], new_record["config"]
    assert new_cfg["num_latents"] == run_cfg["num_latents"] and new_cfg["k"] == run_cfg["k"]
    # trained on the ordinary rows only: about half of them at a ratio of one, same epochs
    assert 0.3 < new_record["tokens"] / run_record["tokens"] < 0.7
    retrained = got["retrained"]
    assert retrained["out"] == str(out)
    assert retrained["fvu"]["ordinary"] is not None and retrained["fvu"]["ordinary"] > 0
    assert set(retrained["ce"]) == {"clean", "coder_every_row", "coder_ordinary_rows"}
    assert retrained["ce"]["clean"] == got["ce"]["clean"]


def test_retrain_needs_a_coder_the_run_trained(finished_smoke_run: Path, tmp_path: Path) -> None:
    adopted = tmp_path / "adopted"
    shutil.copytree(finished_smoke_run, adopted)
    (adopted / "transcoder" / "train.json").unlink()
    done = _measure(adopted, "--windows", "0", "--retrain", tmp_path / "out")
    assert done.returncode == 2
    assert str(adopted / "transcoder" / "train.json") in done.stderr and "--retrain" in done.stderr
    assert not (tmp_path / "out").exists()

    done = _measure(finished_smoke_run, "--windows", "0", "--retrain", finished_smoke_run / "x")
    assert done.returncode == 2 and "inside the run directory" in done.stderr
    assert not (finished_smoke_run / "x").exists()
