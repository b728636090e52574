"""Every top-k and shard entry point, fed C-ordered, Fortran-ordered, strided, sliced,
negatively strided and byte-swapped views of the same values.

Each entry point has one policy, stated in its docstring: it either copies the input into the
layout it needs (then the result equals the reference on a C-ordered copy) or refuses it with
an error naming the argument (then a view that numpy itself calls C-contiguous, such as a
Fortran-ordered single row, must still be accepted and correct). A Fortran-ordered
``[300, 5000]`` array once came back as its transpose's top-k (issue 15).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nlrw import _core
from nlrw.model.shards import ShardReader, ShardWriter
from nlrw.model.topk import LatentStats, decode, topk_encode, topk_replace

LAYOUTS = ("C", "F", "strided", "sliced", "reversed", "swapped")
"""How a view of the same logical values is laid out in memory."""


def view(x: np.ndarray, layout: str) -> np.ndarray:
    """An array equal to ``x`` element by element, laid out as ``layout`` says."""
    if layout == "C":
        return np.ascontiguousarray(x)
    if layout == "F":
        return np.asfortranarray(x)  # what a transposed view of a C array looks like
    if layout == "strided":  # every 2nd element of a larger buffer
        big = np.zeros(tuple(2 * s for s in x.shape), dtype=x.dtype)
        idx = tuple(slice(None, None, 2) for _ in x.shape)
        big[idx] = x
        return big[idx]
    if layout == "sliced":  # an inner block of a larger C array (columns cut on both sides)
        big = np.zeros(tuple(s + 3 for s in x.shape), dtype=x.dtype)
        idx = tuple(slice(1, s + 1) for s in x.shape)
        big[idx] = x
        return big[idx]
    if layout == "reversed":  # negative strides
        rev = tuple(slice(None, None, -1) for _ in x.shape)
        return np.ascontiguousarray(x[rev])[rev]
    if layout == "swapped":  # non-native byte order
        return x.astype(x.dtype.newbyteorder())
    raise AssertionError(layout)


def refused_or_equal(
    call: Callable[[], object],
    v: np.ndarray,
    name: str,
    reference: Callable[[], object],
    check: Callable[[object, object], None],
) -> None:
    """For an entry point that refuses layouts it cannot read: the error names ``name``;
    what it accepts equals the reference."""
    native = v.dtype.isnative
    if v.flags.c_contiguous and native:
        check(call(), reference())
        return
    with pytest.raises((ValueError, TypeError), match=name):
        call()


def same_sparse(got: object, want: object) -> None:
    assert isinstance(got, tuple) and isinstance(want, tuple)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


def same_array(got: object, want: object) -> None:
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def reference_topk(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """A stable sort of relu(x), descending (ties to the lower index, zeros padded)."""
    r = np.maximum(np.asarray(x, dtype=np.float32), 0)
    order = np.argsort(-r, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(r, order, axis=1), order.astype(np.uint32)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint32) << 16).view(np.float32)


@st.composite
def pre_acts(draw: st.DrawFn) -> tuple[np.ndarray, int, str]:
    n = draw(st.integers(1, 6))
    d = draw(st.integers(1, 70))
    k = draw(st.integers(1, d))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        x = rng.integers(-2, 3, size=(n, d)).astype(np.float32)  # ties, short rows
    else:
        x = rng.standard_normal((n, d), dtype=np.float32)
    return x, k, draw(st.sampled_from(LAYOUTS))


@st.composite
def sparse_latents(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int, str]:
    n = draw(st.integers(1, 6))
    d = draw(st.integers(2, 40))
    k = draw(st.integers(1, d))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values, indices = reference_topk(rng.standard_normal((n, d), dtype=np.float32), k)
    return values, indices, d, draw(st.sampled_from(LAYOUTS))


SETTINGS = settings(max_examples=60, deadline=None)


# --- top-k encoding: refused unless C-contiguous, by both nlrw.model.topk and nlrw._core ---------


@SETTINGS
@given(pre_acts(), st.sampled_from(["float32", "float16", "bfloat16"]))
def test_topk_encode_refuses_or_matches(case: tuple[np.ndarray, int, str], dtype: str) -> None:
    x, k, layout = case
    if dtype == "bfloat16":
        logical = torch.from_numpy(x).bfloat16().view(torch.int16).numpy().view(np.uint16)
        as_float = bf16_to_f32(logical)
    else:
        logical = x.astype(dtype)
        as_float = logical.astype(np.float32)
    v = view(logical, layout)
    for encode in (topk_encode, _core.topk_encode):
        refused_or_equal(
            lambda e=encode: e(v, k),
            v,
            "pre_acts",
            lambda: reference_topk(as_float, k),
            same_sparse,
        )


def test_the_reported_case_a_transposed_view_is_refused_not_misread() -> None:
    x = np.random.default_rng(0).standard_normal((5000, 300), dtype=np.float32).T  # [300, 5000]
    assert x.flags.f_contiguous and not x.flags.c_contiguous
    for encode in (topk_encode, _core.topk_encode):
        with pytest.raises(ValueError, match=r"pre_acts must be a C-contiguous array"):
            encode(x, 32)
    same_sparse(topk_encode(np.ascontiguousarray(x), 32), reference_topk(x, 32))


@pytest.mark.parametrize("layout", ["F", "strided", "sliced"])
def test_topk_encode_refuses_non_contiguous_torch_tensors(layout: str) -> None:
    x = np.random.default_rng(1).standard_normal((4, 9), dtype=np.float32)
    t = torch.from_numpy(view(x, layout)) if layout != "F" else torch.from_numpy(x.T.copy()).T
    assert not t.is_contiguous()
    with pytest.raises(ValueError, match="pre_acts"):
        topk_encode(t, 3)
    same_sparse(topk_encode(t.contiguous(), 3), tuple(map(torch.from_numpy, reference_topk(x, 3))))


# --- decode, topk_replace: nlrw.model.topk copies, nlrw._core refuses --------------------------


@SETTINGS
@given(sparse_latents())
def test_decode_any_layout(case: tuple[np.ndarray, np.ndarray, int, str]) -> None:
    values, indices, d, layout = case
    want = decode(values, indices, d)
    dense = np.zeros((values.shape[0], d), np.float32)
    np.put_along_axis(dense, indices.astype(np.int64), values, axis=1)
    np.testing.assert_array_equal(want, dense)
    for which in ("values", "indices"):
        v = view(values, layout) if which == "values" else values
        i = view(indices, layout) if which == "indices" else indices
        same_array(decode(v, i, d), want)  # the wrapper copies
        arg = v if which == "values" else i
        refused_or_equal(
            lambda v=v, i=i: _core.decode(v, i, d), arg, which, lambda: want, same_array
        )


@SETTINGS
@given(sparse_latents(), st.integers(0, 2**32 - 1))
def test_topk_replace_any_layout(case: tuple[np.ndarray, np.ndarray, int, str], seed: int) -> None:
    values, indices, d, layout = case
    n, k = values.shape
    rng = np.random.default_rng(seed)
    m = int(rng.integers(1, 8))
    rows = rng.integers(0, n, m).astype(np.uint64)
    latents = rng.integers(0, d, m).astype(np.uint32)
    new_values = rng.standard_normal(m, dtype=np.float32)
    args = {"values": values, "indices": indices, "rows": rows, "latents": latents}
    args["new_values"] = new_values
    # Reference: dense rows, replacements applied in order, then a stable top-k.
    dense = decode(values, indices, d)
    for r, lat, nv in zip(rows, latents, new_values, strict=True):
        dense[int(r), int(lat)] = nv
    want = reference_topk(dense, k)
    for name in args:
        laid = {**args, name: view(args[name], layout)}
        v, i, r, lat, nv = laid.values()
        same_sparse(topk_replace(v, i, r, lat, nv, k, d), want)  # the wrapper copies
        refused_or_equal(
            lambda v=v, i=i, r=r, lat=lat, nv=nv: _core.topk_replace(v, i, r, lat, nv, k, d),
            laid[name],
            name,
            lambda: want,
            same_sparse,
        )


# --- LatentStats: update refuses, from_arrays copies ------------------------------------------


@SETTINGS
@given(sparse_latents())
def test_latent_stats_any_layout(case: tuple[np.ndarray, np.ndarray, int, str]) -> None:
    values, indices, d, layout = case
    ref = LatentStats(d)
    ref.update(values, indices)
    for name in ("values", "indices"):
        stats = LatentStats(d)
        v = view(values, layout) if name == "values" else values
        i = view(indices, layout) if name == "indices" else indices
        arg = v if name == "values" else i

        def update(stats: LatentStats = stats, v: np.ndarray = v, i: np.ndarray = i) -> object:
            stats.update(v, i)
            return stats.count, stats.max, stats.sum, stats.sum_sq

        refused_or_equal(
            update, arg, name, lambda: (ref.count, ref.max, ref.sum, ref.sum_sq), same_tuple
        )
    if layout == "swapped":
        return  # from_arrays takes native dtypes only (PyO3 names the argument otherwise)
    rebuilt = LatentStats.from_arrays(
        ref.rows,
        view(ref.count, layout),
        view(ref.max, layout),
        view(ref.sum, layout),
        view(ref.sum_sq, layout),
    )
    same_tuple(
        (rebuilt.count, rebuilt.max, rebuilt.sum, rebuilt.sum_sq),
        (ref.count, ref.max, ref.sum, ref.sum_sq),
    )


def same_tuple(got: object, want: object) -> None:
    assert isinstance(got, tuple) and isinstance(want, tuple) and len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


# --- shards: ShardWriter.write and _ShardWriter.write refuse, the set reads back exact -------


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.integers(1, 9),
    st.integers(1, 7),
    st.sampled_from(LAYOUTS),
    st.sampled_from(["float32", "float16"]),
)
def test_shard_writer_refuses_or_stores_exactly(
    tmp_path: Path, n: int, width: int, layout: str, dtype: Literal["float32", "float16"]
) -> None:
    import shutil

    x = np.random.default_rng(n * 10 + width).standard_normal((n, width)).astype(dtype)
    v = view(x, layout)
    path = tmp_path / "set"
    shutil.rmtree(path, ignore_errors=True)

    def write() -> np.ndarray:
        with ShardWriter(path, width=width, dtype=dtype, rows_per_shard=4) as writer:
            writer.write(v)
        return np.concatenate(list(ShardReader(path, batch_rows=3)))

    refused_or_equal(write, v, "rows", lambda: x, same_array)

    # The binding itself, given raw bytes [n, width * itemsize] in any layout.
    raw = np.ascontiguousarray(x).view(np.uint8)
    laid = view(raw, layout) if layout != "swapped" else raw
    shutil.rmtree(path, ignore_errors=True)
    inner = _core._ShardWriter(str(path), width, dtype, 4, "new")

    def write_raw() -> np.ndarray:
        inner.write(laid)
        inner.close()
        return np.concatenate(list(ShardReader(path, batch_rows=3)))

    refused_or_equal(write_raw, laid, "rows", lambda: x, same_array)
