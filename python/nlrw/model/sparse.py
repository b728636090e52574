"""The sparse model: a TopK skip transcoder or a TopK sparse autoencoder (SAE).

A **transcoder** approximates one MLP of the subject model, mapping the MLP's input x to
its output y through a wide layer of sparse latents::

    z = topk(relu(W_enc x + b_enc))          (k latents of num_latents survive per row)
    y = W_dec·z + b_dec + W_skip x           (W_skip: the optional linear skip connection)

An **SAE** is the same with input = target and no skip, whose encoder sees the input
centred on the decoder bias, ``z = topk(relu(W_enc (x − b_dec) + b_enc))``, as EleutherAI's
sparsify does. Checkpoints of the paper's era (the older ``sae`` package) centred the input
on b_dec for transcoders too; :func:`load` reads them only when told which kind they are.

Checkpoints use sparsify's layout, one folder per hookpoint::

    <hookpoint>/cfg.json          activation, expansion_factor, normalize_decoder, num_latents,
                                  k, multi_topk, skip_connection, transcode, d_in
    <hookpoint>/sae.safetensors   encoder.weight [L, d_in], encoder.bias [L], W_dec [L, d_in],
                                  b_dec [d_in], W_skip [d_in, d_in] (with a skip connection)

so that ``sparsify.SparseCoder.load_from_disk`` loads ours and :func:`load` loads theirs.
(A transcoder whose output width differs from its input width adds ``d_out`` to cfg.json;
sparsify cannot load that one.)

The latents are sparse, and so is most of the training step's work: :func:`encode_train`
selects the top-k with ``torch.topk`` and :func:`decode_train` decodes with an embedding
bag, both with hand-written backward passes that touch only the B·k selected
(row, latent) pairs instead of the dense ``[B, L]`` matrix (see ``benches/bench_train.py``).
For inference on the CPU, :meth:`SparseCoder.encode` uses the Rust top-k of
:mod:`nlrw.model.topk`.

Why this module is long: the coder's math (inference and the sparse training step with its
hand-written backward passes) and sparsify's checkpoint format must agree field by field;
they are kept side by side so that a change to one is seen next to the other.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from nlrw.lib.io import atomic_path, atomic_write_json, fsync_dir
from nlrw.lib.types import Kind
from nlrw.model import topk as _topk

__all__ = [
    "CheckpointError",
    "EvalResult",
    "EvalSums",
    "Latents",
    "Rows",
    "SparseCoder",
    "SparseCoderConfig",
    "TrainLatents",
    "as_rows",
    "decode_train",
    "encode_train",
    "evaluate",
    "load",
    "select_values",
    "split_rows",
]

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"


class CheckpointError(ValueError):
    """A checkpoint folder is incomplete, corrupt or inconsistent (the message names the file)."""


class Latents(NamedTuple):
    """Top-k latents of each row: ``values[i, j]`` is the activation of latent ``indices[i, j]``."""

    values: Tensor
    indices: Tensor


@dataclass(frozen=True)
class SparseCoderConfig:
    """Shape and kind of a sparse coder (what cfg.json records)."""

    kind: Kind
    """``"transcoder"`` (x → MLP output) or ``"sae"`` (x → x)."""
    d_in: int
    """Width of the input x."""
    d_out: int
    """Width of the target y (= d_in for an SAE, and for every sparsify checkpoint)."""
    num_latents: int
    """Number of latents L."""
    k: int
    """Latents kept per row by the top-k."""
    skip_connection: bool = False
    """Add ``W_skip x`` to the output."""
    normalize_decoder: bool = False
    """Keep decoder rows at unit norm while training (sparsify does so for SAEs only)."""
    multi_topk: bool = False
    """Trained with the Multi-TopK loss (recorded for sparsify; inference ignores it)."""
    encoder_subtracts_b_dec: bool = False
    """Encode ``x − b_dec`` instead of x: true for SAEs and for paper-era transcoders."""
    legacy: bool = False
    """Read from (and written back in) the paper-era layout without ``transcode``/``activation``."""

    def __post_init__(self) -> None:
        if self.kind not in ("transcoder", "sae"):
            raise ValueError(f"kind must be 'transcoder' or 'sae', got {self.kind!r}")
        for name in ("d_in", "d_out", "num_latents", "k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.k >= self.num_latents:
            raise ValueError(
                f"k ({self.k}) must be smaller than the number of latents ({self.num_latents})"
            )
        if self.kind == "sae" and self.d_out != self.d_in:
            raise ValueError(f"an SAE reconstructs its input: d_out ({self.d_out}) must equal d_in")

    @classmethod
    def create(
        cls,
        kind: Kind,
        d_in: int,
        *,
        k: int,
        num_latents: int = 0,
        expansion_factor: int = 32,
        d_out: int | None = None,
        skip_connection: bool | None = None,
        multi_topk: bool = False,
    ) -> SparseCoderConfig:
        """A new coder's config with sparsify's conventions.

        ``num_latents = 0`` means ``expansion_factor · d_in``; ``skip_connection = None``
        means on for a transcoder, off for an SAE; an SAE keeps unit-norm decoder rows and
        centres its input on b_dec, a transcoder does neither.
        """
        return cls(
            kind=kind,
            d_in=d_in,
            d_out=d_in if d_out is None else d_out,
            num_latents=num_latents or expansion_factor * d_in,
            k=k,
            skip_connection=(kind == "transcoder") if skip_connection is None else skip_connection,
            normalize_decoder=kind == "sae",
            multi_topk=multi_topk,
            encoder_subtracts_b_dec=kind == "sae",
        )

    def to_sparsify(self) -> dict[str, Any]:
        """cfg.json in sparsify's layout (the paper-era layout for a legacy checkpoint)."""
        out: dict[str, Any] = {
            "activation": "topk",
            "expansion_factor": max(1, self.num_latents // self.d_in),
            "normalize_decoder": self.normalize_decoder,
            "num_latents": self.num_latents,
            "k": self.k,
            "multi_topk": self.multi_topk,
            "skip_connection": self.skip_connection,
            "transcode": self.kind == "transcoder",
            "d_in": self.d_in,
        }
        if self.d_out != self.d_in:
            out["d_out"] = self.d_out
        if self.legacy:
            del out["activation"], out["transcode"]
        return out


class SparseCoder(nn.Module):
    """A TopK transcoder or SAE with sparsify's parameter names.

    Parameters: ``encoder.weight`` [L, d_in], ``encoder.bias`` [L], ``W_dec`` [L, d_out],
    ``b_dec`` [d_out], and ``W_skip`` [d_out, d_in] with a skip connection. Calling the
    coder on x gives the full output ``W_dec·z + b_dec + W_skip x``.
    """

    W_skip: nn.Parameter | None

    def __init__(
        self,
        cfg: SparseCoderConfig,
        *,
        seed: int | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """A coder with sparsify's initialization.

        ``W_enc`` is drawn like ``nn.Linear``'s default, uniform in ±1/sqrt(d_in), from a CPU
        generator seeded with ``seed`` (so every device and every DDP rank draws the same
        weights); biases and ``W_skip`` start at zero; the decoder starts at zero for a
        transcoder, and at the encoder's rows scaled to unit norm for an SAE. The biases
        are set from data statistics by :meth:`init_biases`.
        """
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(0 if seed is None else seed)
        bound = 1.0 / math.sqrt(cfg.d_in)
        w_enc = (torch.rand(cfg.num_latents, cfg.d_in, generator=gen) * 2 - 1) * bound
        self.encoder = nn.Linear(cfg.d_in, cfg.num_latents, device=device, dtype=dtype)
        with torch.no_grad():
            self.encoder.weight.copy_(w_enc)
            self.encoder.bias.zero_()
        if cfg.kind == "transcoder":
            w_dec = torch.zeros(cfg.num_latents, cfg.d_out)
        else:
            w_dec = w_enc / (w_enc.norm(dim=1, keepdim=True) + torch.finfo(w_enc.dtype).eps)
        self.W_dec = nn.Parameter(w_dec.to(device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out, device=device, dtype=dtype))
        self.W_skip = (
            nn.Parameter(torch.zeros(cfg.d_out, cfg.d_in, device=device, dtype=dtype))
            if cfg.skip_connection
            else None
        )

    # ------------------------------------------------------------------ properties
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_out(self) -> int:
        return self.cfg.d_out

    @property
    def num_latents(self) -> int:
        return self.cfg.num_latents

    @property
    def k(self) -> int:
        return self.cfg.k

    @property
    def device(self) -> torch.device:
        return self.encoder.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.weight.dtype

    # ------------------------------------------------------------------ init and constraints
    @torch.no_grad()
    def init_biases(self, mean_x: Tensor, mean_y: Tensor) -> None:
        """Centre the pre-activations and the output on the data, as sparsify does.

        ``b_dec = mean(y)``; for a transcoder also ``b_enc = −mean(x)·W_encᵀ``, so that
        ``W_enc x + b_enc = W_enc (x − mean(x))`` (an SAE gets the same centring from
        encoding ``x − b_dec`` with ``b_dec = mean(x)``).
        """
        self.b_dec.copy_(mean_y.to(self.b_dec))
        if not self.cfg.encoder_subtracts_b_dec:
            self.encoder.bias.copy_(-(mean_x.to(self.dtype) @ self.encoder.weight.T))

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        """``W_dec[l] ← W_dec[l] / (‖W_dec[l]‖ + ε)`` for every latent l."""
        eps = torch.finfo(self.W_dec.dtype).eps
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True) + eps)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """``∇W_dec[l] ← ∇W_dec[l] − (∇W_dec[l]·W_dec[l]) W_dec[l]`` (rows of unit norm).

        A step along a unit-norm row only changes its norm, which the renormalization
        after the step undoes; removing that component keeps the optimizer's step for the
        direction.
        """
        grad = self.W_dec.grad
        if grad is None:
            return
        parallel = (grad * self.W_dec).sum(dim=1, keepdim=True)
        grad.sub_(parallel * self.W_dec)

    # ------------------------------------------------------------------ forward
    def pre_acts(self, x: Tensor) -> Tensor:
        """``W_enc x + b_enc`` (``W_enc (x − b_dec) + b_enc`` when the encoder centres on b_dec)."""
        x = x.to(self.dtype)
        if self.cfg.encoder_subtracts_b_dec:
            x = x - self.b_dec
        return F.linear(x, self.encoder.weight, self.encoder.bias)

    def encode(self, x: Tensor) -> Latents:
        """Top-k latents ``topk(relu(pre_acts(x)))``, values sorted descending.

        Without autograd on the CPU the Rust kernel (:func:`nlrw.model.topk.topk_encode`) selects
        them, ties broken by the lower latent index; otherwise ``torch.topk`` does, with
        autograd through the values (:func:`encode_train` is the faster path to train with).
        """
        if not torch.is_grad_enabled() and self.device.type == "cpu":
            pre = self.pre_acts(x).float().contiguous()
            values, indices = _topk.topk_encode(pre, self.k)
            assert isinstance(values, Tensor) and isinstance(indices, Tensor)
            return Latents(values, indices)
        values, indices = torch.topk(torch.relu(self.pre_acts(x)), self.k, dim=-1, sorted=True)
        return Latents(values, indices)

    def decode(self, values: Tensor, indices: Tensor) -> Tensor:
        """``W_dec·z + b_dec`` for the sparse latents z (no skip connection)."""
        out = F.embedding_bag(
            indices, self.W_dec, per_sample_weights=values.to(self.W_dec.dtype), mode="sum"
        )
        return out + self.b_dec

    def skip(self, x: Tensor) -> Tensor | None:
        """``W_skip x``, or None without a skip connection."""
        if self.W_skip is None:
            return None
        return x.to(self.dtype) @ self.W_skip.T

    def forward(self, x: Tensor) -> Tensor:
        """The full output ``W_dec·topk(relu(W_enc x + b_enc)) + b_dec + W_skip x``."""
        out = self.decode(*self.encode(x))
        skip = self.skip(x)
        return out if skip is None else out + skip

    # ------------------------------------------------------------------ save
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``path/cfg.json`` and ``path/sae.safetensors`` (sparsify's layout).

        Each file is replaced atomically. ``sae.safetensors`` is written before
        ``cfg.json``, and an existing ``cfg.json`` that describes another shape or kind is
        removed first, so a crash at any point never leaves a ``cfg.json`` beside weights
        it does not describe: the folder loads either as the old coder, the new one, or not
        at all.
        """
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        cfg_path = folder / CFG_FILE
        cfg = self.cfg.to_sparsify()
        if cfg_path.exists():
            try:
                same = json.loads(cfg_path.read_text()) == cfg
            except (OSError, ValueError):
                same = False
            if not same:
                cfg_path.unlink()
                fsync_dir(folder)
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in self.state_dict().items()}
        with atomic_path(folder / WEIGHTS_FILE) as tmp:
            save_file(tensors, tmp, metadata={"format": "pt"})
        atomic_write_json(cfg_path, cfg)


# ---------------------------------------------------------------------- loading


def _read_cfg(folder: Path) -> dict[str, Any]:
    cfg_path = folder / CFG_FILE
    if not folder.is_dir():
        raise FileNotFoundError(f"no sparse coder checkpoint folder at {folder}")
    if not cfg_path.is_file():
        raise FileNotFoundError(f"checkpoint {folder} has no {CFG_FILE}: {cfg_path} is missing")
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_path} must hold a JSON object, got {type(raw).__name__}")
    for key in ("d_in", "k"):
        if key not in raw:
            raise CheckpointError(f"{cfg_path} lacks the field {key!r}")
    return raw


def _config_from_sparsify(
    raw: dict[str, Any], cfg_path: Path, legacy: Kind | None
) -> SparseCoderConfig:
    """Our config from sparsify's cfg.json (or the paper era's, given ``legacy``)."""
    activation = raw.get("activation", "topk")
    if activation != "topk":
        raise CheckpointError(
            f"{cfg_path}: activation {activation!r} is not supported (only 'topk')"
        )
    is_legacy = "transcode" not in raw
    if is_legacy and legacy is None:
        raise CheckpointError(
            f"{cfg_path} has no 'transcode' field: a paper-era checkpoint (the older `sae` "
            "package), whose encoder saw x − b_dec even for transcoders. Say what it is: "
            "load(path, legacy='transcoder') or load(path, legacy='sae')"
        )
    if not is_legacy and legacy is not None:
        raise CheckpointError(
            f"{cfg_path} records transcode={raw['transcode']}: it is not a paper-era "
            "checkpoint, so legacy= must not be given"
        )
    try:
        d_in = int(raw["d_in"])
        num_latents = int(raw.get("num_latents") or 0) or d_in * int(
            raw.get("expansion_factor", 32)
        )
        kind: Kind = (legacy or "sae") if is_legacy else "transcoder" if raw["transcode"] else "sae"
        return SparseCoderConfig(
            kind=kind,
            d_in=d_in,
            d_out=int(raw.get("d_out", d_in)),
            num_latents=num_latents,
            k=int(raw["k"]),
            skip_connection=bool(raw.get("skip_connection", False)),
            normalize_decoder=bool(raw.get("normalize_decoder", kind == "sae")),
            multi_topk=bool(raw.get("multi_topk", False)),
            # sparsify centres the input on b_dec exactly when transcode is false; the
            # paper-era package always did.
            encoder_subtracts_b_dec=is_legacy or kind == "sae",
            legacy=is_legacy,
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_path} describes no valid sparse coder: {e}") from e


def load(
    path: str | os.PathLike[str],
    *,
    legacy: Kind | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> SparseCoder:
    """Load a sparse coder from a checkpoint folder in sparsify's layout.

    ``legacy`` is required for, and only for, a paper-era checkpoint (cfg.json without
    ``transcode``): ``"transcoder"`` or ``"sae"``. Its encoder then sees ``x − b_dec``
    (``cfg.encoder_subtracts_b_dec`` records which encoding was used). ``dtype`` casts the
    weights (default: as stored). A missing or corrupt file raises ``FileNotFoundError`` or
    :class:`CheckpointError` naming it.
    """
    folder = Path(path)
    raw = _read_cfg(folder)
    cfg = _config_from_sparsify(raw, folder / CFG_FILE, legacy)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(f"checkpoint {folder} has no {WEIGHTS_FILE}: {weights_path}")
    try:
        with safe_open(str(weights_path), framework="pt", device="cpu") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{weights_path} is not a readable safetensors file: {e}") from e
    coder = SparseCoder(cfg, device="meta")
    expected = {name: tuple(p.shape) for name, p in coder.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{weights_path} does not match {folder / CFG_FILE}: "
            f"missing tensors {missing}, unexpected tensors {extra}"
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(
                f"{weights_path}: tensor {name!r} has shape {list(tensors[name].shape)}, "
                f"{folder / CFG_FILE} implies {list(shape)}"
            )
    store_dtype = dtype or tensors["encoder.weight"].dtype
    coder = coder.to_empty(device=device).to(store_dtype)
    coder.load_state_dict({n: t.to(store_dtype) for n, t in tensors.items()})
    return coder


def check_activation_width(
    coder: SparseCoder, coder_path: Path, width: int, activations: Path
) -> None:
    """Raise ``ValueError`` unless rows of ``width`` at ``activations`` are what ``coder``
    reads: ``[x | y]`` (``d_in + d_out``) for a transcoder, ``d_in`` for an SAE."""
    kind = coder.cfg.kind
    expected = coder.d_in + coder.d_out if kind == "transcoder" else coder.d_in
    if width != expected:
        layout = (
            f"[x | y] = d_in + d_out = {coder.d_in} + {coder.d_out} = {expected}"
            if kind == "transcoder"
            else f"d_in = {coder.d_in}"
        )
        raise ValueError(
            f"{kind} checkpoint {coder_path} has d_in = {coder.d_in} (rows of {layout}), but "
            f"the activations {activations} have rows of width {width}: the checkpoint "
            "was not trained on these activations"
        )


# ---------------------------------------------------------------------- sparse training path


def _sum_by_latent(indices: Tensor, weights: Tensor, rows: Tensor, num_latents: int) -> Tensor:
    """``out[l] = Σ_{(b,j): indices[b,j] = l} weights[b,j] · rows[b]``, shape [L, d].

    The gradient of a weight matrix whose row l was used by the (row, latent) pairs
    selected. Sorting the B·k pairs by latent and summing each latent's rows as one bag
    of an embedding bag does this in O(B·k·d) without materializing a [B·k, d] tensor.
    """
    k = indices.shape[1]
    flat = indices.reshape(-1)
    # A stable sort keeps the summation order fixed (reproducible runs). On the CPU torch
    # sorts float64 keys ~30x faster than int64 ones; indices < 2^53 stay exact.
    keys = flat.double() if flat.device.type == "cpu" else flat
    order = torch.sort(keys, stable=True).indices
    counts = torch.bincount(flat, minlength=num_latents)
    offsets = torch.cumsum(counts, 0) - counts
    return F.embedding_bag(
        torch.div(order, k, rounding_mode="floor"),
        rows,
        offsets,
        mode="sum",
        per_sample_weights=weights.reshape(-1)[order].to(rows.dtype),
    )


def _gather_dot(
    table: Tensor, indices: Tensor, rows: Tensor, *, dense: bool = False, chunk: int = 256
) -> Tensor:
    """``out[b, j] = table[indices[b, j]] · rows[b]``.

    By default it gathers the selected table rows in chunks of rows, to stay in cache: the
    right way for the top-k's k = 32 of 8,192 latents. With ``dense`` it computes
    ``(rows · tableᵀ)[b, indices[b, j]]``: ``B·L·d`` multiply-adds instead of ``B·k·d``, but
    one GEMM, which wins when a row selects many latents (AuxK's k_aux = d_out / 2 = 288),
    where the gathered ``[B, k, d]`` block outgrows every cache and the gather is
    memory-bound. Measured on 2 AVX2 cores (B = 1,024, L = 8,192, d = 576): k = 32 gathered
    28 ms, dense 101 ms; k = 288 gathered 660 ms, dense 97 ms. The two differ in float
    rounding only (~1e-7 relative on the gradients).
    """
    if dense:
        return (rows @ table.T).gather(1, indices)
    out = torch.empty(indices.shape, dtype=table.dtype, device=table.device)
    for s in range(0, indices.shape[0], chunk):
        gathered = table[indices[s : s + chunk]]  # [c, k, d]
        out[s : s + chunk] = torch.bmm(gathered, rows[s : s + chunk].unsqueeze(2)).squeeze(2)
    return out


class _SparseEncoder(torch.autograd.Function):
    """Values ``relu(W_enc[idx] · x + b_enc[idx])`` of already selected latents.

    Forward returns the values the selection computed; backward is sparse, with
    ``g' = g · [value > 0]`` (the ReLU's derivative)::

        ∂x[b]      = Σ_j g'[b,j] W_enc[idx[b,j]]
        ∂W_enc[l]  = Σ_{(b,j): idx[b,j]=l} g'[b,j] x[b]
        ∂b_enc[l]  = Σ_{(b,j): idx[b,j]=l} g'[b,j]
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, indices: Tensor, values: Tensor
    ) -> Tensor:
        ctx.save_for_backward(x, weight, indices, values > 0)
        ctx.bias_shape = bias.shape
        return values.clone()

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, indices, active = ctx.saved_tensors
        g = grads[0].to(weight.dtype) * active
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, weight, per_sample_weights=g, mode="sum")
            grad_x = grad_x.to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = _sum_by_latent(indices, g, x.to(weight.dtype), weight.shape[0])
        if ctx.needs_input_grad[2]:
            grad_b = g.new_zeros(ctx.bias_shape).index_add_(0, indices.reshape(-1), g.reshape(-1))
        return grad_x, grad_w, grad_b, None, None


