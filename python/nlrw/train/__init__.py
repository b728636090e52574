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
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from nlrw.config.train import TrainConfig
from nlrw.lib.io import atomic_path, atomic_write_json, atomic_write_text
from nlrw.lib.provenance import stage_record, to_jsonable
from nlrw.lib.rundir import RunDir
from nlrw.model.sparse import (
    EvalResult,
    EvalSums,
    SparseCoder,
    SparseCoderConfig,
    as_rows,
    evaluate,
    split_rows,
)
from nlrw.train.data import TorchBatches, check_width, count_rows, rebatch, resolve_dims, row_stream
from nlrw.train.distributed import Dist, all_reduce, init_distributed, resolve_device
from nlrw.train.losses import (
    LossModule,
    Signum,
    StepLosses,
    auxk_loss,
    compute_losses,
    default_lr,
)

__all__ = [
    "NonFiniteLossError",
    "ResumeMismatchError",
    "Signum",
    "StepLosses",
    "TrainConfig",
    "TrainResult",
    "Trainer",
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


# ---------------------------------------------------------------------- resuming


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


# ---------------------------------------------------------------------- the trainer


class Trainer:
    """One training run of a sparse coder, its steps as methods (see :func:`train`).

    ``__init__`` reads the first rows (for the width), builds the coder, the optimizer and the
    learning-rate schedule, and with ``overwrite`` removes the previous run's files;
    :meth:`resume` continues a previous run in ``out_dir``; :meth:`run` takes the steps
    (:meth:`step`), evaluating and logging (:meth:`evaluate`, :meth:`log`) and checkpointing
    (:meth:`checkpoint`) as configured, then :meth:`finish` writes what is left.
    """

    def __init__(
        self,
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
    ) -> None:
        if not hookpoint or hookpoint in (".", "..") or "/" in hookpoint or os.sep in hookpoint:
            raise ValueError(f"hookpoint {hookpoint!r} cannot be a folder name")
        self.cfg = cfg
        self.eval_batches = eval_batches
        self.hookpoint = hookpoint
        self.out = Path(out_dir)
        self.ddp = init_distributed()
        self.device = resolve_device(cfg.device, self.ddp.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.autocast = cfg.autocast == "bf16" or (
            cfg.autocast == "auto" and self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        )

        # Look at the first chunk for the row width before anything is written.
        stream = row_stream(train_batches, cfg.epochs)
        try:
            first = next(stream)
        except StopIteration:
            raise ValueError("train_batches yielded no rows") from None
        dims = resolve_dims(cfg, first.shape[1], d_in, d_out)
        self.coder_cfg = SparseCoderConfig.create(
            cfg.kind,
            dims[0],
            d_out=dims[1],
            k=cfg.k,
            num_latents=cfg.num_latents,
            expansion_factor=cfg.expansion_factor,
            skip_connection=cfg.skip_connection,
            multi_topk=cfg.multi_topk,
        )
        self._chunks = check_width(itertools.chain([first], stream), self.coder_cfg)

        # The schedule's length: rows per pass x epochs, capped by max_tokens.
        rows_per_pass = total_rows if total_rows is not None else count_rows(train_batches)
        self.planned_rows = cfg.max_tokens
        if rows_per_pass is not None:
            all_rows = rows_per_pass * cfg.epochs
            self.planned_rows = (
                all_rows if self.planned_rows is None else min(self.planned_rows, all_rows)
            )
        self.planned_steps = (
            None if self.planned_rows is None else math.ceil(self.planned_rows / cfg.batch_size)
        )
        if cfg.lr_schedule == "linear" and self.planned_steps is None:
            raise ValueError(
                "lr_schedule='linear' decays to 0 at the last step, whose number is unknown: set "
                "max_tokens, pass total_rows, or use lr_schedule='constant'"
            )

        self.config_json = {
            **to_jsonable(cfg),
            "hookpoint": hookpoint,
            "d_in": self.coder_cfg.d_in,
            "d_out": self.coder_cfg.d_out,
        }
        self.state_path = self.out / STATE_FILE
        if overwrite and self.ddp.rank == 0:
            # Nothing of the old run may survive to be resumed or mistaken for this one's
            # (its checkpoint folder is replaced at the first checkpoint).
            for name in (STATE_FILE, RECORD_FILE, METRICS_FILE):
                (self.out / name).unlink(missing_ok=True)

        self.coder = SparseCoder(
            self.coder_cfg, seed=cfg.seed, device=self.device, dtype=torch.float32
        )
        num_latents = self.coder_cfg.num_latents
        self.lr = cfg.lr if cfg.lr is not None else default_lr(cfg.optimizer, num_latents)
        self.optimizer: torch.optim.Optimizer = (
            # The fused kernel: one pass over each parameter instead of ~10 (same update).
            torch.optim.Adam(
                self.coder.parameters(), lr=self.lr, fused=self.device.type in ("cpu", "cuda")
            )
            if cfg.optimizer == "adam"
            else Signum(self.coder.parameters(), lr=self.lr, momentum=cfg.signum_momentum)
        )
        self.loss_module = LossModule(self.coder, cfg.multi_topk, self.autocast)
        self._wrapped: nn.Module = self.loss_module  # DDP-wrapped at the first step

        # Counters (restored by resume).
        self.tokens_since_fired = torch.zeros(num_latents, dtype=torch.long, device=self.device)
        self.steps = 0
        """Optimizer steps taken (earlier runs' included)."""
        self.rows = 0
        """Rows trained on (earlier runs' included)."""
        self.history: list[dict[str, Any]] = []
        self.window: list[Tensor] = []
        """Per-step ``[fvu, auxk, multi-topk fvu]`` since the last log line."""
        self.last_checkpoint: int | None = None
        self.eval_result: EvalResult | None = None
        self._started = time.perf_counter()
        self._rows_at_start = 0

    # ------------------------------------------------------------------ schedule

    def lr_at(self, s: int) -> float:
        """Learning rate of step s (0-based): linear warm-up from 0 over ``lr_warmup_steps``,
        then constant, or linear decay to 0 at the last planned step ``S``::

            lr(s) = lr · (s + 1) / W                       s < W
            lr(s) = lr · max(0, (S − s) / max(S − W, 1))   otherwise (linear)
        """
        cfg = self.cfg
        if cfg.lr_warmup_steps and s < cfg.lr_warmup_steps:
            return self.lr * (s + 1) / cfg.lr_warmup_steps
        if cfg.lr_schedule == "constant" or self.planned_steps is None:
            return self.lr
        span = max(self.planned_steps - cfg.lr_warmup_steps, 1)
        return self.lr * max(0.0, (self.planned_steps - s) / span)

    # ------------------------------------------------------------------ the steps

    def resume(self) -> bool:
        """Continue the run saved in ``out_dir`` (coder, optimizer, counters, metrics), if
        there is one; refuse one of another config (:class:`ResumeMismatchError`). Returns
        whether a run was resumed."""
        if not self.state_path.exists():
            return False
        state = _load_state(self.state_path, self.device)
        diff = _config_diff(state["config"], self.config_json)
        if diff:
            raise ResumeMismatchError(
                f"{self.out} holds a run with another config; it differs in "
                + "; ".join(diff)
                + ". Use another out_dir, or overwrite=True to start afresh"
            )
        self.coder.load_state_dict(state["coder"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.tokens_since_fired.copy_(state["tokens_since_fired"])
        self.steps, self.rows = int(state["step"]), int(state["rows"])
        self.history = json.loads(state["history"])
        self.window.extend(state["window"].to(self.device))
        self.last_checkpoint = self.steps
        if self.ddp.rank == 0:
            log.info("resuming %s at step %d (%d tokens)", self.out, self.steps, self.rows)
        return True

    def step(self, global_batch: Tensor) -> Tensor:
        """One optimizer step on a global batch (this rank trains on its slice); returns the
        batch's loss terms ``[fvu, auxk, multi-topk fvu]``, summed over the ranks.

        The first step initializes the biases from the batch (and an SAE's decoder norms);
        an SAE's decoder rows stay at unit norm. A non-finite loss raises
        :class:`NonFiniteLossError` before the update.
        """
        cfg, ddp, coder = self.cfg, self.ddp, self.coder
        rows = global_batch.to(self.device, torch.float32, non_blocking=True)
        x_all, y_all = split_rows(coder, rows)
        if self.steps == 0:
            coder.init_biases(x_all.mean(0), y_all.mean(0))
            if self.coder_cfg.normalize_decoder:
                coder.set_decoder_norm_to_unit_norm()
        if ddp.world > 1 and self._wrapped is self.loss_module:
            # After the bias initialization: DDP broadcasts rank 0's parameters now.
            self._wrapped = nn.parallel.DistributedDataParallel(
                self.loss_module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
            )
        total_variance = (y_all - y_all.mean(0)).pow(2).sum()
        x = torch.tensor_split(x_all, ddp.world)[ddp.rank]
        y = torch.tensor_split(y_all, ddp.world)[ddp.rank]
        dead_mask = (
            self.tokens_since_fired > cfg.dead_feature_threshold if cfg.auxk_alpha > 0 else None
        )
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.steps)

        losses: StepLosses = self._wrapped(x, y, total_variance, dead_mask)
        terms = torch.stack([losses.fvu, losses.auxk_loss, losses.multi_topk_fvu]).detach()
        terms = all_reduce(terms.float(), ddp.world)
        total = float(terms[0] + cfg.auxk_alpha * terms[1] + terms[2] / 8)
        if not math.isfinite(total):
            raise NonFiniteLossError(
                f"loss is {total} at step {self.steps + 1} (after {self.rows} tokens; FVU "
                f"{float(terms[0])}); stopped, {_kept(self.last_checkpoint, self.out)}",
                self.steps + 1,
            )
        loss = losses.fvu + cfg.auxk_alpha * losses.auxk_loss + losses.multi_topk_fvu / 8
        # DDP averages gradients over ranks; each rank's terms are its share of the sum.
        (loss * ddp.world).backward()
        if self.coder_cfg.normalize_decoder:
            coder.remove_gradient_parallel_to_decoder_directions()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.coder_cfg.normalize_decoder:
            coder.set_decoder_norm_to_unit_norm()

        with torch.no_grad():
            fired = torch.zeros(self.coder_cfg.num_latents, dtype=torch.int32, device=self.device)
            fired[losses.indices[losses.values > 0]] = 1
            all_reduce(fired, ddp.world, dist.ReduceOp.MAX if ddp.world > 1 else None)
            self.tokens_since_fired += global_batch.shape[0]
            self.tokens_since_fired[fired.bool()] = 0
        self.window.append(terms)
        self.steps += 1
        self.rows += global_batch.shape[0]
        return terms

    def evaluate(self) -> EvalResult | None:
        """Held-out FVU and dead fraction (None without evaluation rows)."""
        if self.eval_batches is None:
            return None
        return _evaluate(self.coder, self.eval_batches, self.ddp, self.autocast)

    def log(self, eval_result: EvalResult | None) -> dict[str, Any]:
        """Append a line of metrics to the history (and ``metrics.jsonl``): the means of the
        loss terms since the previous line, the dead fraction, tokens/s, ``eval_result``."""
        cfg = self.cfg
        window = self.window
        means = torch.stack(window).mean(0).tolist() if window else [math.nan] * 3
        window.clear()
        elapsed = time.perf_counter() - self._started
        record: dict[str, Any] = {
            "step": self.steps,
            "tokens": self.rows,
            "lr": self.lr_at(max(self.steps - 1, 0)),
            "train_fvu": means[0],
            "dead_fraction": float(
                (self.tokens_since_fired > cfg.dead_feature_threshold).float().mean()
            ),
            "tokens_per_s": ((self.rows - self._rows_at_start) / elapsed if elapsed > 0 else None),
        }
        if cfg.auxk_alpha > 0:
            record["auxk_loss"] = means[1]
        if cfg.multi_topk:
            record["multi_topk_fvu"] = means[2]
        if eval_result is not None:
            record["eval_fvu"] = eval_result.fvu
            record["eval_dead_fraction"] = eval_result.dead_fraction
        self.history.append(record)
        if self.ddp.rank == 0:
            lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.history)
            atomic_write_text(self.out / METRICS_FILE, lines)
        return record

    def checkpoint(self) -> None:
        """Write the training state and the coder (rank 0), refusing non-finite parameters
        (:class:`NonFiniteLossError`; the last good checkpoint is kept)."""
        # Every rank checks (the parameters are equal on all), so all stop together.
        bad = [n for n, p in self.coder.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteLossError(
                f"parameters {bad} are not finite at step {self.steps}; "
                f"stopped without writing a checkpoint ({_kept(self.last_checkpoint, self.out)})",
                self.steps,
            )
        if self.ddp.rank == 0:
            _save_state(
                self.state_path,
                {
                    "format": _STATE_FORMAT,
                    "config": self.config_json,
                    "coder": self.coder.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "tokens_since_fired": self.tokens_since_fired,
                    "step": self.steps,
                    "rows": self.rows,
                    "history": json.dumps(self.history),
                    "window": torch.stack(self.window) if self.window else torch.zeros(0, 3),
                },
            )
            self.coder.save(self.out / self.hookpoint)
        self.last_checkpoint = self.steps

    def run(self) -> TrainResult:
        """Train on the rows after the resumed position, then :meth:`finish`."""
        cfg = self.cfg
        batches = rebatch(self._chunks, cfg.batch_size, self.rows, cfg.max_tokens)
        pbar = tqdm(
            total=self.planned_rows,
            initial=self.rows,
            unit="tok",
            unit_scale=True,
            desc=f"train {self.hookpoint}",
            disable=not cfg.progress or self.ddp.rank != 0,
            dynamic_ncols=True,
        )
        self._started = time.perf_counter()
        self._rows_at_start = self.rows
        try:
            for global_batch in batches:
                if global_batch.shape[0] < self.ddp.world:
                    break  # too few rows left to give every rank one
                terms = self.step(global_batch)
                pbar.update(global_batch.shape[0])
                if self.steps % 10 == 0:
                    pbar.set_postfix(fvu=f"{float(terms[0]):.4f}", refresh=False)
                if cfg.eval_every and self.steps % cfg.eval_every == 0:
                    self.eval_result = self.evaluate()
                    record = self.log(self.eval_result)
                    if self.eval_result is not None:
                        pbar.set_postfix(
                            fvu=f"{record['train_fvu']:.4f}",
                            eval_fvu=f"{self.eval_result.fvu:.4f}",
                        )
                if cfg.checkpoint_every and self.steps % cfg.checkpoint_every == 0:
                    self.checkpoint()
        finally:
            pbar.close()
        return self.finish()

    def finish(self) -> TrainResult:
        """The last evaluation, metrics line and checkpoint where the loop did not just write
        them, then ``train.json`` (rank 0); every rank returns once the files exist."""
        if self.steps == 0:
            raise ValueError("no training step was taken (no rows after the resumed position?)")
        if not (self.history and self.history[-1]["step"] == self.steps):
            self.eval_result = self.evaluate()
            self.log(self.eval_result)
        elif self.eval_result is None and self.eval_batches is not None:
            self.eval_result = self.evaluate()
        if self.last_checkpoint != self.steps:
            self.checkpoint()
        final = self.history[-1]
        if self.ddp.rank == 0:
            atomic_write_json(
                self.out / RECORD_FILE,
                stage_record(
                    "train",
                    self.cfg,
                    hookpoint=self.hookpoint,
                    sparse_coder=self.coder_cfg,
                    learning_rate=self.lr,
                    steps=self.steps,
                    tokens=self.rows,
                    world_size=self.ddp.world,
                    device=str(self.device),
                    autocast=self.autocast,
                    eval=self.eval_result._asdict() if self.eval_result is not None else None,
                    final_metrics=final,
                    checkpoint=str(self.out / self.hookpoint),
                ),
            )
        if self.ddp.world > 1:
            dist.barrier()  # the files exist when every rank returns
        return TrainResult(
            checkpoint=self.out / self.hookpoint,
            steps=self.steps,
            tokens=self.rows,
            eval=self.eval_result,
            train_fvu=final["train_fvu"],
            dead_fraction=final["dead_fraction"],
            history=self.history,
        )


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
    trainer = Trainer(
        cfg,
        train_batches,
        eval_batches,
        out_dir,
        hookpoint=hookpoint,
        d_in=d_in,
        d_out=d_out,
        total_rows=total_rows,
        overwrite=overwrite,
    )
    if not overwrite:
        trainer.resume()
    return trainer.run()


def _kept(last_checkpoint: int | None, out: Path) -> str:
    if last_checkpoint is None:
        return "no checkpoint was written yet"
    return f"the last good checkpoint (step {last_checkpoint}) in {out} is kept"


def _save_state(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


@torch.no_grad()
def _evaluate(
    coder: SparseCoder, eval_batches: Iterable[Any], ddp: Dist, use_autocast: bool
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
        else TorchBatches(ShardReader(eval_shard_dir, batch_rows=cfg.batch_size))
    )
    return train(
        cfg,
        TorchBatches(reader),
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
