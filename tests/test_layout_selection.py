"""What chooses the simulator's layout and reading (``benches/bench_simulate_layout.py``) reads
the calibration split only: corrupting every evaluation context, tokens and true activations,
leaves its inputs unchanged. Choosing a prompt on the evaluation contexts would tune on them."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from nlrw.contexts import read_contexts
from nlrw.lib.rundir import RunDir
from nlrw.pipeline import load_preset, run

BENCHES = Path(__file__).resolve().parent.parent / "benches"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("layout_selection")
    run(load_preset("smoke"), run_dir, until="explain", log=lambda _: None)
    return run_dir


def _corrupt_eval_split(run_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    paths = RunDir(run_dir)
    table = read_contexts(run_dir)
    scrambled = table.with_columns(
        pl.when(pl.col("split") == "eval")
        .then(pl.col("input_ids").list.eval(pl.element() * 0 + 7))
        .otherwise(pl.col("input_ids"))
        .alias("input_ids")
    )
    scrambled.write_parquet(paths.contexts)
    tensors = load_file(str(paths.context_activations))
    eval_rows = torch.tensor(
        table.filter(pl.col("split") == "eval")["context_id"].to_list(), dtype=torch.long
    )
    tensors["values"][eval_rows] = 99.0
    save_file(tensors, str(paths.context_activations))


def test_selection_reads_no_evaluation_context(smoke: Path, tmp_path: Path) -> None:
    import shutil

    sys.path.insert(0, str(BENCHES))
    try:
        from bench_simulate_layout import run_pairs
    finally:
        sys.path.remove(str(BENCHES))
    calibration = set(read_contexts(smoke, "calibration")["context_id"].to_list())
    before = run_pairs(smoke, "calibration", None, 6)
    assert set(before.contexts) <= calibration and before.contexts
    corrupted = tmp_path / "corrupted"
    shutil.copytree(smoke, corrupted)
    _corrupt_eval_split(corrupted)
    after = run_pairs(corrupted, "calibration", None, 6)
    assert after.texts == before.texts
    assert after.tokens == before.tokens and before.tokens
    assert after.explanations == before.explanations
    assert before.true is not None and after.true is not None
    np.testing.assert_array_equal(after.true, before.true)
    # the corruption is real: the evaluation split's pairs do change
    assert run_pairs(corrupted, "eval", None, 6).texts != run_pairs(smoke, "eval", None, 6).texts


def test_the_layout_rule_takes_the_fastest_within_the_auroc_margin() -> None:
    sys.path.insert(0, str(BENCHES))
    try:
        from bench_simulate_layout import chosen_layout
    finally:
        sys.path.remove(str(BENCHES))

    def stats(**layouts: tuple[float, float | None]) -> dict[str, dict[str, float | None]]:
        return {
            name.replace("_", "-"): {"ratings_per_s": rate, "mean_auroc": area}
            for name, (rate, area) in layouts.items()
        }

    both = stats(explanation_first=(1.0, 0.70), context_first=(2.0, 0.69), all_at_once=(3.0, 0.60))
    assert chosen_layout(both) == "context-first"  # all-at-once is faster but 0.10 worse
    close = stats(
        explanation_first=(1.0, 0.70), context_first=(2.0, 0.69), all_at_once=(3.0, 0.685)
    )
    assert chosen_layout(close) == "all-at-once"
    worse = stats(explanation_first=(1.0, 0.70), context_first=(2.0, 0.60))
    assert chosen_layout(worse) == "explanation-first"
    assert chosen_layout(stats(explanation_first=(1.0, None), context_first=(5.0, None))) == (
        "explanation-first"
    )
