"""Provenance of every stage's output: resolved config, config hash, versions, git revision.

Each stage writes ``<stage>.json`` records through :func:`stage_record` so a result can be
traced to the exact options, seed and software that produced it, and so the pipeline can
tell whether a stage's finished output matches the config asked for now (same hash).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import subprocess
import typing
from enum import Enum
from importlib import metadata
from pathlib import Path
from typing import Any

_PACKAGES = ("nlrw", "torch", "transformers", "datasets", "numpy", "polars", "safetensors")


def to_jsonable(obj: Any) -> Any:
    """A config (dataclass, paths, enums, tuples, nested) as plain JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Enum):
        return obj.value
    return obj


def config_hash(config: Any) -> str:
    """Short stable hash of a config's JSON form (sorted keys)."""
    text = json.dumps(to_jsonable(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def versions() -> dict[str, str]:
    """Versions of nlrw and the packages whose behaviour shapes its results."""
    out = {"python": platform.python_version()}
    for package in _PACKAGES:
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def git_revision(path: str | os.PathLike[str] | None = None) -> str | None:
    """The git commit of the source tree nlrw runs from, if it is a checkout."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def stage_record(stage: str, config: Any, **extra: Any) -> dict[str, Any]:
    """The JSON record a stage writes beside its output."""
    return {
        "stage": stage,
        "config": to_jsonable(config),
        "config_hash": config_hash(config),
        "versions": versions(),
        "git_revision": git_revision(),
        **to_jsonable(extra),
    }


def from_dict(cls: type[Any], data: dict[str, Any], source: str, where: str = "") -> Any:
    """Build dataclass ``cls`` from a TOML table or a JSON record (the inverse of
    :func:`to_jsonable`), recursing into nested dataclasses; ``source`` names the input in
    errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in fields:
            raise ValueError(
                f"{source}: unknown option '{where}{key}'; {cls.__name__} has: {', '.join(fields)}"
            )
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(hint, type):
            if not isinstance(value, dict):
                raise ValueError(f"{source}: {where}{key} must be a table")
            kwargs[name] = from_dict(hint, value, source, f"{where}{key}.")
        elif isinstance(value, list) and _is_tuple(hint):
            # TOML arrays of arrays (backend_options) become tuples of tuples, as annotated.
            kwargs[name] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from e


def _is_tuple(hint: Any) -> bool:
    # `tuple[str, ...]`, or a union holding one.
    return tuple in {typing.get_origin(h) for h in (hint, *typing.get_args(hint))}
