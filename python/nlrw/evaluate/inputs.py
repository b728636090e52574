"""The inputs of the evaluate stage, read from the run directory and checked before any
forward pass.

:func:`read_inputs` reads, in this order, and refuses what would make the evaluation wrong
rather than merely fail later:

* the eval contexts (``contexts.parquet``, split ``"eval"``): every window exactly ``ctx_len``
  tokens (as ``contexts.json`` recorded it) with a ``target_id``;
* the calibrated simulations (``calibration.parquet``): one finite value >= 0 per simulated
  latent, calibration and eval context, as dense ``[n_contexts, N]`` arrays;
* the shuffled-explanation control (``calibration_shuffled.parquet``), when the run has it;
* the balanced accuracies (``scores.parquet``) that rank the latents for the "top" choice;
* the coder (``transcoder/<hookpoint>``), which must reproduce the latents the contexts stage
  stored (``contexts/activations.safetensors``; the agreement is recorded);
* the cache's per-latent statistics (``latents/stats.parquet``) for ``oracle_magnitude`` and
  the synthetic simulators, which are generated here.

Every path comes from :class:`nlrw.lib.rundir.RunDir`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from typing import Any

import numpy as np
import polars as pl
import torch

from nlrw.config.evaluate import EvaluateConfig
from nlrw.evaluate.grid import Synthetic
from nlrw.evaluate.synthetic import synthetic_values
from nlrw.lib.rundir import RunDir
from nlrw.model.sparse import SparseCoder

__all__ = ["Inputs", "coverage", "read_inputs"]

log = logging.getLogger(__name__)


class Inputs:
    """What :func:`read_inputs` reads and validates before any forward pass."""

    def __init__(self) -> None:
        self.context_ids = np.zeros(0, np.int64)
        self.input_ids = np.zeros((0, 0), np.int64)
        self.targets = np.zeros(0, np.int64)
        self.latents = np.zeros(0, np.int64)
        self.values: dict[str, np.ndarray] = {}
        self.balanced_accuracy: np.ndarray | None = None
        self.mean_active: np.ndarray | None = None
        self.synthetic: Synthetic | None = None
        self.shuffled: dict[str, np.ndarray] | None = None
        self.notes: dict[str, Any] = {}


def _ctx_len(paths: RunDir, lengths: np.ndarray) -> int:
    """ctx_len as the contexts stage recorded it, else the longest eval context."""
    record = paths.contexts_record
    if record.is_file():
        with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
            value = json.loads(record.read_text()).get("config", {}).get("ctx_len")
            if isinstance(value, int) and value > 0:
                return value
    return int(lengths.max())


def _read_eval_contexts(paths: RunDir, cfg: EvaluateConfig, inputs: Inputs) -> None:
    """The eval windows (``max_contexts`` first), their targets and ``ctx_len``."""
    from nlrw.contexts import read_contexts

    table = read_contexts(paths.root, "eval").sort("context_id")
    if table.height == 0:
        raise ValueError(f"{paths.contexts} holds no eval contexts")
    if cfg.max_contexts is not None:
        table = table.head(cfg.max_contexts)
    lengths = table["input_ids"].list.len().to_numpy()
    ctx_len = _ctx_len(paths, lengths)
    bad = np.flatnonzero(lengths != ctx_len)
    if len(bad):
        i = int(bad[0])
        what = "shorter than" if lengths[i] < ctx_len else "longer than"
        raise ValueError(
            f"context {table['context_id'][i]} of {paths.contexts} has "
            f"{lengths[i]} tokens, {what} ctx_len {ctx_len} ({len(bad)} such contexts): "
            "re-run the contexts stage"
        )
    if table["target_id"].null_count():
        raise ValueError(f"{paths.contexts}: some eval contexts have no target_id")
    inputs.context_ids = table["context_id"].to_numpy().astype(np.int64)
    inputs.input_ids = np.array(table["input_ids"].to_list(), dtype=np.int64).reshape(
        table.height, ctx_len
    )
    inputs.targets = table["target_id"].to_numpy().astype(np.int64)
    inputs.notes["ctx_len"] = ctx_len


def scatter_once(
    row: np.ndarray, col: np.ndarray, activation: pl.Series, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """A calibration's values as a dense float32 matrix of ``shape`` (``activation[i]`` at
    ``(row[i], col[i])``, zero elsewhere) and how many values each cell received, so that the
    caller can refuse a missing or duplicated (row, latent) pair, naming it."""
    filled = np.bincount(row * shape[1] + col, minlength=shape[0] * shape[1]).reshape(shape)
    dense = np.zeros(shape, dtype=np.float32)
    dense[row, col] = activation.to_numpy().astype(np.float32)
    return dense, filled


def _read_calibration(paths: RunDir, cfg: EvaluateConfig, inputs: Inputs) -> None:
    """The calibrated simulated values ``[n_contexts, N]`` of each calibration evaluated."""
    path = paths.calibration
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: run simulate and calibrate first (nlrw simulate, nlrw calibrate)"
        )
    table = pl.read_parquet(path)
    missing = {"latent", "context_id", "calibration", "activation"} - set(table.columns)
    if missing:
        raise ValueError(f"{path} lacks the columns {sorted(missing)}")
    present = sorted(table["calibration"].unique().drop_nulls().to_list())
    names = present if cfg.calibrations is None else list(cfg.calibrations)
    unknown = [c for c in names if c not in present]
    if unknown:
        raise ValueError(f"{path} has no calibration {unknown}; it has {present}")
    if not names:
        raise ValueError(f"{path} holds no calibrations")
    table = table.filter(
        pl.col("calibration").is_in(names) & pl.col("context_id").is_in(inputs.context_ids)
    )
    latents = np.sort(table["latent"].unique().to_numpy().astype(np.int64))
    if len(latents) == 0:
        raise ValueError(f"{path} holds no latent simulated on the eval contexts")
    act = table["activation"].to_numpy()
    if table["activation"].null_count() or not np.isfinite(act).all() or (act < 0).any():
        raise ValueError(f"{path}: activations must be finite and >= 0 (found null/NaN/<0)")
    values: dict[str, np.ndarray] = {}
    n_ctx = len(inputs.context_ids)
    for name in names:
        part = table.filter(pl.col("calibration") == name)
        lat = part["latent"].to_numpy().astype(np.int64)
        ctx = part["context_id"].to_numpy().astype(np.int64)
        col = np.searchsorted(latents, lat)
        row = np.searchsorted(inputs.context_ids, ctx)
        dense, filled = scatter_once(row, col, part["activation"], (n_ctx, len(latents)))
        if (filled != 1).any():
            r, c = np.argwhere(filled != 1)[0]
            state = "missing" if filled[r, c] == 0 else "duplicated"
            raise ValueError(
                f"{path}: calibration {name!r} has latent {latents[c]} on context "
                f"{inputs.context_ids[r]} {state} ({int((filled == 0).sum())} missing, "
                f"{int((filled > 1).sum())} duplicated pairs); every simulated latent needs one "
                "value per eval context"
            )
        values[name] = dense
    inputs.latents = latents
    inputs.values = values


def _read_shuffled(paths: RunDir, cfg: EvaluateConfig, inputs: Inputs) -> None:
    """The shuffled control's calibrated values, as ``inputs.values`` with the control's
    latents' columns replaced (the others keep their real simulations)."""
    path = paths.calibration_shuffled
    if cfg.shuffled is False:
        return
    if not path.is_file():
        if cfg.shuffled:
            raise FileNotFoundError(
                f"{path} is missing: the run's simulations predate the shuffled-explanation "
                f"control; make it with `nlrw simulate {paths.root} --simulate.shuffled-control "
                f"true --overwrite` and `nlrw calibrate {paths.root} --overwrite`, or pass "
                "--evaluate.shuffled false"
            )
        return
    try:
        table = pl.read_parquet(path, columns=["latent", "context_id", "calibration", "activation"])
    except Exception as e:  # polars raises several error types for a damaged file
        raise ValueError(f"{path}: not a readable calibration table: {e}") from e
    table = table.filter(pl.col("context_id").is_in(inputs.context_ids))
    out: dict[str, np.ndarray] = {}
    for name, real in inputs.values.items():
        part = table.filter(pl.col("calibration") == name)
        dense = real.copy()
        lat = part["latent"].to_numpy().astype(np.int64)
        col = np.searchsorted(inputs.latents, lat)
        known = (col < len(inputs.latents)) & (
            inputs.latents[np.minimum(col, len(inputs.latents) - 1)] == lat
        )
        if not known.all():
            raise ValueError(
                f"{path}: latent {int(lat[np.argmin(known)])} of the shuffled control was not "
                "simulated in calibration.parquet: re-run calibrate"
            )
        row = np.searchsorted(inputs.context_ids, part["context_id"].to_numpy().astype(np.int64))
        act = part["activation"].to_numpy().astype(np.float32)
        if not np.isfinite(act).all() or (act < 0).any():
            raise ValueError(f"{path}: activations must be finite and >= 0")
        dense[:, np.unique(col)] = 0.0
        dense[row, col] = act
        out[name] = dense
    inputs.shuffled = out
    inputs.notes["shuffled_latents"] = int(table["latent"].n_unique())


