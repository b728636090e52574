"""Per-latent quantile tables and quantile normalization: the calibration of simulated scores.

The simulator's scores live on their own scale. Quantile normalization maps a simulated
score ``s`` of latent ``l`` to the real activation at the same quantile::

    a = F_real⁻¹(F_sim(s))

**The real side, exact at any sparsity.** A latent's real distribution is mostly zeros. It is
kept as a mixture: the latent's active frequency ``q`` (``frequency[l]``) and a quantile table
of its *active* values only (``active_table[l]``, ``Qr`` entries at ``i / (Qr − 1)``, numpy's
``linspace``; :func:`reference_tables` builds both, the zeros counted, never stored)::

    F_real⁻¹(p) = 0                              for p ≤ 1 − q
                = Q_act((p − (1 − q)) / q)         for p > 1 − q

A table over the whole distribution, zeros included, cannot represent a latent rarer than one
table step (with 101 entries every latent came out "active" on ≥ 1% of contexts).

**The simulated side, at mid-rank positions.** The sim table's ``Qs`` entries sit at
``p_i = (i + ½) / Qs`` (:func:`midrank_tables`, numpy's ``hazen`` quantiles; with one entry per
score the table is the sorted scores and rank ``r`` gets ``(r − ½) / n``). ``F_sim(s)``:

* ``s`` below / above the table: ``p_0`` / ``p_{Qs−1}`` (no score reaches probability 0 or 1,
  so none maps to the cache's extreme by construction);
* ``s`` equal to the run of entries ``a..b`` (many contexts share a score): the middle of
  the run, ``(p_a + p_b) / 2``; its *width* is ``(b − a + 1) / Qs``;
* between entries: linear interpolation between their positions; width ``1 / Qs``.

**Offsets.** ``quantile_normalize(..., offsets=o)`` uses ``p + o·width`` (``o ∈ [−½, ½]``,
clamped to [0, 1]). ``o = 0`` is the deterministic mid-rank rule; ``o`` uniform on
``[−½, ½]`` is the randomized probability integral transform: the calibrated activations of an
uninformative simulator then have exactly the real distribution (active on a fraction ``q``
of contexts) at any ``q``, where the deterministic rule never activates a latent with
``q < 1 / (2n)``.

Worked example: ``q = 0.02``, active values tabulated ``[1, 3]``, 100 contexts with distinct
scores. The top context has ``p = 0.995``, ``u = (0.995 − 0.98) / 0.02 = 0.75``, activation
``1 + 0.75 · 2 = 2.5``; the second ``p = 0.985``, 1.5; the third ``p = 0.975 ≤ 0.98``, 0.

Tables come exactly from samples (:func:`quantile_tables`, numpy's default ``linear``
method) or, for streams too large to keep, from a mergeable :class:`QuantileSketch` with
relative accuracy ``alpha``. :func:`save_tables` / :func:`load_tables` store a calibration's
tables as safetensors (format v2; v1 files, whose real table included the zeros, are
refused with a message to re-run ``calibrate``).

The work runs in Rust (``nlrw._core``) with the GIL released; these wrappers convert
array-likes losslessly and raise ``TypeError``/``ValueError`` naming the argument at fault.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from safetensors import safe_open
from safetensors.numpy import save_file

from nlrw import _core
from nlrw.lib.io import atomic_path

__all__ = [
    "QuantileSketch",
    "QuantileTables",
    "load_tables",
    "midrank_positions",
    "midrank_tables",
    "probabilities",
    "quantile_normalize",
    "quantile_tables",
    "reference_tables",
    "save_tables",
]

TABLES_FORMAT = "nlrw.quantile_tables.v2"
_OLD_TABLES_FORMATS = ("nlrw.quantile_tables.v1",)
SKETCH_FORMAT = "nlrw.quantile_sketch.v1"
_FORMAT_KEY = "nlrw_format"
_U32_MAX = 2**32 - 1
_F32_EXACT_INT = 2**24

PathLike = str | os.PathLike[str]


def probabilities(num_quantiles: int) -> npt.NDArray[np.float64]:
    """The probabilities ``linspace(0, 1, Q)`` at which an active table's ``Q`` entries sit."""
    return np.linspace(0.0, 1.0, num_quantiles)


