#!/usr/bin/env python3
"""Which explainer prompt names a run's latents right: each ``--explain.prompt`` style on the
same latents, scored by the explain stage's own consistency check.

For choosing the default without the evaluation: the latents are a seeded random sample of
the eligible ones (``--seed``, 1 by default) **less the run's own explained latents**, their
examples come from the latent cache exactly as the explain stage draws them, and nothing
here reads the contexts stage's windows (evaluation or calibration). Each style's replies go
through the stage's retries and copy checks (:func:`nlrw.explain.generate_with_retries`);
a latent's score is its consistency (the share of its shown examples whose top token is a
word the explanation quotes), counted 0 when the explanation quotes no word or failed.

Usage::

    python tools/explain_prompt_selection.py runs/demo [--styles nlrw,single-word] [--n 16]
        [--seed 1] [--out selection.json]

Prints JSON: per style the mean score and each latent's explanation and consistency, with the
config and versions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from nlrw import explain
from nlrw.backends.base import Backend
from nlrw.config.explain import ExplainConfig
from nlrw.lib.io import atomic_write_json
from nlrw.lib.provenance import versions
from nlrw.lib.rundir import RunDir
from nlrw.pipeline import load_run_config
from nlrw.prompts.explain import STYLES


def selection_latents(
    source: explain.LatentSource, cfg: ExplainConfig, n: int, seed: int, exclude: set[int]
) -> list[int]:
    """``n`` latents drawn as the stage draws them (``cfg``'s eligibility, random order of
    ``seed``), none of them in ``exclude``."""
    latents, counts = source.counts()
    drawn, _ = explain.select_latents(
        latents,
        counts,
        min_count=cfg.min_count,
        max_latents=None,
        selection="random",
        seed=seed,
    )
    return [int(lat) for lat in drawn if int(lat) not in exclude][:n]


def measure(
    source: explain.LatentSource,
    backend: Backend,
    cfg: ExplainConfig,
    latents: list[int],
    styles: list[str],
) -> dict[str, Any]:
    """Each style's mean consistency (no quoted word or no explanation: 0) on ``latents``."""
    shown = [
        explain.examples_for(source, lat, explain.explainer_examples(source, lat, cfg), cfg)
        for lat in latents
    ]
    out: dict[str, Any] = {}
    for style in styles:
        style_cfg = dataclasses.replace(cfg, prompt=style)  # validates the name
        answers = explain.generate_with_retries(
            backend,
            lambda i, attempt, c=style_cfg: explain.chat_for(shown[i], None, attempt, c.prompt),
            len(latents),
            style_cfg,
        )
        rows = []
        for lat, ex, (text, *_rest) in zip(latents, shown, answers, strict=True):
            check, words = explain.consistency(text, ex.top_tokens)
            rows.append(
                {
                    "latent": lat,
                    "explanation": text,
                    "consistency": None if math.isnan(check) else check,
                    "quoted_words": words,
                }
            )
        scores = [r["consistency"] or 0.0 for r in rows]
        out[style] = {"mean": float(np.mean(scores)) if scores else None, "latents": rows}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--styles", default=",".join(STYLES))
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    paths = RunDir(args.run_dir)
    try:
        run_cfg = load_run_config(args.run_dir)
    except ValueError as e:
        parser.error(str(e))
    if run_cfg is None or not paths.explanations.is_file():
        parser.error(f"{args.run_dir}: not a run directory with explanations.parquet")
    styles = [s.strip() for s in args.styles.split(",") if s.strip()]
    for style in styles:
        if style not in STYLES:
            parser.error(f"--styles: unknown explain.prompt {style!r}: expected {list(STYLES)}")
    if args.n < 1:
        parser.error(f"--n must be at least 1, got {args.n}")
    cfg = run_cfg.explain
    done = pl.read_parquet(paths.explanations, columns=["latent", "status"])
    own = set(done.filter(pl.col("status") != "skipped")["latent"].to_list())
    source = explain.CacheSource(args.run_dir)
    latents = selection_latents(source, cfg, args.n, args.seed, own)
    from nlrw.backends import load_backend

    backend = load_backend(cfg.backend, cfg.model, **dict(cfg.backend_options))
    try:
        result = measure(source, backend, cfg, latents, styles)
    finally:
        backend.close()
    record = {
        "run_dir": str(args.run_dir),
        "seed": args.seed,
        "latents": latents,
        "explain": dataclasses.asdict(cfg),
        "styles": result,
        "versions": versions(),
    }
    print(json.dumps({s: round(r["mean"], 3) for s, r in result.items() if r["mean"] is not None}))
    if args.out is not None:
        atomic_write_json(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
