"""``evaluate.positions = "all"`` on a tiny random model: every condition rewritten at every
position of the window against independent forward hooks, the per-position calibration, and
the inputs it refuses.

The run directory is :func:`test_evaluate.make_run`'s, plus what the all-at-once simulate
layout and the calibrate stage would leave: ``simulations.parquet`` and
``simulations_positions.parquet`` whose ratings are ``E = 9 · a / max`` of the true activation
``a`` at every position (so the ``uncalibrated`` map ``E / 9 · max`` returns the truth), a
``simulate.json`` recording the layout, the cache's statistics over every position, and the
real calibrate stage run on them.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F

from nlrw import calibrate, evaluate
from nlrw.config.calibrate import CalibrateConfig
from nlrw.config.simulate import SimulateConfig
from nlrw.evaluate import EvaluateConfig
from nlrw.evaluate.positions import position_ids
from nlrw.lib.io import atomic_write_json
from nlrw.lib.provenance import stage_record
from nlrw.model.sparse import SparseCoder
from nlrw.model.subject import Subject, get_hookpoint
from nlrw.pipeline import RunConfig, preflight
from test_evaluate import CTX_LEN, HOOK, N_EVAL, SIMULATED, make_run

torch.set_num_threads(1)

ALL = EvaluateConfig(
    positions="all",
    fractions=(0.5, 1.0),
    n_trials=2,
    n_bootstrap=100,
    n_permutations=200,
    part_size=4,
    batch_size=64,
    progress=False,
)


def windows(run_dir: Path, split: str | None = "eval") -> tuple[torch.Tensor, torch.Tensor]:
    table = pl.read_parquet(run_dir / "contexts.parquet").sort("context_id")
    if split is not None:
        table = table.filter(pl.col("split") == split)
    return torch.tensor(table["input_ids"].to_list()), torch.tensor(table["target_id"].to_list())


def dense_topk(coder: SparseCoder, src: torch.Tensor) -> torch.Tensor:
    """``[..., num_latents]`` the true latents, written out independently of the coder's
    encode: relu(W_enc src' + b_enc) with all but the k largest of each row set to 0 (src' =
    src - b_dec for an SAE, whose encoder subtracts it)."""
    if coder.cfg.kind == "sae":
        src = src - coder.b_dec
    pre = torch.relu(src @ coder.encoder.weight.T + coder.encoder.bias)
    top = pre.topk(coder.k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, top.values)


def _output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def coder_sources(subject: Subject, coder: SparseCoder, ids: torch.Tensor) -> torch.Tensor:
    """``[contexts, ctx_len, d]`` what the coder reads at every position of the clean model:
    the MLP's input for a transcoder, the layer's output for an SAE."""
    seen: list[torch.Tensor] = []
    sae = coder.cfg.kind == "sae"
    module = get_hookpoint(subject.model, HOOK[coder.cfg.kind])
    handle = module.register_forward_hook(
        lambda _m, args, out: seen.append((_output(out) if sae else args[0]).detach())
    )
    try:
        with torch.no_grad():
            subject.model(input_ids=ids)
    finally:
        handle.remove()
    return seen[0]


def hooked_window_ce(
    subject: Subject,
    replace: Any,
    ids: torch.Tensor,
    targets: torch.Tensor,
    hookpoint: str = HOOK["transcoder"],
) -> np.ndarray:
    """Per context, the mean next-token CE over the window with a plain forward hook making
    ``replace(x, y)`` the module's output at every position (``None``: no hook)."""

    def hook(_m: Any, args: tuple[Any, ...], output: Any) -> Any:
        new = replace(args[0], _output(output))
        return (new, *output[1:]) if isinstance(output, tuple) else new

    module = get_hookpoint(subject.model, hookpoint)
    handle = module.register_forward_hook(hook) if replace is not None else None
    try:
        with torch.no_grad():
            logits = subject.model(input_ids=ids).logits
    finally:
        if handle is not None:
            handle.remove()
    labels = torch.cat([ids[:, 1:], targets[:, None]], dim=1)
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    return ce.view(ids.shape).mean(1).double().numpy()


