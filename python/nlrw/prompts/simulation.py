"""The simulator's prompt: an explanation and a short text whose **last token** is marked
``<<like this>>``; the simulator rates how strongly the latent fires on that token, 0 to 9.

In the spirit of the paper's simulator (EleutherAI delphi's ``nl_simulation`` branch, after
OpenAI's automated-interpretability): a system message with the instructions, three few-shot
exchanges, then the query. One few-shot answer is a 0 although the explanation sounds relevant to
the text (the feature is present in the text, but not on the marked token), to counter the false
positives the paper diagnosed; the system message says that 0 is the most common answer.

**The answer is prefilled** with ``"Rating: "`` and the next-token probabilities of the ten
digits are read (:func:`digit_tokens` picks the tokenization, see there); the few-shot answers
are ``"Rating: N"``, so the model has seen the format three times.

**Two layouts** of the query's user message, the same in the few-shot messages:

* ``"explanation-first"``::

      Feature explanation: {explanation}.

      Text: {text}

      {QUESTION}

  cut (:data:`SPLIT`) before ``Text:``: the prefix (system, few-shot, explanation) is shared by
  every context of a latent;
* ``"context-first"``, the shortest suffix::

      Text: {text}

      {QUESTION}

      Feature explanation: {explanation}.

  cut after ``Feature explanation:``, before the space that starts the explanation: the
  prefix (system, few-shot, text, question, label) is shared by every latent of a context, and
  a latent's suffix is its explanation and the answer cue only (~10-20 tokens against ~55 for
  explanation-first; the simulate stage chunks this layout by context).
* ``"all-at-once"``, every token of the text rated in one forward (OpenAI's
  automated-interpretability "all at once" simulator, in chat form; below).

**Two prompts** (``style``): ``"nlrw"`` (the default, above) and ``"paper"``, which follows the
authors' simulator prompt (delphi's ``nl_simulation/nl/prompting.py``, PROTOCOL.md) in structure
and in what it tells the model: a "linguistics researcher" system prompt that asks how much
the marked last token represents the feature as an integer 0 to 9, says most tokens have no
relation to the feature and lower ratings are likelier than higher ones, and asks for a Python
list; three few-shot messages of several texts each, answered as lists (``[8,0]``); the query
holds one text (one context per prompt, as the paper) and the answer ``[`` is prefilled, so
the next token is the digit, read as nlrw reads digits. (The authors' exact wording is not
reproduced: the paper's prompt text is paraphrased from its description.)

The cut sits at a word start (after a blank line, or before the explanation's first word's
space), so tokenizing prefix and suffix separately
(:func:`nlrw.backends.base.split_encode`) gives the tokens of the whole prompt for the usual
BPE tokenizers.

**The all-at-once layout** has its own system message (:data:`ALL_AT_ONCE_SYSTEM`) and
few-shot (:data:`ALL_AT_ONCE_FEW_SHOT`): each exchange is a user message with the explanation
and an assistant message that lists a text **one token per line**, each token followed by a tab
and its rating::

    user:       Feature explanation: {explanation}.

                List the text's tokens with their ratings.
    assistant:  {token 0}<TAB>{rating}
                {token 1}<TAB>{rating}
                ...

The query's user message is the same with its own explanation, and its assistant answer is
*prefilled* with the window's tokens, each followed by a tab and the slot :data:`SLOT`
(``0``) where the few-shot answers have the token's rating (``"When\\t0\\n she\\t0\\n ..."``).
The digit distribution of token ``i`` is the next-token distribution at the tab just before
slot ``i`` (the model predicts what follows ``token\\t``): one forward rates every token, the
``i``-th reading seeing tokens ``0..i`` and the earlier slots. The cut (:data:`SPLIT`) is at
the start of the prefilled answer: the prefix (system, few-shot, explanation) is shared by
every window of a latent, the suffix is the window's listing. The slots are located by
character offsets of the listing mapped to tokens (:func:`nlrw.backends.base.locate_slots`),
never by token ids; a tokenizer that merges the slot with the tab before it cannot be used
(one-line error naming the model and the slot text).

**Why the slot is ``0``.** OpenAI's all-at-once simulator fills the slots with ``unknown``.
With the embedded simulator (Qwen2.5-Coder-0.5B, float32) on three 32-token Austen windows
(SmolLM2 tokens) and one explanation, a non-digit slot teaches the model to copy it: the digit
mass at the slots was 0.11 on average (``?``), 0.09 (``unknown``), 0.07 (``_``), and at the
last slot, the pair's rating, 0.00-0.06, so the renormalized expected value there rests on
nothing. With ``0`` the mass is 1.00 at every slot and the ratings still single out tokens
(``fortune`` in "a single man in possession of a good fortune" rated 7.5, most others under
0.5): each reading is conditioned on the earlier tokens' being rated 0, the commonest rating,
rather than on a placeholder. Digits are their own pre-token after a tab in the Qwen2.5,
Llama 3 and GPT-2 regexes (``"\\t0"`` is ``"\\t"``, ``"0"``), so the slots of the listing
tokenize as the few-shot answers' digits. A token's text is its piece of the decoded window
(:func:`token_texts`), control characters escaped (``\\n``, ``\\t``), so each stays on its
line.

**The text** is the context decoded with the subject's tokenizer, the last token marked:
``decode(ids[:-1]) + mark(last)``, with a leading space of the last token kept outside the marks
(``" <<cat>>"``) and control characters escaped (``\\n``) as in the explainer's examples.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

from nlrw.backends.base import Message, answer_token_ids
from nlrw.prompts.markup import escape, mark_last

__all__ = [
    "ALL_AT_ONCE_FEW_SHOT",
    "ALL_AT_ONCE_REQUEST",
    "ALL_AT_ONCE_SYSTEM",
    "ANSWER",
    "ANSWER_PREFIXES",
    "DIGITS",
    "FEW_SHOT",
    "LAYOUTS",
    "PAPER_FEW_SHOT",
    "PAPER_PROMPT_HASH",
    "PAPER_SYSTEM",
    "PROMPT_HASH",
    "QUESTION",
    "SEPARATOR",
    "SLOT",
    "SPLIT",
    "STYLES",
    "SYSTEM",
    "DigitTokens",
    "Layout",
    "Listing",
    "Shot",
    "Style",
    "TokenShot",
    "all_at_once_chat",
    "context_text",
    "digit_tokens",
    "listing",
    "prompt_hash",
    "render_chat",
    "template_hash",
    "token_texts",
    "user_message",
]

Layout = Literal["explanation-first", "context-first", "all-at-once"]
LAYOUTS: tuple[Layout, ...] = ("explanation-first", "context-first", "all-at-once")
Style = Literal["nlrw", "paper"]
STYLES: tuple[Style, ...] = ("nlrw", "paper")

SYSTEM = (
    "We're studying latents (neurons) of a language model. Each latent looks for one particular "
    "thing in a short text. You will read an explanation of what a latent looks for and a text "
    "whose LAST token is marked <<like this>>.\n"
    "\n"
    "Predict how strongly the latent fires on the marked last token, on a scale from 0 to 9: "
    "0 means it does not fire at all, 9 means it fires as strongly as it ever does. Judge only "
    "the marked token, using the text before it as context: the latent may fire on other "
    "tokens of the text, which does not count. Most latents fire on very few tokens, so 0 is "
    "by far the most common answer.\n"
    "\n"
    'Answer with "Rating: " and one digit.'
)

EXPLANATION_LABEL = "Feature explanation:"
EXPLANATION = EXPLANATION_LABEL + " {explanation}."
TEXT = "Text: {text}"
QUESTION = "How strongly does the latent fire on the marked last token?"
ANSWER = "Rating: {rating}"

SPLIT = "\x00"
"""The marker :func:`render_chat` puts where the shared prefix ends (``split=True``); the text
and the explanation are escaped, so they cannot contain it."""

ANSWER_PREFIXES = ("Rating: ", "Rating:")
"""Answer prefixes tried in order by :func:`digit_tokens`: bare digits after ``"Rating: "``
(Qwen2.5, byte-level BPEs without digit merges), or space-digit tokens after ``"Rating:"``
(Llama-3-style tokenizers that merge a space into the digit)."""

DIGITS = tuple(str(d) for d in range(10))


class Shot(NamedTuple):
    """One few-shot exchange: an explanation, a text ``head`` + marked ``last`` token, and the
    rating the assistant answers."""

    explanation: str
    head: str
    last: str
    rating: int


FEW_SHOT: tuple[Shot, ...] = (
    Shot(
        "Mentions of animals, especially pets",
        "When she came back from her walk, the children were playing in the garden with their",
        " dog",
        8,
    ),
    Shot(
        "Words about money, wealth and income",
        "He had a good fortune and a fine house in town, and everyone agreed that he was very",
        " generous",
        3,
    ),
    Shot(
        "Closing quotation marks at the end of spoken dialogue",
        '"I shall write to her tomorrow," said Mr. Elliot, taking up his',
        " pen",
        0,
    ),
)
"""The few-shot exchanges (original sentences, none from the corpus): a clear hit, a weak one,
and a 0 where the explanation's feature is in the text but not on the marked token."""

