"""nlrw.model.subject on tiny random Llama, GPT-NeoX (parallel residual) and GPT-2 models.

Hookpoints resolve by module name with helpful errors; :func:`capture` returns what a plain
forward hook on the full model sees, stops after the hookpoint, and reads Pythia's MLP input
correctly; :func:`splice` and :func:`next_token_loss` behave as the evaluation stage needs.
The tiny word-level tokenizer and models come from ``support.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from nlrw.model.subject import (
    HookpointError,
    capture,
    get_hookpoint,
    load_subject,
    next_token_loss,
    resolve_dtype,
    splice,
)
from support import LAYER, MLP, WORD_VOCAB, ids, save_tiny, word_model

# Tiny models gain nothing from threads, and spin-waiting threads suffer on a shared machine.
torch.set_num_threads(1)


def full_forward_hook(model: Any, hookpoint: str, input_ids: torch.Tensor) -> dict[str, Any]:
    """The baseline a user would write: a hook on the module, a forward pass over the model."""
    seen: dict[str, Any] = {}

    def hook(_m: Any, args: tuple[Any, ...], output: Any) -> None:
        seen["x"], seen["y"] = args[0], output

    handle = get_hookpoint(model, hookpoint).register_forward_hook(hook)
    with torch.no_grad():
        model(input_ids=input_ids)
    handle.remove()
    return seen


@pytest.mark.parametrize("arch", ["llama", "neox", "gpt2"])
def test_hookpoint_is_resolved_from_the_module_tree(arch: str) -> None:
    model = word_model(arch)
    base = {"llama": "model", "neox": "gpt_neox", "gpt2": "transformer"}[arch]
    blocks = getattr(getattr(model, base), "h" if arch == "gpt2" else "layers")
    assert get_hookpoint(model, MLP[arch].format(1)) is blocks[1].mlp
    assert get_hookpoint(model, LAYER[arch].format(2)) is blocks[2]


def test_missing_hookpoint_lists_nearest_module_names() -> None:
    model = word_model("llama")
    with pytest.raises(HookpointError, match=r"model\.layers\.1\.mlp") as err:
        get_hookpoint(model, "model.layer.1.mlp")
    assert "'model.layer.1.mlp' is not a module of LlamaForCausalLM" in str(err.value)
    with pytest.raises(HookpointError, match=r"model\.layers\.2\.mlp"):
        get_hookpoint(model, "layers.2.mlp")  # relative to the base model
    with pytest.raises(HookpointError, match="nearest module names"):
        get_hookpoint(model, "")
    with pytest.raises(HookpointError):
        get_hookpoint(model, "gpt_neox.layers.1.mlp")  # another family's name


@pytest.mark.parametrize("arch", ["llama", "neox", "gpt2"])
def test_capture_equals_a_hook_on_the_full_forward(arch: str) -> None:
    model, x_ids = word_model(arch), ids()
    hookpoint = MLP[arch].format(1)
    acts = capture(model, hookpoint, x_ids)
    ref = full_forward_hook(model, hookpoint, x_ids)
    assert acts.x is not None
    assert acts.x.shape == (2, 12, 32)
    assert torch.equal(acts.x, ref["x"])
    assert torch.equal(acts.y, ref["y"])
    sae = capture(model, hookpoint, x_ids, kind="sae")
    assert sae.x is None and torch.equal(sae.y, ref["y"])


@pytest.mark.parametrize("arch", ["llama", "neox", "gpt2"])
def test_sae_capture_of_a_layer_is_the_residual_stream_after_it(arch: str) -> None:
    model, x_ids = word_model(arch), ids()
    acts = capture(model, LAYER[arch].format(0), x_ids, kind="sae")
    with torch.no_grad():
        hidden = model(input_ids=x_ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(acts.y, hidden[1], rtol=0, atol=0)


def test_neox_parallel_residual_mlp_input_is_the_normed_layer_input() -> None:
    """Pythia's parallel residual: mlp(post_attention_layernorm(h)), h the layer's input."""
    model, x_ids = word_model("neox"), ids()
    assert model.config.use_parallel_residual
    layer = model.gpt_neox.layers[1]
    h = capture(model, "gpt_neox.layers.0", x_ids, kind="sae").y  # input of layer 1
    acts = capture(model, "gpt_neox.layers.1.mlp", x_ids)
    with torch.no_grad():
        x_manual = layer.post_attention_layernorm(h)
        y_manual = layer.mlp(x_manual)
        # What a sequential-residual reading would give instead: norm of h + attention(h).
        position_embeddings = model.gpt_neox.rotary_emb(h, torch.arange(12)[None])
        attn, _ = layer.attention(
            layer.input_layernorm(h), attention_mask=None, position_embeddings=position_embeddings
        )
        x_sequential = layer.post_attention_layernorm(h + attn)
    assert acts.x is not None
    torch.testing.assert_close(acts.x, x_manual, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(acts.y, y_manual, rtol=1e-5, atol=1e-6)
    assert (acts.x - x_sequential).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ["llama", "neox", "gpt2"])
def test_capture_stops_the_forward_after_the_hookpoint(arch: str) -> None:
    model = word_model(arch)
    fired: list[str] = []
    above = [LAYER[arch].format(2), "lm_head"]
    handles = [
        get_hookpoint(model, name).register_forward_hook(lambda *_, name=name: fired.append(name))
        for name in [*above, MLP[arch].format(1)]
    ]
    try:
        capture(model, MLP[arch].format(1), ids())
        assert fired == [MLP[arch].format(1)]  # the hookpoint ran, nothing above it did
        fired.clear()
        capture(model, LAYER[arch].format(1), ids(), kind="sae")
        assert fired == [MLP[arch].format(1)]
        fired.clear()
        with torch.no_grad():
            model(input_ids=ids())
        assert set(fired) == {*above, MLP[arch].format(1)}  # the hooks do fire on a full pass
    finally:
        for h in handles:
            h.remove()


def test_capture_leaves_no_hook_behind() -> None:
    model = word_model("llama")
    module = get_hookpoint(model, "model.layers.1.mlp")
    capture(model, "model.layers.1.mlp", ids())
    assert not module._forward_hooks


def test_next_token_loss_is_the_shifted_cross_entropy() -> None:
    model, x_ids = word_model("llama"), ids(batch=3, seq=10)
    with torch.no_grad():
        logits = model(input_ids=x_ids).logits
    manual = F.cross_entropy(logits[:, :-1].reshape(-1, WORD_VOCAB), x_ids[:, 1:].reshape(-1))
    loss = next_token_loss(model, x_ids)
    torch.testing.assert_close(loss, manual)
    per_position = next_token_loss(model, x_ids, reduction="none")
    assert per_position.shape == (3, 9)
    torch.testing.assert_close(per_position.mean(), manual)
    mask = torch.ones_like(x_ids)
    mask[0, -3:] = 0  # right padding of the first row
    masked = next_token_loss(model, x_ids, mask, reduction="none")
    assert masked[0, -3:].isnan().all() and not masked[1:].isnan().any()
    with pytest.raises(ValueError, match="seq >= 2"):
        next_token_loss(model, x_ids[:, :1])


@pytest.mark.parametrize("arch", ["llama", "neox", "gpt2"])
def test_splice_identity_keeps_the_loss_and_zeros_change_it(arch: str) -> None:
    model, x_ids = word_model(arch), ids()
    hookpoint = MLP[arch].format(1)
    clean = next_token_loss(model, x_ids)
    inputs: list[torch.Tensor] = []

    def identity(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        inputs.append(x)
        return y.clone()

    with splice(model, hookpoint, identity):
        spliced = next_token_loss(model, x_ids)
    assert torch.equal(spliced, clean)
    acts = capture(model, hookpoint, x_ids)
    assert acts.x is not None and torch.equal(inputs[0], acts.x)  # fn sees the module input
    with splice(model, hookpoint, lambda x, y: torch.zeros_like(y)):
        zeroed = next_token_loss(model, x_ids)
    assert abs(zeroed.item() - clean.item()) > 1e-3
    assert torch.equal(next_token_loss(model, x_ids), clean)  # the splice is gone after the block
    with (
        pytest.raises(ValueError, match="expected shape"),
        splice(model, hookpoint, lambda x, y: y[:, :-1]),
    ):
        next_token_loss(model, x_ids)
    assert not get_hookpoint(model, hookpoint)._forward_hooks


def test_splice_of_one_position_only_changes_the_prediction_it_makes() -> None:
    """Position -2 predicts the last token: the evaluation stage's splice of the context's
    final position, seen through next_token_loss over the whole window."""
    model, x_ids = word_model("llama"), ids()
    clean = next_token_loss(model, x_ids, reduction="none")

    def last_zero(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.cat([y[:, :-2], torch.zeros_like(y[:, -2:-1]), y[:, -1:]], dim=1)

    with splice(model, "model.layers.1.mlp", last_zero):
        spliced = next_token_loss(model, x_ids, reduction="none")
    assert torch.equal(spliced[:, :-1], clean[:, :-1])
    assert not torch.equal(spliced[:, -1], clean[:, -1])


def test_load_subject_from_a_local_folder(tmp_path: Path) -> None:
    path = save_tiny(tmp_path / "tiny")
    subject = load_subject(path)
    assert subject.path == path and subject.name == path
    assert subject.device == torch.device("cpu") and subject.dtype == torch.float32
    assert not subject.model.training
    assert all(not p.requires_grad for p in subject.model.parameters())
    assert subject.tokenizer("the cat sat", add_special_tokens=False).input_ids == [3, 5, 8]
    x_ids = ids()
    f32 = capture(subject.model, "model.layers.1.mlp", x_ids)
    bf16 = load_subject(path, dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    low = capture(bf16.model, "model.layers.1.mlp", x_ids)
    assert low.y.dtype == torch.bfloat16
    rel = (low.y.float() - f32.y).norm() / f32.y.norm()
    assert 0 < rel < 0.05


def test_resolve_dtype() -> None:
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int8", "cpu")  # pyright: ignore[reportArgumentType]
