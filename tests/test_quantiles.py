"""Quantile tables and quantile normalization (``nlrw.quantiles``) against numpy references."""

from __future__ import annotations

import struct
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors.numpy import save_file

from nlrw.quantiles import (
    QuantileSketch,
    load_tables,
    probabilities,
    quantile_normalize,
    quantile_tables,
    save_tables,
)

# ---------------------------------------------------------------- numpy references


def ref_normalize(
    ids: np.ndarray, scores: np.ndarray, sim: np.ndarray, real: np.ndarray
) -> np.ndarray:
    """The documented semantics with ``searchsorted``/``interp``, in float64, per latent."""
    ids = np.asarray(ids, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float32).astype(np.float64)
    qs, qr = sim.shape[1], real.shape[1]
    ps, pr = np.linspace(0.0, 1.0, qs), np.linspace(0.0, 1.0, qr)
    out = np.zeros(s.shape[0])
    for latent in np.unique(ids):
        m = ids == latent
        row, x = sim[latent].astype(np.float64), s[m]
        a = np.searchsorted(row, x, side="left")
        b = np.searchsorted(row, x, side="right") - 1
        j = np.clip(b, 0, qs - 2)
        t0, t1 = row[j], row[j + 1]
        with np.errstate(divide="ignore", invalid="ignore"):
            f = ps[j] + (x - t0) / (t1 - t0) * (ps[j + 1] - ps[j])
        f = np.where(b < 0, 0.0, np.where(b >= qs - 1, 1.0, f))
        hit = a <= b
        middle = (ps[np.minimum(a, qs - 1)] + ps[np.maximum(b, 0)]) / 2
        f = np.where(hit, middle, f)
        out[m] = np.interp(f, pr, real[latent].astype(np.float64))
    return out.astype(np.float32)


def ref_tables(
    ids: np.ndarray, values: np.ndarray, num_latents: int, q: int, total: np.ndarray | None = None
) -> np.ndarray:
    """``np.quantile`` per latent, with the implicit zeros materialised."""
    out = np.zeros((num_latents, q))
    for latent in range(num_latents):
        x = np.asarray(values, dtype=np.float32)[ids == latent].astype(np.float64)
        if total is not None:
            x = np.concatenate([x, np.zeros(int(total[latent]) - x.shape[0])])
        if x.size:
            out[latent] = np.quantile(x, probabilities(q))
    return out


def assert_close(got: np.ndarray, want: np.ndarray, scale: float) -> None:
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * max(1.0, scale))


# ---------------------------------------------------------------- strategies

f32 = st.floats(-1e4, 1e4, width=32, allow_subnormal=False)


@st.composite
def tables(draw: st.DrawFn, num_latents: int, q: int, grid: list[float]) -> np.ndarray:
    """Ascending rows drawn from a few values (flat runs, zero runs) or anything."""
    elements = st.one_of(st.sampled_from(grid), f32)
    t = draw(hnp.arrays(np.float32, (num_latents, q), elements=elements))
    return np.sort(t, axis=1)