PROMPT_HASH = hashlib.sha256(
    "\x00".join(
        [
            SYSTEM,
            EXPLANATION,
            TEXT,
            QUESTION,
            ANSWER,
            *ANSWER_PREFIXES,
            *(f"{s.explanation}\x01{s.head}\x01{s.last}\x01{s.rating}" for s in FEW_SHOT),
        ]
    ).encode()
).hexdigest()[:16]


PAPER_SYSTEM = (
    "You are a meticulous linguistics researcher studying the features of a language model. "
    "You will be given the explanation of one feature and one or more short texts. In each "
    "text the LAST token is marked <<like this>>.\n"
    "\n"
    "For each text, say how much the marked last token represents the feature, as an integer "
    "from 0 to 9: 0 means it has no relation to the feature, 9 means it represents the "
    "feature as clearly as possible. Use the text before the marked token only as context. "
    "Most tokens have no relation to the feature, so lower ratings are far more likely than "
    "higher ones.\n"
    "\n"
    "Answer with a Python list of integers, one rating per text, in order, and nothing else."
)
PAPER_TEXT = "Text {number}: {text}"
PAPER_QUESTION = "Rate the marked last token of each text."
PAPER_ANSWER_PREFIX = "["
"""The prefilled start of the paper's list answer: the next token is the first rating."""

