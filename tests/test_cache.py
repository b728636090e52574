"""The cache stage: latents, stats, quantiles and top windows against brute force; resume."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from nlrw import cache
from nlrw.cache import CacheConfig
from nlrw.model import sparse
from nlrw.model.quantiles import load_tables, probabilities
from nlrw.model.shards import ShardReader
from nlrw.pipeline import load_preset, run

HOOK = "model.layers.1.mlp"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("cache_smoke")
    run(load_preset("smoke"), run_dir, log=lambda _: None)
    return run_dir


@pytest.fixture(scope="module")
def cfg() -> CacheConfig:
    return load_preset("smoke").cache


@pytest.fixture(scope="module")
def dense(smoke: Path) -> np.ndarray:
    """Brute force: the dense latents [rows, L] of every eval row, in one batch."""
    rows = np.concatenate(list(ShardReader(smoke / "activations" / "eval", batch_rows=4096)))
    coder = sparse.load(smoke / "transcoder" / HOOK)
    with torch.no_grad():
        values, indices = coder.encode(torch.from_numpy(rows[:, : coder.d_in]).contiguous())
    z = np.zeros((rows.shape[0], coder.num_latents), np.float32)
    np.put_along_axis(z, indices.numpy(), values.numpy(), axis=1)
    return z


def _window_max(z: np.ndarray, ctx_len: int, window_len: int) -> np.ndarray:
    """[windows, L] max activation per complete window."""
    n_seq = z.shape[0] // ctx_len
    wps = ctx_len // window_len
    per_seq = z[: n_seq * ctx_len].reshape(n_seq, ctx_len, -1)[:, : wps * window_len]
    return per_seq.reshape(n_seq * wps, window_len, -1).max(axis=1)


def _copy_inputs(src: Path, dst: Path) -> Path:
    """A run directory holding only what the cache reads (activations/eval, the coder)."""
    (dst / "activations").mkdir(parents=True)
    shutil.copytree(src / "activations" / "eval", dst / "activations" / "eval")
    shutil.copytree(src / "transcoder" / HOOK, dst / "transcoder" / HOOK)
    return dst


def _outputs(run_dir: Path) -> dict[str, object]:
    out = run_dir / "latents"
    parts = sorted(out.glob("part-*.parquet"))
    return {
        "stats": pl.read_parquet(out / "stats.parquet"),
        "top": pl.read_parquet(out / "top_windows.parquet"),
        "quantiles": load_tables(out / "quantiles.safetensors").active,
        "positions": pl.read_parquet(out / "positions.parquet"),
        "parts": [pl.read_parquet(p) for p in parts],
        "parts.json": json.loads((out / "parts.json").read_text()),
    }


def _assert_same(a: dict[str, object], b: dict[str, object]) -> None:
    for key in ("stats", "top", "positions"):
        assert a[key].equals(b[key]), key  # type: ignore[union-attr]
    np.testing.assert_array_equal(a["quantiles"], b["quantiles"])  # type: ignore[arg-type]
    assert len(a["parts"]) == len(b["parts"])  # type: ignore[arg-type]
    for x, y in zip(a["parts"], b["parts"], strict=True):  # type: ignore[call-overload]
        assert x.equals(y)
    assert a["parts.json"] == b["parts.json"]


def test_stage_is_in_the_pipeline(smoke: Path) -> None:
    record = json.loads((smoke / "stages" / "cache.json").read_text())
    assert record["status"] == "done"
    assert record["summary"]["n_rows"] == 1024
    assert record["summary"]["exact_quantiles"] is True
    assert (smoke / "latents" / "cache.json").exists()
    # 4 chunks of 256 rows (8 sequences of 32), encoded in batches of 96 that straddle reads.
    assert len(list((smoke / "latents").glob("part-*.parquet"))) == 4


def test_stats_match_dense(smoke: Path, dense: np.ndarray, cfg: CacheConfig) -> None:
    stats = cache.read_stats(smoke)
    active = dense > 0
    count = active.sum(axis=0)
    np.testing.assert_array_equal(stats["count"].to_numpy(), count)
    np.testing.assert_allclose(stats["frequency"].to_numpy(), count / dense.shape[0])
    np.testing.assert_allclose(stats["max"].to_numpy(), dense.max(axis=0), rtol=1e-5)
    mean = np.where(count > 0, dense.sum(axis=0) / np.maximum(count, 1), 0)
    np.testing.assert_allclose(stats["mean"].to_numpy(), mean, rtol=1e-5)
    wmax = _window_max(dense, 32, cfg.window_len)
    np.testing.assert_array_equal(stats["n_active_windows"].to_numpy(), (wmax > 0).sum(axis=0))
    assert stats["active_quantiles"].dtype == pl.List(pl.Float32)


def _reference(dense: np.ndarray, cfg: CacheConfig, q: int) -> tuple[np.ndarray, np.ndarray]:
    """Frequency and active-value quantiles at the reference positions (>= window_len - 1
    of each 32-token sequence), by brute force."""
    ref = dense[np.arange(dense.shape[0]) % 32 >= cfg.window_len - 1]
    freq = (ref > 0).mean(axis=0)
    table = np.zeros((dense.shape[1], q))
    for latent in range(dense.shape[1]):
        x = ref[:, latent][ref[:, latent] > 0]
        if x.size:
            table[latent] = np.quantile(x.astype(np.float64), probabilities(q))
    return freq, table


def test_reference_is_exact_at_the_evaluated_kind_of_position(
    smoke: Path, dense: np.ndarray, cfg: CacheConfig
) -> None:
    freq, expected = _reference(dense, cfg, cfg.num_quantiles)
    stats = cache.read_stats(smoke)
    table = np.array(stats["active_quantiles"].to_list(), dtype=np.float32)
    saved = load_tables(smoke / "latents" / "quantiles.safetensors")
    assert saved.active is not None and saved.frequency is not None
    np.testing.assert_array_equal(table, saved.active)
    np.testing.assert_allclose(table, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stats["reference_frequency"].to_numpy(), freq, rtol=1e-6)
    np.testing.assert_allclose(saved.frequency, freq, rtol=1e-6)
    ref = dense[np.arange(dense.shape[0]) % 32 >= cfg.window_len - 1]
    np.testing.assert_allclose(stats["reference_max"].to_numpy(), ref.max(axis=0), rtol=1e-5)
    record = json.loads((smoke / "latents" / "cache.json").read_text())
    assert record["reference_tokens"] == ref.shape[0]
    positions = pl.read_parquet(smoke / "latents" / "positions.parquet")
    pos = np.arange(dense.shape[0]) % 32
    want_max = [dense[pos == p].max() for p in range(32)]
    np.testing.assert_allclose(positions["max"].to_numpy(), want_max, rtol=1e-5)
    assert positions["n_tokens"].to_list() == [dense.shape[0] // 32] * 32


def test_sketched_quantiles_are_close(
    smoke: Path, dense: np.ndarray, cfg: CacheConfig, tmp_path: Path
) -> None:
    run_dir = _copy_inputs(smoke, tmp_path)
    sketch_cfg = dataclasses.replace(cfg, exact_quantiles=False, sketch_alpha=0.01)
    result = cache.run(sketch_cfg, run_dir, hookpoint=HOOK)
    assert not result.exact_quantiles
    freq, expected = _reference(dense, cfg, cfg.num_quantiles)
    saved = load_tables(run_dir / "latents" / "quantiles.safetensors")
    assert saved.active is not None and saved.frequency is not None
    np.testing.assert_allclose(saved.active, expected, rtol=0.011, atol=1e-7)
    np.testing.assert_allclose(saved.frequency, freq, rtol=1e-6)


def test_top_windows_match_brute_force(smoke: Path, dense: np.ndarray, cfg: CacheConfig) -> None:
    wmax = _window_max(dense, 32, cfg.window_len)
    top = cache.read_top_windows(smoke)
    for latent in range(dense.shape[1]):
        col = wmax[:, latent]
        active = np.flatnonzero(col > 0)
        order = active[np.lexsort((active, -col[active]))][: cfg.max_examples]
        mine = top.filter(pl.col("latent") == latent).sort("rank")
        assert mine["window"].to_list() == order.tolist(), latent
        np.testing.assert_allclose(mine["max_activation"].to_numpy(), col[order], rtol=1e-5)
        assert mine["rank"].to_list() == list(range(order.size))


def test_window_activations_and_tokens(smoke: Path, dense: np.ndarray, cfg: CacheConfig) -> None:
    wl = cfg.window_len
    tokens = np.load(smoke / "activations" / "eval" / "tokens.npy")
    windows = np.array([0, 5, 127, 5, 42])
    got_tokens = cache.window_tokens(smoke, windows)
    flat = tokens.reshape(-1)  # ctx_len is a multiple of window_len here
    np.testing.assert_array_equal(got_tokens, flat[windows[:, None] * wl + np.arange(wl)])
    latent = int(np.argmax((dense > 0).sum(axis=0)))
    acts = cache.window_activations(smoke, latent, windows)
    expected = dense[windows[:, None] * wl + np.arange(wl), latent]
    np.testing.assert_allclose(acts, expected, rtol=1e-5)
    assert acts.shape == (5, wl) and acts.dtype == np.float32
    with pytest.raises(ValueError, match="window ids"):
        cache.window_tokens(smoke, [128])


def test_a_moved_run_directory_reads_its_own_activations(
    smoke: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache record's activations path is relative to the cwd of the run that wrote it:
    a copied run directory, read from another cwd, still finds its own tokens."""
    moved = tmp_path / "moved"
    shutil.copytree(smoke, moved)
    record = json.loads((moved / "latents" / "cache.json").read_text())
    record["activations"] = "runs/elsewhere/activations/eval"  # as a relative-path run writes
    (moved / "latents" / "cache.json").write_text(json.dumps(record))
    monkeypatch.chdir(tmp_path)
    windows = np.array([0, 3, 7])
    np.testing.assert_array_equal(
        cache.window_tokens(moved, windows), cache.window_tokens(smoke, windows)
    )


