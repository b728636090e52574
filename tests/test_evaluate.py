"""The evaluate stage on tiny random models: every condition against an independent splice, the
KV-shared grid against full forward passes, statistics, resume and bad inputs.

The run directories are built here directly (no collect/train): a tiny Llama saved as a local
folder, a random coder saved where the pipeline puts it, hand-drawn windows written as
``contexts.parquet`` with their true latents from :func:`nlrw.contexts.context_activations`,
and a ``calibration.parquet`` made from the true activations (``exact``) and from perturbed
ones (``noisy``): legitimate inputs of the stage.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from nlrw import evaluate
from nlrw.contexts import SCHEMA as CONTEXTS_SCHEMA
from nlrw.contexts import ContextsConfig, context_activations, true_activations
from nlrw.evaluate import EvaluateConfig, Grid, grid_ce, grid_ce_full, topk_replace_torch
from nlrw.evaluate.grid import TAG_SYNTHETIC_FIXED
from nlrw.evaluate.synthetic import _normal_cdf
from nlrw.lib.io import atomic_write_json
from nlrw.lib.provenance import stage_record
from nlrw.lib.rundir import RunDir
from nlrw.model.sparse import SparseCoder, SparseCoderConfig
from nlrw.model.subject import Subject, get_hookpoint, load_subject
from nlrw.model.topk import topk_replace
from support import LAYER, MLP, WORD_VOCAB, save_tiny

torch.set_num_threads(1)

N_EVAL, N_CAL, CTX_LEN = 6, 2, 8
HOOK = {"transcoder": MLP["llama"].format(1), "sae": LAYER["llama"].format(1)}


def hookpoint_of(kind: str, arch: str) -> str:
    return (MLP if kind == "transcoder" else LAYER)[arch].format(1)


SIMULATED = np.arange(0, 64, 2)  # half the latents were "explained and simulated"
FAST = EvaluateConfig(
    fractions=(0.1, 0.5, 1.0),
    n_trials=2,
    n_bootstrap=200,
    n_permutations=500,
    part_size=4,
    batch_size=64,
    progress=False,
    synthetic_qualities=(0.5, 1.0),
    synthetic_fractions=(0.1, 1.0),
)
N_CONTROLS = len(evaluate.CONTROLS)


def random_coder(kind: str, d: int, *, k: int = 4, num_latents: int = 64, seed: int = 0):
    cfg = SparseCoderConfig(
        kind=kind,  # pyright: ignore[reportArgumentType]
        d_in=d,
        d_out=d,
        num_latents=num_latents,
        k=k,
        skip_connection=kind == "transcoder",
        encoder_subtracts_b_dec=kind == "sae",
    )
    coder = SparseCoder(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in coder.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return coder.eval()


def make_run(
    root: Path, kind: str = "transcoder", arch: str = "llama"
) -> tuple[Path, Subject, SparseCoder]:
    """A run directory with everything evaluate reads (see the module docstring)."""
    run_dir = root / "run"
    subject = load_subject(save_tiny(root / "model", arch), dtype="float32", device="cpu")
    hookpoint = hookpoint_of(kind, arch)
    coder = random_coder(kind, subject.model.config.hidden_size)
    coder.save(RunDir(run_dir).coder(hookpoint))
    g = torch.Generator().manual_seed(1)
    n = N_EVAL + N_CAL
    windows = torch.randint(3, WORD_VOCAB, (n, CTX_LEN + 1), generator=g)
    table = pl.DataFrame(
        {
            "context_id": list(range(n)),
            "split": ["eval"] * N_EVAL + ["calibration"] * N_CAL,
            "input_ids": windows[:, :-1].tolist(),
            "target_id": windows[:, -1].tolist(),
            "source": ["held-out"] * n,
            "document": list(range(n)),
            "offset": [0] * n,
        },
        schema=CONTEXTS_SCHEMA,
    )
    table.write_parquet(run_dir / "contexts.parquet")
    acts = context_activations(subject, coder, hookpoint, windows[:, :-1], batch_size=3)
    (run_dir / "contexts").mkdir()
    save_file(
        {
            "x": acts.x.contiguous(),
            "y": acts.y.contiguous(),
            "values": acts.values.contiguous(),
            "indices": acts.indices.to(torch.int32).contiguous(),
        },
        str(run_dir / "contexts" / "activations.safetensors"),
    )
    cfg = ContextsConfig(n_contexts=N_EVAL, n_calibration=N_CAL, ctx_len=CTX_LEN, sequence_len=32)
    atomic_write_json(run_dir / "contexts.json", stage_record("contexts", cfg))
    write_calibration(run_dir, SIMULATED)
    write_stats(run_dir, coder.num_latents)
    rng = np.random.default_rng(2)
    pl.DataFrame(
        {"latent": SIMULATED, "balanced_accuracy": rng.random(len(SIMULATED))}
    ).write_parquet(run_dir / "scores.parquet")
    return run_dir, subject, coder


def write_stats(run_dir: Path, num_latents: int) -> None:
    """``latents/stats.parquet`` as the cache writes it, from the true activations of every
    context (the cache's statistics of a held-out set; here the contexts are that set, so
    the max bounds every eval activation and the uncalibrated mapping can be exact)."""
    true = true_activations(run_dir, np.arange(num_latents), np.arange(N_EVAL + N_CAL))
    count = (true > 0).sum(1)
    mean = np.divide(true.sum(1), count, out=np.zeros(num_latents), where=count > 0)
    tables = np.zeros((num_latents, 11), np.float32)
    for latent in np.flatnonzero(count):
        tables[latent] = np.quantile(true[latent][true[latent] > 0], np.linspace(0, 1, 11))
    (run_dir / "latents").mkdir()
    pl.DataFrame(
        {
            "latent": np.arange(num_latents, dtype=np.int32),
            "count": count,
            "frequency": count / true.shape[1],
            "max": true.max(1),
            "mean": mean.astype(np.float32),
            "n_active_windows": count,
            "reference_frequency": count / true.shape[1],
            "reference_max": true.max(1),
            "active_quantiles": pl.Series(
                "active_quantiles", tables.tolist(), dtype=pl.List(pl.Float32)
            ),
        }
    ).write_parquet(run_dir / "latents" / "stats.parquet")


def write_calibration(run_dir: Path, latents: np.ndarray) -> None:
    """``exact``: the true activations; ``noisy``: a third of them zeroed, plus false positives."""
    ctx = np.arange(N_EVAL)
    true = true_activations(run_dir, latents, ctx)  # [latents, contexts]
    rng = np.random.default_rng(3)
    noisy = np.where(rng.random(true.shape) < 0.33, 0, true)
    noisy = noisy + (rng.random(true.shape) < 0.2) * rng.exponential(2.0, true.shape)
    frames = [
        pl.DataFrame(
            {
                "latent": np.repeat(latents, len(ctx)),
                "context_id": np.tile(ctx, len(latents)),
                "calibration": name,
                "activation": values.reshape(-1),
            },
            schema={
                "latent": pl.Int32,
                "context_id": pl.Int32,
                "calibration": pl.String,
                "activation": pl.Float32,
            },
        )
        for name, values in (("exact", true), ("noisy", noisy.astype(np.float32)))
    ]
    pl.concat(frames).write_parquet(run_dir / "calibration.parquet")


@pytest.fixture(scope="module")
def tc_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Subject, SparseCoder]:
    run_dir, subject, coder = make_run(tmp_path_factory.mktemp("eval_tc"))
    evaluate.run(FAST, run_dir, hookpoint=HOOK["transcoder"], model="tiny", subject=subject)
    return run_dir, subject, coder


def results_of(run_dir: Path) -> pl.DataFrame:
    return pl.read_parquet(run_dir / "eval" / "results.parquet")


def ce_of(results: pl.DataFrame, condition: str, **keys: Any) -> np.ndarray:
    rows = results.filter(pl.col("condition") == condition)
    for name, value in keys.items():
        rows = rows.filter(pl.col(name) == value)
    return rows.sort("context_id", "trial")["ce"].to_numpy()


def eval_windows(run_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    table = pl.read_parquet(run_dir / "contexts.parquet").filter(pl.col("split") == "eval")
    table = table.sort("context_id")
    return torch.tensor(table["input_ids"].to_list()), torch.tensor(table["target_id"].to_list())


def hooked_last_ce(
    subject: Subject, hookpoint: str, replace: Any, ids: torch.Tensor, targets: torch.Tensor
) -> np.ndarray:
    """CE at the last position with a plain forward hook: ``replace(x_last, y_last)`` becomes
    the module's output at the last position (``None``: no hook)."""

    def hook(_m: Any, args: tuple[Any, ...], output: Any) -> Any:
        y = output[0] if isinstance(output, tuple) else output
        new = y.clone()
        new[:, -1] = replace(args[0][:, -1], y[:, -1])
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = (
        get_hookpoint(subject.model, hookpoint).register_forward_hook(hook)
        if replace is not None
        else None
    )
    try:
        with torch.no_grad():
            logits = subject.model(input_ids=ids).logits
    finally:
        if handle is not None:
            handle.remove()
    return F.cross_entropy(logits[:, -1], targets, reduction="none").double().numpy()


