"""The explainer's prompts: a system message with the instructions, three demonstrations as
earlier chat turns, then one user message listing the latent's examples with the activating
tokens wrapped ``<<like this>>``, an ``Activations:`` line per example (the highlighted tokens
with their 0-9 activation digits, as EleutherAI delphi's explainer lists them) and one
``Top tokens:`` line, the tally of each example's most strongly marked token.

Adapted from delphi's default explainer prompt (delphi has optional few-shot examples too);
one short phrase is asked for, which a 0.5B explainer follows better than delphi's
``[EXPLANATION]:`` trailer. The latent's own examples, rendered (the last user message)::

    Example 1: the <<cat>> sat on the<< mat>>
    Activations: (" cat", 9), (" mat", 4)

    Example 2: ...

    Top tokens: " cat" 5 times, " dog" 2 times, " mat" once

**Why the tally.** On the demo the 0.5B explainer named one quoted word that the examples
mostly did not mark (``The word "had"`` for a latent whose top tokens were " separation",
" gave", " than", …): the system message's own illustration was ``like "had"`` (gone), two of
the three demonstrations answered ``The word "…"`` about examples that all marked one word, and
nothing in the prompt said how often each word is marked. The ``Top tokens:`` line says it in
one place (the same per-example top token :func:`nlrw.explain.consistency` checks the answer
against), the instructions quote a word only when most examples mark it, and the
demonstrations include a category whose marked words all differ.

**Two prompts** (``style``, ``--explain.prompt``): ``"nlrw"`` (above) and ``"single-word"``,
which adds :data:`WORD_SHOT`, a fourth demonstration whose examples all mark one common word
(answered ``The word "return"``), and tells the explainer to answer ``The word "WORD"`` when
most examples mark the same word (:data:`SINGLE_WORD_SYSTEM`). **Why:** on a token-like layer
(layer 0 of the demo's subject) most latents fire on one function word, and the ``"nlrw"``
prompt, whose one quoted-word demonstration is a content word in code, got a generic phrase for
them: ``" no"`` 8 of 8 → "Words that are not numbers", ``" all"`` → "All words in the text",
``" in"`` → "Numbers in sentences". On 16 latents of that layer outside the demo's sample
(explained from the training cache, no evaluation context read), mean consistency (generic
answers counted 0) went from 0.27 to 0.66 (``tools/explain_prompt_selection.py``).

**Contrastive** (:func:`render_contrastive_chat`, ``--explain.method contrastive``): after the
examples, near-miss texts where the feature fires nowhere (same words, or what similar
features fire on), written plainly as ``Counter-example N: …``; the question asks what sets
the marked tokens apart from them. Same reply format, same demonstrations' topics.

:data:`PROMPT_HASH` covers both prompts (the stage's hash counts it).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from typing import Literal

from nlrw.backends.base import Message
from nlrw.prompts.markup import escape

__all__ = [
    "CONTRASTIVE_FEW_SHOT",
    "CONTRASTIVE_SYSTEM",
    "CONTRASTIVE_USER",
    "PROMPT_HASH",
    "SINGLE_WORD_SYSTEM",
    "STYLES",
    "SYSTEM",
    "USER",
    "WORD_SHOT",
    "prompt_hash",
    "render_chat",
    "render_contrastive_chat",
    "render_counter_example",
    "render_example",
    "render_top_tokens",
]

SYSTEM = (
    "You explain what a feature of a language model detects. You see text examples in which "
    "the tokens where the feature fires are marked <<like this>>; after each example, the "
    "marked tokens are listed with how strongly the feature fires on them, from 0 to 9, and "
    "the last line counts the most strongly marked token of each example.\n"
    "\n"
    "Reply with one short phrase that names the words, or the kind of words, that are marked, "
    "and their context when it matters. Quote a word only when most examples mark it; when the "
    "marked words differ, say what they have in common. Do not mention the markers, the "
    "examples or the numbers."
)

USER = "{examples}\n\n{top}What does the feature detect? Answer with one short phrase."

EXAMPLE = "Example {index}: {text}\nActivations: {activations}"

TOP_TOKENS = "Top tokens: {tally}\n\n"

TOP_TOKENS_SHOWN = 10
"""The tally lists this many distinct tokens at most, then how many examples are left."""

Shot = tuple[tuple[tuple[str, tuple[tuple[str, int], ...]], ...], str]

FEW_SHOT: tuple[Shot, ...] = (
    (
        (
            ("for i in<< range>>(10):", ((" range", 9),)),
            ("total = sum(x for x in<< range>>(n))", ((" range", 8),)),
            ("for k in<< range>>(len(items)):", ((" range", 9),)),
        ),
        'The word "range" in Python loops',
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
            ("add 5<< grams>> of salt", ((" grams", 9),)),
            ("heat it to 200<< degrees>> first<< and>> wait", ((" degrees", 8), (" and", 2))),
            ("a 3<< km>> walk to the lake", ((" km", 7),)),
        ),
        "Units of measurement after a number",
    ),
)
"""Three demonstrations (examples, answer), shown as earlier turns of the chat: a 0.5B
explainer without them echoes the instructions ("The marked tokens share a pattern…"). Their
topics (code, years, units) are far from the demo's novels on purpose: a small explainer copies
demonstrations that could plausibly fit ("past participles after 'had'" for every latent).
Two of them mark a different word in every example, so the answer names a kind of word."""

Style = Literal["nlrw", "single-word"]
STYLES: tuple[Style, ...] = ("nlrw", "single-word")

SINGLE_WORD_SYSTEM = SYSTEM.replace(
    "Quote a word only when most examples mark it;",
    'When most examples mark the same word, answer: The word "WORD";',
)
"""The ``"single-word"`` prompt's system message: the quoted-word form spelled out."""