def midrank_positions(num_quantiles: int) -> npt.NDArray[np.float64]:
    """The mid-rank positions ``(i + ½) / Q`` at which a sim table's ``Q`` entries sit."""
    return (np.arange(num_quantiles) + 0.5) / num_quantiles


def _array(x: npt.ArrayLike, name: str, ndim: int) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    return a


def _as_ids(x: npt.ArrayLike, name: str = "latent_ids") -> npt.NDArray[np.uint32]:
    """1-D latent ids as uint32; integers or integral floats in [0, 2³²), else an error."""
    a = _array(x, name, 1)
    kind = a.dtype.kind
    if kind not in "iuf":
        raise TypeError(f"{name} must hold integers, got dtype {a.dtype}")
    if kind == "u" and a.dtype.itemsize <= 4:
        return np.ascontiguousarray(a, dtype=np.uint32)  # the common case: nothing to check
    if a.size:
        if kind == "f":
            bad = np.flatnonzero(~np.isfinite(a) | (a != np.round(a)))
            if bad.size:
                i = int(bad[0])
                raise ValueError(f"{name}[{i}] = {a[i]} is not an integer")
        if kind in "if":
            bad = np.flatnonzero(a < 0)
            if bad.size:
                i = int(bad[0])
                raise ValueError(f"{name}[{i}] = {a[i]} is negative")
        bad = np.flatnonzero(a > _U32_MAX)
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"{name}[{i}] = {a[i]} does not fit uint32")
    return np.ascontiguousarray(a, dtype=np.uint32)


def _as_f32(x: npt.ArrayLike, name: str, ndim: int) -> npt.NDArray[np.float32]:
    """Float32 values; float64 rounds to the nearest float32 (tables are float32, so a
    score equal to a table entry stays equal), integers must be exact in float32."""
    a = _array(x, name, ndim)
    kind = a.dtype.kind
    if kind not in "iuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {a.dtype}")
    if kind in "iu" and a.size and np.abs(a).max() > _F32_EXACT_INT:
        raise ValueError(f"{name} holds integers beyond 2**24 that float32 cannot represent")
    with np.errstate(over="ignore"):  # overflow is reported below, naming the index
        out = np.ascontiguousarray(a, dtype=np.float32)
    if kind == "f" and a.dtype.itemsize > 4:
        overflow = np.isfinite(a) & ~np.isfinite(out)
        if overflow.any():
            idx = np.unravel_index(int(np.argmax(overflow)), a.shape)
            where = ", ".join(str(int(i)) for i in idx)
            raise ValueError(f"{name}[{where}] = {a[idx]} is out of float32 range")
    return out


def _as_count(x: int | npt.ArrayLike, name: str) -> int | npt.NDArray[np.uint64]:
    """A non-negative int, or a 1-D array of non-negative integers as uint64."""
    if isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)):
        if x < 0:
            raise ValueError(f"{name} must be non-negative, got {x}")
        return int(x)
    a = _array(x, name, 1)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an int or an array of integers, got dtype {a.dtype}")
    if a.size and a.dtype.kind == "i" and a.min() < 0:
        i = int(np.argmin(a))
        raise ValueError(f"{name}[{i}] = {a[i]} is negative")
    return np.ascontiguousarray(a, dtype=np.uint64)


def _check_same_length(a: np.ndarray, a_name: str, b: np.ndarray, b_name: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{a_name} has {a.shape[0]} elements but {b_name} has {b.shape[0]}: they must match"
        )


def _check_int(x: int, name: str, minimum: int) -> int:
    if not isinstance(x, (int, np.integer)) or isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if x < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {x}")
    return int(x)


