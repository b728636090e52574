"""nlrw.collect on tiny random models and small local corpora.

Shards hold exactly the rows :func:`nlrw.model.subject.capture` gives for the recorded windows;
windows follow the documented rule; the held-out split is disjoint; bad inputs fail before
anything is written; a run killed by a signal resumes to byte-identical shards. The slow test
collects a few thousand tokens from the embedded default (SmolLM2-135M on Austen).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from nlrw import collect
from nlrw.collect import CollectConfig, is_held_out, run, token_windows
from nlrw.model.shards import ShardReader
from nlrw.model.subject import capture, load_subject
from support import random_text, save_tiny, word_tokenizer

# Tiny models gain nothing from threads, and spin-waiting threads suffer on a shared machine.
torch.set_num_threads(1)


def write_jsonl(path: Path, n: int = 300, seed: int = 0, column: str = "body") -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({column: random_text(rng), "other": 1}) + "\n")
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("collect")
    return {
        "llama": Path(save_tiny(root / "llama", "llama")),
        "neox": Path(save_tiny(root / "neox", "neox")),
        "gpt2": Path(save_tiny(root / "gpt2", "gpt2")),
        "corpus": write_jsonl(root / "corpus.jsonl"),
    }


def config(assets: dict[str, Path], **kw: Any) -> CollectConfig:
    base: dict[str, Any] = {
        "model": str(assets["llama"]),
        "hookpoint": "model.layers.1.mlp",
        "dataset": str(assets["corpus"]),
        "text_column": "body",
        "ctx_len": 16,
        "n_tokens": 1000,
        "n_eval_tokens": 200,
        "batch_size": 4,
        "rows_per_shard": 256,
    }
    return CollectConfig(**{**base, **kw})


def read_rows(path: Path) -> np.ndarray:
    reader = ShardReader(path, batch_rows=100_000)
    return np.concatenate(list(reader))


def test_shards_hold_the_captured_activations_of_the_recorded_windows(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    cfg = config(assets)
    result = run(cfg, tmp_path)
    assert (result.d_in, result.d_out, result.width) == (32, 32, 64)
    assert (result.n_train_tokens, result.n_eval_tokens, result.skipped) == (1000, 200, False)
    assert result.train_dir == tmp_path / "activations" / "train"
    assert result.eval_dir == tmp_path / "activations" / "eval"
    reader = ShardReader(result.train_dir)
    assert reader.complete and reader.num_rows == 1000 and reader.width == 64
    assert reader.dtype == "float32" and reader.num_shards == 4

    rows = read_rows(result.train_dir)
    tokens = np.load(result.train_dir / "tokens.npy")
    assert tokens.shape == (63, 16) and tokens.dtype == np.int32  # ceil(1000 / 16) windows
    subject = load_subject(cfg.model)
    acts = capture(subject.model, cfg.hookpoint, torch.from_numpy(tokens).long())
    assert acts.x is not None
    expected = torch.cat([acts.x, acts.y], -1).reshape(-1, 64)[:1000].numpy()
    np.testing.assert_allclose(rows, expected, rtol=1e-5, atol=1e-6)

    record = json.loads(result.record_path.read_text())
    assert record["complete"] and record["stage"] == "collect"
    assert record["config"]["n_tokens"] == 1000
    assert (record["d_in"], record["d_out"], record["hookpoint"]) == (32, 32, cfg.hookpoint)
    assert (record["kind"], record["dtype"], record["ctx_len"], record["seed"]) == (
        "transcoder",
        "float32",
        16,
        0,
    )
    model = record["model"]
    assert model["path"] == str(assets["llama"].resolve())
    assert set(model["weights_sha256"]) == {"model.safetensors"}
    assert len(model["weights_sha256"]["model.safetensors"]) == 64
    assert record["splits"]["train"]["rows"] == 1000 and record["splits"]["train"]["windows"] == 63
    assert record["splits"]["eval"]["rows"] == 200
    assert record["tokenizer"]["separator_token_id"] == 2
    assert "blake2b" in record["corpus"]["held_out_rule"]


def test_held_out_documents_are_kept_apart(assets: dict[str, Path], tmp_path: Path) -> None:
    result = run(config(assets, n_eval_tokens=400), tmp_path)
    assert result.eval_dir is not None
    texts = [json.loads(line)["body"] for line in assets["corpus"].read_text().splitlines()]
    train_docs = set(np.load(result.train_dir / "documents.npy").tolist())
    eval_docs = set(np.load(result.eval_dir / "documents.npy").tolist())
    assert train_docs and eval_docs and not train_docs & eval_docs
    assert all(is_held_out(texts[i], 0, 0.1) for i in eval_docs)
    assert not any(is_held_out(texts[i], 0, 0.1) for i in train_docs)
    held = sum(is_held_out(t, 0, 0.1) for t in texts)
    assert 10 < held < 60  # about 10% of 300
    # The rule depends on the text (and seed), not on the position: duplicates go together.
    assert is_held_out("same text", 3, 0.5) == is_held_out("same text", 3, 0.5)


def test_windows_concatenate_documents_with_a_separator() -> None:
    tok = word_tokenizer()
    docs = [(10, "the cat sat"), (11, ""), (12, "a dog ran on the mat"), (13, "red")]
    windows = list(token_windows(docs, tok, 4))
    the, cat, sat, a, dog, ran, on, mat, red = (
        tok.convert_tokens_to_ids(w)
        for w in ("the", "cat", "sat", "a", "dog", "ran", "on", "mat", "red")
    )
    eos = tok.eos_token_id
    stream = [the, cat, sat, eos, a, dog, ran, on, the, mat, eos, red, eos]
    assert [w.tokens.tolist() for w in windows] == [stream[0:4], stream[4:8], stream[8:12]]
    assert [w.document for w in windows] == [10, 12, 12]  # the empty document adds nothing
    assert all(w.tokens.dtype == np.int32 for w in windows)

    with_bos = list(token_windows(docs, tok, 4, prepend_bos=True))
    bos = tok.bos_token_id
    assert [w.tokens.tolist() for w in with_bos] == [
        [bos, *stream[0:3]],
        [bos, *stream[3:6]],
        [bos, *stream[6:9]],
        [bos, *stream[9:12]],
    ]
    assert [w.document for w in with_bos] == [10, 10, 12, 12]


def test_prepend_bos_run(assets: dict[str, Path], tmp_path: Path) -> None:
    result = run(config(assets, prepend_bos=True, n_eval_tokens=0), tmp_path)
    tokens = np.load(result.train_dir / "tokens.npy")
    assert (tokens[:, 0] == 1).all() and (tokens[:, 1:] != 1).all()
    assert result.eval_dir is None and not (tmp_path / "activations" / "eval").exists()


@pytest.mark.parametrize(
    ("arch", "hookpoint", "kind", "width"),
    [
        ("gpt2", "transformer.h.1", "sae", 32),
        ("gpt2", "transformer.h.2.mlp", "transcoder", 64),
        ("neox", "gpt_neox.layers.1.mlp", "transcoder", 64),
        ("neox", "gpt_neox.layers.0", "sae", 32),
    ],
)
def test_other_families_and_the_sae_kind(
    assets: dict[str, Path], tmp_path: Path, arch: str, hookpoint: str, kind: str, width: int
) -> None:
    cfg = config(assets, model=str(assets[arch]), hookpoint=hookpoint, kind=kind, n_tokens=160)
    result = run(cfg, tmp_path)
    assert result.width == width and ShardReader(result.train_dir).width == width
    tokens = torch.from_numpy(np.load(result.train_dir / "tokens.npy")).long()
    acts = capture(load_subject(cfg.model).model, hookpoint, tokens, kind=cfg.kind)
    expected = acts.y if kind == "sae" else torch.cat([acts.x, acts.y], -1)  # pyright: ignore
    np.testing.assert_allclose(
        read_rows(result.train_dir), expected.reshape(-1, width).numpy(), rtol=1e-5, atol=1e-6
    )


def test_a_finished_run_is_skipped_and_another_config_refused(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    cfg = config(assets, n_tokens=160, n_eval_tokens=32)
    first = run(cfg, tmp_path)
    again = run(cfg, tmp_path)
    assert again.skipped and again._replace(skipped=False) == first
    with pytest.raises(FileExistsError, match="another config"):
        run(replace(cfg, n_tokens=320), tmp_path)
    redone = run(replace(cfg, n_tokens=320), tmp_path, overwrite=True)
    assert redone.n_train_tokens == 320 and ShardReader(redone.train_dir).num_rows == 320


def test_a_short_corpus_collects_what_it_has(assets: dict[str, Path], tmp_path: Path) -> None:
    corpus = write_jsonl(tmp_path / "small.jsonl", n=20)
    result = run(config(assets, dataset=str(corpus), n_tokens=100_000, n_eval_tokens=0), tmp_path)
    record = json.loads(result.record_path.read_text())
    assert record["splits"]["train"]["corpus_exhausted"]
    assert 0 < result.n_train_tokens < 100_000 and result.n_train_tokens % 16 == 0
    assert ShardReader(result.train_dir).num_rows == result.n_train_tokens


def test_text_files_and_builders_with_data_files(assets: dict[str, Path], tmp_path: Path) -> None:
    rng = random.Random(1)
    paragraphs = ["\n".join(random_text(rng) for _ in range(3)) for _ in range(80)]
    text = tmp_path / "book.txt"
    text.write_text("\n\n".join(paragraphs) + "\n")
    by_path = run(config(assets, dataset=str(text), text_column="text"), tmp_path / "a")
    by_builder = run(
        config(assets, dataset="text", data_files=(str(text),), text_column="text"),
        tmp_path / "b",
    )
    assert by_path.n_train_tokens == by_builder.n_train_tokens == 1000
    np.testing.assert_array_equal(read_rows(by_path.train_dir), read_rows(by_builder.train_dir))
    # One document per paragraph (sample_by="paragraph"), not per line.
    assert max(np.load(by_path.train_dir / "documents.npy")) < 80


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"dataset": "/nonexistent/corpus.jsonl"}, FileNotFoundError, "corpus.jsonl"),
        (
            {"dataset": "json", "data_files": ("/nonexistent/a.jsonl",)},
            FileNotFoundError,
            "a.jsonl",
        ),
        ({"dataset": "whatever", "data_files": ("x.jsonl",)}, ValueError, "builder"),
        ({"text_column": "missing"}, ValueError, r"no column 'missing' \(columns: body, other\)"),
        ({"ctx_len": 100}, ValueError, r"max_position_embeddings = 64"),
        ({"hookpoint": "model.layers.9.mlp"}, ValueError, "nearest module names"),
        ({"kind": "mlp"}, ValueError, "kind"),
        ({"n_tokens": 0}, ValueError, "n_tokens"),
        ({"eval_fraction": 1.5}, ValueError, "eval_fraction"),
    ],
)
def test_bad_inputs_fail_before_writing_anything(
    assets: dict[str, Path], tmp_path: Path, change: dict[str, Any], error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        run(config(assets, **change), tmp_path)
    assert not (tmp_path / "activations").exists()


@pytest.mark.parametrize("content", ["", "\n".join(json.dumps({"body": "the"}) for _ in range(3))])
def test_an_empty_or_too_short_corpus_is_an_error(
    assets: dict[str, Path], tmp_path: Path, content: str
) -> None:
    corpus = tmp_path / "empty.jsonl"
    corpus.write_text(content)
    with pytest.raises(ValueError, match=r"empty|no window"):
        run(config(assets, dataset=str(corpus)), tmp_path)
    assert not (tmp_path / "activations").exists()


_CHILD = """
import json, sys, time
import torch
from nlrw import collect
from nlrw.model.shards import ShardWriter

