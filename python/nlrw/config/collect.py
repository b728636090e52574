"""Options of the collect stage (:mod:`nlrw.collect`)."""

from __future__ import annotations

from dataclasses import dataclass

from nlrw.lib.types import DTypeOption, Kind

__all__ = ["CollectConfig"]


@dataclass(frozen=True)
class CollectConfig:
    """Options of the ``collect`` stage: which subject, hookpoint and corpus, and how much."""

    model: str = "smollm2-135m"
    """Subject model: a hub name, a local Hugging Face folder, a .gguf file, or the embedded
    default's alias "smollm2-135m"."""

    hookpoint: str = "model.layers.15.mlp"
    """Module name where activations are read, e.g. model.layers.15.mlp (Llama),
    gpt_neox.layers.6.mlp (Pythia), transformer.h.6.mlp (GPT-2), or a decoder layer such as
    model.layers.15 for an SAE on the residual stream."""

    kind: Kind = "transcoder"
    """transcoder: store the module's input and output, [x | y]; sae: its output only."""

    dataset: str = "austen"
    """Corpus: "austen" (the embedded default), a hub dataset name, a local directory, a local
    .txt/.jsonl/.json/.parquet/.csv file, or a builder name (text, json, parquet, csv) used
    with data_files."""

    data_files: tuple[str, ...] = ()
    """Local files read by the builder named in dataset (datasets.load_dataset data_files)."""

    dataset_config: str | None = None
    """Configuration (subset) name of a hub dataset."""

    split: str = "train"
    """Split of the dataset to read (ignored for "austen")."""

    text_column: str = "text"
    """Column holding each document's text (ignored for "austen")."""

    ctx_len: int = 256
    """Tokens per window (context length of each forward pass)."""

    prepend_bos: bool = False
    """Start every window with the BOS token (then ctx_len - 1 corpus tokens follow)."""

    shuffle: bool = True
    """Visit documents in a random order drawn from seed (else in dataset order)."""

    n_tokens: int = 200_000
    """Token positions (rows) collected from the training split."""

    n_eval_tokens: int = 20_000
    """Token positions collected from the held-out split (0: none)."""

    eval_fraction: float = 0.1
    """Share of documents held out, for corpora other than "austen" (hash rule)."""

    batch_size: int = 8
    """Windows per forward pass."""

    dtype: DTypeOption = "auto"
    """Precision of the subject and of the stored rows; auto: float32 on CPU, bfloat16 on GPU."""

    device: str = "auto"
    """Device of the subject: auto (a GPU when present, else the CPU), cpu, cuda, cuda:1, ..."""

    seed: int = 0
    """Seed of the document order and of the held-out hash rule."""

    rows_per_shard: int = 16_384
    """Rows per shard file (the writer buffers one shard in memory)."""

    def __post_init__(self) -> None:
        def positive(name: str, minimum: int = 1) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, not {value!r}")

        positive("ctx_len", 2 if self.prepend_bos else 1)
        positive("n_tokens")
        positive("n_eval_tokens", 0)
        positive("batch_size")
        positive("rows_per_shard")
        if self.kind not in ("transcoder", "sae"):
            raise ValueError(f"kind must be 'transcoder' or 'sae', not {self.kind!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(
                f"dtype must be auto, float32, bfloat16 or float16, not {self.dtype!r}"
            )
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), not {self.eval_fraction!r}")
        if not self.hookpoint:
            raise ValueError("hookpoint is empty")
