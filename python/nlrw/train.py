"""Training a TopK skip transcoder or SAE on activation rows (the ``train`` stage).

The trainer follows EleutherAI's sparsify where the paper is silent:

* loss ``FVU = ‖y − ŷ‖² / Σ(y − ȳ)²`` over the (global) batch, plus optional
  ``auxk_alpha · AuxK`` and ``Multi-TopK FVU / 8``;
* initialization from the **first training batch** (the whole global batch under DDP):
  ``b_dec = mean(y)``, and for a transcoder ``b_enc = −mean(x)·W_encᵀ`` and ``W_dec = 0``;
  an SAE's decoder rows start as its encoder rows at unit norm;
* an SAE keeps unit-norm decoder rows (gradient component parallel to each row removed
  before the step, rows renormalized after it); a transcoder's decoder is unconstrained;
* Adam with learning rate ``2e-4 / sqrt(L / 2^14)``, linear warm-up then linear decay to
  zero; or signum, ``5e-3 / sqrt(L / 2^14)`` (sparsify's rule for its signum).

Where nlrw differs from sparsify 1.3, on purpose:

* the AuxK and Multi-TopK terms send their gradient into the encoder too (sparsify's fused
  encoder drops the gradient of its pre-activations, so those terms only train the
  decoder there), and the Multi-TopK output includes the skip connection;
* signum is plain sign-of-momentum (Bernstein et al. 2018) under the same schedule as Adam;
  sparsify wraps sign-SGD in schedule-free averaging;
* under DDP the loss is normalized by the variance of the *global* batch, so that a run on
  W processes takes the same steps as one process on the same global batches.

Data: ``train_batches`` yields ``[rows, d_in + d_out]`` arrays (``[x | y]``, the layout of
the activation shards) for a transcoder, ``[rows, d]`` for an SAE; it is re-batched into
global batches of exactly ``batch_size`` rows (the last may be shorter), so that step s
always trains on rows ``[s·B, (s+1)·B)`` of the stream and a resumed run skips exactly the
rows already seen. Epochs re-iterate ``train_batches`` (calling ``set_epoch`` when it has
one, as :class:`nlrw.model.shards.ShardReader` does).

Distributed: launched by ``torchrun``, every rank iterates the same global batches and
trains on its contiguous slice (``torch.tensor_split(batch, world)[rank]``); gradients
are averaged by DDP, so each rank's loss is its share ``world · Σ_slice ‖e‖² / Σ_batch
(y − ȳ)²``. Rank 0 writes every file; all ranks read a resumed state from ``out_dir``
(shared storage across nodes).

Output folder::

    out_dir/<hookpoint>/cfg.json, sae.safetensors   latest checkpoint, sparsify's layout
    out_dir/train_state.pt                          coder + optimizer + counters, to resume
    out_dir/metrics.jsonl                           one line of metrics per evaluation
    out_dir/train.json                              provenance, written when training ends
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from nlrw.lib.io import atomic_path, atomic_write_json, atomic_write_text
from nlrw.lib.provenance import stage_record, to_jsonable
from nlrw.lib.rundir import RunDir
from nlrw.model.sparse import (
    EvalResult,
    EvalSums,
    SparseCoder,
    SparseCoderConfig,
    as_rows,
    decode_train,
    encode_train,
    evaluate,
    select_values,
    split_rows,
)

__all__ = [
    "NonFiniteLossError",
    "ResumeMismatchError",
    "Signum",
    "StepLosses",
    "TrainConfig",
    "TrainResult",
    "auxk_loss",
    "compute_losses",
    "default_lr",
    "run",
    "train",
    "train_from_shards",
]

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"
RECORD_FILE = "train.json"
_STATE_FORMAT = 1


@dataclass(frozen=True)
class TrainConfig:
    """Options of the ``train`` stage (the CLI's help is generated from these docstrings)."""

    kind: Literal["transcoder", "sae"] = "transcoder"
    """What to train: a transcoder (MLP input → MLP output) or an SAE (input → input)."""
    pretrained: str | None = None
    """Adopt this sparse coder instead of training one: a checkpoint folder in sparsify's
    layout, or a folder of hookpoint folders (the hookpoint is collect.hookpoint); checked
    against the collected activations, then written to the run (nlrw.model.pretrained)."""
    legacy: Literal["transcoder", "sae"] | None = None
    """A pretrained checkpoint in the paper-era sae package's layout: which kind it is."""
    k: int = 32
    """Latents kept per token by the top-k."""
    num_latents: int = 0
    """Number of latents; 0 means expansion_factor × d_in."""
    expansion_factor: int = 32
    """Latents per input dimension, used when num_latents is 0."""
    skip_connection: bool | None = None
    """Add a linear skip connection W_skip·x; None means on for a transcoder, off for an SAE."""
    d_in: int | None = None
    """Width of the input x; None means from the data (half a transcoder row, an SAE row)."""
    d_out: int | None = None
    """Width of the target y of a transcoder; None means the row width minus d_in."""
    optimizer: Literal["adam", "signum"] = "adam"
    """Optimizer: Adam, or signum (sign of the momentum)."""
    lr: float | None = None
    """Peak learning rate; None means sparsify's rule, 2e-4/sqrt(L/2^14) for Adam and
    5e-3/sqrt(L/2^14) for signum."""
    lr_warmup_steps: int = 1000
    """Steps of linear learning-rate warm-up from 0."""
    lr_schedule: Literal["linear", "constant"] = "linear"
    """After warm-up: linear decay to 0 at the last step (needs the number of steps, from
    max_tokens or the data's size), or constant."""
    signum_momentum: float = 0.95
    """Momentum of signum (the decay of its moving average of gradients)."""
    batch_size: int = 4096
    """Rows (tokens) per optimizer step, over all processes together."""
    max_tokens: int | None = None
    """Stop after this many rows; None means epochs passes over the training data."""
    epochs: int = 1
    """Passes over the training data, when max_tokens does not stop training first."""
    shuffle: bool = True
    """Shuffle rows when reading activation shards (train_from_shards)."""
    auxk_alpha: float = 0.0
    """Weight of the AuxK loss that makes dead latents predict the residual; 0 disables it."""
    multi_topk: bool = False
    """Add the Multi-TopK loss (FVU with 4k latents, weight 1/8)."""
    dead_feature_threshold: int = 10_000_000
    """A latent that has not fired for more than this many tokens counts as dead."""
    seed: int = 0
    """Seed of the encoder's initialization."""
    device: str = "auto"
    """Device: "auto" (CUDA when present, the local rank's GPU under torchrun), "cpu", "cuda:0"."""
    autocast: Literal["auto", "bf16", "off"] = "auto"
    """Mixed precision: "auto" means bf16 autocast on a GPU that supports it, off on the CPU."""
    eval_every: int = 500
    """Evaluate on the held-out rows (and log metrics) every this many steps; 0 only at the end."""
    checkpoint_every: int = 1000
    """Write a checkpoint every this many steps; 0 only at the end."""
    progress: bool = True
    """Show a progress bar with tokens/s and the running FVU."""

    def __post_init__(self) -> None:
        if self.kind not in ("transcoder", "sae"):
            raise ValueError(f"kind must be 'transcoder' or 'sae', got {self.kind!r}")
        if self.legacy is not None and self.legacy not in ("transcoder", "sae"):
            raise ValueError(f"legacy must be 'transcoder' or 'sae', got {self.legacy!r}")
        if self.legacy is not None and self.pretrained is None:
            raise ValueError("train.legacy only applies with train.pretrained")
        if self.optimizer not in ("adam", "signum"):
            raise ValueError(f"optimizer must be 'adam' or 'signum', got {self.optimizer!r}")
        positive = ["k", "batch_size", "epochs", "expansion_factor"]
        positive += [n for n in ("max_tokens", "d_in", "d_out") if getattr(self, n) is not None]
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("num_latents", "lr_warmup_steps", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.num_latents and self.k >= self.num_latents:
            raise ValueError(
                f"k ({self.k}) must be smaller than the number of latents ({self.num_latents})"
            )
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not self.auxk_alpha >= 0:
            raise ValueError(f"auxk_alpha must be >= 0, got {self.auxk_alpha}")
        if not 0 <= self.signum_momentum < 1:
            raise ValueError(f"signum_momentum must be in [0, 1), got {self.signum_momentum}")
        if self.kind == "sae" and self.d_out is not None and self.d_out != self.d_in:
            raise ValueError("an SAE reconstructs its input: leave d_out unset or equal to d_in")


# Fields that change how a run is watched, not what it computes: a resume may change them.
_RUN_ONLY_FIELDS = frozenset({"eval_every", "checkpoint_every", "progress", "device"})


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; training stopped and the last checkpoint was kept."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


class ResumeMismatchError(ValueError):
    """``out_dir`` holds a run whose config differs from the one asked for."""


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` produced."""

    checkpoint: Path
    """The checkpoint folder ``out_dir/<hookpoint>`` (sparsify's layout)."""
    steps: int
    """Optimizer steps taken in all (a resumed run counts the earlier ones too)."""
    tokens: int
    """Rows trained on in all."""
    eval: EvalResult | None
    """Held-out FVU and dead fraction at the end (None without evaluation rows)."""
    train_fvu: float
    """Mean training FVU over the steps since the previous log line."""
    dead_fraction: float
    """Fraction of latents silent for more than dead_feature_threshold tokens."""
    history: list[dict[str, Any]] = field(default_factory=list)
    """The metrics logged at each evaluation (as in metrics.jsonl)."""


def default_lr(optimizer: str, num_latents: int) -> float:
    """sparsify's learning-rate rule: ``c / sqrt(L / 2^14)``, c = 2e-4 (Adam), 5e-3 (signum)."""
    base = 2e-4 if optimizer == "adam" else 5e-3
    return base / math.sqrt(num_latents / 2**14)


class Signum(torch.optim.Optimizer):
    """Sign of the momentum (Bernstein et al. 2018): ``m ← βm + (1−β)g;  p ← p − lr·sign(m)``."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float, momentum: float = 0.95):
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # pyright: ignore[reportIncompatibleMethodOverride]
        assert closure is None, "Signum takes no closure"
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                m = state["momentum_buffer"]
                m.lerp_(p.grad, 1 - group["momentum"])
                p.add_(m.sign(), alpha=-group["lr"])


# ---------------------------------------------------------------------- losses


class StepLosses(NamedTuple):
    """Outputs of one training forward pass; the sums run over this process's rows only."""

    output: Tensor
    """ŷ = W_dec·z + b_dec + W_skip x."""
    values: Tensor
    """[B, k] activations of the top-k latents."""
    indices: Tensor
    """[B, k] their indices."""
    fvu: Tensor
    """``Σ‖y − ŷ‖² / total_variance``."""
    auxk_loss: Tensor
    """AuxK loss (0 without dead latents)."""
    multi_topk_fvu: Tensor
    """FVU with the top 4k latents (0 unless Multi-TopK)."""


def auxk_loss(
    coder: SparseCoder,
    relu_pre_acts: Tensor,
    encoder_input: Tensor,
    residual: Tensor,
    dead_mask: Tensor,
    total_variance: Tensor,
) -> Tensor:
    """AuxK: the top dead latents should predict what the live ones missed.

    With ``k_aux = d_out // 2`` and n_dead dead latents, the ``min(k_aux, n_dead)`` dead
    latents of largest ``relu(pre_act)`` per row are decoded **without b_dec** into ê
    (the residual ``e = y − ŷ`` already accounts for b_dec) and::

        AuxK = min(n_dead / k_aux, 1) · ‖ê − e.detach()‖² / total_variance

    (sparsify once had ``e`` with the wrong sign and added b_dec to ê.) The scale keeps
    the term small while few latents are dead. Dead latents whose pre-activations are all
    ≤ 0 contribute zero and get no gradient, as in sparsify.
    """
    num_dead = int(dead_mask.sum())
    if num_dead == 0:
        return residual.new_zeros(())
    k_aux = max(1, residual.shape[-1] // 2)
    scale = min(num_dead / k_aux, 1.0)
    k_aux = min(k_aux, num_dead)
    candidates = torch.where(dead_mask[None], relu_pre_acts, -torch.inf)
    values, indices = candidates.topk(k_aux, dim=-1, sorted=False)
    values = select_values(coder, encoder_input, indices, values)
    e_hat = decode_train(coder, values, indices, bias=False)
    return scale * (e_hat - residual.detach().to(e_hat.dtype)).pow(2).sum() / total_variance


def compute_losses(
    coder: SparseCoder,
    x: Tensor,
    y: Tensor,
    *,
    total_variance: Tensor,
    dead_mask: Tensor | None = None,
    multi_topk: bool = False,
) -> StepLosses:
    """The training forward pass: ``ŷ``, its FVU, and the optional AuxK and Multi-TopK terms.

    ``total_variance = Σ(y − ȳ)²`` over the whole (global) batch is passed in, so that
    the terms of a batch split over processes add up to those of the whole batch.
    """
    latents = encode_train(coder, x)
    skip = coder.skip(x)
    out = decode_train(coder, latents.values, latents.indices)
    if skip is not None:
        out = out + skip
    residual = y.to(out.dtype) - out
    fvu = residual.pow(2).sum() / total_variance
    aux = (
        auxk_loss(
            coder, latents.pre_acts, latents.encoder_input, residual, dead_mask, total_variance
        )
        if dead_mask is not None
        else fvu.new_zeros(())
    )
    if multi_topk:
        k_multi = min(4 * coder.k, coder.num_latents)
        values, indices = latents.pre_acts.topk(k_multi, dim=-1, sorted=False)
        values = select_values(coder, latents.encoder_input, indices, values)
        multi_out = decode_train(coder, values, indices)
        if skip is not None:
            multi_out = multi_out + skip
        multi = (y.to(multi_out.dtype) - multi_out).pow(2).sum() / total_variance
    else:
        multi = fvu.new_zeros(())
    return StepLosses(out, latents.values, latents.indices, fvu, aux, multi)


class _LossModule(nn.Module):
    """The coder's training forward as a module, so that DDP can wrap it."""

    def __init__(self, coder: SparseCoder, multi_topk: bool, autocast: bool) -> None:
        super().__init__()
        self.coder = coder
        self.multi_topk = multi_topk
        self.autocast = autocast

    def forward(
        self, x: Tensor, y: Tensor, total_variance: Tensor, dead_mask: Tensor | None
    ) -> StepLosses:
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return compute_losses(
                self.coder,
                x,
                y,
                total_variance=total_variance,
                dead_mask=dead_mask,
                multi_topk=self.multi_topk,
            )


# ---------------------------------------------------------------------- data


def _row_stream(batches: Iterable[Any], epochs: int) -> Iterator[Tensor]:
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


def _check_width(chunks: Iterable[Tensor], coder_cfg: SparseCoderConfig) -> Iterator[Tensor]:
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


def _rebatch(
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


def _count_rows(batches: Iterable[Any]) -> int | None:
    """Rows in one pass over ``batches`` when knowable without reading them."""
    num_rows = getattr(batches, "num_rows", None)
    if isinstance(num_rows, int):
        return num_rows
    if isinstance(batches, Sequence):
        return sum(int(as_rows(b).shape[0]) for b in batches)
    return None


# ---------------------------------------------------------------------- distributed


class _Dist(NamedTuple):
    rank: int
    world: int
    local_rank: int


def _init_distributed() -> _Dist:
    """The process group of a ``torchrun`` launch (initialized here when needed)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return _Dist(0, 1, 0)


def _all_reduce(t: Tensor, world: int, op: Any = None) -> Tensor:
    if world > 1:
        dist.all_reduce(t, op=op if op is not None else dist.ReduceOp.SUM)
    return t


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


# ---------------------------------------------------------------------- the run


def _resolve_dims(
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


def _config_diff(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    keys = sorted((set(saved) | set(now)) - _RUN_ONLY_FIELDS)
    return [
        f"{key} (checkpoint {saved.get(key)!r}, now {now.get(key)!r})"
        for key in keys
        if saved.get(key) != now.get(key)
    ]


def _load_state(path: Path, device: torch.device) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises many kinds for a corrupt pickle/zip
        raise ValueError(f"cannot read the training state {path}: {e}") from e
    if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
        raise ValueError(f"{path} is not an nlrw training state (format {_STATE_FORMAT})")
    return state


def train(
    cfg: TrainConfig,
    train_batches: Iterable[Any],
    eval_batches: Iterable[Any] | None,
    out_dir: str | os.PathLike[str],
    *,
    hookpoint: str,
    d_in: int | None = None,
    d_out: int | None = None,
    total_rows: int | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Train a sparse coder on ``train_batches``; evaluate on ``eval_batches``; write ``out_dir``.

    Batches are torch tensors or numpy float arrays ``[rows, d_in + d_out]`` (``[x | y]``)
    for a transcoder, ``[rows, d]`` for an SAE. ``eval_batches`` must be re-iterable (a
    list, a ShardReader). ``total_rows`` (rows per pass) lets the linear schedule end at
    the last step when ``train_batches`` cannot say (``num_rows`` or a list can).

    A previous run in ``out_dir`` is resumed when its config matches (fields that only
    change logging and checkpoint frequency, or the device, may differ), refused with
    :class:`ResumeMismatchError` naming the differing fields otherwise; ``overwrite=True``
    starts afresh. A NaN or infinite loss raises :class:`NonFiniteLossError`, naming the
    step, and leaves the last checkpoint as it was.
    """
    if not hookpoint or hookpoint in (".", "..") or "/" in hookpoint or os.sep in hookpoint:
        raise ValueError(f"hookpoint {hookpoint!r} cannot be a folder name")
    out = Path(out_dir)
    ddp = _init_distributed()
    device = _resolve_device(cfg.device, ddp.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    use_autocast = cfg.autocast == "bf16" or (
        cfg.autocast == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )

    # Look at the first chunk for the row width before anything is written.
    stream = _row_stream(train_batches, cfg.epochs)
    try:
        first = next(stream)
    except StopIteration:
        raise ValueError("train_batches yielded no rows") from None
    dims = _resolve_dims(cfg, first.shape[1], d_in, d_out)
    coder_cfg = SparseCoderConfig.create(
        cfg.kind,
        dims[0],
        d_out=dims[1],
        k=cfg.k,
        num_latents=cfg.num_latents,
        expansion_factor=cfg.expansion_factor,
        skip_connection=cfg.skip_connection,
        multi_topk=cfg.multi_topk,
    )
    row_stream = _check_width(itertools.chain([first], stream), coder_cfg)

    rows_per_pass = total_rows if total_rows is not None else _count_rows(train_batches)
    planned_rows = cfg.max_tokens
    if rows_per_pass is not None:
        all_rows = rows_per_pass * cfg.epochs
        planned_rows = all_rows if planned_rows is None else min(planned_rows, all_rows)
    planned_steps = None if planned_rows is None else math.ceil(planned_rows / cfg.batch_size)
    if cfg.lr_schedule == "linear" and planned_steps is None:
        raise ValueError(
            "lr_schedule='linear' decays to 0 at the last step, whose number is unknown: set "
            "max_tokens, pass total_rows, or use lr_schedule='constant'"
        )

    config_json = {
        **to_jsonable(cfg),
        "hookpoint": hookpoint,
        "d_in": coder_cfg.d_in,
        "d_out": coder_cfg.d_out,
    }
    state_path = out / STATE_FILE
    state: dict[str, Any] | None = None
    if state_path.exists() and not overwrite:
        state = _load_state(state_path, device)
        diff = _config_diff(state["config"], config_json)
        if diff:
            raise ResumeMismatchError(
                f"{out} holds a run with another config; it differs in "
                + "; ".join(diff)
                + ". Use another out_dir, or overwrite=True to start afresh"
            )

    if overwrite and ddp.rank == 0:
        # Nothing of the old run may survive to be resumed or mistaken for this one's
        # (its checkpoint folder is replaced at the first checkpoint).
        for name in (STATE_FILE, RECORD_FILE, METRICS_FILE):
            (out / name).unlink(missing_ok=True)

    coder = SparseCoder(coder_cfg, seed=cfg.seed, device=device, dtype=torch.float32)
    lr = cfg.lr if cfg.lr is not None else default_lr(cfg.optimizer, coder_cfg.num_latents)
    optimizer: torch.optim.Optimizer = (
        # The fused kernel: one pass over each parameter instead of ~10 (same update).
        torch.optim.Adam(coder.parameters(), lr=lr, fused=device.type in ("cpu", "cuda"))
        if cfg.optimizer == "adam"
        else Signum(coder.parameters(), lr=lr, momentum=cfg.signum_momentum)
    )
    num_latents = coder_cfg.num_latents
    tokens_since_fired = torch.zeros(num_latents, dtype=torch.long, device=device)
    step = 0
    rows_done = 0
    history: list[dict[str, Any]] = []
    window: list[Tensor] = []  # per-step [fvu, auxk, multi-topk fvu] since the last log line
    last_checkpoint: int | None = None
    if state is not None:
        coder.load_state_dict(state["coder"])
        optimizer.load_state_dict(state["optimizer"])
        tokens_since_fired.copy_(state["tokens_since_fired"])
        step, rows_done = int(state["step"]), int(state["rows"])
        history = json.loads(state["history"])
        window.extend(state["window"].to(device))
        last_checkpoint = step
        if ddp.rank == 0:
            log.info("resuming %s at step %d (%d tokens)", out, step, rows_done)
    batches = _rebatch(row_stream, cfg.batch_size, rows_done, cfg.max_tokens)

    def lr_at(s: int) -> float:
        """Learning rate of step s (0-based): warm-up, then constant or linear decay."""
        if cfg.lr_warmup_steps and s < cfg.lr_warmup_steps:
            return lr * (s + 1) / cfg.lr_warmup_steps
        if cfg.lr_schedule == "constant" or planned_steps is None:
            return lr
        span = max(planned_steps - cfg.lr_warmup_steps, 1)
        return lr * max(0.0, (planned_steps - s) / span)

    loss_module = _LossModule(coder, cfg.multi_topk, use_autocast)
    wrapped: nn.Module = loss_module
    pbar = tqdm(
        total=planned_rows,
        initial=rows_done,
        unit="tok",
        unit_scale=True,
        desc=f"train {hookpoint}",
        disable=not cfg.progress or ddp.rank != 0,
        dynamic_ncols=True,
    )
    started = time.perf_counter()
    rows_at_start = rows_done

    def evaluate_now() -> EvalResult | None:
        if eval_batches is None:
            return None
        return _evaluate(coder, eval_batches, ddp, use_autocast)

    def log_metrics(eval_result: EvalResult | None) -> dict[str, Any]:
        means = torch.stack(window).mean(0).tolist() if window else [math.nan] * 3
        window.clear()
        elapsed = time.perf_counter() - started
        record: dict[str, Any] = {
            "step": step,
            "tokens": rows_done,
            "lr": lr_at(max(step - 1, 0)),
            "train_fvu": means[0],
            "dead_fraction": float(
                (tokens_since_fired > cfg.dead_feature_threshold).float().mean()
            ),
            "tokens_per_s": (rows_done - rows_at_start) / elapsed if elapsed > 0 else None,
        }
        if cfg.auxk_alpha > 0:
            record["auxk_loss"] = means[1]
        if cfg.multi_topk:
            record["multi_topk_fvu"] = means[2]
        if eval_result is not None:
            record["eval_fvu"] = eval_result.fvu
            record["eval_dead_fraction"] = eval_result.dead_fraction
        history.append(record)
        if ddp.rank == 0:
            lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in history)
            atomic_write_text(out / METRICS_FILE, lines)
        return record

    def checkpoint() -> None:
        nonlocal last_checkpoint
        # Every rank checks (the parameters are equal on all), so all stop together.
        bad = [n for n, p in coder.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteLossError(
                f"parameters {bad} are not finite at step {step}; "
                f"stopped without writing a checkpoint ({_kept(last_checkpoint, out)})",
                step,
            )
        if ddp.rank == 0:
            _save_state(
                state_path,
                {
                    "format": _STATE_FORMAT,
                    "config": config_json,
                    "coder": coder.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "tokens_since_fired": tokens_since_fired,
                    "step": step,
                    "rows": rows_done,
                    "history": json.dumps(history),
                    "window": torch.stack(window) if window else torch.zeros(0, 3),
                },
            )
            coder.save(out / hookpoint)
        last_checkpoint = step

    eval_result: EvalResult | None = None
    try:
        for global_batch in batches:
            if global_batch.shape[0] < ddp.world:
                break  # too few rows left to give every rank one
            rows = global_batch.to(device, torch.float32, non_blocking=True)
            x_all, y_all = split_rows(coder, rows)
            if step == 0:
                coder.init_biases(x_all.mean(0), y_all.mean(0))
                if coder_cfg.normalize_decoder:
                    coder.set_decoder_norm_to_unit_norm()
            if ddp.world > 1 and wrapped is loss_module:
                # After the bias initialization: DDP broadcasts rank 0's parameters now.
                wrapped = nn.parallel.DistributedDataParallel(
                    loss_module, device_ids=[device.index] if device.type == "cuda" else None
                )
            total_variance = (y_all - y_all.mean(0)).pow(2).sum()
            x = torch.tensor_split(x_all, ddp.world)[ddp.rank]
            y = torch.tensor_split(y_all, ddp.world)[ddp.rank]
            dead_mask = (
                tokens_since_fired > cfg.dead_feature_threshold if cfg.auxk_alpha > 0 else None
            )
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)

            losses: StepLosses = wrapped(x, y, total_variance, dead_mask)
            terms = torch.stack([losses.fvu, losses.auxk_loss, losses.multi_topk_fvu]).detach()
            terms = _all_reduce(terms.float(), ddp.world)
            total = float(terms[0] + cfg.auxk_alpha * terms[1] + terms[2] / 8)
            if not math.isfinite(total):
                raise NonFiniteLossError(
                    f"loss is {total} at step {step + 1} (after {rows_done} tokens; FVU "
                    f"{float(terms[0])}); stopped, {_kept(last_checkpoint, out)}",
                    step + 1,
                )
            loss = losses.fvu + cfg.auxk_alpha * losses.auxk_loss + losses.multi_topk_fvu / 8
            # DDP averages gradients over ranks; each rank's terms are its share of the sum.
            (loss * ddp.world).backward()
            if coder_cfg.normalize_decoder:
                coder.remove_gradient_parallel_to_decoder_directions()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if coder_cfg.normalize_decoder:
                coder.set_decoder_norm_to_unit_norm()

            with torch.no_grad():
                fired = torch.zeros(num_latents, dtype=torch.int32, device=device)
                fired[losses.indices[losses.values > 0]] = 1
                _all_reduce(fired, ddp.world, dist.ReduceOp.MAX if ddp.world > 1 else None)
                tokens_since_fired += global_batch.shape[0]
                tokens_since_fired[fired.bool()] = 0
            window.append(terms)
            step += 1
            rows_done += global_batch.shape[0]
            pbar.update(global_batch.shape[0])
            if step % 10 == 0:
                pbar.set_postfix(fvu=f"{float(terms[0]):.4f}", refresh=False)
            if cfg.eval_every and step % cfg.eval_every == 0:
                eval_result = evaluate_now()
                record = log_metrics(eval_result)
                if eval_result is not None:
                    pbar.set_postfix(
                        fvu=f"{record['train_fvu']:.4f}", eval_fvu=f"{eval_result.fvu:.4f}"
                    )
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                checkpoint()
    finally:
        pbar.close()

    if step == 0:
        raise ValueError("no training step was taken (no rows after the resumed position?)")
    if not (history and history[-1]["step"] == step):
        eval_result = evaluate_now()
        log_metrics(eval_result)
    elif eval_result is None and eval_batches is not None:
        eval_result = evaluate_now()
    if last_checkpoint != step:
        checkpoint()
    final = history[-1]
    if ddp.rank == 0:
        atomic_write_json(
            out / RECORD_FILE,
            stage_record(
                "train",
                cfg,
                hookpoint=hookpoint,
                sparse_coder=coder_cfg,
                learning_rate=lr,
                steps=step,
                tokens=rows_done,
                world_size=ddp.world,
                device=str(device),
                autocast=use_autocast,
                eval=eval_result._asdict() if eval_result is not None else None,
                final_metrics=final,
                checkpoint=str(out / hookpoint),
            ),
        )
    if ddp.world > 1:
        dist.barrier()  # the files exist when every rank returns
    return TrainResult(
        checkpoint=out / hookpoint,
        steps=step,
        tokens=rows_done,
        eval=eval_result,
        train_fvu=final["train_fvu"],
        dead_fraction=final["dead_fraction"],
        history=history,
    )


def _kept(last_checkpoint: int | None, out: Path) -> str:
    if last_checkpoint is None:
        return "no checkpoint was written yet"
    return f"the last good checkpoint (step {last_checkpoint}) in {out} is kept"


def _save_state(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


@torch.no_grad()
def _evaluate(
    coder: SparseCoder, eval_batches: Iterable[Any], ddp: _Dist, use_autocast: bool
) -> EvalResult:
    """FVU and dead fraction over all eval rows; each rank takes its slice of every batch."""

    def reduce(sums: EvalSums) -> None:
        sse, sum_y, sum_y2, rows, fired = sums.tensors()
        for t in (sse, sum_y, sum_y2, rows):
            dist.all_reduce(t)
        dist.all_reduce(fired, op=dist.ReduceOp.MAX)

    parts = (torch.tensor_split(as_rows(b), ddp.world)[ddp.rank] for b in eval_batches)
    with torch.autocast(coder.device.type, dtype=torch.bfloat16, enabled=use_autocast):
        return evaluate(coder, parts, reduce=reduce if ddp.world > 1 else None)


class _TorchBatches:
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


def train_from_shards(
    cfg: TrainConfig,
    shard_dir: str | os.PathLike[str],
    eval_shard_dir: str | os.PathLike[str] | None,
    out_dir: str | os.PathLike[str],
    *,
    hookpoint: str,
    d_in: int | None = None,
    d_out: int | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """:func:`train` on activation shard sets (see :mod:`nlrw.model.shards`).

    Training rows are read in batches of ``batch_size``, shuffled with ``seed`` when
    ``cfg.shuffle`` (a new order each epoch); evaluation rows in order.
    """
    from nlrw.model.shards import ShardReader

    reader = ShardReader(shard_dir, batch_rows=cfg.batch_size, shuffle=cfg.shuffle, seed=cfg.seed)
    eval_reader = (
        None
        if eval_shard_dir is None
        else _TorchBatches(ShardReader(eval_shard_dir, batch_rows=cfg.batch_size))
    )
    return train(
        cfg,
        _TorchBatches(reader),
        eval_reader,
        out_dir,
        hookpoint=hookpoint,
        d_in=d_in,
        d_out=d_out,
        total_rows=reader.num_rows,
        overwrite=overwrite,
    )


# ---------------------------------------------------------------------- the stage


def run(train: TrainConfig, run_dir: str | Path, hookpoint: str, overwrite: bool = False) -> Any:
    """The train stage: train on ``activations/train`` (evaluating on ``eval`` when it was
    collected) into ``transcoder/``, or adopt ``train.pretrained`` there instead."""
    paths = RunDir(run_dir)
    activations = paths.activations
    eval_dir = activations / "eval"
    if train.pretrained is not None:
        return _adopt_pretrained(train, activations, paths.transcoder, hookpoint)
    return train_from_shards(
        train,
        activations / "train",
        eval_dir if (eval_dir / "manifest.json").exists() else None,
        paths.transcoder,
        hookpoint=hookpoint,
        overwrite=overwrite,
    )


def _adopt_pretrained(train: TrainConfig, activations: Path, out: Path, hookpoint: str) -> Any:
    """The train stage with ``train.pretrained``: check and adopt the coder (no training)."""
    from nlrw.model.pretrained import adopt
    from nlrw.model.shards import ShardReader

    split = next(
        (
            activations / s
            for s in ("eval", "train")
            if (activations / s / "manifest.json").exists()
        ),
        None,
    )
    if split is None:
        raise FileNotFoundError(
            f"no activations under {activations}: run the collect stage before adopting "
            f"{train.pretrained}"
        )
    if train.pretrained is None:
        raise ValueError("train.pretrained is not set")
    return adopt(
        train.pretrained,
        out,
        hookpoint=hookpoint,
        activation_width=ShardReader(split).width,
        activations=split,
        kind=train.kind,
        legacy=train.legacy,
    )
