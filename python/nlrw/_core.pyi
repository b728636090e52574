"""Type stubs of the Rust extension ``nlrw._core`` (see rust/python/src)."""

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
