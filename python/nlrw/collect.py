"""Activation collection: run the subject over a corpus and stream its activations at a
hookpoint into shards, for training a transcoder (or an SAE) and for later stages.

Output, under the run directory::

    activations/
      collect.json     provenance (config, versions, git revision) and what was collected:
                       d_in, d_out, hookpoint, kind, model identity (resolved path, sha256 of
                       its weight files), dtype, token counts, which documents and windows
      train/           shard set (manifest.json + shard-*.safetensors, see nlrw.model.shards) with
                       tokens.npy (int32 [windows, ctx_len]) and documents.npy (int64 [windows])
      eval/            the same for the held-out split (absent when n_eval_tokens = 0)

**Rows.** One row per token position. Row ``r`` is position ``r % ctx_len`` of window
``r // ctx_len`` (``tokens.npy[r // ctx_len]`` holds that window's token ids; the last window
may be only partly in the set, which holds exactly ``n_tokens`` rows). For
``kind="transcoder"`` a row is ``[x | y]``: the hookpoint module's input (``d_in`` values)
followed by its output (``d_out`` values); for ``kind="sae"`` it is the module's output alone
(``d_in = d_out = width``), the residual stream when the hookpoint is a decoder layer. Rows are
stored in the subject's dtype (float32 on the CPU by default; see :mod:`nlrw.model.subject`).

**Windows.** Each document is tokenized without special tokens and followed by the tokenizer's
EOS token (BOS when it has no EOS) as a separator; the documents' tokens are concatenated in
document order and cut into consecutive windows of ``ctx_len`` tokens, the tail that does not
fill a window is dropped (EleutherAI sparsify's ``chunk_and_tokenize``, which the paper's
activations came from). A window therefore usually starts mid-document and spans document
boundaries. With ``prepend_bos`` each window is instead ``[BOS] + ctx_len - 1`` tokens of the
stream, for models that expect BOS at position 0. ``documents.npy[w]`` is the index (a row of
the dataset) of the document in which window ``w``'s first stream token lies.

**Documents and order.** A document is one row of the dataset (a paragraph of a local text
file: ``.txt`` files load with ``sample_by="paragraph"``); for the embedded ``"austen"`` corpus
one chapter (its paragraphs joined by blank lines), indexed by its first paragraph's row of
:func:`nlrw.assets.austen_corpus`. Documents are visited in a seeded random order (``shuffle``)
so that a budget smaller than the corpus still samples all of it; with ``shuffle=False``, in
dataset order.

**Held-out split.** Kept apart by a deterministic rule: for ``"austen"`` the book
:data:`nlrw.assets.AUSTEN_HELD_OUT_BOOK` (via :func:`nlrw.assets.split_held_out`); for any other
corpus, a document is held out when ``blake2b(text, key="nlrw-heldout-{seed}") mod 10000 <
eval_fraction * 10000`` (a hash of the text, not of the index, so that duplicated documents
land on the same side). Held-out activations go to ``activations/eval`` with their own budget
``n_eval_tokens``.

**Bounded memory and resuming.** Batches of ``batch_size`` windows stream to
:class:`nlrw.model.shards.ShardWriter` (one shard of ``rows_per_shard`` rows buffered at most); the
token ids go to memory-mapped files. A run killed at any point keeps its complete shards; the
next :func:`run` with the same config re-tokenizes the corpus (cheap), skips the forward pass of
every batch whose rows are already on disk and continues; batch ``b`` always holds windows
``[b * batch_size, (b + 1) * batch_size)``, so a resumed run computes every row in the same
batch as an uninterrupted one and ends with byte-identical shards.

Why this module is long: corpus reading, windowing and the resumable capture share the
batch arithmetic that makes a resumed run byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import torch

from nlrw.config.collect import CollectConfig
from nlrw.lib.io import atomic_path, atomic_write_json
from nlrw.lib.provenance import config_hash, from_dict, stage_record
from nlrw.lib.rundir import RunDir
from nlrw.model.shards import ShardReader, ShardWriter
from nlrw.model.subject import Kind, Subject, capture, default_device, load_subject

__all__ = [
    "CollectConfig",
    "CollectResult",
    "Corpus",
    "activation_rows",
    "collected_config",
    "is_held_out",
    "load_corpus",
    "model_identity",
    "run",
    "separator_token_id",
    "token_windows",
]

log = logging.getLogger(__name__)

_HASH_BUCKETS = 10_000
_FILE_BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
_BUILDERS = frozenset(_FILE_BUILDERS.values())
_DOC_CHUNK = 64  # documents tokenized per tokenizer call


class CollectResult(NamedTuple):
    """What :func:`run` wrote: shard set directories, record and counts."""

    train_dir: Path
    eval_dir: Path | None
    record_path: Path
    kind: Kind
    d_in: int
    d_out: int
    width: int
    dtype: str
    n_train_tokens: int
    n_eval_tokens: int
    skipped: bool
    """True when a complete collection with the same config was already there."""


# --------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Corpus:
    """A corpus's documents, split into training and held-out documents by a fixed rule.

    ``train_documents()`` and ``eval_documents()`` yield ``(index, text)`` in visiting order;
    ``index`` identifies the document (a row of the source dataset).
    """

    name: str
    n_documents: int
    held_out_rule: str
    order: str
    _train: Any
    _eval: Any

    def train_documents(self) -> Iterator[tuple[int, str]]:
        return self._train()

    def eval_documents(self) -> Iterator[tuple[int, str]]:
        return self._eval()


def _order(n: int, shuffle: bool, seed: int, stream: int) -> npt.NDArray[np.int64]:
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng([seed, stream]).permutation(n).astype(np.int64)


def _austen_chapters(ds: Any) -> list[tuple[int, str]]:
    """One document per chapter: ``(row of its first paragraph, paragraphs joined)``."""
    chapters: list[tuple[int, str]] = []
    key: tuple[str, int] | None = None
    paragraphs: list[str] = []
    first = -1
    for row, book, chapter, text in zip(
        ds["row"], ds["book"], ds["chapter"], ds["text"], strict=True
    ):
        if (book, chapter) != key:
            if paragraphs:
                chapters.append((first, "\n\n".join(paragraphs)))
            key, paragraphs, first = (book, chapter), [], row
        paragraphs.append(text)
    if paragraphs:
        chapters.append((first, "\n\n".join(paragraphs)))
    return chapters


def _austen(cfg: CollectConfig) -> Corpus:
    from nlrw.assets import AUSTEN_HELD_OUT_BOOK, austen_corpus, split_held_out

    ds = austen_corpus()
    ds = ds.add_column("row", list(range(len(ds))))
    train_ds, eval_ds = split_held_out(ds)
    train, held = _austen_chapters(train_ds), _austen_chapters(eval_ds)
    train_order = _order(len(train), cfg.shuffle, cfg.seed, 0)
    eval_order = _order(len(held), cfg.shuffle, cfg.seed, 1)
    return Corpus(
        name="austen",
        n_documents=len(train) + len(held),
        held_out_rule=f"book == {AUSTEN_HELD_OUT_BOOK!r} (nlrw.assets.split_held_out)",
        order=_order_text(cfg, "per split: train 0, eval 1"),
        _train=lambda: (train[i] for i in train_order),
        _eval=lambda: (held[i] for i in eval_order),
    )


def _order_text(cfg: CollectConfig, streams: str) -> str:
    if cfg.shuffle:
        return f"numpy default_rng([{cfg.seed}, stream]).permutation ({streams})"
    return "dataset order"


def is_held_out(text: str, seed: int, eval_fraction: float) -> bool:
    """The held-out rule for corpora other than Austen (see the module docstring)."""
    key = f"nlrw-heldout-{seed}".encode()[:64]
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=key).digest()
    return int.from_bytes(digest, "little") % _HASH_BUCKETS < round(eval_fraction * _HASH_BUCKETS)


def _load_dataset(cfg: CollectConfig) -> Any:
    """``datasets.load_dataset`` for a hub name, a local directory or local files."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    builder: str = cfg.dataset
    files = list(cfg.data_files)
    if not files:
        path = Path(cfg.dataset).expanduser()
        suffix = path.suffix.lower()
        if suffix in _FILE_BUILDERS:
            if not path.is_file():
                raise FileNotFoundError(f"dataset file not found: {path}")
            builder, files = _FILE_BUILDERS[suffix], [str(path)]
    elif builder not in _BUILDERS:
        raise ValueError(
            f"with data_files, dataset must name a builder ({', '.join(sorted(_BUILDERS))}), "
            f"not {cfg.dataset!r}"
        )
    local = [Path(f).expanduser() for f in files if not any(c in f for c in "*?[")]
    for f in local:
        if not f.exists():
            raise FileNotFoundError(f"data file not found: {f}")
    # datasets fails obscurely (StopIteration) on empty files: name the problem here.
    if (
        files
        and len(local) == len(files)
        and all(f.is_file() and not f.stat().st_size for f in local)
    ):
        raise ValueError(f"dataset {cfg.dataset!r} is empty: {', '.join(map(str, local))}")
    kwargs: dict[str, Any] = {"split": cfg.split}
    if files:
        kwargs["data_files"] = [str(Path(f).expanduser()) for f in files]
        if builder == "text":
            kwargs["sample_by"] = "paragraph"
    what = f"dataset {cfg.dataset!r}" + (f" (data_files {files})" if files else "")
    try:
        if files:
            return datasets.load_dataset(builder, **kwargs)
        return datasets.load_dataset(cfg.dataset, cfg.dataset_config, **kwargs)
    except (FileNotFoundError, ValueError, OSError, StopIteration, DatasetNotFoundError) as e:
        raise ValueError(f"cannot load {what} split {cfg.split!r}: {e}") from e


