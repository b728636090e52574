"""nlrw.model.sparse: the TopK transcoder/SAE against dense formulas, the Rust top-k, its own
checkpoints, and EleutherAI's sparsify (both directions)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nlrw.model import sparse
from nlrw.model.sparse import (
    CheckpointError,
    SparseCoder,
    SparseCoderConfig,
    evaluate,
    load,
)
from nlrw.train import auxk_loss, compute_losses
from nlrw.train import losses as losses_module

torch.set_num_threads(1)  # tiny tensors: a second thread only adds contention


def random_coder(
    kind: str = "transcoder",
    d: int = 12,
    num_latents: int = 40,
    k: int = 5,
    *,
    skip: bool | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> SparseCoder:
    """A coder with every parameter random (W_dec = 0 at init would hide decoder bugs)."""
    cfg = SparseCoderConfig.create(
        kind,  # pyright: ignore[reportArgumentType]
        d,
        k=k,
        num_latents=num_latents,
        skip_connection=skip,
    )
    coder = SparseCoder(cfg, seed=seed, dtype=dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in coder.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.5)
        if cfg.normalize_decoder:
            coder.set_decoder_norm_to_unit_norm()
    return coder


def dense_reference(coder: SparseCoder, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``y = relu(W_enc x' + b_enc)·mask · W_dec + b_dec + W_skip x`` with a dense top-k mask."""
    x_in = x - coder.b_dec if coder.cfg.encoder_subtracts_b_dec else x
    pre = x_in @ coder.encoder.weight.T + coder.encoder.bias
    mask = torch.zeros_like(pre).scatter_(1, indices, 1.0)
    z = torch.relu(pre) * mask
    y = z @ coder.W_dec + coder.b_dec
    if coder.W_skip is not None:
        y = y + x @ coder.W_skip.T
    return y


# ---------------------------------------------------------------------- gradients


# AuxK's decoder backward multiplies densely (AUXK_DENSE_BACKWARD), the others gather rows;
# the gradient test runs AuxK both ways.
AUXK_PATHS = pytest.mark.parametrize("dense", [True, False], ids=["auxk-dense", "auxk-rows"])


