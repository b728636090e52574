"""Resumable stage output: a folder of parquet parts, one per chunk of work.

The stages that make LLM calls or long forwards (explain, score, simulate, evaluate) write
each finished chunk as its own part, atomically; a killed run resumes by skipping the parts
that exist. The folder is tagged with the config hash that produced it, so parts of two
configs are never mixed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl

from nlrw.lib.io import atomic_path, atomic_write_json

__all__ = ["PartStore", "chunked", "remove_tree"]


class PartStore:
    """A folder of parquet parts written atomically, one per chunk of work, tagged with the
    config hash that produced them (a folder from another config is refused, not mixed)."""

    def __init__(self, folder: Path, config_hash: str) -> None:
        self.folder = folder
        meta = folder / "parts.json"
        if meta.is_file():
            found = json.loads(meta.read_text()).get("config_hash")
            if found != config_hash:
                raise FileExistsError(
                    f"{folder} holds parts of another config (hash {found}, now {config_hash}); "
                    "delete it or pass overwrite=True"
                )
        else:
            atomic_write_json(meta, {"config_hash": config_hash})

    def path(self, index: int) -> Path:
        return self.folder / f"part-{index:06d}.parquet"

    def done(self, index: int) -> bool:
        return self.path(index).is_file()

    def write(self, index: int, rows: list[dict[str, Any]], schema: dict[str, Any]) -> None:
        with atomic_path(self.path(index)) as tmp:
            pl.DataFrame(rows, schema=schema).write_parquet(tmp)

    def merge(self, schema: dict[str, Any]) -> pl.DataFrame:
        parts = sorted(self.folder.glob("part-*.parquet"))
        frames = [pl.read_parquet(p) for p in parts]
        return pl.concat(frames) if frames else pl.DataFrame(schema=schema)


def remove_tree(folder: Path) -> None:
    """Delete a flat folder of parts (files only) and the folder; nothing if it is absent."""
    if folder.is_dir():
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()


def chunked(items: Sequence[int], size: int) -> list[list[int]]:
    """``items`` in consecutive chunks of ``size`` (the last may be shorter)."""
    return [list(items[i : i + size]) for i in range(0, len(items), size)]
