"""Benchmarks of the activation shards (``nlrw.model.shards``) against plain numpy file I/O.

* ``shard_read``: one full pass of :class:`ShardReader` (memory-map, xxh3 check of every byte,
  batches of 4096 rows) against ``np.fromfile`` of the same data bytes, both from a warm page
  cache. Unshuffled batches are zero-copy views of the mapped shards, so the pass costs about
  one checksum read of the data, while ``np.fromfile`` copies it into fresh memory.
* ``shard_write``: :class:`ShardWriter` (shards of ~200 MB, each hashed, fsynced and renamed,
  manifest rewritten atomically after each) against ``np.save`` + ``fsync`` of the same array.

Full size is a 2 GB float32 array of width 1536 (an MLP width); data lives under
``benches/data/`` and is deleted at the end.
"""

from __future__ import annotations

import gc
import os
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from common import result
from nlrw.model.shards import ShardReader, ShardWriter

DATA = Path(__file__).resolve().parent / "data" / "shards"
WIDTH = 1536
BATCH_ROWS = 4096


def _interleaved(
    ours: Callable[[], Any],
    base: Callable[[], Any],
    repeats: int,
    before_ours: Callable[[], Any] = lambda: None,
    before_base: Callable[[], Any] = lambda: None,
) -> tuple[float, float]:
    """Median times of ``ours`` and ``base``, run alternately; ``before_*`` run untimed."""
    t_ours, t_base = [], []
    for _ in range(repeats):
        for fn, prep, times in ((ours, before_ours, t_ours), (base, before_base, t_base)):
            prep()
            gc.collect()
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(t_ours), statistics.median(t_base)


def run(quick: bool) -> list[dict[str, Any]]:
    total_bytes = (64 << 20) if quick else (2 << 30)
    rows_per_shard = 4096 if quick else 32768  # 25 MB / 200 MB shards
    repeats = 3 if quick else 5  # the disk is shared and noisy: more samples at full size
    rows = total_bytes // (WIDTH * 4)
    data = np.random.default_rng(0).random((rows, WIDTH), dtype=np.float32)
    shard_dir = DATA / "set"
    npy = DATA / "array.npy"
    raw = DATA / "array.bin"
    shutil.rmtree(DATA, ignore_errors=True)
    DATA.mkdir(parents=True)
    try:

        def ours_write() -> None:
            with ShardWriter(shard_dir, width=WIDTH, rows_per_shard=rows_per_shard) as writer:
                writer.write(data)

        def base_write() -> None:
            with open(npy, "wb") as f:
                np.save(f, data)
                f.flush()
                os.fsync(f.fileno())

        ours_w, base_w = _interleaved(
            ours_write,
            base_write,
            repeats,
            before_ours=lambda: shutil.rmtree(shard_dir, ignore_errors=True),
            before_base=lambda: npy.unlink(missing_ok=True),
        )
        npy.unlink()

        data.tofile(raw)
        n_rows = 0

        def ours_read() -> None:
            nonlocal n_rows
            n_rows = 0
            for batch in ShardReader(shard_dir, batch_rows=BATCH_ROWS, verify=True):
                n_rows += batch.shape[0]

        def base_read() -> None:
            np.fromfile(raw, dtype=np.float32)

        ours_read()  # warm the page cache for both sides the same way: one full read each
        base_read()
        assert n_rows == rows
        ours_r, base_r = _interleaved(ours_read, base_read, repeats)
    finally:
        shutil.rmtree(DATA, ignore_errors=True)

    size = f"{total_bytes / 2**30:.2f} GiB float32 [{rows}, {WIDTH}]"
    return [
        result(
            "shard_read",
            ours_r,
            "np.fromfile",
            base_r,
            target=0.8,
            size=size,
            ours_gb_per_s=round(total_bytes / ours_r / 1e9, 2),
        ),
        result(
            "shard_write",
            ours_w,
            "np.save+fsync",
            base_w,
            target=0.8,
            size=size,
            shards=-(-rows // rows_per_shard),
        ),
    ]