@st.composite
def problems(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    num_latents = draw(st.integers(1, 5))
    qs, qr = draw(st.integers(2, 12)), draw(st.integers(2, 12))
    if draw(st.booleans()):
        qr = qs  # the Qs = Qr fast path
    grid = [0.0, *draw(st.lists(f32, min_size=1, max_size=4))]
    sim = draw(tables(num_latents, qs, grid))
    real = draw(tables(num_latents, qr, grid))
    m = draw(st.integers(0, 60))
    ids = draw(hnp.arrays(np.uint32, m, elements=st.integers(0, num_latents - 1)))
    # Scores: table entries (ties), anything, and far outside the tables.
    score = st.one_of(st.sampled_from(grid), f32, st.sampled_from([-1e6, 1e6]))
    scores = draw(hnp.arrays(np.float32, m, elements=score))
    return ids, scores, sim, real


# ---------------------------------------------------------------- quantile_normalize


@settings(max_examples=300, deadline=None)
@given(problems())
def test_normalize_matches_numpy_reference(
    problem: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> None:
    ids, scores, sim, real = problem
    got = quantile_normalize(ids, scores, sim, real)
    assert got.dtype == np.float32 and got.shape == scores.shape
    assert_close(got, ref_normalize(ids, scores, sim, real), float(np.abs(real).max()))


def test_normalize_large_random_matches_reference_in_any_order() -> None:
    rng = np.random.default_rng(0)
    num_latents, q = 50, 101
    ids = rng.integers(0, num_latents, 30_001).astype(np.uint32)
    scores = np.round(rng.gamma(2.0, 2.0, ids.shape[0]), 1).astype(np.float32)
    sim = quantile_tables(ids, scores, num_latents, q)
    real = np.sort(np.maximum(rng.normal(size=(num_latents, q)), 0), axis=1).astype(np.float32)
    got = quantile_normalize(ids, scores, sim, real)
    assert_close(got, ref_normalize(ids, scores, sim, real), float(real.max()))
    order = np.argsort(ids, kind="stable")
    np.testing.assert_array_equal(
        quantile_normalize(ids[order], scores[order], sim, real), got[order]
    )


def test_scattered_order_takes_the_bucketed_path_with_identical_results() -> None:
    # Big tables (3000 latents x Q = 101) and scores ordered by context (every score a new
    # latent): the lookups reorder by latent block internally; results must not change.
    rng = np.random.default_rng(4)
    num_latents, per_latent, q = 3000, 30, 101
    ids = np.repeat(np.arange(num_latents, dtype=np.uint32), per_latent)
    scores = np.round(rng.gamma(2.0, 2.0, ids.shape[0]), 1).astype(np.float32)
    sim = quantile_tables(ids, scores, num_latents, q)
    real = np.sort(rng.exponential(size=(num_latents, q)), axis=1).astype(np.float32)
    grouped = quantile_normalize(ids, scores, sim, real)
    by_context = np.arange(ids.shape[0]).reshape(num_latents, per_latent).T.reshape(-1)
    np.testing.assert_array_equal(
        quantile_normalize(ids[by_context], scores[by_context], sim, real), grouped[by_context]
    )
    shuffled = rng.permutation(ids.shape[0])
    np.testing.assert_array_equal(
        quantile_normalize(ids[shuffled], scores[shuffled], sim, real), grouped[shuffled]
    )
    sample = rng.choice(ids.shape[0], 2000, replace=False)
    want = ref_normalize(ids[sample], scores[sample], sim, real)
    assert_close(grouped[sample], want, float(real.max()))


def test_flat_run_maps_to_the_middle_probability() -> None:
    # Sim entries 1..3 equal 1.0 (p = 0.25, 0.5, 0.75): a score of 1.0 sits at p = 0.5.
    sim = np.array([[0.0, 1.0, 1.0, 1.0, 2.0]], dtype=np.float32)
    real = np.array([[0.0, 10.0, 20.0, 30.0, 40.0]], dtype=np.float32)
    got = quantile_normalize([0, 0, 0, 0], [1.0, 0.0, 2.0, 1.5], sim, real)
    np.testing.assert_array_equal(got, [20.0, 0.0, 40.0, 35.0])


def test_single_entry_hit_and_interpolation() -> None:
    sim = np.array([[0.0, 2.0, 4.0]], dtype=np.float32)
    real = np.array([[1.0, 3.0, 7.0]], dtype=np.float32)
    got = quantile_normalize([0, 0, 0], [2.0, 1.0, 3.0], sim, real)
    np.testing.assert_allclose(got, [3.0, 2.0, 5.0])


def test_zero_run_in_the_real_table_gives_zero() -> None:
    # 90% of real activations are exactly zero: every score up to the 0.9 quantile gives 0.
    q = 11
    sim = np.linspace(0.0, 1.0, q, dtype=np.float32)[None]
    real = np.where(np.arange(q) <= 9, 0.0, 5.0).astype(np.float32)[None]
    scores = np.array([0.0, 0.3, 0.55, 0.9, 0.95, 1.0], dtype=np.float32)
    got = quantile_normalize(np.zeros(6, np.uint32), scores, sim, real)
    np.testing.assert_allclose(got, [0.0, 0.0, 0.0, 0.0, 2.5, 5.0], atol=1e-6)


def test_scores_outside_the_table_map_to_the_real_extremes() -> None:
    sim = np.array([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]], dtype=np.float32)
    real = np.array([[-1.0, 0.0, 4.0], [2.0, 3.0, 9.0]], dtype=np.float32)
    got = quantile_normalize([0, 0, 1, 1, 1], [-7.0, 8.0, 4.0, 6.0, 5.0], sim, real)
    # Latent 1's whole sim row is one run: a hit maps to p = 0.5 → 3.
    np.testing.assert_array_equal(got, [-1.0, 4.0, 2.0, 9.0, 3.0])


def test_tables_with_different_q() -> None:
    sim = np.array([[0.0, 1.0]], dtype=np.float32)  # Qs = 2: F_sim(s) = s on [0, 1]
    real = np.array([[0.0, 1.0, 4.0, 9.0, 16.0]], dtype=np.float32)  # Qr = 5
    got = quantile_normalize([0, 0, 0], [0.25, 0.375, 1.0], sim, real)
    np.testing.assert_allclose(got, [1.0, 2.5, 16.0])


def test_normalize_accepts_array_likes_and_noncontiguous_input() -> None:
    sim = np.array([[0.0, 1.0, 2.0, 3.0]] * 2, dtype=np.float64)[:, ::1]
    real = np.asfortranarray(np.array([[0.0, 2.0, 4.0, 6.0]] * 2))
    scores = np.array([0.5, 99.0, 1.5, 99.0])[::2]  # strided float64
    got = quantile_normalize([0, 1], scores, sim, real)
    np.testing.assert_allclose(got, [1.0, 3.0])
    assert quantile_normalize([], [], sim, real).shape == (0,)


# ---------------------------------------------------------------- bad input


@pytest.fixture
def good() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    sim = np.array([[0.0, 1.0, 2.0]] * 3, dtype=np.float32)
    real = np.array([[0.0, 0.0, 5.0]] * 3, dtype=np.float32)
    return np.array([0, 1, 2], np.uint32), np.array([0.5, 1.0, 1.5], np.float32), sim, real


def test_unknown_latent_id_names_index_id_and_num_latents(good) -> None:
    ids, scores, sim, real = good
    ids[2] = 7
    with pytest.raises(ValueError, match=r"latent_ids\[2\] = 7 .*num_latents = 3"):
        quantile_normalize(ids, scores, sim, real)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_score_names_its_index(good, bad: float) -> None:
    ids, scores, sim, real = good
    scores[1] = bad
    with pytest.raises(ValueError, match=r"scores\[1\] = .* is not finite"):
        quantile_normalize(ids, scores, sim, real)


def test_lowest_bad_index_is_reported_across_parallel_chunks() -> None:
    n = 100_000
    sim = np.array([[0.0, 1.0]], dtype=np.float32)
    scores = np.zeros(n, np.float32)
    ids = np.zeros(n, np.uint32)
    scores[[70_000, 99_999]] = np.nan
    ids[90_000] = 5
    with pytest.raises(ValueError, match=r"scores\[70000\]"):
        quantile_normalize(ids, scores, sim, sim)


def test_unsorted_or_non_finite_table_names_the_latent(good) -> None:
    ids, scores, sim, real = good
    bad = sim.copy()
    bad[1] = [0.0, 2.0, 1.0]
    with pytest.raises(ValueError, match=r"sim_table: latent 1 is not sorted"):
        quantile_normalize(ids, scores, bad, real)
    bad = real.copy()
    bad[2, 0] = np.nan
    with pytest.raises(ValueError, match=r"real_table: latent 2 has a non-finite entry"):
        quantile_normalize(ids, scores, sim, bad)


def test_shape_mismatches_are_named(good) -> None:
    ids, scores, sim, real = good
    with pytest.raises(ValueError, match=r"latent_ids has 2 elements but scores has 3"):
        quantile_normalize(ids[:2], scores, sim, real)
    with pytest.raises(ValueError, match=r"sim_table has 3 latents but real_table has 2"):
        quantile_normalize(ids, scores, sim, real[:2])


def test_wrong_ndim_is_named(good) -> None:
    ids, scores, sim, real = good
    with pytest.raises(ValueError, match=r"scores must be 1-D"):
        quantile_normalize(ids, scores[None], sim, real)
    with pytest.raises(ValueError, match=r"latent_ids must be 1-D"):
        quantile_normalize(ids[None], scores, sim, real)
    with pytest.raises(ValueError, match=r"sim_table must be 2-D"):
        quantile_normalize(ids, scores, sim[0], real)


def test_fewer_than_two_quantiles_is_rejected(good) -> None:
    ids, scores, sim, real = good
    with pytest.raises(ValueError, match=r"real_table needs at least 2 quantiles"):
        quantile_normalize(ids, scores, sim, real[:, :1])


def test_bad_latent_ids_are_rejected_before_casting(good) -> None:
    _, scores, sim, real = good
    with pytest.raises(ValueError, match=r"latent_ids\[1\] = -1 is negative"):
        quantile_normalize([0, -1, 2], scores, sim, real)
    with pytest.raises(ValueError, match=r"latent_ids\[0\] = 0.5 is not an integer"):
        quantile_normalize([0.5, 1.0, 2.0], scores, sim, real)
    with pytest.raises(ValueError, match=r"does not fit uint32"):
        quantile_normalize([0, 2**32, 1], scores, sim, real)
    with pytest.raises(TypeError, match=r"latent_ids must hold integers"):
        quantile_normalize(["a", "b", "c"], scores, sim, real)
    # Integral floats are a lossless cast.
    np.testing.assert_array_equal(
        quantile_normalize([0.0, 1.0, 2.0], scores, sim, real),
        quantile_normalize([0, 1, 2], scores, sim, real),
    )


def test_scores_beyond_float32_are_rejected(good) -> None:
    ids, _, sim, real = good
    with pytest.raises(ValueError, match=r"scores\[1\] = 1e\+39 is out of float32 range"):
        quantile_normalize(ids, np.array([0.0, 1e39, 0.0]), sim, real)
    with pytest.raises(TypeError, match=r"scores must hold real numbers"):
        quantile_normalize(ids, np.array([1j, 0, 0]), sim, real)


# ---------------------------------------------------------------- quantile_tables


@st.composite
def samples(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int, int]:
    num_latents = draw(st.integers(1, 6))
    m = draw(st.integers(0, 80))
    ids = draw(hnp.arrays(np.uint32, m, elements=st.integers(0, num_latents - 1)))
    grid = st.sampled_from([0.0, 1.0, -2.5, 3.0])
    values = draw(hnp.arrays(np.float32, m, elements=st.one_of(grid, f32)))
    return ids, values, num_latents, draw(st.integers(2, 30))


@settings(max_examples=200, deadline=None)
@given(samples())
def test_tables_from_samples_match_np_quantile(
    case: tuple[np.ndarray, np.ndarray, int, int],
) -> None:
    ids, values, num_latents, q = case
    got = quantile_tables(ids, values, num_latents, q)
    assert got.shape == (num_latents, q) and got.dtype == np.float32
    assert_close(got, ref_tables(ids, values, num_latents, q), float(np.abs(values).max(initial=0)))


@settings(max_examples=100, deadline=None)
@given(samples(), st.integers(0, 20))
def test_implicit_zeros_via_total_match_materialised_zeros(
    case: tuple[np.ndarray, np.ndarray, int, int], extra: int
) -> None:
    ids, values, num_latents, q = case
    counts = np.bincount(ids, minlength=num_latents)
    total = counts + np.arange(num_latents) * extra
    want = ref_tables(ids, values, num_latents, q, total)
    scale = float(np.abs(values).max(initial=0))
    assert_close(quantile_tables(ids, values, num_latents, q, total=total), want, scale)
    n = int(counts.max(initial=0)) + extra
    want = ref_tables(ids, values, num_latents, q, np.full(num_latents, n))
    assert_close(quantile_tables(ids, values, num_latents, q, total=n), want, scale)


def test_latent_without_observations_gets_zeros() -> None:
    got = quantile_tables([1, 1], [2.0, 4.0], num_latents=3, num_quantiles=3)
    np.testing.assert_array_equal(got, [[0, 0, 0], [2, 3, 4], [0, 0, 0]])


def test_tables_bad_input() -> None:
    with pytest.raises(ValueError, match=r"total for latent 0 is 1, less than its 2 observed"):
        quantile_tables([0, 0], [1.0, 2.0], 1, 3, total=1)
    with pytest.raises(ValueError, match=r"total has 1 entries, expected one per latent"):
        quantile_tables([0, 0], [1.0, 2.0], 2, 3, total=np.array([5]))
    with pytest.raises(ValueError, match=r"total\[1\] = -1 is negative"):
        quantile_tables([0], [1.0], 2, 3, total=[2, -1])
    with pytest.raises(ValueError, match=r"num_quantiles must be at least 2"):
        quantile_tables([0], [1.0], 1, 1)
    with pytest.raises(ValueError, match=r"latent_ids\[1\] = 4 is not a known latent"):
        quantile_tables([0, 4], [1.0, 2.0], 2, 3)
    with pytest.raises(ValueError, match=r"values\[0\] = NaN is not finite"):
        quantile_tables([0], [np.nan], 1, 3)
    with pytest.raises(ValueError, match=r"latent_ids has 1 elements but values has 2"):
        quantile_tables([0], [1.0, 2.0], 1, 3)


# ---------------------------------------------------------------- QuantileSketch

# Normal float32 magnitudes (the documented scope of the guarantee), both signs, zeros.
sketch_values = st.one_of(
    st.just(0.0),
    st.floats(2.0**-100, 2.0**100, width=32),
    st.floats(-(2.0**100), -(2.0**-100), width=32),
    st.sampled_from([1.0, 2.0, 1e-3]),
)


@st.composite
def streams(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int]:
    num_latents = draw(st.integers(1, 4))
    m = draw(st.integers(0, 120))
    ids = draw(hnp.arrays(np.uint32, m, elements=st.integers(0, num_latents - 1)))
    values = draw(hnp.arrays(np.float32, m, elements=sketch_values))
    return ids, values, num_latents


@settings(max_examples=200, deadline=None)
@given(streams(), st.sampled_from([0.01, 0.05, 0.001]), st.integers(2, 25))
def test_sketch_tables_within_relative_alpha(
    stream: tuple[np.ndarray, np.ndarray, int], alpha: float, q: int
) -> None:
    ids, values, num_latents = stream
    sketch = QuantileSketch(num_latents, alpha=alpha)
    sketch.update(ids, values)
    got = sketch.tables(q).astype(np.float64)
    for latent in range(num_latents):
        x = np.sort(values[ids == latent].astype(np.float64))
        if x.size == 0:
            np.testing.assert_array_equal(got[latent], 0.0)
            continue
        exact = np.quantile(x, probabilities(q))
        h = probabilities(q) * (x.size - 1)
        lo = x[np.floor(h).astype(int)]
        hi = x[np.minimum(np.floor(h).astype(int) + 1, x.size - 1)]
        same_sign = (lo >= 0) == (hi >= 0)
        bound = alpha * np.where(same_sign, np.abs(exact), np.maximum(np.abs(lo), np.abs(hi)))
        # An entry interpolated between 0 and a tiny value can itself be below float32's
        # normal range, where float32 has only absolute resolution.
        bound += np.finfo(np.float32).tiny
        assert np.all(np.abs(got[latent] - exact) <= bound), (latent, got[latent], exact)
        # The extremes are kept exactly.
        assert got[latent, 0] == x[0] and got[latent, -1] == x[-1]


@settings(max_examples=100, deadline=None)
@given(streams(), st.lists(st.integers(0, 120), max_size=4), st.randoms())
def test_sketch_merge_equals_single_pass(
    stream: tuple[np.ndarray, np.ndarray, int], cuts: list[int], rnd
) -> None:
    ids, values, num_latents = stream
    one = QuantileSketch(num_latents)
    one.update(ids, values, total=ids.shape[0])
    bounds = sorted({0, ids.shape[0], *(min(c, ids.shape[0]) for c in cuts)})
    shards = []
    for a, b in pairwise(bounds):
        shard = QuantileSketch(num_latents)
        shard.update(ids[a:b], values[a:b], total=b - a)
        shards.append(shard)
    rnd.shuffle(shards)
    merged = QuantileSketch(num_latents)
    for shard in shards:
        merged.merge(shard)
    assert merged == one
    for key, array in one.state().items():
        np.testing.assert_array_equal(merged.state()[key], array, err_msg=key)
    np.testing.assert_array_equal(merged.tables(11), one.tables(11))
    np.testing.assert_array_equal(merged.counts(), np.full(num_latents, ids.shape[0]))


def test_sketch_total_equals_add_zeros_and_matches_exact_tables() -> None:
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 4, 500).astype(np.uint32)
    values = rng.exponential(2.0, 500).astype(np.float32)
    a = QuantileSketch(4, alpha=0.01)
    a.update(ids, values, total=1000)
    b = QuantileSketch(4, alpha=0.01)
    b.update(ids, values)
    b.add_zeros(1000 - np.bincount(ids, minlength=4))
    assert a == b
    np.testing.assert_array_equal(a.counts(), [1000] * 4)
    exact = quantile_tables(ids, values, 4, 101, total=1000)
    assert np.all(np.abs(a.tables(101) - exact) <= 0.01 * np.abs(exact) + 1e-30)
    # Merging a sketch into itself doubles every count.
    a.merge(a)
    np.testing.assert_array_equal(a.counts(), [2000] * 4)


