"""nlrw.train: learning a known sparse dictionary, DDP equivalence, resume, and bad input."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nlrw.model.sparse import load
from nlrw.train import (
    NonFiniteLossError,
    ResumeMismatchError,
    TrainConfig,
    default_lr,
    train,
    train_from_shards,
)

torch.set_num_threads(1)  # tiny tensors: a second thread only adds contention

D, L_TRUE, K_TRUE = 32, 128, 4


def synthetic(rows: int, seed: int) -> torch.Tensor:
    """Rows ``[x | y]`` from a true sparse dictionary: 4 of 128 latents active per row.

    ``x = z·D_in`` and ``y = z·D_out`` with unit-norm random atoms D_in (32 dims) and random
    D_out; the dictionaries are fixed (seed 0), ``seed`` draws the latents z.
    """
    dicts = torch.Generator().manual_seed(0)
    d_in = torch.randn(L_TRUE, D, generator=dicts)
    d_in /= d_in.norm(dim=1, keepdim=True)
    d_out = torch.randn(L_TRUE, D, generator=dicts) / 3
    gen = torch.Generator().manual_seed(seed)
    active = torch.rand(rows, L_TRUE, generator=gen).argsort(dim=1)[:, :K_TRUE]
    z = torch.zeros(rows, L_TRUE).scatter_(
        1, active, torch.rand(rows, K_TRUE, generator=gen) * 2 + 0.5
    )
    return torch.cat([z @ d_in, z @ d_out], dim=1)


def fvu(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    return float((y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


def quick_cfg(**overrides: Any) -> TrainConfig:
    base: dict[str, Any] = dict(
        k=4,
        num_latents=L_TRUE,
        batch_size=128,
        lr=1e-2,
        lr_warmup_steps=10,
        eval_every=0,
        checkpoint_every=0,
        progress=False,
    )
    return TrainConfig(**{**base, **overrides})


def params_of(out_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in load(out_dir / "h").state_dict().items()}


# ---------------------------------------------------------------------- learning


def test_transcoder_learns_a_sparse_dictionary(tmp_path: Path) -> None:
    """Held-out FVU must beat the best *linear* map x → y by a factor 2.

    y is a linear function of the sparse code z, but only a nonlinear one of x (32 numbers
    mixing 4 of 128 atoms), so least squares from x explains only part of y (FVU ≈ 0.75
    here). A skip transcoder contains that linear map (W_skip) and adds the sparse code;
    after 640 steps it reaches FVU ≈ 0.3. The bound (half of the linear FVU, and < 0.5)
    leaves room for platform noise while failing if the latents learn nothing.
    """
    train_rows, eval_rows = synthetic(4096, seed=1), synthetic(1024, seed=2)
    cfg = quick_cfg(k=8, epochs=20, eval_every=160)
    result = train(cfg, [train_rows], [eval_rows], tmp_path, hookpoint="h")

    x, y = train_rows[:, :D], train_rows[:, D:]
    ones = torch.ones(len(x), 1)
    w = torch.linalg.lstsq(torch.cat([x, ones], 1), y).solution
    ex, ey = eval_rows[:, :D], eval_rows[:, D:]
    linear_fvu = fvu(ey, torch.cat([ex, torch.ones(len(ex), 1)], 1) @ w)
    assert result.eval is not None
    assert result.eval.fvu < 0.5 and result.eval.fvu < 0.5 * linear_fvu, (result, linear_fvu)
    assert result.steps == 640 and result.tokens == 20 * 4096
    evals = [h["eval_fvu"] for h in result.history]
    assert evals == sorted(evals, reverse=True)  # improves at every evaluation
    # The checkpoint computes the reported FVU.
    with torch.no_grad():
        assert fvu(ey, load(result.checkpoint)(ex)) == pytest.approx(result.eval.fvu, rel=1e-5)


def test_sae_learns_a_sparse_dictionary(tmp_path: Path) -> None:
    """Held-out FVU must beat the best rank-k linear reconstruction (PCA, k = 4) by half.

    The rows are a union of 4-dimensional subspaces spanned by 4 of 128 atoms: no single
    4-dimensional subspace holds them (PCA-4 FVU ≈ 0.8), but an SAE with k = 4 picks the
    right subspace per row (FVU ≈ 0.2 after 640 steps).
    """
    train_x, eval_x = synthetic(4096, seed=1)[:, :D], synthetic(1024, seed=2)[:, :D]
    cfg = quick_cfg(kind="sae", epochs=20)
    result = train(cfg, [train_x.numpy()], [eval_x], tmp_path, hookpoint="h")

    centred = train_x - train_x.mean(0)
    basis = torch.linalg.svd(centred, full_matrices=False).Vh[:K_TRUE]
    e = eval_x - train_x.mean(0)
    pca_fvu = fvu(eval_x, train_x.mean(0) + e @ basis.T @ basis)
    assert result.eval is not None
    assert result.eval.fvu < 0.5 * pca_fvu, (result.eval, pca_fvu)
    coder = load(result.checkpoint)
    torch.testing.assert_close(coder.W_dec.norm(dim=1), torch.ones(L_TRUE))


def test_signum_auxk_and_multi_topk_train(tmp_path: Path) -> None:
    rows = synthetic(2048, seed=1)
    cfg = quick_cfg(
        optimizer="signum",
        lr=5e-3,
        epochs=4,
        auxk_alpha=1 / 32,
        dead_feature_threshold=512,
        multi_topk=True,
        eval_every=16,
    )
    result = train(cfg, [rows], [synthetic(512, seed=2)], tmp_path, hookpoint="h")
    first, last = result.history[0], result.history[-1]
    assert {"auxk_loss", "multi_topk_fvu", "eval_fvu", "dead_fraction"} <= set(last)
    # Measured: 0.85 → 0.67 (a transcoder starts at FVU ≈ 1 with W_dec = 0).
    assert last["eval_fvu"] < 0.75 and last["eval_fvu"] < first["eval_fvu"]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [16, 32, 48, 64]


def test_outputs_and_provenance(tmp_path: Path) -> None:
    cfg = quick_cfg(epochs=1, checkpoint_every=8)
    result = train(
        cfg, [synthetic(1024, seed=1)], [synthetic(256, seed=2)], tmp_path, hookpoint="h"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "h", "metrics.jsonl", "train.json", "train_state.pt",
    ]  # fmt: skip
    record = json.loads((tmp_path / "train.json").read_text())
    assert record["stage"] == "train" and record["config"]["k"] == 4
    assert record["steps"] == 8 and record["tokens"] == 1024 and record["hookpoint"] == "h"
    assert record["eval"]["fvu"] == pytest.approx(result.eval.fvu if result.eval else None)
    assert record["sparse_coder"]["num_latents"] == L_TRUE
    assert record["learning_rate"] == 1e-2


def test_default_learning_rates() -> None:
    assert default_lr("adam", 2**14) == pytest.approx(2e-4)
    assert default_lr("adam", 2**16) == pytest.approx(1e-4)
    assert default_lr("signum", 2**14) == pytest.approx(5e-3)


# ---------------------------------------------------------------------- DDP


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_worker(
    rank: int,
    world: int,
    port: int,
    cfg: TrainConfig,
    out_dir: str,
    rows: torch.Tensor,
    evals: torch.Tensor,
) -> None:
    """One rank of a ``torchrun``-like launch: the env variables torchrun sets, gloo on CPU."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        train(cfg, [rows], [evals], out_dir, hookpoint="h")
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_matches_one_process(tmp_path: Path) -> None:
    """2 gloo ranks on the CPU take the same steps as 1 process on the same data.

    Each rank reads the same stream of global batches (batch_size = 128 rows) and trains
    on its half (rows 0-63 and 64-127 of each batch); its loss is normalized by the
    variance of the whole global batch and scaled by the world size, so DDP's gradient
    average equals the single process's gradient. Only float summation order differs.
    """
    rows, evals = synthetic(1024, seed=1), synthetic(300, seed=2)
    # AuxK on (latents silent for a whole batch count as dead: 3-12% of them here), so the
    # dead-latent bookkeeping is all-reduced too. Multi-TopK stays off: with 4k = 16 of 128
    # latents its selection reaches pre-activations of ±1e-8, whose sign can flip between a
    # 64-row and a 128-row matmul, and Adam turns such flips into visible differences.
    cfg = quick_cfg(epochs=2, auxk_alpha=1 / 32, dead_feature_threshold=128, eval_every=8)
    single = train(cfg, [rows], [evals], tmp_path / "single", hookpoint="h")
    mp.spawn(
        ddp_worker,
        args=(2, free_port(), cfg, str(tmp_path / "ddp"), rows, evals),
        nprocs=2,
        join=True,
    )
    ours, ref = params_of(tmp_path / "ddp"), params_of(tmp_path / "single")
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-4, atol=1e-5, msg=name)
    history = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [h["step"] for h in single.history] == [8, 16]
    for got, want in zip(history, single.history, strict=True):
        assert got["dead_fraction"] == want["dead_fraction"] > 0
        for key in ("train_fvu", "eval_fvu", "auxk_loss"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    assert json.loads((tmp_path / "ddp" / "train.json").read_text())["world_size"] == 2


# ---------------------------------------------------------------------- resume and failures


class CrashingBatches:
    """Batches of 100 rows that raise after ``crash_after`` of them (a killed run)."""

    def __init__(self, rows: torch.Tensor, crash_after: int) -> None:
        self.chunks = list(rows.split(100))
        self.num_rows = len(rows)
        self.crash_after = crash_after
        self.served = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        for chunk in self.chunks:
            if self.served == self.crash_after:
                raise RuntimeError("simulated crash")
            self.served += 1
            yield chunk


def test_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    rows, evals = synthetic(1000, seed=1), [synthetic(200, seed=2)]
    cfg = quick_cfg(batch_size=64, epochs=2, eval_every=5, checkpoint_every=3)
    full = train(cfg, list(rows.split(100)), evals, tmp_path / "full", hookpoint="h")

    # 13 chunks of 100 rows = 20 full steps of 64 rows; the last checkpoint is at step 18.
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, CrashingBatches(rows, 13), evals, tmp_path / "resumed", hookpoint="h")
    state = torch.load(tmp_path / "resumed" / "train_state.pt", weights_only=True)
    assert state["step"] == 18
    assert not (tmp_path / "resumed" / "train.json").exists()
    resumed = train(cfg, list(rows.split(100)), evals, tmp_path / "resumed", hookpoint="h")

    assert resumed.steps == full.steps == 32 and resumed.tokens == full.tokens == 2000
    a, b = params_of(tmp_path / "full"), params_of(tmp_path / "resumed")
    for name in a:
        assert torch.equal(a[name], b[name]), name

    def strip(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in h.items() if k != "tokens_per_s"} for h in history]

    assert strip(resumed.history) == strip(full.history)


