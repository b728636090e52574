"""Sparse top-k encoding, the transcoder's activation function, on the CPU in Rust.

A TopK transcoder's latents are ``z = topk(relu(W_enc x + b_enc))``: per row of
pre-activations only the k largest positive entries survive. :func:`topk_encode` computes
that selection fused with the ReLU, in parallel over rows, and returns the sparse form
``(values float32 [n, k], indices [n, k])``:

* values sorted descending, ties broken by the lower latent index first;
* a row with fewer than k positive entries is padded with value 0 at the lowest unused
  indices (exactly what a stable sort of ``relu(x)`` gives);
* NaN or ±inf in a row is an error that names the row.

Input dtypes: float32, float16, and bfloat16 — as a torch ``bfloat16`` tensor or as a
numpy ``uint16`` array holding the bfloat16 bits (numpy has no bfloat16). Torch tensors on
the CPU come back as torch tensors (indices int64, ready for ``index_select``); CUDA
tensors are encoded with ``torch.topk`` on the device instead, whose tie order may differ.

Helpers: :func:`decode` scatters sparse latents into a dense array, :func:`topk_replace`
re-applies top-k after some latents were overwritten (how the evaluation splices simulated
values into the true latents), and :class:`LatentStats` keeps per-latent running
statistics over streamed batches.

Array layouts, per function (a "view" is a transposed, Fortran-ordered, strided, sliced or
negatively strided array):

* :func:`topk_encode` refuses any numpy array that is not C-contiguous, and any torch tensor
  that is not contiguous, with a ``ValueError`` naming ``pre_acts`` (pre-activations are the
  largest arrays of the pipeline: they are never copied behind your back; call
  ``np.ascontiguousarray`` or ``.contiguous()``). So does ``nlrw._core.topk_encode``.
* :func:`decode` and :func:`topk_replace` copy their (small, sparse) inputs into C order
  and the dtypes they need, so any layout and byte order gives the same result.
  ``nlrw._core.decode`` and ``nlrw._core.topk_replace`` refuse what is not C-contiguous
  with a ``ValueError`` naming the argument.
* :meth:`LatentStats.update` refuses non-C-contiguous ``values`` or ``indices`` by name;
  :meth:`LatentStats.from_arrays` copies its 1-D arrays whatever their strides.
* Every ``nlrw._core`` function takes native byte order and its exact dtypes only; anything
  else is a ``TypeError`` naming the argument.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import numpy.typing as npt
import torch

from nlrw import _core
from nlrw._core import LatentStats

__all__ = ["LatentStats", "SparseLatents", "decode", "topk_encode", "topk_replace"]


class SparseLatents(NamedTuple):
    """Top-k latents of each row: ``values[i, j]`` is latent ``indices[i, j]`` of row i."""

    values: npt.NDArray[np.float32] | torch.Tensor
    indices: npt.NDArray[np.uint32] | torch.Tensor


_TORCH_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _as_numpy_input(pre_acts: np.ndarray | torch.Tensor) -> np.ndarray:
    """The array the Rust kernel reads: float32, float16 or uint16 (bfloat16 bits)."""
    if isinstance(pre_acts, torch.Tensor):
        if pre_acts.dtype not in _TORCH_DTYPES:
            raise TypeError(
                f"pre_acts must be float32, float16 or bfloat16, got torch {pre_acts.dtype}"
            )
        if not pre_acts.is_contiguous():
            raise ValueError(
                f"pre_acts must be a contiguous tensor, got strides {pre_acts.stride()} for "
                f"shape {tuple(pre_acts.shape)}; call pre_acts.contiguous() first"
            )
        t = pre_acts.detach()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(np.uint16)
        return t.numpy()
    if not isinstance(pre_acts, np.ndarray):
        raise TypeError(f"pre_acts must be a numpy array or torch tensor, got {type(pre_acts)}")
    return pre_acts


def topk_encode(pre_acts: np.ndarray | torch.Tensor, k: int) -> SparseLatents:
    """Fused ReLU + top-k of each row of a C-contiguous ``[n, d]`` array.

    ``z_i = topk(relu(x_i))`` with the ordering and padding contract of the module
    docstring. Raises ``ValueError`` for k = 0, k > d, no rows, an array that is not
    C-contiguous (a transposed or strided view: refused, not copied) or a non-finite entry
    (naming its row), ``TypeError`` for an unsupported dtype or byte order.
    """
    if isinstance(pre_acts, torch.Tensor) and pre_acts.device.type != "cpu":
        if pre_acts.ndim != 2 or not 0 < k <= pre_acts.shape[1]:
            raise ValueError(f"need a [n, d] tensor and 0 < k <= d, got {tuple(pre_acts.shape)}")
        values, indices = torch.topk(torch.relu(pre_acts.float()), k, dim=1, sorted=True)
        return SparseLatents(values, indices)
    values, indices = _core.topk_encode(_as_numpy_input(pre_acts), int(k))
    if isinstance(pre_acts, torch.Tensor):
        return SparseLatents(torch.from_numpy(values), torch.from_numpy(indices.astype(np.int64)))
    return SparseLatents(values, indices)


def decode(
    values: npt.ArrayLike, indices: npt.ArrayLike, num_latents: int
) -> npt.NDArray[np.float32]:
    """Dense ``[n, num_latents]`` float32 array with ``dense[i, indices[i, j]] += values[i, j]``.

    Inputs of any layout or byte order are copied into C order first."""
    v, i = _sparse_arrays(values, indices)
    return _core.decode(v, i, int(num_latents))


def topk_replace(
    values: npt.ArrayLike,
    indices: npt.ArrayLike,
    rows: npt.ArrayLike,
    latents: npt.ArrayLike,
    new_values: npt.ArrayLike,
    k: int,
    num_latents: int,
) -> SparseLatents:
    """Set latent ``latents[m]`` of row ``rows[m]`` to ``new_values[m]``, then re-apply top-k.

    Row i starts from its sparse latents (zero-valued padding dropped); replacements add
    or overwrite latents (the last one of a (row, latent) pair wins); the result is
    ``topk(relu(·))`` with k slots, under the same contract as :func:`topk_encode`.
    Inputs of any layout or byte order are copied into C order first.
    """
    v, i = _sparse_arrays(values, indices)
    r = _index_array(rows, "rows", np.uint64)
    lat = _index_array(latents, "latents", np.uint32)
    nv = np.ascontiguousarray(new_values, dtype=np.float32)
    if nv.ndim != 1:
        raise ValueError(f"new_values must be 1-D, got shape {nv.shape}")
    out_v, out_i = _core.topk_replace(v, i, r, lat, nv, int(k), int(num_latents))
    return SparseLatents(out_v, out_i)


def _sparse_arrays(
    values: npt.ArrayLike, indices: npt.ArrayLike
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint32]]:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    v = np.ascontiguousarray(values, dtype=np.float32)
    i = _index_array(indices, "indices", np.uint32)
    if v.ndim != 2 or v.shape != i.shape:
        raise ValueError(
            f"values and indices must both be [n, k] arrays, got {v.shape} and {i.shape}"
        )
    return v, i


def _index_array(a: npt.ArrayLike, name: str, dtype: type[np.unsignedinteger]) -> np.ndarray:
    """Integer indices as a contiguous unsigned array, refusing negatives and fractions."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    arr = np.asarray(a)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"{name} must be non-negative, got {arr.min()}")
    return np.ascontiguousarray(arr, dtype=dtype)
