"""How much a run's explanations say about held-out contexts without any simulator: the
**lexical simulation** of a latent rates a context 1 when its marked (last) token is one of the
words the explanation quotes, 0 otherwise, and its per-latent AUROC for active vs inactive
contexts is set beside the LLM simulator's on the same pairs, with a shuffled-explanation
control for both (issue 18: is the missing signal in the explanations or in the simulator?).

    python tools/lexical_simulation.py runs/demo [--split calibration] [--seed 0]

Only explanations that quote words take part (``quoted_words`` in ``explanations.parquet``,
as the explain stage's consistency check parses them). A token matches a word when, with
whitespace removed and case-folded, they are equal (the consistency check's rule). Latents
with one class only on the split are left out of the means. The shuffled control gives each
latent the quoted words of another latent (a seeded derangement over the latents taking part);
the simulator's shuffled AUROC comes from ``simulations_shuffled.parquet`` where the run has
one. Prints JSON. Nothing here is fitted: the split only says which contexts are read.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from nlrw.contexts import read_contexts, true_activations
from nlrw.explain import consistency
from nlrw.lib.metrics import auroc
from nlrw.lib.rundir import RunDir
from nlrw.model.subject import load_tokenizer


def derangement(n: int, seed: int) -> np.ndarray:
    """A seeded permutation of range(n) with no fixed point (n ≥ 2)."""
    rng = np.random.default_rng(seed)
    while True:
        p = rng.permutation(n)
        if not (p == np.arange(n)).any():
            return p


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else None


def read_simulations(path: Path) -> pl.DataFrame | None:
    """The (latent, context_id, expected_value) columns of a simulations table; None when the
    run has none."""
    if not path.is_file():
        return None
    return pl.read_parquet(path, columns=["latent", "context_id", "expected_value"])


def simulator_scores(
    table: pl.DataFrame | None, latent: int, context_ids: np.ndarray
) -> np.ndarray | None:
    """The expected values of ``latent`` on ``context_ids`` from a simulations table, in
    that order; None when the table or the latent's pairs are missing."""
    if table is None:
        return None
    rows = table.filter(pl.col("latent") == latent)
    by_context = dict(
        zip(rows["context_id"].to_list(), rows["expected_value"].to_list(), strict=True)
    )
    if not all(int(c) in by_context for c in context_ids):
        return None
    return np.array([by_context[int(c)] for c in context_ids], np.float64)


def measure(run_dir: Path, split: str, seed: int) -> dict[str, Any]:
    """Per-latent AUROCs and their means (module docstring)."""
    paths = RunDir(run_dir)
    config = json.loads(paths.config.read_text())["config"]
    explanations = pl.read_parquet(run_dir / "explanations.parquet")
    quoting = explanations.filter(
        pl.col("explanation").is_not_null() & (pl.col("quoted_words").list.len() > 0)
    ).sort("latent")
    if quoting.height < 2:
        raise SystemExit(f"{run_dir}: fewer than two explanations quote words")
    contexts = read_contexts(run_dir, split).sort("context_id")
    context_ids = contexts["context_id"].to_numpy()
    tokenizer = load_tokenizer(config["collect"]["model"])
    marked = [tokenizer.decode([ids[-1]]) for ids in contexts["input_ids"].to_list()]
    latents = quoting["latent"].to_numpy()
    active = true_activations(run_dir, latents, context_ids) > 0  # [latents, contexts]
    texts = quoting["explanation"].to_list()
    other = derangement(len(texts), seed)
    simulations = read_simulations(paths.simulations)
    simulations_shuffled = read_simulations(paths.simulations_shuffled)

    def lexical(explanation: str) -> np.ndarray:
        return np.array([consistency(explanation, [t])[0] == 1.0 for t in marked], np.float64)

    rows = []
    for i, latent in enumerate(latents.tolist()):
        real, shuffled = lexical(texts[i]), lexical(texts[other[i]])
        sim = simulator_scores(simulations, latent, context_ids)
        sim_shuffled = simulator_scores(simulations_shuffled, latent, context_ids)
        rows.append(
            {
                "latent": latent,
                "explanation": texts[i],
                "n_active": int(active[i].sum()),
                "matches": int(real.sum()),
                "matches_when_active": int(real[active[i]].sum()),
                "lexical_auroc": auroc(real, active[i]),
                "lexical_auroc_shuffled": auroc(shuffled, active[i]),
                "simulator_auroc": auroc(sim, active[i]) if sim is not None else math.nan,
                "simulator_auroc_shuffled": (
                    auroc(sim_shuffled, active[i]) if sim_shuffled is not None else math.nan
                ),
            }
        )
    keys = (
        "lexical_auroc",
        "lexical_auroc_shuffled",
        "simulator_auroc",
        "simulator_auroc_shuffled",
    )
    return {
        "run_dir": str(run_dir),
        "split": split,
        "contexts": int(context_ids.size),
        "latents_quoting": len(rows),
        "latents_explained": int(explanations["explanation"].is_not_null().sum()),
        "mean": {k: _mean([r[k] for r in rows]) for k in keys},
        "latents": [
            {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
            for r in rows
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--split", choices=("calibration", "eval"), default="calibration")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(measure(args.run_dir, args.split, args.seed), indent=2))


if __name__ == "__main__":
    main()
