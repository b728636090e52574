"""The ``nlrw`` command line: one subcommand per stage, generated from typed functions.

Each subcommand is a plain function whose signature and docstring become its options and
help text (tyro). Errors a user can fix (a bad path, a corrupt shard, an invalid option)
are printed as one ``nlrw: error: ...`` line with exit status 2, not as a traceback.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from nlrw import ShardError


def info() -> None:
    """Print nlrw's version, its dependencies' versions and what this machine offers."""
    import torch

    from nlrw import _core

    print(f"nlrw {metadata.version('nlrw')} (Rust core {_core.__version__})")
    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs")
    for package in ("torch", "transformers", "datasets", "numpy", "polars", "safetensors"):
        try:
            print(f"  {package:<13} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            print(f"  {package:<13} not installed")
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    print(f"torch threads {torch.get_num_threads()}, CUDA devices {cuda}")


def shards_verify(path: Path, /) -> None:
    """Check every shard of an activation shard set against its manifest (checksums too)."""
    from nlrw.shards import ShardReader

    reader = ShardReader(path, batch_rows=1)
    reader.verify()
    print(f"{path}: {reader.num_rows} rows of width {reader.width} ({reader.dtype}), all shards ok")


COMMANDS: dict[str, Callable[..., Any]] = {
    "info": info,
    "shards-verify": shards_verify,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nlrw`` console script and ``python -m nlrw``."""
    import tyro

    try:
        tyro.extras.subcommand_cli_from_dict(
            COMMANDS,
            prog="nlrw",
            description="Partially rewrite a transformer in natural language.",
            args=argv,
        )
    except (ShardError, FileNotFoundError, ValueError) as e:
        print(f"nlrw: error: {e}", file=sys.stderr)
        return 2
    return 0