def quantile_normalize(
    latent_ids: npt.ArrayLike,
    scores: npt.ArrayLike,
    sim_table: npt.ArrayLike,
    active_table: npt.ArrayLike,
    frequency: npt.ArrayLike,
    offsets: npt.ArrayLike | None = None,
) -> npt.NDArray[np.float32]:
    """Map each score of its latent through ``F_real⁻¹(F_sim(score) + offset·width)``.

    Args:
        latent_ids: ``[m]`` latent of each score (non-negative integers ``< L``).
        scores: ``[m]`` simulated scores (finite; float64 rounds to float32).
        sim_table: ``[L, Qs]`` each latent's simulated scores at the mid-rank positions
            ``(i + ½) / Qs`` (:func:`midrank_tables`; ``Qs ≥ 2``).
        active_table: ``[L, Qr]`` quantiles of each latent's active real values at
            ``linspace(0, 1, Qr)`` (``Qr ≥ 2``).
        frequency: ``[L]`` each latent's active frequency ``q`` in ``[0, 1]``.
        offsets: ``None`` (the mid-rank rule) or ``[m]`` values in ``[−½, ½]`` (uniform
            draws give the randomized probability integral transform).

    Returns:
        ``[m]`` float32 calibrated activations (module docstring: the definition, ties,
        a worked example).

    Any order of the scores works; scores of one latent next to each other are fastest.
    The tables are validated on every call (``O(L·Q)``), so batch many scores per call.

    Raises:
        ValueError: wrong ndim or lengths, an unknown latent id, a non-finite score, a
            frequency outside [0, 1], an offset outside [−½, ½], a table that is not finite
            and ascending per row (the message names the latent or index).
        TypeError: a non-numeric argument.
    """
    ids = _as_ids(latent_ids)
    s = _as_f32(scores, "scores", 1)
    _check_same_length(ids, "latent_ids", s, "scores")
    sim = _as_f32(sim_table, "sim_table", 2)
    active = _as_f32(active_table, "active_table", 2)
    freq = _as_f32(frequency, "frequency", 1)
    off = None
    if offsets is not None:
        off = _as_f32(offsets, "offsets", 1)
        _check_same_length(off, "offsets", s, "scores")
    return _core.quantile_normalize(ids, s, sim, active, freq, off)


def midrank_tables(
    latent_ids: npt.ArrayLike,
    scores: npt.ArrayLike,
    num_latents: int,
    num_quantiles: int | None = None,
) -> npt.NDArray[np.float32]:
    """Per-latent tables of simulated scores at the mid-rank positions ``(i + ½) / Q``.

    Entry ``i`` of row ``l`` is numpy's ``hazen`` quantile of latent ``l``'s ``n_l`` scores
    at ``p_i = (i + ½) / Q``: with ``h = n_l p_i − ½`` clamped to ``[0, n_l − 1]`` and
    ``j = ⌊h⌋``, ``x_(j) + (h − j)(x_(j+1) − x_(j))``. With ``Q = n_l`` the row is the sorted
    scores themselves. ``num_quantiles=None`` takes ``Q`` = the largest ``n_l`` (at least 2),
    exact for every latent with that many scores. A latent without scores gets zeros.
    """
    ids = _as_ids(latent_ids)
    vals = _as_f32(scores, "scores", 1)
    _check_same_length(ids, "latent_ids", vals, "scores")
    num_latents = _check_int(num_latents, "num_latents", 0)
    if ids.size and int(ids.max()) >= num_latents:
        i = int(np.argmax(ids >= num_latents))
        raise ValueError(f"latent_ids[{i}] = {ids[i]} is not a known latent ({num_latents})")
    bad = ~np.isfinite(vals)
    if bad.any():
        raise ValueError(f"scores[{int(np.argmax(bad))}] is not finite")
    counts = np.bincount(ids, minlength=num_latents).astype(np.int64)
    if num_quantiles is None:
        q = max(2, int(counts.max()) if counts.size else 2)
    else:
        q = _check_int(num_quantiles, "num_quantiles", 2)
    order = np.lexsort((vals, ids))
    sorted_vals = vals[order].astype(np.float64)
    starts = np.r_[0, np.cumsum(counts)[:-1]] if num_latents else np.zeros(0, np.int64)
    n = counts[:, None].astype(np.float64)
    h = np.clip(n * midrank_positions(q)[None, :] - 0.5, 0.0, np.maximum(n - 1.0, 0.0))
    j = np.floor(h).astype(np.int64)
    j1 = np.minimum(j + 1, np.maximum(counts[:, None] - 1, 0))
    base = starts[:, None]
    has = counts[:, None] > 0
    safe = np.where(has, base, 0)
    if sorted_vals.size == 0:
        return np.zeros((num_latents, q), np.float32)
    lo = sorted_vals[np.where(has, safe + j, 0)]
    hi = sorted_vals[np.where(has, safe + j1, 0)]
    table = np.where(has, lo + (h - j) * (hi - lo), 0.0)
    # float32 rounding of an interpolation may break the order by one ulp: restore it.
    return np.maximum.accumulate(table.astype(np.float32), axis=1)