# ------------------------------------------------------------------------------------------
# Conditions against independent computations
# ------------------------------------------------------------------------------------------


def test_clean_ce_is_the_transformers_loss_on_the_target(tc_run) -> None:
    run_dir, subject, _ = tc_run
    ids, targets = eval_windows(run_dir)
    full = torch.cat([ids, targets[:, None]], dim=1)
    expected = []
    for row in full:
        labels = torch.full_like(row, -100)
        labels[-1] = row[-1]  # only the target counts: predicted at the window's last token
        with torch.no_grad():
            out = subject.model(input_ids=row[None], labels=labels[None])
        expected.append(float(out.loss))
    np.testing.assert_allclose(ce_of(results_of(run_dir), "clean"), expected, rtol=1e-5)


def test_transcoder_and_zero_ablation_equal_plain_forward_hooks(tc_run) -> None:
    run_dir, subject, coder = tc_run
    ids, targets = eval_windows(run_dir)
    results = results_of(run_dir)
    hook = HOOK["transcoder"]
    with torch.no_grad():
        tc = hooked_last_ce(subject, hook, lambda x, y: coder(x), ids, targets)
        skip = coder.W_skip
        assert skip is not None
        zero = hooked_last_ce(subject, hook, lambda x, y: coder.b_dec + x @ skip.T, ids, targets)
    np.testing.assert_allclose(ce_of(results, "transcoder"), tc, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ce_of(results, "zero_ablation"), zero, rtol=1e-5, atol=1e-6)
    clean = ce_of(results, "clean")
    assert np.abs(tc - clean).max() > 1e-3 and np.abs(zero - tc).max() > 1e-3


def _manual_z(coder: SparseCoder, x: torch.Tensor) -> np.ndarray:
    """Dense true latents: relu(W_enc x + b_enc), all but the k largest set to zero."""
    pre = torch.relu(x @ coder.encoder.weight.T + coder.encoder.bias).numpy()
    z = np.zeros_like(pre)
    top = np.argsort(-pre, kind="stable")[: coder.k]
    z[top] = pre[top]
    return z