def test_sketch_save_load_roundtrip(tmp_path: Path) -> None:
    sketch = QuantileSketch(3, alpha=0.02)
    sketch.update([0, 0, 2, 1], [1.5, -3.0, 0.0, 7.0], total=10)
    path = tmp_path / "sketch.safetensors"
    sketch.save(path, stage="cache")
    back = QuantileSketch.load(path)
    assert back == sketch and back.alpha == 0.02 and back.num_latents == 3
    np.testing.assert_array_equal(back.tables(7), sketch.tables(7))
    copy = sketch.copy()
    copy.update([0], [1.0])
    assert copy != sketch


def test_sketch_bad_input_leaves_it_unchanged(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"alpha must lie in"):
        QuantileSketch(2, alpha=0.0)
    sketch = QuantileSketch(2)
    sketch.update([0, 1], [1.0, 2.0])
    before = sketch.state()
    with pytest.raises(ValueError, match=r"latent_ids\[1\] = 2 is not a known latent"):
        sketch.update([0, 2], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"values\[0\] = inf is not finite"):
        sketch.update([0], [np.inf])
    with pytest.raises(ValueError, match=r"total for latent 0 is 1, less than its 2"):
        sketch.update([0, 0], [1.0, 1.0], total=1)
    with pytest.raises(ValueError, match=r"counts has 3 entries"):
        sketch.add_zeros(np.array([1, 2, 3]))
    after = sketch.state()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    with pytest.raises(ValueError, match=r"cannot merge sketches: num_latents 2 vs 3"):
        sketch.merge(QuantileSketch(3))
    with pytest.raises(ValueError, match=r"cannot merge sketches: alpha"):
        sketch.merge(QuantileSketch(2, alpha=0.02))
    with pytest.raises(TypeError, match=r"other must be a QuantileSketch"):
        sketch.merge(before)  # type: ignore[arg-type]


