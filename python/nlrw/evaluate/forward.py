"""The forward passes of the evaluate stage: the cross-entropy of every grid row on every
context, with the subject's hookpoint output replaced at the window's last position.

For a window ``t_0 … t_{n-1}`` and its target ``t_n`` (the token after the window), row r's
loss is::

    CE_r = −log softmax(logits_{n-1})[t_n]

with the hookpoint's output at position n-1 replaced by :meth:`Grid.replacement
<nlrw.evaluate.grid.Grid.replacement>` for row r. Attention is causal, so positions 0…n-2 are
the same in every row: :func:`grid_ce` runs the model once per group of contexts on ``t_0 …
t_{n-2}`` (all windows have the same length, so no padding), keeps the KV cache, and then
runs every row of those contexts as one batch of single-token forwards of ``t_{n-1}``, each
row's cache selected from its context's (``Cache.batch_select_indices`` on a fresh copy per
batch) and a :func:`nlrw.model.subject.splice` giving row r its replacement. One token per
row instead of ``ctx_len``; equal to the naive way (:func:`grid_ce_full`, a full forward of
the window per row) to float32 rounding. Rows that make the same replacement run once
(:meth:`Grid.canonical_rows <nlrw.evaluate.grid.Grid.canonical_rows>`).

:func:`grid_ce_positions` is the forward of ``evaluate.positions = "all"``
(:mod:`nlrw.evaluate.positions`): every position rewritten, so a full forward of the window per
row, and the mean next-token CE over the window.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor

from nlrw.evaluate.grid import Grid
from nlrw.evaluate.positions import position_ids
from nlrw.model.sparse import SparseCoder
from nlrw.model.subject import splice

__all__ = ["grid_ce", "grid_ce_full", "grid_ce_positions"]


def _cache_kwarg(fn: Callable[..., Any]) -> str:
    """The name under which this transformers version passes a KV cache (``cache`` since
    transformers 5, ``past_key_values`` before)."""
    params = inspect.signature(fn).parameters
    return "cache" if "cache" in params else "past_key_values"


def _prefix_cache(model: Any, prefix: Tensor) -> Any:
    """The KV cache of ``prefix`` ``[B, T]`` (the base model only: no logits are needed)."""
    base = model.base_model
    out = base(input_ids=prefix, use_cache=True, **{_cache_kwarg(base.forward): None})
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    if cache is None:
        raise RuntimeError(f"{type(base).__name__} returned no KV cache with use_cache=True")
    return cache


def _rows_of_cache(prefix: Any, rows: Tensor) -> Any:
    """A fresh cache whose batch row r is row ``rows[r]`` of ``prefix`` (left untouched).

    Dynamic cache layers (transformers >= 4.56) rebind their tensors on selection and on
    update, so shallow copies of the layers suffice; older caches keep key/value lists that
    are modified in place, and are deep-copied.
    """
    layers = getattr(prefix, "layers", None)
    if isinstance(layers, list):
        cache = copy.copy(prefix)
        cache.layers = [copy.copy(layer) for layer in layers]
    else:
        cache = copy.deepcopy(prefix)
    cache.batch_select_indices(rows)
    return cache


def _last_position_splice(
    grid: Grid,
    coder: SparseCoder,
    row_index: np.ndarray,
    context_ids: np.ndarray,
) -> Callable[[Tensor, Tensor], Tensor]:
    """A :func:`nlrw.model.subject.splice` function replacing the last position of row r."""
    sae = coder.cfg.kind == "sae"

    def fn(x: Tensor, y: Tensor) -> Tensor:
        src = (y if sae else x)[:, -1]
        rep = grid.replacement(coder, src, y[:, -1], row_index, context_ids)
        new = y.clone()
        new[:, -1] = rep.to(y.dtype)
        return new

    return fn


def _as_ids(input_ids: Tensor | np.ndarray, device: torch.device) -> Tensor:
    ids = input_ids if isinstance(input_ids, Tensor) else torch.from_numpy(np.asarray(input_ids))
    return ids.long().to(device)


def grid_ce(
    model: Any,
    coder: SparseCoder,
    hookpoint: str,
    grid: Grid,
    input_ids: Tensor | np.ndarray,
    targets: Tensor | np.ndarray,
    context_ids: npt.ArrayLike,
    *,
    batch_size: int = 256,
) -> np.ndarray:
    """CE ``[n_contexts, n_rows]`` of every grid row on every context, sharing the prefix.

    ``input_ids`` ``[n, ctx_len]``, ``targets`` ``[n]`` (the token after each window),
    ``context_ids`` ``[n]`` (for the per-context seeds and values). See the module docstring.
    """
    device = next(model.parameters()).device
    ids, tgt = _as_ids(input_ids, device), _as_ids(targets, device)
    ctx = np.asarray(context_ids, dtype=np.int64)
    n, length = ids.shape
    n_rows = len(grid.rows)
    out = np.empty((n, n_rows), dtype=np.float64)
    canonical = grid.canonical_rows()
    unique = np.unique(canonical)  # rows that differ; the others copy their canonical row
    per_group = max(1, batch_size // len(unique))
    kw = _cache_kwarg(model.forward)
    with torch.inference_mode():
        for g0 in range(0, n, per_group):
            group = ids[g0 : g0 + per_group]
            b = group.shape[0]
            prefix = _prefix_cache(model, group[:, :-1]) if length > 1 else None
            row_ctx = np.repeat(np.arange(b), len(unique))
            row_idx = np.tile(unique, b)
            for c0 in range(0, b * len(unique), batch_size):
                rc, ri = row_ctx[c0 : c0 + batch_size], row_idx[c0 : c0 + batch_size]
                select = torch.as_tensor(rc, device=device)
                cache = None if prefix is None else _rows_of_cache(prefix, select)
                fn = _last_position_splice(grid, coder, ri, ctx[g0 + rc])
                with splice(model, hookpoint, fn):
                    logits = model(input_ids=group[select, -1:], use_cache=True, **{kw: cache})
                ce = F.cross_entropy(
                    logits.logits[:, -1].float(), tgt[g0 + select], reduction="none"
                )
                out[g0 + rc, ri] = ce.double().cpu().numpy()
    return out[:, canonical]


def grid_ce_full(
    model: Any,
    coder: SparseCoder,
    hookpoint: str,
    grid: Grid,
    input_ids: Tensor | np.ndarray,
    targets: Tensor | np.ndarray,
    context_ids: npt.ArrayLike,
    *,
    rows_per_forward: int | None = 1,
) -> np.ndarray:
    """The reference for :func:`grid_ce`: full forward passes over the whole window.

    ``rows_per_forward=1`` is the naive way, one forward per condition and context;
    ``None`` batches all conditions of a context as copies of its window (no KV sharing).
    """
    device = next(model.parameters()).device
    ids, tgt = _as_ids(input_ids, device), _as_ids(targets, device)
    ctx = np.asarray(context_ids, dtype=np.int64)
    n_rows = len(grid.rows)
    step = n_rows if rows_per_forward is None else rows_per_forward
    out = np.empty((ids.shape[0], n_rows), dtype=np.float64)
    with torch.inference_mode():
        for i in range(ids.shape[0]):
            for r0 in range(0, n_rows, step):
                ri = np.arange(r0, min(r0 + step, n_rows))
                batch = ids[i : i + 1].expand(len(ri), -1)
                fn = _last_position_splice(grid, coder, ri, np.full(len(ri), ctx[i]))
                with splice(model, hookpoint, fn):
                    logits = model(input_ids=batch, use_cache=False).logits
                ce = F.cross_entropy(
                    logits[:, -1].float(), tgt[i].expand(len(ri)), reduction="none"
                )
                out[i, ri] = ce.double().cpu().numpy()
    return out


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
    model: Any,
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
    ids must be :func:`~nlrw.evaluate.positions.position_ids` of ``context_ids``."""
    device = next(model.parameters()).device
    ids, tgt = _as_ids(input_ids, device), _as_ids(targets, device)
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