def _read_scores(paths: RunDir, cfg: EvaluateConfig, inputs: Inputs) -> None:
    """The balanced accuracy of each simulated latent (for "top"); unscored latents are
    excluded or refused (``missing_explanations``)."""
    if "top" not in cfg.choices:
        return
    path = paths.scores
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the 'top' choice needs the score stage")
    scores = pl.read_parquet(path, columns=["latent", "balanced_accuracy"])
    ba_of = {
        int(lat): float(ba)
        for lat, ba in scores.iter_rows()
        if ba is not None and not math.isnan(ba)
    }
    unscored = [int(lat) for lat in inputs.latents if int(lat) not in ba_of]
    if unscored:
        if cfg.missing_explanations == "error":
            raise ValueError(
                f"{len(unscored)} simulated latents have no balanced_accuracy in {path} "
                f"(e.g. {unscored[:5]}): score them, drop 'top' from choices, or pass "
                "missing_explanations='exclude'"
            )
        keep = np.isin(inputs.latents, unscored, invert=True)
        if not keep.any():
            raise ValueError(f"no simulated latent has a balanced_accuracy in {path}")
        inputs.latents = inputs.latents[keep]
        inputs.values = {k: v[:, keep] for k, v in inputs.values.items()}
        log.warning("evaluate: %d simulated latents without a score excluded", len(unscored))
    inputs.notes["n_unscored_excluded"] = len(unscored)
    inputs.balanced_accuracy = np.array([ba_of[int(lat)] for lat in inputs.latents])