def test_sketch_from_inconsistent_state_is_rejected(tmp_path: Path) -> None:
    sketch = QuantileSketch(2)
    sketch.update([0, 1, 1], [1.0, 2.0, 3.0])
    state = sketch.state()
    with pytest.raises(ValueError, match=r"missing array 'zeros'"):
        QuantileSketch.from_state({k: v for k, v in state.items() if k != "zeros"})
    with pytest.raises(ValueError, match=r"'pos_len' must be 1-D uint64"):
        QuantileSketch.from_state({**state, "pos_len": state["pos_len"].astype(np.int64)})
    with pytest.raises(ValueError, match=r"pos_len of latent 1 runs past the end"):
        QuantileSketch.from_state({**state, "pos_len": state["pos_len"] + 5})
    with pytest.raises(ValueError, match=r"min has 1 entries but zeros has 2"):
        QuantileSketch.from_state({**state, "min": state["min"][:1]})
    # A corrupt sketch file names the file.
    path = tmp_path / "bad.safetensors"
    save_file(
        {**state, "pos_len": state["pos_len"] + 5}, path, {"nlrw_format": "nlrw.quantile_sketch.v1"}
    )
    with pytest.raises(ValueError, match=r"bad\.safetensors: invalid sketch state"):
        QuantileSketch.load(path)