def load_corpus(cfg: CollectConfig) -> Corpus:
    """The corpus named by ``cfg.dataset``, its documents split into training and held-out.

    Raises:
        FileNotFoundError: a local dataset file that does not exist.
        ValueError: a dataset that cannot be loaded, a missing text column, an empty corpus.
    """
    if cfg.dataset == "austen" and not cfg.data_files:
        return _austen(cfg)
    ds = _load_dataset(cfg)
    if cfg.text_column not in ds.column_names:
        raise ValueError(
            f"dataset {cfg.dataset!r} has no column {cfg.text_column!r} "
            f"(columns: {', '.join(ds.column_names)}); set text_column"
        )
    if len(ds) == 0:
        raise ValueError(f"dataset {cfg.dataset!r} (split {cfg.split!r}) is empty")
    ds = ds.select_columns([cfg.text_column])
    order = _order(len(ds), cfg.shuffle, cfg.seed, 0)
    column = cfg.text_column

    def documents(held: bool) -> Iterator[tuple[int, str]]:
        for start in range(0, len(order), 256):
            indices = order[start : start + 256].tolist()
            texts = ds[indices][column]
            for i, text in zip(indices, texts, strict=True):
                if not isinstance(text, str):
                    raise TypeError(
                        f"column {column!r} of dataset {cfg.dataset!r} holds "
                        f"{type(text).__name__}, not text (row {i})"
                    )
                if is_held_out(text, cfg.seed, cfg.eval_fraction) == held:
                    yield i, text

    rule = (
        f"blake2b(text, digest_size=8, key='nlrw-heldout-{cfg.seed}') as little-endian int "
        f"mod {_HASH_BUCKETS} < {round(cfg.eval_fraction * _HASH_BUCKETS)}"
    )
    return Corpus(
        name=cfg.dataset,
        n_documents=len(ds),
        held_out_rule=rule,
        order=_order_text(cfg, "of all rows, each split keeping its own in that order"),
        _train=lambda: documents(False),
        _eval=lambda: documents(True),
    )


