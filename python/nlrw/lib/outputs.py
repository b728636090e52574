"""What a stage wrote in the run directory: listed, set aside, rolled back, digested.

A stage redone with other options first moves its previous outputs (and its record) into
``.replaced/<stage>/`` by renames, listing them before it moves anything, so that a kill at
any point can be undone (:func:`roll_back`); only once the new outputs are complete is the
set-aside copy discarded. A done stage's record lists each output's size and digest
(:func:`digests`), which :func:`damage` checks.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from nlrw.lib.io import atomic_write_json, file_digest, fsync_dir
from nlrw.lib.rundir import STAGE_FILES, RunDir

__all__ = [
    "damage",
    "digests",
    "discard_set_aside",
    "files_under",
    "replaced_dir",
    "roll_back",
    "set_aside",
    "stage_files",
]

_NOT_MINE = {"train": {"transcoder/recovery.json"}}
"""Files inside a stage's folder that another stage writes."""


def stage_files(run_dir: Path, name: str) -> list[str]:
    """The entries (files or folders, relative to ``run_dir``) of stage ``name`` present now."""
    out: list[str] = []
    for pattern in STAGE_FILES[name]:
        for path in sorted(run_dir.glob(pattern)):
            rel = path.relative_to(run_dir).as_posix()
            if rel not in _NOT_MINE.get(name, set()):
                out.append(rel)
    return out


def replaced_dir(run_dir: Path, name: str) -> Path:
    return RunDir(run_dir).replaced / name


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def set_aside(run_dir: Path, name: str) -> None:
    """Move stage ``name``'s outputs and record into ``.replaced/<name>/`` (renames, no
    copies), listing them first so that a kill at any point can be rolled back."""
    backup = replaced_dir(run_dir, name)
    record = RunDir(run_dir).stage_record(name).relative_to(run_dir).as_posix()
    moved = stage_files(run_dir, name) + ([record] if (run_dir / record).exists() else [])
    backup.mkdir(parents=True, exist_ok=True)
    atomic_write_json(backup / "moved.json", moved)
    for rel in moved:
        (backup / "files" / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(run_dir / rel, backup / "files" / rel)
    fsync_dir(run_dir)


def discard_set_aside(run_dir: Path, name: str) -> None:
    shutil.rmtree(replaced_dir(run_dir, name), ignore_errors=True)
    with contextlib.suppress(OSError):
        RunDir(run_dir).replaced.rmdir()  # only once empty


def roll_back(run_dir: Path, name: str) -> bool:
    """Undo an unfinished replacement of stage ``name``: what it wrote goes, the previous
    outputs and record come back. Idempotent (safe to kill and redo). False if none."""
    backup = replaced_dir(run_dir, name)
    try:
        moved: list[str] = json.loads((backup / "moved.json").read_text())
    except (OSError, json.JSONDecodeError):
        if backup.exists():
            discard_set_aside(run_dir, name)  # killed before anything was moved
        return False
    record = RunDir(run_dir).stage_record(name).relative_to(run_dir).as_posix()
    for rel in [*stage_files(run_dir, name), record]:
        if rel not in moved:
            _remove(run_dir / rel)  # written by the failed attempt, nothing to go back
    for rel in moved:
        source = backup / "files" / rel
        if source.exists() or source.is_symlink():
            if (run_dir / rel).exists():
                _remove(run_dir / rel)
            os.replace(source, run_dir / rel)
    fsync_dir(run_dir)
    discard_set_aside(run_dir, name)
    return True


def files_under(run_dir: Path, rels: list[str]) -> list[Path]:
    out: list[Path] = []
    for rel in rels:
        path = run_dir / rel
        out.extend(sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])
    return out


def digests(run_dir: Path, name: str) -> dict[str, list[Any]]:
    """Every file stage ``name`` wrote: relative path → [size, digest]."""
    return {
        p.relative_to(run_dir).as_posix(): [p.stat().st_size, file_digest(p)]
        for p in files_under(run_dir, stage_files(run_dir, name))
    }


def damage(run_dir: Path, record: dict[str, Any], *, digests: bool) -> str | None:
    """What is wrong with a done stage's recorded outputs (None: nothing, or no outputs
    recorded): a file missing, of another size, or (with ``digests``) of other content."""
    outputs = record.get("outputs")
    if not isinstance(outputs, dict):
        return None
    for rel, (size, digest) in outputs.items():
        path = run_dir / rel
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size:,} bytes, {size:,} when written"
        if digests and file_digest(path) != digest:
            return f"{path} has changed since it was written (digest differs)"
    return None
