"""GGUF -> Hugging Face folder: :func:`convert_gguf` dequantizes a GGUF checkpoint once with
transformers into an ordinary folder (``config.json``, tokenizer files, float32
``model.safetensors``) in the cache, checked to reload to the same weights and tokens, so that
later loads take seconds."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from nlrw.assets.base import AssetError, cache_dir, public_mode, remove_stale_temps
from nlrw.lib.io import atomic_write_json, fsync_dir

log = logging.getLogger(__name__)

_CONVERSION_FORMAT = 2  # 2: lm_head left out when tied; usual file modes
_CONVERSION_MARKER = "nlrw_conversion.json"
_FINGERPRINT_BYTES = 1 << 20


def _fingerprint(path: Path) -> str:
    """A cheap identity of a file: sha256 of its size, first MiB and last MiB (12 hex digits)."""
    size = path.stat().st_size
    h = hashlib.sha256(f"nlrw-gguf-{_CONVERSION_FORMAT}:{size}:".encode())
    with open(path, "rb") as f:
        h.update(f.read(_FINGERPRINT_BYTES))
        f.seek(max(0, size - _FINGERPRINT_BYTES))
        h.update(f.read(_FINGERPRINT_BYTES))
    return h.hexdigest()[:12]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((folder / _CONVERSION_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _weight_name(model: Any, module: Any) -> str | None:
    """State-dict key of ``module.weight`` (by module identity, so tied weights get their own)."""
    if module is None:
        return None
    for name, m in model.named_modules(remove_duplicate=False):
        if m is module:
            return f"{name}.weight"
    return None


def _finish_tree(folder: Path) -> None:
    """Usual modes and fsync for every file of ``folder`` and the folder itself."""
    for p in folder.iterdir():
        if p.is_file():
            public_mode(p)
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    public_mode(folder)
    fsync_dir(folder)


def _write_hf_folder(gguf: Path, tmp: Path) -> dict[str, Any]:
    """Load ``gguf`` with transformers, write an HF folder into ``tmp``, verify it reloads."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tokenizer: Any = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model: Any = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    model.eval()
    load_s = time.perf_counter() - t0

    config = copy.deepcopy(model.config)
    # The GGUF quantization config would make transformers treat the folder as GGUF again.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    head, embed = _weight_name(model, out_emb), _weight_name(model, in_emb)
    tie = bool(getattr(config, "tie_word_embeddings", False))
    if head in state and embed in state and head != embed:
        same = torch.equal(state[head], state[embed])
        if tie and same:
            del state[head]  # tied: the reload takes the head from the embeddings
        else:
            # Untied (e.g. Qwen's GGUF with its own output matrix, or one whose config claims
            # a tie that the tensors do not have): save the head explicitly, never let the
            # reload draw a random one.
            config.tie_word_embeddings = False
            if state[head].data_ptr() == state[embed].data_ptr():
                state[head] = state[head].clone()
    # safetensors refuses tensors that share memory: give each its own storage.
    seen: set[int] = set()
    for k, v in state.items():
        if v.untyped_storage().data_ptr() in seen:
            state[k] = v.clone()
        seen.add(state[k].untyped_storage().data_ptr())

    config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    save_s = time.perf_counter() - load_s - t0

    # Verify: the folder reloads to exactly the same weights (lm_head included) and tokens.
    reloaded: Any = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    reloaded_state = reloaded.state_dict()
    original = model.state_dict()
    bad = [
        k
        for k, v in original.items()
        if k not in reloaded_state or not torch.equal(v, reloaded_state[k])
    ]
    if bad:
        raise AssetError(f"converted {gguf} does not reload to the same weights: {bad[:5]}")
    del reloaded, reloaded_state
    tok2: Any = AutoTokenizer.from_pretrained(tmp)
    sample = "The capital of France is Paris. «Émile»\n\t 12345 <|endoftext|>"
    if tok2(sample)["input_ids"] != tokenizer(sample)["input_ids"]:
        raise AssetError(f"converted {gguf}: the saved tokenizer encodes differently")
    if tokenizer.chat_template is not None:
        chat = [{"role": "user", "content": "What is the capital of France?"}]
        a = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        b = tok2.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        if a != b:
            raise AssetError(f"converted {gguf}: the saved chat template differs")
    log.info("converted %s: load %.1f s, save %.1f s", gguf.name, load_s, save_s)
    return {
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "n_tensors": len(state),
        "load_s": round(load_s, 2),
    }


def convert_gguf(
    gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Dequantize a GGUF checkpoint once into an ordinary Hugging Face folder; return the folder.

    The folder holds ``config.json``, ``generation_config.json``, the tokenizer files and a
    float32 ``model.safetensors``, and loads with plain ``from_pretrained(folder)`` in seconds.
    By default it goes to ``cache_dir()/models/<gguf stem>-<fingerprint>``, where the
    fingerprint hashes the file's size, first and last MiB, so a later call with the same file
    returns at once. The folder is built in a temporary directory beside the destination and
    renamed into place only after it has been reloaded and checked against the GGUF-loaded
    model (same weights, ``lm_head`` included; same tokens and chat template).

    Tied embeddings: ``lm_head.weight`` is left out when the config ties it to the embeddings
    and the tensors agree; otherwise it is saved and ``tie_word_embeddings`` is set false. The
    GGUF ``quantization_config`` is dropped.

    Args:
        gguf_path: the ``.gguf`` file.
        out_dir: the destination folder instead of the cache. If it already holds a conversion
            of the same file it is returned as is; if it exists otherwise, an error is raised.

    Raises:
        FileNotFoundError: ``gguf_path`` does not exist.
        AssetError: the destination holds something else, or the conversion does not verify.
    """
    gguf = Path(gguf_path).expanduser().resolve()
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf}")
    fp = _fingerprint(gguf)
    stem = gguf.name[: -len(".gguf")] if gguf.name.endswith(".gguf") else gguf.name
    dest = (
        Path(out_dir).expanduser()
        if out_dir is not None
        else cache_dir() / "models" / f"{_slug(stem)}-{fp}"
    )
    marker = _read_marker(dest)
    if marker is not None and marker.get("fingerprint") == fp:
        return dest
    if dest.exists():
        raise AssetError(
            f"{dest} exists but is not a conversion of {gguf} (no {_CONVERSION_MARKER} with "
            f"fingerprint {fp}); remove it or choose another out_dir"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{dest.name}."
    remove_stale_temps(dest.parent, prefix)
    tmp = Path(
        tempfile.mkdtemp(
            prefix=f"{prefix}{socket.gethostname()}.{os.getpid()}.", suffix=".tmp", dir=dest.parent
        )
    )
    try:
        log.info("converting %s into %s (once; 20-70 s on 2 cores)", gguf, dest)
        info = _write_hf_folder(gguf, tmp)
        import transformers

        atomic_write_json(
            tmp / _CONVERSION_MARKER,
            {
                "format": _CONVERSION_FORMAT,
                "fingerprint": fp,
                "source": str(gguf),
                "source_size": gguf.stat().st_size,
                "transformers": transformers.__version__,
                **info,
            },
        )
        _finish_tree(tmp)
        try:
            os.rename(tmp, dest)
        except OSError:
            # Another process finished the same conversion first: keep theirs.
            done = _read_marker(dest)
            if done is None or done.get("fingerprint") != fp:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return dest
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