PAPER_FEW_SHOT: tuple[tuple[str, tuple[Shot, ...]], ...] = (
    (
        "Mentions of animals, especially pets",
        (
            FEW_SHOT[0],
            Shot("", "In the morning the weather had turned, and the road was", " cold", 0),
        ),
    ),
    (
        "Words about money, wealth and income",
        (
            FEW_SHOT[1],
            Shot("", "After the sale of the estate she was left with a large", " fortune", 9),
        ),
    ),
    (
        "Closing quotation marks at the end of spoken dialogue",
        (
            FEW_SHOT[2],
            Shot("", '"Good morning, Anne," said Mr. Elliot, "it is a fine day', '."', 0),
            Shot("", '"I shall come tomorrow', '."', 8),
        ),
    ),
)
"""The paper-style few-shot messages: several texts per message (the explanation is the
first field of each pair; a ``Shot``'s own explanation is unused there)."""


def prompt_hash(style: Style = "nlrw") -> str:
    """A short hash of a style's template strings (``PROMPT_HASH`` for nlrw's)."""
    if style == "nlrw":
        return PROMPT_HASH
    if style == "paper":
        return PAPER_PROMPT_HASH
    raise ValueError(f"unknown simulation prompt {style!r}: expected one of {list(STYLES)}")


def template_hash(style: Style, layout: Layout) -> str:
    """A short hash of the whole chat a (style, layout) renders for placeholder inputs, split
    marker included: it changes with any template, few-shot or arrangement change (the
    simulate stage's identity holds it, so a finished run is not reused after one)."""
    if layout == "all-at-once":
        if style != "nlrw":
            raise ValueError(_NO_PAPER_ALL_AT_ONCE)
        chat = all_at_once_chat("{explanation}")
        answer = listing(["{token}", "{token}"])
        chat.append({"role": "assistant", "content": SPLIT + answer.text})
    else:
        chat = render_chat("{explanation}", "{text}", layout, split=True, style=style)
    text = "\x00".join(f"{m['role']}\x01{m['content']}" for m in chat)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_NO_PAPER_ALL_AT_ONCE = (
    "the all-at-once layout has its own prompt: use simulate.prompt = 'nlrw' with it"
)