def test_resume_with_another_config_is_refused(tmp_path: Path) -> None:
    rows = [synthetic(512, seed=1)]
    train(quick_cfg(), rows, None, tmp_path, hookpoint="h")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(ResumeMismatchError, match=r"k \(checkpoint 4, now 5\).*lr \(checkpoint"):
        train(quick_cfg(k=5, lr=3e-3), rows, None, tmp_path, hookpoint="h")
    with pytest.raises(ResumeMismatchError, match=r"hookpoint \(checkpoint 'h', now 'g'\)"):
        train(quick_cfg(), rows, None, tmp_path, hookpoint="g")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    # Changing only how the run is watched is allowed; overwrite=True starts afresh.
    train(quick_cfg(eval_every=2, progress=True), rows, None, tmp_path, hookpoint="h")
    with pytest.raises(ValueError, match="width"):  # refused before anything is touched
        train(quick_cfg(k=5), [rows[0][:, :9]], None, tmp_path, hookpoint="h", overwrite=True)
    fresh = train(quick_cfg(k=5), rows, None, tmp_path, hookpoint="h", overwrite=True)
    assert fresh.steps == 4 and load(fresh.checkpoint).k == 5


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    rows = synthetic(1024, seed=1)
    rows[300, 3] = float("nan")  # in step 5's batch: rows 256-319
    cfg = quick_cfg(batch_size=64, checkpoint_every=2)
    with pytest.raises(
        NonFiniteLossError, match=r"loss is nan at step 5 .*step 4\) .* is kept"
    ) as e:
        train(cfg, [rows], None, tmp_path, hookpoint="h")
    assert e.value.step == 5
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert state["step"] == 4
    coder = load(tmp_path / "h")
    assert all(torch.isfinite(p).all() for p in coder.parameters())
    for name, value in coder.state_dict().items():
        assert torch.equal(value, state["coder"][name])
    assert not (tmp_path / "train.json").exists()

    rows[1, 0] = float("inf")
    with pytest.raises(NonFiniteLossError, match=r"at step 1 .*no checkpoint was written yet"):
        train(cfg, [rows], None, tmp_path / "other", hookpoint="h")
    assert not (tmp_path / "other").exists()