# --------------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------------


class _Window(NamedTuple):
    tokens: npt.NDArray[np.int32]
    document: int


@dataclass
class _Counter:
    documents_read: int = 0


def separator_token_id(tokenizer: Any) -> int:
    """The token placed after every document: EOS, else BOS."""
    for name in ("eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    raise ValueError("the tokenizer has neither an EOS nor a BOS token to separate documents")


def token_windows(
    documents: Iterable[tuple[int, str]],
    tokenizer: Any,
    ctx_len: int,
    *,
    prepend_bos: bool = False,
    counter: _Counter | None = None,
) -> Iterator[_Window]:
    """Cuts a stream of documents into windows of ``ctx_len`` tokens (see the module docstring).

    Yields ``(tokens int32[ctx_len], index of the document where the window starts)``.
    """
    sep = separator_token_id(tokenizer)
    bos: int | None = getattr(tokenizer, "bos_token_id", None)
    if prepend_bos and bos is None:
        raise ValueError("prepend_bos needs a tokenizer with a BOS token")
    body = ctx_len - 1 if prepend_bos else ctx_len
    tokens = np.empty(0, np.int32)
    docs = np.empty(0, np.int64)
    it = iter(documents)
    while chunk := list(itertools.islice(it, _DOC_CHUNK)):
        encoded = tokenizer([text for _, text in chunk], add_special_tokens=False, verbose=False)[
            "input_ids"
        ]
        for (index, _), ids in zip(chunk, encoded, strict=True):
            if counter is not None:
                counter.documents_read += 1
            if not ids:
                continue
            tokens = np.concatenate([tokens, np.asarray(ids, np.int32), [sep]]).astype(np.int32)
            docs = np.concatenate([docs, np.full(len(ids) + 1, index, np.int64)])
            n = len(tokens) // body
            for w in range(n):
                window = tokens[w * body : (w + 1) * body]
                if prepend_bos:
                    assert bos is not None
                    window = np.concatenate([np.asarray([bos], np.int32), window])
                yield _Window(window.copy(), int(docs[w * body]))
            tokens, docs = tokens[n * body :], docs[n * body :]


# --------------------------------------------------------------------------------------------
# Collection
# --------------------------------------------------------------------------------------------


def activation_rows(
    model: torch.nn.Module, hookpoint: str, kind: Kind, input_ids: torch.Tensor
) -> torch.Tensor:
    """The shard rows of one batch: ``[batch * seq, width]`` (``[x | y]`` or ``y``), on the
    model's device, contiguous. The forward pass stops after the hookpoint."""
    acts = capture(model, hookpoint, input_ids, kind=kind)
    if kind == "transcoder":
        assert acts.x is not None
        rows = torch.cat([acts.x, acts.y], dim=-1)
    else:
        rows = acts.y
    return rows.reshape(-1, rows.shape[-1]).contiguous()


def _probe_widths(subject: Subject, hookpoint: str, kind: Kind, token: int) -> tuple[int, int]:
    ids = torch.full((1, 2), token, dtype=torch.long, device=subject.device)
    acts = capture(subject.model, hookpoint, ids, kind=kind)
    d_out = int(acts.y.shape[-1])
    d_in = int(acts.x.shape[-1]) if acts.x is not None else d_out
    if acts.x is not None and acts.x.shape[:-1] != acts.y.shape[:-1]:
        raise ValueError(
            f"hookpoint {hookpoint!r}: input {list(acts.x.shape)} and output "
            f"{list(acts.y.shape)} differ in their leading dimensions; it is no per-token module"
        )
    return d_in, d_out


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            h.update(block)
    return h.hexdigest()


def model_identity(subject: Subject) -> dict[str, Any]:
    """Name, resolved path, class and sha256 of each weight file of the subject."""
    folder: Path | None = Path(subject.path) if Path(subject.path).is_dir() else None
    if folder is None:
        with contextlib.suppress(Exception):  # a hub model: its snapshot in the local cache
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(subject.path, local_files_only=True))
    weights: dict[str, str] = {}
    if folder is not None:
        for f in sorted(folder.iterdir()):
            if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES):
                weights[f.name] = _sha256(f)
    config = subject.model.config
    return {
        "name": subject.name,
        "path": str(folder.resolve()) if folder is not None else subject.path,
        "architecture": type(subject.model).__name__,
        "revision": getattr(config, "_commit_hash", None),
        "weights_sha256": weights,
        "n_parameters": sum(p.numel() for p in subject.model.parameters()),
    }


