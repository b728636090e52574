"""The train stage's other way: adopt a sparse coder someone already trained.

``--train.pretrained PATH`` names a checkpoint in sparsify's layout (``cfg.json`` +
``sae.safetensors``): either the folder itself, or a folder of hookpoint folders as sparsify's
``SparseCoder.load_many`` reads them (the skip transcoders EleutherAI publishes), the hookpoint
then picked by ``collect.hookpoint``. ``--train.legacy transcoder|sae`` reads a paper-era
checkpoint (the ``sae`` package's layout, whose encoder subtracts ``b_dec``).

The coder is loaded and checked against the run before anything is written: its widths
against the collected activations' rows (``[x | y]`` for a transcoder, the hookpoint's output
for an SAE), its kind against ``train.kind``. It is then written to
``run_dir/transcoder/<hookpoint>`` (the layout :func:`nlrw.model.sparse.load` and every later stage
read), atomically, and the stage's record holds the source path and the digests of its two
files; the pipeline folds those digests into the train stage's hash, so a checkpoint that
changes on disk is adopted again (and everything after it re-runs). No training happens: the
stages after train run unchanged.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from nlrw.lib.io import file_digest
from nlrw.model import sparse

__all__ = ["adopt", "checkpoint_folder", "source_digest"]


def checkpoint_folder(path: str | Path, hookpoint: str) -> Path:
    """The checkpoint folder ``path`` names for ``hookpoint``: ``path`` itself when it holds a
    ``cfg.json``, else ``path/<hookpoint>``.

    Raises:
        FileNotFoundError: neither exists (the message lists the hookpoint folders found).
    """
    root = Path(path)
    if (root / sparse.CFG_FILE).is_file():
        return root
    if (root / hookpoint / sparse.CFG_FILE).is_file():
        return root / hookpoint
    if not root.is_dir():
        raise FileNotFoundError(f"train.pretrained: {root} is not a folder")
    found = sorted(p.name for p in root.iterdir() if (p / sparse.CFG_FILE).is_file())
    listed = ", ".join(found[:10]) if found else "none"
    raise FileNotFoundError(
        f"train.pretrained: {root} has no {sparse.CFG_FILE}, nor a folder for hookpoint "
        f"{hookpoint!r} (hookpoint folders there: {listed})"
    )


def source_digest(path: str | Path, hookpoint: str) -> dict[str, str]:
    """Digests of the checkpoint's two files (what the train stage's hash folds in)."""
    folder = checkpoint_folder(path, hookpoint)
    return {
        name: file_digest(folder / name)
        for name in (sparse.CFG_FILE, sparse.WEIGHTS_FILE)
        if (folder / name).is_file()
    }


def adopt(
    path: str | Path,
    out_dir: str | Path,
    *,
    hookpoint: str,
    activation_width: int,
    activations: str | Path,
    kind: str,
    legacy: sparse.Kind | None = None,
) -> dict[str, Any]:
    """Check the checkpoint at ``path`` against the run and write it to ``out_dir/hookpoint``.

    ``activation_width``: the width of the collected rows at ``activations`` (named in
    errors). Returns the summary the stage records.

    Raises:
        FileNotFoundError: no checkpoint for the hookpoint.
        ValueError: the checkpoint is unreadable, of another kind, or of other widths (the
            message names the file and both widths); nothing is written then.
    """
    folder = checkpoint_folder(path, hookpoint)
    coder = sparse.load(folder, legacy=legacy)
    if coder.cfg.kind != kind:
        raise ValueError(
            f"train.pretrained: {folder} holds a {coder.cfg.kind}, but train.kind is {kind!r}"
        )
    sparse.check_activation_width(coder, folder, activation_width, Path(activations))
    target = Path(out_dir) / hookpoint
    staging = target.with_name(f".{target.name}.adopting")
    shutil.rmtree(staging, ignore_errors=True)
    coder.save(staging)
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return {
        "pretrained": str(Path(path).resolve()),
        "checkpoint": str(folder.resolve()),
        "digests": source_digest(path, hookpoint),
        "legacy": legacy,
        "kind": coder.cfg.kind,
        "num_latents": coder.num_latents,
        "k": coder.k,
        "d_in": coder.d_in,
        "d_out": coder.d_out,
        "out_dir": str(target),
    }