def test_bad_batch_width_is_refused_before_writing(tmp_path: Path) -> None:
    rows = synthetic(256, seed=1)
    with pytest.raises(ValueError, match=r"width 64 does not match d_in \+ d_out = 30 \+ 30"):
        train(quick_cfg(), [rows], None, tmp_path / "a", hookpoint="h", d_in=30, d_out=30)
    with pytest.raises(ValueError, match=r"width 63 is odd"):
        train(quick_cfg(), [rows[:, :63]], None, tmp_path / "a", hookpoint="h")
    with pytest.raises(ValueError, match=r"batch width 64 does not match the SAE's d_in = 32"):
        train(quick_cfg(kind="sae", d_in=32), [rows], None, tmp_path / "a", hookpoint="h")
    assert not (tmp_path / "a").exists()
    # A later batch of the wrong width names itself.
    with pytest.raises(ValueError, match=r"training batch 2 has width 40, expected d_in \+ d_out"):
        train(quick_cfg(), [rows, rows, rows[:, :40]], None, tmp_path / "b", hookpoint="h")


def test_k_not_below_latents_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"k \(128\) must be smaller than the number of latents"):
        quick_cfg(k=128)
    with pytest.raises(ValueError, match=r"k \(32\) must be smaller than the number of latents"):
        cfg = quick_cfg(k=32, num_latents=0, expansion_factor=1)
        train(cfg, [synthetic(256, seed=1)], None, tmp_path / "a", hookpoint="h")
    assert not (tmp_path / "a").exists()


