"""The subject model: load it, find a hookpoint, capture activations there, splice into it.

The subject is any ``transformers`` causal LM, named as on the hub, by a local folder, or by a
local GGUF file (converted once to safetensors by :func:`nlrw.assets.resolve_model`, which also
maps the embedded default's alias ``"smollm2-135m"``).

A **hookpoint** is a module name from the model's own module tree, resolved with
``model.get_submodule`` — never by guessing the model family from a substring:

* ``model.layers.15.mlp`` (Llama, Qwen2, SmolLM2), ``gpt_neox.layers.6.mlp`` (Pythia),
  ``transformer.h.6.mlp`` (GPT-2): an MLP. A **transcoder** is trained to map the MLP's input
  ``x`` to its output ``y``, so :func:`capture` with ``kind="transcoder"`` returns both, read by
  a forward hook on the module itself. That hook sees whatever the layer feeds the MLP, which
  matters for GPT-NeoX's parallel residual (Pythia): there the MLP input is
  ``post_attention_layernorm(h)`` of the *layer's input* ``h``, not of ``h + attention(h)``;
  recomputing it from the architecture would be easy to get wrong, hooking the module is not.
* ``model.layers.15`` (a decoder layer): with ``kind="sae"`` the captured activation is the
  module's output, here the residual stream after that layer, which an SAE reconstructs.

:func:`capture` stops the forward pass as soon as the hookpoint has run (the hook raises a
private exception that :func:`capture` catches), so the layers above it and the unembedding are
never computed: on SmolLM2 at layer 15 of 30 that roughly halves the cost of collection.

Precision: float32 is the default on the CPU, bfloat16 on a GPU (``dtype="auto"``).
bfloat16 keeps 8 significant bits, so every value is rounded by up to 2⁻⁸ ≈ 0.4 % relative, and
the rounding of every layer below the hookpoint accumulates: on SmolLM2-135M at
``model.layers.15.mlp`` the bfloat16 activations differ from the float32 ones by 2.2 % (MLP
input) and 3.1 % (MLP output), as the norm of the difference over the norm of the float32 value
(``benches/bench_collect.py`` records it). They take half the disk, and on a CPU with AVX512-BF16
the forward pass is 2-3× faster. Equivalence tests run in float32.

For later stages, :func:`splice` replaces a hookpoint's output by ``fn(input, output)`` (a
transcoder's reconstruction, simulated latents decoded) and :func:`next_token_loss` measures
the next-token cross-entropy with or without such a splice.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from nlrw.lib.types import DTypeOption, Kind

__all__ = [
    "Activations",
    "DTypeOption",
    "HookpointError",
    "Kind",
    "Subject",
    "capture",
    "default_device",
    "get_hookpoint",
    "load_subject",
    "load_tokenizer",
    "max_context",
    "next_token_loss",
    "resolve_dtype",
    "splice",
]

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class HookpointError(ValueError):
    """A hookpoint that names no module of the model; the message lists the nearest names."""


@dataclass(frozen=True)
class Subject:
    """A loaded subject model and its tokenizer.

    ``name`` is what the user asked for; ``path`` what ``from_pretrained`` loaded (the converted
    local folder for a GGUF or an alias, the name itself for a hub model or a local folder).
    """

    model: Any  # a transformers PreTrainedModel (causal LM), in eval mode, no gradients
    tokenizer: Any  # the matching transformers tokenizer
    name: str
    path: str
    device: torch.device
    dtype: torch.dtype


class Activations(NamedTuple):
    """Activations captured at a hookpoint, each ``[batch, seq, width]``.

    ``x`` is the module's input (``None`` for ``kind="sae"``), ``y`` its output.
    """

    x: torch.Tensor | None
    y: torch.Tensor


def default_device() -> torch.device:
    """The first GPU when one is present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: DTypeOption | torch.dtype, device: torch.device | str) -> torch.dtype:
    """The torch dtype for a :data:`DTypeOption` (``"auto"``: bfloat16 on a GPU, else float32)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be float32, bfloat16 or float16, not {dtype}")
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, float32, bfloat16, float16; not {dtype!r}")
    return _DTYPES[dtype]


def load_tokenizer(model: str) -> Any:
    """The tokenizer of subject ``model`` (an embedded name, a hub name or a local folder),
    without loading its weights."""
    from transformers import AutoTokenizer

    from nlrw.assets import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(model))


def load_subject(
    name_or_path: str,
    *,
    dtype: DTypeOption | torch.dtype = "auto",
    device: torch.device | str | None = None,
) -> Subject:
    """Loads a causal LM and its tokenizer for reading and splicing activations.

    Args:
        name_or_path: a hub name, a local Hugging Face folder, a ``.gguf`` file, or an alias of
            the embedded default (see :func:`nlrw.assets.resolve_model`).
        dtype: precision of the weights and activations (see the module docstring).
        device: where to run; default :func:`default_device`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nlrw.assets import resolve_model

    target = torch.device(device) if device is not None else default_device()
    torch_dtype = resolve_dtype(dtype, target)
    path = resolve_model(name_or_path)
    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    model.to(target)
    model.eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return Subject(model, tokenizer, name_or_path, path, target, torch_dtype)


