"""Plain helpers the test modules share (the shared pytest fixtures are in ``conftest.py``).

Test modules import these by name (``from support import save_tiny``): pytest puts ``tests/``
on ``sys.path`` (``rootdir``-relative ``prepend`` import mode, no ``__init__.py``), and
``conftest.py`` is pytest's to import, not the tests'. No test module imports another.

* Tiny random causal LMs: :func:`tiny_lm` is the one builder; :func:`tiny_model` (byte-level
  vocabulary, Qwen2 or Llama, for the backends) and :func:`word_model` (word-level vocabulary,
  Llama, GPT-NeoX or GPT-2, for the subject) are its two presets.
* Tokenizers: :func:`tiny_tokenizer` (byte-level BPE with a chat template, :data:`BYTE_VOCAB`)
  and :func:`word_tokenizer` (word-level over :data:`WORDS`, :data:`WORD_VOCAB`).
* Rating prompts (:data:`DIGITS`, :data:`RATING_SYSTEM`, :data:`EXAMPLES`, :func:`rating_chat`,
  :func:`chats`) and :func:`free_port` for loopback servers.
* A synthetic latent source and a fake explainer backend for the explain and score stages.
* :func:`run_smoke_pinned`: the smoke preset's whole run at a pinned number of torch threads,
  so that two such runs made anywhere in a session give the same bytes (the eval tables
  depend on the thread count).

torch, transformers and tokenizers are imported inside the helpers that need them: ``conftest``
imports this module, and the vLLM tests set their environment before torch is imported.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nlrw.backends.base import AnswerDistribution, Generation, Message, SplitPrompt

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerFast

    from nlrw.backends.transformers import TransformersBackend

# --------------------------------------------------------------------------------------------
# The one tiny-model builder


def tiny_lm(
    arch: str, *, vocab_size: int, seed: int = 0, init_std: float | None = 0.3, **config: Any
) -> Any:
    """A tiny random causal LM of family ``arch`` ("llama", "qwen2", "neox" or "gpt2") built
    from ``config`` (that family's config fields) after ``torch.manual_seed(seed)``; unless
    ``init_std`` is None every weight matrix is then redrawn from N(0, init_std), larger than
    the default init (std 0.02), so that outputs depend on the input and layers visibly change
    the residual. Returned in eval mode."""
    import torch
    import transformers

    classes = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM"),
        "gpt2": ("GPT2Config", "GPT2LMHeadModel"),
    }
    if arch not in classes:
        raise ValueError(arch)
    config_class, model_class = (getattr(transformers, name) for name in classes[arch])
    torch.manual_seed(seed)
    model = model_class(config_class(vocab_size=vocab_size, **config))
    if init_std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim > 1:
                    p.normal_(0, init_std)
    return model.eval()


# --------------------------------------------------------------------------------------------
# Byte-level vocabulary: the backends' tiny models (test_backends, test_engine, test_vllm_*)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
BYTE_VOCAB = 262  # 256 bytes, "Ye", "Yes", "No", 3 specials
DIGITS = [str(d) for d in range(10)]


def tiny_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """Byte-level BPE: every byte is a token, plus merges giving "Yes" and "No" one token each;
    so digits are single tokens, " 5" is two, "Maybe" five."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for t in ["Ye", "Yes", "No"]:
        vocab[t] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("Y", "e"), ("Ye", "s"), ("N", "o")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # pyright: ignore
    tok.decoder = decoders.ByteLevel()  # pyright: ignore
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    t = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    t.name_or_path = f"tiny-bytes-{'chat' if chat_template else 'plain'}"
    if chat_template:
        t.chat_template = CHAT_TEMPLATE
    return t


def tiny_model(arch: str = "qwen2", seed: int = 0, **config: Any) -> Any:
    """A random 2-layer Qwen2 or Llama of width 32 over the byte-level vocabulary (``config``
    overrides its fields)."""
    fields: dict[str, Any] = {
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "eos_token_id": 261,
        "pad_token_id": 259,
    }
    return tiny_lm(arch, vocab_size=BYTE_VOCAB, seed=seed, **(fields | config))


def tiny_backend(arch: str = "qwen2", batch_size: int = 8, **kw: Any) -> TransformersBackend:
    from nlrw.backends.transformers import TransformersBackend

    kw.setdefault("tokenizer", tiny_tokenizer())
    kw.setdefault("dtype", "float32")
    return TransformersBackend(
        f"tiny-{arch}", model_obj=tiny_model(arch), batch_size=batch_size, **kw
    )


def chats(n: int) -> list[list[dict[str, str]]]:
    """n chats of different lengths (some with a system message)."""
    out = []
    for i in range(n):
        chat = [{"role": "user", "content": f"Rate example {i}: " + "word " * (3 * i % 11)}]
        if i % 2:
            chat.insert(0, {"role": "system", "content": "You rate things."})
        out.append(chat)
    return out


RATING_SYSTEM = (
    "You are a meticulous AI researcher. You will see an explanation of a neuron of a "
    "language model and a text whose last token is marked <<like this>>. Rate how strongly "
    "the neuron fires on the marked token, from 0 (not at all) to 9 (as strongly as it "
    "ever fires). Answer with a single digit."
)
EXAMPLES = [
    ("the word 'dog' and other pets", "She walked her <<dog>>"),
    ("the word 'dog' and other pets", "The stock market fell <<sharply>>"),
    ("closing parentheses in code", "print(len(x)<<)>>"),
    ("female names", "Yesterday I met <<Elizabeth>>"),
    ("numbers written as digits", "The year was <<1811>>"),
]


def rating_chat(explanation: str, text: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": RATING_SYSTEM},
        {"role": "user", "content": f"Neuron explanation: {explanation}.\nText: {text}"},
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# Word-level vocabulary: the subject's tiny models (test_subject, test_collect, test_evaluate,
# test_recovery)

_WORD_TEXT = (
    "the a cat dog bird sat ran flew on under over mat house tree red blue green big small "
    "and but then quickly slowly happy sad old young river hill road walked saw heard"
)
WORDS = _WORD_TEXT.split()
SPECIALS = ["<unk>", "<bos>", "<eos>"]
WORD_VOCAB = len(SPECIALS) + len(WORDS)


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over :data:`WORDS` (ids 0-2 are <unk>, <bos>, <eos>)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()  # pyright: ignore[reportAttributeAccessIssue]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )


def random_text(rng: random.Random, lo: int = 3, hi: int = 30) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


_WORD_CONFIG: dict[str, dict[str, Any]] = {
    "llama": {
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    },
    "neox": {  # GPT-NeoX/Pythia: parallel residual
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "max_position_embeddings": 64,
        "use_parallel_residual": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "gpt2": {
        "n_embd": 32,
        "n_layer": 3,
        "n_head": 4,
        "n_positions": 64,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
}


def word_model(arch: str, seed: int = 0) -> Any:
    """A random 3-layer model of the given family ("llama", "neox" or "gpt2"), width 32, over
    the word-level vocabulary, in eval mode."""
    if arch not in _WORD_CONFIG:
        raise ValueError(arch)
    return tiny_lm(arch, vocab_size=WORD_VOCAB, seed=seed, init_std=0.2, **_WORD_CONFIG[arch])


MLP = {
    "llama": "model.layers.{}.mlp",
    "neox": "gpt_neox.layers.{}.mlp",
    "gpt2": "transformer.h.{}.mlp",
}
LAYER = {"llama": "model.layers.{}", "neox": "gpt_neox.layers.{}", "gpt2": "transformer.h.{}"}


def save_tiny(path: Path, arch: str = "llama") -> str:
    """Saves a tiny word-level model and tokenizer as a local Hugging Face folder; returns its
    path."""
    word_model(arch).save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return str(path)


def ids(batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    """Random token ids of the word-level vocabulary, specials excluded."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, WORD_VOCAB, (batch, seq), generator=g)


# --------------------------------------------------------------------------------------------
# Synthetic latents and a fake explainer backend (test_explain, test_score)

SOURCE_WINDOW = 8
SOURCE_TOKENS = [
    "the",
    " cat",
    " sat",
    " on",
    " mat",
    ".",
    "\n",
    " dog",
    " ran",
    " far",
    " a",
    " big",
]


class ArraySource:
    """A LatentSource over arrays: tokens [n, w], activations {latent: [n, w]}."""

    def __init__(self, tokens: np.ndarray, acts: dict[int, np.ndarray], counts: dict[int, int]):
        self._tokens = tokens
        self._acts = acts
        self._counts = counts

    def counts(self) -> tuple[np.ndarray, np.ndarray]:
        latents = np.array(sorted(self._counts), dtype=np.int64)
        return latents, np.array([self._counts[int(k)] for k in latents], dtype=np.int64)

    def top_windows(self, latent: int) -> np.ndarray:
        peak = self._acts[latent].max(1)
        active = np.flatnonzero(peak > 0)
        return active[np.lexsort((active, -peak[active]))].astype(np.int64)

    def activations(self, latent: int, windows: np.ndarray) -> np.ndarray:
        return self._acts[latent][windows]

    def tokens(self, windows: np.ndarray) -> np.ndarray:
        return self._tokens[windows]

    def inactive_windows(self, latent: int, n: int, seed: int) -> np.ndarray:
        idle = np.flatnonzero(self._acts[latent].max(1) == 0)
        rng = np.random.default_rng([seed, latent])
        return rng.choice(idle, size=min(n, len(idle)), replace=False).astype(np.int64)

    def token_strings(self, ids: Sequence[int] | np.ndarray) -> list[str]:
        return [SOURCE_TOKENS[int(i)] for i in ids]


def synthetic_source(n_windows: int = 400, seed: int = 0) -> ArraySource:
    """Latent 0 fires on " cat" (id 1), latent 1 on " dog" (id 7), latent 2 on "." (id 5),
    latent 3 is rare (count 3): strengths vary so the top windows rank by them."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, len(SOURCE_TOKENS), size=(n_windows, SOURCE_WINDOW))
    tokens[: n_windows // 2, 0] = 2  # half the windows have no cat/dog/period at all
    tokens[: n_windows // 2] = np.where(
        np.isin(tokens[: n_windows // 2], [1, 5, 7]), 3, tokens[: n_windows // 2]
    )
    acts: dict[int, np.ndarray] = {}
    strength = rng.uniform(0.5, 5.0, size=(n_windows, SOURCE_WINDOW))
    for latent, tok in [(0, 1), (1, 7), (2, 5)]:
        acts[latent] = np.where(tokens == tok, strength, 0.0)
    rare = np.zeros((n_windows, SOURCE_WINDOW))
    rare[-1, :3] = 1.0
    acts[3] = rare
    counts = {k: int((v > 0).sum()) for k, v in acts.items()}
    return ArraySource(tokens, acts, counts)


class FakeExplainer:
    """A Backend whose replies come from a function of (chat, seed); counts calls."""

    name = "fake"
    model = "fake-model"

    def __init__(self, reply=None, fail_after: int | None = None) -> None:
        self.reply = reply or (lambda chat, seed: "Sure, here is the explanation: the word cat.")
        self.fail_after = fail_after
        self.calls: list[int] = []

    def generate(
        self, chats: Sequence[Sequence[Message]], *, seed: int = 0, **_: object
    ) -> list[Generation]:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls.append(len(chats))
        return [Generation(self.reply(c, seed), 100, 10, "stop") for c in chats]

    def answer_distribution(
        self, chats: Sequence[Sequence[Message]], answer_prefix: str, answers: Sequence[str]
    ) -> AnswerDistribution:
        probs = np.full((len(chats), len(answers)), 0.5)
        return AnswerDistribution(probs, probs.sum(1))

    def close(self) -> None:
        pass


def interleaved_prompts(
    n: int, seed: int, shared: int, extra: tuple[int, int]
) -> list[SplitPrompt]:
    """Three prefixes interleaved: ``shared`` common leading tokens plus ``extra[0]`` more,
    the empty prefix, and the same ``shared`` plus ``extra[1]`` more; suffixes of 1..7 tokens
    (byte-level ids below 259)."""
    rng = np.random.default_rng(seed)
    head = tuple(int(t) for t in rng.integers(0, 259, shared))
    prefixes = [
        head + tuple(int(t) for t in rng.integers(0, 259, extra[0])),
        (),
        head + tuple(int(t) for t in rng.integers(0, 259, extra[1])),
    ]
    return [
        SplitPrompt(prefixes[i % 3], tuple(int(t) for t in rng.integers(0, 259, 1 + (5 * i) % 7)))
        for i in range(n)
    ]


READABLE_EXPLANATIONS = {
    41: "The letter e after a consonant",
    85: "Commas in lists",
    91: "Capital letters",
}
"""Readable explanations for three latents of the smoke run (the simulate tests' run)."""


def smoke_run_with_readable_explanations(path: Path) -> Path:
    """A smoke run up to score at ``path`` (contexts included), its explanations replaced by
    :data:`READABLE_EXPLANATIONS` (every other latent 'skipped', as explain's min_count
    leaves them)."""
    import polars as pl

    from nlrw.pipeline import load_preset
    from nlrw.pipeline import run as run_pipeline

    run_pipeline(load_preset("smoke"), path, until="score", log=lambda _: None)
    table = pl.read_parquet(path / "explanations.parquet")
    assert set(READABLE_EXPLANATIONS) <= set(table["latent"].to_list())
    table = table.with_columns(
        pl.col("latent")
        .replace_strict(READABLE_EXPLANATIONS, default=None, return_dtype=pl.String)
        .alias("explanation"),
        pl.when(pl.col("latent").is_in(list(READABLE_EXPLANATIONS)))
        .then(pl.lit("ok"))
        .otherwise(pl.lit("skipped"))
        .alias("status"),
    )
    table.write_parquet(path / "explanations.parquet")
    return path


def run_smoke_pinned(run_dir: Path, threads: int = 1) -> Path:
    """The smoke preset's run into ``run_dir`` at ``threads`` torch threads (restored after)."""
    import torch

    from nlrw.pipeline import load_preset, run

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run(load_preset("smoke"), run_dir, log=lambda _: None)
    finally:
        torch.set_num_threads(before)
    return run_dir


def quote_a_marked_word(run_dir: Path, latent: int) -> tuple[str, set[int]]:
    """Rewrite ``latent``'s explanation in ``run_dir`` to ``The word "W"``, W the marked (last)
    token of the run's first context; returns W and the contexts whose marked token is W by
    the consistency rule (whitespace removed, case-folded)."""
    import polars as pl

    from nlrw.contexts import read_contexts
    from nlrw.lib.rundir import RunDir
    from nlrw.model.subject import load_tokenizer

    tokenizer = load_tokenizer(RunDir(run_dir).subject_model())
    contexts = read_contexts(run_dir).sort("context_id")
    last = [str(tokenizer.decode([ids[-1]])) for ids in contexts["input_ids"].to_list()]
    word = last[0].strip()
    assert word and '"' not in word
    path = RunDir(run_dir).explanations
    pl.read_parquet(path).with_columns(
        pl.when(pl.col("latent") == latent)
        .then(pl.lit(f'The word "{word}"'))
        .otherwise(pl.col("explanation"))
        .alias("explanation")
    ).write_parquet(path)
    norm = "".join(word.split()).casefold()
    matching = {
        int(c)
        for c, t in zip(contexts["context_id"], last, strict=True)
        if "".join(t.split()).casefold() == norm
    }
    return word, matching


TOOLS = Path(__file__).resolve().parent.parent / "tools"


def load_tool(name: str) -> Any:
    """``tools/<name>.py`` imported as a module (the tools are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(name: str, *args: str) -> Any:
    """``python tools/<name>.py ARGS`` in a subprocess: its CompletedProcess (text output)."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, str(TOOLS / f"{name}.py"), *args],
        capture_output=True,
        text=True,
        check=False,
    )
