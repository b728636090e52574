"""Massive activations and a run's sparse coder: how much of its reconstruction error, and of
the loss its splice costs, comes from the few token positions whose activation norm dwarfs the
rest.

Some positions of a transformer's residual stream carry activations hundreds of times the
typical norm (a window's first token, the attention sink, and a few others): in SmolLM2-135M
after layer 15 they are 0.4% of the rows and one dimension holds 98% of the variance. A coder
trained on every row (the train stage, the paper's protocol) minimises an MSE those rows dominate,
so its FVU over all rows says little about the ordinary ones. For the run's coder on the
held-out activations collect wrote (``activations/eval``) this prints, as JSON:

* **rows**: the norm of the coder's target ``t`` (the MLP output ``y`` for a transcoder, the
  activation ``x`` for an SAE); a row is *massive* when ``‖t‖ > ratio · median ‖t‖``. Their
  count, the share of them at a window's first position (row ``r`` is position
  ``r mod ctx_len``, :mod:`nlrw.collect`), and the largest share one dimension holds of the
  target's variance ``Σ_rows (t_d − t̄_d)² / Σ_rows ‖t − t̄‖²``;
* **fvu** ``= Σ‖t − t̂‖² / Σ‖t − t̄‖²`` (the train stage's, ``t̄`` the mean over the rows in
  question) over all, ordinary and massive rows, and the **median relative error**
  ``‖t − t̂‖ / ‖t‖`` of each class;
* **ce**: next-token cross-entropy (nats per predicted token) on the first ``--windows``
  held-out windows, clean, with the coder spliced at every position (the recovery stage's
  condition), and with the coder spliced at ordinary rows only, massive rows keeping the
  subject's own output (the rule a coder trained without them would need).

With ``--retrain DIR`` the run's coder is trained again into ``DIR`` with the train stage's
recorded config (``transcoder/train.json``) on the ordinary rows of the run's training
activations only (massive by the same limit, shuffled with the config's seed), and the same
measurements are made for it under ``retrained``: what a coder gains when the massive rows are
left out of its loss and kept as they are by the splice. The run directory is only read.

    python tools/massive_rows.py runs/demo-sae [--ratio 10] [--windows 16] [--retrain DIR]
        [--out FILE]

Nothing is fitted on the evaluation contexts; the ratio only names what counts as massive.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nlrw.config.train import TrainConfig
from nlrw.lib.io import atomic_write_json
from nlrw.lib.provenance import from_dict
from nlrw.lib.rundir import RunDir
from nlrw.model import sparse
from nlrw.model.shards import ShardReader
from nlrw.model.subject import load_subject, next_token_loss, splice

CLASSES = ("all", "ordinary", "massive")


class _Sums:
    """Running float64 sums of one class of rows: count, squared error, Σt and Σt² per
    dimension (the variance around the class's own mean is ``Σt² − n·t̄²``)."""

    def __init__(self, width: int) -> None:
        self.n = 0
        self.sse = 0.0
        self.sum = np.zeros(width)
        self.sum2 = np.zeros(width)
        self.relative: list[np.ndarray] = []

    def add(self, t: np.ndarray, t_hat: np.ndarray) -> None:
        err = t - t_hat
        self.n += len(t)
        self.sse += float((err**2).sum())
        self.sum += t.sum(0)
        self.sum2 += (t**2).sum(0)
        norms = np.linalg.norm(t, axis=1)
        self.relative.append(np.linalg.norm(err, axis=1) / np.maximum(norms, 1e-30))

    def variance(self) -> np.ndarray:
        """Per dimension ``Σ (t_d − t̄_d)²`` over the class's rows."""
        return self.sum2 - self.sum**2 / max(self.n, 1)

    def fvu(self) -> float | None:
        total = float(self.variance().sum())
        return self.sse / total if self.n and total > 0 else None

    def median_relative(self) -> float | None:
        return float(np.median(np.concatenate(self.relative))) if self.n else None


def _split(rows: np.ndarray, coder: sparse.SparseCoder) -> tuple[np.ndarray, np.ndarray]:
    """A shard batch as (coder input, target): ``[x | y]`` for a transcoder, ``x`` for an SAE."""
    if coder.cfg.kind == "transcoder":
        return rows[:, : coder.cfg.d_in], rows[:, coder.cfg.d_in :]
    return rows, rows


def _norms(rows: np.ndarray, coder: sparse.SparseCoder) -> np.ndarray:
    """``‖t‖`` of each row of a shard batch."""
    return np.linalg.norm(_split(rows, coder)[1].astype(np.float64), axis=1)


def target_norms(run_dir: Path, coder: sparse.SparseCoder, split: str) -> np.ndarray:
    """``‖t‖`` of every row of an activation split, in row order."""
    path = RunDir(run_dir).split(split)
    if not (path / "manifest.json").is_file():
        raise FileNotFoundError(f"{path}/manifest.json is missing: collect wrote no {split} split")
    return np.concatenate([_norms(b, coder) for b in _reader(path)])


def row_stats(
    run_dir: Path, coder: sparse.SparseCoder, norms: np.ndarray, limit: float, ctx_len: int
) -> dict[str, Any]:
    """The rows and fvu parts of the report (module docstring) for ``coder`` on
    ``activations/eval``, whose target norms are ``norms``; massive: ``norms > limit``."""
    sums = {c: _Sums(coder.cfg.d_out) for c in CLASSES}
    start = 0
    for batch in _reader(RunDir(run_dir).split("eval")):
        x, t = _split(batch, coder)
        with torch.inference_mode():
            t_hat = coder(torch.from_numpy(np.ascontiguousarray(x)).to(coder.device, coder.dtype))
        t64, t_hat64 = t.astype(np.float64), t_hat.double().cpu().numpy()
        massive = norms[start : start + len(t)] > limit
        start += len(t)
        sums["all"].add(t64, t_hat64)
        sums["ordinary"].add(t64[~massive], t_hat64[~massive])
        sums["massive"].add(t64[massive], t_hat64[massive])
    positions = np.arange(len(norms)) % ctx_len
    is_massive = norms > limit
    variance = sums["all"].variance()
    return {
        "rows": len(norms),
        "massive_rows": int(is_massive.sum()),
        "massive_share_at_position_0": (
            float((positions[is_massive] == 0).mean()) if is_massive.any() else None
        ),
        "top_dimension": int(variance.argmax()),
        "top_dimension_variance_share": float(variance.max() / variance.sum()),
        "fvu": {c: sums[c].fvu() for c in CLASSES},
        "median_relative_error": {c: sums[c].median_relative() for c in CLASSES},
    }


def retrain(
    run_dir: Path, coder: sparse.SparseCoder, hookpoint: str, limit: float, out_dir: Path
) -> sparse.SparseCoder:
    """The run's coder trained again into ``out_dir`` (train stage's recorded config) on the
    training rows whose target norm is at most ``limit``, shuffled with the config's seed;
    evaluated during training on the ordinary eval rows."""
    from nlrw.train import train

    paths = RunDir(run_dir)
    if out_dir.resolve().is_relative_to(Path(run_dir).resolve()):
        raise ValueError(f"--retrain {out_dir} is inside the run directory, which is only read")
    record = paths.transcoder / "train.json"
    if not record.is_file():
        raise FileNotFoundError(f"{record} is missing: --retrain needs a coder this run trained")
    cfg = from_dict(TrainConfig, json.loads(record.read_text())["config"], str(record))
    cfg = dataclasses.replace(cfg, progress=False, checkpoint_every=1 << 30)

    def ordinary(split: str) -> np.ndarray:
        rows = np.concatenate(list(_reader(paths.split(split))))
        return rows[_norms(rows, coder) <= limit]

    rows = ordinary("train")
    rows = rows[np.random.default_rng(cfg.seed).permutation(len(rows))]
    chunks = [torch.from_numpy(rows[i : i + 16384]) for i in range(0, len(rows), 16384)]
    evaluation = [torch.from_numpy(ordinary("eval"))]
    train(cfg, chunks, evaluation, out_dir, hookpoint=hookpoint, overwrite=True)
    return sparse.load(out_dir / hookpoint)


def _reader(path: Path) -> ShardReader:
    return ShardReader(path, batch_rows=4096, verify=False)


def splice_ce(
    run_dir: Path,
    coders: dict[str, sparse.SparseCoder],
    collect: dict[str, Any],
    limit: float,
    n_windows: int,
) -> dict[str, dict[str, float]]:
    """The ce part of the report for each coder: clean, the coder at every position, and the
    coder at the positions whose target norm is at most ``limit`` (the others keep the
    subject's output)."""
    tokens = np.load(RunDir(run_dir).split("eval") / "tokens.npy", mmap_mode="r")
    ids = torch.from_numpy(np.array(tokens[:n_windows], dtype=np.int64))
    device = collect.get("device", "auto")
    subject = load_subject(
        collect["model"],
        dtype=collect.get("dtype", "auto"),
        device=None if device == "auto" else device,
    )

    def splice_of(coder: sparse.SparseCoder, keep_massive: bool) -> Any:
        sae = coder.cfg.kind == "sae"

        def fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            source = y if sae else x
            out = coder(source.reshape(-1, source.shape[-1]).to(coder.dtype)).reshape(y.shape)
            if keep_massive:
                out = torch.where(y.norm(dim=-1, keepdim=True) > limit, y, out.to(y.dtype))
            return out

        return fn

    conditions = {
        (name, condition): splice_of(coder, keep)
        for name, coder in coders.items()
        for condition, keep in (("coder_every_row", False), ("coder_ordinary_rows", True))
    }
    clean = 0.0
    sums = dict.fromkeys(conditions, 0.0)
    with torch.inference_mode():
        for start in range(0, len(ids), 4):
            batch = ids[start : start + 4]
            clean += float(next_token_loss(subject.model, batch, reduction="none").double().sum())
            for key, fn in conditions.items():
                with splice(subject.model, collect["hookpoint"], fn):
                    losses = next_token_loss(subject.model, batch, reduction="none")
                sums[key] += float(losses.double().sum())
    n = ids.shape[0] * (ids.shape[1] - 1)
    out: dict[str, dict[str, float]] = {name: {"clean": clean / n} for name in coders}
    for (name, condition), total in sums.items():
        out[name][condition] = total / n
    return out


def measure(
    run_dir: Path, ratio: float, n_windows: int, retrain_dir: Path | None = None
) -> dict[str, Any]:
    if ratio <= 0:
        raise ValueError(f"--ratio must be > 0, got {ratio}")
    if n_windows < 0:
        raise ValueError(f"--windows must be >= 0, got {n_windows}")
    paths = RunDir(run_dir)
    collect = paths.read_json(paths.collect_record, stage="collect")["config"]
    hookpoint, ctx_len = collect["hookpoint"], int(collect["ctx_len"])
    coder = sparse.load(paths.coder(hookpoint))
    norms = target_norms(run_dir, coder, "eval")
    median = float(np.median(norms))
    out: dict[str, Any] = {
        "run": str(run_dir),
        "hookpoint": hookpoint,
        "kind": coder.cfg.kind,
        "ratio": ratio,
        "median_norm": median,
        "limit": ratio * median,
    }
    out |= row_stats(run_dir, coder, norms, out["limit"], ctx_len)
    coders = {"run": coder}
    if retrain_dir is not None:
        coders["retrained"] = retrain(run_dir, coder, hookpoint, out["limit"], retrain_dir)
        stats = row_stats(run_dir, coders["retrained"], norms, out["limit"], ctx_len)
        out["retrained"] = {"out": str(retrain_dir)} | {
            k: stats[k] for k in ("fvu", "median_relative_error")
        }
    if n_windows:
        out["windows"] = n_windows
        ce = splice_ce(run_dir, coders, collect, out["limit"], n_windows)
        out["ce"] = ce["run"]
        if "retrained" in ce:
            out["retrained"]["ce"] = ce["retrained"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--ratio", type=float, default=10.0, help="massive: norm > ratio·median")
    parser.add_argument("--windows", type=int, default=16, help="held-out windows for CE (0: none)")
    parser.add_argument("--retrain", type=Path, default=None, help="retrain without massive rows")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    try:
        result = measure(args.run_dir, args.ratio, args.windows, args.retrain)
    except (OSError, ValueError) as e:
        print(f"massive_rows: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    if args.out is not None:
        atomic_write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
