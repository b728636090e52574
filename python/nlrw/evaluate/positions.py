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
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import polars as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from nlrw.evaluate.grid import Grid
from nlrw.evaluate.inputs import Inputs
from nlrw.lib.rundir import RunDir
from nlrw.model.sparse import SparseCoder
from nlrw.model.subject import splice

__all__ = ["check_layout", "grid_ce_positions", "position_ids", "position_values"]

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
    n_rows, n_lat = len(inputs.context_ids) * ctx_len, len(inputs.latents)
    filled = np.bincount(row * n_lat + col, minlength=n_rows * n_lat).reshape(n_rows, n_lat)
    columns = np.unique(col)
    if (filled[:, columns] != 1).any():
        r, c = np.argwhere(filled[:, columns] != 1)[0]
        raise ValueError(
            f"{where}: calibration {name!r} rates latent {inputs.latents[columns[c]]} on context "
            f"{inputs.context_ids[r // ctx_len]} at position {r % ctx_len} "
            f"{int(filled[r, columns[c]])} times, not once: re-run simulate"
        )
    dense = np.zeros((n_rows, n_lat), dtype=np.float32)
    dense[row, col] = part["activation"].to_numpy().astype(np.float32)
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


def _every_position_splice(
    grid: Grid, coder: SparseCoder, row_index: np.ndarray, ids: np.ndarray
) -> Callable[[Tensor, Tensor], Tensor]:
    """A :func:`nlrw.model.subject.splice` function replacing every position of row r (grid
    row ``row_index[r]``) with the grid's replacement for that position (``ids``: the window's
    :func:`position_ids`)."""
    sae = coder.cfg.kind == "sae"

    def fn(x: Tensor, y: Tensor) -> Tensor:
        rows, length = y.shape[:2]
        src = (y if sae else x).reshape(rows * length, -1)
        rep = grid.replacement(
            coder,
            src,
            y.reshape(rows * length, -1),
            np.repeat(row_index, length),
            np.tile(ids, rows),
        )
        return rep.to(y.dtype).reshape(y.shape)

    return fn


def grid_ce_positions(
    model: torch.nn.Module,
    coder: SparseCoder,
    hookpoint: str,
    grid: Grid,
    input_ids: Tensor | np.ndarray,
    targets: Tensor | np.ndarray,
    context_ids: npt.ArrayLike,
    *,
    batch_size: int = 256,
) -> np.ndarray:
    """CE ``[n_contexts, n_rows]``: each grid row's mean next-token loss over every position
    of each window, the hookpoint rewritten at every position (module docstring). The grid's
    ids must be :func:`position_ids` of ``context_ids``."""
    device = next(model.parameters()).device
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long, device=device)
    tgt = torch.as_tensor(np.asarray(targets), dtype=torch.long, device=device)
    labels = torch.cat([ids[:, 1:], tgt[:, None]], dim=1)  # t_{p+1} for every position p
    ctx = np.asarray(context_ids, dtype=np.int64)
    n, length = ids.shape
    canonical = grid.canonical_rows()
    unique = np.unique(canonical)  # rows that differ; the others copy their canonical row
    step = max(1, batch_size // length)
    out = np.empty((n, len(grid.rows)), dtype=np.float64)
    with torch.inference_mode():
        for i in range(n):
            window = position_ids(ctx[i : i + 1], length)
            for r0 in range(0, len(unique), step):
                ri = unique[r0 : r0 + step]
                fn = _every_position_splice(grid, coder, ri, window)
                with splice(model, hookpoint, fn):
                    logits = model(input_ids=ids[i : i + 1].expand(len(ri), -1), use_cache=False)
                ce = F.cross_entropy(
                    logits.logits.float().flatten(0, 1),
                    labels[i].repeat(len(ri)),
                    reduction="none",
                )
                out[i, ri] = ce.view(len(ri), length).mean(1).double().cpu().numpy()
    return out[:, canonical]