def test_random_inactive_windows_never_fire(
    smoke: Path, dense: np.ndarray, cfg: CacheConfig
) -> None:
    wmax = _window_max(dense, 32, cfg.window_len)
    stats = cache.read_stats(smoke)
    for latent in (0, 1, int(np.argmax(stats["count"].to_numpy()))):
        drawn = cache.random_inactive_windows(smoke, latent, 20, seed=3)
        inactive = int((wmax[:, latent] == 0).sum())
        assert drawn.size == min(20, inactive)
        assert np.unique(drawn).size == drawn.size
        assert (wmax[drawn, latent] == 0).all()
        np.testing.assert_array_equal(
            drawn, cache.random_inactive_windows(smoke, latent, 20, seed=3)
        )
        np.testing.assert_array_equal(
            cache.active_windows(smoke, latent), np.flatnonzero(wmax[:, latent] > 0)
        )


def test_resume_after_losing_the_last_part(smoke: Path, cfg: CacheConfig, tmp_path: Path) -> None:
    run_dir = _copy_inputs(smoke, tmp_path)
    cache.run(cfg, run_dir, hookpoint=HOOK)
    before = _outputs(run_dir)
    assert cache.run(cfg, run_dir, hookpoint=HOOK).skipped
    (run_dir / "latents" / "part-000003.parquet").unlink()
    result = cache.run(cfg, run_dir, hookpoint=HOOK)
    assert not result.skipped and result.parts_reused == 3
    _assert_same(before, _outputs(run_dir))
    _assert_same(before, _outputs(smoke))  # the pipeline's run of the same config


