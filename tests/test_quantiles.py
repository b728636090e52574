"""Quantile tables and quantile normalization (``nlrw.model.quantiles``) against numpy
references."""

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

from nlrw.model.quantiles import (
    QuantileSketch,
    load_tables,
    midrank_positions,
    midrank_tables,
    probabilities,
    quantile_normalize,
    quantile_tables,
    reference_tables,
    save_tables,
)

# ---------------------------------------------------------------- numpy references


def ref_normalize(
    ids: np.ndarray,
    scores: np.ndarray,
    sim: np.ndarray,
    active: np.ndarray,
    frequency: np.ndarray,
    offsets: np.ndarray | None = None,
) -> np.ndarray:
    """The documented semantics with ``searchsorted``/``interp``, in float64, per latent:
    mid-rank sim positions, middle of a run of ties, offsets times the width, then the
    mixture ``F_real⁻¹``."""
    ids = np.asarray(ids, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float32).astype(np.float64)
    off = np.zeros(s.shape) if offsets is None else np.asarray(offsets, np.float32).astype(float)
    qs, qr = sim.shape[1], active.shape[1]
    ps, pr = midrank_positions(qs), np.linspace(0.0, 1.0, qr)
    out = np.zeros(s.shape[0])
    for latent in np.unique(ids):
        m = ids == latent
        row, x = sim[latent].astype(np.float64), s[m]
        a = np.searchsorted(row, x, side="left")
        b = np.searchsorted(row, x, side="right") - 1
        j = np.clip(b, 0, qs - 2)
        t0, t1 = row[j], row[j + 1]
        with np.errstate(divide="ignore", invalid="ignore"):
            p = ps[j] + (x - t0) / (t1 - t0) * (ps[j + 1] - ps[j])
        p = np.where(b < 0, ps[0], np.where(b >= qs - 1, ps[-1], p))
        width = np.full(p.shape, 1.0 / qs)
        hit = a <= b
        middle = (ps[np.minimum(a, qs - 1)] + ps[np.maximum(b, 0)]) / 2
        p = np.where(hit, middle, p)
        width = np.where(hit, (b - a + 1) / qs, width)
        p = np.clip(p + off[m] * width, 0.0, 1.0)
        q = float(np.float32(frequency[latent]))
        with np.errstate(divide="ignore", invalid="ignore"):
            u = (p - (1.0 - q)) / q
        value = np.interp(np.clip(u, 0.0, 1.0), pr, active[latent].astype(np.float64))
        out[m] = np.where(u > 0, value, 0.0)
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
def problems(draw: st.DrawFn) -> tuple[np.ndarray, ...]:
    num_latents = draw(st.integers(1, 5))
    qs, qr = draw(st.integers(2, 12)), draw(st.integers(2, 12))
    grid = [0.0, *draw(st.lists(f32, min_size=1, max_size=4))]
    sim = draw(tables(num_latents, qs, grid))
    active = np.abs(draw(tables(num_latents, qr, grid)))
    active.sort(axis=1)
    freq_el = st.one_of(st.sampled_from([0.0, 1.0, 1e-3]), st.floats(0.0, 1.0, width=32))
    frequency = draw(hnp.arrays(np.float32, num_latents, elements=freq_el))
    m = draw(st.integers(0, 60))
    ids = draw(hnp.arrays(np.uint32, m, elements=st.integers(0, num_latents - 1)))
    # Scores: table entries (ties), anything, and far outside the tables.
    score = st.one_of(st.sampled_from(grid), f32, st.sampled_from([-1e6, 1e6]))
    scores = draw(hnp.arrays(np.float32, m, elements=score))
    offsets = None
    if draw(st.booleans()):
        el = st.one_of(st.sampled_from([-0.5, 0.0, 0.5]), st.floats(-0.5, 0.5, width=32))
        offsets = draw(hnp.arrays(np.float32, m, elements=el))
    return ids, scores, sim, active, frequency, offsets


# ---------------------------------------------------------------- quantile_normalize


@settings(max_examples=300, deadline=None)
@given(problems())
def test_normalize_matches_numpy_reference(problem: tuple[np.ndarray, ...]) -> None:
    ids, scores, sim, active, frequency, offsets = problem
    got = quantile_normalize(ids, scores, sim, active, frequency, offsets)
    assert got.dtype == np.float32 and got.shape == scores.shape
    want = ref_normalize(ids, scores, sim, active, frequency, offsets)
    assert_close(got, want, float(np.abs(active).max()))