PAPER_PROMPT_HASH = hashlib.sha256(
    "\x00".join(
        [
            PAPER_SYSTEM,
            EXPLANATION,
            PAPER_TEXT,
            PAPER_QUESTION,
            PAPER_ANSWER_PREFIX,
            *(
                f"{e}\x01" + "\x01".join(f"{s.head}\x02{s.last}\x02{s.rating}" for s in shots)
                for e, shots in PAPER_FEW_SHOT
            ),
        ]
    ).encode()
).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# The all-at-once layout's template (module docstring)
# --------------------------------------------------------------------------------------------

ALL_AT_ONCE_SYSTEM = (
    "We're studying latents (neurons) of a language model. Each latent looks for one particular "
    "thing in a short text. You will read an explanation of what a latent looks for; then a "
    "text is listed one token per line, each token followed by a tab and how strongly the "
    "latent fires on that token.\n"
    "\n"
    "Rate each token on a scale from 0 to 9: 0 means the latent does not fire at all, 9 means "
    "it fires as strongly as it ever does. Judge each token on its own, using the text before "
    "it as context. Most latents fire on very few tokens, so 0 is by far the most common "
    "rating."
)
ALL_AT_ONCE_REQUEST = "List the text's tokens with their ratings."
SEPARATOR = "\t"
"""What follows a token on its line, before the rating (the digit is read after it)."""
SLOT = "0"
"""The text of the query's rating slots, ``0``, the commonest rating (the few-shot answers hold
each token's own digit); see the module docstring for why not ``?`` or ``unknown``."""


class TokenShot(NamedTuple):
    """One all-at-once few-shot exchange: an explanation and a text's tokens with a rating
    each."""

    explanation: str
    tokens: tuple[str, ...]
    ratings: tuple[int, ...]


def _shot(explanation: str, tokens: str, ratings: dict[str, int]) -> TokenShot:
    """A few-shot exchange from its tokens joined by ``|`` and the ratings of the tokens that
    are not 0 (by token text)."""
    pieces = tuple(tokens.split("|"))
    return TokenShot(explanation, pieces, tuple(ratings.get(t, 0) for t in pieces))


ALL_AT_ONCE_FEW_SHOT: tuple[TokenShot, ...] = (
    _shot(
        "Mentions of animals, especially pets",
        "When| she| came| back|,| the| children| were| playing| with| their| dog| and| two| cats",
        {" dog": 8, " cats": 7},
    ),
    _shot(
        "Words about money, wealth and income",
        "He| had| a| good| fortune| and| a| fine| house| in| town|,| and| was| very| generous",
        {" fortune": 9, " house": 2, " generous": 3},
    ),
    _shot(
        "Closing quotation marks at the end of spoken dialogue",
        '"|I| shall| write| to| her| tomorrow|,"| said| Mr|.| Elliot|,| taking| up| his| pen',
        {',"': 9},
    ),
)
"""The all-at-once few-shot (the sentences of :data:`FEW_SHOT`, tokenized by hand in GPT style,
every token rated): a clear hit, weak ones, and a text where the explanation's feature is
present on one token only (the closing ``,"`` rated 9, the opening quote and the period 0)."""


class Listing(NamedTuple):
    """An all-at-once answer: the text of the token lines and where each rating slot starts."""

    text: str
    slots: tuple[int, ...]
    """Character offset in ``text`` of each token's slot, in token order."""


def listing(tokens: Sequence[str], ratings: Sequence[int] | None = None) -> Listing:
    """The lines ``{token}<TAB>{rating}`` joined by newlines (no final newline); with no
    ``ratings``, every slot is :data:`SLOT` (the query). Tokens are escaped."""
    if ratings is not None and len(ratings) != len(tokens):
        raise ValueError(f"{len(tokens)} tokens but {len(ratings)} ratings")
    if not tokens:
        raise ValueError("a listing needs at least one token")
    text, slots = "", []
    for i, token in enumerate(tokens):
        if i:
            text += "\n"
        text += escape(token) + SEPARATOR
        slots.append(len(text))
        text += SLOT if ratings is None else str(int(ratings[i]))
    return Listing(text, tuple(slots))