WORD_SHOT: Shot = (
    (
        ("def f(x):<< return>> x + 1", ((" return", 9),)),
        ("if done:<< return>> None", ((" return", 8),)),
        ("else:<< return>> total", ((" return", 9),)),
    ),
    'The word "return"',
)
"""The ``"single-word"`` prompt's fourth demonstration, shown first: one common word marked in
every example, answered with that word alone (code, like the others, so a novel's examples
cannot be mistaken for it; a reply that quotes "return" without the examples marking it is a
copy and is retried)."""

CONTRASTIVE_SYSTEM = (
    "You explain what a feature of a language model detects. You see text examples in which "
    "the tokens where the feature fires are marked <<like this>>; after each example, the "
    "marked tokens are listed with how strongly the feature fires on them, from 0 to 9, and a "
    "line counts the most strongly marked token of each example. Then you see counter-examples: "
    "similar texts, often with the same words, where the feature does not fire at all.\n"
    "\n"
    "Reply with one short phrase that says what the marked tokens have that the "
    "counter-examples lack: the words, the kind of words, or the context that matters. Quote a "
    "word only when most examples mark it. Do not mention the markers, the examples, the "
    "counter-examples or the numbers."
)

CONTRASTIVE_USER = (
    "{examples}\n\n{top}The feature does not fire anywhere in these texts:\n\n{counter}\n\n"
    "What sets the marked tokens apart from the texts where the feature does not fire? "
    "Answer with one short phrase."
)

COUNTER_EXAMPLE = "Counter-example {index}: {text}"

ContrastiveShot = tuple[tuple[tuple[str, tuple[tuple[str, int], ...]], ...], tuple[str, ...], str]

CONTRASTIVE_FEW_SHOT: tuple[ContrastiveShot, ...] = (
    (
        FEW_SHOT[0][0],
        ("the range of values is wide", "a mountain range to the north"),
        'The word "range" in Python for-loops',
    ),
    (
        FEW_SHOT[1][0],
        ("call 1815 for the desk", "order number 2008 was lost"),
        "Four-digit numbers that are years",
    ),
    (
        FEW_SHOT[2][0],
        ("weigh it in grams or ounces", "a few degrees of freedom"),
        "Units of measurement right after a number",
    ),
)
"""The demonstrations of :data:`FEW_SHOT` with counter-examples (the same word where it means
something else) and an answer that says what the counter-examples lack."""