def test_resume_after_a_kill_midway(
    smoke: Path, cfg: CacheConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = _copy_inputs(smoke, tmp_path)
    write_part = cache._write_part
    calls = 0

    def dying(*args: object) -> str:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt
        return write_part(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(cache, "_write_part", dying)
    with pytest.raises(KeyboardInterrupt):
        cache.run(cfg, run_dir, hookpoint=HOOK)
    out = run_dir / "latents"
    assert not (out / "cache.json").exists() and not (out / "stats.parquet").exists()
    assert len(json.loads((out / "parts.json").read_text())["parts"]) == 2
    monkeypatch.setattr(cache, "_write_part", write_part)
    result = cache.run(cfg, run_dir, hookpoint=HOOK)
    assert result.parts_reused == 2
    _assert_same(_outputs(smoke), _outputs(run_dir))


def test_corrupt_part_is_remade(
    smoke: Path, cfg: CacheConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = _copy_inputs(smoke, tmp_path)
    cache.run(cfg, run_dir, hookpoint=HOOK)
    part = run_dir / "latents" / "part-000001.parquet"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    (run_dir / "latents" / "cache.json").unlink()
    with caplog.at_level(logging.WARNING, logger="nlrw.cache"):
        result = cache.run(cfg, run_dir, hookpoint=HOOK)
    assert result.parts_reused == 3
    assert "part-000001.parquet" in caplog.text
    _assert_same(_outputs(smoke), _outputs(run_dir))


def test_other_config_needs_overwrite(smoke: Path, cfg: CacheConfig, tmp_path: Path) -> None:
    run_dir = _copy_inputs(smoke, tmp_path)
    cache.run(cfg, run_dir, hookpoint=HOOK)
    (run_dir / "latents" / "cache.json").unlink()
    other = dataclasses.replace(cfg, chunk_rows=512)
    with pytest.raises(ValueError, match="overwrite"):
        cache.run(other, run_dir, hookpoint=HOOK)
    result = cache.run(other, run_dir, hookpoint=HOOK, overwrite=True)
    assert result.parts_reused == 0
    assert len(list((run_dir / "latents").glob("part-*.parquet"))) == 2
    # Same results whatever the chunking.
    a, b = _outputs(smoke), _outputs(run_dir)
    assert a["stats"].equals(b["stats"]) and a["top"].equals(b["top"])  # type: ignore[union-attr]


def test_width_mismatch_names_both(smoke: Path, cfg: CacheConfig, tmp_path: Path) -> None:
    run_dir = _copy_inputs(smoke, tmp_path)
    coder_dir = run_dir / "transcoder" / HOOK
    other = sparse.SparseCoder(
        sparse.SparseCoderConfig.create("transcoder", 48, k=4, num_latents=64)
    )
    other.save(coder_dir)
    with pytest.raises(ValueError) as e:
        cache.run(cfg, run_dir, hookpoint=HOOK)
    msg = str(e.value)
    assert str(coder_dir) in msg and str(run_dir / "activations" / "eval") in msg
    assert "d_in = 48" in msg and "width 128" in msg
    assert not (run_dir / "latents").exists()


def test_missing_activations(smoke: Path, cfg: CacheConfig, tmp_path: Path) -> None:
    run_dir = _copy_inputs(smoke, tmp_path)
    with pytest.raises(FileNotFoundError, match=r"activations/train"):
        cache.run(dataclasses.replace(cfg, source="train"), run_dir, hookpoint=HOOK)
    shutil.rmtree(run_dir / "activations" / "eval")
    with pytest.raises(FileNotFoundError, match="n_eval_tokens"):
        cache.run(cfg, run_dir, hookpoint=HOOK)
    assert not (run_dir / "latents").exists()


def test_readers_need_a_finished_cache(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run the cache stage"):
        cache.window_tokens(tmp_path, [0])


@pytest.mark.parametrize(
    ("field", "value"),
    [("source", "test"), ("window_len", 0), ("num_quantiles", 1), ("max_examples", -1)],
)
def test_config_validation(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        CacheConfig(**{field: value})  # type: ignore[arg-type]
