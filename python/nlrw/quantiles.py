"""Per-latent quantile tables and quantile normalization: the calibration of simulated scores.

The simulator's scores live on their own scale. Quantile normalization maps a simulated
score ``s`` of latent ``l`` to the real activation at the same quantile::

    a = F_real⁻¹(F_sim(s))

Each distribution is summarised by a **quantile table**: a float32 array ``[L, Q]`` whose row
``l`` holds latent ``l``'s quantiles at the probabilities ``p_i = i / (Q − 1)``
(``numpy.linspace(0, 1, Q)``), ascending. The simulated and real tables may have different
``Q`` but must have the same ``L``.

``F_sim`` (piecewise-linear in the table, with ties): let ``t`` be the sim row, ``a`` the first
index with ``t[a] ≥ s`` and ``b`` the last index with ``t[b] ≤ s``.

* ``s < t[0]`` gives 0, ``s > t[Q−1]`` gives 1;
* ``a ≤ b`` (``s`` equals the run of entries ``a..b``; common, since many contexts get the same
  simulated score) gives the middle of the run, ``(p_a + p_b) / 2``;
* otherwise ``p_b + (s − t[b]) / (t[b+1] − t[b]) · (p_{b+1} − p_b)``.

``F_real⁻¹`` is linear interpolation of the real row at that probability
(``numpy.interp(p, linspace(0, 1, Q), row)``); a probability inside the real table's run of
zeros (most real activations are exactly 0) gives 0.

Tables come exactly from samples (:func:`quantile_tables`, numpy's default ``linear`` method)
or, for streams too large to keep, from a mergeable :class:`QuantileSketch` with relative
accuracy ``alpha``. :func:`save_tables` / :func:`load_tables` store them as safetensors.

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
from nlrw.io import atomic_path

__all__ = [
    "QuantileSketch",
    "QuantileTables",
    "load_tables",
    "probabilities",
    "quantile_normalize",
    "quantile_tables",
    "save_tables",
]

TABLES_FORMAT = "nlrw.quantile_tables.v1"
SKETCH_FORMAT = "nlrw.quantile_sketch.v1"
_FORMAT_KEY = "nlrw_format"
_U32_MAX = 2**32 - 1
_F32_EXACT_INT = 2**24

PathLike = str | os.PathLike[str]


def probabilities(num_quantiles: int) -> npt.NDArray[np.float64]:
    """The probabilities ``linspace(0, 1, Q)`` at which a table's ``Q`` entries sit."""
    return np.linspace(0.0, 1.0, num_quantiles)


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
    real_table: npt.ArrayLike,
) -> npt.NDArray[np.float32]:
    """Map each score of its latent through ``F_real⁻¹(F_sim(score))``.

    Args:
        latent_ids: ``[m]`` latent of each score (non-negative integers ``< L``).
        scores: ``[m]`` simulated scores (finite; float64 rounds to float32).
        sim_table: ``[L, Qs]`` quantiles of each latent's simulated scores (``Qs ≥ 2``).
        real_table: ``[L, Qr]`` quantiles of each latent's real activations (``Qr ≥ 2``).

    Returns:
        ``[m]`` float32 calibrated activations; the ties rule and the interpolation are in
        the module docstring.

    Any order of the scores works. Scores of one latent next to each other are fastest
    (its table rows stay in cache); scattered orders (e.g. by context) are bucketed by
    latent block internally, which costs about twice as much. The tables are validated and
    a per-entry table of tie values is built on every call (``O(L·Q)``), so batch many
    scores per call.

    Raises:
        ValueError: wrong ndim or lengths, an unknown latent id, a non-finite score, a table
            that is not finite and ascending per row (the message names the latent).
        TypeError: a non-numeric argument.
    """
    ids = _as_ids(latent_ids)
    s = _as_f32(scores, "scores", 1)
    _check_same_length(ids, "latent_ids", s, "scores")
    sim = _as_f32(sim_table, "sim_table", 2)
    real = _as_f32(real_table, "real_table", 2)
    return _core.quantile_normalize(ids, s, sim, real)


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
    """Tables read by :func:`load_tables`: ``sim`` and/or ``real`` (float32 ``[L, Q]``)."""

    sim: npt.NDArray[np.float32] | None
    real: npt.NDArray[np.float32] | None
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
    real: npt.ArrayLike | None = None,
    **metadata: str,
) -> None:
    """Write quantile tables atomically as safetensors (tensors ``sim`` and/or ``real``).

    Tables are checked (2-D, ``Q ≥ 2``, finite, ascending per row; same ``L`` when both are
    given) before anything is written; ``metadata`` values must be strings.
    """
    tensors: dict[str, np.ndarray] = {}
    for name, t in (("sim", sim), ("real", real)):
        if t is not None:
            a = _as_f32(t, name, 2)
            _check_table(a, name)
            tensors[name] = a
    if not tensors:
        raise ValueError("save_tables needs sim=, real= or both")
    if len(tensors) == 2 and tensors["sim"].shape[0] != tensors["real"].shape[0]:
        raise ValueError(
            f"sim has {tensors['sim'].shape[0]} latents but real has {tensors['real'].shape[0]}"
        )
    meta = _metadata(metadata, TABLES_FORMAT)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)


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
    if found != fmt:
        raise ValueError(f"{name}: expected a {fmt} file, found format {found!r}")
    return tensors, metadata


def load_tables(path: PathLike) -> QuantileTables:
    """Read tables written by :func:`save_tables`, checked as on save.

    Raises:
        FileNotFoundError: no such file.
        ValueError: truncated, corrupt or foreign file, or invalid tables (names the file).
    """
    tensors, metadata = _read(path, TABLES_FORMAT)
    name = os.fspath(path)
    unknown = set(tensors) - {"sim", "real"}
    if unknown or not tensors:
        raise ValueError(f"{name}: expected tensors 'sim' and/or 'real', found {sorted(tensors)}")
    for key, t in tensors.items():
        if t.dtype != np.float32:
            raise ValueError(f"{name}: {key} has dtype {t.dtype}, expected float32")
        try:
            _check_table(t, key)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from e
    sim, real = tensors.get("sim"), tensors.get("real")
    if sim is not None and real is not None and sim.shape[0] != real.shape[0]:
        raise ValueError(f"{name}: sim has {sim.shape[0]} latents but real has {real.shape[0]}")
    return QuantileTables(sim=sim, real=real, metadata=metadata)