torch.set_num_threads(int(sys.argv[3]))
write = ShardWriter.write
def slow_write(self, rows):  # slow enough for the parent to kill us mid-run
    time.sleep(0.1)
    write(self, rows)
ShardWriter.write = slow_write
fields = json.loads(sys.argv[1])
fields["data_files"] = tuple(fields["data_files"])
collect.run(collect.CollectConfig(**fields), sys.argv[2])
"""


def test_a_run_killed_by_a_signal_resumes_to_identical_shards(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    # 100 rows per shard does not divide 4 windows x 16 tokens: the resumed run starts inside
    # a batch, and skips its first rows.
    cfg = config(assets, n_tokens=3000, n_eval_tokens=300, rows_per_shard=100)
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _CHILD,
            json.dumps(dataclasses.asdict(cfg)),
            str(killed),
            str(torch.get_num_threads()),
        ],
        env=env,
        stderr=subprocess.PIPE,
    )
    manifest = killed / "activations" / "train" / "manifest.json"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and child.poll() is None:
            try:
                state = json.loads(manifest.read_text())
            except (OSError, ValueError):
                state = {"shards": []}
            if len(state["shards"]) >= 7:
                break
            time.sleep(0.01)
        assert child.poll() is None, child.stderr.read().decode() if child.stderr else ""
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    before = json.loads(manifest.read_text())
    assert not before["complete"] and 0 < before["total_rows"] < 3000
    assert not json.loads((killed / "activations" / "collect.json").read_text())["complete"]

    forwards: list[int] = []
    rows_fn = collect.activation_rows

    def counting(*args: Any) -> torch.Tensor:
        forwards.append(1)
        return rows_fn(*args)

    monkeypatch.setattr(collect, "activation_rows", counting)
    resumed = run(cfg, killed)
    resumed_forwards = len(forwards)
    monkeypatch.setattr(collect, "activation_rows", rows_fn)
    whole = run(cfg, tmp_path / "whole")
    total_batches = -(-3000 // 64) + -(-300 // 64)
    assert resumed_forwards <= total_batches - before["total_rows"] // 64
    assert resumed._replace(train_dir=None, eval_dir=None, record_path=None) == whole._replace(
        train_dir=None, eval_dir=None, record_path=None
    )
    for split in ("train", "eval"):
        a, b = killed / "activations" / split, tmp_path / "whole" / "activations" / split
        ma, mb = (
            json.loads((a / "manifest.json").read_text()),
            json.loads((b / "manifest.json").read_text()),
        )
        assert ma == mb and ma["complete"]
        names = sorted(p.name for p in a.iterdir())
        assert names == sorted(p.name for p in b.iterdir())
        for name in names:
            assert (a / name).read_bytes() == (b / name).read_bytes(), f"{split}/{name}"


@pytest.mark.slow
def test_embedded_default_smollm2_on_austen(tmp_path: Path) -> None:
    from nlrw.assets import AUSTEN_HELD_OUT_BOOK, austen_corpus

    torch.set_num_threads(2)
    cfg = CollectConfig(n_tokens=2048, n_eval_tokens=512, batch_size=8)
    try:
        result = run(cfg, tmp_path)
    finally:
        torch.set_num_threads(1)
    assert (result.d_in, result.d_out, result.width) == (576, 576, 1152)
    assert (result.n_train_tokens, result.n_eval_tokens) == (2048, 512)
    record = json.loads(result.record_path.read_text())
    assert record["model"]["architecture"] == "LlamaForCausalLM"
    assert record["model"]["weights_sha256"]
    corpus = austen_corpus()
    books, chapters = corpus["book"], corpus["chapter"]
    assert result.eval_dir is not None
    train_docs = np.load(result.train_dir / "documents.npy").tolist()
    eval_docs = np.load(result.eval_dir / "documents.npy").tolist()
    assert all(books[i] != AUSTEN_HELD_OUT_BOOK for i in train_docs)
    assert all(books[i] == AUSTEN_HELD_OUT_BOOK for i in eval_docs)
    # Documents are chapters, named by the row of their first paragraph.
    assert all(
        i == 0 or (books[i], chapters[i]) != (books[i - 1], chapters[i - 1]) for i in eval_docs
    )

    # The stored rows of the first window equal a plain hook on the full forward pass.
    subject = load_subject(cfg.model)
    tokens = torch.from_numpy(np.load(result.train_dir / "tokens.npy")[:1]).long()
    seen: dict[str, torch.Tensor] = {}
    mlp = subject.model.model.layers[15].mlp
    handle = mlp.register_forward_hook(lambda _m, i, o: seen.update(x=i[0], y=o))
    with torch.no_grad():
        subject.model(input_ids=tokens)
    handle.remove()
    first = next(iter(ShardReader(result.train_dir, batch_rows=256)))
    expected = torch.cat([seen["x"], seen["y"]], -1)[0].numpy()
    np.testing.assert_allclose(first, expected, rtol=1e-4, atol=1e-4)
    text = subject.tokenizer.decode(tokens[0])
    assert sum(c.isalpha() for c in text) > len(text) / 2  # English prose, not garbage