# ---------------------------------------------------------------- save/load tables


def test_tables_save_load_roundtrip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    sim = np.sort(rng.normal(size=(4, 11)), axis=1).astype(np.float32)
    real = np.sort(rng.normal(size=(4, 5)), axis=1).astype(np.float32)
    path = tmp_path / "calibration.safetensors"
    save_tables(path, sim=sim, real=real, model="smollm2", layer="15")
    back = load_tables(path)
    assert back.sim is not None and back.real is not None
    np.testing.assert_array_equal(back.sim, sim)
    np.testing.assert_array_equal(back.real, real)
    assert back.metadata == {"model": "smollm2", "layer": "15"}
    save_tables(path, real=real)  # overwrite with real only
    only = load_tables(path)
    assert only.sim is None and only.real is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibration.safetensors"]


def test_save_tables_rejects_bad_tables_without_writing(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    good = np.array([[0.0, 1.0]], dtype=np.float32)
    with pytest.raises(ValueError, match=r"real: latent 1 is not sorted ascending"):
        save_tables(path, sim=np.vstack([good, good]), real=np.array([[0, 1], [1, 0]]))
    with pytest.raises(ValueError, match=r"sim must have shape \[L, Q\] with Q >= 2"):
        save_tables(path, sim=np.zeros((3, 1)))
    with pytest.raises(ValueError, match=r"sim has 1 latents but real has 2"):
        save_tables(path, sim=good, real=np.vstack([good, good]))
    with pytest.raises(TypeError, match=r"metadata 'layer' must be a str"):
        save_tables(path, sim=good, layer=15)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"needs sim=, real= or both"):
        save_tables(path)
    assert list(tmp_path.iterdir()) == []


