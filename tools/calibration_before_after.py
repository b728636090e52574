#!/usr/bin/env python3
"""Spurious survivors per context before and after the sparse-exact calibration (issue 13).

Reads a finished run directory (simulations, contexts, the cache's parts) and recomputes the
calibrations the way nlrw computed them before this change:

* ``uncalibrated``: ``E / 9 · max`` with the max over *every* cached position (position 0
  included), not the reference positions;
* ``quantile``: a 101-entry quantile table of the real activations *zeros included* over every
  cached position, F_sim a 101-entry linear table of the eval scores at ``linspace(0, 1)``,
  ties at the middle of their run, linear interpolation in the real table;
* ``gate``: specificity 0.9 on the calibration split (isotonic is unchanged).

and prints, per calibration, the mean and quantiles of the simulated latents that are active
where the truth is 0 and survive top-k, with the surviving support's precision and recall,
next to the run's own ``calibration_support.parquet`` (the new calibration).

Usage: ``python tools/calibration_before_after.py RUN_DIR``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import polars as pl

from nlrw.calibrate import (
    CalibrateConfig,
    fit_latent,
    gate_apply,
    support_diagnostics,
    uncalibrated,
)
from nlrw.contexts import load_context_activations
from nlrw.model.quantiles import quantile_tables


def old_quantile_normalize(
    scores: np.ndarray, sim_row: np.ndarray, real_row: np.ndarray
) -> np.ndarray:
    """The pre-change rule: both tables at ``linspace(0, 1, Q)``, ties at the run's middle."""
    s = scores.astype(np.float64)
    row = sim_row.astype(np.float64)
    q = row.size
    ps = np.linspace(0.0, 1.0, q)
    a = np.searchsorted(row, s, side="left")
    b = np.searchsorted(row, s, side="right") - 1
    j = np.clip(b, 0, q - 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        f = ps[j] + (s - row[j]) / (row[j + 1] - row[j]) * (ps[j + 1] - ps[j])
    f = np.where(b < 0, 0.0, np.where(b >= q - 1, 1.0, f))
    f = np.where(a <= b, (ps[np.minimum(a, q - 1)] + ps[np.maximum(b, 0)]) / 2, f)
    return np.interp(f, np.linspace(0.0, 1.0, real_row.size), real_row.astype(np.float64))


def summary(support: pl.DataFrame) -> pl.DataFrame:
    return support.group_by("calibration", maintain_order=True).agg(
        pl.col("n_spurious").mean().alias("spurious_mean"),
        pl.col("n_spurious").quantile(0.5).alias("p50"),
        pl.col("n_spurious").quantile(0.9).alias("p90"),
        pl.col("precision").fill_nan(None).mean().alias("precision"),
        pl.col("recall").fill_nan(None).mean().alias("recall"),
    )


def main(run_dir: Path) -> int:
    sims = pl.read_parquet(run_dir / "simulations.parquet").sort("latent", "context_id")
    contexts = pl.read_parquet(run_dir / "contexts.parquet", columns=["context_id", "split"])
    eval_ids = set(contexts.filter(pl.col("split") == "eval")["context_id"].to_list())
    latents = np.unique(sims["latent"].to_numpy())
    parts = json.loads((run_dir / "latents" / "parts.json").read_text())["parts"]
    frame = pl.concat(
        [
            pl.read_parquet(run_dir / "latents" / p["file"], columns=["latent", "value"])
            for p in parts
        ]
    )
    n_rows = json.loads((run_dir / "latents" / "cache.json").read_text())["result"]["n_rows"]
    keep = frame.filter(pl.col("latent").is_in(latents.tolist()))
    index = {int(lat): i for i, lat in enumerate(latents)}
    ids = np.array([index[int(x)] for x in keep["latent"].to_list()], dtype=np.uint32)
    real = quantile_tables(ids, keep["value"].to_numpy(), len(latents), 101, total=n_rows)
    max_all = real[:, -1]

    truth = load_context_activations(run_dir)
    old_rows = []
    cfg = CalibrateConfig(gate_specificity=0.9)
    for i, lat in enumerate(latents.tolist()):
        rows = sims.filter(pl.col("latent") == lat)
        is_eval = rows["context_id"].is_in(list(eval_ids)).to_numpy()
        e = rows["expected_value"].to_numpy().astype(np.float32)
        t = rows["true_activation"].to_numpy()
        ctx = rows["context_id"].to_numpy()
        sim_row = np.quantile(e[is_eval].astype(np.float64), np.linspace(0, 1, 101))
        fit = fit_latent(e[~is_eval], t[~is_eval], cfg)
        methods = {
            "uncalibrated": uncalibrated(e[is_eval], max_all[i]),
            "quantile": old_quantile_normalize(e[is_eval], sim_row, real[i]),
            "gate": gate_apply(e[is_eval], fit.threshold, fit.xs, fit.ys, fit.fill),
        }
        for name, values in methods.items():
            for c, a in zip(ctx[is_eval], values, strict=True):
                old_rows.append((name, lat, int(c), float(max(a, 0.0))))
    old = pl.DataFrame(
        old_rows, schema=["calibration", "latent", "context_id", "activation"], orient="row"
    )
    eval_sorted = np.array(sorted(eval_ids), dtype=np.int64)
    before = pl.concat(
        [
            support_diagnostics(
                name,
                latents.astype(np.int64),
                g["latent"].to_numpy().astype(np.int64),
                g["context_id"].to_numpy().astype(np.int64),
                g["activation"].to_numpy().astype(np.float32),
                eval_sorted,
                truth.values.numpy()[eval_sorted],
                truth.indices.numpy()[eval_sorted],
            )
            for (name,), g in old.group_by(["calibration"], maintain_order=True)
        ]
    )
    after = pl.read_parquet(run_dir / "calibration_support.parquet")
    print("before (the pre-change calibration, recomputed):")
    print(summary(before))
    print("after (this run's calibration_support.parquet):")
    print(summary(after))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
