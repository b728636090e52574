"""Digest of a finished run's tables, to show that two runs (two fresh clones, two days, two
machines) made the same results, and where they part when they do not.

    python tools/run_digest.py runs/demo                          # print the digests
    python tools/run_digest.py runs/demo --write docs/reproducibility/demo-avx2.json
    python tools/run_digest.py runs/demo --against docs/reproducibility/demo-avx2.json
    python tools/run_digest.py runs/demo --against /elsewhere/runs/demo

The tables are every output a done stage recorded (``stages/<stage>.json``: path, size, blake2b
digest) except the files that carry times, versions or paths by design (JSON records, the
report's HTML, Markdown and PNGs, logs, the trainer's ``metrics.jsonl`` and resume state with
their tokens/s). Each file is first checked against its stage's record, so a damaged run is
refused rather than digested. Byte identity is the test for parquet and numpy files (polars
writes a table's bytes deterministically for one polars version, which the lock file pins); a
safetensors file is digested by content, its header with sorted keys and its data, because
safetensors writes the header's ``__metadata__`` from a Rust HashMap, in an order that changes
from one process to the next.
When both sides are run directories, a table whose bytes differ is also compared by content
(the first differing column and the largest absolute difference), to tell a re-encoding
from another result. Exit status 1 when any table differs or is missing on one side.

A digest file also records what the tables depend on beyond the code: the git commit and
config hash of the run, the package versions, and torch's CPU capability (runs are
reproducible to the bit within one instruction set, not across: see ``golden_dir`` in
``tests/test_architecture.py``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from nlrw.lib.io import atomic_write_json, file_digest
from nlrw.lib.rundir import RunDir
from nlrw.pipeline import STAGES

NOT_TABLES = (".json", ".jsonl", ".pt", ".html", ".md", ".png", ".log", ".txt")
"""Outputs left out: they record times, versions or paths, not results (``.pt`` is the
trainer's resume state, whose history holds tokens/s and whose zip names the temporary file it
was saved to; the coder's weights are the safetensors beside it)."""


def safetensors_digest(path: Path) -> str:
    """A safetensors file's content digest: its header's with sorted keys (the metadata's
    order is a HashMap's) followed by its data's."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(header, sort_keys=True).encode())
    h.update(raw[8 + n :])
    return h.hexdigest()


def tables(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Every done stage's recorded tables: relative path → {stage, size, digest},
    recomputed from the files (a file that changed since its stage wrote it is an error)."""
    out: dict[str, dict[str, Any]] = {}
    for stage in STAGES:
        path = RunDir(run_dir).stage_record(stage.name)
        if not path.is_file():
            continue
        record = json.loads(path.read_text())
        if record.get("status") != "done":
            continue
        for rel, (size, digest) in sorted((record.get("outputs") or {}).items()):
            if rel.endswith(NOT_TABLES):
                continue
            file = run_dir / rel
            if not file.is_file():
                raise SystemExit(f"{file}: recorded by stage {stage.name} but missing")
            now = file_digest(file)
            if now != digest:
                raise SystemExit(f"{file}: changed since stage {stage.name} wrote it")
            if file.suffix == ".safetensors":
                now = safetensors_digest(file)
            out[rel] = {"stage": stage.name, "size": size, "digest": now}
    if not out:
        raise SystemExit(f"{run_dir}: no done stage with recorded outputs: is it a run directory?")
    return out


def describe(run_dir: Path) -> dict[str, Any]:
    """The digest file's contents: the tables and what they depend on beyond the code."""
    import torch  # only here: comparing two digest files needs no torch

    if not RunDir(run_dir).config.is_file():
        raise SystemExit(f"{run_dir}: no config.json: is it a run directory?")
    config = json.loads(RunDir(run_dir).config.read_text())
    return {
        "run_dir": str(run_dir),
        "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_revision": config.get("git_revision"),
        "stage_hashes": config.get("stage_hashes"),
        "versions": config.get("versions"),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "tables": tables(run_dir),
    }


def load(source: Path) -> tuple[dict[str, Any], Path | None]:
    """A digest from a run directory or a digest file, and the run directory if it is one."""
    if source.is_dir():
        return describe(source), source
    try:
        digest = json.loads(source.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"{source}: not a run directory nor a digest file ({e})") from e
    if not isinstance(digest, dict) or not isinstance(digest.get("tables"), dict):
        raise SystemExit(f"{source}: not a run directory nor a digest file (no 'tables' object)")
    return digest, None


def content_difference(a: Path, b: Path) -> str:
    """How two parquet tables differ by content: shape, columns, or the first differing
    column with its largest absolute difference."""
    x, y = pl.read_parquet(a), pl.read_parquet(b)
    if x.columns != y.columns:
        return f"columns differ: {x.columns} vs {y.columns}"
    if x.shape != y.shape:
        return f"shape {x.shape} vs {y.shape}"
    if x.equals(y):
        return "same content, other bytes"
    for column in x.columns:
        if not x[column].equals(y[column]):
            if x[column].dtype.is_numeric():
                delta = (x[column].cast(pl.Float64) - y[column].cast(pl.Float64)).abs().max()
                return f"column {column!r} differs, max |Δ| = {delta:.3g}"
            return f"column {column!r} differs"
    return "differs"


def compare(a: dict[str, Any], b: dict[str, Any], dir_a: Path | None, dir_b: Path | None) -> int:
    """Print one line per table and a verdict; the number of tables that differ."""
    names = sorted(set(a["tables"]) | set(b["tables"]))
    bad = 0
    for rel in names:
        ta, tb = a["tables"].get(rel), b["tables"].get(rel)
        if ta is None or tb is None:
            bad += 1
            print(f"  MISSING  {rel} (only in {'the first' if tb is None else 'the second'})")
        elif ta["digest"] == tb["digest"]:
            print(f"  same     {rel}")
        else:
            bad += 1
            why = ""
            if dir_a is not None and dir_b is not None and rel.endswith(".parquet"):
                why = f": {content_difference(dir_a / rel, dir_b / rel)}"
            print(f"  DIFFERS  {rel}{why}")
    for key in ("git_revision", "torch_cpu_capability"):
        if a.get(key) != b.get(key):
            print(f"note: {key} {a.get(key)} vs {b.get(key)}")
    if a.get("versions") != b.get("versions"):
        print(f"note: versions differ: {a.get('versions')} vs {b.get('versions')}")
    print(f"{len(names) - bad} of {len(names)} tables identical")
    return bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--write", type=Path, help="write the digest to this JSON file")
    parser.add_argument("--against", type=Path, help="a digest file or another run directory")
    args = parser.parse_args()
    digest, run_dir = load(args.run_dir)
    if args.write is not None:
        atomic_write_json(args.write, digest)
        print(f"wrote {len(digest['tables'])} table digests to {args.write}")
    if args.against is not None:
        other, other_dir = load(args.against)
        sys.exit(1 if compare(digest, other, run_dir, other_dir) else 0)
    if args.write is None:
        for rel, t in digest["tables"].items():
            print(f"{t['digest']}  {t['size']:>12,}  {rel}")


if __name__ == "__main__":
    main()
