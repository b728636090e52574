"""The explainer's prompt: a system message with the instructions, then one user message listing
the latent's examples with the activating tokens wrapped ``<<like this>>`` and an
``Activations:`` line per example (the highlighted tokens with their 0-9 activation digits).

Adapted from EleutherAI delphi's default explainer prompt: three short demonstrations come
first as earlier chat turns (delphi has optional few-shot examples too), and one short phrase
is asked for, which a 0.5B explainer follows better than delphi's ``[EXPLANATION]:`` trailer.
The latent's own examples, rendered (the last user message)::

    Example 1: the <<cat>> sat on the<< mat>>
    Activations: ("cat", 9), (" mat", 4)

    Example 2: ...
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from nlrw.backends.base import Message
from nlrw.prompts.markup import escape

__all__ = ["PROMPT_HASH", "SYSTEM", "USER", "render_chat", "render_example"]

SYSTEM = (
    "You explain what a feature of a language model detects. You see text examples in which "
    "the tokens where the feature fires are marked <<like this>>; after each example, the "
    "marked tokens are listed with how strongly the feature fires on them, from 0 to 9.\n"
    "\n"
    "Reply with one short phrase that names the words, or the kind of words, that are marked, "
    'and their context when it matters. Quote marked words that repeat, like "had". Do not '
    "mention the markers, the examples or the numbers."
)

USER = "{examples}\n\nWhat does the feature detect? Answer with one short phrase."

EXAMPLE = "Example {index}: {text}\nActivations: {activations}"

FEW_SHOT: tuple[tuple[tuple[tuple[str, tuple[tuple[str, int], ...]], ...], str], ...] = (
    (
        (
            ("for i in<< range>>(10):", ((" range", 9),)),
            ("total = sum(x for x in<< range>>(n))", ((" range", 8),)),
            ("for k in<< range>>(len(items)):", ((" range", 9),)),
        ),
        'The word "range"',
    ),
    (
        (
            ("he was born in<< 1815>> near", ((" 1815", 9),)),
            ("the census of<< 1901>> counted", ((" 1901", 7),)),
            ("prices fell after<< 2008>>, and", ((" 2008", 8),)),
        ),
        "Four-digit years",
    ),
    (
        (
            ("the dog<< barked>> at the gate", ((" barked", 9),)),
            ("a fox<< barked>> twice<< and>> ran", ((" barked", 8), (" and", 2))),
            ("no dog ever<< barks>> here", ((" barks", 7),)),
        ),
        'The word "barked" and other forms of "bark"',
    ),
)
"""Three demonstrations (examples, answer), shown as earlier turns of the chat: a 0.5B
explainer without them echoes the instructions ("The marked tokens share a pattern…"). Their
topics (code, years, dogs) are far from the demo's novels on purpose: a small explainer copies
demonstrations that could plausibly fit ("past participles after 'had'" for every latent)."""

PROMPT_HASH = hashlib.sha256(
    # A copied demonstration is retried with FEW_SHOT rotated (nlrw.explain.copied_word,
    # render_chat): part of the prompt, so part of the hash.
    "\x00".join([SYSTEM, USER, EXAMPLE, repr(FEW_SHOT), "copies retried, rotated"]).encode()
).hexdigest()[:16]


def render_example(index: int, text: str, activations: Sequence[tuple[str, int]]) -> str:
    """One example: its (already highlighted) text and its ``("token", digit)`` pairs.

    ``text`` must already have newlines escaped (:func:`nlrw.prompts.markup.escape`); tokens
    in the pairs are escaped the same way and written between double quotes.
    """
    pairs = ", ".join(f'("{escape(tok)}", {digit})' for tok, digit in activations)
    return EXAMPLE.format(index=index, text=text, activations=pairs or "(none)")


def _user(examples: Sequence[str]) -> Message:
    return {"role": "user", "content": USER.format(examples="\n\n".join(examples))}


def render_chat(examples: Sequence[str], rotation: int = 0) -> list[Message]:
    """The explainer chat for rendered examples (see :func:`render_example`): the system
    message, the :data:`FEW_SHOT` demonstrations as user/assistant turns, then the latent's
    examples.

    ``rotation`` r shows the demonstrations starting from the r-th (cyclically): a retry after
    a reply that copied a demonstration puts another one last, next to the latent's examples,
    where a small explainer copies from.
    """
    chat: list[Message] = [{"role": "system", "content": SYSTEM}]
    r = rotation % len(FEW_SHOT)
    for shots, answer in FEW_SHOT[r:] + FEW_SHOT[:r]:
        shown = [render_example(i + 1, t, a) for i, (t, a) in enumerate(shots)]
        chat += [_user(shown), {"role": "assistant", "content": answer}]
    chat.append(_user(examples))
    return chat
