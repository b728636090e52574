"""The explainer's prompt: a system message with the instructions, then one user message listing
the latent's examples with the activating tokens wrapped ``<<like this>>`` and an
``Activations:`` line per example (the highlighted tokens with their 0-9 activation digits).

Adapted from EleutherAI delphi's default explainer prompt (no few-shot examples, and one
sentence asked for, which a 0.5B explainer follows better than delphi's ``[EXPLANATION]:``
trailer). Rendered text for a two-example latent::

    Example 1: the <<cat>> sat on the<< mat>>
    Activations: ("cat", 9), (" mat", 4)

    Example 2: ...
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from nlrw.backends.base import Message

__all__ = ["PROMPT_HASH", "SYSTEM", "USER", "escape", "render_chat", "render_example"]

SYSTEM = (
    "You are a meticulous AI researcher investigating patterns in language. You will be given "
    "text examples in which some tokens are marked between delimiters <<like this>>; "
    "consecutive marked tokens are joined into one span <<just like this>>. After each example, "
    "the marked tokens are listed with how strongly they activate the pattern, from 0 to 9.\n"
    "\n"
    "- Describe, in one short sentence, what the marked tokens have in common and the context "
    "in which they appear.\n"
    "- Summarize the pattern; do not list examples or several alternatives.\n"
    "- Do not mention the delimiters << >> in your explanation.\n"
    "- Answer with the sentence only."
)

USER = "{examples}\n\nWhat pattern do the marked tokens share? Answer in one sentence."

EXAMPLE = "Example {index}: {text}\nActivations: {activations}"

PROMPT_HASH = hashlib.sha256("\x00".join([SYSTEM, USER, EXAMPLE]).encode()).hexdigest()[:16]


def escape(text: str) -> str:
    """Newlines, tabs and other control characters written as escapes (``\\n``), so an example
    stays on its line of the prompt."""
    return "".join(
        ch if ch.isprintable() or ch == " " else ch.encode("unicode_escape").decode("ascii")
        for ch in text
    )


def render_example(index: int, text: str, activations: Sequence[tuple[str, int]]) -> str:
    """One example: its (already highlighted) text and its ``("token", digit)`` pairs.

    ``text`` must already have newlines escaped (:func:`escape`); tokens in the pairs are
    escaped the same way and written between double quotes.
    """
    pairs = ", ".join(f'("{escape(tok)}", {digit})' for tok, digit in activations)
    return EXAMPLE.format(index=index, text=text, activations=pairs or "(none)")


def render_chat(examples: Sequence[str]) -> list[Message]:
    """The explainer chat for rendered examples (see :func:`render_example`)."""
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": USER.format(examples="\n\n".join(examples))},
    ]
