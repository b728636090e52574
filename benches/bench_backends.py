"""The transformers backend with the embedded Qwen simulator: batched vs one prompt at a time.

* ``backend_score``: ``answer_distribution`` over ~300-token rating prompts, batches of 8
  (left-padded, one forward per batch, logits of the last position only) vs a loop of
  single-prompt calls, on the same model object.
* ``backend_explain``: ``generate`` of 32 greedy tokens for 4 chats, one batch vs a loop.

Both run in the backend's default dtype (``"auto"``: bfloat16 on a CPU with native bf16).
"""

from __future__ import annotations

from typing import Any

import torch

from common import median_time, result
from nlrw.backends.transformers import TransformersBackend

DIGITS = [str(d) for d in range(10)]
_SYSTEM = (
    "You are a meticulous AI researcher conducting an important investigation into a neuron "
    "of a language model. You will see an explanation of what the neuron detects and a text "
    "excerpt whose last token is marked <<like this>>. Rate how strongly the neuron fires on "
    "the marked token, from 0 (not at all) to 9 (as strongly as it ever fires). Answer with "
    "a single digit."
)
_PASSAGE = (
    "It is a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a wife. However little known the feelings or views of such a "
    "man may be on his first entering a neighbourhood, this truth is so well fixed in the "
    "minds of the surrounding families, that he is considered the rightful property of some "
    "one or other of their daughters. My dear Mr. Bennet, said his lady to him one day, have "
    "you heard that Netherfield Park is let at last?"
)


def _chats(n: int) -> list[list[dict[str, str]]]:
    """n rating prompts of ~300 tokens each, different texts (offsets into the passage)."""
    out = []
    for i in range(n):
        words = (_PASSAGE.split() * 3)[i % 7 : i % 7 + 140 + i % 5]
        words[-1] = f"<<{words[-1]}>>"
        out.append(
            [
                {"role": "system", "content": _SYSTEM},
                {
                    "role": "user",
                    "content": "Neuron explanation: words about marriage, wives and "
                    f"husbands, especially in formal prose.\nText: {' '.join(words)}",
                },
            ]
        )
    return out


def run(quick: bool) -> list[dict[str, Any]]:
    torch.set_num_threads(2)
    backend = TransformersBackend("qwen2.5-coder-0.5b", batch_size=8)
    rows = []

    chats = _chats(8 if quick else 16)
    n_tokens = sum(len(backend._encode([c], "Rating: ")[0]) for c in chats) / len(chats)

    def score(batch_size: int) -> None:
        backend.batch_size = batch_size
        backend.answer_distribution(chats, "Rating: ", DIGITS)

    repeats = 1 if quick else 3
    ours = median_time(lambda: score(8), repeats=repeats)
    base = median_time(lambda: score(1), repeats=repeats)
    rows.append(
        result(
            "backend_score",
            ours,
            "answer_distribution, 1 prompt/forward",
            base,
            prompts=len(chats),
            mean_prompt_tokens=round(n_tokens, 1),
            dtype=str(backend.dtype),
            prompts_per_s=round(len(chats) / ours, 2),
            baseline_prompts_per_s=round(len(chats) / base, 2),
        )
    )

    explain = [
        [{"role": "user", "content": f"Explain in detail how {topic} works."}]
        for topic in ["a hash map", "garbage collection", "a B-tree", "TCP congestion control"]
    ]
    new_tokens = 16 if quick else 32
    counts: dict[int, int] = {}

    def gen(batch_size: int) -> None:
        backend.batch_size = batch_size
        out = backend.generate(explain, max_new_tokens=new_tokens)
        counts[batch_size] = sum(g.completion_tokens for g in out)

    ours = median_time(lambda: gen(4), repeats=repeats)
    base = median_time(lambda: gen(1), repeats=repeats)
    rows.append(
        result(
            "backend_explain",
            ours,
            "generate, 1 chat at a time",
            base,
            chats=len(explain),
            max_new_tokens=new_tokens,
            dtype=str(backend.dtype),
            tokens_per_s=round(counts[4] / ours, 2),
            baseline_tokens_per_s=round(counts[1] / base, 2),
        )
    )
    backend.close()
    return rows


if __name__ == "__main__":
    import sys

    for row in run(quick="--quick" in sys.argv):
        print(row)
