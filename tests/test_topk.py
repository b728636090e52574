"""nlrw.model.topk against a numpy reference: a stable sort of relu(x) by value, descending."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nlrw.model.topk import LatentStats, decode, topk_encode, topk_replace


def reference(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    r = np.maximum(x.astype(np.float32), 0)
    order = np.argsort(-r, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(r, order, axis=1), order.astype(np.uint32)


def assert_matches_reference(x: np.ndarray, k: int, reference_input: np.ndarray | None = None):
    values, indices = topk_encode(x, k)
    ref_v, ref_i = reference(x if reference_input is None else reference_input, k)
    np.testing.assert_array_equal(indices, ref_i)
    np.testing.assert_array_equal(values, ref_v)
    assert values.dtype == np.float32 and indices.dtype == np.uint32


@st.composite
def matrices(draw):
    n = draw(st.integers(1, 12))
    d = draw(st.integers(1, 400))
    k = draw(st.integers(1, d))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if draw(st.booleans()):
        # Few distinct values: ties everywhere, and rows with fewer than k positives.
        x = rng.integers(-2, 3, size=(n, d)).astype(np.float32)
    else:
        x = rng.standard_normal((n, d), dtype=np.float32) - draw(st.floats(-1, 3))
    return x.astype(np.float32), k


@settings(max_examples=200, deadline=None)
@given(matrices())
def test_float32_matches_reference(case):
    x, k = case
    assert_matches_reference(x, k)


@settings(max_examples=60, deadline=None)
@given(matrices())
def test_float16_and_bfloat16_match_reference_of_the_same_values(case):
    x, k = case
    h = x.astype(np.float16)
    assert_matches_reference(h, k, h.astype(np.float32))
    b = torch.from_numpy(x).to(torch.bfloat16)
    values, indices = topk_encode(b, k)
    ref_v, ref_i = reference(b.float().numpy(), k)
    np.testing.assert_array_equal(indices.numpy(), ref_i)
    np.testing.assert_array_equal(values.numpy(), ref_v)
    # The same bits as a numpy uint16 view give the same answer.
    bits = b.view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(topk_encode(bits, k).indices, ref_i)


def test_wide_rows_take_the_block_maxima_path():
    # d >= 128·k triggers the threshold pre-pass; ties and negative rows included.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 32768), dtype=np.float32)
    x[1] = np.round(x[1])  # ties at small integers
    x[2] = -np.abs(x[2])  # no positive entry at all
    x[3, 5000:5040] = 7.0  # the top k in one block, tied
    assert_matches_reference(x, 32)
    assert_matches_reference(x, 1)


def test_torch_input_gives_torch_output():
    x = torch.randn(5, 64)
    values, indices = topk_encode(x, 4)
    assert isinstance(values, torch.Tensor) and indices.dtype == torch.int64
    ref_v, _ = torch.topk(torch.relu(x), 4)
    torch.testing.assert_close(values, ref_v)


@pytest.mark.parametrize(
    ("x", "k", "error", "match"),
    [
        (np.ones((3, 4), np.float32), 0, ValueError, "k must be at least 1"),
        (np.ones((3, 4), np.float32), 5, ValueError, r"k = 5 is larger than .* d = 4"),
        (np.ones((0, 4), np.float32), 2, ValueError, "no rows"),
        (np.ones((4, 8), np.float32)[:, ::2], 2, ValueError, "C-contiguous"),
        (np.ones((3, 4), np.float64), 2, TypeError, "float64"),
        (np.ones((3, 4), np.int32), 2, TypeError, "int32"),
        (np.ones((2, 3, 4), np.float32), 2, TypeError, "2-D"),
        (torch.ones(3, 4, dtype=torch.float64), 2, TypeError, "torch.float64"),
        (torch.ones(4, 8).t(), 2, ValueError, "contiguous"),
    ],
)
def test_bad_input_is_a_clear_error(x, k, error, match):
    with pytest.raises(error, match=match):
        topk_encode(x, k)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_entry_names_its_row(bad):
    x = np.random.default_rng(1).standard_normal((50, 3000), dtype=np.float32)
    x[37, 1234] = bad
    with pytest.raises(ValueError, match=r"row 37 .* latent 1234"):
        topk_encode(x, 8)


def test_decode_inverts_encode_on_the_kept_latents():
    x = np.random.default_rng(2).standard_normal((7, 50), dtype=np.float32)
    values, indices = topk_encode(x, 5)
    dense = decode(values, indices, 50)
    expected = np.zeros_like(x)
    np.put_along_axis(
        expected,
        indices.astype(np.int64),
        np.maximum(x, 0)[np.arange(7)[:, None], indices.astype(np.int64)],
        axis=1,
    )
    np.testing.assert_array_equal(dense, expected)
    with pytest.raises(ValueError, match=r"latent index 50 .* d = 50"):
        decode(values, np.full_like(indices, 50), 50)
    with pytest.raises(ValueError, match=r"\[n, k\]"):
        decode(values, indices[:, :2], 50)


def test_replace_equals_editing_the_dense_latents_then_encoding():
    rng = np.random.default_rng(3)
    n, d, k = 30, 80, 6
    values, indices = topk_encode(rng.standard_normal((n, d), dtype=np.float32), k)
    rows = rng.integers(0, n, 200)
    latents = rng.integers(0, d, 200)
    new = rng.uniform(-1, 3, 200).astype(np.float32)
    dense = decode(values, indices, d)
    dense[rows, latents] = new  # numpy assigns in order: the last write wins
    got = topk_replace(values, indices, rows, latents, new, k, d)
    want = topk_encode(dense, k)
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_array_equal(got.values, want.values)


def test_replace_rejects_bad_replacements():
    values, indices = topk_encode(np.ones((2, 4), np.float32), 2)
    with pytest.raises(ValueError, match="rows: row 2 is out of range"):
        topk_replace(values, indices, [2], [0], [1.0], 2, 4)
    with pytest.raises(ValueError, match="latents: latent index 9"):
        topk_replace(values, indices, [0], [9], [1.0], 2, 4)
    with pytest.raises(ValueError, match="non-negative"):
        topk_replace(values, indices, [-1], [0], [1.0], 2, 4)
    with pytest.raises(ValueError, match="non-finite"):
        topk_replace(values, indices, [0], [0], [np.nan], 2, 4)
    with pytest.raises(ValueError, match="new_values has 2 elements"):
        topk_replace(values, indices, [0], [0], [1.0, 2.0], 2, 4)


def test_latent_stats_match_numpy_and_merge_like_one_pass():
    rng = np.random.default_rng(4)
    d = 40
    batches = [topk_encode(rng.standard_normal((n, d), dtype=np.float32), 5) for n in (9, 1, 30)]
    one = LatentStats(d)
    parts = [LatentStats(d) for _ in batches]
    for b, part in zip(batches, parts, strict=True):
        one.update(*b)
        part.update(*b)
    merged = LatentStats(d)
    for part in parts:
        merged.merge(part)
    dense = np.concatenate([decode(*b, d) for b in batches])
    active = dense > 0
    np.testing.assert_array_equal(one.count, active.sum(0))
    np.testing.assert_array_equal(one.max, dense.max(0))
    np.testing.assert_allclose(one.sum, dense.sum(0, dtype=np.float64), rtol=1e-12)
    np.testing.assert_allclose(one.sum_sq, (dense.astype(np.float64) ** 2).sum(0), rtol=1e-12)
    assert one.rows == merged.rows == 40
    for name in ("count", "max", "sum", "sum_sq"):
        np.testing.assert_array_equal(getattr(one, name), getattr(merged, name))
    copy = LatentStats.from_arrays(one.rows, one.count, one.max, one.sum, one.sum_sq)
    np.testing.assert_array_equal(copy.sum, one.sum)
    with pytest.raises(ValueError, match="stats were built for 40 latents, got 3"):
        one.merge(LatentStats(3))
    with pytest.raises(ValueError, match="latent index 40"):
        LatentStats(40).update(np.ones((1, 1), np.float32), np.full((1, 1), 40, np.uint32))