def reference_tables(
    latent_ids: npt.ArrayLike,
    values: npt.ArrayLike,
    num_latents: int,
    num_quantiles: int,
    total: int | npt.ArrayLike,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Each latent's real distribution as ``(frequency [L], active_table [L, Q])``.

    ``values`` are a latent's observed values, ``total`` its observations in all (an int for
    every latent, or ``[L]``): the ``total − c`` observations that are not samples are zeros,
    counted, never stored. ``frequency = #(value > 0) / total``; the active table is the
    exact linear-method table (:func:`quantile_tables`) of the values ``> 0``; a latent never
    active gets frequency 0 and a row of zeros.

    Raises:
        ValueError: a latent with no observations at all (``total = 0``: its frequency is
            undefined; the message names it), or the errors of :func:`quantile_tables`.
    """
    ids = _as_ids(latent_ids)
    vals = _as_f32(values, "values", 1)
    _check_same_length(ids, "latent_ids", vals, "values")
    num_latents = _check_int(num_latents, "num_latents", 0)
    tot = _as_count(total, "total")
    tot_arr = np.broadcast_to(np.asarray(tot, dtype=np.float64), (num_latents,))
    if num_latents and (tot_arr == 0).any():
        raise ValueError(
            f"latent {int(np.argmax(tot_arr == 0))} has no observations: its frequency is undefined"
        )
    if ids.size and int(ids.max()) >= num_latents:
        i = int(np.argmax(ids >= num_latents))
        raise ValueError(f"latent_ids[{i}] = {ids[i]} is not a known latent ({num_latents})")
    observed = np.bincount(ids, minlength=num_latents)
    short = observed > tot_arr
    if short.any():
        i = int(np.argmax(short))
        raise ValueError(
            f"total for latent {i} is {int(tot_arr[i])}, less than its {observed[i]} values"
        )
    active = vals > 0
    table = quantile_tables(ids[active], vals[active], num_latents, num_quantiles)
    counts = np.bincount(ids[active], minlength=num_latents)
    return (counts / np.maximum(tot_arr, 1.0)).astype(np.float32), table


def quantile_tables(
    latent_ids: npt.ArrayLike,
    values: npt.ArrayLike,
    num_latents: int,
    num_quantiles: int,
    total: int | npt.ArrayLike | None = None,
) -> npt.NDArray[np.float32]:
    """Exact per-latent quantile tables from samples, numpy's default ``linear`` method.

    Row ``l``, entry ``i`` is the quantile of latent ``l``'s ``n_l`` observations
    ``x_(0) ≤ … ≤ x_(n_l − 1)`` at ``p_i = i / (Q − 1)``: with ``h = p_i (n_l − 1)``,
    ``j = ⌊h⌋``, it is ``x_(j) + (h − j)(x_(j+1) − x_(j))`` (``np.quantile(x, p_i)``).

    Args:
        latent_ids: ``[m]`` latent of each sample.
        values: ``[m]`` sample values (finite).
        num_latents: ``L``, the number of rows.
        num_quantiles: ``Q ≥ 2``, entries per row.
        total: observations per latent, an int for all or an ``[L]`` array; the
            ``total_l − c_l`` observations not among latent ``l``'s ``c_l`` samples are
            implicit zeros (the real distribution of a sparse latent, zeros included,
            without materialising the zeros). ``None``: only the samples.

    Returns:
        float32 ``[L, Q]``; a latent with no observations at all gets a row of zeros.
    """
    ids = _as_ids(latent_ids)
    vals = _as_f32(values, "values", 1)
    _check_same_length(ids, "latent_ids", vals, "values")
    num_latents = _check_int(num_latents, "num_latents", 0)
    num_quantiles = _check_int(num_quantiles, "num_quantiles", 2)
    tot = None if total is None else _as_count(total, "total")
    return _core.quantile_tables(ids, vals, num_latents, num_quantiles, tot)


class QuantileSketch:
    """Mergeable per-latent quantile sketch (DDSketch) for streams too large to keep.

    A value ``v ≠ 0`` is counted in the logarithmic bucket ``k = ⌈ln|v| / ln γ⌉``,
    ``γ ≈ (1 + α)/(1 − α)`` (one set of buckets per sign), which stands for
    ``2γ^k/(γ + 1)``: within relative error ``α`` of every value in the bucket. Zeros, and
    each latent's minimum and maximum, are kept exactly.

    Guarantee: every entry of :meth:`tables` is within relative error ``alpha`` of the exact
    table :func:`quantile_tables` would compute from all values seen, whenever the two order
    statistics an entry interpolates do not straddle zero (always for non-negative data
    such as activations and scores) and the values are zero or of normal float32 magnitude
    (``|v| ≥ 1.2e-38``; an entry interpolated into float32's subnormal range is good to
    1.2e-38 absolute). Counts only add up, so :meth:`merge` is exact and order-independent:
    shards sketched separately and merged equal one sketch of everything.

    Memory: one count per occupied bucket range per latent, about
    ``ln(max/min) / (2 alpha)`` buckets for values spanning ``max/min``.
    """

    def __init__(self, num_latents: int, alpha: float = 0.01) -> None:
        """An empty sketch; ``alpha`` in ``[1e-4, 0.5]``."""
        num_latents = _check_int(num_latents, "num_latents", 0)
        self._inner = _core.QuantileSketch(num_latents, float(alpha))

    @property
    def num_latents(self) -> int:
        return self._inner.num_latents

    @property
    def alpha(self) -> float:
        return self._inner.alpha

    def __repr__(self) -> str:
        return f"QuantileSketch(num_latents={self.num_latents}, alpha={self.alpha})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantileSketch):
            return NotImplemented
        return bool(self._inner == other._inner)

    __hash__ = None  # pyright: ignore[reportAssignmentType]  # mutable

    def update(
        self,
        latent_ids: npt.ArrayLike,
        values: npt.ArrayLike,
        total: int | npt.ArrayLike | None = None,
    ) -> None:
        """Add a batch of ``(latent_id, value)`` observations.

        ``total``: observations per latent in *this batch* (an int, e.g. the number of
        tokens, or an ``[L]`` array); those not among the samples are zeros. A failed
        update leaves the sketch unchanged.
        """
        ids = _as_ids(latent_ids)
        vals = _as_f32(values, "values", 1)
        _check_same_length(ids, "latent_ids", vals, "values")
        tot = None if total is None else _as_count(total, "total")
        self._inner.update(ids, vals, tot)

    def add_zeros(self, counts: int | npt.ArrayLike) -> None:
        """Add ``counts`` zero observations to every latent (int) or per latent (``[L]``)."""
        self._inner.add_zeros(_as_count(counts, "counts"))

    def merge(self, other: QuantileSketch) -> None:
        """Add every count of ``other`` (same ``num_latents`` and ``alpha``) to this one."""
        if not isinstance(other, QuantileSketch):
            raise TypeError(f"other must be a QuantileSketch, got {type(other).__name__}")
        inner = other._inner.copy() if other is self else other._inner
        self._inner.merge(inner)

    def tables(self, num_quantiles: int) -> npt.NDArray[np.float32]:
        """Quantile tables ``[L, num_quantiles]`` of everything seen (linear method on the
        bucket values; a latent with no observations gets zeros)."""
        return self._inner.tables(_check_int(num_quantiles, "num_quantiles", 2))

    def counts(self) -> npt.NDArray[np.uint64]:
        """Observations per latent, samples and zeros, ``[L]``."""
        return self._inner.counts()

    def copy(self) -> QuantileSketch:
        new = QuantileSketch.__new__(QuantileSketch)
        new._inner = self._inner.copy()
        return new

    def state(self) -> dict[str, np.ndarray]:
        """The sketch as named 1-D arrays (canonical: equal sketches give equal arrays)."""
        return dict(self._inner.state())

    @classmethod
    def from_state(cls, state: Mapping[str, npt.ArrayLike]) -> QuantileSketch:
        """Rebuild a sketch from :meth:`state`; inconsistent arrays raise ``ValueError``."""
        dtypes = {
            "alpha": np.float64,
            "zeros": np.uint64,
            "min": np.float32,
            "max": np.float32,
            "pos_start": np.int32,
            "pos_len": np.uint64,
            "pos_counts": np.uint64,
            "neg_start": np.int32,
            "neg_len": np.uint64,
            "neg_counts": np.uint64,
        }
        arrays: dict[str, np.ndarray] = {}
        for key, dtype in dtypes.items():
            if key not in state:
                raise ValueError(f"invalid sketch state: missing array {key!r}")
            a = np.asarray(state[key])
            if a.ndim != 1 or a.dtype != dtype:
                raise ValueError(
                    f"invalid sketch state: {key!r} must be 1-D {np.dtype(dtype)}, "
                    f"got {a.dtype} with shape {a.shape}"
                )
            arrays[key] = np.ascontiguousarray(a)
        new = cls.__new__(cls)
        new._inner = _core.QuantileSketch.from_state(arrays)
        return new

    def save(self, path: PathLike, **metadata: str) -> None:
        """Write the sketch atomically as safetensors (to resume a streamed build later)."""
        meta = _metadata(metadata, SKETCH_FORMAT)
        with atomic_path(path) as tmp:
            save_file(self.state(), tmp, metadata=meta)

    @classmethod
    def load(cls, path: PathLike) -> QuantileSketch:
        """Read a sketch written by :meth:`save`; a bad file raises ``ValueError`` naming it."""
        tensors, _ = _read(path, SKETCH_FORMAT)
        try:
            return cls.from_state(tensors)
        except ValueError as e:
            raise ValueError(f"{os.fspath(path)}: {e}") from e


@dataclass(frozen=True)
class QuantileTables:
    """Tables read by :func:`load_tables`: ``sim`` (float32 ``[L, Qs]``, mid-rank positions)
    and/or the reference ``active`` (float32 ``[L, Qr]``) with its ``frequency`` (``[L]``)."""

    sim: npt.NDArray[np.float32] | None
    active: npt.NDArray[np.float32] | None
    frequency: npt.NDArray[np.float32] | None
    metadata: dict[str, str] = field(default_factory=dict)


def _check_table(t: np.ndarray, name: str) -> None:
    """Raise ``ValueError`` unless ``t`` is a finite, row-ascending ``[L, Q ≥ 2]`` table."""
    if t.ndim != 2 or t.shape[1] < 2:
        raise ValueError(f"{name} must have shape [L, Q] with Q >= 2, got {t.shape}")
    finite = np.isfinite(t).all(axis=1)
    if not finite.all():
        raise ValueError(f"{name}: latent {int(np.argmin(finite))} has a non-finite entry")
    ascending = (np.diff(t, axis=1) >= 0).all(axis=1)
    if not ascending.all():
        raise ValueError(f"{name}: latent {int(np.argmin(ascending))} is not sorted ascending")


def _metadata(metadata: Mapping[str, Any], fmt: str) -> dict[str, str]:
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise TypeError(f"metadata {key!r} must be a str, got {type(value).__name__}")
    if _FORMAT_KEY in metadata:
        raise ValueError(f"metadata key {_FORMAT_KEY!r} is reserved")
    return {**metadata, _FORMAT_KEY: fmt}


def save_tables(
    path: PathLike,
    *,
    sim: npt.ArrayLike | None = None,
    active: npt.ArrayLike | None = None,
    frequency: npt.ArrayLike | None = None,
    **metadata: str,
) -> None:
    """Write quantile tables atomically as safetensors: ``sim`` and/or the reference
    (``active`` with its ``frequency``, both or neither).

    Tables are checked (2-D, ``Q ≥ 2``, finite, ascending per row; one ``L`` for all;
    frequencies in [0, 1]) before anything is written; ``metadata`` values must be strings.
    """
    if (active is None) != (frequency is None):
        raise ValueError("save_tables needs active= and frequency= together")
    tensors: dict[str, np.ndarray] = {}
    for name, t in (("sim", sim), ("active", active)):
        if t is not None:
            a = _as_f32(t, name, 2)
            _check_table(a, name)
            tensors[name] = a
    if frequency is not None:
        freq = _as_f32(frequency, "frequency", 1)
        _check_frequency(freq, "frequency")
        tensors["frequency"] = freq
    if not tensors:
        raise ValueError("save_tables needs sim=, active= and frequency=, or all three")
    rows = {k: v.shape[0] for k, v in tensors.items()}
    if len(set(rows.values())) > 1:
        raise ValueError(f"the tables have different numbers of latents: {rows}")
    meta = _metadata(metadata, TABLES_FORMAT)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)


def _check_frequency(f: np.ndarray, name: str) -> None:
    bad = ~np.isfinite(f) | (f < 0) | (f > 1)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{name}: latent {i} has frequency {f[i]}, outside [0, 1]")


def _read(path: PathLike, fmt: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors and the metadata of a safetensors file of format ``fmt``."""
    name = os.fspath(path)
    if not os.path.exists(name):
        raise FileNotFoundError(f"{name}: no such file")
    try:
        with safe_open(name, framework="np") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as e:  # safetensors raises its own error types, and OSError/ValueError
        raise ValueError(
            f"{name}: not a readable safetensors file (truncated or corrupt?): {e}"
        ) from e
    found = metadata.pop(_FORMAT_KEY, None)
    if found in _OLD_TABLES_FORMATS and fmt == TABLES_FORMAT:
        raise ValueError(
            f"{name}: quantile tables of format {found}, from before quantile normalization "
            "became exact for sparse latents; re-run `nlrw calibrate` (and `nlrw cache`)"
        )
    if found != fmt:
        raise ValueError(f"{name}: expected a {fmt} file, found format {found!r}")
    return tensors, metadata