CONTRASTIVE_SINGLE_WORD_SYSTEM = CONTRASTIVE_SYSTEM.replace(
    "Quote a word only when most examples mark it.",
    'When most examples mark the same word, answer: The word "WORD".',
)
"""The contrastive ``"single-word"`` system message."""

CONTRASTIVE_WORD_SHOT: ContrastiveShot = (
    WORD_SHOT[0],
    ("def f(x): print(x + 1)", "if done: break"),
    WORD_SHOT[1],
)
""":data:`WORD_SHOT` with counter-examples that lack the word."""

PROMPT_HASH = hashlib.sha256(
    # A copied demonstration is retried with FEW_SHOT rotated (nlrw.explain.copied_word,
    # render_chat): part of the prompt, so part of the hash.
    "\x00".join(
        [
            SYSTEM,
            USER,
            EXAMPLE,
            TOP_TOKENS,
            str(TOP_TOKENS_SHOWN),
            repr(FEW_SHOT),
            "copies retried, rotated",
            CONTRASTIVE_SYSTEM,
            CONTRASTIVE_USER,
            COUNTER_EXAMPLE,
            repr(CONTRASTIVE_FEW_SHOT),
        ]
    ).encode()
).hexdigest()[:16]


SINGLE_WORD_HASH = hashlib.sha256(
    "\x00".join(
        [
            PROMPT_HASH,
            SINGLE_WORD_SYSTEM,
            repr(WORD_SHOT),
            CONTRASTIVE_SINGLE_WORD_SYSTEM,
            repr(CONTRASTIVE_WORD_SHOT),
        ]
    ).encode()
).hexdigest()[:16]


def prompt_hash(style: Style = "nlrw") -> str:
    """The hash of the ``style`` prompt (:data:`PROMPT_HASH` for ``"nlrw"``)."""
    if style == "nlrw":
        return PROMPT_HASH
    if style == "single-word":
        return SINGLE_WORD_HASH
    raise ValueError(f"unknown explain.prompt {style!r}: expected one of {list(STYLES)}")


def _shots(style: Style) -> tuple[str, tuple[Shot, ...]]:
    prompt_hash(style)  # fails on an unknown style
    if style == "single-word":
        return SINGLE_WORD_SYSTEM, (WORD_SHOT, *FEW_SHOT)
    return SYSTEM, FEW_SHOT


def _contrastive_shots(style: Style) -> tuple[str, tuple[ContrastiveShot, ...]]:
    prompt_hash(style)
    if style == "single-word":
        return CONTRASTIVE_SINGLE_WORD_SYSTEM, (CONTRASTIVE_WORD_SHOT, *CONTRASTIVE_FEW_SHOT)
    return CONTRASTIVE_SYSTEM, CONTRASTIVE_FEW_SHOT


def render_example(index: int, text: str, activations: Sequence[tuple[str, int]]) -> str:
    """One example: its (already highlighted) text and its ``("token", digit)`` pairs.

    ``text`` must already have newlines escaped (:func:`nlrw.prompts.markup.escape`); tokens
    in the pairs are escaped the same way and written between double quotes.
    """
    pairs = ", ".join(f'("{escape(tok)}", {digit})' for tok, digit in activations)
    return EXAMPLE.format(index=index, text=text, activations=pairs or "(none)")


def render_counter_example(index: int, text: str) -> str:
    """One counter-example: its text (newlines escaped here), no markers."""
    return COUNTER_EXAMPLE.format(index=index, text=escape(text))