def write_all_at_once(run_dir: Path, subject: Subject, coder: SparseCoder) -> None:
    """What an all-at-once simulate and the cache would leave (module docstring)."""
    ids, _ = windows(run_dir, None)
    with torch.no_grad():
        true = dense_topk(coder, coder_sources(subject, coder, ids)).numpy()  # [ctx, T, latents]
    peak = true.max(axis=(0, 1))
    active = true > 0
    count = active.sum(axis=(0, 1))
    tables = np.zeros((coder.num_latents, 11), np.float32)
    for latent in np.flatnonzero(count):
        values = true[..., latent][active[..., latent]]
        tables[latent] = np.quantile(values, np.linspace(0, 1, 11))
    n_tokens = true.shape[0] * true.shape[1]
    pl.DataFrame(
        {
            "latent": np.arange(coder.num_latents, dtype=np.int32),
            "count": count,
            "frequency": count / n_tokens,
            "max": peak,
            "mean": np.divide(
                true.sum(axis=(0, 1)), count, out=np.zeros(coder.num_latents), where=count > 0
            ).astype(np.float32),
            "n_active_windows": count,
            "reference_frequency": count / n_tokens,
            "reference_max": peak,
            "active_quantiles": pl.Series(tables.tolist(), dtype=pl.List(pl.Float32)),
        }
    ).write_parquet(run_dir / "latents" / "stats.parquet")
    sim = true[..., SIMULATED]  # [ctx, T, N]
    score = np.where(peak[SIMULATED] > 0, 9 * sim / np.maximum(peak[SIMULATED], 1e-12), 0)
    n_ctx = ids.shape[0]
    latent = np.repeat(SIMULATED, n_ctx)
    context = np.tile(np.arange(n_ctx), len(SIMULATED))
    last = score[:, -1, :].T.reshape(-1)  # latent-major
    pl.DataFrame(
        {
            "latent": latent.astype(np.int32),
            "context_id": context.astype(np.int32),
            "expected_value": last.astype(np.float32),
            "true_activation": sim[:, -1, :].T.reshape(-1).astype(np.float32),
        }
    ).write_parquet(run_dir / "simulations.parquet")
    per_position = score.transpose(2, 0, 1).reshape(-1)  # latent, context, position
    pl.DataFrame(
        {
            "latent": np.repeat(latent, CTX_LEN).astype(np.int32),
            "context_id": np.repeat(context, CTX_LEN).astype(np.int32),
            "position": np.tile(np.arange(CTX_LEN), len(latent)).astype(np.int32),
            "expected_value": per_position.astype(np.float32),
            "digit_mass": np.ones(per_position.size, np.float32),
        }
    ).write_parquet(run_dir / "simulations_positions.parquet")
    simulate_cfg = SimulateConfig(layout="all-at-once")
    atomic_write_json(run_dir / "simulate.json", stage_record("simulate", simulate_cfg))
    (run_dir / "calibration.parquet").unlink()
    calibrate.run(CalibrateConfig(min_calibration_contexts=1), run_dir, progress=False)


@pytest.fixture(scope="module")
def all_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Subject, SparseCoder]:
    run_dir, subject, coder = make_run(tmp_path_factory.mktemp("eval_positions"))
    write_all_at_once(run_dir, subject, coder)
    evaluate.run(ALL, run_dir, hookpoint=HOOK["transcoder"], model="tiny", subject=subject)
    return run_dir, subject, coder


def ce_of(run_dir: Path, condition: str, **keys: Any) -> np.ndarray:
    rows = pl.read_parquet(run_dir / "eval" / "results.parquet")
    rows = rows.filter(pl.col("condition") == condition)
    for name, value in keys.items():
        rows = rows.filter(pl.col(name) == value)
    return rows.group_by("context_id").agg(pl.col("ce").mean()).sort("context_id")["ce"].to_numpy()


def test_baselines_equal_plain_hooks_at_every_position(all_run) -> None:
    run_dir, subject, coder = all_run
    ids, targets = windows(run_dir)
    skip = coder.W_skip
    assert skip is not None
    with torch.no_grad():
        clean = hooked_window_ce(subject, None, ids, targets)
        tc = hooked_window_ce(subject, lambda x, y: coder(x.flatten(0, 1)).view_as(y), ids, targets)
        zero = hooked_window_ce(subject, lambda x, y: coder.b_dec + x @ skip.T, ids, targets)
    np.testing.assert_allclose(ce_of(run_dir, "clean"), clean, rtol=1e-5)
    np.testing.assert_allclose(ce_of(run_dir, "transcoder"), tc, rtol=1e-5)
    np.testing.assert_allclose(ce_of(run_dir, "zero_ablation"), zero, rtol=1e-5)
    assert np.abs(tc - clean).min() > 1e-4 and np.abs(zero - tc).min() > 1e-4


