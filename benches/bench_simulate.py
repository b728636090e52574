"""Simulation prompts through the transformers backend's engines (Qwen2.5-Coder-0.5B).

``answer_distribution_ids`` on realistic simulation prompts built with ``split_encode``:

* **latent-first** layout (the default): prefix = simulator system prompt + three few-shot
  exchanges + the latent's explanation (~250 tokens), suffix = a 32-token window of text with
  its last token marked + the question + the answer prefix ``"Rating: "`` (~50 tokens);
  ``latents x contexts`` prompts, each prefix shared by ``contexts`` prompts.
* **context-first** layout: prefix = system + few-shot + the marked window, suffix = the
  explanation + the question; each prefix shared by all latents of a context. Timed with as
  many prompts per prefix as the latent-first prompts (``latents`` contexts x ``contexts``
  latents), so the two layouts compare at equal sharing.

Timed in float32: ``"single"`` (one forward per whole prompt: the baseline), ``"padded"``
(left-padded batches of whole prompts, no sharing) and ``"shared-prefix"``; then
``"shared-prefix"`` in bfloat16, and the context-first layout with ``"shared-prefix"`` in
float32. ``"single"`` and ``"padded"`` run every 8th / 4th of the same prompts: they share nothing,
so their prompts/s does not depend on the others (the ``ratio`` compares seconds for all the
prompts at each measured rate). The variants are timed in interleaved rounds (median of 2):
the 2 cores are shared, and a slow spell should hit every variant alike; ``cpu_time_ratio``
is the same ratio from process CPU time, steadier when other jobs compete. Also reported: the
largest expected-digit difference between engines (float rounding) and bf16 vs f32.

The speed-up of sharing is bounded by the tokens each prompt runs, ``S + P / n`` instead of
``P + S`` (P prefix, S suffix tokens, n prompts per prefix; ``token_bound_ratio``): ~5.3x for
the default P=262, S=56, n=64 contexts per explanation, ~5.7x (``(P + S) / S``) for the
hundreds or thousands of contexts per latent of a real run (the demo: 300, the paper: 1,000).
With n=16 (this bench until 2026-11-25) the bound was 4.4x and the ratio 4.5-4.7x: the shape,
not the engine, capped it. On this project's CPU a lone prompt also runs fewer tokens/s than a
batch, so the measured ratio against ``"single"`` exceeds that bound; against ``"padded"`` it
comes close to it.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from common import result
from nlrw.backends.base import SplitPrompt, answer_token_ids, split_encode
from nlrw.backends.transformers import Engine, TransformersBackend

MODEL = "qwen2.5-coder-0.5b"
MARK = "<<<SPLIT>>>"
ANSWER_PREFIX = "Rating: "
DIGITS = [str(d) for d in range(10)]

SYSTEM = (
    "You are a meticulous AI researcher simulating one neuron of a language model. You will "
    "see an explanation of what the neuron detects, then a short excerpt of text whose last "
    "token is marked <<like this>>. Predict how strongly the neuron fires on the marked token, "
    "on a scale from 0 (it does not fire at all) to 9 (it fires as strongly as it ever does). "
    "Most tokens do not activate a given neuron: 0 is the most common answer."
)
SHOTS = [
    (
        "words about rain and storms",
        "the clouds gathered and a cold <<rain>>",
        8,
    ),
    (
        "words about rain and storms",
        "she opened the letter, read it twice, and <<smiled>>",
        0,
    ),
    (
        "closing brackets in code",
        "for item in items: total += len(item<<)>>",
        9,
    ),
]
QUESTION = "How strongly does the neuron fire on the marked token?"
EXPLANATIONS = [
    "formal words about marriage, engagements and suitors in nineteenth-century prose",
    "the end of a sentence of dialogue: closing quotation marks and the punctuation before them",
    "names of women, especially after a title such as Miss or Mrs",
    "words expressing strong emotion, mostly surprise, delight or indignation",
    "the word 'the' before a noun describing a place or a building",
    "verbs of speech such as said, replied, cried and observed",
    "money, income and fortune, often with a sum per year",
    "commas that separate clauses in long sentences",
    "words about walking, visiting and travelling between houses",
    "the pronoun 'she' and other references to a woman as the subject",
    "adjectives of approval such as amiable, agreeable and handsome",
    "the first word after a full stop, starting a new sentence",
    "family relations: sister, mother, daughter, cousin",
    "words about time of day and seasons: morning, evening, winter",
    "negations such as not, never and no",
    "abstract nouns about character and conduct: pride, prejudice, sense",
    "the possessive 's and the word 'of' linking an owner to a thing",
    "titles before surnames: Mr., Mrs., Miss, Sir, Lady",
    "place names of estates and towns, such as Netherfield or Longbourn",
    "words about dancing, balls and assemblies",
    "the start of a quotation: an opening quotation mark",
    "modal verbs of obligation: must, ought, should",
    "words about letters and writing: letter, note, wrote, read",
    "numbers and quantities written as words",
    "comparatives and superlatives: more, most, better, best",
    "semicolons and colons in narrative prose",
    "words about health and illness: cold, fever, unwell",
    "the conjunction 'that' introducing a clause",
    "words of politeness: pray, madam, sir, beg",
    "verbs of thinking and believing: suppose, imagine, think",
    "servants and household staff: housekeeper, butler, servants",
    "questions: words at or near a question mark",
]
PASSAGE = (
    "It is a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a wife. However little known the feelings or views of such a "
    "man may be on his first entering a neighbourhood, this truth is so well fixed in the minds "
    "of the surrounding families, that he is considered the rightful property of some one or "
    'other of their daughters. "My dear Mr. Bennet," said his lady to him one day, "have you '
    'heard that Netherfield Park is let at last?" Mr. Bennet replied that he had not. "But it '
    'is," returned she; "for Mrs. Long has just been here, and she told me all about it." Mr. '
    'Bennet made no answer. "Do you not want to know who has taken it?" cried his wife '
    'impatiently. "You want to tell me, and I have no objection to hearing it." This was '
    'invitation enough. "Why, my dear, you must know, Mrs. Long says that Netherfield is '
    "taken by a young man of large fortune from the north of England; that he came down on "
    "Monday in a chaise and four to see the place, and was so much delighted with it, that he "
    "agreed with Mr. Morris immediately; that he is to take possession before Michaelmas, and "
    'some of his servants are to be in the house by the end of next week."'
)


def _windows(tokenizer: Any, n: int, width: int = 32) -> list[str]:
    """n texts of ``width`` tokens from the passage, the last token marked ``<<like this>>``."""
    ids = tokenizer(PASSAGE, add_special_tokens=False)["input_ids"]
    step = max(1, (len(ids) - width) // max(1, n))
    out = []
    for i in range(n):
        w = ids[i * step : i * step + width]
        head, last = tokenizer.decode(w[:-1]), tokenizer.decode(w[-1:])
        out.append(f"{head}<<{last.strip()}>>" if last.strip() else f"{head}<<{last}>>")
    return out


def _shots() -> list[dict[str, str]]:
    chat = [{"role": "system", "content": SYSTEM}]
    for explanation, text, rating in SHOTS:
        chat.append(
            {
                "role": "user",
                "content": f"Explanation: {explanation}.\nText: {text}\n{QUESTION}",
            }
        )
        chat.append({"role": "assistant", "content": f"{ANSWER_PREFIX}{rating}"})
    return chat


def latent_first(tokenizer: Any, latents: int, contexts: int) -> list[SplitPrompt]:
    """Prefix: system + few-shot + explanation; suffix: marked window + question."""
    texts = _windows(tokenizer, contexts)
    return [
        split_encode(
            tokenizer,
            [
                *_shots(),
                {
                    "role": "user",
                    "content": f"Explanation: {explanation}.\n{MARK}Text: {text}\n{QUESTION}",
                },
            ],
            MARK,
            ANSWER_PREFIX,
        )
        for explanation in EXPLANATIONS[:latents]
        for text in texts
    ]


def context_first(tokenizer: Any, contexts: int, latents: int) -> list[SplitPrompt]:
    """Prefix: system + few-shot + marked window; suffix: explanation + question."""
    texts = _windows(tokenizer, contexts)
    return [
        split_encode(
            tokenizer,
            [
                *_shots(),
                {
                    "role": "user",
                    "content": f"Text: {text}\n{MARK}Explanation: {explanation}.\n{QUESTION}",
                },
            ],
            MARK,
            ANSWER_PREFIX,
        )
        for text in texts
        for explanation in EXPLANATIONS[:latents]
    ]


class _Timer:
    """Median wall and CPU (process) times of several variants, timed in interleaved rounds:
    the machine is shared, so a slow spell hits every variant, not just one."""

    def __init__(self) -> None:
        self.wall: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}

    def time(self, name: str, fn: Callable[[], Any]) -> None:
        gc.collect()
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        self.wall.setdefault(name, []).append(time.perf_counter() - wall)
        self.cpu.setdefault(name, []).append(time.process_time() - cpu)

    def median(self, name: str, cpu: bool = False) -> float:
        return statistics.median((self.cpu if cpu else self.wall)[name])


def _ev(probs: np.ndarray) -> np.ndarray:
    return (probs / probs.sum(1, keepdims=True)) @ np.arange(probs.shape[1])


def run(quick: bool) -> list[dict[str, Any]]:
    torch.set_num_threads(2)
    latents, contexts = (2, 4) if quick else (2, 64)
    rounds = 1 if quick else 2
    batch_size = 16
    f32 = TransformersBackend(MODEL, dtype="float32", engine_batch_size=batch_size)
    bf16 = TransformersBackend(MODEL, dtype="bfloat16", engine_batch_size=batch_size)
    tok = f32.tokenizer
    ids = answer_token_ids(tok, DIGITS, prefix=ANSWER_PREFIX)
    prompts = latent_first(tok, latents, contexts)
    # "single" and "padded" run each prompt (batch) without sharing: their prompts/s does not
    # depend on how many prompts share a prefix, so they are timed on every 8th / 4th prompt.
    lone, subset = prompts[::8], prompts[::4]
    # Context-first with as many prompts per prefix as latent-first: latents <-> contexts.
    cf = context_first(tok, latents, contexts)
    prefix_len = float(np.mean([len(p.prefix) for p in prompts]))
    suffix_len = float(np.mean([len(p.suffix) for p in prompts]))
    cf_prefix = float(np.mean([len(p.prefix) for p in cf]))
    cf_suffix = float(np.mean([len(p.suffix) for p in cf]))
    probs: dict[str, np.ndarray] = {}

    def variant(
        name: str, backend: TransformersBackend, engine: Engine, ps: list[SplitPrompt]
    ) -> tuple[str, Callable[[], None], int]:
        def fn() -> None:
            probs[name] = backend.answer_distribution_ids(ps, ids, engine=engine).probs

        return name, fn, len(ps)

    variants = [
        variant("shared", f32, "shared-prefix", prompts),
        variant("single", f32, "single", lone),
        variant("padded", f32, "padded", subset),
        variant("bf16", bf16, "shared-prefix", prompts),
        variant("context_first", f32, "shared-prefix", cf),
    ]
    for engine in ("single", "padded", "shared-prefix"):  # warm up every path on 1 prompt
        f32.answer_distribution_ids(prompts[:1], ids, engine=engine)
    bf16.answer_distribution_ids(prompts[:1], ids)
    timer = _Timer()
    for _ in range(rounds):
        for name, fn, _n in variants:
            timer.time(name, fn)
    f32.close()
    bf16.close()

    count = {name: n for name, _fn, n in variants}
    rate = {name: round(count[name] / timer.median(name), 3) for name in count}
    cpu_rate = {name: round(count[name] / timer.median(name, cpu=True), 3) for name in count}
    # Seconds for all latent-first prompts at each variant's measured rate.
    secs = {name: len(prompts) / (count[name] / timer.median(name)) for name in count}
    ev_diff = float(np.abs(_ev(probs["shared"][::8]) - _ev(probs["single"])).max())
    ev_padded = float(np.abs(_ev(probs["padded"]) - _ev(probs["shared"][::4])).max())
    ev_bf16 = float(np.abs(_ev(probs["bf16"]) - _ev(probs["shared"])).max())
    shape = (
        f"{latents} latents x {contexts} contexts, prefix {prefix_len:.0f} + suffix "
        f"{suffix_len:.0f} tokens"
    )
    bound = (prefix_len + suffix_len) / (suffix_len + prefix_len / contexts)
    note = (
        f"single timed on {len(lone)}, padded on {len(subset)} of the {len(prompts)} prompts "
        "(every 8th / 4th)"
    )
    return [
        result(
            "simulate",
            secs["shared"],
            "one forward per prompt (single), f32",
            secs["single"],
            target=5.0,
            shape=shape,
            dtype="float32",
            batch_size=batch_size,
            note=note,
            shared_prefix_prompts_per_s=rate["shared"],
            single_prompts_per_s=rate["single"],
            padded_prompts_per_s=rate["padded"],
            cpu_time_ratio=round(cpu_rate["shared"] / cpu_rate["single"], 2),
            token_bound_ratio=round(bound, 2),
            max_abs_ev_diff_vs_single=ev_diff,
        ),
        result(
            "simulate_vs_padded",
            secs["shared"],
            f"left-padded batches of {batch_size}, f32",
            secs["padded"],
            shape=shape,
            cpu_time_ratio=round(cpu_rate["shared"] / cpu_rate["padded"], 2),
            max_abs_ev_diff_padded_vs_shared=ev_padded,
        ),
        result(
            "simulate_bf16",
            secs["bf16"],
            "shared-prefix f32",
            secs["shared"],
            shape=shape,
            shared_prefix_bf16_prompts_per_s=rate["bf16"],
            ratio_vs_single_f32=round(rate["bf16"] / rate["single"], 2),
            max_abs_ev_diff_bf16_vs_f32=ev_bf16,
        ),
        result(
            "simulate_context_first",
            len(cf) / rate["context_first"],
            "latent-first single f32 (other prompts)",
            len(cf) / rate["single"],
            shape=(
                f"context-first: {latents} contexts x {contexts} latents, prefix "
                f"{cf_prefix:.0f} + suffix {cf_suffix:.0f} tokens"
            ),
            context_first_prompts_per_s=rate["context_first"],
            latent_first_prompts_per_s=rate["shared"],
        ),
    ]


if __name__ == "__main__":
    import sys

    for row in run(quick="--quick" in sys.argv):
        print(row)
