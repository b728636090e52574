"""The stage graph: presets, skip-when-done, downstream re-runs, status, CLI errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from nlrw.cli import main
from nlrw.pipeline import (
    STAGES,
    RerunRefused,
    RunConfig,
    chained_hashes,
    load_preset,
    preset_names,
    run,
    status,
)


def test_shipped_presets_load_and_differ() -> None:
    assert {"demo", "smoke"} <= set(preset_names())
    demo, smoke = load_preset("demo"), load_preset("smoke")
    assert demo.collect.model == "smollm2-135m"
    assert demo.collect.hookpoint == "model.layers.0.mlp"
    assert demo.explain.prompt == "single-word"
    assert smoke.collect.n_tokens < demo.collect.n_tokens


def test_changing_a_stage_changes_its_hash_and_downstream_only() -> None:
    base = load_preset("smoke")
    changed_train = RunConfig(base.collect, base.train.__class__(**{**base.train.__dict__, "k": 4}))
    a, b = chained_hashes(base), chained_hashes(changed_train)
    assert a["collect"] == b["collect"]
    assert a["train"] != b["train"]


def test_a_field_added_with_its_neutral_default_keeps_older_runs_hashes() -> None:
    """A run directory an earlier nlrw made (its evaluate config without ``positions``)
    keeps its evaluate hash; asking for every position changes evaluate and report only."""
    from nlrw.lib.provenance import config_hash, to_jsonable

    base = load_preset("demo")
    hashes = chained_hashes(base)
    older = {k: v for k, v in to_jsonable(base.evaluate).items() if k != "positions"}
    previous = hashes[STAGES[[s.name for s in STAGES].index("evaluate") - 1].name]
    assert hashes["evaluate"] == config_hash({"upstream": previous, "config": older})
    every = dataclasses.replace(base, evaluate=dataclasses.replace(base.evaluate, positions="all"))
    changed = [n for n, h in chained_hashes(every).items() if h != hashes[n]]
    assert changed == ["evaluate", "report"]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[collect]\nn_tokens = 5\n[bogus]\nx = 1\n", "unknown option 'bogus'"),
        ("[collect]\nnot_a_field = 1\n", r"unknown option 'collect\.not_a_field'"),
        ("[collect\n", "invalid TOML"),
        ('[collect]\nkind = "sae"\n', "collect.kind = 'sae' but train.kind = 'transcoder'"),
    ],
)
def test_bad_preset_files_name_the_file_and_the_problem(tmp_path: Path, text: str, match: str):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as err:
        load_preset(str(path))
    assert "bad.toml" in str(err.value)


def test_smoke_run_skips_finished_stages_and_reruns_only_downstream(tmp_path: Path) -> None:
    cfg = load_preset("smoke")
    lines: list[str] = []
    run(cfg, tmp_path, log=lines.append)
    assert [line.split()[0] for line in lines if " done in " in line] == [
        f"[{stage.name}]" for stage in STAGES
    ]
    record = json.loads((tmp_path / "config.json").read_text())
    assert record["stage_hashes"] == chained_hashes(cfg)
    assert record["versions"]["torch"]
    assert record["config"]["collect"]["model"] == "tiny-random-llama"
    assert [s.state for s in status(tmp_path)] == ["done"] * len(STAGES)
    # The report says how few latents the rewrite touched: the smoke preset simulates 3.
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    n_sim, n_all = evaluation["n_simulated_latents"], evaluation["num_latents"]
    assert 0 < n_sim < n_all
    page = (tmp_path / "report" / "index.html").read_text()
    assert f"{n_sim:,} of {n_all:,}" in page
    assert f"all {n_sim:,} simulated latents replaced" in page

    lines.clear()
    run(cfg, tmp_path, log=lines.append)
    assert all("skipped" in line for line in lines)

    lines.clear()
    train = cfg.train.__class__(**{**cfg.train.__dict__, "k": 4})
    changed = dataclasses.replace(cfg, train=train)
    with pytest.raises(RerunRefused, match=r"train \(.*recovery \(.*report \("):
        run(changed, tmp_path, log=lines.append)
    assert not lines  # refused before anything ran
    run(changed, tmp_path, rerun=True, log=lines.append)
    assert lines[0] == "[collect] done already" + lines[0].split("done already")[1]
    assert "[train] re-running (config changed)" in lines
    assert "[recovery] re-running (config changed)" in lines
    cfg_json = json.loads((tmp_path / "transcoder" / "model.layers.1.mlp" / "cfg.json").read_text())
    assert cfg_json["k"] == 4
    recovery = json.loads((tmp_path / "transcoder" / "recovery.json").read_text())["result"]
    assert recovery["n_tokens"] > 0 and recovery["ce_clean"] > 0


def test_a_killed_stage_shows_as_partial_and_resumes(tmp_path: Path) -> None:
    cfg = load_preset("smoke")
    run(cfg, tmp_path, until="collect", log=lambda _: None)
    # As if the run had been killed during train: a running record with the current hash.
    hashes = chained_hashes(cfg)
    stages = tmp_path / "stages"
    (stages / "train.json").write_text(json.dumps({"status": "running", "hash": hashes["train"]}))
    states = {s.name: s.state for s in status(tmp_path)}
    assert states == {
        s.name: {"collect": "done", "train": "partial"}.get(s.name, "not started") for s in STAGES
    }
    lines: list[str] = []
    run(cfg, tmp_path, log=lines.append)
    assert "[train] resuming" in lines


def test_cli_errors_are_one_line_with_status_2(tmp_path: Path, capsys) -> None:
    assert main(["run", "--preset", "no-such-preset"]) == 2
    assert "unknown preset 'no-such-preset'" in capsys.readouterr().err
    assert main(["status", str(tmp_path)]) == 2
    assert "is " + str(tmp_path) + " a run directory" in capsys.readouterr().err
    assert main(["shards-verify", str(tmp_path)]) == 2
    assert "manifest" in capsys.readouterr().err


def test_a_second_process_on_the_same_run_dir_is_refused(tmp_path: Path) -> None:
    import subprocess
    import sys

    from nlrw.pipeline import RunDirError, locked

    # A real second process holds the lock (flock is per open file, so a thread would not do).
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from nlrw.pipeline import locked\n"
            f"with locked(Path({str(tmp_path)!r})):\n"
            "    print('held', flush=True); time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirError, match=rf"another nlrw process \(pid {holder.pid}\)"):
            run(load_preset("smoke"), tmp_path, log=lambda _: None)
        assert main(["run", "--preset", "smoke", "--run-dir", str(tmp_path)]) == 2
    finally:
        holder.kill()
        holder.wait()
    # Killed holder: the kernel dropped its lock, nothing stale remains.
    with locked(tmp_path):
        pass


def test_a_run_dir_of_another_format_is_refused(tmp_path: Path) -> None:
    from nlrw.pipeline import RunDirError

    (tmp_path / "config.json").write_text(json.dumps({"format": "nlrw.run.v0"}))
    with pytest.raises(RunDirError, match=r"incompatible nlrw.*nlrw\.run\.v0"):
        run(load_preset("smoke"), tmp_path, log=lambda _: None)
    assert not (tmp_path / "stages").exists()


def test_paper_preset_dry_run_prints_config_and_work_sizes(tmp_path: Path, capsys) -> None:
    target = tmp_path / "paper"
    assert (
        main(["run", "--preset", "pythia-160m-paper", "--dry-run", "--run-dir", str(target)]) == 0
    )
    out = capsys.readouterr().out
    assert '"model": "EleutherAI/pythia-160m"' in out
    assert '"hookpoint": "gpt_neox.layers.6.mlp"' in out
    assert "32,768 latents, k = 32" in out
    assert "1,000 eval + 200 calibration contexts of 32 tokens" in out
    # Every stage's model, backend and work size: the paper's simulator on vLLM, its prompt.
    assert (
        "32,768 latents x 1,200 contexts = 39,321,600 prompts "
        "(vllm: meta-llama/Llama-3.1-8B-Instruct, paper prompt" in out
    )
    assert "(openai: meta-llama/Llama-3.1-70B-Instruct)" in out
    assert '"tensor_parallel_size"' in out and '"positions": "paper"' in out
    for stage in ("calibrate", "evaluate", "report"):
        line = next(x for x in out.splitlines() if x.startswith(stage + " "))
        assert len(line.split(None, 2)) == 3, line  # a work size is printed
    assert not target.exists()
