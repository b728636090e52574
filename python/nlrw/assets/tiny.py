"""The tiny random Llama for smoke runs (alias ``"tiny-random-llama"``): built locally in about a
second into the cache, the same on every machine with the same torch; its outputs mean nothing."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from nlrw.assets.base import cache_dir
from nlrw.lib.io import fsync_dir

TINY_MODEL_ALIAS = "tiny-random-llama"


def tiny_random_llama() -> Path:
    """A tiny randomly initialised Llama with a byte-level tokenizer, for smoke runs.

    4 layers, d_model 64, MLP width 128; vocabulary: the 256 bytes, 8 merges that make
    "Yes"/"No" single tokens, and ``<|endoftext|>`` (BOS/EOS/pad); weights drawn with
    ``torch.manual_seed(0)``. The same model on every machine with the same torch, built in
    about a second into the cache (atomically) and reused after. Its outputs mean nothing;
    it exercises every code path in seconds.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    dest = cache_dir() / "models" / f"{TINY_MODEL_ALIAS}-v2"
    if (dest / "config.json").exists():
        return dest
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    # A few merges so that the scorer's answers "Yes"/"No" (with or without a leading
    # space, "Ġ" in byte-level form) are single tokens, as the LLM stages require.
    # Merges apply in order: the spaced forms first, or "Ye" would swallow the "Y".
    merges = [("Ġ", "Y"), ("ĠY", "e"), ("ĠYe", "s"), ("Ġ", "N"), ("ĠN", "o")]
    merges += [("Y", "e"), ("Ye", "s"), ("N", "o")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    eos = "<|endoftext|>"
    vocab[eos] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=eos, eos_token=eos, pad_token=eos
    )
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=vocab[eos],
        eos_token_id=vocab[eos],
        pad_token_id=vocab[eos],
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (dest / "config.json").exists():  # another process may have won the race
            raise
    return dest