class _SparseDecoder(torch.autograd.Function):
    """``out[b] = Σ_j values[b,j] W_dec[idx[b,j]]`` with a sparse backward::

    ∂values[b,j] = W_dec[idx[b,j]] · g[b]
    ∂W_dec[l]    = Σ_{(b,j): idx[b,j]=l} values[b,j] g[b]
    """

    @staticmethod
    def forward(
        ctx: Any, values: Tensor, indices: Tensor, weight: Tensor, dense: bool = False
    ) -> Tensor:
        values = values.to(weight.dtype)
        ctx.save_for_backward(values, indices, weight)
        ctx.dense = dense
        return F.embedding_bag(indices, weight, per_sample_weights=values, mode="sum")

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        values, indices, weight = ctx.saved_tensors
        g = grads[0].to(weight.dtype).contiguous()
        grad_values = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_values = _gather_dot(weight, indices, g, dense=ctx.dense)
        if ctx.needs_input_grad[2]:
            grad_w = _sum_by_latent(indices, values, g, weight.shape[0])
        return grad_values, None, grad_w, None


class TrainLatents(NamedTuple):
    """Latents selected for a training step, with the pre-activations AuxK selects from."""

    values: Tensor
    """[B, k] activations of the top-k latents (autograd flows through them)."""
    indices: Tensor
    """[B, k] latent indices."""
    pre_acts: Tensor
    """[B, L] ``relu(pre_acts)``, detached (for AuxK and Multi-TopK selections)."""
    encoder_input: Tensor
    """x, or x − b_dec when the encoder centres on b_dec."""


