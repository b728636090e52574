#!/usr/bin/env python3
"""The dynamic range of every MLP of a subject: the CE cost of zeroing it at the last position.

For choosing the hookpoint of a rewriting experiment: a layer whose MLP barely matters at the
evaluated position cannot separate a faithful rewrite from zero ablation. For each layer ``l``
and each held-out window (the window is the model's whole context, as in the evaluation), the
next-token CE of the clean model and of the model with ``model.layers.<l>.mlp``'s output set
to 0 at the window's last position only; the table gives the mean CE difference with a 95%
bootstrap CI over windows. With ``--run-dir`` of a run that trained a transcoder, its
reconstruction at the run's hookpoint is measured on the same windows.

The windows are never evaluation contexts: every non-overlapping ``ctx_len + 1``-token window
of the run's latent-cache sequences (``activations/eval/tokens.npy``: documents the contexts
stage never draws from), or of a corpus slice when no run is given.

Usage::

    python tools/layer_range.py --run-dir runs/demo [--max-windows 600] [--out layers.json]

Prints a Markdown table; ``--out`` also writes it as JSON (config and versions included).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nlrw.model.subject import load_subject, splice


def windows_from_run(run_dir: Path, ctx_len: int, max_windows: int, seed: int) -> np.ndarray:
    """``[n, ctx_len + 1]`` non-overlapping windows of the cache's sequences, a seeded
    sample of at most ``max_windows``."""
    tokens = np.load(run_dir / "activations" / "eval" / "tokens.npy")
    span = ctx_len + 1
    per_seq = tokens.shape[1] // span
    if per_seq == 0:
        raise SystemExit(f"{run_dir}: sequences of {tokens.shape[1]} tokens hold no window")
    wins = tokens[:, : per_seq * span].reshape(-1, span)
    rng = np.random.default_rng(seed)
    if wins.shape[0] > max_windows:
        wins = wins[np.sort(rng.choice(wins.shape[0], max_windows, replace=False))]
    return wins.astype(np.int64)


def _bootstrap_ci(diff: np.ndarray, seed: int, n: int = 2000) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, (n, diff.size))].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


@torch.inference_mode()
def last_position_ce(
    model: Any, windows: torch.Tensor, hookpoint: str | None, fn: Any
) -> np.ndarray:
    """CE of each window's last token, with ``fn(x, y)`` replacing ``hookpoint``'s output at
    the last input position (``None``: clean)."""
    inputs, targets = windows[:, :-1], windows[:, -1]
    if hookpoint is None:
        logits = model(input_ids=inputs, use_cache=False).logits[:, -1]
    else:

        def at_last(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            new = y.clone()
            new[:, -1] = fn(x[:, -1], y[:, -1]).to(y.dtype)
            return new

        with splice(model, hookpoint, at_last):
            logits = model(input_ids=inputs, use_cache=False).logits[:, -1]
    return F.cross_entropy(logits.float(), targets, reduction="none").double().numpy()


def _reconstruction(coder: Any) -> Any:
    """``fn(x, y)`` giving the coder's output at a position (an SAE reads the output ``y``)."""
    sae = coder.cfg.kind == "sae"

    def reconstruct(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return coder((y if sae else x).float().contiguous())

    return reconstruct


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--max-windows", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    config = json.loads((args.run_dir / "config.json").read_text())["config"]
    model_name = config["collect"]["model"]
    run_hookpoint = config["collect"]["hookpoint"]
    ctx_len = int(config["contexts"]["ctx_len"])
    torch.manual_seed(args.seed)
    subject = load_subject(model_name, dtype="float32", device="cpu")
    model = subject.model
    n_layers = int(model.config.num_hidden_layers)
    windows = torch.from_numpy(windows_from_run(args.run_dir, ctx_len, args.max_windows, args.seed))
    print(f"{windows.shape[0]} windows of {ctx_len} + 1 tokens, {n_layers} layers", file=sys.stderr)

    def batched(hookpoint: str | None, fn: Any) -> np.ndarray:
        return np.concatenate(
            [
                last_position_ce(model, windows[i : i + args.batch_size], hookpoint, fn)
                for i in range(0, windows.shape[0], args.batch_size)
            ]
        )

    started = time.perf_counter()
    clean = batched(None, None)
    rows: list[dict[str, Any]] = []
    transcoder = None
    coder_dir = args.run_dir / "transcoder" / run_hookpoint
    if (coder_dir / "cfg.json").is_file():
        from nlrw.model import sparse

        transcoder = sparse.load(coder_dir)
    for layer in range(n_layers):
        hookpoint = f"model.layers.{layer}.mlp"
        zero = batched(hookpoint, lambda x, y: torch.zeros_like(y))
        diff = zero - clean
        lo, hi = _bootstrap_ci(diff, args.seed + layer)
        row: dict[str, Any] = {
            "layer": layer,
            "hookpoint": hookpoint,
            "ce_clean": float(clean.mean()),
            "ce_zero": float(zero.mean()),
            "zero_minus_clean": float(diff.mean()),
            "ci95": [lo, hi],
        }
        if transcoder is not None and hookpoint == run_hookpoint:
            tc = batched(hookpoint, _reconstruction(transcoder))
            row["ce_transcoder"] = float(tc.mean())
            row["zero_minus_transcoder"] = float((zero - tc).mean())
            row["zero_minus_transcoder_ci95"] = list(_bootstrap_ci(zero - tc, args.seed))
        rows.append(row)
        print(f"layer {layer}: {diff.mean():+.4f} nats", file=sys.stderr)

    print("| layer | CE(zero MLP at last) − CE(clean), nats [95% CI] |")
    print("|--:|--|")
    for r in rows:
        extra = ""
        if "ce_transcoder" in r:
            extra = f"; transcoder sits {r['zero_minus_transcoder']:.3f} below zero ablation"
        lo, hi = r["ci95"]
        print(f"| {r['layer']} | {r['zero_minus_clean']:+.3f} [{lo:+.3f}, {hi:+.3f}]{extra} |")
    seconds = time.perf_counter() - started
    print(f"\nclean CE {clean.mean():.3f} over {clean.size} windows; {seconds:.0f} s")
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "model": model_name,
                    "windows": int(clean.size),
                    "ctx_len": ctx_len,
                    "seed": args.seed,
                    "torch": torch.__version__,
                    "layers": rows,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