@dataclass
class _SplitStats:
    rows: int
    windows: int
    documents_read: int
    corpus_exhausted: bool


def _open_memmap(path: Path, dtype: type, shape: tuple[int, ...]) -> np.memmap[Any, Any]:
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)


def _finish_array(partial: Path, final: Path, array: np.memmap[Any, Any], count: int) -> None:
    """Moves the first ``count`` entries of a memory-mapped array to ``final`` atomically."""
    array.flush()
    if count == len(array):
        del array
        os.replace(partial, final)
        return
    data = np.array(array[:count])
    del array
    with atomic_path(final) as tmp, open(tmp, "wb") as f:
        np.save(f, data)
    partial.unlink()


def _collect_split(
    subject: Subject,
    cfg: CollectConfig,
    name: str,
    windows: Iterator[_Window],
    counter: _Counter,
    target_rows: int,
    out_dir: Path,
    width: int,
    progress: bool | None,
) -> _SplitStats:
    """Streams one split's activations into the shard set ``out_dir`` (resuming it)."""
    from tqdm.auto import tqdm

    ctx = cfg.ctx_len
    n_windows = math.ceil(target_rows / ctx)
    dtype_name = str(subject.dtype).removeprefix("torch.")
    done = (out_dir / "manifest.json").is_file() and ShardReader(out_dir).complete
    # A set completed before a kill (of the run, not the split) is only walked through again
    # to rebuild its statistics; no forward pass runs.
    writer = None
    if not done:
        writer = ShardWriter(
            out_dir,
            width=width,
            dtype=dtype_name,  # pyright: ignore[reportArgumentType]
            rows_per_shard=cfg.rows_per_shard,
            resume=True,
        )
    with writer if writer is not None else contextlib.nullcontext():
        start = writer.rows_written if writer is not None else ShardReader(out_dir).num_rows
        # Token ids of every window are rewritten from scratch on each (re)start: the windows
        # are recomputed anyway to find where the run stopped.
        tokens_partial = out_dir / "tokens.npy.partial"
        docs_partial = out_dir / "documents.npy.partial"
        tokens = _open_memmap(tokens_partial, np.int32, (n_windows, ctx))
        documents = _open_memmap(docs_partial, np.int64, (n_windows,))
        batch: list[npt.NDArray[np.int32]] = []
        n = 0
        bar = tqdm(
            total=target_rows,
            initial=min(start, target_rows),
            unit="tok",
            unit_scale=True,
            desc=f"collect {name}",
            disable=None if progress is None else not progress,
        )

        def flush(first_window: int) -> None:
            begin = first_window * ctx
            end = min(begin + len(batch) * ctx, target_rows)
            if end > start:
                ids = torch.from_numpy(np.stack(batch)).long().to(subject.device)
                rows = activation_rows(subject.model, cfg.hookpoint, cfg.kind, ids)
                lo = max(start - begin, 0)
                assert writer is not None
                writer.write(rows[lo : end - begin])
                bar.update(end - begin - lo)
            batch.clear()

        with bar:
            for window in itertools.islice(windows, n_windows):
                tokens[n] = window.tokens
                documents[n] = window.document
                batch.append(window.tokens)
                n += 1
                if len(batch) == cfg.batch_size:
                    flush(n - len(batch))
            if batch:
                flush(n - len(batch))
        rows = min(n * ctx, target_rows)
        if n < n_windows:
            log.warning(
                "the %s split ran out after %d windows: %d of %d tokens collected",
                name,
                n,
                rows,
                target_rows,
            )
        # Token files are final before the shard set is marked complete (on leaving the
        # ``with``), so a complete set always has them.
        _finish_array(tokens_partial, out_dir / "tokens.npy", tokens, n)
        _finish_array(docs_partial, out_dir / "documents.npy", documents, n)
    return _SplitStats(rows, n, counter.documents_read, n < n_windows)


