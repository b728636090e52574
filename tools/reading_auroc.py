#!/usr/bin/env python3
"""How well each simulator reading separates active from inactive contexts, on a finished run's
ratings: the mean per-latent AUROC of every ``--simulate.reading`` computed from the same
simulator outputs, for the real explanations and the shuffled-explanation control.

For choosing the default reading without the evaluation: ``--split calibration`` (the default)
reads only the calibration contexts' rows. A reading is a function of the stored raw ratings
(``expected_value_raw`` where the run applied a reading, else ``expected_value``), the
explanations and the contexts' marked tokens, so every reading is measured without asking the
simulator again, through the simulate stage's own functions
(:func:`nlrw.simulate.apply_reading`). Context-
centering uses the split's contexts only. Latents with one class only on the split are left out
of the means (their count is printed).

Usage::

    python tools/reading_auroc.py runs/demo [--split calibration] [--out readings.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from nlrw.config.simulate import READINGS
from nlrw.contexts import read_contexts
from nlrw.lib.io import atomic_write_json
from nlrw.lib.metrics import auroc
from nlrw.lib.provenance import versions
from nlrw.lib.rundir import RunDir
from nlrw.model.subject import load_tokenizer
from nlrw.simulate import SHUFFLED_FILE, apply_reading, marked_tokens, quoted_word_matches


def _raw(table: pl.DataFrame) -> pl.DataFrame:
    if "expected_value_raw" in table.columns:
        table = table.with_columns(pl.col("expected_value_raw").alias("expected_value"))
        table = table.drop("expected_value_raw")
    return table


def per_latent_auroc(table: pl.DataFrame) -> dict[int, float]:
    """Each latent's AUROC of ``expected_value`` for ``true_activation > 0``."""
    out = {}
    for (lat,), rows in table.sort("latent", "context_id").group_by("latent", maintain_order=True):
        out[int(lat)] = auroc(  # pyright: ignore[reportArgumentType]
            rows["expected_value"].to_numpy().astype(np.float64),
            rows["true_activation"].to_numpy() > 0,
        )
    return out


def _mean(values: dict[int, float]) -> tuple[float | None, int]:
    finite = [v for v in values.values() if not math.isnan(v)]
    return (float(np.mean(finite)) if finite else None), len(finite)


def _json(values: dict[int, float]) -> dict[str, float | None]:
    return {str(k): None if math.isnan(v) else v for k, v in values.items()}


def measure(run_dir: Path, split: str) -> dict[str, Any]:
    """Per reading: the mean per-latent AUROC, real and shuffled (module docstring)."""
    paths = RunDir(run_dir)
    contexts = read_contexts(run_dir, split).sort("context_id")
    ids = contexts["context_id"].to_list()
    keep = pl.col("context_id").is_in(ids)
    real = _raw(pl.read_parquet(paths.simulations).filter(keep))
    control_path = run_dir / SHUFFLED_FILE
    control = _raw(pl.read_parquet(control_path).filter(keep)) if control_path.is_file() else None
    explanations = pl.read_parquet(paths.explanations).filter(pl.col("explanation").is_not_null())
    text = dict(
        zip(explanations["latent"].to_list(), explanations["explanation"].to_list(), strict=True)
    )
    marked = marked_tokens(load_tokenizer(paths.subject_model()), contexts)
    simulated = sorted(set(real["latent"].to_list()))
    donors = (
        dict(zip(control["latent"].to_list(), control["explanation_of"].to_list(), strict=True))
        if control is not None
        else {}
    )
    used = {lat: text[lat] for lat in {*simulated, *donors.values()}}
    matches = quoted_word_matches(used, marked)
    out: dict[str, Any] = {}
    for reading in READINGS:
        got = per_latent_auroc(
            apply_reading(real, reading, matches, {lat: lat for lat in simulated})
        )
        mean, n = _mean(got)
        row: dict[str, Any] = {"auroc": mean, "latents_counted": n, "per_latent": _json(got)}
        if control is not None:
            shuffled = per_latent_auroc(apply_reading(control, reading, matches, donors))
            row["auroc_shuffled"], _ = _mean(shuffled)
            row["per_latent_shuffled"] = _json(shuffled)
        out[reading] = row
    return {"run_dir": str(run_dir), "split": split, "contexts": len(ids), "readings": out}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--split", choices=("calibration", "eval"), default="calibration")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    paths = RunDir(args.run_dir)
    for need in (paths.simulations, paths.explanations, paths.contexts):
        if not need.is_file():
            parser.error(f"{args.run_dir}: no {need.name} (run the simulate stage first)")
    try:
        result = measure(args.run_dir, args.split)
    except (pl.exceptions.PolarsError, KeyError, OSError) as e:
        parser.error(f"{args.run_dir}: unreadable simulate outputs ({type(e).__name__}: {e})")
    summary = {
        reading: {k: v for k, v in row.items() if not k.startswith("per_latent")}
        for reading, row in result["readings"].items()
    }
    print(json.dumps({"split": args.split, "contexts": result["contexts"], **summary}))
    if args.out is not None:
        result["versions"] = versions()
        atomic_write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
