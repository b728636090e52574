"""Compare two finished runs on the same evaluation contexts: the paired difference in CE of
each simulated rewrite (run B − run A), with a bootstrap 95% CI over contexts and a two-sided
sign-flip p, and each run's simulation AUROC against its shuffled-explanation control.

    python tools/compare_runs.py runs/demo runs/contrastive [--fraction 1.0] [--choice top]

What differs between the runs should be one thing (the explanation method, say): the script
refuses two runs whose evaluation contexts differ (ids or tokens) or that score different
positions of the window (``evaluate.positions``), and says so when they
simulated different latents, since a paired Δ then mixes the two. For every calibration the
row is ``condition = simulated`` at the given fraction and choice (the mean over trials per
context where latents are drawn at random).

Simulation AUROC (per latent, active vs inactive on the true activation of the last token,
over latents with both classes on the split): the mean over latents of the expected value's
AUROC, for the real explanations and for the shuffled control, on the calibration and the
evaluation contexts separately.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from nlrw.contexts import read_contexts, true_activations
from nlrw.lib.metrics import auroc
from nlrw.lib.statistics import paired_sign_flip_p

N_BOOTSTRAP = 10_000


def per_context_ce(run: Path, fraction: float, choice: str) -> dict[str, np.ndarray]:
    """CE per eval context (sorted by id) of every calibration's simulated rewrite, and of the
    run's clean, transcoder and zero-ablation rows."""
    table = pl.read_parquet(run / "eval" / "results.parquet")
    out: dict[str, np.ndarray] = {}
    for name in ("clean", "transcoder", "zero_ablation"):
        rows = table.filter(pl.col("condition") == name).sort("context_id")
        out[name] = rows["ce"].to_numpy()
    sims = table.filter(
        (pl.col("condition") == "simulated")
        & (pl.col("fraction") == fraction)
        & (pl.col("choice") == choice)
    )
    if sims.is_empty():
        raise SystemExit(f"{run}: no simulated rows at fraction {fraction}, choice {choice!r}")
    for calibration in sorted(sims["calibration"].unique().to_list()):
        per = (
            sims.filter(pl.col("calibration") == calibration)
            .group_by("context_id")
            .agg(pl.col("ce").mean())
            .sort("context_id")
        )
        out[f"simulated/{calibration}"] = per["ce"].to_numpy()
    return out


def paired(a: np.ndarray, b: np.ndarray, seed: int) -> dict[str, float]:
    """Mean of ``b − a``, its bootstrap 95% CI over contexts and the sign-flip p."""
    diff = b - a
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(diff), (N_BOOTSTRAP, len(diff)))
    means = diff[draws].mean(1)
    signs = rng.choice(np.array([-1.0, 1.0]), (N_BOOTSTRAP, len(diff)))
    return {
        "mean_a": float(a.mean()),
        "mean_b": float(b.mean()),
        "diff": float(diff.mean()),
        "ci_low": float(np.quantile(means, 0.025)),
        "ci_high": float(np.quantile(means, 0.975)),
        "p": paired_sign_flip_p(diff, signs),
    }


def simulation_auroc(run: Path, table: str) -> dict[str, Any]:
    """Mean per-latent AUROC of ``table``'s expected values on each split."""
    path = run / table
    if not path.is_file():
        return {}
    sims = pl.read_parquet(path, columns=["latent", "context_id", "expected_value"])
    contexts = read_contexts(run)
    out: dict[str, Any] = {}
    for split in ("calibration", "eval"):
        ids = np.asarray(
            contexts.filter(pl.col("split") == split).sort("context_id")["context_id"].to_list(),
            dtype=np.int64,
        )
        latents = np.asarray(sorted(set(sims["latent"].to_list())), dtype=np.int64)
        true = true_activations(run, latents, ids)
        areas = []
        for i, lat in enumerate(latents):
            ev = (
                sims.filter(pl.col("latent") == int(lat))
                .filter(pl.col("context_id").is_in(ids.tolist()))
                .sort("context_id")["expected_value"]
                .to_numpy()
            )
            area = auroc(ev, true[i] > 0)
            if not np.isnan(area):
                areas.append(area)
        out[split] = {
            "mean_auroc": float(np.mean(areas)) if areas else None,
            "latents_with_both_classes": len(areas),
        }
    return out


def check_same_contexts(a: Path, b: Path) -> None:
    ca = read_contexts(a).filter(pl.col("split") == "eval").sort("context_id")
    cb = read_contexts(b).filter(pl.col("split") == "eval").sort("context_id")
    if (
        ca.select("context_id", "input_ids").to_dicts()
        != cb.select("context_id", "input_ids").to_dicts()
    ):
        raise SystemExit(f"{a} and {b} evaluate different contexts: a paired Δ is meaningless")


def positions_of(run: Path) -> int:
    """How many positions of each window the run's evaluate stage scored (1: the paper's last
    position; ``ctx_len`` with ``evaluate.positions = all``; 1 for a run before the option)."""
    try:
        record = json.loads((run / "eval.json").read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"{run / 'eval.json'}: not readable ({e}): run evaluate first") from None
    value = record.get("positions_per_context", 1)
    return value if isinstance(value, int) else 1


def check_same_positions(a: Path, b: Path) -> None:
    pa, pb = positions_of(a), positions_of(b)
    if pa != pb:
        raise SystemExit(
            f"{a} scores {pa} position(s) per window and {b} {pb}: the mean CE over a window "
            "and the last position's are different quantities, a paired Δ is meaningless"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path, help="run A (the reference)")
    parser.add_argument("b", type=Path, help="run B")
    parser.add_argument("--fraction", type=float, default=1.0)
    parser.add_argument("--choice", default="top")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    check_same_contexts(args.a, args.b)
    check_same_positions(args.a, args.b)
    lat_a, lat_b = (
        sorted(set(pl.read_parquet(r / "simulations.parquet", columns=["latent"])["latent"]))
        for r in (args.a, args.b)
    )
    ce_a = per_context_ce(args.a, args.fraction, args.choice)
    ce_b = per_context_ce(args.b, args.fraction, args.choice)
    report: dict[str, Any] = {
        "a": str(args.a),
        "b": str(args.b),
        "same_latents": lat_a == lat_b,
        "latents_a": lat_a,
        "latents_b": lat_b,
        "fraction": args.fraction,
        "choice": args.choice,
        "paired_b_minus_a": {
            key: paired(ce_a[key], ce_b[key], args.seed) for key in sorted(set(ce_a) & set(ce_b))
        },
        "simulation_auroc": {
            str(run): {
                "real": simulation_auroc(run, "simulations.parquet"),
                "shuffled": simulation_auroc(run, "simulations_shuffled.parquet"),
            }
            for run in (args.a, args.b)
        },
    }
    if not report["same_latents"]:
        print(
            f"note: the runs simulated different latents ({lat_a} vs {lat_b}): the paired Δ "
            "mixes the explanation method with the latents chosen",
            file=sys.stderr,
        )
    text = json.dumps(report, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