def all_at_once_chat(explanation: str) -> list[Message]:
    """The all-at-once chat up to the query's answer: system message, the few-shot exchanges
    and the query's user message. The query's answer, prefilled by the caller, is the
    window's :func:`listing` (the shared prefix ends where it starts)."""
    chat: list[Message] = [{"role": "system", "content": ALL_AT_ONCE_SYSTEM}]
    for shot in ALL_AT_ONCE_FEW_SHOT:
        chat.append({"role": "user", "content": _all_at_once_user(shot.explanation)})
        chat.append({"role": "assistant", "content": listing(shot.tokens, shot.ratings).text})
    chat.append({"role": "user", "content": _all_at_once_user(explanation)})
    return chat


def _all_at_once_user(explanation: str) -> str:
    return f"{EXPLANATION.format(explanation=_explanation(explanation))}\n\n{ALL_AT_ONCE_REQUEST}"


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------


def context_text(tokenizer: Any, ids: Sequence[int]) -> str:
    """The simulator's text of a context: token ids decoded with the **subject's** tokenizer,
    the last token marked (:func:`nlrw.prompts.markup.mark_last`).

    The last token's text is ``decode(ids)`` minus ``decode(ids[:-1])`` when the first starts
    with the second (SentencePiece tokenizers drop a lone token's leading space when it is
    decoded alone), else ``decode(ids[-1:])``.
    """
    ids = [int(i) for i in ids]
    if not ids:
        raise ValueError("a context needs at least one token")
    head = str(tokenizer.decode(ids[:-1]))
    whole = str(tokenizer.decode(ids))
    last = whole[len(head) :] if whole.startswith(head) else str(tokenizer.decode(ids[-1:]))
    return mark_last(head, last)