def encode_train(coder: SparseCoder, x: Tensor) -> TrainLatents:
    """``topk(relu(W_enc x + b_enc))`` with autograd through the selected values only.

    The selection (``torch.topk``) runs without autograd; :class:`_SparseEncoder` then
    gives the values a backward pass costing O(B·k·d) instead of the dense O(B·L·d).
    """
    x_in = x.to(coder.dtype)
    if coder.cfg.encoder_subtracts_b_dec:
        x_in = x_in - coder.b_dec
    with torch.no_grad():
        relu_pre = torch.relu(F.linear(x_in, coder.encoder.weight, coder.encoder.bias))
        values, indices = torch.topk(relu_pre, coder.k, dim=-1, sorted=False)
    values = select_values(coder, x_in, indices, values)
    return TrainLatents(values, indices, relu_pre, x_in)


def select_values(coder: SparseCoder, x_in: Tensor, indices: Tensor, values: Tensor) -> Tensor:
    """Attach the sparse encoder backward to ``values`` of latents ``indices`` of ``x_in``."""
    out = _SparseEncoder.apply(x_in, coder.encoder.weight, coder.encoder.bias, indices, values)
    assert isinstance(out, Tensor)
    return out


def decode_train(
    coder: SparseCoder,
    values: Tensor,
    indices: Tensor,
    *,
    bias: bool = True,
    dense_backward: bool = False,
) -> Tensor:
    """``W_dec·z (+ b_dec)`` with the sparse backward of :class:`_SparseDecoder`
    (``dense_backward``: its ``∂values`` from one dense product, see :func:`_gather_dot`)."""
    out = _SparseDecoder.apply(values, indices, coder.W_dec, dense_backward)
    assert isinstance(out, Tensor)
    return out + coder.b_dec if bias else out


