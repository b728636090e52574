"""Options of the simulate stage (:mod:`nlrw.simulate`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from nlrw.prompts import simulation as prompt
from nlrw.prompts.simulation import Layout, Style

__all__ = ["EV", "READINGS", "Reading", "SimulateConfig", "parse_shard"]


EV = Literal["renormalized", "paper"]
Reading = Literal["expected", "context-centered", "quoted-word"]
READINGS: tuple[Reading, ...] = ("expected", "context-centered", "quoted-word")


@dataclass(frozen=True)
class SimulateConfig:
    """Options of the ``simulate`` stage (defaults: the paper's protocol, our simulator and
    reading of the answer)."""

    backend: Literal["transformers", "openai", "vllm"] = "transformers"
    """LLM backend of the simulator (see nlrw.backends)."""

    model: str = "qwen2.5-coder-0.5b"
    """Simulator model: an alias of the embedded default, a hub name, a local folder, or the
    served model's name for the openai backend."""

    base_url: str | None = None
    """API root of the OpenAI-compatible server (openai backend), e.g.
    http://127.0.0.1:8000/v1."""

    dtype: str = "auto"
    """Simulator weights' dtype (transformers backend): auto (bfloat16 on CUDA and on CPUs with
    native bf16, else float32), float32, bfloat16 or float16."""

    engine: Literal["shared-prefix", "padded", "single"] = "shared-prefix"
    """How the transformers backend runs the prompts: shared-prefix (each distinct prefix's KV
    cache computed once and reused by its suffixes), padded (batches of whole prompts) or
    single (one forward per prompt, the reference)."""

    batch_size: int = 16
    """Prompts (suffixes) per forward pass; the transformers backend lowers it to fit memory."""

    layout: Layout = "explanation-first"
    """Prompt layout: explanation-first (the prefix ends with the explanation, shared by all
    contexts of a latent) or context-first (the prefix ends with the context and the question,
    shared by every latent; the suffix is the explanation and the answer cue only) or
    all-at-once (transformers backend only: the window listed one token per line with a rating
    slot each, every token rated in one forward; the pair's rating is the last slot's, every
    position's goes to simulations_positions.parquet)."""

    prompt: Style = "nlrw"
    """Simulator prompt: nlrw (one text, "Rating: N") or paper (the authors' structure: a
    linguistics-researcher system prompt, several texts per few-shot message answered as
    Python lists, the digit read after a prefilled "[")."""

    ev: EV = "renormalized"
    """Expected value of the rating: renormalized (sum d p_d / sum p_d over the ten digits) or
    paper (sum d p_d, not renormalized, as the paper's code)."""

    reading: Reading = "expected"
    """How a pair's score is read from the ratings: expected (the expected digit E of the
    pair) or context-centered (E minus the mean E of every simulated latent on the same
    context, plus the mean over all pairs, clipped to [0, 9]: what the explanation adds to
    the simulator's prior on the text; expected_value_raw keeps E) or quoted-word ((E + 9 m) / 2,
    m = 1 when the marked token is a word the explanation quotes, else 0; E for an explanation
    that quotes none: the explanation's quoted tokens checked against the marked token, by the
    explain stage's consistency rule)."""

    shuffled_control: bool = False
    """Also simulate the shuffled-explanation control: each latent of a seeded subset rated
    with the explanation of another latent of the subset (a seeded derangement: never its
    own), written to simulations_shuffled.parquet; calibrated and evaluated like the real
    simulations (condition shuffled). Its gap to the real rewrite is what the explanations
    explain. Free: a prompt depends only on the explanation and the context, so the control
    re-uses its donors' real ratings."""

    shuffled_latents: int | None = None
    """How many simulated latents the shuffled control covers (a seeded subset, at least 2;
    None: all of them)."""

    max_latents: int | None = None
    """Simulate at most this many explained latents: the best by detection score when
    scores.parquet exists, else the lowest ids (None: every explained latent)."""

    latents: tuple[int, ...] = ()
    """Simulate exactly these latents (each must have a usable explanation), e.g. to compare
    two explanation methods on the same latents; empty: max_latents decides."""

    chunk_latents: int = 4
    """Latents per parquet part with the explanation-first and all-at-once layouts (a kill
    loses at most one part)."""

    chunk_contexts: int = 16
    """Contexts per parquet part with the context-first layout (each part rates every latent
    on its contexts, so a context's prefix serves them all)."""

    missing_explanations: Literal["exclude", "error"] = "exclude"
    """Latents without a usable explanation (failed or skipped by explain): exclude them and
    report them in simulate.json, or stop with an error naming them."""

    min_digit_mass: float = 0.5
    """Warn about a latent whose median digit mass (probability of the ten digit tokens) is
    below this: the simulator is not answering in the expected format."""

    shard: str | None = None
    """Run only shard "i/n" (0-based i) of the chunks: n shards together write the parts of
    one run; the last to finish merges them (None: all chunks)."""

    seed: int = 0
    """Recorded for provenance: the stage draws nothing at random (answers are read, not
    sampled)."""

    progress: bool = True
    """Show a progress bar (prompts/s and ETA)."""

    backend_options: tuple[tuple[str, str], ...] = ()
    """Extra keyword options for the backend's constructor, as (name, value) pairs."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "chunk_latents", "chunk_contexts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.shuffled_latents is not None and self.shuffled_latents < 2:
            raise ValueError(
                f"simulate.shuffled_latents must be at least 2 (a derangement needs two "
                f"latents), got {self.shuffled_latents}"
            )
        if len(set(self.latents)) != len(self.latents) or any(lat < 0 for lat in self.latents):
            raise ValueError(
                f"simulate.latents must be distinct non-negative latent ids, got {self.latents}"
            )
        if self.max_latents is not None and self.max_latents < 0:
            raise ValueError(f"max_latents must be non-negative, got {self.max_latents}")
        if self.layout not in prompt.LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}: expected one of {prompt.LAYOUTS}")
        if self.prompt not in prompt.STYLES:
            raise ValueError(
                f"unknown simulate.prompt {self.prompt!r}: expected one of {prompt.STYLES}"
            )
        if self.reading not in READINGS:
            raise ValueError(
                f"unknown simulate.reading {self.reading!r}: expected one of {list(READINGS)}"
            )
        if self.ev not in ("renormalized", "paper"):
            raise ValueError(f"unknown ev {self.ev!r}: expected 'renormalized' or 'paper'")
        if self.missing_explanations not in ("exclude", "error"):
            raise ValueError(
                f"missing_explanations must be 'exclude' or 'error', not "
                f"{self.missing_explanations!r}"
            )
        if not 0.0 <= self.min_digit_mass <= 1.0:
            raise ValueError(f"min_digit_mass must be in [0, 1], got {self.min_digit_mass}")
        if self.layout == "all-at-once" and self.backend != "transformers":
            raise ValueError(
                f"simulate.layout = 'all-at-once' needs the transformers backend (it reads the "
                f"digits at every rating slot of one forward), not {self.backend!r}"
            )
        if self.layout == "all-at-once" and self.prompt != "nlrw":
            raise ValueError(
                "simulate.layout = 'all-at-once' has its own prompt: use simulate.prompt = "
                f"'nlrw' with it, not {self.prompt!r}"
            )
        if self.backend == "openai" and not self.base_url:
            raise ValueError("the openai backend needs base_url (the server's API root)")
        if self.shard is not None:
            parse_shard(self.shard)


_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(shard: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``."""
    m = _SHARD.match(shard)
    if m is None:
        raise ValueError(f"shard must look like 'i/n' (e.g. '0/4'), got {shard!r}")
    i, n = int(m[1]), int(m[2])
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard {shard!r}: need n >= 1 and 0 <= i < n (i is 0-based)")
    return i, n