def _check_coder(paths: RunDir, coder: SparseCoder, hookpoint: str, inputs: Inputs) -> None:
    """The coder must be the one whose latents the contexts stage stored."""
    from nlrw.contexts import load_context_activations

    where = paths.context_activations
    acts = load_context_activations(paths.root)
    values, indices, x = acts.values, acts.indices, acts.x
    if values.shape[1] != coder.k:
        raise ValueError(
            f"the coder at {hookpoint!r} has k = {coder.k} but {where} stores "
            f"{values.shape[1]} latents per context: re-run the contexts stage with this coder"
        )
    if x.shape[1] != coder.d_in:
        raise ValueError(
            f"the coder at {hookpoint!r} reads width d_in = {coder.d_in} but {where} stores "
            f"x of width {x.shape[1]}: re-run the contexts stage with this coder"
        )
    if indices.numel() and int(indices.max()) >= coder.num_latents:
        raise ValueError(
            f"{where} stores latent {int(indices.max())}, but the coder at {hookpoint!r} has "
            f"{coder.num_latents} latents: re-run the contexts stage with this coder"
        )
    if max(inputs.context_ids) >= values.shape[0]:
        raise ValueError(f"{where} has {values.shape[0]} rows, fewer than the contexts")
    rows = torch.as_tensor(inputs.context_ids)
    v, i = values[rows].float(), indices[rows].long()
    with torch.inference_mode():
        ev, ei = coder.encode(x[rows].to(coder.device, coder.dtype))
    ev, ei = ev.float().cpu(), ei.long().cpu()
    same = [
        set(i[j][v[j] > 0].tolist()) == set(ei[j][ev[j] > 0].tolist()) for j in range(len(rows))
    ]
    agreement = float(np.mean(same))
    inputs.notes["stored_latents_agreement"] = agreement
    if agreement < 0.5:
        raise ValueError(
            f"the coder at {hookpoint!r} does not reproduce the latents stored in {where} "
            f"(same top-k on {agreement:.0%} of eval contexts): the contexts were built with "
            "another coder; re-run the contexts stage"
        )
    active = i[v > 0].numpy()
    never = np.setdiff1d(np.unique(active), inputs.latents)
    inputs.notes["n_never_simulated_active_latents"] = len(never)
    inputs.notes["never_simulated_active_fraction"] = (
        float(np.isin(active, never).mean()) if len(active) else 0.0
    )
    inputs.notes["n_active_latents"] = len(np.unique(active))
    inputs.notes["coverage"] = coverage(v.numpy(), i.numpy(), inputs.latents)