def _reference(rng: np.random.Generator, num_latents: int, q: int) -> tuple[np.ndarray, ...]:
    active = np.sort(rng.exponential(size=(num_latents, q)), axis=1).astype(np.float32)
    frequency = rng.uniform(0.0, 0.3, num_latents).astype(np.float32)
    return active, frequency


def test_normalize_large_random_matches_reference_in_any_order() -> None:
    rng = np.random.default_rng(0)
    num_latents, q = 50, 101
    ids = rng.integers(0, num_latents, 30_001).astype(np.uint32)
    scores = np.round(rng.gamma(2.0, 2.0, ids.shape[0]), 1).astype(np.float32)
    sim = midrank_tables(ids, scores, num_latents)
    active, freq = _reference(rng, num_latents, q)
    offsets = (rng.random(ids.size) - 0.5).astype(np.float32)
    for off in (None, offsets):
        got = quantile_normalize(ids, scores, sim, active, freq, off)
        assert_close(got, ref_normalize(ids, scores, sim, active, freq, off), float(active.max()))
        order = np.argsort(ids, kind="stable")
        o = None if off is None else off[order]
        np.testing.assert_array_equal(
            quantile_normalize(ids[order], scores[order], sim, active, freq, o), got[order]
        )


def test_scattered_order_takes_the_bucketed_path_with_identical_results() -> None:
    # Big tables (3000 latents) and scores ordered by context (every score a new latent):
    # the lookups reorder by latent block internally; results must not change.
    rng = np.random.default_rng(4)
    num_latents, per_latent, q = 3000, 30, 101
    ids = np.repeat(np.arange(num_latents, dtype=np.uint32), per_latent)
    scores = np.round(rng.gamma(2.0, 2.0, ids.shape[0]), 1).astype(np.float32)
    sim = midrank_tables(ids, scores, num_latents)
    active, freq = _reference(rng, num_latents, q)
    offsets = (rng.random(ids.size) - 0.5).astype(np.float32)
    grouped = quantile_normalize(ids, scores, sim, active, freq, offsets)
    by_context = np.arange(ids.shape[0]).reshape(num_latents, per_latent).T.reshape(-1)
    shuffled = rng.permutation(ids.shape[0])
    for order in (by_context, shuffled):
        np.testing.assert_array_equal(
            quantile_normalize(ids[order], scores[order], sim, active, freq, offsets[order]),
            grouped[order],
        )
    sample = rng.choice(ids.shape[0], 2000, replace=False)
    want = ref_normalize(ids[sample], scores[sample], sim, active, freq, offsets[sample])
    assert_close(grouped[sample], want, float(active.max()))


def test_worked_example_of_the_docstring() -> None:
    # q = 0.02, active values [1, 3], 100 distinct scores: the top two contexts are active.
    sim = np.arange(100, dtype=np.float32)[None]
    got = quantile_normalize([0] * 4, [99.0, 98.0, 97.0, 1e9], sim, [[1.0, 3.0]], [0.02])
    np.testing.assert_allclose(got, [2.5, 1.5, 0.0, 2.5], atol=1e-5)


def test_flat_run_maps_to_the_middle_of_its_probabilities() -> None:
    # Sim entries 1..3 equal 1.0 (positions 0.3, 0.5, 0.7): the run covers [0.2, 0.8], its
    # middle is 0.5. With q = 1 and active [0, 40]: 20; offset ±½ moves to 8 or 32.
    sim = np.array([[0.0, 1.0, 1.0, 1.0, 2.0]], dtype=np.float32)
    active, freq = np.array([[0.0, 40.0]], np.float32), [1.0]
    got = quantile_normalize([0, 0, 0, 0], [1.0, 0.0, 2.0, 1.5], sim, active, freq)
    np.testing.assert_allclose(got, [20.0, 4.0, 36.0, 32.0], atol=1e-5)
    got = quantile_normalize([0, 0], [1.0, 1.0], sim, active, freq, [-0.5, 0.5])
    np.testing.assert_allclose(got, [8.0, 32.0], atol=1e-5)