def token_texts(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The text of each token of a context as it reads in the decoded context (the
    all-at-once listing's tokens), by the rule of :func:`context_text` applied at every
    position: token ``i`` is ``decode(ids[:i+1])`` minus ``decode(ids[:i])`` when the first
    starts with the second, else ``decode(ids[i:i+1])``. Not escaped."""
    ids = [int(i) for i in ids]
    out: list[str] = []
    head = ""
    for i in range(len(ids)):
        whole = str(tokenizer.decode(ids[: i + 1]))
        out.append(
            whole[len(head) :] if whole.startswith(head) else str(tokenizer.decode(ids[i : i + 1]))
        )
        head = whole
    return out


def _explanation(explanation: str) -> str:
    """The explanation as shown: escaped, without a final period (the template adds one)."""
    text = escape(explanation.strip())
    return text[:-1] if text.endswith(".") else text


# --------------------------------------------------------------------------------------------
# Chat
# --------------------------------------------------------------------------------------------


def _arrange(explanation: str, body: str, question: str, layout: Layout, split: bool) -> str:
    """Explanation and text(s) in the layout's order, the question last; with ``split``,
    :data:`SPLIT` marks where the part shared across prompts ends (module docstring)."""
    cut = SPLIT if split else ""
    if layout == "explanation-first":
        expl = EXPLANATION.format(explanation=_explanation(explanation))
        return f"{expl}\n\n{cut}{body}\n\n{question}"
    if layout == "context-first":
        return f"{body}\n\n{question}\n\n{EXPLANATION_LABEL}{cut} {_explanation(explanation)}."
    raise ValueError(f"unknown layout {layout!r}: expected one of {list(LAYOUTS)}")


def user_message(explanation: str, text: str, layout: Layout, *, split: bool = False) -> str:
    """The user message asking for one rating; ``text`` is already rendered
    (:func:`context_text` / :func:`mark_last`). With ``split``, :data:`SPLIT` marks where the
    part shared across prompts ends (see the module docstring)."""
    return _arrange(explanation, TEXT.format(text=text), QUESTION, layout, split)


def paper_user_message(
    explanation: str, texts: Sequence[str], layout: Layout, *, split: bool = False
) -> str:
    """The paper-style user message: the explanation and numbered texts (``split`` as in
    :func:`user_message`)."""
    body = "\n".join(PAPER_TEXT.format(number=i + 1, text=t) for i, t in enumerate(texts))
    return _arrange(explanation, body, PAPER_QUESTION, layout, split)


def render_chat(
    explanation: str,
    text: str,
    layout: Layout = "explanation-first",
    *,
    split: bool = False,
    style: Style = "nlrw",
) -> list[Message]:
    """The simulator chat: system message, the three few-shot exchanges (in the same layout),
    and the query; the backend prefills the answer (``"Rating: "``, or ``"["`` for the
    paper's style). The all-at-once layout is rendered by :func:`all_at_once_chat` and
    :func:`listing` instead."""
    if layout == "all-at-once":
        raise ValueError(
            "the all-at-once layout is rendered by all_at_once_chat and listing (one token per "
            "line), not by render_chat"
        )
    if style == "paper":
        chat: list[Message] = [{"role": "system", "content": PAPER_SYSTEM}]
        for expl, shots in PAPER_FEW_SHOT:
            texts = [mark_last(s.head, s.last) for s in shots]
            chat.append({"role": "user", "content": paper_user_message(expl, texts, layout)})
            ratings = ",".join(str(s.rating) for s in shots)
            chat.append({"role": "assistant", "content": f"[{ratings}]"})
        query = paper_user_message(explanation, [text], layout, split=split)
        chat.append({"role": "user", "content": query})
        return chat
    if style != "nlrw":
        raise ValueError(f"unknown simulation prompt {style!r}: expected one of {list(STYLES)}")
    chat = [{"role": "system", "content": SYSTEM}]
    for shot in FEW_SHOT:
        chat.append(
            {
                "role": "user",
                "content": user_message(shot.explanation, mark_last(shot.head, shot.last), layout),
            }
        )
        chat.append({"role": "assistant", "content": ANSWER.format(rating=shot.rating)})
    chat.append({"role": "user", "content": user_message(explanation, text, layout, split=split)})
    return chat


# --------------------------------------------------------------------------------------------
# Digit tokens
# --------------------------------------------------------------------------------------------


class DigitTokens(NamedTuple):
    """How the simulator's tokenizer writes the answer digit after the prefix."""

    answer_prefix: str
    """The prefilled answer, ``"Rating: "`` or ``"Rating:"``."""
    ids: tuple[int, ...]
    """Token id of each digit 0..9 as it follows the prefix."""
    tokens: tuple[str, ...]
    """The tokenizer's strings of those tokens (``"7"``, ``"Ġ7"``, ``"▁7"``...)."""

    def record(self) -> dict[str, Any]:
        """The JSON form written to ``simulate.json``."""
        return {
            "answer_prefix": self.answer_prefix,
            "ids": list(self.ids),
            "tokens": list(self.tokens),
        }


def digit_tokens(
    tokenizer: Any, style: Style = "nlrw", layout: Layout = "explanation-first"
) -> DigitTokens:
    """The answer prefix and the digits' token ids for ``tokenizer``.

    For the all-at-once layout the "prefix" is :data:`SEPARATOR` (the digit follows the tab
    after a token, as the few-shot answers write it): bare digit tokens after a tab.

    Tries each of :data:`ANSWER_PREFIXES` in turn with
    :func:`nlrw.backends.base.answer_token_ids` and keeps the first whose ten digit tokens
    continue the prefix exactly as the few-shot answers ``"Rating: N"`` are written: bare digits
    after ``"Rating: "``, space-digit tokens after ``"Rating:"``.

    Raises:
        ValueError: no prefix works (the digits split into several pieces or merge with the
            prefix); the message gives each prefix's reason.
    """
    reasons: list[str] = []
    prefixes = ANSWER_PREFIXES if style == "nlrw" else (PAPER_ANSWER_PREFIX,)
    if layout == "all-at-once":
        prefixes = (SEPARATOR,)
    for prefix in prefixes:
        try:
            ids = answer_token_ids(tokenizer, DIGITS, prefix=prefix)
        except ValueError as e:
            reasons.append(f"after {prefix!r}: {e}")
            continue
        # "" or " " after "Rating: " / "Rating:"; nothing after the paper's "["
        want = ANSWER.format(rating="")[len(prefix) :] if prefix in ANSWER_PREFIXES else ""
        pieces = [str(tokenizer.decode([i])) for i in ids]
        if any(p != want + d for p, d in zip(pieces, DIGITS, strict=True)):
            reasons.append(
                f"after {prefix!r}: the digit tokens decode to {pieces}, not {want!r} + digit"
            )
            continue
        tokens = tuple(str(t) for t in tokenizer.convert_ids_to_tokens(ids))
        return DigitTokens(prefix, tuple(int(i) for i in ids), tokens)
    raise ValueError(
        "the simulator's tokenizer cannot read a single-token digit after the answer prefix: "
        + "; ".join(reasons)
    )