def _peek(windows: Iterator[_Window], what: str) -> Iterator[_Window]:
    first = next(windows, None)
    if first is None:
        raise ValueError(f"the {what} yields no window of tokens (empty corpus, or too short)")
    return itertools.chain([first], windows)


def _result(record: dict[str, Any], act_dir: Path, skipped: bool) -> CollectResult:
    splits = record["splits"]
    return CollectResult(
        train_dir=act_dir / "train",
        eval_dir=act_dir / "eval" if "eval" in splits else None,
        record_path=act_dir / "collect.json",
        kind=record["kind"],
        d_in=record["d_in"],
        d_out=record["d_out"],
        width=record["width"],
        dtype=record["dtype"],
        n_train_tokens=splits["train"]["rows"],
        n_eval_tokens=splits["eval"]["rows"] if "eval" in splits else 0,
        skipped=skipped,
    )


def run(
    cfg: CollectConfig,
    run_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    progress: bool | None = None,
) -> CollectResult:
    """Collects activations into ``run_dir/activations`` (see the module docstring).

    A complete collection with the same config is returned as is (``skipped=True``); an
    incomplete one is resumed. Activations from a different config raise unless
    ``overwrite``, which deletes them first.

    Args:
        cfg: what to collect.
        run_dir: the run directory.
        overwrite: delete existing activations of this run directory and start over.
        progress: show a progress bar with tokens/s (default: when stderr is a terminal).

    Raises:
        FileExistsError: ``run_dir/activations`` holds activations of another config.
        FileNotFoundError, ValueError: bad dataset, column, hookpoint or ctx_len; raised before
            anything is written.
    """
    act_dir = Path(run_dir) / "activations"
    record_path = act_dir / "collect.json"
    want_hash = config_hash(cfg)
    previous: dict[str, Any] | None = None
    if overwrite and act_dir.exists():
        shutil.rmtree(act_dir)
    if record_path.is_file():
        previous = json.loads(record_path.read_text())
        assert previous is not None
        if previous.get("config_hash") != want_hash:
            raise FileExistsError(
                f"{act_dir} holds activations collected with another config (hash "
                f"{previous.get('config_hash')}, now {want_hash}); pass overwrite=True or "
                "use another run directory"
            )
        if previous.get("complete"):
            return _result(previous, act_dir, skipped=True)
    elif act_dir.exists() and any(act_dir.iterdir()):
        raise FileExistsError(
            f"{act_dir} exists without collect.json (not written by collect?); pass "
            "overwrite=True or use another run directory"
        )

    corpus = load_corpus(cfg)
    _check_context(cfg)
    subject = load_subject(cfg.model, dtype=cfg.dtype, device=_device(cfg.device))
    sep = separator_token_id(subject.tokenizer)
    d_in, d_out = _probe_widths(subject, cfg.hookpoint, cfg.kind, sep)
    width = d_in + d_out if cfg.kind == "transcoder" else d_out
    identity = model_identity(subject)
    if previous is not None and previous.get("model") != identity:
        raise FileExistsError(
            f"{act_dir} was collected from other weights than {cfg.model!r} has now "
            "(weights sha256 differ); pass overwrite=True to start over"
        )

    splits: list[tuple[str, int, Any]] = [("train", cfg.n_tokens, corpus.train_documents)]
    if cfg.n_eval_tokens > 0:
        splits.append(("eval", cfg.n_eval_tokens, corpus.eval_documents))
    streams: list[tuple[str, int, Iterator[_Window], _Counter]] = []
    for name, target, documents in splits:
        counter = _Counter()
        what = "training split" if name == "train" else "held-out split"
        windows = token_windows(
            documents(),
            subject.tokenizer,
            cfg.ctx_len,
            prepend_bos=cfg.prepend_bos,
            counter=counter,
        )
        streams.append((name, target, _peek(windows, f"{what} of {corpus.name!r}"), counter))

    dtype_name = str(subject.dtype).removeprefix("torch.")
    record: dict[str, Any] = {
        "complete": False,
        "kind": cfg.kind,
        "hookpoint": cfg.hookpoint,
        "d_in": d_in,
        "d_out": d_out,
        "width": width,
        "row_layout": "row r = position r % ctx_len of window r // ctx_len; "
        + (
            "[x (module input, d_in) | y (module output, d_out)]"
            if cfg.kind == "transcoder"
            else "y (module output, width = d_in = d_out)"
        ),
        "model": identity,
        "dtype": dtype_name,
        "device": str(subject.device),
        "ctx_len": cfg.ctx_len,
        "seed": cfg.seed,
        "tokenizer": {
            "separator_token_id": sep,
            "bos_token_id": getattr(subject.tokenizer, "bos_token_id", None),
            "prepend_bos": cfg.prepend_bos,
            "vocab_size": len(subject.tokenizer),
        },
        "corpus": {
            "dataset": corpus.name,
            "documents": corpus.n_documents,
            "document_order": corpus.order,
            "held_out_rule": corpus.held_out_rule,
        },
        "splits": {},
    }
    act_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record_path, stage_record("collect", cfg, **record))

    for name, target, windows, counter in streams:
        stats = _collect_split(
            subject, cfg, name, windows, counter, target, act_dir / name, width, progress
        )
        record["splits"][name] = {
            "path": name,
            "rows": stats.rows,
            "requested_rows": target,
            "windows": stats.windows,
            "documents_read": stats.documents_read,
            "corpus_exhausted": stats.corpus_exhausted,
            "tokens_file": f"{name}/tokens.npy",
            "documents_file": f"{name}/documents.npy",
        }
    record["complete"] = True
    atomic_write_json(record_path, stage_record("collect", cfg, **record))
    return _result(record, act_dir, skipped=False)


def _device(device: str) -> torch.device:
    return default_device() if device == "auto" else torch.device(device)


def _check_context(cfg: CollectConfig) -> None:
    """ctx_len against the model's positions, from its config alone (before loading weights)."""
    from transformers import AutoConfig

    from nlrw.assets import resolve_model

    config = AutoConfig.from_pretrained(resolve_model(cfg.model))
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and cfg.ctx_len > limit:
        raise ValueError(
            f"ctx_len={cfg.ctx_len} is longer than model {cfg.model!r} allows "
            f"(config.max_position_embeddings = {limit})"
        )


def collected_config(run_dir: str | Path) -> CollectConfig:
    """The collect config a run directory was built with (its ``activations/collect.json``),
    for the stages and commands that run on a finished collection."""
    paths = RunDir(run_dir)
    record = paths.read_json(paths.collect_record, stage="collect")
    return from_dict(CollectConfig, record["config"], str(paths.collect_record))
