"""Adopting a sparse coder trained elsewhere (``--train.pretrained``): checkpoints written by
the real eai-sparsify, in both of its layouts, checked against the run and then used by the
stages after train unchanged."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from nlrw import pipeline
from nlrw.model import sparse
from nlrw.model.pretrained import adopt, checkpoint_folder
from nlrw.model.shards import ShardReader
from nlrw.train import TrainConfig

if not torch.cuda.is_available():  # sparsify's triton decoder needs a GPU; use its eager one
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
sparsify = pytest.importorskip("sparsify", reason="eai-sparsify (dev extra) not installed")


@pytest.fixture(scope="module")
def collected(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pipeline.RunConfig]:
    """A smoke run up to collect: real activations of the tiny subject."""
    cfg = pipeline.load_preset("smoke")
    run_dir = tmp_path_factory.mktemp("pretrained") / "run"
    pipeline.run(cfg, run_dir, until="collect", log=lambda _: None)
    return run_dir, cfg


def _sparsify_coder(d: int, kind: str, root: Path, name: str) -> object:
    """A random sparsify coder saved with sparsify's own ``save_to_disk`` at ``root/name``."""
    torch.manual_seed(1)
    transcode = kind == "transcoder"
    sp_cfg = sparsify.SparseCoderConfig(
        num_latents=96, k=8, transcode=transcode, skip_connection=transcode
    )
    sp = sparsify.SparseCoder(d, sp_cfg)
    with torch.no_grad():
        for p in sp.parameters():
            p.normal_(0, 0.3)
    sp.save_to_disk(root / name)
    return sp


def _width(run_dir: Path) -> int:
    return ShardReader(run_dir / "activations" / "eval").width


def test_a_load_many_folder_is_adopted_and_the_run_continues(
    collected: tuple[Path, pipeline.RunConfig], tmp_path: Path
) -> None:
    src, cfg = collected
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "activations").symlink_to(src / "activations")
    hookpoint = cfg.collect.hookpoint
    d = _width(src) // 2
    root = tmp_path / "published"
    sp = _sparsify_coder(d, "transcoder", root, hookpoint)
    _sparsify_coder(d, "transcoder", root, "model.layers.0.mlp")  # another hookpoint beside it
    run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, pretrained=str(root)))
    pipeline.run(run_cfg, run_dir, until="cache", log=lambda _: None)

    coder = sparse.load(run_dir / "transcoder" / hookpoint)
    assert coder.cfg.kind == "transcoder" and coder.num_latents == 96 and coder.k == 8
    record = json.loads((run_dir / "stages" / "train.json").read_text())
    assert record["summary"]["checkpoint"] == str((root / hookpoint).resolve())
    assert set(record["summary"]["digests"]) == {"cfg.json", "sae.safetensors"}
    # The same latents as sparsify's, on the run's own activations.
    batch = next(iter(ShardReader(src / "activations" / "eval", batch_rows=64)))
    x = torch.as_tensor(np.asarray(batch))[:, :d].float()
    with torch.no_grad():
        ours = coder.encode(x)
        enc = sp.encode(x)  # pyright: ignore[reportAttributeAccessIssue]
        order = enc.top_acts.argsort(dim=1, descending=True)
        torch.testing.assert_close(ours.values, enc.top_acts.gather(1, order))
        assert torch.equal(ours.indices, enc.top_indices.gather(1, order))
    # The cache ran on the adopted coder.
    assert (run_dir / "latents" / "stats.parquet").is_file()


def test_a_checkpoint_folder_itself_and_an_sae(tmp_path: Path) -> None:
    sp = _sparsify_coder(12, "sae", tmp_path, "ckpt")
    assert checkpoint_folder(tmp_path / "ckpt", "anything") == tmp_path / "ckpt"
    summary = adopt(
        tmp_path / "ckpt",
        tmp_path / "out",
        hookpoint="h",
        activation_width=12,
        activations=tmp_path / "acts",
        kind="sae",
    )
    coder = sparse.load(tmp_path / "out" / "h")
    assert summary["kind"] == "sae" and coder.cfg.encoder_subtracts_b_dec
    x = torch.randn(16, 12)
    with torch.no_grad():
        torch.testing.assert_close(coder(x), sp(x, x).sae_out)  # pyright: ignore


def test_mismatches_are_named_and_nothing_is_written(tmp_path: Path) -> None:
    _sparsify_coder(12, "transcoder", tmp_path / "root", "model.layers.1.mlp")
    out = tmp_path / "out"
    common = {"activations": tmp_path / "acts", "kind": "transcoder"}
    with pytest.raises(ValueError, match=r"rows of width 30: the checkpoint was not trained"):
        adopt(tmp_path / "root", out, hookpoint="model.layers.1.mlp", activation_width=30, **common)
    with pytest.raises(FileNotFoundError, match=r"hookpoint 'model.layers.5.mlp'.*layers.1.mlp"):
        adopt(tmp_path / "root", out, hookpoint="model.layers.5.mlp", activation_width=24, **common)
    with pytest.raises(ValueError, match=r"holds a transcoder, but train.kind is 'sae'"):
        adopt(
            tmp_path / "root",
            out,
            hookpoint="model.layers.1.mlp",
            activation_width=24,
            activations=tmp_path / "acts",
            kind="sae",
        )
    broken = tmp_path / "root" / "model.layers.1.mlp" / "sae.safetensors"
    broken.write_bytes(broken.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"sae\.safetensors is not a readable safetensors"):
        adopt(tmp_path / "root", out, hookpoint="model.layers.1.mlp", activation_width=24, **common)
    assert not out.exists()
    with pytest.raises(ValueError, match=r"train.legacy only applies with train.pretrained"):
        TrainConfig(legacy="sae")
