"""The contexts stage: held-out windows with their true next token, and the coder's true
latents on their last token."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from nlrw import contexts
from nlrw.contexts import (
    ContextsConfig,
    load_context_activations,
    read_contexts,
    true_activations,
)
from nlrw.lib.rundir import RunDir
from nlrw.model import sparse
from nlrw.pipeline import load_preset, run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("contexts")
    run(load_preset("smoke"), path, until="contexts", log=lambda _: None)
    return path


def _subject_and_coder(run_dir: Path):
    from nlrw.model.subject import load_subject

    cfg = load_preset("smoke")
    subject = load_subject(cfg.collect.model, dtype="float32", device="cpu")
    coder = sparse.load(RunDir(run_dir).coder(cfg.collect.hookpoint), device="cpu")
    return cfg, subject, coder


def test_contexts_table_has_the_splits_lengths_and_held_out_documents(run_dir: Path) -> None:
    cfg = load_preset("smoke").contexts
    table = read_contexts(run_dir)
    assert table["context_id"].to_list() == list(range(cfg.n_contexts + cfg.n_calibration))
    assert table["split"].to_list() == ["eval"] * cfg.n_contexts + ["calibration"] * (
        cfg.n_calibration
    )
    assert set(table["input_ids"].list.len().to_list()) == {cfg.ctx_len}
    assert read_contexts(run_dir, "calibration").height == cfg.n_calibration
    # Never a document the cache (collect's eval split) or training read.
    act = run_dir / "activations"
    seen = set(np.load(act / "eval" / "documents.npy").tolist())
    seen |= set(np.load(act / "train" / "documents.npy").tolist())
    assert not seen & set(table["document"].to_list())


def test_target_is_the_token_that_follows_in_the_document(run_dir: Path) -> None:
    from transformers import AutoTokenizer

    from nlrw.assets import resolve_model
    from nlrw.collect import load_corpus

    cfg = load_preset("smoke")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.collect.model))
    texts = dict(load_corpus(cfg.collect).eval_documents())
    table = read_contexts(run_dir)
    checked = 0
    for row in table.iter_rows(named=True):
        ids = tokenizer(texts[row["document"]], add_special_tokens=False)["input_ids"]
        start = row["offset"]
        end = start + len(row["input_ids"])
        if end < len(ids):  # windows that cross into the next document are checked below
            assert ids[start:end] == row["input_ids"]
            assert ids[end] == row["target_id"]
            checked += 1
    assert checked >= table.height // 2


def test_true_latents_match_an_independent_forward_hook(run_dir: Path) -> None:
    cfg, subject, coder = _subject_and_coder(run_dir)
    table = read_contexts(run_dir)
    ids = torch.tensor(np.stack(table["input_ids"].to_numpy()), dtype=torch.long)
    seen: list[torch.Tensor] = []
    module = subject.model.get_submodule(cfg.collect.hookpoint)
    handle = module.register_forward_hook(lambda m, args, out: seen.append(args[0][:, -1]))
    try:
        with torch.no_grad():
            subject.model(input_ids=ids)
    finally:
        handle.remove()
    x = seen[0].float()
    acts = load_context_activations(run_dir)
    torch.testing.assert_close(acts.x, x, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        dense = torch.relu(coder.pre_acts(x))
    top = torch.topk(dense, coder.k, dim=-1)
    torch.testing.assert_close(acts.values, top.values, atol=1e-5, rtol=1e-5)
    # true_activations puts each latent's value where the encoder put it, zero elsewhere.
    latents = np.arange(coder.num_latents)
    full = true_activations(run_dir, latents, table["context_id"].to_numpy())
    expected = torch.zeros_like(dense).scatter(1, top.indices, top.values).T.numpy()
    np.testing.assert_allclose(full, expected, atol=1e-5)


def linked_run(run_dir: Path, tmp_path: Path) -> Path:
    """A fresh run directory sharing ``run_dir``'s activations, coder and cache (symlinks)."""
    target = tmp_path / "run"
    target.mkdir()
    for name in ("activations", "transcoder", "latents"):
        (target / name).symlink_to(run_dir / name)
    return target