# ---------------------------------------------------------------------- evaluation


class EvalResult(NamedTuple):
    """Reconstruction quality of a sparse coder on a set of rows."""

    fvu: float
    """Fraction of variance unexplained ``Σ‖y − ŷ‖² / Σ‖y − ȳ‖²`` (ȳ: the set's mean)."""
    dead_fraction: float
    """Fraction of latents that never fired (value > 0) on the set."""
    rows: int
    """Rows evaluated."""


class EvalSums:
    """Running sums of an evaluation, mergeable across batches and DDP ranks.

    ``Σ‖y − ȳ‖² = Σ‖y‖² − n‖ȳ‖²`` lets FVU stream in one pass; the sums are kept in
    float64 so the subtraction loses nothing that matters.
    """

    def __init__(self, num_latents: int, d_out: int, device: torch.device) -> None:
        self.sse = torch.zeros((), dtype=torch.float64, device=device)
        self.sum_y = torch.zeros(d_out, dtype=torch.float64, device=device)
        self.sum_y2 = torch.zeros((), dtype=torch.float64, device=device)
        self.rows = torch.zeros((), dtype=torch.float64, device=device)
        self.fired = torch.zeros(num_latents, dtype=torch.float64, device=device)

    def update(self, y: Tensor, y_hat: Tensor, latents: Latents) -> None:
        y64 = y.double()
        self.sse += (y64 - y_hat.double()).pow(2).sum()
        self.sum_y += y64.sum(0)
        self.sum_y2 += y64.pow(2).sum()
        self.rows += y.shape[0]
        fired = latents.indices[latents.values > 0]
        self.fired[fired] = 1.0

    def tensors(self) -> list[Tensor]:
        """The sums, for an all-reduce (``fired`` reduced with MAX, the rest with SUM)."""
        return [self.sse, self.sum_y, self.sum_y2, self.rows, self.fired]

    def result(self) -> EvalResult:
        n = float(self.rows)
        if n == 0:
            raise ValueError("no rows were evaluated (is the evaluation set empty?)")
        total_var = float(self.sum_y2) - float(self.sum_y.pow(2).sum()) / n
        fvu = float(self.sse) / total_var if total_var > 0 else math.inf
        return EvalResult(fvu, 1.0 - float(self.fired.mean()), int(n))