def test_no_score_reaches_the_extremes() -> None:
    # Mid-rank positions: the top of 10 scores gets p = 0.95, never the active maximum.
    sim = np.arange(10, dtype=np.float32)[None]
    got = quantile_normalize([0, 0], [9.0, 1e6], sim, [[0.0, 100.0]], [1.0])
    np.testing.assert_allclose(got, [95.0, 95.0], atol=1e-4)


def test_never_active_latent_maps_to_zero_and_always_active_never_does() -> None:
    sim = np.array([[0.0, 1.0], [0.0, 1.0]], np.float32)
    active = np.array([[2.0, 4.0], [2.0, 4.0]], np.float32)
    got = quantile_normalize([0, 0, 1, 1], [-5.0, 5.0, -5.0, 5.0], sim, active, [0.0, 1.0])
    np.testing.assert_allclose(got, [0.0, 0.0, 2.5, 3.5], atol=1e-6)


def test_normalize_accepts_array_likes_and_noncontiguous_input() -> None:
    sim = np.array([[0.0, 1.0, 2.0, 3.0]] * 2, dtype=np.float64)[:, ::1]
    active = np.asfortranarray(np.array([[0.0, 2.0, 4.0, 6.0]] * 2))
    scores = np.array([0.5, 99.0, 1.5, 99.0])[::2]  # strided float64
    freq = np.array([1.0, 9.0, 1.0])[::2]
    got = quantile_normalize([0, 1], scores, sim, active, freq)
    want = ref_normalize(np.array([0, 1]), scores, sim, np.ascontiguousarray(active), freq)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert quantile_normalize([], [], sim, active, freq).shape == (0,)


def _active_rate(q: float, n: int, trials: int, ranks: str, seed: int) -> float:
    """Calibrated P(activation > 0) of a latent at frequency ``q``, uninformative scores."""
    rng = np.random.default_rng(seed)
    cache_tokens = 20_000
    active_count = 0
    for _ in range(trials):
        real = np.where(rng.random(cache_tokens) < q, rng.exponential(size=cache_tokens), 0.0)
        freq, table = reference_tables(
            np.zeros(cache_tokens, np.uint32), real, 1, 101, total=cache_tokens
        )
        scores = rng.integers(0, 10, n).astype(np.float32)  # digits: many ties
        ids = np.zeros(n, np.uint32)
        sim = midrank_tables(ids, scores, 1)
        offsets = (rng.random(n) - 0.5).astype(np.float32) if ranks == "random" else None
        a = quantile_normalize(ids, scores, sim, table, freq, offsets)
        active_count += int((a > 0).sum())
    return active_count / (n * trials)


@pytest.mark.parametrize("q", [0.0005, 0.001, 0.005, 0.02, 0.1])
def test_uninformative_scores_activate_the_true_frequency(q: float) -> None:
    # The measurement: 200 contexts, 20,000 cache tokens, many seeded trials; the
    # cache's own frequency estimate varies around q, so compare with the binomial error of
    # both draws. Within 4 standard errors.
    n, trials = 200, 400
    rate = _active_rate(q, n, trials, "random", seed=int(q * 1e6))
    se = np.sqrt(q * (1 - q) / (n * trials) + q * (1 - q) / 20_000 / trials)
    assert abs(rate - q) <= 4 * se + 1e-12, (rate, q)


def test_informative_scores_reproduce_the_real_marginal() -> None:
    # Scores that rank the truth well: the calibrated values have the real distribution
    # (two-sample KS statistic below the 0.1% critical value).
    rng = np.random.default_rng(7)
    n = 4000
    truth = np.where(rng.random(n) < 0.1, rng.gamma(2.0, 1.5, n), 0.0).astype(np.float32)
    scores = (truth + rng.normal(0, 0.3, n)).astype(np.float32)
    ref = np.where(rng.random(50_000) < 0.1, rng.gamma(2.0, 1.5, 50_000), 0.0)
    freq, table = reference_tables(np.zeros(ref.size, np.uint32), ref, 1, 201, total=ref.size)
    ids = np.zeros(n, np.uint32)
    offsets = (rng.random(n) - 0.5).astype(np.float32)
    a = quantile_normalize(ids, scores, midrank_tables(ids, scores, 1), table, freq, offsets)
    grid = np.sort(np.concatenate([a, ref]))
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / a.size
    cdf_r = np.searchsorted(np.sort(ref), grid, side="right") / ref.size
    ks = float(np.abs(cdf_a - cdf_r).max())
    critical = 1.95 * np.sqrt((a.size + ref.size) / (a.size * ref.size))
    assert ks < critical, ks