def load_tables(path: PathLike) -> QuantileTables:
    """Read tables written by :func:`save_tables`, checked as on save.

    Raises:
        FileNotFoundError: no such file.
        ValueError: truncated, corrupt, foreign or old-format file, or invalid tables
            (names the file).
    """
    tensors, metadata = _read(path, TABLES_FORMAT)
    name = os.fspath(path)
    unknown = set(tensors) - {"sim", "active", "frequency"}
    if unknown or not tensors or (("active" in tensors) != ("frequency" in tensors)):
        raise ValueError(
            f"{name}: expected tensors 'sim' and/or 'active' with 'frequency', "
            f"found {sorted(tensors)}"
        )
    for key, t in tensors.items():
        if t.dtype != np.float32:
            raise ValueError(f"{name}: {key} has dtype {t.dtype}, expected float32")
        try:
            if key == "frequency":
                if t.ndim != 1:
                    raise ValueError(f"frequency must be 1-D, got shape {t.shape}")
                _check_frequency(t, key)
            else:
                _check_table(t, key)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from e
    rows = {k: v.shape[0] for k, v in tensors.items()}
    if len(set(rows.values())) > 1:
        raise ValueError(f"{name}: the tables have different numbers of latents: {rows}")
    return QuantileTables(
        sim=tensors.get("sim"),
        active=tensors.get("active"),
        frequency=tensors.get("frequency"),
        metadata=metadata,
    )