def coverage(values: np.ndarray, indices: np.ndarray, simulated: np.ndarray) -> float:
    """The share of the coder's true top-k activation mass on the evaluation contexts that the
    simulated latents hold::

        coverage = Σ_c Σ_{j ∈ topk(c), j simulated} a_cj / Σ_c Σ_{j ∈ topk(c)} a_cj

    (``values``/``indices`` ``[contexts, k]``; 0 when nothing is active). A partial rewrite
    that leaves most of the mass at its true values cannot move the loss far from the
    coder's, whatever the explanations are worth: the paper's fractions mean fractions of
    (nearly) all latents only when this is close to 1."""
    mass = np.where(values > 0, values, 0.0).astype(np.float64)
    total = float(mass.sum())
    if total <= 0:
        return 0.0
    return float(mass[np.isin(indices, simulated)].sum() / total)


def _read_cache_stats(
    paths: RunDir, cfg: EvaluateConfig, inputs: Inputs, coder: SparseCoder
) -> None:
    """The cache's per-latent statistics that ``oracle_magnitude`` (mean active values) and
    ``synthetic`` (max, quantile tables, and the true activations of every latent on the eval
    contexts) need; the synthetic simulators are generated and calibrated here."""
    need_mean = "oracle_magnitude" in cfg.controls
    if not (need_mean or cfg.synthetic_qualities):
        return
    path = paths.latent_stats
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the oracle_magnitude control and the synthetic simulators "
            f"need the cache stage's statistics (run `nlrw cache {paths.root}`), or pass "
            "controls without oracle_magnitude and synthetic_qualities=()"
        )
    stats = pl.read_parquet(path).sort("latent")
    missing = {
        "latent",
        "mean",
        "reference_max",
        "reference_frequency",
        "active_quantiles",
    } - set(stats.columns)
    if missing:
        raise ValueError(f"{path} lacks the columns {sorted(missing)}: re-run the cache stage")
    if not np.array_equal(stats["latent"].to_numpy(), np.arange(coder.num_latents)):
        raise ValueError(
            f"{path} has {stats.height} latents, the coder {coder.num_latents}: the cache was "
            "built with another coder; re-run the cache stage"
        )
    mean = stats["mean"].fill_null(0.0).to_numpy().astype(np.float32)
    if not np.isfinite(mean).all() or (mean < 0).any():
        raise ValueError(f"{path}: mean active values must be finite and >= 0")
    inputs.mean_active = mean[inputs.latents]
    if not cfg.synthetic_qualities:
        return
    from nlrw.contexts import true_activations

    started = time.perf_counter()
    tables = np.array(stats["active_quantiles"].to_list(), dtype=np.float32)
    if tables.ndim != 2 or tables.shape[0] != coder.num_latents:
        raise ValueError(f"{path}: the quantile tables must have one length for every latent")
    true = true_activations(paths.root, np.arange(coder.num_latents), inputs.context_ids).T
    values, auroc = synthetic_values(
        true,
        cfg.synthetic_qualities,
        cfg.synthetic_calibrations,
        max_activation=stats["reference_max"].fill_null(0.0).to_numpy(),
        active_tables=tables,
        frequency=stats["reference_frequency"].fill_null(0.0).to_numpy().astype(np.float32),
        seed=cfg.seed,
    )
    inputs.synthetic = Synthetic(values, auroc)
    measured = {
        str(q): (float(np.nanmean(a)) if np.isfinite(a).any() else None) for q, a in auroc.items()
    }
    inputs.notes["synthetic_measured_auroc"] = measured
    inputs.notes["synthetic_latents_with_both_classes"] = int(
        np.isfinite(next(iter(auroc.values()))).sum()
    )
    inputs.notes["synthetic_seconds"] = time.perf_counter() - started


def read_inputs(paths: RunDir, cfg: EvaluateConfig, hookpoint: str) -> tuple[Inputs, SparseCoder]:
    """Everything the grid needs, checked (see the module docstring), and the coder at
    ``hookpoint`` (on the CPU)."""
    from nlrw.model import sparse

    inputs = Inputs()
    _read_eval_contexts(paths, cfg, inputs)
    _read_calibration(paths, cfg, inputs)
    _read_shuffled(paths, cfg, inputs)
    _read_scores(paths, cfg, inputs)
    coder = sparse.load(paths.coder(hookpoint))
    _check_coder(paths, coder, hookpoint, inputs)
    _read_cache_stats(paths, cfg, inputs, coder)
    never = inputs.notes["n_never_simulated_active_latents"]
    if never and cfg.missing_explanations == "error":
        raise ValueError(
            f"{never} latents active on eval contexts were never simulated (no usable "
            "explanation, or left out of simulate): pass missing_explanations='exclude' to "
            "keep their true values"
        )
    return inputs, coder
