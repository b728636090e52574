"""``evaluate.positions = "all"``: the rewrite at every position of the window, not only the
last.

The paper rewrites the hookpoint at one position per context, the token the simulator rated,
so the model runs on its rewritten MLP for one token of every 32. The all-at-once simulate
layout rates every token of a window in one forward (``simulations_positions.parquet``), and
with it the whole window can be rewritten: for a window ``t_0 … t_{n-1}`` and its target
``t_n``, every condition replaces the hookpoint's output at **every** position p (the true
latents of position p encoded from the activation the forward pass sees there, the rewrite
and top-k re-applied per position exactly as at the last position,
:meth:`Grid.replacement <nlrw.evaluate.grid.Grid.replacement>`), and the loss of a context is
the mean next-token cross-entropy over the window::

    CE = (1/n) · Σ_{p=0}^{n-1} −log softmax(logits_p)[t_{p+1}]

so the later positions see a rewritten MLP at every earlier one too, and a context gives n
predictions instead of one. Contexts stay the unit of the statistics (the summary's CIs and
tests resample contexts, each with its mean over positions).

**How.** Each (context, position) is one row of the :class:`~nlrw.evaluate.grid.Grid`, with
the id ``context_id · n + p`` (:func:`position_ids`): the grid's values are
``[contexts · n, N]`` (:func:`position_values`, the calibrated rating of each latent at each
position, :func:`nlrw.calibrate.calibrate_positions`), its seeded draws (``random_k``,
per-context random choices) are drawn per position, and a "fixed" random choice is the same
subset at every position (one coherent rewrite). Attention is causal but every position is
rewritten, so no prefix is shared: :func:`grid_ce_positions` runs a full forward of the window
per (context, distinct row), ``batch_size // n`` rows per forward.

**What it needs.** The all-at-once layout (the others rate the last token only): a run
simulated with another layout is refused, naming the layout and the command that re-runs
simulate. The synthetic simulators are made from the contexts' last-position latents only and
are left out (recorded in ``eval.json``).
"""

from __future__ import annotations

import json

import numpy as np
import numpy.typing as npt
import polars as pl

from nlrw.evaluate.inputs import Inputs, scatter_once
from nlrw.lib.rundir import RunDir

__all__ = ["check_layout", "position_ids", "position_values"]

_LAYOUT = "all-at-once"


def check_layout(paths: RunDir) -> None:
    """Refuse a run whose simulate stage did not rate every position (before any work)."""
    record = paths.simulate_record
    try:
        layout = json.loads(record.read_text())["config"]["layout"]
    except FileNotFoundError:
        raise FileNotFoundError(f"{record} is missing: run simulate first") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{record}: no simulate layout recorded ({e!r})") from None
    if layout != _LAYOUT:
        raise ValueError(
            f"evaluate.positions = 'all' needs a rating of every position, which only the "
            f"{_LAYOUT} layout makes; {record} was simulated with layout {layout!r}: re-run "
            f"simulate with `nlrw run --run-dir {paths.root} --simulate.layout {_LAYOUT} "
            "--rerun`, or evaluate positions = 'last'"
        )


def position_ids(context_ids: npt.ArrayLike, ctx_len: int) -> np.ndarray:
    """The grid's row ids of every position: ``context_id · ctx_len + p``, context-major."""
    ctx = np.asarray(context_ids, dtype=np.int64)
    return (ctx[:, None] * ctx_len + np.arange(ctx_len)).ravel()


def _dense(
    table: pl.DataFrame, inputs: Inputs, ctx_len: int, name: str, where: str
) -> tuple[np.ndarray, np.ndarray]:
    """``([contexts · ctx_len, N] values, columns filled)`` of calibration ``name``: row
    ``i · ctx_len + p`` for ``inputs.context_ids[i]`` at position p, column j for
    ``inputs.latents[j]``; every latent it holds must have every position of every context."""
    part = table.filter(pl.col("calibration") == name)
    lat = part["latent"].to_numpy().astype(np.int64)
    col = np.searchsorted(inputs.latents, lat)
    ctx = np.searchsorted(inputs.context_ids, part["context_id"].to_numpy().astype(np.int64))
    row = ctx * ctx_len + part["position"].to_numpy().astype(np.int64)
    shape = (len(inputs.context_ids) * ctx_len, len(inputs.latents))
    dense, filled = scatter_once(row, col, part["activation"], shape)
    columns = np.unique(col)
    if (filled[:, columns] != 1).any():
        r, c = np.argwhere(filled[:, columns] != 1)[0]
        raise ValueError(
            f"{where}: calibration {name!r} rates latent {inputs.latents[columns[c]]} on context "
            f"{inputs.context_ids[r // ctx_len]} at position {r % ctx_len} "
            f"{int(filled[r, columns[c]])} times, not once: re-run simulate"
        )
    return dense, columns


def position_values(
    paths: RunDir, inputs: Inputs, k: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """The calibrated rating of every simulated latent at every position of every eval
    context, per calibration evaluated (``inputs.values``' names): ``[contexts · ctx_len, N]``
    rows as :func:`position_ids`; and the shuffled control's, its latents' columns in place,
    when ``inputs.shuffled`` is set. The maps are the calibrate stage's config's
    (:func:`nlrw.calibrate.calibrate_positions`)."""
    from nlrw.calibrate import calibrate_positions
    from nlrw.config.calibrate import CalibrateConfig
    from nlrw.lib.provenance import from_dict

    record = paths.calibrate_record
    try:
        recorded = json.loads(record.read_text())["config"]
    except FileNotFoundError:
        raise FileNotFoundError(f"{record} is missing: run calibrate first") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{record}: no calibrate config recorded ({e!r})") from None
    cfg = from_dict(CalibrateConfig, recorded, str(record))
    ctx_len = int(inputs.notes["ctx_len"])
    names = sorted(inputs.values)

    def read(shuffled: bool) -> pl.DataFrame:
        table = calibrate_positions(cfg, paths.root, k=k, shuffled=shuffled)
        table = table.filter(
            pl.col("calibration").is_in(names)
            & pl.col("context_id").is_in(inputs.context_ids)
            & pl.col("latent").is_in(inputs.latents)
        )
        if table["position"].n_unique() != ctx_len:
            raise ValueError(
                f"the positions tables of {paths.root} rate {table['position'].n_unique()} "
                f"positions per window, the contexts have {ctx_len}: re-run simulate"
            )
        return table

    real = read(False)
    values: dict[str, np.ndarray] = {}
    for name in names:
        dense, columns = _dense(real, inputs, ctx_len, name, str(paths.simulations_positions))
        if len(columns) != len(inputs.latents):
            missing = np.setdiff1d(np.arange(len(inputs.latents)), columns)
            raise ValueError(
                f"{paths.simulations_positions} does not rate latent "
                f"{inputs.latents[missing[0]]} ({len(missing)} missing): re-run simulate"
            )
        values[name] = dense
    if inputs.shuffled is None:
        return values, None
    control = read(True)
    shuffled: dict[str, np.ndarray] = {}
    for name in names:
        dense, columns = _dense(
            control, inputs, ctx_len, name, str(paths.simulations_shuffled_positions)
        )
        out = values[name].copy()
        out[:, columns] = dense[:, columns]
        shuffled[name] = out
    return values, shuffled