class Rows(NamedTuple):
    """A batch split into the coder's input and target."""

    x: Tensor
    """[rows, d_in] input (the MLP input of a transcoder)."""
    y: Tensor
    """[rows, d_out] target (the MLP output; x itself for an SAE)."""


def split_rows(coder: SparseCoder, batch: Tensor) -> Rows:
    """Input x and target y of a batch: ``[x | y]`` for a transcoder, ``[x]`` for an SAE."""
    width = coder.d_in + coder.d_out if coder.cfg.kind == "transcoder" else coder.d_in
    if batch.ndim != 2 or batch.shape[1] != width:
        what = (
            f"d_in + d_out = {coder.d_in} + {coder.d_out}"
            if coder.cfg.kind == "transcoder"
            else f"d_in = {coder.d_in}"
        )
        raise ValueError(f"batch has shape {list(batch.shape)}; expected [rows, {what}]")
    if coder.cfg.kind == "transcoder":
        return Rows(batch[:, : coder.d_in], batch[:, coder.d_in :])
    return Rows(batch, batch)


def as_rows(batch: Any) -> Tensor:
    """A batch (torch tensor, or numpy float array) as a float tensor, without copying."""
    if isinstance(batch, Tensor):
        if not batch.is_floating_point():
            raise TypeError(f"batches must hold floats, got a torch {batch.dtype} tensor")
        return batch
    if isinstance(batch, np.ndarray):
        if not np.issubdtype(batch.dtype, np.floating):
            hint = (
                " (bfloat16 shard rows arrive as uint16: convert with nlrw.model.shards.to_torch)"
                if batch.dtype == np.uint16
                else ""
            )
            raise TypeError(f"batches must hold floats, got numpy {batch.dtype}{hint}")
        return torch.from_numpy(batch)
    raise TypeError(f"batches must be torch tensors or numpy arrays, got {type(batch).__name__}")


@torch.no_grad()
def evaluate(
    coder: SparseCoder,
    batches: Iterable[Any],
    *,
    reduce: Callable[[EvalSums], None] | None = None,
) -> EvalResult:
    """FVU and the fraction of latents that never fired, over an iterable of row batches.

    Batches are torch tensors or numpy float arrays laid out as :func:`split_rows` says.
    ``reduce`` is applied to the sums before the result is read (the trainer passes an
    all-reduce across DDP ranks).
    """
    sums = EvalSums(coder.num_latents, coder.d_out, coder.device)
    for batch in batches:
        rows = as_rows(batch).to(coder.device, torch.float32)
        if rows.shape[0] == 0:
            continue
        x, y = split_rows(coder, rows)
        latents = coder.encode(x)
        y_hat = coder.decode(*latents)
        skip = coder.skip(x)
        if skip is not None:
            y_hat = y_hat + skip
        sums.update(y, y_hat.float(), latents)
    if reduce is not None:
        reduce(sums)
    return sums.result()
