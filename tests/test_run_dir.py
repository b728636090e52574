"""A finished run directory never loses work to a command-line mistake (issue 15).

One smoke run is made once; every case runs the real CLI (``nlrw.cli.main``) on its own copy
and checks the exit status, that the error is one ``nlrw: error:`` line naming the culprit
(no traceback), and that every file the run had is byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from nlrw.cli import main
from nlrw.pipeline import STAGES, chained_hashes, load_preset, load_run_config, locked, run, status


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("smoke") / "run"
    run(load_preset("smoke"), path, log=lambda _: None)
    return path


def digests(run_dir: Path) -> dict[str, str]:
    """Every file of the run (the lock file, which holds the last holder's pid, aside)."""
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip(path: Path) -> None:
    """64 flipped bytes in the middle: the size stays, the content does not."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


@dataclass
class Case:
    args: list[str]
    """Arguments after ``nlrw``; ``RUN`` stands for the copy's path."""
    names: list[str]
    """What the one error line must name."""
    damage: Callable[[Path], object] | None = None
    """Done to the copy before the command (the damaged files are then the 'previous
    outputs' that must stay as they were)."""
    hold_lock: bool = False
    skip_if: Callable[[], bool] = field(default=lambda: False)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


CASES = {
    # A run resumes with its own config: another preset or an option that changes a
    # finished stage is refused, listing the stages and their time.
    "other preset": Case(
        ["run", "--run-dir", "RUN", "--preset", "demo"],
        ["collect (", "train (", "report (", "--rerun", "config.json"],
    ),
    "changed option": Case(
        ["run", "--run-dir", "RUN", "--train.k", "4"], ["train (", "recovery (", "--rerun"]
    ),
    "changed seed of a later stage": Case(
        ["run", "--run-dir", "RUN", "--cache.seed", "7"], ["cache (", "contexts (", "--rerun"]
    ),
    # Stage subcommands take RUN_DIR positionally and use the run's config: a change is
    # refused with --overwrite named.
    "stage subcommand changes a finished stage": Case(
        ["contexts", "RUN", "--n-contexts", "50"], ["contexts (", "--overwrite"]
    ),
    "stage subcommand, run locked by another run": Case(
        ["calibrate", "RUN", "--overwrite"], ["another nlrw process"], hold_lock=True
    ),
    # Options are checked before any work: nothing is deleted on a bad one.
    "backend option of the wrong type": Case(
        ["simulate", "RUN", "--overwrite", "--backend-options", "batch_size", "two"],
        ["--simulate.backend-options", "batch_size", "integer"],
    ),
    "unknown backend option": Case(
        ["run", "--run-dir", "RUN", "--rerun", "--explain.backend-options", "timeout", "2"],
        ["--explain.backend-options", "'timeout'", "transformers backend"],
    ),
    "model path that does not exist": Case(
        ["run", "--run-dir", "RUN", "--rerun", "--collect.model", "/no/such/model"],
        ["--collect.model", "/no/such/model"],
    ),
    "cuda without a GPU": Case(
        ["run", "--run-dir", "RUN", "--rerun", "--collect.device", "cuda"],
        ["--collect.device cuda", "no CUDA device"],
        skip_if=_has_cuda,
    ),
    # Damaged inputs of a stage: one line naming the file.
    "truncated explanations given to report": Case(
        ["report", "RUN", "--overwrite"],
        ["explanations.parquet"],
        damage=lambda run_dir: truncate(run_dir / "explanations.parquet"),
    ),
    "truncated simulations given to report": Case(
        ["report", "RUN", "--overwrite"],
        ["simulations.parquet"],
        damage=lambda run_dir: truncate(run_dir / "simulations.parquet"),
    ),
    "truncated coder given to evaluate": Case(
        ["evaluate", "RUN", "--overwrite"],
        ["sae.safetensors", "train stage"],
        damage=lambda run_dir: truncate(run_dir / "transcoder/model.layers.1.mlp/sae.safetensors"),
    ),
    "flipped bytes in an activation shard, cache redone with another seed": Case(
        ["cache", "RUN", "--overwrite", "--seed", "7"],
        ["shard-000001.safetensors", "collect stage"],
        damage=lambda run_dir: flip(run_dir / "activations/train/shard-000001.safetensors"),
    ),
    "flipped bytes in explanations given to report": Case(
        ["report", "RUN", "--overwrite"],
        ["explanations.parquet", "explain stage"],
        damage=lambda run_dir: flip(run_dir / "explanations.parquet"),
    ),
    # A failure while a stage runs puts its previous outputs (and config.json) back.
    "unreachable server": Case(
        [
            "simulate",
            "RUN",
            "--overwrite",
            "--backend",
            "openai",
            "--base-url",
            "http://127.0.0.1:9/v1",
            "--backend-options",
            "max_retries",
            "0",
            "timeout",
            "1",
        ],
        ["http://127.0.0.1:9/v1", "Connection refused"],
    ),
    "damaged config.json": Case(
        ["run", "--run-dir", "RUN"],
        ["config.json"],
        damage=lambda run_dir: (run_dir / "config.json").write_text("{"),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_mistake_is_one_line_and_changes_nothing(
    smoke: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    case = CASES[name]
    if case.skip_if():
        pytest.skip("needs a machine without that device")
    copy = tmp_path / "run"
    shutil.copytree(smoke, copy)
    if case.damage is not None:
        case.damage(copy)
    before = digests(copy)
    args = [str(copy) if a == "RUN" else a for a in case.args]
    capsys.readouterr()
    if case.hold_lock:
        import subprocess
        import sys

        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import time; from pathlib import Path; from nlrw.pipeline import locked\n"
                f"with locked(Path({str(copy)!r})):\n    print('held', flush=True); time.sleep(60)",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
            code = main(args)
        finally:
            holder.kill()
            holder.wait()
    else:
        code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    # (A backend may log a warning first; the error itself is one line, the last.)
    lines = [line for line in err.strip().splitlines() if line.startswith("nlrw: error: ")]
    assert len(lines) == 1 and err.strip().endswith(lines[0]), err
    assert "Traceback" not in err
    for culprit in case.names:
        assert culprit in lines[0], (culprit, lines[0])
    assert digests(copy) == before
    assert not (copy / ".replaced").exists() or not any((copy / ".replaced").iterdir())


def test_debug_shows_the_traceback(smoke: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(smoke, copy)
    with pytest.raises(ValueError, match="--rerun"):
        main(["run", "--run-dir", str(copy), "--train.k", "4", "--debug"])


def test_run_without_a_preset_resumes_with_the_runs_own_config(
    smoke: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "run"
    shutil.copytree(smoke, copy)
    cfg = load_run_config(copy)
    assert cfg is not None and chained_hashes(cfg) == chained_hashes(load_preset("smoke"))
    outputs = {k: v for k, v in digests(copy).items() if k != "config.json"}
    capsys.readouterr()
    assert main(["run", "--run-dir", str(copy)]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped") == len(STAGES), out
    assert {k: v for k, v in digests(copy).items() if k != "config.json"} == outputs
    # The same preset named again changes nothing either; stage subcommands skip too.
    assert main(["run", "--run-dir", str(copy), "--preset", "smoke"]) == 0
    assert main(["simulate", str(copy)]) == 0
    assert "(--overwrite redoes it)" in capsys.readouterr().out
    assert [s.state for s in status(copy)] == ["done"] * len(STAGES)


def test_a_stage_subcommand_leaves_later_stages_stale_and_run_redoes_them(
    smoke: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "run"
    shutil.copytree(smoke, copy)
    # With --overwrite the stage is redone with the new option; the later stages (whose hash
    # chains through it) become stale, and `run` redoes them without asking: config.json
    # is what they are stale against, no option of this command changes them.
    assert main(["calibrate", str(copy), "--overwrite", "--gate-budget", "0.5"]) == 0
    states = {s.name: s.state for s in status(copy)}
    assert states["calibrate"] == "done"
    assert states["evaluate"] == states["report"] == "stale"
    record = json.loads((copy / "config.json").read_text())
    assert record["config"]["calibrate"]["gate_budget"] == 0.5
    capsys.readouterr()
    assert main(["run", "--run-dir", str(copy)]) == 0
    out = capsys.readouterr().out
    assert "[evaluate] re-running (config changed)" in out
    assert "[report] re-running (config changed)" in out
    assert [s.state for s in status(copy)] == ["done"] * len(STAGES)


def test_backend_options_are_parsed_to_their_types() -> None:
    from nlrw.backends import backend_options

    assert backend_options("openai", (("timeout", "2"), ("max_retries", "1"))) == {
        "timeout": 2.0,
        "max_retries": 1,
    }
    assert backend_options("transformers", {"max_length": "none", "batch_size": "3"}) == {
        "max_length": None,
        "batch_size": 3,
    }
    with pytest.raises(ValueError, match="backend option max_retries must be an integer"):
        backend_options("openai", {"max_retries": "1.5"})


def test_the_report_guards_a_vanishing_ratio_and_shows_itself_done(smoke: Path) -> None:
    recovery = json.loads((smoke / "transcoder" / "recovery.json").read_text())["result"]
    page = (smoke / "report" / "index.html").read_text()
    markdown = (smoke / "report" / "report.md").read_text()
    if abs(recovery["ce_zero"] - recovery["ce_clean"]) < 0.01:
        assert "the ratio is undefined" in markdown
        assert f"{100 * recovery['loss_recovered']:.1f}%" not in page
    assert "running" not in page
    with locked(smoke):  # nothing else holds it
        pass


def test_done_means_verified_and_run_redoes_a_damaged_stage(
    smoke: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "run"
    shutil.copytree(smoke, copy)
    assert main(["verify", str(copy)]) == 0  # no stage changes another stage's outputs
    figure = next((copy / "report").glob("latent_*.png"))
    figure.unlink()
    flip(copy / "scores.parquet")  # same size: only the digests see it
    states = {s.name: s.state for s in status(copy)}
    assert states["report"] == "damaged" and states["score"] == "done"
    capsys.readouterr()
    assert main(["verify", str(copy)]) == 2
    captured = capsys.readouterr()
    assert "scores.parquet" in captured.err and figure.name in captured.err
    # `run` checks sizes always and digests when it has a stage to run: the report's
    # missing figure makes it run, so the flipped scores are seen and score is redone,
    # then everything after it.
    assert main(["run", "--run-dir", str(copy)]) == 0
    out = capsys.readouterr().out
    assert "[score] re-running (" in out and "scores.parquet has changed" in out
    assert "[simulate] re-running (its input from score was redone)" in out
    assert "[report] re-running (" in out
    assert main(["verify", str(copy)]) == 0
    assert figure.is_file()


def test_a_killed_replacement_is_rolled_back(smoke: Path, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    copy = tmp_path / "run"
    shutil.copytree(smoke, copy)
    before = {k: v for k, v in digests(copy).items() if k != "config.json"}
    child = subprocess.Popen(
        [sys.executable, "-m", "nlrw", "simulate", str(copy), "--overwrite"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        moved = copy / ".replaced" / "simulate" / "moved.json"
        deadline = time.monotonic() + 120
        while not moved.is_file() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert moved.is_file(), "the replacement never started"
        time.sleep(1.0)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    states = {s.name: s.state for s in status(copy)}
    if states["simulate"] == "done" and not moved.exists():
        pytest.skip("the stage finished before the kill")
    assert states["simulate"] == "replacing"
    lines: list[str] = []
    run(load_run_config(copy) or load_preset("smoke"), copy, log=lines.append)
    assert "[simulate] an interrupted replacement was rolled back: previous outputs kept" in lines
    assert all("skipped" in line for line in lines[1:]), lines
    assert {k: v for k, v in digests(copy).items() if k != "config.json"} == before


@pytest.mark.parametrize("index", range(1, len(STAGES)))
def test_every_stage_refuses_a_damaged_input(
    smoke: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], index: int
) -> None:
    """The largest output of the stage before, truncated: the stage names it and changes
    nothing (its own outputs included), even with --overwrite."""
    stage, before_it = STAGES[index].name, STAGES[index - 1].name
    copy = tmp_path / "run"
    shutil.copytree(smoke, copy)
    outputs = json.loads((copy / "stages" / f"{before_it}.json").read_text())["outputs"]
    victim = max(outputs, key=lambda rel: outputs[rel][0])
    truncate(copy / victim)
    before = digests(copy)
    capsys.readouterr()
    assert main([stage, str(copy), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nlrw: error: ") and "\n" not in err and "Traceback" not in err
    assert victim in err and f"the {before_it} stage" in err, err
    assert digests(copy) == before


def test_a_run_recorded_before_digests_gets_them_on_its_next_run(
    smoke: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "run"
    shutil.copytree(smoke, copy)
    for stage in STAGES:
        path = copy / "stages" / f"{stage.name}.json"
        record = json.loads(path.read_text())
        del record["outputs"]
        path.write_text(json.dumps(record))
    capsys.readouterr()
    assert main(["verify", str(copy)]) == 0
    assert capsys.readouterr().out.count("no outputs recorded") == len(STAGES)
    assert main(["run", "--run-dir", str(copy)]) == 0
    flip(copy / "contexts.parquet")
    assert main(["verify", str(copy)]) == 2
    assert "contexts.parquet has changed" in capsys.readouterr().err


def test_a_table_without_recorded_digests_is_still_opened_before_use(
    smoke: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "run"
    shutil.copytree(smoke, copy)
    path = copy / "stages" / "explain.json"
    record = json.loads(path.read_text())
    del record["outputs"]
    path.write_text(json.dumps(record))
    truncate(copy / "explanations.parquet")
    before = digests(copy)
    capsys.readouterr()
    assert main(["report", str(copy), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "explanations.parquet is damaged" in err and "explain stage" in err, err
    assert digests(copy) == before


def test_a_run_whose_hashes_this_nlrw_computes_otherwise_is_refused_as_such(
    smoke: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """As if another nlrw (other defaults, another prompt) had made the run: its own config
    now hashes differently; that is said, not blamed on options nobody gave."""
    copy = tmp_path / "run"
    shutil.copytree(smoke, copy)
    config = json.loads((copy / "config.json").read_text())
    config["stage_hashes"]["report"] = "0" * 16
    (copy / "config.json").write_text(json.dumps(config))
    record = json.loads((copy / "stages" / "report.json").read_text())
    (copy / "stages" / "report.json").write_text(json.dumps({**record, "hash": "0" * 16}))
    before = digests(copy)
    capsys.readouterr()
    assert main(["run", "--run-dir", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "report (" in err and "use the nlrw that made the run" in err, err
    assert digests(copy) == before
