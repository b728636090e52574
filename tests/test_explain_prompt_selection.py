"""``tools/explain_prompt_selection.py``: what chooses the explainer's prompt draws latents the
run did not explain, reads the latent cache only (a run without its contexts gives the same
numbers), scores each style with the stage's consistency check, and refuses broken input."""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
import pytest

from nlrw.explain import CacheSource
from nlrw.lib.rundir import RunDir
from nlrw.pipeline import load_preset, run
from support import FakeExplainer, load_tool, run_tool


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("prompt_selection") / "run"
    run(load_preset("smoke"), run_dir, until="explain", log=lambda _: None)
    return run_dir


def _replies(chat, seed) -> str:
    """A reply that depends on the prompt style: the single-word system message gets the
    latent's first marked word quoted, the default a phrase."""
    if "The word" in chat[0]["content"]:
        first = chat[-1]["content"].split("<<", 1)[1].split(">>", 1)[0].strip()
        return f'The word "{first}"'
    return "Words in a sentence"


def test_selection_skips_the_runs_own_latents_and_reads_no_context(
    smoke: Path, tmp_path: Path
) -> None:
    tool = load_tool("explain_prompt_selection")
    cfg = load_preset("smoke").explain
    source = CacheSource(smoke)
    own = set(
        pl.read_parquet(RunDir(smoke).explanations)
        .filter(pl.col("status") != "skipped")["latent"]
        .to_list()
    )
    latents = tool.selection_latents(source, cfg, 4, 1, own)
    assert latents and not set(latents) & own
    result = tool.measure(source, FakeExplainer(_replies), cfg, latents, ["nlrw", "single-word"])
    assert result["nlrw"]["mean"] == 0.0  # no quoted word: 0
    assert all(r["explanation"] == "Words in a sentence" for r in result["nlrw"]["latents"])
    single = result["single-word"]["latents"]
    assert all(r["explanation"].startswith('The word "') for r in single)
    assert 0.0 < result["single-word"]["mean"] <= 1.0
    # The same numbers from a copy of the run without its contexts (evaluation and
    # calibration windows): the selection never reads them.
    bare = tmp_path / "bare"
    shutil.copytree(smoke, bare)
    paths = RunDir(bare)
    paths.contexts.unlink()
    paths.context_activations.unlink()
    again = tool.measure(
        CacheSource(bare), FakeExplainer(_replies), cfg, latents, ["nlrw", "single-word"]
    )
    assert again == result


def test_broken_input_is_refused_in_one_line(smoke: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    done = run_tool("explain_prompt_selection", str(empty))
    assert done.returncode == 2
    assert "not a run directory with explanations.parquet" in done.stderr.strip().splitlines()[-1]
    done = run_tool("explain_prompt_selection", str(smoke), "--styles", "nlrw,terse")
    assert done.returncode == 2
    assert "--styles: unknown explain.prompt 'terse'" in done.stderr
    done = run_tool("explain_prompt_selection", str(smoke), "--n", "0")
    assert done.returncode == 2 and "--n must be at least 1" in done.stderr
    damaged = tmp_path / "damaged"
    shutil.copytree(smoke, damaged)
    RunDir(damaged).config.write_text("{not json")
    done = run_tool("explain_prompt_selection", str(damaged))
    assert done.returncode == 2 and "is damaged" in done.stderr