def test_corrupt_training_state_names_the_file(tmp_path: Path) -> None:
    rows = [synthetic(256, seed=1)]
    train(quick_cfg(), rows, None, tmp_path, hookpoint="h")
    (tmp_path / "train_state.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"cannot read the training state .*train_state\.pt"):
        train(quick_cfg(), rows, None, tmp_path, hookpoint="h")


def test_linear_schedule_needs_a_known_length(tmp_path: Path) -> None:
    def one_shot() -> Iterator[torch.Tensor]:
        yield synthetic(256, seed=1)

    with pytest.raises(ValueError, match="set max_tokens, pass total_rows"):
        train(quick_cfg(), one_shot(), None, tmp_path, hookpoint="h")
    result = train(quick_cfg(max_tokens=200), one_shot(), None, tmp_path, hookpoint="h")
    assert result.tokens == 200 and result.steps == 2
    with pytest.raises(ValueError, match="one-shot iterator"):
        train(quick_cfg(epochs=2), one_shot(), None, tmp_path / "b", hookpoint="h", total_rows=256)


# ---------------------------------------------------------------------- shards


def test_cpu_bf16_autocast_matches_float32(tmp_path: Path) -> None:
    """The GPU's mixed-precision path (bf16 matmuls, float32 weights) also runs on the CPU."""
    rows, evals = [synthetic(2048, seed=1)], [synthetic(512, seed=2)]
    bf16 = train(quick_cfg(epochs=2, autocast="bf16"), rows, evals, tmp_path / "a", hookpoint="h")
    fp32 = train(quick_cfg(epochs=2), rows, evals, tmp_path / "b", hookpoint="h")
    assert json.loads((tmp_path / "a" / "train.json").read_text())["autocast"] is True
    assert bf16.eval is not None and fp32.eval is not None
    assert bf16.eval.fvu == pytest.approx(fp32.eval.fvu, abs=0.02)
    assert load(bf16.checkpoint).dtype == torch.float32


def test_train_from_bfloat16_shards(tmp_path: Path) -> None:
    from nlrw.model.shards import ShardWriter

    for name, seed, n in (("train", 1, 1000), ("eval", 2, 300)):
        with ShardWriter(tmp_path / name, width=2 * D, dtype="bfloat16", rows_per_shard=256) as w:
            w.write(synthetic(n, seed=seed).to(torch.bfloat16))
    cfg = quick_cfg(epochs=3)
    result = train_from_shards(
        cfg, tmp_path / "train", tmp_path / "eval", tmp_path / "out", hookpoint="h"
    )
    assert result.tokens == 3000 and result.steps == 24  # 8 steps per epoch (last one short)
    assert result.eval is not None and result.eval.rows == 300 and result.eval.fvu < 0.9
    assert load(tmp_path / "out" / "h").d_in == D


# ---------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_bf16_autocast_training(tmp_path: Path) -> None:
    rows, evals = synthetic(4096, seed=1), synthetic(1024, seed=2)
    cfg = quick_cfg(k=8, epochs=10, device="cuda")
    result = train(cfg, [rows], [evals], tmp_path, hookpoint="h")
    record = json.loads((tmp_path / "train.json").read_text())
    assert record["autocast"] is True and record["device"].startswith("cuda")
    assert result.eval is not None and result.eval.fvu < 0.6
    cpu = train(
        quick_cfg(k=8, epochs=10, device="cpu"), [rows], [evals], tmp_path / "c", hookpoint="h"
    )
    assert cpu.eval is not None and result.eval.fvu == pytest.approx(cpu.eval.fvu, abs=0.05)
