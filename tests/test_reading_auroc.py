"""``tools/reading_auroc.py``: every simulator reading's AUROC from one run's stored ratings,
equal to what the simulate stage writes under that reading; the calibration split's numbers
(what chooses the default reading) do not move when every evaluation row is corrupted; broken
input is refused in one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
import pytest

from nlrw import simulate
from nlrw.config.simulate import SimulateConfig
from nlrw.contexts import read_contexts
from support import load_tool, quote_a_marked_word, run_tool, smoke_run_with_readable_explanations
from test_simulate import TINY, FakeSimulator


def _cfg(**kw) -> SimulateConfig:
    return SimulateConfig(
        model=TINY, dtype="float32", progress=False, chunk_latents=1, shuffled_control=True, **kw
    )


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = smoke_run_with_readable_explanations(tmp_path_factory.mktemp("readings") / "run")
    quote_a_marked_word(run_dir, 41)  # so that the quoted-word reading differs from E
    simulate.run(_cfg(), run_dir, backend=FakeSimulator())
    return run_dir


def test_each_reading_equals_the_stage_under_that_reading(simulated: Path, tmp_path: Path) -> None:
    tool = load_tool("reading_auroc")
    differ = []
    for split in ("calibration", "eval"):
        got = tool.measure(simulated, split)["readings"]
        ids = read_contexts(simulated, split)["context_id"].to_list()
        for reading in ("expected", "quoted-word"):
            copy = tmp_path / f"{split}-{reading}"
            shutil.copytree(simulated, copy)
            table = simulate.run(
                _cfg(reading=reading), copy, backend=FakeSimulator(), overwrite=True
            ).filter(pl.col("context_id").is_in(ids))
            want = tool.per_latent_auroc(table)
            assert got[reading]["per_latent"] == tool._json(want), (split, reading)
        differ.append(got["quoted-word"]["per_latent"] != got["expected"]["per_latent"])
    assert any(differ)  # latent 41 quotes a marked word: the reading moves its AUROC


def test_the_calibration_numbers_ignore_the_evaluation_rows(
    simulated: Path, tmp_path: Path
) -> None:
    tool = load_tool("reading_auroc")
    before = tool.measure(simulated, "calibration")
    corrupted = tmp_path / "corrupted"
    shutil.copytree(simulated, corrupted)
    eval_ids = read_contexts(corrupted, "eval")["context_id"].to_list()
    for name in ("simulations.parquet", "simulations_shuffled.parquet"):
        path = corrupted / name
        table = pl.read_parquet(path)
        is_eval = pl.col("context_id").is_in(eval_ids)
        table.with_columns(
            pl.when(is_eval).then(9.0).otherwise(pl.col("expected_value")).alias("expected_value"),
            pl.when(is_eval)
            .then(99.0)
            .otherwise(pl.col("true_activation"))
            .alias("true_activation"),
        ).write_parquet(path)
    after = tool.measure(corrupted, "calibration")
    assert after["readings"] == before["readings"]
    assert (
        tool.measure(corrupted, "eval")["readings"] != tool.measure(simulated, "eval")["readings"]
    )


def test_broken_input_is_refused_in_one_line(simulated: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    done = run_tool("reading_auroc", str(empty))
    assert done.returncode == 2
    assert "no simulations.parquet (run the simulate stage first)" in done.stderr
    broken = tmp_path / "broken"
    shutil.copytree(simulated, broken)
    (broken / "simulations.parquet").write_bytes(b"not parquet")
    done = run_tool("reading_auroc", str(broken))
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert "unreadable simulate outputs" in last
