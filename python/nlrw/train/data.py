"""The rows the ``train`` stage learns from: a stream of ``[x | y]`` chunks (a transcoder) or
``[x]`` chunks (an SAE), re-batched into global batches of exactly ``batch_size`` rows.

Step s always trains on rows ``[s·B, (s+1)·B)`` of the stream (:func:`rebatch`; the last batch
may be shorter), whatever the chunks' sizes, so that a resumed run skips exactly the rows
already seen and sees the same batches. Epochs re-iterate the batches (:func:`row_stream`,
calling ``set_epoch`` when they have one, as :class:`nlrw.model.shards.ShardReader` does). The
widths ``d_in`` and ``d_out`` come from the config, the caller, or the first chunk
(:func:`resolve_dims`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from nlrw.config.train import TrainConfig
from nlrw.model.sparse import SparseCoderConfig, as_rows

__all__ = ["TorchBatches", "check_width", "count_rows", "rebatch", "resolve_dims", "row_stream"]


def row_stream(batches: Iterable[Any], epochs: int) -> Iterator[Tensor]:
    """The rows of ``epochs`` passes over ``batches``, as a stream of 2-D chunks."""
    for epoch in range(epochs):
        set_epoch = getattr(batches, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        rows = 0
        for batch in batches:
            chunk = as_rows(batch)
            if chunk.ndim != 2:
                raise ValueError(f"batches must be 2-D [rows, width], got {list(chunk.shape)}")
            rows += chunk.shape[0]
            yield chunk
        if rows == 0:
            hint = (
                ": a one-shot iterator cannot be read for several epochs; pass a list or a "
                "ShardReader"
                if epoch > 0
                else ""
            )
            raise ValueError(f"train_batches yielded no rows in epoch {epoch + 1}{hint}")


def check_width(chunks: Iterable[Tensor], coder_cfg: SparseCoderConfig) -> Iterator[Tensor]:
    """The chunks, refusing one whose width does not match the coder."""
    transcoder = coder_cfg.kind == "transcoder"
    width = coder_cfg.d_in + coder_cfg.d_out if transcoder else coder_cfg.d_in
    for i, chunk in enumerate(chunks):
        if chunk.shape[1] != width:
            expected = (
                f"d_in + d_out = {coder_cfg.d_in} + {coder_cfg.d_out} = {width}"
                if transcoder
                else f"the SAE's d_in = {width}"
            )
            raise ValueError(f"training batch {i} has width {chunk.shape[1]}, expected {expected}")
        yield chunk


def rebatch(
    chunks: Iterable[Tensor], batch_size: int, skip: int, limit: int | None
) -> Iterator[Tensor]:
    """Rows ``[skip, limit)`` of the stream in batches of ``batch_size`` (the last may be short).

    Batch boundaries fall at multiples of ``batch_size`` from the stream's start whatever
    ``skip`` is (a multiple of it when resuming), so a resumed run sees the same batches.
    """
    buffer: list[Tensor] = []
    buffered = 0
    position = 0
    for chunk in chunks:
        start = position
        position += chunk.shape[0]
        lo = max(skip - start, 0)
        hi = chunk.shape[0] if limit is None else min(chunk.shape[0], limit - start)
        if hi > lo:
            part = chunk[lo:hi]
            if buffered:
                need = batch_size - buffered
                buffer.append(part[:need])
                buffered += min(need, part.shape[0])
                part = part[need:]
                if buffered == batch_size:
                    yield torch.cat(buffer)
                    buffer, buffered = [], 0
            while part.shape[0] >= batch_size:
                yield part[:batch_size]
                part = part[batch_size:]
            if part.shape[0]:
                buffer.append(part)
                buffered += part.shape[0]
        if limit is not None and position >= limit:
            break
    if buffered:
        yield torch.cat(buffer)


def count_rows(batches: Iterable[Any]) -> int | None:
    """Rows in one pass over ``batches`` when knowable without reading them."""
    num_rows = getattr(batches, "num_rows", None)
    if isinstance(num_rows, int):
        return num_rows
    if isinstance(batches, Sequence):
        return sum(int(as_rows(b).shape[0]) for b in batches)
    return None


def resolve_dims(
    cfg: TrainConfig, width: int, d_in: int | None, d_out: int | None
) -> tuple[int, int]:
    """d_in and d_out from the config, the arguments and the width of the first batch."""
    for name, given, configured in (("d_in", d_in, cfg.d_in), ("d_out", d_out, cfg.d_out)):
        if given is not None and configured is not None and given != configured:
            raise ValueError(f"{name} is {configured} in the config but {given} as an argument")
    d_in = d_in if d_in is not None else cfg.d_in
    d_out = d_out if d_out is not None else cfg.d_out
    if cfg.kind == "sae":
        d_in = d_in if d_in is not None else width
        if width != d_in:
            raise ValueError(f"batch width {width} does not match the SAE's d_in = {d_in}")
        return d_in, d_in
    if d_in is None and d_out is None:
        if width % 2:
            raise ValueError(f"batch width {width} is odd: give d_in and d_out (rows are [x | y])")
        d_in = d_out = width // 2
    elif d_in is None:
        assert d_out is not None
        d_in = width - d_out
    elif d_out is None:
        d_out = width - d_in
    if d_in <= 0 or d_out <= 0 or d_in + d_out != width:
        raise ValueError(
            f"batch width {width} does not match d_in + d_out = {d_in} + {d_out} "
            "(transcoder rows are [x | y])"
        )
    return d_in, d_out


class TorchBatches:
    """A ShardReader's batches as torch tensors (bfloat16 bit patterns become bfloat16)."""

    def __init__(self, reader: Any) -> None:
        self.reader = reader
        self.num_rows: int = reader.num_rows

    def set_epoch(self, epoch: int) -> None:
        self.reader.set_epoch(epoch)

    def __iter__(self) -> Iterator[Tensor]:
        from nlrw.model.shards import to_torch

        for batch in self.reader:
            yield to_torch(batch, self.reader.dtype)