def test_load_tables_truncated_or_corrupt_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "calibration.safetensors"
    sim = np.sort(np.random.default_rng(2).normal(size=(64, 101)), axis=1).astype(np.float32)
    save_tables(path, sim=sim)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=r"truncated\.safetensors: not a readable safetensors"):
        load_tables(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 40) + b"{not json" + b"\0" * 40)
    with pytest.raises(ValueError, match=r"garbage\.safetensors: not a readable safetensors"):
        load_tables(garbage)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.safetensors"):
        load_tables(empty)
    with pytest.raises(FileNotFoundError, match=r"missing\.safetensors"):
        load_tables(tmp_path / "missing.safetensors")


def test_load_tables_rejects_foreign_or_invalid_content(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.safetensors"
    save_file({"sim": np.zeros((2, 3), np.float32)}, foreign)
    with pytest.raises(ValueError, match=r"foreign\.safetensors: expected a nlrw.quantile_tables"):
        load_tables(foreign)
    meta = {"nlrw_format": "nlrw.quantile_tables.v1"}
    unsorted = tmp_path / "unsorted.safetensors"
    save_file({"real": np.array([[0, 1], [1, 0]], np.float32)}, unsorted, meta)
    with pytest.raises(ValueError, match=r"unsorted\.safetensors: real: latent 1 is not sorted"):
        load_tables(unsorted)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"sim": np.zeros((2, 3), np.float64)}, wrong, meta)
    with pytest.raises(ValueError, match=r"wrong\.safetensors: sim has dtype float64"):
        load_tables(wrong)
    extra = tmp_path / "extra.safetensors"
    save_file({"other": np.zeros((2, 3), np.float32)}, extra, meta)
    with pytest.raises(ValueError, match=r"extra\.safetensors: expected tensors 'sim' and/or"):
        load_tables(extra)
