"""Activation shards: MLP activations stored on disk in chunks, streamed back for training.

``collect`` writes the activations it captures with :class:`ShardWriter`; ``train`` iterates a
:class:`ShardReader`, which yields batches of rows in bounded memory however large the set.
Both are thin wrappers over the Rust core (``nlrw._core``), which does the I/O, checksums and
prefetching with the GIL released.

A shard set is a directory::

    manifest.json                 width, dtype, rows_per_shard, total_rows, complete, and per
                                  shard: file, rows, bytes, xxh3 (checksum of the whole file)
    shard-000000.safetensors ...  one tensor "activations" of shape [rows, width]

Shards are plain safetensors files (``safetensors.numpy.load_file`` opens them). Writes are
atomic: a shard is written under a temporary dot-name, fsynced and renamed before the manifest
(itself replaced atomically) lists it, so a writer killed at any point leaves a set whose
manifest lists only complete shards; ``ShardWriter(..., resume=True)`` continues it.

Dtypes are ``float32``, ``float16`` and ``bfloat16``. numpy has no bfloat16, so bfloat16 rows
are passed and returned as ``uint16`` arrays holding the bit patterns; :meth:`ShardWriter.write`
also takes torch tensors (bfloat16 included) and :func:`to_torch` turns a batch back into one.

Input policy of :meth:`ShardWriter.write`: rows must already have the writer's dtype (a wrong
dtype and native byte order (a wrong dtype raises ``TypeError`` naming ``rows``; nothing is
cast silently) and be C-contiguous: a transposed, Fortran-ordered, strided or sliced view is
refused with a ``ValueError`` naming ``rows`` (a large array is never copied behind your back;
use ``np.ascontiguousarray``). The binding ``nlrw._core._ShardWriter.write`` refuses the same
views of its ``uint8`` rows by name, and never reads a Fortran-ordered block as rows.
CUDA tensors are copied to the CPU, which writing them needs anyway.

Batches without shuffling are zero-copy views of the memory-mapped shards wherever a batch
lies inside one shard (the mapping is private copy-on-write: writing to a batch never changes
the file). Shuffled batches are copied out of the mappings. Errors about the files (missing,
truncated, corrupt, disagreeing with the manifest) raise :class:`nlrw.ShardError` naming the
file; bad arguments raise ``ValueError`` or ``TypeError``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from nlrw._core import ShardError, _ShardBatches, _ShardReader, _ShardWriter

if TYPE_CHECKING:
    import torch

__all__ = ["DTypeName", "ShardError", "ShardReader", "ShardWriter", "to_torch"]

DTypeName = Literal["float32", "float16", "bfloat16"]

# numpy dtype of a batch for each stored dtype (bfloat16 travels as its uint16 bit pattern).
_NUMPY_DTYPE: dict[str, np.dtype[Any]] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(np.uint16),
}


def _dtype_name(dtype: object) -> DTypeName:
    """Normalizes a dtype given as a name, a numpy dtype (or scalar type) or a torch dtype."""
    if isinstance(dtype, str) or str(dtype).startswith("torch."):
        name = str(dtype).removeprefix("torch.")
    else:
        try:
            name = np.dtype(dtype).name  # type: ignore[arg-type]
        except TypeError:
            name = repr(dtype)
    if name == "float32":
        return "float32"
    if name == "float16":
        return "float16"
    if name == "bfloat16":
        return "bfloat16"
    raise ValueError(f"dtype must be 'float32', 'float16' or 'bfloat16', not {dtype!r}")


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, not {value!r}")
    return int(value)


def _torch_to_numpy(rows: torch.Tensor, expected: DTypeName) -> npt.NDArray[Any]:
    import torch

    names = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
    got = names.get(rows.dtype)
    if got != expected:
        raise TypeError(f"rows: expected a {expected} tensor, got {rows.dtype}")
    if not rows.is_contiguous():
        raise ValueError("rows must be contiguous; call .contiguous() first")
    rows = rows.detach()
    if rows.device.type != "cpu":
        rows = rows.cpu()
    if expected == "bfloat16":
        return rows.view(torch.int16).numpy().view(np.uint16)
    return rows.numpy()


class ShardWriter:
    """Writes rows of activations into a shard set at ``path``.

    Use it as a context manager: leaving the ``with`` block normally writes the final
    (possibly short) shard and marks the set complete; leaving it with an exception keeps the
    full shards written so far (valid, resumable) and drops the buffered rows, and so does a
    writer that is never closed.

    Args:
        path: directory of the set (created if missing).
        width: values per row.
        dtype: stored dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` (numpy or torch
            dtypes are accepted too).
        rows_per_shard: rows per shard file (the last shard of a set may have fewer).
        resume: continue an incomplete set at ``path`` (start a new one if there is none);
            unlisted shard files and temporary files left by a killed writer are removed.
            :attr:`rows_written` then says how many rows the set already holds.
        overwrite: replace a set at ``path``. Without ``resume`` or ``overwrite``, an existing
            set raises ``FileExistsError``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        width: int,
        dtype: DTypeName | np.dtype[Any] | torch.dtype = "float32",
        rows_per_shard: int = 16384,
        resume: bool = False,
        overwrite: bool = False,
    ) -> None:
        if resume and overwrite:
            raise ValueError("pass at most one of resume=True and overwrite=True")
        self._dtype: DTypeName = _dtype_name(dtype)
        self._width = _positive_int("width", width)
        mode = "resume" if resume else "overwrite" if overwrite else "new"
        self._inner = _ShardWriter(
            os.fspath(path),
            self._width,
            self._dtype,
            _positive_int("rows_per_shard", rows_per_shard),
            mode,
        )

    def write(self, rows: npt.NDArray[Any] | torch.Tensor) -> None:
        """Appends ``rows``, a C-contiguous ``[n, width]`` array (or tensor) of the writer's
        dtype, ``n >= 1``. Full shards are written straight from ``rows``; the remainder waits
        in a buffer for the next call or :meth:`close`."""
        array = self._as_array(rows)
        self._inner.write(array.view(np.uint8))

    def _as_array(self, rows: npt.NDArray[Any] | torch.Tensor) -> npt.NDArray[Any]:
        if isinstance(rows, np.ndarray):
            array = rows
        else:
            torch = sys.modules.get("torch")  # a tensor implies torch is imported already
            if torch is None or not isinstance(rows, torch.Tensor):
                raise TypeError(f"rows: expected a numpy array or torch tensor, got {type(rows)}")
            array = _torch_to_numpy(rows, self._dtype)
        expected = _NUMPY_DTYPE[self._dtype]
        if array.dtype != expected and not (
            self._dtype == "bfloat16" and array.dtype.name == "bfloat16"
        ):
            hint = " (bfloat16 rows are passed as uint16 bit patterns)" * (
                self._dtype == "bfloat16"
            )
            raise TypeError(
                f"rows: expected dtype {self._dtype}{hint}, got {array.dtype}; "
                "convert explicitly (rows are never cast silently)"
            )
        if array.ndim != 2 or array.shape[1] != self._width:
            raise ValueError(f"rows: expected shape [n, {self._width}], got {list(array.shape)}")
        if array.shape[0] == 0:
            raise ValueError("rows is empty (0 rows)")
        if not array.flags.c_contiguous:
            raise ValueError(
                "rows must be C-contiguous (got a strided view); pass np.ascontiguousarray(rows)"
            )
        return array

    def close(self) -> None:
        """Writes the buffered rows as the final shard and marks the set complete."""
        self._inner.close()

    def abort(self) -> None:
        """Stops without completing the set; written shards stay and can be resumed."""
        self._inner.abort()

    @property
    def path(self) -> str:
        return os.fspath(self._inner.path)

    @property
    def width(self) -> int:
        return self._width

    @property
    def dtype(self) -> DTypeName:
        return self._dtype

    @property
    def rows_written(self) -> int:
        """Rows accepted so far, including those already in a resumed set."""
        return self._inner.rows_written

    @property
    def rows_committed(self) -> int:
        """Rows in shards durably on disk: where a later ``resume=True`` continues."""
        return self._inner.rows_committed

    @property
    def num_shards(self) -> int:
        return self._inner.num_shards

    @property
    def closed(self) -> bool:
        return self._inner.closed

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class ShardReader:
    """Iterates a shard set in batches of ``batch_rows`` rows (numpy ``[rows, width]``).

    Constructing it reads and validates the manifest; each ``iter(reader)`` starts a pass on a
    background thread that maps each shard, checks it against the manifest (and its checksum
    when ``verify``) before any of its rows go out, and prepares up to ``prefetch`` batches
    ahead. An incomplete set (its writer was killed) reads as the complete shards it lists.

    Args:
        path: directory of the set.
        batch_rows: rows per batch; the last batch may be smaller unless ``drop_last``.
        shuffle: visit shards in a random order and mix rows through a shuffle buffer. The
            order depends only on ``seed`` and the epoch (:meth:`set_epoch`): equal seeds give
            equal orders on every platform. Every row appears exactly once per pass.
        seed: seed of the shuffle.
        verify: check every shard's xxh3 checksum before use (a full read of each file).
            Without it, size and header are still checked, but flipped data bytes go unseen.
        drop_last: skip a final batch smaller than ``batch_rows``.
        prefetch: batches prepared ahead by the background thread.
        shuffle_buffer_rows: rows held in the shuffle buffer (default ``64 * batch_rows``);
            larger mixes better. It holds row indices, not rows, so it costs 16 bytes a row.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        batch_rows: int = 4096,
        shuffle: bool = False,
        seed: int = 0,
        verify: bool = True,
        drop_last: bool = False,
        prefetch: int = 4,
        shuffle_buffer_rows: int | None = None,
    ) -> None:
        self._batch_rows = _positive_int("batch_rows", batch_rows)
        self._prefetch = _positive_int("prefetch", prefetch)
        self._shuffle_buffer_rows = (
            None
            if shuffle_buffer_rows is None
            else _positive_int("shuffle_buffer_rows", shuffle_buffer_rows)
        )
        if not 0 <= seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), not {seed!r}")
        self._shuffle = bool(shuffle)
        self._seed = int(seed)
        self._verify = bool(verify)
        self._drop_last = bool(drop_last)
        self._epoch = 0
        self._inner = _ShardReader(os.fspath(path))
        self._np_dtype = _NUMPY_DTYPE[self._inner.dtype]

    def set_epoch(self, epoch: int) -> None:
        """Selects the shuffle order of later passes (like ``DistributedSampler.set_epoch``)."""
        if not 0 <= epoch < 2**64:
            raise ValueError(f"epoch must be in [0, 2**64), not {epoch!r}")
        self._epoch = int(epoch)

    def __iter__(self) -> Iterator[npt.NDArray[Any]]:
        batches = self._inner.batches(
            self._batch_rows,
            shuffle=self._shuffle,
            seed=self._seed,
            epoch=self._epoch,
            verify=self._verify,
            drop_last=self._drop_last,
            prefetch=self._prefetch,
            shuffle_buffer_rows=self._shuffle_buffer_rows,
        )
        return self._typed(batches, self._np_dtype)

    @staticmethod
    def _typed(batches: _ShardBatches, dtype: np.dtype[Any]) -> Iterator[npt.NDArray[Any]]:
        try:
            for raw in batches:
                yield raw.view(dtype)
        finally:
            batches.close()  # stops the background thread when a loop is abandoned

    def __len__(self) -> int:
        """Number of batches one pass yields."""
        return self._inner.num_batches(self._batch_rows, self._drop_last)

    def verify(self) -> None:
        """Checks every shard (size, checksum, header) now; raises :class:`ShardError`."""
        self._inner.verify()

    @property
    def path(self) -> str:
        return os.fspath(self._inner.path)

    @property
    def num_rows(self) -> int:
        return self._inner.num_rows

    @property
    def num_shards(self) -> int:
        return self._inner.num_shards

    @property
    def width(self) -> int:
        return self._inner.width

    @property
    def dtype(self) -> DTypeName:
        return _dtype_name(self._inner.dtype)

    @property
    def rows_per_shard(self) -> int:
        return self._inner.rows_per_shard

    @property
    def complete(self) -> bool:
        """Whether the writer closed the set (an incomplete set is one still being written,
        or whose writer died)."""
        return self._inner.complete

    @property
    def batch_rows(self) -> int:
        return self._batch_rows


def to_torch(batch: npt.NDArray[Any], dtype: DTypeName) -> torch.Tensor:
    """A batch as a torch tensor of the set's ``dtype``, without copying.

    The one conversion numpy cannot do itself: ``uint16`` bfloat16 bit patterns become a
    ``torch.bfloat16`` tensor.
    """
    import torch

    name = _dtype_name(dtype)
    expected = _NUMPY_DTYPE[name]
    if batch.dtype != expected:
        raise TypeError(f"batch: expected dtype {expected} for {name}, got {batch.dtype}")
    tensor = torch.from_numpy(batch)
    return tensor.view(torch.bfloat16) if name == "bfloat16" else tensor