def test_midrank_tables_are_numpys_hazen_quantiles() -> None:
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 6, 500).astype(np.uint32)
    scores = np.round(rng.gamma(2.0, 2.0, 500), 1).astype(np.float32)
    for q in (None, 7, 101):
        got = midrank_tables(ids, scores, 8, q)
        width = got.shape[1]
        for latent in range(8):
            x = scores[ids == latent].astype(np.float64)
            want = (
                np.quantile(x, midrank_positions(width), method="hazen")
                if x.size
                else np.zeros(width)
            )
            np.testing.assert_allclose(got[latent], want, rtol=1e-6, atol=1e-6)
    # One entry per score: the row is the sorted scores.
    one = midrank_tables(np.zeros(5, np.uint32), [3.0, 1.0, 2.0, 2.0, 0.5], 1)
    np.testing.assert_array_equal(one[0], [0.5, 1.0, 2.0, 2.0, 3.0])


def test_reference_tables_count_zeros_and_table_active_values() -> None:
    ids = np.array([0, 0, 0, 1, 2], np.uint32)
    values = np.array([1.0, 0.0, 3.0, 2.0, 0.0], np.float32)
    freq, table = reference_tables(ids, values, 4, 3, total=np.array([10, 4, 2, 5]))
    np.testing.assert_allclose(freq, [0.2, 0.25, 0.0, 0.0])
    np.testing.assert_allclose(table[0], [1.0, 2.0, 3.0])
    np.testing.assert_allclose(table[2], [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"latent 3 has no observations"):
        reference_tables(ids, values, 4, 3, total=np.array([10, 4, 2, 0]))
    with pytest.raises(ValueError, match=r"total for latent 0 is 2, less than its 3 values"):
        reference_tables(ids, values, 4, 3, total=2)


# ---------------------------------------------------------------- bad input


@pytest.fixture
def good() -> tuple[np.ndarray, ...]:
    sim = np.array([[0.0, 1.0, 2.0]] * 3, dtype=np.float32)
    active = np.array([[1.0, 3.0, 5.0]] * 3, dtype=np.float32)
    freq = np.array([0.1, 0.2, 0.3], np.float32)
    return np.array([0, 1, 2], np.uint32), np.array([0.5, 1.0, 1.5], np.float32), sim, active, freq


def test_unknown_latent_id_names_index_id_and_num_latents(good) -> None:
    ids, scores, sim, active, freq = good
    ids[2] = 7
    with pytest.raises(ValueError, match=r"latent_ids\[2\] = 7 .*num_latents = 3"):
        quantile_normalize(ids, scores, sim, active, freq)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_score_names_its_index(good, bad: float) -> None:
    ids, scores, sim, active, freq = good
    scores[1] = bad
    with pytest.raises(ValueError, match=r"scores\[1\] = .* is not finite"):
        quantile_normalize(ids, scores, sim, active, freq)


@pytest.mark.parametrize("bad", [-0.1, 1.5, np.nan])
def test_frequency_outside_unit_interval_names_the_latent(good, bad: float) -> None:
    ids, scores, sim, active, freq = good
    freq[1] = bad
    with pytest.raises(ValueError, match=r"frequency of latent 1 is .*outside \[0, 1\]"):
        quantile_normalize(ids, scores, sim, active, freq)


def test_offsets_out_of_range_or_wrong_length_are_named(good) -> None:
    ids, scores, sim, active, freq = good
    with pytest.raises(ValueError, match=r"offsets\[2\] = 0.6 is outside"):
        quantile_normalize(ids, scores, sim, active, freq, [0.0, 0.1, 0.6])
    with pytest.raises(ValueError, match=r"offsets has 2 elements but scores has 3"):
        quantile_normalize(ids, scores, sim, active, freq, [0.0, 0.1])


def test_lowest_bad_index_is_reported_across_parallel_chunks() -> None:
    n = 100_000
    sim = np.array([[0.0, 1.0]], dtype=np.float32)
    scores = np.zeros(n, np.float32)
    ids = np.zeros(n, np.uint32)
    scores[[70_000, 99_999]] = np.nan
    ids[90_000] = 5
    with pytest.raises(ValueError, match=r"scores\[70000\]"):
        quantile_normalize(ids, scores, sim, sim, [0.5])


def test_unsorted_or_non_finite_table_names_the_latent(good) -> None:
    ids, scores, sim, active, freq = good
    bad = sim.copy()
    bad[1] = [0.0, 2.0, 1.0]
    with pytest.raises(ValueError, match=r"sim_table: latent 1 is not sorted"):
        quantile_normalize(ids, scores, bad, active, freq)
    bad = active.copy()
    bad[2, 0] = np.nan
    with pytest.raises(ValueError, match=r"active_table: latent 2 has a non-finite entry"):
        quantile_normalize(ids, scores, sim, bad, freq)


def test_shape_mismatches_are_named(good) -> None:
    ids, scores, sim, active, freq = good
    with pytest.raises(ValueError, match=r"latent_ids has 2 elements but scores has 3"):
        quantile_normalize(ids[:2], scores, sim, active, freq)
    with pytest.raises(ValueError, match=r"frequency has 2 elements but active_table rows"):
        quantile_normalize(ids, scores, sim, active, freq[:2])
    with pytest.raises(ValueError, match=r"sim_table has 3 latents but real_table has 2"):
        quantile_normalize(ids, scores, sim, active[:2], freq[:2])


def test_wrong_ndim_is_named(good) -> None:
    ids, scores, sim, active, freq = good
    with pytest.raises(ValueError, match=r"scores must be 1-D"):
        quantile_normalize(ids, scores[None], sim, active, freq)
    with pytest.raises(ValueError, match=r"latent_ids must be 1-D"):
        quantile_normalize(ids[None], scores, sim, active, freq)
    with pytest.raises(ValueError, match=r"sim_table must be 2-D"):
        quantile_normalize(ids, scores, sim[0], active, freq)


def test_fewer_than_two_quantiles_is_rejected(good) -> None:
    ids, scores, sim, active, freq = good
    with pytest.raises(ValueError, match=r"active_table needs at least 2 quantiles"):
        quantile_normalize(ids, scores, sim, active[:, :1], freq)


def test_bad_latent_ids_are_rejected_before_casting(good) -> None:
    _, scores, sim, active, freq = good
    args = (sim, active, freq)
    with pytest.raises(ValueError, match=r"latent_ids\[1\] = -1 is negative"):
        quantile_normalize([0, -1, 2], scores, *args)
    with pytest.raises(ValueError, match=r"latent_ids\[0\] = 0.5 is not an integer"):
        quantile_normalize([0.5, 1.0, 2.0], scores, *args)
    with pytest.raises(ValueError, match=r"does not fit uint32"):
        quantile_normalize([0, 2**32, 1], scores, *args)
    with pytest.raises(TypeError, match=r"latent_ids must hold integers"):
        quantile_normalize(["a", "b", "c"], scores, *args)
    # Integral floats are a lossless cast.
    np.testing.assert_array_equal(
        quantile_normalize([0.0, 1.0, 2.0], scores, *args),
        quantile_normalize([0, 1, 2], scores, *args),
    )


def test_scores_beyond_float32_are_rejected(good) -> None:
    ids, _, sim, active, freq = good
    with pytest.raises(ValueError, match=r"scores\[1\] = 1e\+39 is out of float32 range"):
        quantile_normalize(ids, np.array([0.0, 1e39, 0.0]), sim, active, freq)
    with pytest.raises(TypeError, match=r"scores must hold real numbers"):
        quantile_normalize(ids, np.array([1j, 0, 0]), sim, active, freq)


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
    active = np.sort(rng.exponential(size=(4, 5)), axis=1).astype(np.float32)
    freq = np.array([0.0, 0.01, 0.5, 1.0], np.float32)
    path = tmp_path / "calibration.safetensors"
    save_tables(path, sim=sim, active=active, frequency=freq, model="smollm2", layer="15")
    back = load_tables(path)
    assert back.sim is not None and back.active is not None and back.frequency is not None
    np.testing.assert_array_equal(back.sim, sim)
    np.testing.assert_array_equal(back.active, active)
    np.testing.assert_array_equal(back.frequency, freq)
    assert back.metadata == {"model": "smollm2", "layer": "15"}
    save_tables(path, active=active, frequency=freq)  # overwrite with the reference only
    only = load_tables(path)
    assert only.sim is None and only.active is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibration.safetensors"]


def test_save_tables_rejects_bad_tables_without_writing(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    good = np.array([[0.0, 1.0]], dtype=np.float32)
    two = np.vstack([good, good])
    with pytest.raises(ValueError, match=r"active: latent 1 is not sorted ascending"):
        save_tables(path, sim=two, active=np.array([[0, 1], [1, 0]]), frequency=[0.1, 0.1])
    with pytest.raises(ValueError, match=r"sim must have shape \[L, Q\] with Q >= 2"):
        save_tables(path, sim=np.zeros((3, 1)))
    with pytest.raises(ValueError, match=r"different numbers of latents"):
        save_tables(path, sim=good, active=two, frequency=[0.1, 0.1])
    with pytest.raises(ValueError, match=r"frequency: latent 1 has frequency 2.0"):
        save_tables(path, active=two, frequency=[0.1, 2.0])
    with pytest.raises(ValueError, match=r"active= and frequency= together"):
        save_tables(path, active=two)
    with pytest.raises(TypeError, match=r"metadata 'layer' must be a str"):
        save_tables(path, sim=good, layer=15)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"needs sim=, active= and frequency="):
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


def test_load_tables_rejects_old_foreign_or_invalid_content(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.safetensors"
    save_file({"sim": np.zeros((2, 3), np.float32)}, foreign)
    with pytest.raises(ValueError, match=r"foreign\.safetensors: expected a nlrw.quantile_tables"):
        load_tables(foreign)
    old = tmp_path / "old.safetensors"
    table = np.array([[0, 0, 1], [0, 1, 2]], np.float32)
    save_file({"real": table}, old, {"nlrw_format": "nlrw.quantile_tables.v1"})
    with pytest.raises(ValueError, match=r"old\.safetensors: .*v1.*re-run `nlrw calibrate`"):
        load_tables(old)
    meta = {"nlrw_format": "nlrw.quantile_tables.v2"}
    unsorted = tmp_path / "unsorted.safetensors"
    save_file({"sim": np.array([[0, 1], [1, 0]], np.float32)}, unsorted, meta)
    with pytest.raises(ValueError, match=r"unsorted\.safetensors: sim: latent 1 is not sorted"):
        load_tables(unsorted)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"sim": np.zeros((2, 3), np.float64)}, wrong, meta)
    with pytest.raises(ValueError, match=r"wrong\.safetensors: sim has dtype float64"):
        load_tables(wrong)
    extra = tmp_path / "extra.safetensors"
    save_file({"other": np.zeros((2, 3), np.float32)}, extra, meta)
    with pytest.raises(ValueError, match=r"extra\.safetensors: expected tensors 'sim' and/or"):
        load_tables(extra)
    lonely = tmp_path / "lonely.safetensors"
    save_file({"active": table}, lonely, meta)
    with pytest.raises(ValueError, match=r"lonely\.safetensors: expected tensors"):
        load_tables(lonely)


def test_core_binding_refuses_fortran_ordered_tables() -> None:
    # nlrw.model.quantiles copies into C order; the raw binding must refuse a transposed view
    # rather than read its memory as rows (a Fortran block is contiguous too).
    from nlrw import _core

    sim = np.sort(np.random.default_rng(0).normal(size=(3, 4)), axis=1).astype(np.float32)
    active = np.asfortranarray(np.array([[0.0, 1.0, 2.0, 3.0]] * 3, np.float32))
    args = (np.zeros(2, np.uint32), np.zeros(2, np.float32))
    freq = np.full(3, 0.5, np.float32)
    with pytest.raises(ValueError, match=r"active_table must be a C-contiguous array"):
        _core.quantile_normalize(*args, sim, active, freq)
    with pytest.raises(ValueError, match=r"sim_table must be a C-contiguous array"):
        _core.quantile_normalize(*args, np.asfortranarray(sim), np.ascontiguousarray(active), freq)
    got = quantile_normalize(args[0], args[1], np.asfortranarray(sim), active, freq)
    want = quantile_normalize(args[0], args[1], sim, np.ascontiguousarray(active), freq)
    np.testing.assert_array_equal(got, want)