def test_from_cache_reproduces_the_papers_windows(run_dir: Path, tmp_path: Path) -> None:
    cfg = dataclasses.replace(
        load_preset("smoke").contexts, source="from-cache", n_contexts=5, n_calibration=2
    )
    target = linked_run(run_dir, tmp_path)
    table = contexts.run(cfg, target)
    tokens = np.load(run_dir / "activations" / "eval" / "tokens.npy")
    for row in table.iter_rows(named=True):
        s, w = row["context_id"], row["offset"] + cfg.ctx_len
        assert row["input_ids"] == tokens[s, w - cfg.ctx_len : w].tolist()
        assert row["target_id"] == tokens[s, w]
        assert cfg.ctx_len <= w < tokens.shape[1]


def test_paper_positions_follow_the_papers_range_and_seed(run_dir: Path, tmp_path: Path) -> None:
    cfg = dataclasses.replace(
        load_preset("smoke").contexts,
        source="from-cache",
        n_contexts=5,
        n_calibration=2,
        positions="paper",
    )
    target = linked_run(run_dir, tmp_path)
    table = contexts.run(cfg, target)
    tokens = np.load(run_dir / "activations" / "eval" / "tokens.npy")
    draws = np.random.default_rng(42).integers(33, 224, size=table.height)
    for row, draw in zip(table.iter_rows(named=True), draws, strict=True):
        w = row["offset"] + cfg.ctx_len
        assert w == min(int(draw), tokens.shape[1] - 1)
        assert row["input_ids"] == tokens[row["context_id"], w - cfg.ctx_len : w].tolist()


def test_seeded_rerun_is_identical_and_a_finished_stage_is_skipped(
    run_dir: Path, tmp_path: Path
) -> None:
    before = (run_dir / "contexts.parquet").stat().st_mtime_ns
    cfg = load_preset("smoke").contexts
    again = contexts.run(cfg, run_dir)
    assert (run_dir / "contexts.parquet").stat().st_mtime_ns == before
    target = linked_run(run_dir, tmp_path)
    fresh = contexts.run(cfg, target)
    assert fresh.equals(again)
    other = contexts.run(dataclasses.replace(cfg, seed=1), target)
    assert not other["input_ids"].equals(fresh["input_ids"])
    record = json.loads((target / "contexts.json").read_text())
    assert record["config"]["seed"] == 1 and "versions" in record


def test_too_many_contexts_is_an_error_naming_the_option(run_dir: Path, tmp_path: Path) -> None:
    target = linked_run(run_dir, tmp_path)
    cfg = dataclasses.replace(load_preset("smoke").contexts, source="from-cache", n_contexts=10**6)
    with pytest.raises(ValueError, match=r"contexts\.n_contexts"):
        contexts.run(cfg, target)
    assert not (target / "contexts.parquet").exists()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"ctx_len": 0}, "contexts.ctx_len"),
        ({"sequence_len": 8, "ctx_len": 8}, "must exceed"),
        ({"source": "web"}, "contexts.source"),
        ({"positions": "anywhere"}, "contexts.positions"),
        ({"n_calibration": -1}, "contexts.n_calibration"),
    ],
)
def test_bad_options_are_named(change: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ContextsConfig(**change)


def test_missing_and_damaged_inputs_name_the_file(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"collect\.json"):
        contexts.run(ContextsConfig(), tmp_path)
    with pytest.raises(FileNotFoundError, match=r"contexts\.parquet.*contexts stage"):
        read_contexts(tmp_path)
    (tmp_path / "contexts.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match=r"contexts\.parquet"):
        read_contexts(tmp_path)
    pl.DataFrame({"context_id": [0]}).write_parquet(tmp_path / "contexts.parquet")
    with pytest.raises(ValueError, match="lacks the columns"):
        read_contexts(tmp_path)
    (tmp_path / "contexts").mkdir()
    (tmp_path / "contexts" / "activations.safetensors").write_bytes(b"\x08\x00\x00")
    with pytest.raises(ValueError, match=r"activations\.safetensors"):
        load_context_activations(tmp_path)