@AUXK_PATHS
@pytest.mark.parametrize("kind", ["transcoder", "sae"])
def test_training_forward_gradients_match_dense_autograd(
    kind: str, dense: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sparse forward/backward (FVU + AuxK + Multi-TopK) == autograd of the dense formula."""
    monkeypatch.setattr(losses_module, "AUXK_DENSE_BACKWARD", dense)
    coder = random_coder(kind, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(16, 12, generator=gen, dtype=torch.float64)
    y = torch.randn(16, 12, generator=gen, dtype=torch.float64) if kind == "transcoder" else x
    dead = torch.zeros(40, dtype=torch.bool)
    dead[::3] = True
    total_var = (y - y.mean(0)).pow(2).sum()

    losses = compute_losses(coder, x, y, total_variance=total_var, dead_mask=dead, multi_topk=True)
    loss = losses.fvu + 0.7 * losses.auxk_loss + losses.multi_topk_fvu / 8
    loss.backward()
    ours = {n: p.grad.clone() for n, p in coder.named_parameters() if p.grad is not None}
    coder.zero_grad()

    # Dense: the same selections as dense masks, everything else plain autograd.
    x_in = x - coder.b_dec if kind == "sae" else x
    pre = x_in @ coder.encoder.weight.T + coder.encoder.bias
    relu = torch.relu(pre)
    sel = torch.topk(relu.detach(), 5, dim=1).indices
    y_hat = dense_reference(coder, x, sel)
    e = y - y_hat
    fvu = e.pow(2).sum() / total_var
    k_aux = 12 // 2
    aux_sel = torch.where(dead, relu.detach(), -torch.inf).topk(k_aux, dim=1).indices
    aux_mask = torch.zeros_like(pre).scatter_(1, aux_sel, 1.0)
    e_hat = (relu * aux_mask) @ coder.W_dec
    scale = min(int(dead.sum()) / k_aux, 1.0)
    aux = scale * (e_hat - e.detach()).pow(2).sum() / total_var
    multi_sel = torch.topk(relu.detach(), 20, dim=1).indices
    multi = (y - dense_reference(coder, x, multi_sel)).pow(2).sum() / total_var
    (fvu + 0.7 * aux + multi / 8).backward()

    torch.testing.assert_close(losses.fvu, fvu.detach())
    torch.testing.assert_close(losses.auxk_loss, aux.detach())
    torch.testing.assert_close(losses.multi_topk_fvu, multi.detach())
    torch.testing.assert_close(losses.output, y_hat.detach())
    assert set(ours) == {n for n, _ in coder.named_parameters()}
    for name, p in coder.named_parameters():
        assert p.grad is not None
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("dense", [False, True], ids=["rows", "dense"])
def test_sparse_functions_pass_gradcheck(dense: bool) -> None:
    """The hand-written backward passes agree with finite differences."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, generator=gen, dtype=torch.float64, requires_grad=True)
    idx = torch.stack([torch.randperm(9, generator=gen)[:3] for _ in range(6)])

    def encoder(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        vals = torch.relu(torch.einsum("bkd,bd->bk", w[idx], x) + b[idx])
        return sparse._SparseEncoder.apply(x, w, b, idx, vals)  # pyright: ignore

    def decoder(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return sparse._SparseDecoder.apply(v, idx, w, dense)  # pyright: ignore

    # Forward values are recomputed from the inputs, so finite differences see them move.
    assert torch.autograd.gradcheck(encoder, (x, w, b))
    v = torch.randn(6, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(decoder, (v, w))


def test_the_dense_and_gathered_products_agree() -> None:
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(8192, 16, generator=gen, dtype=torch.float64)
    rows = torch.randn(64, 16, generator=gen, dtype=torch.float64)
    for k in (32, 288):
        idx = torch.randint(0, 8192, (64, k), generator=gen)
        expected = torch.einsum("bkd,bd->bk", table[idx], rows)
        for dense in (False, True):
            got = sparse._gather_dot(table, idx, rows, dense=dense)  # pyright: ignore
            torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------------- encode


def test_rust_encode_agrees_with_torch_topk() -> None:
    coder = random_coder("transcoder", d=16, num_latents=300, k=20)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    x[:4] = 0  # with b_enc < 0, rows without positive pre-activations (all zero padding)
    with torch.no_grad():
        coder.encoder.bias.fill_(-1.0)
    with torch.no_grad():
        rust = coder.encode(x)  # CPU, no grad: the Rust kernel
        pre = coder.pre_acts(x)
    ref_v, ref_i = torch.topk(torch.relu(pre), 20, dim=1, sorted=True)
    assert rust.indices.dtype == torch.int64
    torch.testing.assert_close(rust.values, ref_v, rtol=0, atol=0)
    positive = ref_v > 0
    assert torch.equal(rust.indices[positive], ref_i[positive])
    assert (rust.values[:4] == 0).all() and (rust.values[4:] > 0).any()
    # The torch path (autograd on) selects the same latents; decoded outputs agree.
    with_grad = coder.encode(x)
    torch.testing.assert_close(with_grad.values.detach(), ref_v)
    with torch.no_grad():
        torch.testing.assert_close(coder.decode(*rust), coder.decode(*with_grad))


def test_call_is_the_full_transcoder_formula() -> None:
    coder = random_coder("transcoder")
    x = torch.randn(10, 12)
    with torch.no_grad():
        lat = coder.encode(x)
        torch.testing.assert_close(coder(x), dense_reference(coder, x, lat.indices))


# ---------------------------------------------------------------------- init and constraints


def test_transcoder_init_rules() -> None:
    cfg = SparseCoderConfig.create("transcoder", 8, k=4, num_latents=64)
    assert cfg.skip_connection and not cfg.normalize_decoder and not cfg.encoder_subtracts_b_dec
    coder = SparseCoder(cfg, seed=7)
    assert torch.equal(coder.W_dec, torch.zeros(64, 8))
    assert coder.W_skip is not None and torch.equal(coder.W_skip, torch.zeros(8, 8))
    bound = 1 / 8**0.5
    assert coder.encoder.weight.abs().max() <= bound and coder.encoder.weight.std() > bound / 3
    # The same seed draws the same encoder (every DDP rank builds the same coder).
    assert torch.equal(SparseCoder(cfg, seed=7).encoder.weight, coder.encoder.weight)

    x = torch.randn(100, 8) + 3
    y = torch.randn(100, 8) - 2
    coder.init_biases(x.mean(0), y.mean(0))
    torch.testing.assert_close(coder.b_dec.data, y.mean(0))
    torch.testing.assert_close(coder.encoder.bias.data, -x.mean(0) @ coder.encoder.weight.T)
    # Centred pre-activations: the mean input sits at pre-activation 0.
    torch.testing.assert_close(coder.pre_acts(x.mean(0, keepdim=True)), torch.zeros(1, 64))


def test_sae_init_rules() -> None:
    cfg = SparseCoderConfig.create("sae", 8, k=4, num_latents=64)
    assert not cfg.skip_connection and cfg.normalize_decoder and cfg.encoder_subtracts_b_dec
    coder = SparseCoder(cfg, seed=0)
    torch.testing.assert_close(coder.W_dec.norm(dim=1), torch.ones(64))
    cos = F.cosine_similarity(coder.W_dec, coder.encoder.weight, dim=1)
    torch.testing.assert_close(cos, torch.ones(64))
    x = torch.randn(100, 8) + 3
    coder.init_biases(x.mean(0), x.mean(0))
    torch.testing.assert_close(coder.b_dec.data, x.mean(0))
    assert torch.equal(coder.encoder.bias, torch.zeros(64))


def test_sae_gradient_projection_and_renormalization() -> None:
    coder = random_coder("sae")
    torch.testing.assert_close(coder.W_dec.norm(dim=1), torch.ones(40))
    grad = torch.randn(40, 12)
    coder.W_dec.grad = grad.clone()
    coder.remove_gradient_parallel_to_decoder_directions()
    assert coder.W_dec.grad is not None
    parallel = (coder.W_dec.grad * coder.W_dec).sum(1)
    torch.testing.assert_close(parallel, torch.zeros(40), atol=1e-6, rtol=0)
    # Only the parallel part was removed.
    removed = grad - coder.W_dec.grad
    cos = F.cosine_similarity(removed, coder.W_dec, dim=1).abs()
    torch.testing.assert_close(cos, torch.ones(40))
    with torch.no_grad():
        coder.W_dec.mul_(3)
    coder.set_decoder_norm_to_unit_norm()
    torch.testing.assert_close(coder.W_dec.norm(dim=1), torch.ones(40))


# ---------------------------------------------------------------------- AuxK


def test_auxk_loss_on_a_hand_made_case() -> None:
    """d_out = 4, so k_aux = 2. One row, six latents, latents 1, 2, 3 dead.

    relu(pre) = [0.5, 2, 0, 1, 3, 0.2]: the two dead latents with the largest values are
    1 (2.0) and 3 (1.0); with W_dec = the first rows of the identity, ê = 2·W_dec[1] +
    1·W_dec[3] = (0,2,0,1), b_dec (nonzero here) left out. With e = (1,1,1,1):
    ‖ê − e‖² = 1 + 1 + 1 + 0 = 3;
    scale = min(3/2, 1) = 1; total variance 6 → AuxK = 3/6 = 0.5.
    """
    cfg = SparseCoderConfig.create("transcoder", 4, k=1, num_latents=6)
    coder = SparseCoder(cfg)
    with torch.no_grad():
        coder.W_dec.copy_(torch.eye(6, 4))
        coder.b_dec.fill_(10.0)
    relu_pre = torch.tensor([[0.5, 2.0, 0.0, 1.0, 3.0, 0.2]])
    x = torch.zeros(1, 4)
    e = torch.ones(1, 4)
    dead = torch.tensor([False, True, True, True, False, False])
    loss = auxk_loss(coder, relu_pre, x, e, dead, torch.tensor(6.0))
    torch.testing.assert_close(loss, torch.tensor(0.5))

    # One dead latent (1): k_aux = min(2, 1) = 1, scale = 1/2; ê = (0,2,0,0);
    # ‖ê − e‖² = 1 + 1 + 1 + 1 = 4 → 0.5 · 4 / 6 = 1/3.
    dead_one = torch.tensor([False, True, False, False, False, False])
    loss = auxk_loss(coder, relu_pre, x, e, dead_one, torch.tensor(6.0))
    torch.testing.assert_close(loss, torch.tensor(1 / 3))

    # Sign: ê equal to the residual e = y − ŷ costs nothing.
    loss = auxk_loss(
        coder, relu_pre, x, torch.tensor([[0.0, 2.0, 0.0, 1.0]]), dead, torch.tensor(6.0)
    )
    assert float(loss.detach()) == 0.0
    # No dead latent: no loss.
    assert (
        float(auxk_loss(coder, relu_pre, x, e, torch.zeros(6, dtype=torch.bool), torch.tensor(6.0)))
        == 0
    )


# ---------------------------------------------------------------------- evaluation


def test_evaluate_fvu_and_dead_fraction() -> None:
    coder = random_coder("transcoder", num_latents=200)
    gen = torch.Generator().manual_seed(5)
    rows = torch.randn(300, 24, generator=gen)
    result = evaluate(coder, [rows[:100], rows[100:].numpy()])
    x, y = rows[:, :12], rows[:, 12:]
    with torch.no_grad():
        y_hat = coder(x)
        fired = torch.zeros(200, dtype=torch.bool)
        lat = coder.encode(x)
        fired[lat.indices[lat.values > 0]] = True
    expected = float((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    assert result.fvu == pytest.approx(expected, rel=1e-5)
    assert result.dead_fraction == pytest.approx(1 - float(fired.float().mean()))
    assert result.rows == 300
    with pytest.raises(ValueError, match=r"expected \[rows, d_in \+ d_out = 12 \+ 12\]"):
        evaluate(coder, [torch.randn(5, 20)])


# ---------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("kind", ["transcoder", "sae"])
def test_save_load_roundtrip(tmp_path: Path, kind: str) -> None:
    coder = random_coder(kind)
    coder.save(tmp_path / "layers.3.mlp")
    files = sorted(p.name for p in (tmp_path / "layers.3.mlp").iterdir())
    assert files == ["cfg.json", "sae.safetensors"]
    cfg = json.loads((tmp_path / "layers.3.mlp" / "cfg.json").read_text())
    assert set(cfg) == {
        "activation", "expansion_factor", "normalize_decoder", "num_latents", "k",
        "multi_topk", "skip_connection", "transcode", "d_in",
    }  # fmt: skip
    assert cfg["transcode"] == (kind == "transcoder")
    loaded = load(tmp_path / "layers.3.mlp")
    assert loaded.cfg == coder.cfg
    x = torch.randn(20, 12)
    with torch.no_grad():
        assert torch.equal(loaded(x), coder(x))
        a, b = loaded.encode(x), coder.encode(x)
        assert torch.equal(a.values, b.values) and torch.equal(a.indices, b.indices)
    assert load(tmp_path / "layers.3.mlp", dtype=torch.float64).dtype == torch.float64


def test_transcoder_with_other_output_width_roundtrips(tmp_path: Path) -> None:
    cfg = SparseCoderConfig.create("transcoder", 6, d_out=10, k=2, num_latents=30)
    coder = SparseCoder(cfg, seed=1)
    coder.save(tmp_path / "h")
    assert json.loads((tmp_path / "h" / "cfg.json").read_text())["d_out"] == 10
    assert load(tmp_path / "h").cfg == cfg


def test_bad_checkpoints_name_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "h"
    with pytest.raises(FileNotFoundError, match="no sparse coder checkpoint folder"):
        load(folder)
    random_coder().save(folder)
    weights = (folder / "sae.safetensors").read_bytes()
    cfg_text = (folder / "cfg.json").read_text()

    (folder / "cfg.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"cfg\.json"):
        load(folder)
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"cfg\.json is not valid JSON"):
        load(folder)
    (folder / "cfg.json").write_text(cfg_text)

    (folder / "sae.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"sae\.safetensors"):
        load(folder)
    (folder / "sae.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(CheckpointError, match=r"sae\.safetensors is not a readable"):
        load(folder)
    (folder / "sae.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(CheckpointError, match=r"sae\.safetensors"):
        load(folder)
    (folder / "sae.safetensors").write_bytes(weights)

    cfg = json.loads(cfg_text)
    (folder / "cfg.json").write_text(json.dumps({**cfg, "num_latents": 41}))
    with pytest.raises(
        CheckpointError, match=r"tensor 'W_dec' has shape \[40, 12\].*implies \[41, 12\]"
    ):
        load(folder)
    (folder / "cfg.json").write_text(json.dumps({**cfg, "skip_connection": False}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['W_skip'\]"):
        load(folder)
    (folder / "cfg.json").write_text(json.dumps({**cfg, "k": 40}))
    with pytest.raises(CheckpointError, match=r"k \(40\) must be smaller"):
        load(folder)
    (folder / "cfg.json").write_text(json.dumps({**cfg, "activation": "groupmax"}))
    with pytest.raises(CheckpointError, match="groupmax"):
        load(folder)


def test_interrupted_save_never_leaves_a_mismatched_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "h"
    old = random_coder(seed=1)
    old.save(folder)

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(sparse, "save_file", crash)
    # Same config: the old checkpoint stays whole.
    with pytest.raises(KeyboardInterrupt):
        random_coder(seed=2).save(folder)
    x = torch.randn(4, 12)
    with torch.no_grad():
        assert torch.equal(load(folder)(x), old(x))
    # Another config: the old cfg.json goes first, so the folder no longer loads at all.
    with pytest.raises(KeyboardInterrupt):
        random_coder(num_latents=50, seed=2).save(folder)
    with pytest.raises(FileNotFoundError, match=r"cfg\.json"):
        load(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["sae.safetensors"]  # no temp files


def test_sparse_coder_config_refuses_k_at_least_latents() -> None:
    with pytest.raises(ValueError, match=r"k \(64\) must be smaller than the number of latents"):
        SparseCoderConfig.create("transcoder", 8, k=64, num_latents=64)


# ---------------------------------------------------------------------- sparsify interop

# With triton installed (torch pulls it in) sparsify decodes with a triton kernel, which
# needs a GPU; its own switch selects the eager embedding-bag decoder instead.
if not torch.cuda.is_available():
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
sparsify = pytest.importorskip("sparsify", reason="eai-sparsify (dev extra) not installed")


def sparsify_latents(sp: object, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sparsify's (unsorted) top-k, sorted by value descending like ours."""
    enc = sp.encode(x)  # pyright: ignore[reportAttributeAccessIssue]
    order = enc.top_acts.argsort(dim=1, descending=True)
    return enc.top_acts.gather(1, order), enc.top_indices.gather(1, order)


@pytest.mark.parametrize("kind", ["transcoder", "sae"])
def test_sparsify_loads_ours(tmp_path: Path, kind: str) -> None:
    coder = random_coder(kind)
    coder.save(tmp_path / "h")
    sp = sparsify.SparseCoder.load_from_disk(tmp_path / "h")
    assert sp.cfg.transcode == (kind == "transcoder")
    assert (sp.W_skip is not None) == (kind == "transcoder")
    x = torch.randn(32, 12)
    y = torch.randn(32, 12) if kind == "transcoder" else x
    with torch.no_grad():
        ours = coder.encode(x)
        values, indices = sparsify_latents(sp, x)
        torch.testing.assert_close(values, ours.values)
        assert torch.equal(indices, ours.indices)
        torch.testing.assert_close(sp(x, y).sae_out, coder(x))


@pytest.mark.parametrize("kind", ["transcoder", "sae"])
def test_we_load_sparsify(tmp_path: Path, kind: str) -> None:
    torch.manual_seed(0)
    sp_cfg = sparsify.SparseCoderConfig(
        num_latents=48, k=6, transcode=kind == "transcoder", skip_connection=kind == "transcoder"
    )
    sp = sparsify.SparseCoder(12, sp_cfg)
    with torch.no_grad():
        for p in sp.parameters():
            p.normal_(0, 0.5)
    sp.save_to_disk(tmp_path / "h")
    coder = load(tmp_path / "h")
    assert coder.cfg.kind == kind and coder.num_latents == 48 and coder.k == 6
    assert coder.cfg.encoder_subtracts_b_dec == (kind == "sae")
    x = torch.randn(32, 12)
    with torch.no_grad():
        ours = coder.encode(x)
        values, indices = sparsify_latents(sp, x)
        torch.testing.assert_close(ours.values, values)
        assert torch.equal(ours.indices, indices)
        torch.testing.assert_close(coder(x), sp(x, x).sae_out)


def test_paper_era_checkpoint_needs_an_explicit_kind(tmp_path: Path) -> None:
    """cfg.json without activation/transcode: the `sae` package encoded x − b_dec always."""
    coder = random_coder("transcoder")
    coder.save(tmp_path / "h")
    cfg = json.loads((tmp_path / "h" / "cfg.json").read_text())
    del cfg["activation"], cfg["transcode"]
    (tmp_path / "h" / "cfg.json").write_text(json.dumps(cfg))

    with pytest.raises(CheckpointError, match="legacy='transcoder'"):
        load(tmp_path / "h")
    old = load(tmp_path / "h", legacy="transcoder")
    assert old.cfg.kind == "transcoder" and old.cfg.encoder_subtracts_b_dec and old.cfg.legacy
    x = torch.randn(16, 12)
    with torch.no_grad():
        lat = old.encode(x)
        torch.testing.assert_close(
            lat.values, torch.topk(torch.relu(coder.pre_acts(x - coder.b_dec)), 5).values
        )
        torch.testing.assert_close(old(x), dense_reference(old, x, lat.indices))
        # sparsify reads it with its defaults (transcode false: x − b_dec): same outputs.
        sp = sparsify.SparseCoder.load_from_disk(tmp_path / "h")
        torch.testing.assert_close(sp(x, x).sae_out, old(x))
    # Saved back in the paper-era layout, so the flag stays needed.
    old.save(tmp_path / "again")
    assert "transcode" not in json.loads((tmp_path / "again" / "cfg.json").read_text())
    with pytest.raises(CheckpointError, match="legacy"):
        load(tmp_path / "again")
    coder.save(tmp_path / "new")
    with pytest.raises(CheckpointError, match="not a paper-era checkpoint"):
        load(tmp_path / "new", legacy="sae")


def test_numpy_batches_and_bad_dtypes() -> None:
    coder = random_coder("sae")
    rows = np.random.default_rng(0).standard_normal((8, 12)).astype(np.float16)
    assert evaluate(coder, [rows]).rows == 8
    with pytest.raises(TypeError, match=r"nlrw\.model\.shards\.to_torch"):
        evaluate(coder, [rows.view(np.uint16)])
