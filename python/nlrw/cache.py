"""The latent cache: the sparse coder's latents over held-out activations, per-latent
statistics and quantile tables, and each latent's top activating windows.

The ``cache`` stage runs the transcoder's (or SAE's) encoder, the Rust top-k of
:meth:`nlrw.model.sparse.SparseCoder.encode`, over a shard set written by :mod:`nlrw.collect` and
streams the sparse latents to disk in bounded memory. Output, under the run directory::

    latents/
      parts.json            chunk manifest: source, sizes, identity of the coder and the
                            activations, and per finished chunk its part file, rows, entries
                            and checksum (rewritten atomically after every part)
      part-000000.parquet   sparse latents of one chunk of rows: ``row`` int64, ``latent``
                            int32, ``value`` float32 (only values > 0), sorted by
                            (latent, row), with row-group statistics so that a query for a
                            few latents skips most of each file
      stats.parquet         one row per latent: ``latent``, ``count`` (active positions),
                            ``frequency`` (count / rows), ``max``, ``mean`` (over active
                            positions; 0 for a dead latent), ``n_active_windows``, and the
                            calibration's *reference* (see below): ``reference_frequency``,
                            ``reference_max`` and ``active_quantiles`` (list[f32], Q entries:
                            the quantiles of the latent's active values at
                            ``linspace(0, 1, Q)``)
      positions.parquet     per position of a collected sequence: ``position``, ``n_tokens``,
                            ``max`` (the largest activation of any latent there) and
                            ``mean_total`` (mean sum of the active values per token)
      quantiles.safetensors the reference, ``save_tables(path, active=..., frequency=...)
      top_windows.parquet   ``latent``, ``window``, ``max_activation``, ``rank``: each
                            latent's top ``max_examples`` windows by max activation
      cache.json            provenance and summary; written last (the stage's done mark)

The token ids are not copied: they stay in the source split's ``tokens.npy``
(:func:`window_tokens` reads them).

**Which activations.** ``source = "eval"`` (default) reads ``activations/eval/``, text held out
from the transcoder's training (for the embedded corpus, a whole book). The paper built its
explanations from the cache of its training distribution (the same 10M pile tokens the
transcoder was trained on); nlrw keeps explanation examples held out from transcoder
training by default, and ``source = "train"`` gives the paper's behaviour. The default split
may be small (20k tokens in the demo preset): how large it should be is a sizing question
for the collect stage.

**Windows.** A *window* is a span of ``window_len`` tokens of one collected sequence
(``ctx_len`` tokens): sequence ``s`` holds windows ``s * W + j`` for ``j < W = ctx_len //
window_len``, covering tokens ``[j * window_len, (j + 1) * window_len)``; windows never
overlap by construction, and the ``ctx_len % window_len`` tail tokens of a sequence belong
to none (they still count in the statistics). A window of a partial last sequence counts only
when all its tokens are in the set. A window's activation for latent ``l`` is the max over
its tokens.

**Top windows.** Per chunk, the (latent, window) maxima of the chunk's active pairs are merged
into a per-latent top-N (``N = max_examples``; memory at most ``N·L`` pairs plus one chunk),
ranked by max activation descending, ties broken by the lower window. Chunks hold whole
sequences, so a window never straddles two chunks.

**Non-activating windows.** :func:`random_inactive_windows` draws windows where the latent has
no activation > 0 on any token: the complement of its active windows, read from the parts
(no per-window bitset is stored: it would cost ``L × windows`` bits, 1.3 GB at the paper's
size; the parts sorted by latent answer a latent's query from one row group per part).

**Quantiles.** Exact (:func:`nlrw.model.quantiles.reference_tables` over every active value of the
reference positions, their zeros counted) when ``exact_quantiles`` is true, or by default
when ``rows × k ≤ EXACT_QUANTILES_MAX_ENTRIES`` (an upper bound on the active values,
which are then read back into memory once, at the end); otherwise a streamed
:class:`nlrw.model.quantiles.QuantileSketch` (relative error ``sketch_alpha``) fed chunk by chunk
with the reference positions' active values only (the frequency comes from the counts).

**The reference distribution.** Calibration maps simulated scores onto each latent's real
distribution, and the evaluation rewrites the *last* token of a ``ctx_len``-token window (31
tokens of context in the demo and the paper). The cache's sequences are longer and their
first positions are unlike any evaluated token (position 0 is an attention sink whose
activations are extreme: ``positions.parquet`` shows the maximum per position). The
reference is therefore taken over the positions ``≥ reference_min_position`` (default
``window_len − 1``: tokens with at least a window's worth of context, like the evaluated
ones): ``reference_frequency`` (active share of those tokens), ``active_quantiles`` and
``reference_max`` (the uncalibrated mapping's ``max``). ``cache.json`` records
``reference_tokens``, the number of tokens they are taken over.

**Bounded memory and resuming.** Rows are read with :class:`nlrw.model.shards.ShardReader` and
encoded in batches of ``batch_rows`` rows that start at each chunk's first row, so a chunk's
latents do not depend on where a run started. Each chunk's part is written atomically and
then listed in ``parts.json``: a kill loses at most the chunk in progress. A resumed run
checks each listed part (size and checksum) and reads it back instead of re-encoding; the
running statistics are rebuilt from the parts in the same order, so a resumed cache is
identical to an uninterrupted one. A missing or corrupt part is re-made (with a warning
naming it).

Why this module is long: the cache is one streaming pass over the held-out activations, and
its outputs (statistics, quantile sketches, top windows, reference positions) are all
updated from the same chunk of latents; split, each would re-read the shards.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import shutil
import time
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import polars as pl
import torch

from nlrw.config.cache import CacheConfig
from nlrw.lib.io import atomic_path, atomic_write_json, file_digest
from nlrw.lib.provenance import config_hash, stage_record
from nlrw.lib.rundir import RunDir
from nlrw.model import sparse
from nlrw.model.quantiles import QuantileSketch, reference_tables, save_tables
from nlrw.model.shards import ShardReader

__all__ = [
    "EXACT_QUANTILES_MAX_ENTRIES",
    "CacheConfig",
    "CacheResult",
    "active_windows",
    "latents_dir",
    "random_inactive_windows",
    "read_stats",
    "read_top_windows",
    "run",
    "window_activations",
    "window_tokens",
]

log = logging.getLogger(__name__)

EXACT_QUANTILES_MAX_ENTRIES = 50_000_000
"""Auto mode computes exact quantile tables up to this many active values (≈ 400 MB)."""

_PARTS_FORMAT = "nlrw.latent_parts.v1"
_ROW_GROUP_ENTRIES = 65_536


# Fields that do not change what the cache holds (a resume may change them).
_RUN_ONLY_FIELDS = frozenset({"progress", "seed"})


class CacheResult(NamedTuple):
    """Summary of a cache run."""

    path: str
    """The ``latents/`` directory."""
    source: str
    n_rows: int
    n_windows: int
    num_latents: int
    n_entries: int
    """Active (row, latent) pairs stored."""
    n_live_latents: int
    """Latents active at least once."""
    exact_quantiles: bool
    parts_reused: int
    """Parts read back from an earlier (killed) run instead of re-encoded."""
    skipped: bool
    """Everything was already done."""


class _Layout(NamedTuple):
    n_rows: int
    ctx_len: int
    window_len: int
    windows_per_seq: int
    n_windows: int


def _reference_rows(rows: npt.NDArray[np.int64], lay: _Layout, min_position: int) -> np.ndarray:
    """Which rows are reference positions (position in their sequence ``≥ min_position``)."""
    return rows % lay.ctx_len >= min_position


def _reference_tokens(lay: _Layout, min_position: int) -> int:
    """Rows at reference positions, a partial last sequence included."""
    full, tail = divmod(lay.n_rows, lay.ctx_len)
    return full * max(lay.ctx_len - min_position, 0) + max(tail - min_position, 0)


def latents_dir(run_dir: str | Path) -> Path:
    """Where the cache stage writes (``run_dir/latents``)."""
    return RunDir(run_dir).latents


def _windows_of_rows(rows: npt.NDArray[np.int64], lay: _Layout) -> npt.NDArray[np.int64]:
    """Window of each row, ``-1`` for rows in no (complete) window."""
    seq, pos = np.divmod(rows, lay.ctx_len)
    j = pos // lay.window_len
    win = seq * lay.windows_per_seq + j
    return np.where((j < lay.windows_per_seq) & (win < lay.n_windows), win, -1)


# ------------------------------------------------------------------------ accumulation


class _Accumulator:
    """Running statistics, quantiles and top windows, fed one chunk at a time."""

    def __init__(self, num_latents: int, cfg: CacheConfig, lay: _Layout, exact: bool) -> None:
        self.L = num_latents
        self.cfg = cfg
        self.lay = lay
        self.count = np.zeros(num_latents, np.int64)
        self.sum = np.zeros(num_latents, np.float64)
        self.max = np.zeros(num_latents, np.float32)
        self.n_active_windows = np.zeros(num_latents, np.int64)
        self.min_position = _min_position(cfg)
        self.ref_count = np.zeros(num_latents, np.int64)
        self.ref_max = np.zeros(num_latents, np.float32)
        self.pos_max = np.zeros(lay.ctx_len, np.float32)
        self.pos_sum = np.zeros(lay.ctx_len, np.float64)
        self.sketch = None if exact else QuantileSketch(num_latents, cfg.sketch_alpha)
        self.top_latent = np.zeros(0, np.int32)
        self.top_window = np.zeros(0, np.int64)
        self.top_value = np.zeros(0, np.float32)

    def update(
        self,
        chunk_rows: int,
        row: npt.NDArray[np.int64],
        latent: npt.NDArray[np.int32],
        value: npt.NDArray[np.float32],
    ) -> None:
        """One chunk's entries, sorted by (latent, row)."""
        L = self.L
        self.count += np.bincount(latent, minlength=L)
        self.sum += np.bincount(latent, weights=value.astype(np.float64), minlength=L)
        if latent.size:
            starts = np.flatnonzero(np.r_[True, latent[1:] != latent[:-1]])
            ids = latent[starts]
            self.max[ids] = np.maximum(self.max[ids], np.maximum.reduceat(value, starts))
        pos = row % self.lay.ctx_len
        np.maximum.at(self.pos_max, pos, value)
        self.pos_sum += np.bincount(
            pos, weights=value.astype(np.float64), minlength=len(self.pos_sum)
        )
        ref = pos >= self.min_position
        self.ref_count += np.bincount(latent[ref], minlength=L)
        np.maximum.at(self.ref_max, latent[ref], value[ref])
        if self.sketch is not None:
            self.sketch.update(latent[ref].astype(np.uint32), value[ref])

        # (latent, window) maxima of the chunk.
        win = _windows_of_rows(row, self.lay)
        keep = win >= 0
        if not keep.any():
            return
        lat_k, win_k, val_k = latent[keep].astype(np.int64), win[keep], value[keep]
        key = lat_k * self.lay.n_windows + win_k
        order = np.argsort(key, kind="stable")
        key, val_k = key[order], val_k[order]
        starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
        ukey = key[starts]
        wmax = np.maximum.reduceat(val_k, starts)
        pair_latent = (ukey // self.lay.n_windows).astype(np.int32)
        pair_window = ukey % self.lay.n_windows
        self.n_active_windows += np.bincount(pair_latent, minlength=L)
        self._merge_top(pair_latent, pair_window, wmax)

    def _merge_top(
        self,
        latent: npt.NDArray[np.int32],
        window: npt.NDArray[np.int64],
        value: npt.NDArray[np.float32],
    ) -> None:
        lat = np.concatenate([self.top_latent, latent])
        win = np.concatenate([self.top_window, window])
        val = np.concatenate([self.top_value, value])
        # Latent ascending, then value descending, then window ascending.
        order = np.lexsort((win, -val, lat))
        lat, win, val = lat[order], win[order], val[order]
        rank = _ranks(lat)
        keep = rank < self.cfg.max_examples
        self.top_latent, self.top_window, self.top_value = lat[keep], win[keep], val[keep]

    def stats_frame(
        self, n_rows: int, frequency: npt.NDArray[np.float32], tables: npt.NDArray[np.float32]
    ) -> pl.DataFrame:
        mean = np.divide(
            self.sum, self.count, out=np.zeros(self.L, np.float64), where=self.count > 0
        )
        return pl.DataFrame(
            {
                "latent": np.arange(self.L, dtype=np.int32),
                "count": self.count,
                "frequency": self.count / max(n_rows, 1),
                "max": self.max,
                "mean": mean.astype(np.float32),
                "n_active_windows": self.n_active_windows,
                "reference_frequency": frequency.astype(np.float64),
                "reference_max": self.ref_max,
                "active_quantiles": pl.Series(
                    "active_quantiles", tables.tolist(), dtype=pl.List(pl.Float32)
                ),
            }
        )

    def positions_frame(self) -> pl.DataFrame:
        """Per sequence position: tokens, the largest activation, the mean total activation."""
        lay = self.lay
        full, tail = divmod(lay.n_rows, lay.ctx_len)
        tokens = full + (np.arange(lay.ctx_len) < tail)
        return pl.DataFrame(
            {
                "position": np.arange(lay.ctx_len, dtype=np.int32),
                "n_tokens": tokens.astype(np.int64),
                "max": self.pos_max,
                "mean_total": self.pos_sum / np.maximum(tokens, 1),
            }
        )

    def top_frame(self) -> pl.DataFrame:
        return pl.DataFrame(
            {
                "latent": self.top_latent,
                "window": self.top_window,
                "max_activation": self.top_value,
                "rank": _ranks(self.top_latent).astype(np.int32),
            }
        )


def _ranks(sorted_ids: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
    """Position of each element within its run of equal ids (ids sorted)."""
    n = sorted_ids.size
    if n == 0:
        return np.zeros(0, np.int64)
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    lengths = np.diff(np.r_[starts, n])
    return np.arange(n) - np.repeat(starts, lengths)


# ------------------------------------------------------------------------ parts


def _write_part(path: Path, row: np.ndarray, latent: np.ndarray, value: np.ndarray) -> str:
    frame = pl.DataFrame({"row": row, "latent": latent, "value": value})
    with atomic_path(path) as tmp:
        frame.write_parquet(tmp, statistics=True, row_group_size=_ROW_GROUP_ENTRIES)
    return file_digest(path)


def _read_part(
    path: Path, entry: dict[str, Any]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int32], npt.NDArray[np.float32]] | None:
    """A listed part's arrays, or None (with a warning) when it is missing or corrupt."""
    try:
        if file_digest(path) != entry["digest"]:
            raise ValueError("checksum mismatch")
        frame = pl.read_parquet(path)
        if frame.height != entry["entries"]:
            raise ValueError(f"{frame.height} entries, parts.json lists {entry['entries']}")
        row = frame["row"].to_numpy().astype(np.int64, copy=False)
        latent = frame["latent"].to_numpy().astype(np.int32, copy=False)
        value = frame["value"].to_numpy().astype(np.float32, copy=False)
    except FileNotFoundError:
        log.warning("latent part %s is missing: re-making it", path)
        return None
    except Exception as e:  # a damaged file: polars/arrow raise several types
        log.warning("latent part %s is unreadable (%s): re-making it", path, e)
        return None
    return row, latent, value


def _row_blocks(
    reader: ShardReader, bounds: Sequence[int]
) -> Generator[npt.NDArray[Any], None, None]:
    """The rows ``[bounds[i], bounds[i+1])`` of a set read in order, one array per block.

    Blocks inside one reader batch are views; others are copied together (at most one
    block of rows is held)."""
    it = iter(reader)
    buf: npt.NDArray[Any] | None = None
    pos = 0  # row index of buf[0]
    for a, b in itertools.pairwise(bounds):
        pieces: list[npt.NDArray[Any]] = []
        need_from = a
        while need_from < b:
            if buf is None or need_from >= pos + buf.shape[0]:
                if buf is not None:
                    pos += buf.shape[0]
                buf = next(it)
                continue
            lo = need_from - pos
            hi = min(b - pos, buf.shape[0])
            pieces.append(buf[lo:hi])
            need_from = pos + hi
        yield pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


# ------------------------------------------------------------------------ the stage


def _source_dir(run_dir: Path, source: str) -> Path:
    return RunDir(run_dir).split(source)


def _layout(n_rows: int, ctx_len: int, window_len: int) -> _Layout:
    if window_len > ctx_len:
        raise ValueError(
            f"cache.window_len = {window_len} exceeds the activations' context length {ctx_len}"
        )
    wps = ctx_len // window_len
    full, tail = divmod(n_rows, ctx_len)
    n_windows = full * wps + min(tail // window_len, wps)
    return _Layout(n_rows, ctx_len, window_len, wps, n_windows)


def _open_source(run_dir: Path, cfg: CacheConfig) -> tuple[Path, ShardReader, int]:
    src = _source_dir(run_dir, cfg.source)
    if not (src / "manifest.json").is_file():
        hint = (
            " (collect.n_eval_tokens = 0 collects no held-out split; set it, or cache.source ="
            " 'train')"
            if cfg.source == "eval"
            else ""
        )
        raise FileNotFoundError(
            f"activations {src} not found (no manifest.json): run the collect stage first{hint}"
        )
    tokens = src / "tokens.npy"
    if not tokens.is_file():
        raise FileNotFoundError(f"activations {src} have no tokens.npy: {tokens}")
    reader = ShardReader(src, batch_rows=cfg.batch_rows, prefetch=2)
    if not reader.complete:
        raise ValueError(f"activations {src} are incomplete (collect was killed?): resume collect")
    ctx_len = int(np.load(tokens, mmap_mode="r").shape[1])
    return src, reader, ctx_len


def _identity(
    cfg: CacheConfig, coder_path: Path, src: Path, num_latents: int, lay: _Layout
) -> dict[str, Any]:
    """What the parts depend on: a resume must match it."""
    options = {
        k: v
        for k, v in cfg.__dict__.items()
        if k not in _RUN_ONLY_FIELDS and k in ("source", "batch_rows", "chunk_rows")
    }
    return {
        "format": _PARTS_FORMAT,
        "options": options,
        "coder": file_digest(coder_path / sparse.WEIGHTS_FILE),
        "activations": hashlib.blake2b(
            (src / "manifest.json").read_bytes(), digest_size=16
        ).hexdigest(),
        "num_latents": num_latents,
        "n_rows": lay.n_rows,
        "ctx_len": lay.ctx_len,
    }


def _chunk_bounds(n_rows: int, ctx_len: int, chunk_rows: int) -> list[int]:
    step = max(1, chunk_rows // ctx_len) * ctx_len
    return [*range(0, n_rows, step), n_rows] if n_rows else [0]


def _outputs_done(out: Path, key: str) -> CacheResult | None:
    try:
        record = json.loads((out / "cache.json").read_text())
        parts = json.loads((out / "parts.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if record.get("key") != key:
        return None
    needed = [out / p["file"] for p in parts.get("parts", [])]
    needed += [out / "stats.parquet", out / "top_windows.parquet", out / "quantiles.safetensors"]
    needed += [out / "positions.parquet"]
    if not all(p.is_file() for p in needed):
        return None
    return CacheResult(**{**record["result"], "skipped": True, "parts_reused": 0})


def run(
    cfg: CacheConfig,
    run_dir: str | Path,
    *,
    hookpoint: str,
    overwrite: bool = False,
) -> CacheResult:
    """Cache the latents of ``run_dir/transcoder/<hookpoint>`` over ``activations/<source>``.

    Safe to kill and call again (finished parts are reused). ``overwrite`` replaces a cache
    made with other options or another coder; without it such a cache raises ``ValueError``.

    Raises:
        FileNotFoundError: no activations (or no checkpoint), naming the path.
        ValueError: the checkpoint's width does not match the activations' (naming both
            paths and widths), or a cache of another config is there and not ``overwrite``.
    """
    run_dir = Path(run_dir)
    out = latents_dir(run_dir)
    src, reader, ctx_len = _open_source(run_dir, cfg)
    coder_path = RunDir(run_dir).coder(hookpoint)
    coder = sparse.load(coder_path)
    sparse.check_activation_width(coder, coder_path, reader.width, Path(reader.path))
    lay = _layout(reader.num_rows, ctx_len, cfg.window_len)
    L = coder.num_latents
    identity = _identity(cfg, coder_path, src, L, lay)
    key = config_hash(
        {
            "identity": identity,
            "config": {k: v for k, v in cfg.__dict__.items() if k not in _RUN_ONLY_FIELDS},
        }
    )

    if not overwrite and (done := _outputs_done(out, key)) is not None:
        return done

    parts_path = out / "parts.json"
    listed: dict[int, dict[str, Any]] = {}
    if parts_path.exists() and not overwrite:
        try:
            manifest = json.loads(parts_path.read_text())
        except json.JSONDecodeError:
            manifest = None
            log.warning("%s is damaged: starting the cache again", parts_path)
        if manifest is not None:
            if manifest.get("identity") != identity:
                raise ValueError(
                    f"{out} holds a cache of another config, coder or activations "
                    f"(see {parts_path}); pass overwrite=True to replace it"
                )
            listed = {int(p["chunk"]): p for p in manifest["parts"]}
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cache.json").unlink(missing_ok=True)

    exact = (
        cfg.exact_quantiles
        if cfg.exact_quantiles is not None
        else lay.n_rows * coder.k <= EXACT_QUANTILES_MAX_ENTRIES
    )
    acc = _Accumulator(L, cfg, lay, exact)
    bounds = _chunk_bounds(lay.n_rows, ctx_len, cfg.chunk_rows)
    kind = coder.cfg.kind
    reused = 0
    started = time.perf_counter()

    from tqdm.auto import tqdm

    bar = tqdm(
        total=lay.n_rows, unit="row", unit_scale=True, desc="cache", disable=not cfg.progress
    )
    blocks = _row_blocks(reader, bounds)
    try:
        for c, (a, b) in enumerate(itertools.pairwise(bounds)):
            rows_block = next(blocks)
            part_file = f"part-{c:06d}.parquet"
            arrays = None
            if c in listed:
                arrays = _read_part(out / part_file, listed[c])
                reused += arrays is not None
            if arrays is None:
                arrays = _encode_chunk(coder, kind, rows_block, a, cfg.batch_rows)
                digest = _write_part(out / part_file, *arrays)
                listed[c] = {
                    "chunk": c,
                    "file": part_file,
                    "rows": [a, b],
                    "entries": int(arrays[0].size),
                    "digest": digest,
                }
                atomic_write_json(
                    parts_path,
                    {"identity": identity, "parts": [listed[i] for i in sorted(listed)]},
                )
            acc.update(b - a, *arrays)
            bar.update(b - a)
    finally:
        bar.close()
        blocks.close()

    n_reference = _reference_tokens(lay, acc.min_position)
    if n_reference == 0:
        raise ValueError(
            f"cache.reference_min_position = {acc.min_position} leaves no token of the "
            f"{lay.ctx_len}-token sequences in {src}"
        )
    if exact:
        files = [listed[i]["file"] for i in sorted(listed)]
        frequency, tables = _exact_tables(out, files, L, cfg, lay, n_reference)
    else:
        assert acc.sketch is not None
        tables = acc.sketch.tables(cfg.num_quantiles)
        frequency = (acc.ref_count / n_reference).astype(np.float32)
    with atomic_path(out / "stats.parquet") as tmp:
        acc.stats_frame(lay.n_rows, frequency, tables).write_parquet(tmp)
    with atomic_path(out / "top_windows.parquet") as tmp:
        acc.top_frame().write_parquet(tmp)
    with atomic_path(out / "positions.parquet") as tmp:
        acc.positions_frame().write_parquet(tmp)
    save_tables(
        out / "quantiles.safetensors",
        active=tables,
        frequency=frequency,
        source=cfg.source,
        exact=str(exact),
        hookpoint=hookpoint,
    )
    result = CacheResult(
        path=str(out),
        source=cfg.source,
        n_rows=lay.n_rows,
        n_windows=lay.n_windows,
        num_latents=L,
        n_entries=int(acc.count.sum()),
        n_live_latents=int((acc.count > 0).sum()),
        exact_quantiles=bool(exact),
        parts_reused=reused,
        skipped=False,
    )
    atomic_write_json(
        out / "cache.json",
        stage_record(
            "cache",
            cfg,
            key=key,
            hookpoint=hookpoint,
            coder=str(coder_path),
            activations=str(src),
            ctx_len=ctx_len,
            window_len=cfg.window_len,
            windows_per_sequence=lay.windows_per_seq,
            reference_min_position=acc.min_position,
            reference_tokens=n_reference,
            seconds=time.perf_counter() - started,
            result=result._asdict(),
        ),
    )
    return result


@torch.no_grad()
def _encode_chunk(
    coder: sparse.SparseCoder,
    kind: str,
    rows_block: npt.NDArray[Any],
    first_row: int,
    batch_rows: int,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """Sparse latents (value > 0) of a chunk, sorted by (latent, row)."""
    rows_l, lat_l, val_l = [], [], []
    for s in range(0, rows_block.shape[0], batch_rows):
        batch = sparse.as_rows(rows_block[s : s + batch_rows])
        x = batch[:, : coder.d_in] if kind == "transcoder" else batch
        values, indices = coder.encode(x.contiguous())
        v = values.float().numpy()
        i = indices.numpy()
        r, j = np.nonzero(v > 0)
        rows_l.append(r.astype(np.int64) + first_row + s)
        lat_l.append(i[r, j].astype(np.int32))
        val_l.append(v[r, j].astype(np.float32))
    row = np.concatenate(rows_l) if rows_l else np.zeros(0, np.int64)
    lat = np.concatenate(lat_l) if lat_l else np.zeros(0, np.int32)
    val = np.concatenate(val_l) if val_l else np.zeros(0, np.float32)
    order = np.lexsort((row, lat))
    return row[order], lat[order], val[order]


def _min_position(cfg: CacheConfig) -> int:
    m = cfg.reference_min_position
    return cfg.window_len - 1 if m is None else m


def _exact_tables(
    out: Path, files: list[str], L: int, cfg: CacheConfig, lay: _Layout, n_reference: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """The reference (frequency, active table), exact, from the parts."""
    if files:
        columns = ["row", "latent", "value"]
        frame = pl.concat([pl.read_parquet(out / f, columns=columns) for f in files])
        ref = _reference_rows(frame["row"].to_numpy(), lay, _min_position(cfg))
        ids = frame["latent"].to_numpy()[ref]
        vals = frame["value"].to_numpy()[ref]
    else:
        ids, vals = np.zeros(0, np.int32), np.zeros(0, np.float32)
    return reference_tables(ids, vals, L, cfg.num_quantiles, total=n_reference)


# ------------------------------------------------------------------------ readers


class _Cache(NamedTuple):
    out: Path
    layout: _Layout
    source_dir: Path
    files: list[Path]


def _open_cache(run_dir: str | Path) -> _Cache:
    out = latents_dir(run_dir)
    record_path = out / "cache.json"
    try:
        record = json.loads(record_path.read_text())
        parts = json.loads((out / "parts.json").read_text())
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"no finished latent cache in {out} ({e.filename} missing): run the cache stage"
        ) from e
    lay = _layout(record["result"]["n_rows"], record["ctx_len"], record["window_len"])
    files = [out / p["file"] for p in sorted(parts["parts"], key=lambda p: p["chunk"])]
    # The activations folder is found from the run directory, not from the path recorded
    # (relative to the cwd of the run that wrote it): a run directory may be moved or copied.
    source = (record.get("config") or {}).get("source")
    source_dir = _source_dir(Path(run_dir), source) if source else Path(record["activations"])
    return _Cache(out, lay, source_dir, files)


def read_stats(run_dir: str | Path) -> pl.DataFrame:
    """``latents/stats.parquet`` (one row per latent)."""
    return pl.read_parquet(latents_dir(run_dir) / "stats.parquet")


def read_top_windows(run_dir: str | Path, latent: int | None = None) -> pl.DataFrame:
    """``latents/top_windows.parquet``, or one latent's rows (by rank)."""
    scan = pl.scan_parquet(latents_dir(run_dir) / "top_windows.parquet")
    if latent is not None:
        scan = scan.filter(pl.col("latent") == latent)
    return scan.collect()


def _latent_entries(cache: _Cache, latent: int) -> tuple[np.ndarray, np.ndarray]:
    frame = (
        pl.scan_parquet(cache.files)
        .filter(pl.col("latent") == latent)
        .select("row", "value")
        .collect()
    )
    return frame["row"].to_numpy(), frame["value"].to_numpy()


def _as_windows(windows: npt.ArrayLike, lay: _Layout) -> npt.NDArray[np.int64]:
    w = np.asarray(windows)
    if w.ndim != 1 or (w.size and w.dtype.kind not in "iu"):
        raise ValueError(f"windows must be a 1-D array of integers, got {w.dtype} {w.shape}")
    w = w.astype(np.int64)
    if w.size and (w.min() < 0 or w.max() >= lay.n_windows):
        raise ValueError(f"window ids must be in [0, {lay.n_windows}), got {w.min()}..{w.max()}")
    return w


def window_activations(
    run_dir: str | Path, latent: int, windows: npt.ArrayLike
) -> npt.NDArray[np.float32]:
    """Latent ``latent``'s activation at every token of each window, ``[n, window_len]``
    float32 (zeros where it is inactive), read from the parts."""
    cache = _open_cache(run_dir)
    lay = cache.layout
    w = _as_windows(windows, lay)
    unique, inverse = np.unique(w, return_inverse=True)
    dense = np.zeros((unique.size, lay.window_len), np.float32)
    row, value = _latent_entries(cache, latent)
    win = _windows_of_rows(row, lay)
    pos = np.searchsorted(unique, win)
    hit = (win >= 0) & (pos < unique.size)
    hit[hit] = unique[pos[hit]] == win[hit]
    col = (row % lay.ctx_len) % lay.window_len
    dense[pos[hit], col[hit]] = value[hit]
    return dense[inverse.reshape(-1)]


def window_tokens(run_dir: str | Path, windows: npt.ArrayLike) -> npt.NDArray[np.int32]:
    """Token ids of each window, ``[n, window_len]`` (from the source's ``tokens.npy``)."""
    cache = _open_cache(run_dir)
    lay = cache.layout
    w = _as_windows(windows, lay)
    tokens = np.load(cache.source_dir / "tokens.npy", mmap_mode="r")
    seq, j = np.divmod(w, lay.windows_per_seq)
    cols = j[:, None] * lay.window_len + np.arange(lay.window_len)
    return np.asarray(tokens[seq[:, None], cols], dtype=np.int32)


def active_windows(run_dir: str | Path, latent: int) -> npt.NDArray[np.int64]:
    """Sorted ids of the windows where ``latent`` is > 0 on at least one token."""
    cache = _open_cache(run_dir)
    row, _ = _latent_entries(cache, latent)
    win = _windows_of_rows(row, cache.layout)
    return np.unique(win[win >= 0])


def random_inactive_windows(
    run_dir: str | Path, latent: int, n: int, seed: int
) -> npt.NDArray[np.int64]:
    """``n`` distinct windows drawn uniformly where ``latent`` never fires (no token > 0),
    in random order; fewer when not that many exist. The draw depends only on
    ``(seed, latent)``: ``numpy.random.default_rng([seed, latent])``."""
    cache = _open_cache(run_dir)
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    active = active_windows(run_dir, latent)
    candidates = np.setdiff1d(
        np.arange(cache.layout.n_windows, dtype=np.int64), active, assume_unique=True
    )
    rng = np.random.default_rng([seed, latent])
    return rng.choice(candidates, size=min(n, candidates.size), replace=False)