def test_exact_ratings_at_every_position_reproduce_the_transcoder(all_run) -> None:
    """E = 9·a/max mapped by E/9·max is the truth at every position: every simulated row of
    the uncalibrated map is the transcoder, so values sit at the right (context, position)."""
    run_dir, _, _ = all_run
    tc = ce_of(run_dir, "transcoder")
    for fraction in ALL.fractions:
        for choice in ALL.choices:
            got = ce_of(
                run_dir, "simulated", calibration="uncalibrated", fraction=fraction, choice=choice
            )
            np.testing.assert_allclose(got, tc, rtol=1e-5)


def test_matched_zero_equals_zeroing_the_simulated_latents_at_every_position(all_run) -> None:
    run_dir, subject, coder = all_run
    ids, targets = windows(run_dir)
    skip = coder.W_skip
    assert skip is not None

    def zeroed(x: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
        z = dense_topk(coder, x)
        z[..., SIMULATED] = 0.0
        return z @ coder.W_dec + coder.b_dec + x @ skip.T

    want = hooked_window_ce(subject, zeroed, ids, targets)
    got = ce_of(run_dir, "matched_zero", calibration="uncalibrated", fraction=1.0, choice="top")
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert np.abs(want - ce_of(run_dir, "transcoder")).min() > 1e-4


def test_the_last_position_differs_from_the_window_mean(all_run, tmp_path: Path) -> None:
    """The same run evaluated at the last position only gives other losses (the mean over
    the window is not the last position's), and records one position per context."""
    run_dir, subject, _ = all_run
    copy = Path(shutil.copytree(run_dir, tmp_path / "run"))
    shutil.rmtree(copy / "eval")
    last = dataclasses.replace(ALL, positions="last", synthetic_qualities=())
    evaluate.run(last, copy, hookpoint=HOOK["transcoder"], model="tiny", subject=subject)
    assert not np.allclose(ce_of(copy, "clean"), ce_of(run_dir, "clean"))
    assert json.loads((copy / "eval.json").read_text())["positions_per_context"] == 1


def test_record_and_summary(all_run) -> None:
    run_dir, _, _ = all_run
    record = json.loads((run_dir / "eval.json").read_text())
    assert record["config"]["positions"] == "all"
    assert record["positions_per_context"] == CTX_LEN
    assert "left out" in record["synthetic"]
    summary = pl.read_parquet(run_dir / "eval" / "summary.parquet")
    assert "synthetic" not in summary["condition"].to_list()
    assert set(summary["calibration"].drop_nulls()) == set(CalibrateConfig().methods)


def test_position_ids_are_context_major() -> None:
    assert position_ids([3, 5], 4).tolist() == [12, 13, 14, 15, 20, 21, 22, 23]


def test_per_position_calibration_maps_every_position(all_run) -> None:
    run_dir, _, coder = all_run
    table = calibrate.calibrate_positions(
        CalibrateConfig(min_calibration_contexts=1), run_dir, k=coder.k
    )
    assert table.columns == list(calibrate.POSITIONS_SCHEMA)
    for name in CalibrateConfig().methods:
        part = table.filter(pl.col("calibration") == name)
        assert part.height == len(SIMULATED) * N_EVAL * CTX_LEN
        assert set(part["context_id"].unique().to_list()) == set(range(N_EVAL))
        assert (part["activation"] >= 0).all()


# ------------------------------------------------------------------------------------------
# Inputs it refuses
# ------------------------------------------------------------------------------------------


def _copy(all_run, tmp_path: Path) -> tuple[Path, Subject]:
    run_dir, subject, _ = all_run
    copy = Path(shutil.copytree(run_dir, tmp_path / "run"))
    shutil.rmtree(copy / "eval")
    (copy / "eval.json").unlink()
    return copy, subject


def test_another_layout_is_refused_naming_it_and_the_command(all_run, tmp_path: Path) -> None:
    copy, subject = _copy(all_run, tmp_path)
    atomic_write_json(copy / "simulate.json", stage_record("simulate", SimulateConfig()))
    with pytest.raises(ValueError, match=r"'explanation-first'.*--simulate\.layout all-at-once"):
        evaluate.run(ALL, copy, hookpoint=HOOK["transcoder"], model="tiny", subject=subject)
    assert not (copy / "eval").exists()


def test_preflight_refuses_positions_all_without_the_layout() -> None:
    cfg = RunConfig(evaluate=EvaluateConfig(positions="all"))
    with pytest.raises(ValueError, match=r"--evaluate\.positions all.*'explanation-first'"):
        preflight(cfg, ["simulate", "evaluate"])
    preflight(dataclasses.replace(cfg, simulate=SimulateConfig(layout="all-at-once")), ["evaluate"])
    with pytest.raises(ValueError, match="positions must be 'last' or 'all'"):
        EvaluateConfig(positions="every")  # pyright: ignore[reportArgumentType]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda t: t.filter(pl.col("position") != 3), "not one per position"),
        (
            lambda t: t.with_columns(
                pl.when(pl.col("position") == 2)
                .then(pl.col("position") + 1)
                .otherwise(pl.col("position"))
            ),
            "does not have exactly the positions",
        ),
        (
            lambda t: t.with_columns(pl.col("expected_value") + 20.0),
            r"is not in \[0, 9\]",
        ),
        (None, "not found: only the all-at-once simulate layout"),
    ],
)
def test_a_broken_positions_file_is_named(all_run, tmp_path: Path, damage, message) -> None:
    copy, subject = _copy(all_run, tmp_path)
    path = copy / "simulations_positions.parquet"
    if damage is None:
        path.unlink()
    else:
        damage(pl.read_parquet(path)).write_parquet(path)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as error:
        evaluate.run(ALL, copy, hookpoint=HOOK["transcoder"], model="tiny", subject=subject)
    assert "simulations_positions.parquet" in str(error.value)
    assert not (copy / "eval.json").exists()


