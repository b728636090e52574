"""The detection scorer's prompt: an explanation and ``k`` (default 5) plain-text examples; the
scorer says for each example whether the explanation applies.

Reading the answer: every example is read at its **own prefilled position**. For a group of
``k`` examples the same chat is sent ``k`` times, the assistant's answer prefilled with
``"Example {i}:"``, and the next-token probabilities of ``" Yes"`` and ``" No"`` are read (one
forward per (prompt, example), no sampling; the space form is chosen by
:func:`nlrw.backends.base.answer_token_ids`). The answers to the other examples are not in the
prefix, so each reading depends only on the shared context and the example's number.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from nlrw.backends.base import Message

__all__ = ["ANSWERS", "PROMPT_HASH", "SYSTEM", "USER", "answer_prefix", "render_chat"]

SYSTEM = (
    "You are an intelligent and meticulous linguistics researcher. You will be given a "
    'description of a feature of text, such as "male pronouns" or "text with negative '
    'sentiment", and several numbered text examples. For each example, decide whether the '
    "feature is present in it.\n"
    "\n"
    'Answer for every example in turn, one line each, as "Example N: Yes" if the feature is '
    'present in example N, or "Example N: No" if it is not. Write nothing else.'
)

USER = "Feature: {explanation}\n\n{examples}"

EXAMPLE = "Example {index}: {text}"

ANSWERS = ("Yes", "No")
"""The answer tokens read after the prefix; p(yes) = p(Yes) / (p(Yes) + p(No))."""

PROMPT_HASH = hashlib.sha256(
    "\x00".join([SYSTEM, USER, EXAMPLE, "Example {index}:", *ANSWERS]).encode()
).hexdigest()[:16]


def answer_prefix(index: int) -> str:
    """The prefilled answer for example ``index`` (1-based): ``"Example {index}:"``."""
    return f"Example {index}:"


def render_chat(explanation: str, texts: Sequence[str]) -> list[Message]:
    """The scorer chat for one group of example texts (newlines already escaped)."""
    examples = "\n".join(EXAMPLE.format(index=i + 1, text=t) for i, t in enumerate(texts))
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": USER.format(explanation=explanation, examples=examples)},
    ]