def max_context(model: nn.Module) -> int | None:
    """The longest sequence the model's position encoding allows, when its config says so."""
    config = getattr(model, "config", None)
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def get_hookpoint(model: nn.Module, hookpoint: str) -> nn.Module:
    """The module named ``hookpoint`` (``model.get_submodule``).

    Raises:
        HookpointError: no such module; the message lists the nearest module names.
    """
    if hookpoint:
        try:
            return model.get_submodule(hookpoint)
        except AttributeError:
            pass
    names = [name for name, _ in model.named_modules() if name]
    nearest = difflib.get_close_matches(hookpoint, names, n=6, cutoff=0.5)
    if not nearest:
        # Far from every name (a typo in the prefix): show names of the same depth instead.
        depth = hookpoint.count(".")
        nearest = [n for n in names if n.count(".") == depth][:6] or names[:6]
    raise HookpointError(
        f"hookpoint {hookpoint!r} is not a module of {type(model).__name__}; nearest module "
        f"names: {', '.join(nearest)}"
    )


def _first_tensor(value: object, what: str) -> torch.Tensor:
    """The tensor of a module's input or output (decoder layers may return tuples)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"the hookpoint's {what} is not a tensor (got {type(value).__name__})")


def _module_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    if args:
        return _first_tensor(args[0], "input")
    if "hidden_states" in kwargs:
        return _first_tensor(kwargs["hidden_states"], "input")
    tensors = [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
    if not tensors:
        raise TypeError("the hookpoint was called without a tensor input")
    return tensors[0]


def _replace_output(output: object, new: torch.Tensor) -> object:
    if isinstance(output, torch.Tensor):
        return new
    assert isinstance(output, (tuple, list))
    return type(output)([new, *output[1:]])


class _StopForward(BaseException):
    """Raised by the capture hook to end the forward pass once the hookpoint has run.

    A ``BaseException`` on purpose: model code that catches ``Exception`` to fall back to
    another path (some attention implementations do) must not swallow it and run on.
    """


def capture(
    model: nn.Module,
    hookpoint: str,
    input_ids: torch.Tensor,
    *,
    kind: Kind = "transcoder",
    attention_mask: torch.Tensor | None = None,
) -> Activations:
    """Runs ``model`` on ``input_ids`` up to ``hookpoint`` and returns what it saw there.

    The layers above the hookpoint (and the unembedding) are not run: a forward hook captures
    the activations and raises a private exception that ends the pass.

    Args:
        model: a causal LM (any ``nn.Module`` called as ``model(input_ids=...)``).
        hookpoint: module name, e.g. ``model.layers.15.mlp``.
        input_ids: ``[batch, seq]`` token ids on the model's device.
        kind: ``"transcoder"``: ``x`` = the module's input and ``y`` = its output;
            ``"sae"``: ``y`` = its output only (the residual stream for a decoder layer).
        attention_mask: optional ``[batch, seq]`` mask (1 = real token).
    """
    if kind not in ("transcoder", "sae"):
        raise ValueError(f"kind must be 'transcoder' or 'sae', not {kind!r}")
    module = get_hookpoint(model, hookpoint)
    seen: dict[str, torch.Tensor] = {}

    def hook(
        _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: object
    ) -> None:
        seen["y"] = _first_tensor(output, "output")
        if kind == "transcoder":
            seen["x"] = _module_input(args, kwargs)
        raise _StopForward

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "y" not in seen:
        raise RuntimeError(f"the forward pass never ran the hookpoint {hookpoint!r}")
    return Activations(seen.get("x"), seen["y"])


@contextlib.contextmanager
def splice(
    model: nn.Module,
    hookpoint: str,
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> Iterator[None]:
    """Within the ``with`` block, the output of ``hookpoint`` is replaced by ``fn(input, output)``.

    ``input`` and ``output`` are the module's input and output tensors (``[batch, seq, d]``;
    for a module returning a tuple, its first element, the rest kept). ``fn`` must return a
    tensor of the output's shape; it is cast to the output's dtype. A transcoder's splice is
    ``lambda x, y: transcoder(x)``; replacing only the final position is
    ``lambda x, y: torch.cat([y[:, :-1], f(x[:, -1:])], 1)``.
    """
    module = get_hookpoint(model, hookpoint)

    def hook(
        _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: object
    ) -> object:
        y = _first_tensor(output, "output")
        new = fn(_module_input(args, kwargs), y)
        if not isinstance(new, torch.Tensor) or new.shape != y.shape:
            got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
            raise ValueError(
                f"splice at {hookpoint!r}: fn returned {got}, expected shape {tuple(y.shape)}"
            )
        return _replace_output(output, new.to(y.dtype))

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def next_token_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    reduction: Literal["mean", "none"] = "mean",
) -> torch.Tensor:
    """Cross-entropy (nats) of predicting each next token: position ``t`` predicts ``t + 1``.

    With ``reduction="none"`` returns ``[batch, seq - 1]`` losses, ``NaN`` where the target is
    masked out: ``[:, -1]`` is the loss on the window's last token, predicted at position
    ``-2`` (so a splice of "the context's final position" replaces position ``-2`` here);
    with ``"mean"``, their mean over unmasked targets. Logits are upcast to float32. Any
    :func:`splice` active around the call applies.
    """
    if input_ids.ndim != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [batch, seq >= 2], got {list(input_ids.shape)}")
    with torch.inference_mode():
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        logits = out.logits[:, :-1].float()
        targets = input_ids[:, 1:]
        losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(
            targets.shape
        )
        if attention_mask is not None:
            losses = losses.masked_fill(attention_mask[:, 1:] == 0, float("nan"))
    if reduction == "none":
        return losses
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none', not {reduction!r}")
    return losses.nanmean()