def test_shuffled_control_at_every_position(all_run, tmp_path: Path) -> None:
    """A shuffled control whose simulator rated 0 at every position: its rows of the
    uncalibrated map zero every simulated latent at every position, i.e. matched_zero."""
    copy, subject = _copy(all_run, tmp_path)
    zero = pl.col("expected_value") * 0.0
    sims = pl.read_parquet(copy / "simulations.parquet").with_columns(zero)
    sims.with_columns(explanation_of=pl.col("latent")).write_parquet(
        copy / "simulations_shuffled.parquet"
    )
    positions = pl.read_parquet(copy / "simulations_positions.parquet").with_columns(zero)
    positions.write_parquet(copy / "simulations_shuffled_positions.parquet")
    calibrate.run(CalibrateConfig(min_calibration_contexts=1), copy, overwrite=True, progress=False)
    cfg = dataclasses.replace(ALL, shuffled=True, choices=("top",))
    evaluate.run(cfg, copy, hookpoint=HOOK["transcoder"], model="tiny", subject=subject)
    keys = {"calibration": "uncalibrated", "fraction": 1.0, "choice": "top"}
    np.testing.assert_allclose(
        ce_of(copy, "shuffled", **keys), ce_of(copy, "matched_zero", **keys), rtol=1e-5
    )
    np.testing.assert_allclose(ce_of(copy, "simulated", **keys), ce_of(copy, "transcoder"), 1e-5)


def test_an_sae_on_the_residual_stream_at_every_position(tmp_path: Path) -> None:
    run_dir, subject, coder = make_run(tmp_path, "sae")
    write_all_at_once(run_dir, subject, coder)
    cfg = dataclasses.replace(ALL, choices=("top",), controls=())
    evaluate.run(cfg, run_dir, hookpoint=HOOK["sae"], model="tiny", subject=subject)
    ids, targets = windows(run_dir)

    def recon(_x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return dense_topk(coder, y) @ coder.W_dec + coder.b_dec

    with torch.no_grad():
        sae = hooked_window_ce(subject, recon, ids, targets, HOOK["sae"])
        zero = hooked_window_ce(
            subject, lambda _x, y: coder.b_dec.expand_as(y), ids, targets, HOOK["sae"]
        )
    np.testing.assert_allclose(ce_of(run_dir, "transcoder"), sae, rtol=1e-5)
    np.testing.assert_allclose(ce_of(run_dir, "zero_ablation"), zero, rtol=1e-5)
    exact = ce_of(run_dir, "simulated", calibration="uncalibrated", fraction=1.0, choice="top")
    np.testing.assert_allclose(exact, sae, rtol=1e-5)