def render_top_tokens(tokens: Sequence[str]) -> str:
    """The tally of each example's most strongly marked token (``tokens``, one per example):
    ``" cat" 5 times, " dog" 2 times, " mat" once``, most frequent first (ties in order of
    first appearance), at most :data:`TOP_TOKENS_SHOWN` distinct tokens and then
    ``and N more examples``; empty when ``tokens`` is."""
    counts = Counter(tokens)  # insertion order: first appearance
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    shown = ranked[:TOP_TOKENS_SHOWN]
    parts = [f'"{escape(tok)}" ' + ("once" if n == 1 else f"{n} times") for tok, n in shown]
    rest = sum(n for _, n in ranked[TOP_TOKENS_SHOWN:])
    if rest:
        parts.append(f"and {rest} more example" + ("" if rest == 1 else "s"))
    return ", ".join(parts)


def _top(tokens: Sequence[str]) -> str:
    return TOP_TOKENS.format(tally=render_top_tokens(tokens)) if tokens else ""


def _shot_top_tokens(shots: Sequence[tuple[str, Sequence[tuple[str, int]]]]) -> list[str]:
    """Each demonstration example's top token: its first pair with the largest digit."""
    return [max(pairs, key=lambda p: p[1])[0] for _, pairs in shots if pairs]


def _user(examples: Sequence[str], top_tokens: Sequence[str]) -> Message:
    return {
        "role": "user",
        "content": USER.format(examples="\n\n".join(examples), top=_top(top_tokens)),
    }


def _contrastive_user(
    examples: Sequence[str], counter: Sequence[str], top_tokens: Sequence[str]
) -> Message:
    return {
        "role": "user",
        "content": CONTRASTIVE_USER.format(
            examples="\n\n".join(examples), top=_top(top_tokens), counter="\n".join(counter)
        ),
    }


def _rotated(shots: Sequence[Shot] | Sequence[ContrastiveShot], rotation: int) -> list:
    r = rotation % len(shots)
    return list(shots[r:]) + list(shots[:r])


def render_chat(
    examples: Sequence[str],
    rotation: int = 0,
    *,
    top_tokens: Sequence[str] = (),
    style: Style = "nlrw",
) -> list[Message]:
    """The explainer chat for rendered examples (see :func:`render_example`): the system
    message, the :data:`FEW_SHOT` demonstrations as user/assistant turns, then the latent's
    examples, followed by the ``Top tokens:`` tally of ``top_tokens`` (each example's most
    strongly marked token; no tally line when empty).

    ``rotation`` r shows the demonstrations starting from the r-th (cyclically): a retry after
    a reply that copied a demonstration puts another one last, next to the latent's examples,
    where a small explainer copies from. ``style`` picks the prompt (module docstring).
    """
    system, demonstrations = _shots(style)
    chat: list[Message] = [{"role": "system", "content": system}]
    for shots, answer in _rotated(demonstrations, rotation):
        shown = [render_example(i + 1, t, a) for i, (t, a) in enumerate(shots)]
        chat += [_user(shown, _shot_top_tokens(shots)), {"role": "assistant", "content": answer}]
    chat.append(_user(examples, top_tokens))
    return chat


def render_contrastive_chat(
    examples: Sequence[str],
    counter_examples: Sequence[str],
    rotation: int = 0,
    *,
    top_tokens: Sequence[str] = (),
    style: Style = "nlrw",
) -> list[Message]:
    """The contrastive explainer chat: like :func:`render_chat` (same examples, tally and
    rotation) with :data:`CONTRASTIVE_SYSTEM`, the :data:`CONTRASTIVE_FEW_SHOT`
    demonstrations, and the latent's ``counter_examples`` (plain texts, each rendered by
    :func:`render_counter_example`) after its examples."""
    system, demonstrations = _contrastive_shots(style)
    chat: list[Message] = [{"role": "system", "content": system}]
    for shots, counter, answer in _rotated(demonstrations, rotation):
        shown = [render_example(i + 1, t, a) for i, (t, a) in enumerate(shots)]
        negatives = [render_counter_example(i + 1, t) for i, t in enumerate(counter)]
        chat += [
            _contrastive_user(shown, negatives, _shot_top_tokens(shots)),
            {"role": "assistant", "content": answer},
        ]
    chat.append(_contrastive_user(examples, counter_examples, top_tokens))
    return chat
