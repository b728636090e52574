"""Options of the train stage (:mod:`nlrw.train`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from nlrw.lib.types import Kind

__all__ = ["TrainConfig"]


@dataclass(frozen=True)
class TrainConfig:
    """Options of the ``train`` stage (the CLI's help is generated from these docstrings)."""

    kind: Kind = "transcoder"
    """What to train: a transcoder (MLP input → MLP output) or an SAE (input → input)."""
    pretrained: str | None = None
    """Adopt this sparse coder instead of training one: a checkpoint folder in sparsify's
    layout, or a folder of hookpoint folders (the hookpoint is collect.hookpoint); checked
    against the collected activations, then written to the run (nlrw.model.pretrained)."""
    legacy: Kind | None = None
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
