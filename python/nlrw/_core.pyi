"""Type stubs of the Rust extension ``nlrw._core`` (see rust/python/src)."""

import os
from collections.abc import Iterator
from typing import Literal

import numpy as np
import numpy.typing as npt

__version__: str

class ShardError(Exception):
    """A shard set is missing, truncated, corrupt or disagrees with its manifest."""

# --- top-k (rust/python/src/topk.rs) ---

def topk_encode(
    pre_acts: npt.NDArray[np.float32] | npt.NDArray[np.float16] | npt.NDArray[np.uint16], k: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint32]]: ...
def decode(
    values: npt.NDArray[np.float32], indices: npt.NDArray[np.uint32], d: int
) -> npt.NDArray[np.float32]: ...
def topk_replace(
    values: npt.NDArray[np.float32],
    indices: npt.NDArray[np.uint32],
    rows: npt.NDArray[np.uint64],
    latents: npt.NDArray[np.uint32],
    new_values: npt.NDArray[np.float32],
    k_out: int,
    d: int,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint32]]: ...

class LatentStats:
    """Per-latent running statistics (count of activations > 0, max, sum, sum of squares)."""

    def __init__(self, num_latents: int) -> None: ...
    def update(self, values: npt.NDArray[np.float32], indices: npt.NDArray[np.uint32]) -> None: ...
    def merge(self, other: LatentStats) -> None: ...
    @staticmethod
    def from_arrays(
        rows: int,
        count: npt.NDArray[np.uint64],
        max: npt.NDArray[np.float32],
        sum: npt.NDArray[np.float64],
        sum_sq: npt.NDArray[np.float64],
    ) -> LatentStats: ...
    @property
    def num_latents(self) -> int: ...
    @property
    def rows(self) -> int: ...
    @property
    def count(self) -> npt.NDArray[np.uint64]: ...
    @property
    def max(self) -> npt.NDArray[np.float32]: ...
    @property
    def sum(self) -> npt.NDArray[np.float64]: ...
    @property
    def sum_sq(self) -> npt.NDArray[np.float64]: ...

# --- activation shards (rust/python/src/shards.rs) ---
# Rows cross the boundary as uint8 arrays [rows, width * itemsize]; nlrw.model.shards views them

class _ShardWriter:
    def __init__(
        self,
        path: str | os.PathLike[str],
        width: int,
        dtype: Literal["float32", "float16", "bfloat16"],
        rows_per_shard: int,
        mode: Literal["new", "resume", "overwrite"] = "new",
    ) -> None: ...
    def write(self, rows: npt.NDArray[np.uint8]) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...
    @property
    def path(self) -> str: ...
    @property
    def width(self) -> int: ...
    @property
    def dtype(self) -> Literal["float32", "float16", "bfloat16"]: ...
    @property
    def rows_per_shard(self) -> int: ...
    @property
    def rows_written(self) -> int: ...
    @property
    def rows_committed(self) -> int: ...
    @property
    def num_shards(self) -> int: ...
    @property
    def closed(self) -> bool: ...

class _ShardReader:
    def __init__(self, path: str | os.PathLike[str]) -> None: ...
    @property
    def path(self) -> str: ...
    @property
    def width(self) -> int: ...
    @property
    def dtype(self) -> Literal["float32", "float16", "bfloat16"]: ...
    @property
    def rows_per_shard(self) -> int: ...
    @property
    def num_rows(self) -> int: ...
    @property
    def num_shards(self) -> int: ...
    @property
    def complete(self) -> bool: ...
    def num_batches(self, batch_rows: int, drop_last: bool) -> int: ...
    def verify(self) -> None: ...
    def batches(
        self,
        batch_rows: int,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        verify: bool = True,
        drop_last: bool = False,
        prefetch: int = 4,
        shuffle_buffer_rows: int | None = None,
    ) -> _ShardBatches: ...

class _ShardBatches(Iterator[npt.NDArray[np.uint8]]):
    def __iter__(self) -> _ShardBatches: ...
    def __next__(self) -> npt.NDArray[np.uint8]: ...
    def close(self) -> None: ...

class _ShardBatchMemory:
    """Keeps the memory-mapped shard behind a zero-copy batch alive (the array's base)."""

# --- quantile (rust/python/src/quantile.rs); wrappers with conversions: nlrw.model.quantiles ---

def quantile_normalize(
    latent_ids: npt.NDArray[np.uint32],
    scores: npt.NDArray[np.float32],
    sim_table: npt.NDArray[np.float32],
    active_table: npt.NDArray[np.float32],
    frequency: npt.NDArray[np.float32],
    offsets: npt.NDArray[np.float32] | None = None,
) -> npt.NDArray[np.float32]:
    """F_real⁻¹(F_sim(score) + offset·w) per (latent_id, score), the real side the mixture of
    ``frequency`` and ``active_table``; C-contiguous arrays of these dtypes."""

def quantile_tables(
    latent_ids: npt.NDArray[np.uint32],
    values: npt.NDArray[np.float32],
    num_latents: int,
    num_quantiles: int,
    total: int | npt.NDArray[np.uint64] | None = None,
) -> npt.NDArray[np.float32]:
    """Exact [L, Q] tables (numpy's linear method); unsampled observations are zeros."""

class QuantileSketch:
    """Mergeable per-latent DDSketch with relative accuracy alpha."""

    def __init__(self, num_latents: int, alpha: float = 0.01) -> None: ...
    @property
    def num_latents(self) -> int: ...
    @property
    def alpha(self) -> float: ...
    def update(
        self,
        latent_ids: npt.NDArray[np.uint32],
        values: npt.NDArray[np.float32],
        total: int | npt.NDArray[np.uint64] | None = None,
    ) -> None: ...
    def add_zeros(self, counts: int | npt.NDArray[np.uint64]) -> None: ...
    def merge(self, other: QuantileSketch) -> None: ...
    def tables(self, num_quantiles: int) -> npt.NDArray[np.float32]: ...
    def counts(self) -> npt.NDArray[np.uint64]: ...
    def copy(self) -> QuantileSketch: ...
    def state(self) -> dict[str, np.ndarray]: ...
    @staticmethod
    def from_state(state: dict[str, np.ndarray]) -> QuantileSketch: ...
    def __eq__(self, other: object) -> bool: ...