def _decode(coder: SparseCoder, z: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    assert coder.W_skip is not None
    return torch.from_numpy(z) @ coder.W_dec + coder.b_dec + x @ coder.W_skip.T


@pytest.mark.parametrize(
    ("calibration", "fraction", "choice"),
    [("noisy", 0.5, "top"), ("noisy", 1.0, "top"), ("noisy", 0.1, "random")],
)
def test_simulated_rows_equal_a_manual_rewrite(tc_run, calibration, fraction, choice) -> None:
    run_dir, subject, coder = tc_run
    ids, targets = eval_windows(run_dir)
    cal = pl.read_parquet(run_dir / "calibration.parquet").filter(
        pl.col("calibration") == calibration
    )
    scores = pl.read_parquet(run_dir / "scores.parquet")
    n_sel = max(1, int(np.floor(fraction * len(SIMULATED) + 0.5)))
    if choice == "top":  # best balanced accuracy first, ties by latent id
        chosen = scores.sort(["balanced_accuracy", "latent"], descending=[True, False])
        chosen_sets = [chosen["latent"].to_numpy()[:n_sel]]
    else:
        grid = Grid.build(
            dataclasses.replace(FAST, choices=("random",)),
            SIMULATED,
            {},
            np.arange(N_EVAL),
            balanced_accuracy=None,
            k=coder.k,
            num_latents=coder.num_latents,
        )
        chosen_sets = [SIMULATED[grid.order("random", t, 0)[:n_sel]] for t in range(2)]
    expected = manual_rewrite_ce(subject, coder, ids, targets, chosen_sets, [cal])
    got = (
        results_of(run_dir)
        .filter(
            (pl.col("condition") == "simulated")
            & (pl.col("calibration") == calibration)
            & (pl.col("fraction") == fraction)
            & (pl.col("choice") == choice)
        )
        .group_by("context_id")
        .agg(pl.col("ce").mean())
        .sort("context_id")["ce"]
        .to_numpy()
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert np.abs(got - ce_of(results_of(run_dir), "transcoder")).max() > 1e-4


def manual_rewrite_ce(
    subject: Subject,
    coder: SparseCoder,
    ids: torch.Tensor,
    targets: torch.Tensor,
    chosen_sets: list,
    tables: list[pl.DataFrame],
) -> np.ndarray:
    """CE of each context, averaged over ``chosen_sets``, when the chosen latents take their
    value from ``tables`` (``latent, context_id, activation``; a later table's value wins),
    top-k is re-applied, and the splice is a plain forward hook."""
    expected = np.zeros(len(ids))
    for chosen in chosen_sets:
        for c in range(len(ids)):
            sim_of: dict[int, float] = {}
            for table in tables:
                rows = table.filter(pl.col("context_id") == c).select("latent", "activation")
                sim_of.update(dict(rows.rows()))

            def rewrite(x: torch.Tensor, y: torch.Tensor, chosen=chosen, sim_of=sim_of):
                z = _manual_z(coder, x[0])
                for lat in chosen:
                    z[lat] = sim_of[int(lat)]
                keep = np.argsort(-z, kind="stable")[: coder.k]
                z2 = np.zeros_like(z)
                z2[keep] = np.maximum(z[keep], 0)
                return _decode(coder, z2, x[0])[None]

            with torch.no_grad():
                expected[c] += hooked_last_ce(
                    subject, HOOK["transcoder"], rewrite, ids[c : c + 1], targets[c : c + 1]
                )[0]
    return expected / len(chosen_sets)


def _chosen_sets(run_dir: Path, coder: SparseCoder, fraction: float, choice: str) -> list:
    """The latents a (fraction, choice) rewrites, per trial, computed from the inputs."""
    n_sel = max(1, int(np.floor(fraction * len(SIMULATED) + 0.5)))
    if choice == "top":  # best balanced accuracy first, ties by latent id
        scores = pl.read_parquet(run_dir / "scores.parquet")
        chosen = scores.sort(["balanced_accuracy", "latent"], descending=[True, False])
        return [chosen["latent"].to_numpy()[:n_sel]]
    grid = Grid.build(
        dataclasses.replace(FAST, choices=("random",)),
        SIMULATED,
        {},
        np.arange(N_EVAL),
        balanced_accuracy=None,
        k=coder.k,
        num_latents=coder.num_latents,
    )
    return [SIMULATED[grid.order("random", t, 0)[:n_sel]] for t in range(FAST.n_trials)]


def _mean_over_trials(results: pl.DataFrame, condition: str, **keys: Any) -> np.ndarray:
    rows = results.filter(pl.col("condition") == condition)
    for name, value in keys.items():
        rows = rows.filter(pl.col(name) == value)
    return rows.group_by("context_id").agg(pl.col("ce").mean()).sort("context_id")["ce"].to_numpy()


@pytest.mark.parametrize("condition", evaluate.CONTROLS)
@pytest.mark.parametrize(("fraction", "choice"), [(0.5, "top"), (1.0, "top"), (0.1, "random")])
def test_controls_equal_a_manual_rewrite(tc_run, condition, fraction, choice) -> None:
    """matched_zero: chosen latents 0; oracle_support: the simulated value where truly active;
    oracle_magnitude: where simulated > 0, the true value, or the cache's mean where the latent
    is not truly active. Top-k re-applied; the splice by a plain forward hook."""
    run_dir, subject, coder = tc_run
    ids, targets = eval_windows(run_dir)
    cal = pl.read_parquet(run_dir / "calibration.parquet").filter(pl.col("calibration") == "noisy")
    mean = pl.read_parquet(run_dir / "latents" / "stats.parquet").sort("latent")["mean"]
    mean = mean.to_numpy()
    chosen_sets = _chosen_sets(run_dir, coder, fraction, choice)
    expected = np.zeros(len(ids))
    for chosen in chosen_sets:
        for c in range(len(ids)):
            sim = cal.filter(pl.col("context_id") == c)
            sim_of = dict(zip(sim["latent"].to_list(), sim["activation"].to_list(), strict=True))

            def rewrite(x: torch.Tensor, y: torch.Tensor, chosen=chosen, sim_of=sim_of):
                z = _manual_z(coder, x[0])
                true = z.copy()
                for lat in chosen:
                    s, a = sim_of[int(lat)], true[lat]
                    if condition == "matched_zero":
                        z[lat] = 0.0
                    elif condition == "oracle_support":
                        z[lat] = s if a > 0 else 0.0
                    else:
                        z[lat] = (a if a > 0 else mean[lat]) if s > 0 else 0.0
                keep = np.argsort(-z, kind="stable")[: coder.k]
                z2 = np.zeros_like(z)
                z2[keep] = np.maximum(z[keep], 0)
                return _decode(coder, z2, x[0])[None]

            with torch.no_grad():
                expected[c] += hooked_last_ce(
                    subject, HOOK["transcoder"], rewrite, ids[c : c + 1], targets[c : c + 1]
                )[0]
    expected /= len(chosen_sets)
    results = results_of(run_dir)
    keys = {"calibration": "noisy", "fraction": fraction, "choice": choice}
    got = _mean_over_trials(results, condition, **keys)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    if fraction == 1.0:  # every simulated latent rewritten: the control changes the loss
        assert np.abs(got - ce_of(results, "transcoder")).max() > 1e-4
        assert np.abs(got - _mean_over_trials(results, "simulated", **keys)).max() > 1e-4


def test_controls_with_exact_calibration(tc_run) -> None:
    """With the true activations as simulations both oracles are the transcoder, and
    matched_zero at fraction 1 is the zero ablation of the simulated latents only."""
    run_dir, _, _ = tc_run
    results = results_of(run_dir)
    tc = ce_of(results, "transcoder")
    for condition in ("oracle_support", "oracle_magnitude"):
        rows = results.filter(
            (pl.col("condition") == condition) & (pl.col("calibration") == "exact")
        )
        for _, group in rows.group_by(["fraction", "choice", "trial"]):
            np.testing.assert_allclose(group.sort("context_id")["ce"].to_numpy(), tc, rtol=1e-6)
    zero = ce_of(results, "zero_ablation")
    matched = ce_of(results, "matched_zero", calibration="exact", fraction=1.0, choice="top")
    # odd latents were never simulated and keep their values: not the full zero ablation
    assert np.abs(matched - zero).max() > 1e-4 and np.abs(matched - tc).max() > 1e-4


def test_random_k_puts_the_true_values_on_seeded_random_latents(tc_run) -> None:
    run_dir, subject, coder = tc_run
    ids, targets = eval_windows(run_dir)
    cfg = dataclasses.replace(FAST, choices=("random",))
    grid = Grid.build(
        cfg, SIMULATED, {}, np.arange(N_EVAL), balanced_accuracy=None, k=4, num_latents=64
    )
    expected = []
    for c in range(len(ids)):
        drawn = grid.random_k_latents(c)
        assert len(set(drawn.tolist())) == coder.k

        def rewrite(x: torch.Tensor, y: torch.Tensor, drawn=drawn):
            z = _manual_z(coder, x[0])
            values = np.sort(z)[::-1][: coder.k]
            z2 = np.zeros_like(z)
            z2[drawn] = values
            return _decode(coder, z2, x[0])[None]

        with torch.no_grad():
            expected.append(
                hooked_last_ce(
                    subject, HOOK["transcoder"], rewrite, ids[c : c + 1], targets[c : c + 1]
                )[0]
            )
    np.testing.assert_allclose(ce_of(results_of(run_dir), "random_k"), expected, rtol=1e-5)


def test_true_values_as_calibration_reproduce_the_transcoder(tc_run) -> None:
    run_dir, _, _ = tc_run
    results = results_of(run_dir)
    tc = ce_of(results, "transcoder")
    exact = results.filter(
        (pl.col("calibration") == "exact") & (pl.col("condition") == "simulated")
    )
    assert exact.height == N_EVAL * len(FAST.fractions) * (1 + FAST.n_trials)
    for (fraction, choice, trial), rows in exact.group_by(["fraction", "choice", "trial"]):
        np.testing.assert_allclose(
            rows.sort("context_id")["ce"].to_numpy(),
            tc,
            rtol=1e-6,
            err_msg=str((fraction, choice, trial)),
        )
    # ... and a wrong calibration at fraction 1 does not.
    noisy = ce_of(results, "simulated", calibration="noisy", fraction=1.0, choice="top")
    assert np.abs(noisy - tc).max() > 1e-3


# ------------------------------------------------------------------------------------------
# The KV-shared grid against full forward passes
# ------------------------------------------------------------------------------------------


def _grid(run_dir: Path, cfg: EvaluateConfig, coder: SparseCoder) -> Grid:
    cal = pl.read_parquet(run_dir / "calibration.parquet")
    values = {}
    for name in ("exact", "noisy"):
        part = cal.filter(pl.col("calibration") == name).sort("context_id", "latent")
        values[name] = part["activation"].to_numpy().reshape(N_EVAL, len(SIMULATED))
    stats = pl.read_parquet(run_dir / "latents" / "stats.parquet").sort("latent")
    true = true_activations(run_dir, np.arange(coder.num_latents), np.arange(N_EVAL)).T
    synthetic, auroc = evaluate.synthetic_values(
        true,
        cfg.synthetic_qualities,
        cfg.synthetic_calibrations,
        max_activation=stats["reference_max"].to_numpy(),
        active_tables=np.array(stats["active_quantiles"].to_list(), dtype=np.float32),
        frequency=stats["reference_frequency"].to_numpy().astype(np.float32),
        seed=cfg.seed,
    )
    return Grid.build(
        cfg,
        SIMULATED,
        values,
        np.arange(N_EVAL),
        balanced_accuracy=np.random.default_rng(0).random(len(SIMULATED)),
        k=coder.k,
        num_latents=coder.num_latents,
        mean_active=stats["mean"].to_numpy()[SIMULATED],
        synthetic=evaluate.Synthetic(synthetic, auroc),
    )


@pytest.mark.parametrize(
    ("kind", "arch"),
    [("transcoder", "llama"), ("sae", "llama"), ("transcoder", "neox"), ("transcoder", "gpt2")],
)
def test_kv_grid_equals_naive_full_forwards(tmp_path: Path, kind: str, arch: str) -> None:
    """Llama, GPT-NeoX (the paper's Pythia: parallel residual) and GPT-2 (Conv1D, own cache)."""
    run_dir, subject, coder = make_run(tmp_path, kind, arch)
    hook = hookpoint_of(kind, arch)
    ids, targets = eval_windows(run_dir)
    for random in ("fixed", "per-context"):
        grid = _grid(run_dir, dataclasses.replace(FAST, random=random), coder)
        ctx = np.arange(N_EVAL)
        naive = grid_ce_full(subject.model, coder, hook, grid, ids, targets, ctx)
        batched = grid_ce_full(
            subject.model, coder, hook, grid, ids, targets, ctx, rows_per_forward=None
        )
        np.testing.assert_allclose(batched, naive, atol=1e-5, rtol=0)
        n_rows = len(grid.rows)
        # one context split over several batches; several contexts per batch, one partial
        for batch_size in (7, n_rows, 2 * n_rows + 5, 10_000):
            got = grid_ce(
                subject.model, coder, hook, grid, ids, targets, ctx, batch_size=batch_size
            )
            np.testing.assert_allclose(got, naive, atol=1e-5, rtol=0, err_msg=str(batch_size))
        grid.torch_topk = True  # the path a GPU takes
        got = grid_ce(subject.model, coder, hook, grid, ids, targets, ctx, batch_size=50)
        np.testing.assert_allclose(got, naive, atol=1e-5, rtol=0)
        assert np.ptp(naive, axis=1).min() > 1e-4  # the conditions really differ


def test_grid_runs_identical_rows_once(tmp_path: Path) -> None:
    """Rows that make the same replacement share one forward: every choice and trial at
    full coverage, and matched_zero across calibrations. grid_ce_full (every row) is the
    reference in test_kv_grid_equals_naive_full_forwards."""
    run_dir, _, coder = make_run(tmp_path)
    grid = _grid(run_dir, FAST, coder)
    canonical = grid.canonical_rows()
    rows = grid.rows
    for i, j in enumerate(canonical):
        a, b = rows[i], rows[j]
        assert j <= i and a.condition == b.condition and a.quality == b.quality
        if j != i:
            full = a.n_selected in (len(SIMULATED), coder.num_latents)
            assert full or a.condition == "matched_zero"
            assert full or (a.choice, a.trial, a.n_selected) == (b.choice, b.trial, b.n_selected)
    sim = [i for i, r in enumerate(rows) if r.condition == "simulated"]
    # per calibration: 2 fractions x (top + 2 trials) + one row for fraction 1
    assert len({canonical[i] for i in sim}) == 2 * (2 * 3 + 1)
    matched = [i for i, r in enumerate(rows) if r.condition == "matched_zero"]
    assert len({canonical[i] for i in matched}) == 2 * 3 + 1
    assert len(np.unique(canonical)) < len(rows) * 0.8


def test_sae_conditions_equal_plain_forward_hooks(tmp_path: Path) -> None:
    run_dir, subject, coder = make_run(tmp_path, "sae")
    summary = evaluate.run(FAST, run_dir, hookpoint=HOOK["sae"], model="tiny", subject=subject)
    ids, targets = eval_windows(run_dir)
    results = results_of(run_dir)
    with torch.no_grad():
        # The residual stream after layer 1 at the last position: replaced by its SAE
        # reconstruction W_dec topk(relu(W_enc (y - b_dec) + b_enc)) + b_dec, or by b_dec.
        def recon(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            pre = torch.relu((y - coder.b_dec) @ coder.encoder.weight.T + coder.encoder.bias)
            top = torch.topk(pre, coder.k, dim=-1)
            z = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
            return z @ coder.W_dec + coder.b_dec

        sae = hooked_last_ce(subject, HOOK["sae"], recon, ids, targets)
        zero = hooked_last_ce(
            subject, HOOK["sae"], lambda x, y: coder.b_dec.expand_as(y), ids, targets
        )
        clean = hooked_last_ce(subject, HOOK["sae"], None, ids, targets)
    np.testing.assert_allclose(ce_of(results, "transcoder"), sae, rtol=1e-5)
    np.testing.assert_allclose(ce_of(results, "zero_ablation"), zero, rtol=1e-5)
    np.testing.assert_allclose(ce_of(results, "clean"), clean, rtol=1e-5)
    exact = ce_of(results, "simulated", calibration="exact", fraction=1.0, choice="top")
    np.testing.assert_allclose(exact, sae, rtol=1e-6)
    record = json.loads((run_dir / "eval.json").read_text())
    assert record["coder_kind"] == "sae" and summary.height > 4


def test_topk_replace_torch_matches_the_rust_kernel() -> None:
    rng = np.random.default_rng(0)
    n, k, d = 20, 5, 30
    pre = np.round(rng.normal(size=(n, d)), 1).astype(np.float32)  # rounding makes ties
    pre[3] = -1  # a row with no positive entry: padded
    order = np.argsort(-np.maximum(pre, 0), axis=1, kind="stable")[:, :k]
    values = np.take_along_axis(np.maximum(pre, 0), order, 1)
    indices = order.astype(np.uint32)
    pairs = [(r, lat) for r in range(n) for lat in rng.choice(d, 6, replace=False)]
    rows = np.array([p[0] for p in pairs])
    lats = np.array([p[1] for p in pairs])
    new = np.round(rng.normal(size=len(pairs)), 1).astype(np.float32)
    ref_v, ref_i = topk_replace(values, indices, rows, lats, new, k, d)
    got_v, got_i = topk_replace_torch(
        torch.from_numpy(values),
        torch.from_numpy(indices.astype(np.int64)),
        torch.from_numpy(rows),
        torch.from_numpy(lats),
        torch.from_numpy(new),
        k,
        d,
    )
    np.testing.assert_array_equal(got_v.numpy(), ref_v)
    np.testing.assert_array_equal(got_i.numpy(), np.asarray(ref_i).astype(np.int64))


# ------------------------------------------------------------------------------------------
# Outputs, statistics, resume
# ------------------------------------------------------------------------------------------


def test_outputs_schema_grid_and_record(tc_run) -> None:
    run_dir, _, _ = tc_run
    results = results_of(run_dir)
    assert results.schema == pl.Schema(evaluate.RESULTS_SCHEMA)
    per_key = len(FAST.fractions) * (1 + FAST.n_trials)
    n_synthetic = len(FAST.synthetic_qualities) * len(FAST.synthetic_calibrations)
    assert FAST.synthetic_fractions is not None
    per_synthetic = len(FAST.synthetic_fractions) * (1 + FAST.n_trials)
    per_ctx = 4 + 2 * per_key * (1 + N_CONTROLS) + n_synthetic * per_synthetic
    assert results.height == N_EVAL * per_ctx
    assert results["context_id"].unique().sort().to_list() == list(range(N_EVAL))
    base = results.filter(pl.col("condition").is_in(evaluate.CONDITIONS[:4]))
    assert base["calibration"].null_count() == base.height and base["fraction"].null_count()
    synthetic = results.filter(pl.col("condition") == "synthetic")
    assert synthetic.height == N_EVAL * n_synthetic * per_synthetic
    assert sorted(synthetic["quality"].unique().to_list()) == [0.5, 1.0]
    assert results.filter(pl.col("condition") != "synthetic")["quality"].null_count() == (
        results.height - synthetic.height
    )
    summary = pl.read_parquet(run_dir / "eval" / "summary.parquet")
    assert summary.schema == pl.Schema(evaluate.SUMMARY_SCHEMA)
    per_summary = len(FAST.fractions) * 2
    per_synthetic_summary = len(FAST.synthetic_fractions) * 2
    assert summary.height == (
        4 + 2 * per_summary * (1 + N_CONTROLS) + n_synthetic * per_synthetic_summary
    )
    assert summary["condition"].to_list()[:4] == [
        "clean",
        "transcoder",
        "zero_ablation",
        "random_k",
    ]
    sim = summary.filter(pl.col("condition") == "simulated")
    assert sorted(set(sim["n_simulated_latents"].to_list())) == [3, 16, 32]  # of 32 simulated
    keys = ["calibration", "fraction", "choice", "n_trials", "n_simulated_latents"]
    for control in evaluate.CONTROLS:  # the same keys as the simulated rows
        assert summary.filter(pl.col("condition") == control).select(keys).equals(sim.select(keys))
    synth = summary.filter(pl.col("condition") == "synthetic")
    assert sorted(set(synth["n_simulated_latents"].to_list())) == [6, 64]  # of all 64
    assert set(sim.filter(pl.col("choice") == "random")["n_trials"].to_list()) == {2}
    record = json.loads((run_dir / "eval.json").read_text())
    assert record["stage"] == "evaluate" and record["config"]["fractions"] == [0.1, 0.5, 1.0]
    assert record["n_simulated_latents"] == len(SIMULATED)
    assert record["stored_latents_agreement"] == 1.0
    assert record["dtype"] == "float32" and "target_id" in record["predicted_token"]
    # latents never simulated (odd ids) that are active on eval contexts are counted
    acts = true_activations(run_dir, np.arange(64), np.arange(N_EVAL))
    active = np.flatnonzero((acts > 0).any(1))
    assert record["n_never_simulated_active_latents"] == int((active % 2 == 1).sum()) > 0
    # coverage: the simulated (even) latents' share of the true top-k mass on the eval contexts
    even = acts[np.arange(64) % 2 == 0].sum()
    assert record["coverage"] == pytest.approx(float(even / acts.sum()), rel=1e-5)
    assert 0 < record["coverage"] < 1


def test_coverage_is_the_simulated_share_of_the_top_k_mass() -> None:
    from nlrw.evaluate.inputs import coverage

    values = np.array([[3.0, 1.0, 0.0], [2.0, 2.0, 0.0]])
    indices = np.array([[5, 7, 9], [7, 8, 5]])
    assert coverage(values, indices, np.array([7])) == pytest.approx(3 / 8)
    assert coverage(values, indices, np.array([9])) == 0.0  # inactive slots carry no mass
    assert coverage(values, indices, np.array([5, 7, 8])) == 1.0
    assert coverage(np.zeros((2, 3)), indices, np.array([5])) == 0.0


def test_summary_statistics(tc_run) -> None:
    run_dir, _, _ = tc_run
    results = results_of(run_dir)
    summary = pl.read_parquet(run_dir / "eval" / "summary.parquet")
    zero = ce_of(results, "zero_ablation")
    row = summary.filter(
        (pl.col("calibration") == "noisy")
        & (pl.col("fraction") == 0.5)
        & (pl.col("choice") == "random")
    ).row(0, named=True)
    per_ctx = (
        ce_of(results, "simulated", calibration="noisy", fraction=0.5, choice="random")
        .reshape(N_EVAL, FAST.n_trials)
        .mean(1)
    )  # trials averaged per context first
    assert row["mean_ce"] == pytest.approx(per_ctx.mean())
    assert row["diff_vs_zero"] == pytest.approx((per_ctx - zero).mean())
    assert row["ci_low"] <= row["mean_ce"] <= row["ci_high"]
    assert row["diff_ci_low"] <= row["diff_vs_zero"] <= row["diff_ci_high"]
    assert 0 < row["p_value"] <= 1 and row["n_contexts"] == N_EVAL
    z = summary.filter(pl.col("condition") == "zero_ablation").row(0, named=True)
    assert z["diff_vs_zero"] == 0 and z["p_value"] == 1.0


def test_sign_flip_p_value_equals_exact_enumeration() -> None:
    rng = np.random.default_rng(0)
    diff = rng.normal(0.3, 1.0, size=8)
    signs = np.array(list(itertools.product([-1.0, 1.0], repeat=8)))
    observed = abs(diff.mean())
    exact = np.mean([abs((s * diff).mean()) >= observed - 1e-12 for s in signs])
    p = evaluate.paired_sign_flip_p(diff, signs)
    assert p == pytest.approx((1 + exact * len(signs)) / (1 + len(signs)))
    assert evaluate.paired_sign_flip_p(np.full(10, 2.0), signs[:0].reshape(0, 10) + 1) == 1.0
    always = np.full(12, 1.0)
    flips = np.random.default_rng(1).choice([-1.0, 1.0], size=(2000, 12))
    assert evaluate.paired_sign_flip_p(always, flips) < 0.01


def _summary_input(rng: np.random.Generator, n: int = 40) -> pl.DataFrame:
    """Results of five conditions on n contexts: zero ablation; the transcoder 0.4 nats
    better; ``equal`` within 0.01 of zero ablation; a random choice whose 4 trials sit at
    -0.3, -0.1, +0.1 and +0.3 from zero ablation on every context (the trial is all that
    varies); ``worse`` 0.5 nats above zero ablation."""
    zero = rng.normal(5.0, 0.5, n)
    frames = []

    def add(condition: str, ce: np.ndarray, choice: str | None = None, trial: int = 0) -> None:
        frames.append(
            pl.DataFrame(
                {
                    "condition": condition,
                    "calibration": None if choice is None else "quantile",
                    "quality": None,
                    "fraction": None if choice is None else 1.0,
                    "choice": choice,
                    "trial": trial,
                    "context_id": np.arange(n),
                    "ce": ce,
                },
                schema=evaluate.RESULTS_SCHEMA,
            )
        )

    add("zero_ablation", zero)
    add("transcoder", zero - 0.4 + rng.normal(0, 0.05, n))
    add("simulated", zero + rng.normal(0.0, 0.01, n), "top")
    for t, offset in enumerate((-0.3, -0.1, 0.1, 0.3)):
        add("simulated", zero + offset, "random", t)
    add("matched_zero", zero + 0.5 + rng.normal(0, 0.05, n), "top")
    return pl.concat(frames)


def test_summary_equivalence_holm_and_hierarchical_bootstrap() -> None:
    from nlrw.lib import statistics

    results = _summary_input(np.random.default_rng(0))
    summary = evaluate.summarize(results, n_bootstrap=1000, n_permutations=2000)
    assert summary.schema == pl.Schema(evaluate.SUMMARY_SCHEMA)
    per = {(r["condition"], r["choice"]): r for r in summary.iter_rows(named=True)}
    zero = results.filter(pl.col("condition") == "zero_ablation").sort("context_id")["ce"]
    tc = results.filter(pl.col("condition") == "transcoder").sort("context_id")["ce"]
    margin = 0.25 * (zero.mean() - tc.mean())  # pyright: ignore[reportOperatorIssue]
    assert summary["equivalence_margin"].unique().to_list() == [pytest.approx(margin)]
    equal = per[("simulated", "top")]
    diff = (
        results.filter((pl.col("choice") == "top") & (pl.col("condition") == "simulated"))
        .sort("context_id")["ce"]
        .to_numpy()
        - zero.to_numpy()
    )
    assert equal["p_equivalent"] == pytest.approx(statistics.tost_paired(diff, margin).p_value)
    assert equal["equivalent_to_zero"] is True and equal["p_equivalent_holm"] < 0.05
    better = per[("transcoder", None)]
    assert better["p_better"] < 0.01 and better["equivalent_to_zero"] is False
    worse = per[("matched_zero", "top")]
    assert worse["p_better"] > 0.99 and worse["equivalent_to_zero"] is False
    assert per[("zero_ablation", None)]["equivalent_to_zero"] is None
    # Holm over every row but zero ablation, one family per p-value column
    family = summary.filter(pl.col("condition") != "zero_ablation")
    for raw in ("p_value", "p_better", "p_equivalent"):
        np.testing.assert_allclose(
            family[f"{raw}_holm"].to_numpy(), statistics.holm(family[raw].to_numpy())
        )
    # The random choice: a bootstrap of the contexts alone has no width (every context has
    # the same trial mean); resampling the trials too gives an interval over them.
    rand = per[("simulated", "random")]
    assert rand["n_trials"] == 4 and rand["diff_vs_zero"] == pytest.approx(0.0, abs=1e-12)
    assert rand["diff_ci_low"] < -0.1 and rand["diff_ci_high"] > 0.1
    assert equal["diff_ci_high"] - equal["diff_ci_low"] < 0.02


def test_summary_margin_options_and_errors() -> None:
    results = _summary_input(np.random.default_rng(1))
    summary = evaluate.summarize(
        results, n_bootstrap=10, n_permutations=10, equivalence_margin_nats=0.001
    )
    assert summary["equivalence_margin"].unique().to_list() == [0.001]
    row = summary.filter(pl.col("choice") == "top", pl.col("condition") == "simulated")
    assert row["equivalent_to_zero"].to_list() == [False]  # 0.01 noise, 0.001 margin
    for option, value in (("equivalence_margin", 0.0), ("equivalence_margin_nats", -1.0)):
        with pytest.raises(ValueError, match=f"{option} must be > 0"):
            evaluate.summarize(results, n_bootstrap=10, n_permutations=10, **{option: value})
    # no transcoder row: no equivalence test, NaN and null rather than a made-up margin
    untested = evaluate.summarize(
        results.filter(pl.col("condition") != "transcoder"), n_bootstrap=10, n_permutations=10
    )
    assert untested["p_equivalent"].is_nan().all()
    assert untested["equivalent_to_zero"].null_count() == untested.height


@pytest.mark.parametrize("quality", [0.5, 0.6, 0.8, 0.95, 0.99])
def test_synthetic_generator_measures_its_target(quality: float) -> None:
    from nlrw.lib.metrics import auroc

    rng = np.random.default_rng(0)
    n, n_lat = 200, 60
    rate = rng.uniform(0.005, 0.3, n_lat)
    true = np.where(rng.random((n, n_lat)) < rate, rng.exponential(2.0, (n, n_lat)), 0.0)
    true[:, 0] = 0.0  # never active: no AUROC
    true[:2, 1], true[2:, 1] = 1.0, 0.0  # two active contexts
    scale = np.maximum(true.max(0), 1.0)
    noise = np.random.default_rng(1).standard_normal((n, n_lat))
    rounding = np.random.default_rng(2).random(n_lat)
    scores, measured = evaluate.synthetic_scores(true, quality, scale, noise, rounding)
    assert np.isnan(measured[0])
    for j in range(1, n_lat):
        active = true[:, j] > 0
        pairs = active.sum() * (~active).sum()
        if pairs == 0:
            assert np.isnan(measured[j])
            continue
        assert auroc(scores[:, j], active) == pytest.approx(measured[j], abs=1e-12)
        assert abs(measured[j] - quality) < 1.0 / pairs  # one of the two values around it
        nearest = evaluate.synthetic_scores(
            true[:, j : j + 1], quality, scale[j : j + 1], noise[:, j : j + 1]
        )[1]
        assert abs(nearest[0] - quality) <= 0.5 / pairs + 1e-12
        # among active contexts the scores follow the true activations
        order = np.argsort(true[active, j], kind="stable")
        assert (np.diff(scores[active, j][order]) >= 0).all()
    assert np.nanmean(measured) == pytest.approx(quality, abs=0.01)
    # inactive contexts' scores are the noise alone, at every quality
    np.testing.assert_array_equal(scores[:, 0], 9 * _normal_cdf(noise[:, 0]))


def test_synthetic_generator_exact_at_one_and_bad_quality() -> None:
    true = np.array([[0.0, 2.0], [1.0, 0.0], [3.0, 4.0]])
    scale = np.array([3.0, 8.0])
    scores, measured = evaluate.synthetic_scores(true, 1.0, scale, np.zeros_like(true))
    np.testing.assert_allclose(scores, 9 * true / scale)
    np.testing.assert_array_equal(measured, [1.0, 1.0])
    for bad in (0.49, 1.01):
        with pytest.raises(ValueError, match=r"synthetic_qualities .* \[0.5, 1\]"):
            evaluate.synthetic_scores(true, bad, scale, np.zeros_like(true))


def test_synthetic_rows(tc_run) -> None:
    """Quality 1 with the uncalibrated mapping (exact here: the cache's max bounds every
    eval activation) reproduces the transcoder at every fraction and choice; quality 0.5
    does not; the measured AUROCs are recorded."""
    run_dir, _, _ = tc_run
    results = results_of(run_dir)
    tc = ce_of(results, "transcoder")
    exact = results.filter(
        (pl.col("condition") == "synthetic")
        & (pl.col("quality") == 1.0)
        & (pl.col("calibration") == "uncalibrated")
    )
    assert FAST.synthetic_fractions is not None
    assert exact.height == N_EVAL * len(FAST.synthetic_fractions) * (1 + FAST.n_trials)
    for key, rows in exact.group_by(["fraction", "choice", "trial"]):
        np.testing.assert_allclose(
            rows.sort("context_id")["ce"].to_numpy(), tc, rtol=1e-5, err_msg=str(key)
        )
    for cal in FAST.synthetic_calibrations:
        half = ce_of(results, "synthetic", quality=0.5, calibration=cal, fraction=1.0, choice="top")
        assert np.abs(half - tc).max() > 1e-3, cal
    record = json.loads((run_dir / "eval.json").read_text())
    measured = record["synthetic_measured_auroc"]
    assert measured["1.0"] == 1.0 and abs(measured["0.5"] - 0.5) < 0.1  # 6 contexts
    assert record["synthetic_latents_with_both_classes"] > 0


@pytest.mark.parametrize(
    ("calibration", "choice"), [("quantile", "random"), ("uncalibrated", "top")]
)
def test_synthetic_rows_equal_a_manual_rewrite(tc_run, calibration: str, choice: str) -> None:
    """Quality 0.5 at fraction 0.1 of all 64 latents: the chosen latents (a seeded
    permutation of every latent, or the best measured synthetic AUROC first) take their
    calibrated synthetic values, top-k re-applied, spliced by a plain forward hook."""
    run_dir, subject, coder = tc_run
    ids, targets = eval_windows(run_dir)
    grid = _grid(run_dir, FAST, coder)
    assert grid.synthetic is not None
    values = grid.synthetic.values[(calibration, 0.5)]
    n_sel = max(1, int(np.floor(0.1 * coder.num_latents + 0.5)))
    trials = range(FAST.n_trials) if choice == "random" else range(1)
    expected = np.zeros(len(ids))
    for t in trials:
        if choice == "random":  # the synthetic family's own seeded permutation of all latents
            rng = np.random.default_rng([FAST.seed, TAG_SYNTHETIC_FIXED, t])
            chosen = rng.permutation(coder.num_latents)[:n_sel]
        else:
            a = grid.synthetic.auroc[0.5]
            key = np.where(np.isnan(a), -np.inf, a)
            chosen = np.lexsort((np.arange(len(a)), -key))[:n_sel]
        for c in range(len(ids)):

            def rewrite(x: torch.Tensor, y: torch.Tensor, chosen=chosen, c=c):
                z = _manual_z(coder, x[0])
                z[chosen] = values[c, chosen]
                keep = np.argsort(-z, kind="stable")[: coder.k]
                z2 = np.zeros_like(z)
                z2[keep] = np.maximum(z[keep], 0)
                return _decode(coder, z2, x[0])[None]

            with torch.no_grad():
                expected[c] += hooked_last_ce(
                    subject, HOOK["transcoder"], rewrite, ids[c : c + 1], targets[c : c + 1]
                )[0]
    expected /= len(trials)
    got = _mean_over_trials(
        results_of(run_dir),
        "synthetic",
        quality=0.5,
        calibration=calibration,
        fraction=0.1,
        choice=choice,
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_resume_after_a_kill_evaluates_only_the_missing_part(tc_run, monkeypatch) -> None:
    run_dir, subject, _ = tc_run
    before = results_of(run_dir)
    summary_before = pl.read_parquet(run_dir / "eval" / "summary.parquet")
    parts = sorted((run_dir / "eval" / "results.parts").glob("part-*.parquet"))
    assert len(parts) == 2  # 6 contexts in parts of 4
    parts[-1].unlink()  # killed while writing the last part
    (run_dir / "eval" / "results.parquet").unlink()
    seen: list[int] = []
    real = evaluate.grid_ce

    def counting(*args: Any, **kwargs: Any) -> np.ndarray:
        seen.append(len(args[6]))
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "grid_ce", counting)
    again = evaluate.run(FAST, run_dir, hookpoint=HOOK["transcoder"], model="tiny", subject=subject)
    assert seen == [N_EVAL - 4]
    after = results_of(run_dir)
    assert after.select(pl.exclude("ce")).equals(before.select(pl.exclude("ce")))
    np.testing.assert_allclose(after["ce"].to_numpy(), before["ce"].to_numpy(), rtol=1e-6)
    assert again.equals(summary_before)
    assert json.loads((run_dir / "eval.json").read_text())["contexts_evaluated_now"] == 2
    # Parts of another config are refused, not mixed in.
    with pytest.raises(FileExistsError, match="another config"):
        evaluate.run(
            dataclasses.replace(FAST, seed=1),
            run_dir,
            hookpoint=HOOK["transcoder"],
            model="tiny",
            subject=subject,
        )


# ------------------------------------------------------------------------------------------
# Bad inputs
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"fractions": (0.0, 0.5)}, r"in \(0, 1\]"),
        ({"fractions": (1.5,)}, r"in \(0, 1\]"),
        ({"fractions": ()}, "must not be empty"),
        ({"choices": ("best",)}, "subset of top, random"),
        ({"random": "always"}, "'fixed' or 'per-context'"),
        ({"n_trials": 0}, "n_trials must be at least 1"),
        ({"missing_explanations": "skip"}, "'exclude' or 'error'"),
        ({"synthetic_qualities": (0.4, 0.9)}, r"synthetic_qualities .* \[0.5, 1\], got 0.4"),
        ({"synthetic_qualities": (1.5,)}, r"synthetic_qualities .* \[0.5, 1\], got 1.5"),
        ({"synthetic_calibrations": ("isotonic",)}, "synthetic_calibrations must be"),
        ({"controls": ("oracle",)}, "controls must be distinct names"),
        ({"equivalence_margin": 0.0}, "equivalence_margin must be > 0"),
        ({"equivalence_margin": -0.25}, "equivalence_margin must be > 0"),
        ({"equivalence_margin_nats": 0.0}, "equivalence_margin_nats must be > 0"),
        ({"alpha": 1.0}, r"alpha must be in \(0, 1\)"),
    ],
)
def test_config_validation(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EvaluateConfig(**change)


def _copy_run(src: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("eval", "eval.json"))
    return dest


def _run(run_dir: Path, subject: Subject, cfg: EvaluateConfig = FAST) -> pl.DataFrame:
    return evaluate.run(cfg, run_dir, hookpoint=HOOK["transcoder"], model="tiny", subject=subject)


def test_missing_cache_stats_names_the_stage(tc_run, tmp_path: Path) -> None:
    run_dir, subject, _ = tc_run
    copy = _copy_run(run_dir, tmp_path / "run")
    (copy / "latents" / "stats.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="nlrw cache"):
        _run(copy, subject)
    assert not (copy / "eval").exists()
    # without oracle_magnitude and synthetic the statistics are not needed
    plain = dataclasses.replace(
        FAST, controls=("matched_zero",), synthetic_qualities=(), fractions=(1.0,), n_trials=1
    )
    summary = _run(copy, subject, plain)
    assert set(summary["condition"]) == {*evaluate.CONDITIONS[:5], "matched_zero"}


def test_missing_calibration_names_the_stages_to_run(tc_run, tmp_path: Path) -> None:
    run_dir, subject, _ = tc_run
    copy = _copy_run(run_dir, tmp_path / "run")
    (copy / "calibration.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="run simulate and calibrate first"):
        _run(copy, subject)
    assert not (copy / "eval").exists()


@pytest.mark.parametrize(("k", "num_latents"), [(8, 64), (4, 48)])
def test_coder_disagreeing_with_stored_latents(tc_run, tmp_path: Path, k, num_latents) -> None:
    run_dir, subject, _ = tc_run
    copy = _copy_run(run_dir, tmp_path / "run")
    other = random_coder("transcoder", 32, k=k, num_latents=num_latents, seed=5)
    other.save(RunDir(copy).coder(HOOK["transcoder"]))
    message = "k = 8" if k == 8 else "re-run the contexts stage"
    with pytest.raises(ValueError, match=message):
        _run(copy, subject)
    assert not (copy / "eval" / "results.parquet").exists()


def test_short_contexts_and_incomplete_calibration(tc_run, tmp_path: Path) -> None:
    run_dir, subject, _ = tc_run
    copy = _copy_run(run_dir, tmp_path / "run")
    table = pl.read_parquet(copy / "contexts.parquet")
    table.with_columns(pl.col("input_ids").list.head(CTX_LEN - 1)).write_parquet(
        copy / "contexts.parquet"
    )
    with pytest.raises(ValueError, match=r"context 0 .* 7 tokens, shorter than ctx_len 8"):
        _run(copy, subject)

    copy2 = _copy_run(run_dir, tmp_path / "run2")
    cal = pl.read_parquet(copy2 / "calibration.parquet")
    cal.filter(~((pl.col("latent") == 4) & (pl.col("context_id") == 2))).write_parquet(
        copy2 / "calibration.parquet"
    )
    with pytest.raises(ValueError, match="latent 4 on context 2 missing"):
        _run(copy2, subject)


def test_missing_explanations_error_mode(tc_run, tmp_path: Path) -> None:
    run_dir, subject, _ = tc_run
    copy = _copy_run(run_dir, tmp_path / "run")
    strict = dataclasses.replace(FAST, missing_explanations="error")
    with pytest.raises(ValueError, match="never simulated"):
        _run(copy, subject, strict)
    scores = pl.read_parquet(copy / "scores.parquet")
    scores.filter(pl.col("latent") != 6).write_parquet(copy / "scores.parquet")
    with pytest.raises(ValueError, match=r"no balanced_accuracy .*\[6\]"):
        _run(copy, subject, strict)
    # exclude mode: latent 6 leaves the simulated set, and is counted
    _run(copy, subject, dataclasses.replace(FAST, choices=("top",)))
    record = json.loads((copy / "eval.json").read_text())
    assert record["n_simulated_latents"] == len(SIMULATED) - 1
    assert record["n_unscored_excluded"] == 1


@pytest.fixture(scope="module")
def shuffled_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Subject, SparseCoder]:
    """A run whose first four simulated latents have a shuffled-explanation control: their
    'noisy' calibrated values rotated among them (latent i gets latent i+1's)."""
    run_dir, subject, coder = make_run(tmp_path_factory.mktemp("eval_shuffled"))
    cal = pl.read_parquet(run_dir / "calibration.parquet")
    subset = [int(x) for x in SIMULATED[:4]]
    donor = dict(zip(subset, subset[1:] + subset[:1], strict=True))
    rows = []
    for name in ("exact", "noisy"):
        part = cal.filter((pl.col("calibration") == name) & pl.col("latent").is_in(subset))
        value = {(r, c): a for r, c, a in part.select("latent", "context_id", "activation").rows()}
        for (lat, c), _ in value.items():
            rows.append((lat, c, name, value[(donor[lat], c)]))
    pl.DataFrame(
        rows, schema=["latent", "context_id", "calibration", "activation"], orient="row"
    ).with_columns(
        pl.col("latent").cast(pl.Int32), pl.col("context_id").cast(pl.Int32)
    ).write_parquet(run_dir / "calibration_shuffled.parquet")
    cfg = dataclasses.replace(FAST, controls=(), synthetic_qualities=())
    evaluate.run(cfg, run_dir, hookpoint=HOOK["transcoder"], model="tiny", subject=subject)
    return run_dir, subject, coder


@pytest.mark.parametrize(("fraction", "choice"), [(1.0, "top"), (0.5, "random")])
def test_shuffled_equals_a_manual_rewrite(shuffled_run, fraction, choice) -> None:
    """The control's latents take their shuffled values, the other simulated latents their
    real ones; top-k re-applied; the splice by a plain forward hook."""
    run_dir, subject, coder = shuffled_run
    ids, targets = eval_windows(run_dir)
    cal = pl.read_parquet(run_dir / "calibration.parquet").filter(pl.col("calibration") == "noisy")
    shuf = pl.read_parquet(run_dir / "calibration_shuffled.parquet").filter(
        pl.col("calibration") == "noisy"
    )
    chosen_sets = _chosen_sets(run_dir, coder, fraction, choice)
    expected = manual_rewrite_ce(subject, coder, ids, targets, chosen_sets, [cal, shuf])
    results = results_of(run_dir)
    keys = {"calibration": "noisy", "fraction": fraction, "choice": choice}
    got = _mean_over_trials(results, "shuffled", **keys)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    if fraction == 1.0:
        assert np.abs(got - _mean_over_trials(results, "simulated", **keys)).max() > 1e-4
    summary = pl.read_parquet(run_dir / "eval" / "summary.parquet")
    assert summary.filter(pl.col("condition") == "shuffled").height > 0


def test_shuffled_asked_for_without_the_control_names_the_commands(tc_run, tmp_path) -> None:
    run_dir, subject, _ = tc_run
    cfg = dataclasses.replace(FAST, shuffled=True)
    with pytest.raises(
        FileNotFoundError,
        match=r"predate the shuffled-explanation control.*"
        r"--simulate.shuffled-control true",
    ):
        evaluate.run(cfg, run_dir, hookpoint=HOOK["transcoder"], model="tiny", subject=subject)
