"""Tests of the calibrate stage: each method's math against plain numpy references (the
quantile rule with and without ties, PAV against exhaustive search), the gate's specificity,
fits that never see eval contexts, metrics, bad inputs and resume, on real files."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from nlrw import calibrate
from nlrw.calibrate import (
    CalibrateConfig,
    gate_apply,
    gate_fill,
    gate_threshold,
    isotonic_apply,
    isotonic_fit,
    latent_metrics,
    uncalibrated,
)
from nlrw.model.quantiles import load_tables, probabilities

# ---------------------------------------------------------------- references


def pairwise_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUROC over all (positive, negative) pairs, O(n^2): the definition itself."""
    pos, neg = scores[labels], scores[~labels]
    if not len(pos) or not len(neg):
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def ref_normalize(
    scores: np.ndarray, sim_row: np.ndarray, active_row: np.ndarray, q: float
) -> np.ndarray:
    """F_real⁻¹(F_sim(s)) for one latent with the mid-rank rule (no offsets): sim entries at
    (i + ½)/Qs, a tie at the middle of its run, then the mixture F_real⁻¹ with frequency q."""
    s = np.asarray(scores, dtype=np.float32).astype(np.float64)
    row = sim_row.astype(np.float64)
    qs = row.size
    ps = (np.arange(qs) + 0.5) / qs
    a = np.searchsorted(row, s, side="left")  # first entry >= s
    b = np.searchsorted(row, s, side="right") - 1  # last entry <= s
    j = np.clip(b, 0, qs - 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        f = ps[j] + (s - row[j]) / (row[j + 1] - row[j]) * (ps[j + 1] - ps[j])
    f = np.where(b < 0, ps[0], np.where(b >= qs - 1, ps[-1], f))
    middle = (ps[np.minimum(a, qs - 1)] + ps[np.maximum(b, 0)]) / 2  # a tie: middle of the run
    f = np.where(a <= b, middle, f)
    u = (f - (1.0 - q)) / q
    grid = np.linspace(0.0, 1.0, active_row.size)
    return np.where(u > 0, np.interp(np.clip(u, 0, 1), grid, active_row.astype(np.float64)), 0.0)


def ref_isotonic_exhaustive(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Best non-decreasing step fit over every partition of the distinct x into runs of
    consecutive blocks (the optimum is block means of one of them): O(2^n)."""
    xs = np.unique(x)
    best, best_sse = None, math.inf
    for cuts in itertools.product([False, True], repeat=xs.size - 1):
        edges = [0, *[i + 1 for i, c in enumerate(cuts) if c], xs.size]
        fit_x = np.empty(xs.size)
        for lo, hi in itertools.pairwise(edges):
            members = (x >= xs[lo]) & (x <= xs[hi - 1])
            fit_x[lo:hi] = y[members].mean()
        if np.any(np.diff(fit_x) < -1e-12):
            continue
        sse = float(((y - fit_x[np.searchsorted(xs, x)]) ** 2).sum())
        if sse < best_sse - 1e-12:
            best, best_sse = fit_x, sse
    assert best is not None
    return xs, best


def ref_isotonic_minmax(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """ŷ_i = max_{j<=i} min_{k>=i} mean(y over the distinct-x blocks j..k): O(n^3)."""
    xs, inv = np.unique(x, return_inverse=True)
    s = np.bincount(inv, weights=y)
    w = np.bincount(inv).astype(float)
    n = xs.size
    out = np.empty(n)
    for i in range(n):
        out[i] = max(
            min(s[j : k + 1].sum() / w[j : k + 1].sum() for k in range(i, n)) for j in range(i + 1)
        )
    return out


# ---------------------------------------------------------------- synthetic run directory

N_EVAL, N_CAL = 120, 120
LATENTS = (3, 7, 12, 20)
Q_REAL = 21


def _scores_and_truth(rng: np.random.Generator, latent: int, n: int, is_eval: np.ndarray):
    if latent == 3:  # noisy monotone in the truth, plus inactive contexts rated ≈ 8.5
        active = rng.random(n) < 0.3
        true = np.where(active, rng.gamma(2.0, 1.0, n), 0.0)
        e = np.where(active, 2.0 + 1.5 * true + rng.normal(0, 0.7, n), rng.normal(1.0, 0.6, n))
        false_pos = ~active & (rng.random(n) < 0.3)
        e = np.where(false_pos, rng.normal(8.5, 0.2, n), e)
        e = 9.0 - np.abs(9.0 - np.abs(e))  # reflected into [0, 9]: no ties at the ends
    elif latent == 7:  # heavy ties: exactly 70% of each split rated 0 (confident "no")
        true = np.where(rng.random(n) < 0.1, rng.gamma(2.0, 1.0, n), 0.0)
        e = rng.uniform(0.5, 9.0, n)
        for split in (is_eval, ~is_eval):
            idx = rng.permutation(np.flatnonzero(split))
            e[idx[: round(0.7 * idx.size)]] = 0.0
    elif latent == 12:  # never active on the calibration split: the fallback
        true = np.where(is_eval & (rng.random(n) < 0.2), 1.0, 0.0)
        e = rng.uniform(0, 9, n)
    else:  # always active: no inactive context for the gate
        true = rng.gamma(3.0, 1.0, n) + 0.1
        e = np.clip(true * 1.5, 0, 9)
    return np.clip(e, 0.0, 9.0).astype(np.float32), true.astype(np.float32)


def make_run(root: Path, seed: int = 0) -> Path:
    """A run directory with contexts.parquet, latents/stats.parquet, simulations.parquet."""
    rng = np.random.default_rng(seed)
    n = N_EVAL + N_CAL
    split = np.array(["eval"] * N_EVAL + ["calibration"] * N_CAL)
    root.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(
        {
            "context_id": np.arange(n, dtype=np.int32),
            "split": split,
            "target_id": rng.integers(0, 100, n).astype(np.int32),
        }
    ).write_parquet(root / "contexts.parquet")

    stats = []
    for latent in range(25):
        if latent == 7:  # always active, uniform on [0, 2]: F_real⁻¹(p) = 2p, easy to read
            freq, table = 1.0, np.linspace(0.0, 2.0, Q_REAL)
        else:
            vals = np.where(rng.random(2000) < 0.1, rng.gamma(2.0, 1.0, 2000), 0.0)
            freq = float((vals > 0).mean())
            table = np.quantile(vals[vals > 0], probabilities(Q_REAL))
        stats.append(
            {
                "latent": latent,
                "count": 1,
                "reference_max": float(table[-1]),
                "reference_frequency": freq,
                "active_quantiles": table.astype(np.float32).tolist(),
            }
        )
    pl.DataFrame(
        stats,
        schema={
            "latent": pl.Int32,
            "count": pl.Int64,
            "reference_max": pl.Float32,
            "reference_frequency": pl.Float64,
            "active_quantiles": pl.List(pl.Float32),
        },
    ).write_parquet(_mkdir(root / "latents") / "stats.parquet")

    frames = []
    is_eval = split == "eval"
    for latent in LATENTS:
        e, true = _scores_and_truth(rng, latent, n, is_eval)
        probs = rng.dirichlet(np.ones(10), n).astype(np.float32)
        frames.append(
            pl.DataFrame(
                {
                    "latent": np.full(n, latent, np.int32),
                    "context_id": np.arange(n, dtype=np.int32),
                    "expected_value": e,
                    "digit_probs": probs,
                    "digit_mass": np.ones(n, np.float32),
                    "true_activation": true,
                }
            )
        )
    # written shuffled: the stage must not rely on the documented sort order
    sims = pl.concat(frames).sample(fraction=1.0, shuffle=True, seed=seed)
    sims.write_parquet(root / "simulations.parquet")
    write_true_topk(root, sims, rng)
    return root


K = 8


def write_true_topk(root: Path, sims: pl.DataFrame, rng: np.random.Generator) -> None:
    """contexts/activations.safetensors: each context's true top-k, the simulated latents'
    true activations plus unsimulated latents (100..) filling the rest of the k slots."""
    from safetensors.torch import save_file as save_torch

    n = N_EVAL + N_CAL
    values = np.zeros((n, K), np.float32)
    indices = np.zeros((n, K), np.int64)
    for c in range(n):
        rows = sims.filter((pl.col("context_id") == c) & (pl.col("true_activation") > 0))
        lat = rows["latent"].to_numpy().astype(np.int64)
        val = rows["true_activation"].to_numpy()
        fill = K - lat.size
        lat = np.concatenate([lat, 100 + rng.choice(50, fill, replace=False)])
        val = np.concatenate([val, rng.gamma(2.0, 1.0, fill)]).astype(np.float32)
        order = np.argsort(-val, kind="stable")
        values[c], indices[c] = val[order], lat[order]
    _mkdir(root / "contexts")
    save_torch(
        {
            "x": torch.zeros(n, 4),
            "y": torch.zeros(n, 4),
            "values": torch.from_numpy(values),
            "indices": torch.from_numpy(indices),
        },
        str(root / "contexts" / "activations.safetensors"),
    )


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def sims_of(run_dir: Path) -> pl.DataFrame:
    sims = pl.read_parquet(run_dir / "simulations.parquet").sort("latent", "context_id")
    return sims.with_columns(is_eval=pl.col("context_id") < N_EVAL)


def activations(run_dir: Path, method: str, latent: int) -> np.ndarray:
    table = pl.read_parquet(run_dir / "calibration.parquet")
    sel = table.filter((pl.col("calibration") == method) & (pl.col("latent") == latent))
    assert sel["context_id"].to_list() == list(range(N_EVAL))
    return sel["activation"].to_numpy()


@pytest.fixture(scope="module")
def done_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = make_run(tmp_path_factory.mktemp("calibrate") / "run")
    # 4 simulated latents, k = 8: a budget of 0.05 k gives specificity 1 - 0.4 / 4 = 0.9.
    calibrate.run(CalibrateConfig(gate_budget=0.05), run_dir, progress=False)
    return run_dir


# ---------------------------------------------------------------- pure functions


def test_uncalibrated_is_e_over_9_times_max() -> None:
    e = np.array([0.0, 4.5, 9.0, 1.0], np.float32)
    got = uncalibrated(e, 2.0)
    np.testing.assert_allclose(got, [0.0, 1.0, 2.0, 2.0 / 9], rtol=1e-7)
    assert got.dtype == np.float32 and got[2] == 2.0  # E = 9 is the max, not 0
    np.testing.assert_allclose(uncalibrated(e, [1, 2, 3, 4]), e / 9 * [1, 2, 3, 4], rtol=1e-6)


def test_isotonic_fit_matches_exhaustive_search_on_small_cases() -> None:
    rng = np.random.default_rng(1)
    for _ in range(200):
        n = int(rng.integers(1, 9))
        x = rng.integers(0, 6, n).astype(float)  # duplicates in x
        y = np.where(rng.random(n) < 0.5, 0.0, rng.gamma(1.0, 1.0, n))
        xs, ys = isotonic_fit(x, y)
        want_x, want_y = ref_isotonic_exhaustive(x, y)
        np.testing.assert_array_equal(xs, want_x)
        np.testing.assert_allclose(ys, want_y, rtol=1e-10, atol=1e-12)


def test_isotonic_fit_matches_min_max_formula_and_optimality_conditions() -> None:
    rng = np.random.default_rng(2)
    x = np.round(rng.uniform(0, 9, 60), 1)
    y = np.where(rng.random(60) < 0.6, 0.0, x / 3 + rng.normal(0, 1, 60)).clip(0)
    xs, ys = isotonic_fit(x, y)
    np.testing.assert_allclose(ys, ref_isotonic_minmax(x, y), rtol=1e-10, atol=1e-12)
    assert (np.diff(ys) >= 0).all() and (np.diff(xs) > 0).all()
    fitted = ys[np.searchsorted(xs, x)]
    # KKT: residuals sum to zero on every block of equal fitted values
    for v in np.unique(ys):
        np.testing.assert_allclose((y - fitted)[fitted == v].sum(), 0.0, atol=1e-9)
    # no monotone perturbation does better
    sse = ((y - fitted) ** 2).sum()
    for _ in range(200):
        other = np.maximum.accumulate(ys + rng.normal(0, 0.05, ys.size))
        assert ((y - other[np.searchsorted(xs, x)]) ** 2).sum() >= sse - 1e-12


def test_isotonic_fit_edge_cases() -> None:
    xs, ys = isotonic_fit([], [])
    assert xs.size == ys.size == 0
    xs, ys = isotonic_fit([2.0, 1.0, 3.0], [5.0, 1.0, 0.0])  # unsorted input
    np.testing.assert_allclose(xs, [1, 2, 3])
    np.testing.assert_allclose(ys, [1.0, 2.5, 2.5])
    with pytest.raises(ValueError, match="x has 2 values but y has 1"):
        isotonic_fit([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match=r"y\[1\] is not finite"):
        isotonic_fit([1.0, 2.0], [1.0, np.nan])


def test_isotonic_apply_interpolates_and_clamps() -> None:
    xs, ys = np.array([1.0, 2.0, 4.0]), np.array([0.0, 1.0, 3.0])
    got = isotonic_apply(xs, ys, [0.0, 1.0, 1.5, 3.0, 4.0, 9.0])
    np.testing.assert_allclose(got, [0.0, 0.0, 0.5, 2.0, 3.0, 3.0])
    np.testing.assert_array_equal(isotonic_apply([], [], [1.0, 5.0]), [0.0, 0.0])


def _specificity(inactive: np.ndarray, t: float) -> float:
    return float((inactive < t).mean())


def test_gate_threshold_is_the_smallest_specific_threshold() -> None:
    scores = np.arange(10, dtype=np.float32)  # all inactive: 0..9
    t = gate_threshold(scores, np.zeros(10, bool), 0.7)  # 0.7 * 10 rounds up to 7.000…01
    assert t == float(np.nextafter(np.float32(6.0), np.float32(10)))
    assert _specificity(scores, t) == 0.7
    assert _specificity(scores, 6.0) < 0.7
    ties = np.array([0, 0, 0, 0, 0, 0, 0, 0, 5, 6], np.float32)
    t = gate_threshold(ties, np.zeros(10, bool), 0.5)
    assert 0 < t < 1e-30 and _specificity(ties, t) == 0.8  # E = 0 is gated, anything above not
    assert gate_threshold([1.0, 2.0], [True, True], 0.9) == -math.inf
    rng = np.random.default_rng(3)
    for _ in range(300):
        n = int(rng.integers(1, 40))
        e = np.round(rng.uniform(0, 9, n), int(rng.integers(0, 3))).astype(np.float32)
        active = rng.random(n) < 0.3
        s = float(rng.choice([0.5, 0.7, 0.9, 0.95, 1.0, rng.uniform(0.01, 1)]))
        t = gate_threshold(e, active, s)
        inactive = e[~active]
        if inactive.size == 0:
            assert t == -math.inf
            continue
        assert _specificity(inactive, t) >= s
        below = np.nextafter(np.float32(t), np.float32(-np.inf))
        assert _specificity(inactive, float(below)) < s  # nothing smaller works
    with pytest.raises(ValueError, match="specificity"):
        gate_threshold([1.0], [False], 0.0)


def test_gate_apply_and_fill() -> None:
    e = np.array([0.0, 2.0, 5.0, 6.0, 8.0])
    true = np.array([0.0, 0.0, 1.0, 3.0, 0.0])
    assert gate_fill(e, true, 5.5) == 3.0  # active contexts with E >= t
    assert gate_fill(e, true, 7.0) == 2.0  # none above: all active ones
    assert gate_fill(e, np.zeros(5), 1.0) == 0.0
    xs, ys = np.array([0.0, 5.0, 8.0]), np.array([0.0, 0.0, 4.0])
    got = gate_apply([1.0, 4.0, 5.0, 6.5, 9.0], 4.0, xs, ys, fill=3.0)
    np.testing.assert_allclose(got, [0.0, 3.0, 3.0, 2.0, 4.0])


def test_metrics_against_references() -> None:
    rng = np.random.default_rng(4)
    for _ in range(50):
        n = int(rng.integers(2, 60))
        true = np.where(rng.random(n) < 0.3, rng.gamma(2, 1, n), 0.0)
        e = np.round(rng.uniform(0, 9, n))  # ties
        cal = np.where(rng.random(n) < 0.5, 0.0, e / 9)
        m = latent_metrics(cal, true, e)
        pos, neg = true > 0, true == 0
        assert m["n_active"] == pos.sum() and m["n_contexts"] == n
        if pos.any():
            assert m["sensitivity"] == (cal[pos] > 0).mean()
        else:
            assert math.isnan(m["sensitivity"])
        if neg.any():
            assert m["specificity"] == (cal[neg] == 0).mean()
        else:
            assert math.isnan(m["specificity"])
        want_auc = pairwise_auroc(e, pos)
        assert (math.isnan(m["auroc"]) and math.isnan(want_auc)) or math.isclose(
            m["auroc"], want_auc, rel_tol=1e-12
        )
        if cal.std() > 0 and true.std() > 0:
            assert math.isclose(m["pearson"], np.corrcoef(cal, true)[0, 1], rel_tol=1e-9)
        else:
            assert math.isnan(m["pearson"])


# ---------------------------------------------------------------- the stage


def test_outputs_and_schemas(done_run: Path) -> None:
    table = pl.read_parquet(done_run / "calibration.parquet")
    assert table.schema == pl.Schema(calibrate.OUTPUT_SCHEMA)
    assert table.height == len(LATENTS) * N_EVAL * 4
    assert table["context_id"].max() < N_EVAL  # eval contexts only
    assert (table["activation"] >= 0).all()
    assert table["calibration"].unique(maintain_order=True).to_list() == list(calibrate.METHODS)
    metrics = pl.read_parquet(done_run / "calibration_metrics.parquet")
    assert metrics.schema == pl.Schema(calibrate.METRICS_SCHEMA)
    assert metrics.height == len(LATENTS) * 4
    record = json.loads((done_run / "calibrate.json").read_text())
    assert record["stage"] == "calibrate" and record["n_latents"] == len(LATENTS)
    assert record["n_eval_contexts"] == N_EVAL and record["n_calibration_contexts"] == N_CAL
    assert record["n_fallback_latents"] == 1 and list(record["fallback_latents"]) == ["12"]
    tables = load_tables(done_run / "calibration.safetensors")
    assert tables.sim is not None and tables.active is not None
    assert tables.sim.shape == (len(LATENTS), N_EVAL)  # one mid-rank entry per eval context
    assert tables.active.shape == (len(LATENTS), Q_REAL)
    assert json.loads(tables.metadata["latents"]) == list(LATENTS)


def test_uncalibrated_and_metrics_from_files(done_run: Path) -> None:
    sims = sims_of(done_run)
    stats = pl.read_parquet(done_run / "latents" / "stats.parquet")
    metrics = pl.read_parquet(done_run / "calibration_metrics.parquet")
    for latent in LATENTS:
        ev = sims.filter((pl.col("latent") == latent) & pl.col("is_eval"))
        e, true = ev["expected_value"].to_numpy(), ev["true_activation"].to_numpy()
        mx = stats.filter(pl.col("latent") == latent)["reference_max"].item()
        np.testing.assert_allclose(
            activations(done_run, "uncalibrated", latent), e / 9.0 * mx, rtol=1e-6
        )
        for method in calibrate.METHODS:
            row = metrics.filter((pl.col("latent") == latent) & (pl.col("calibration") == method))
            want = latent_metrics(activations(done_run, method, latent), true, e)
            got = row.select(list(want)).row(0, named=True)
            for k, v in want.items():
                assert (isinstance(v, float) and math.isnan(v) and math.isnan(got[k])) or got[
                    k
                ] == pytest.approx(v)


@pytest.fixture(scope="module")
def mid_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = make_run(tmp_path_factory.mktemp("calibrate-mid") / "run")
    calibrate.run(CalibrateConfig(quantile_ranks="mid"), run_dir, progress=False)
    return run_dir


def _reference_of(run_dir: Path, latent: int) -> tuple[np.ndarray, float]:
    stats = pl.read_parquet(run_dir / "latents" / "stats.parquet")
    row = stats.filter(pl.col("latent") == latent)
    return np.asarray(row["active_quantiles"].item()), float(row["reference_frequency"].item())


def test_quantile_matches_numpy_reference_without_ties(mid_run: Path) -> None:
    sims = sims_of(mid_run)
    tables = load_tables(mid_run / "calibration.safetensors")
    assert tables.sim is not None and tables.active is not None and tables.frequency is not None
    i = LATENTS.index(3)
    ev = sims.filter((pl.col("latent") == 3) & pl.col("is_eval"))
    e = ev["expected_value"].to_numpy()
    assert np.unique(e).size == e.size  # no ties in this latent
    # F_sim's table is the latent's eval scores, sorted (one mid-rank entry each) ...
    np.testing.assert_array_equal(tables.sim[i], np.sort(e))
    # ... F_real the stats' reference: frequency and active-value table
    active, q = _reference_of(mid_run, 3)
    np.testing.assert_array_equal(tables.active[i], active)
    assert tables.frequency[i] == pytest.approx(q)
    got = activations(mid_run, "quantile", 3)
    np.testing.assert_allclose(got, ref_normalize(e, tables.sim[i], active, q), atol=1e-6)
    # a latent active on ~10% of tokens: exactly the top round(n q) of 120 ranks are active
    assert (got > 0).sum() == np.sum((np.arange(120) + 0.5) / 120 > 1 - np.float32(q))


def test_quantile_with_heavy_ties_maps_to_middle_of_run(mid_run: Path, done_run: Path) -> None:
    sims = sims_of(mid_run)
    tables = load_tables(mid_run / "calibration.safetensors")
    assert tables.sim is not None
    i = LATENTS.index(7)
    e = sims.filter((pl.col("latent") == 7) & pl.col("is_eval"))["expected_value"].to_numpy()
    zero = e == 0
    assert zero.sum() == 84  # 70% of 120
    got = activations(mid_run, "quantile", 7)
    active, q = _reference_of(mid_run, 7)
    np.testing.assert_allclose(got, ref_normalize(e, tables.sim[i], active, q), atol=1e-6)
    # By hand: 84 of 120 sorted scores are 0, covering probabilities [0, 0.7]; the middle is
    # 0.35, and this latent is always active, uniform on [0, 2] (F_real⁻¹(p) = 2p).
    np.testing.assert_allclose(got[zero], 2 * 0.35, rtol=1e-6)
    assert (got[~zero] > 2 * 0.7).all()
    # Random ranks (the default) spread the tie uniformly over [0, 0.7]: values in [0, 1.4].
    spread = activations(done_run, "quantile", 7)[zero]
    assert spread.min() >= 0 and spread.max() <= 1.4 + 1e-6
    assert np.unique(spread).size == spread.size and 0.5 < spread.mean() < 0.9


def test_support_diagnostics_by_hand() -> None:
    # k = 3; simulated latents 1, 2, 5. Context 0: truth {1: 4, 7: 3, 9: 1}; calibrated
    # 1 → 2.0, 2 → 5.0 (spurious, survives), 5 → 0.5 (spurious, loses to 9 and 7).
    out = calibrate.support_diagnostics(
        "quantile",
        np.array([1, 2, 5]),
        np.array([1, 2, 5]),
        np.array([0, 0, 0]),
        np.array([2.0, 5.0, 0.5], np.float32),
        np.array([0]),
        np.array([[4.0, 3.0, 1.0]], np.float32),
        np.array([[1, 7, 9]]),
    )
    row = out.row(0, named=True)
    assert row["n_spurious"] == 1 and row["n_surviving"] == 2 and row["n_true_active"] == 1
    assert row["precision"] == 0.5 and row["recall"] == 1.0


def test_support_file_and_gate_budget(done_run: Path) -> None:
    support = pl.read_parquet(done_run / "calibration_support.parquet")
    assert support.schema == pl.Schema(calibrate.SUPPORT_SCHEMA)
    assert support.height == N_EVAL * 4
    record = json.loads((done_run / "calibrate.json").read_text())
    assert set(record["support"]) == set(calibrate.METHODS)
    assert record["gate_specificity"] == pytest.approx(0.9) and record["top_k"] == K
    assert calibrate.gate_specificity(0.25, 32, 8192) == pytest.approx(1 - 8 / 8192)


def test_unresolvable_gate_falls_back_and_is_named(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run")
    cfg = CalibrateConfig(gate_specificity=0.999)  # needs 1,000 inactive contexts
    calibrate.run(cfg, run_dir, progress=False)
    record = json.loads((run_dir / "calibrate.json").read_text())
    assert record["n_gate_fallback_latents"] >= 2
    assert "cannot resolve gate specificity 0.999" in record["gate_fallback_latents"]["3"]
    assert (activations(run_dir, "gate", 3) == 0).all()


def test_isotonic_and_gate_are_fitted_on_calibration_contexts(done_run: Path) -> None:
    sims = sims_of(done_run)
    fits = pl.read_parquet(done_run / "calibration_fits.parquet")
    for latent in (3, 7, 20):
        this = sims.filter(pl.col("latent") == latent)
        cal = this.filter(~pl.col("is_eval"))
        e_cal, t_cal = cal["expected_value"].to_numpy(), cal["true_activation"].to_numpy()
        e_eval = this.filter(pl.col("is_eval"))["expected_value"].to_numpy()
        want_y = ref_isotonic_minmax(e_cal.astype(np.float64), t_cal.astype(np.float64))
        xs = np.unique(e_cal.astype(np.float64))
        want = np.interp(e_eval.astype(np.float64), xs, want_y)
        np.testing.assert_allclose(activations(done_run, "isotonic", latent), want, atol=1e-5)
        fit = fits.filter(pl.col("latent") == latent).row(0, named=True)
        assert fit["fallback"] is None and fit["n_calibration"] == N_CAL
        t = fit["gate_threshold"]
        inactive = e_cal[t_cal == 0]
        if inactive.size:  # the gate's specificity holds on the calibration split
            assert (inactive < t).mean() >= 0.9
            assert (inactive < np.nextafter(np.float32(t), np.float32(-1))).mean() < 0.9
        else:
            assert t == -math.inf
        gate = activations(done_run, "gate", latent)
        assert (gate[e_eval < t] == 0).all()
        passed = e_eval >= t
        iso = np.interp(e_eval.astype(np.float64), xs, want_y)
        want_gate = np.where(iso > 0, iso, fit["gate_fill"])
        np.testing.assert_allclose(gate[passed], want_gate[passed], rtol=1e-5)


def test_paper_diagnosis_on_false_positives(done_run: Path) -> None:
    m = pl.read_parquet(done_run / "calibration_metrics.parquet").filter(pl.col("latent") == 3)
    spec = dict(zip(m["calibration"], m["specificity"], strict=True))
    # uncalibrated: every E > 0 is active, inactive contexts included
    assert spec["uncalibrated"] < 0.05
    assert spec["gate"] > 0.75 and spec["quantile"] > 0.75
    assert len(set(m["auroc"].to_list())) == 1  # a property of the scores, not the mapping


def test_fallback_latent_predicts_inactive(done_run: Path) -> None:
    fit = pl.read_parquet(done_run / "calibration_fits.parquet").filter(pl.col("latent") == 12)
    assert "active calibration contexts (0)" in fit["fallback"].item()
    assert (activations(done_run, "isotonic", 12) == 0).all()
    assert (activations(done_run, "gate", 12) == 0).all()
    m = pl.read_parquet(done_run / "calibration_metrics.parquet").filter(pl.col("latent") == 12)
    row = m.filter(pl.col("calibration") == "gate").row(0, named=True)
    assert row["specificity"] == 1.0 and row["sensitivity"] == 0.0 and math.isnan(row["pearson"])


def test_eval_truth_never_reaches_the_fits(tmp_path: Path, done_run: Path) -> None:
    other = make_run(tmp_path / "other")
    sims = pl.read_parquet(other / "simulations.parquet")
    rng = np.random.default_rng(9)
    noise = rng.gamma(1.0, 5.0, sims.height).astype(np.float32)
    sims = sims.with_columns(
        true_activation=pl.when(pl.col("context_id") < N_EVAL)
        .then(pl.Series(noise))
        .otherwise(pl.col("true_activation"))
    )
    sims.write_parquet(other / "simulations.parquet")
    calibrate.run(CalibrateConfig(gate_budget=0.05), other, progress=False)
    for method in ("isotonic", "gate", "quantile", "uncalibrated"):
        for latent in LATENTS:
            np.testing.assert_array_equal(
                activations(other, method, latent), activations(done_run, method, latent)
            )
    a = pl.read_parquet(done_run / "calibration_fits.parquet")
    assert a.equals(pl.read_parquet(other / "calibration_fits.parquet"))
    # and the calibration split's truth does change them
    sims = sims.with_columns(
        true_activation=pl.when(pl.col("context_id") >= N_EVAL)
        .then(pl.Series(noise))
        .otherwise(pl.col("true_activation"))
    )
    sims.write_parquet(other / "simulations.parquet")
    calibrate.run(CalibrateConfig(gate_budget=0.05), other, progress=False, overwrite=True)
    assert not np.array_equal(
        activations(other, "isotonic", 3), activations(done_run, "isotonic", 3)
    )


def test_quantile_fit_on_calibration_split(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run")
    cfg = CalibrateConfig(
        methods=("quantile",), quantile_fit="calibration", sim_quantiles=11, quantile_ranks="mid"
    )
    calibrate.run(cfg, run_dir, progress=False)
    sims = sims_of(run_dir)
    tables = load_tables(run_dir / "calibration.safetensors")
    assert tables.sim is not None
    e_cal = sims.filter((pl.col("latent") == 3) & ~pl.col("is_eval"))["expected_value"]
    positions = (np.arange(11) + 0.5) / 11
    np.testing.assert_allclose(
        tables.sim[0],
        np.quantile(e_cal.to_numpy().astype(np.float64), positions, method="hazen"),
        rtol=1e-6,
    )
    e = sims.filter((pl.col("latent") == 3) & pl.col("is_eval"))["expected_value"].to_numpy()
    active, q = _reference_of(run_dir, 3)
    np.testing.assert_allclose(
        activations(run_dir, "quantile", 3),
        ref_normalize(e, tables.sim[0], active, q),
        atol=1e-6,
    )
    assert pl.read_parquet(run_dir / "calibration.parquet")["calibration"].unique().to_list() == [
        "quantile"
    ]


def test_deterministic(tmp_path: Path, done_run: Path) -> None:
    again = make_run(tmp_path / "again")
    calibrate.run(CalibrateConfig(gate_budget=0.05), again, progress=False)
    for name in ("calibration.parquet", "calibration_metrics.parquet", "calibration_fits.parquet"):
        assert pl.read_parquet(again / name).equals(
            pl.read_parquet(done_run / name), null_equal=True
        )


# ---------------------------------------------------------------- bad inputs and resume


def _no_outputs(run_dir: Path) -> None:
    for name in ("calibration.parquet", "calibration_metrics.parquet", "calibrate.json"):
        assert not (run_dir / name).exists()


def test_missing_simulations(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run")
    (run_dir / "simulations.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=r"simulations\.parquet.*run the simulate stage"):
        calibrate.run(CalibrateConfig(), run_dir, progress=False)
    _no_outputs(run_dir)


def test_corrupt_parquet_names_the_file(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run")
    path = run_dir / "simulations.parquet"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"simulations\.parquet: not a readable parquet"):
        calibrate.run(CalibrateConfig(), run_dir, progress=False)
    (run_dir / "contexts.parquet").write_bytes(b"not parquet at all")
    make_run(tmp_path / "fresh")
    path.write_bytes((tmp_path / "fresh" / "simulations.parquet").read_bytes())
    with pytest.raises(ValueError, match=r"contexts\.parquet: not a readable parquet"):
        calibrate.run(CalibrateConfig(), run_dir, progress=False)
    _no_outputs(run_dir)


def _edit_sims(run_dir: Path, **columns: pl.Expr) -> None:
    path = run_dir / "simulations.parquet"
    pl.read_parquet(path).with_columns(**columns).write_parquet(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            {
                "expected_value": pl.when((pl.col("latent") == 7) & (pl.col("context_id") == 5))
                .then(float("nan"))
                .otherwise(pl.col("expected_value"))
            },
            r"expected_value is NaN or missing \(latent 7, context 5",
        ),
        ({"expected_value": pl.col("expected_value") + 20}, r"outside \[0, 9\]"),
        ({"true_activation": pl.col("true_activation") - 100}, "true_activation"),
        ({"latent": pl.col("latent") + 1000}, r"absent from .*stats\.parquet"),
        ({"context_id": pl.col("context_id") + 1}, r"context 240 is not in .*contexts\.parquet"),
    ],
)
def test_bad_simulations(tmp_path: Path, edit: dict[str, pl.Expr], message: str) -> None:
    run_dir = make_run(tmp_path / "run")
    _edit_sims(run_dir, **edit)
    with pytest.raises(ValueError, match=message):
        calibrate.run(CalibrateConfig(), run_dir, progress=False)
    _no_outputs(run_dir)


def test_unknown_split(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run")
    path = run_dir / "contexts.parquet"
    ctx = pl.read_parquet(path)
    ctx.with_columns(
        split=pl.when(pl.col("context_id") == 3).then(pl.lit("test")).otherwise("split")
    ).write_parquet(path)
    with pytest.raises(ValueError, match=r"contexts\.parquet: unknown split value\(s\) \['test'\]"):
        calibrate.run(CalibrateConfig(), run_dir, progress=False)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="unknown calibration method 'logistic'"):
        CalibrateConfig(methods=("quantile", "logistic"))
    with pytest.raises(ValueError, match="gate_specificity"):
        CalibrateConfig(gate_specificity=0.0)
    with pytest.raises(ValueError, match="sim_quantiles"):
        CalibrateConfig(sim_quantiles=1)
    with pytest.raises(ValueError, match="twice"):
        CalibrateConfig(methods=("gate", "gate"))
    assert CalibrateConfig(methods=["gate"]).methods == ("gate",)  # type: ignore[arg-type]


def test_skip_resume_and_overwrite(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "run")
    cfg = CalibrateConfig(methods=("uncalibrated", "gate"))
    first = calibrate.run(cfg, run_dir, progress=False)
    out = run_dir / "calibration.parquet"
    stamp = out.stat().st_mtime_ns
    again = calibrate.run(cfg, run_dir, progress=False)  # skipped: nothing rewritten
    assert again.equals(first, null_equal=True) and out.stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="overwrite=True"):
        calibrate.run(CalibrateConfig(), run_dir, progress=False)
    assert out.stat().st_mtime_ns == stamp
    # replaced with overwrite
    full = calibrate.run(CalibrateConfig(), run_dir, overwrite=True, progress=False)
    assert full.height == len(LATENTS) * 4
    assert json.loads((run_dir / "calibrate.json").read_text())["config"]["methods"] == list(
        calibrate.METHODS
    )
    # a lost output with the same config and inputs is made again
    (run_dir / "calibration_fits.parquet").unlink()
    calibrate.run(CalibrateConfig(), run_dir, progress=False)
    assert (run_dir / "calibration_fits.parquet").is_file()
    # new inputs (a re-run simulate stage) are not silently calibrated over
    _edit_sims(run_dir, expected_value=pl.col("expected_value") * 0.5)
    with pytest.raises(FileExistsError, match="other inputs"):
        calibrate.run(CalibrateConfig(), run_dir, progress=False)


def test_shuffled_control_is_calibrated_like_the_real_simulations(tmp_path: Path) -> None:
    # The control's simulations (here: the real scores of a derangement of the latents) go
    # through the very same calibration as a run whose simulations they were.
    run_dir = make_run(tmp_path / "run")
    sims = pl.read_parquet(run_dir / "simulations.parquet")
    source = dict(zip(LATENTS, LATENTS[1:] + LATENTS[:1], strict=True))
    # latent l gets the scores its source latent was given
    donors = sims.select(
        pl.col("latent").replace_strict({v: k for k, v in source.items()}, return_dtype=pl.Int32),
        "context_id",
        pl.col("expected_value").alias("donated"),
    )
    control = (
        sims.join(donors, on=["latent", "context_id"])
        .with_columns(
            pl.col("donated").alias("expected_value"),
            pl.col("latent").replace_strict(source, return_dtype=pl.Int32).alias("explanation_of"),
        )
        .drop("donated")
    )
    control.write_parquet(run_dir / "simulations_shuffled.parquet")
    cfg = CalibrateConfig(gate_budget=0.05)
    calibrate.run(cfg, run_dir, progress=False)
    got = pl.read_parquet(run_dir / "calibration_shuffled.parquet")
    assert got.schema == pl.Schema(calibrate.OUTPUT_SCHEMA)
    record = json.loads((run_dir / "calibrate.json").read_text())
    assert record["shuffled"]["n_latents"] == len(LATENTS)
    assert set(record["shuffled"]["mean_metrics"]) == set(calibrate.METHODS)
    # The same as calibrating a run whose simulations are the control's.
    alone = make_run(tmp_path / "alone")
    control.drop("explanation_of").write_parquet(alone / "simulations.parquet")
    calibrate.run(cfg, alone, progress=False)
    assert got.equals(pl.read_parquet(alone / "calibration.parquet"))
    # The real calibration is untouched by the control beside it.
    plain = make_run(tmp_path / "plain")
    calibrate.run(cfg, plain, progress=False)
    assert pl.read_parquet(plain / "calibration.parquet").equals(
        pl.read_parquet(run_dir / "calibration.parquet")
    )


def test_the_budget_only_tightens_the_gate(tmp_path: Path) -> None:
    # 4 simulated latents, k = 8: a budget of k/2 = 4 false positives per context would allow
    # every latent to be active everywhere (specificity 0); the floor keeps 0.9.
    assert calibrate.gate_specificity(0.5, K, len(LATENTS)) == 0.0
    assert calibrate.gate_specificity(0.5, K, len(LATENTS), 0.9) == 0.9
    assert calibrate.gate_specificity(0.25, 32, 8192, 0.9) == pytest.approx(1 - 8 / 8192)
    run_dir = make_run(tmp_path / "run")
    calibrate.run(CalibrateConfig(gate_budget=0.5), run_dir, progress=False)
    record = json.loads((run_dir / "calibrate.json").read_text())
    assert record["gate_specificity"] == 0.9
    # A floor of ~0 and a budget as large as the latents: the gate passes almost everything
    # (its threshold just above the lowest inactive calibration score), no error.
    other = make_run(tmp_path / "other")
    calibrate.run(
        CalibrateConfig(gate_budget=0.5, gate_min_specificity=1e-9), other, progress=False
    )
    sims = sims_of(other).filter((pl.col("latent") == 3) & ~pl.col("is_eval"))
    inactive = sims.filter(pl.col("true_activation") == 0)["expected_value"].to_numpy()
    fits = pl.read_parquet(other / "calibration_fits.parquet").filter(pl.col("latent") == 3)
    assert fits["gate_threshold"].item() <= np.nextafter(inactive.min(), np.float32(np.inf))
    with pytest.raises(ValueError, match="gate_min_specificity"):
        CalibrateConfig(gate_min_specificity=0.0)


def test_every_configured_method_is_registered() -> None:
    from nlrw.calibrations import CALIBRATIONS
    from nlrw.config.calibrate import METHODS

    assert set(METHODS) == set(CALIBRATIONS)
