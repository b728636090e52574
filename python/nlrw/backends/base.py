"""The one interface every LLM backend implements, and the prompt helpers they share.

A backend does two things for the explain, score and simulate stages:

* :meth:`Backend.generate`: a reply to each chat of a batch (explanations);
* :meth:`Backend.answer_distribution`: for each chat, the assistant's answer is *prefilled* with
  ``answer_prefix`` and the backend returns the next-token probability of each answer token
  (scoring's "1"/"0", simulation's digits 0-9). One forward per prompt, no sampling, no parsing:
  ``p_i = softmax(logits[last])[id(answer_i)]``, **not** renormalized over the answers, so
  ``mass = Σ_i p_i`` says how much the model followed the format.
* :meth:`Backend.answer_distribution_ids`: the same on prompts given as token ids split into a
  :class:`SplitPrompt` (``prefix`` + ``suffix``). Simulation asks millions of prompts that share
  a few long prefixes (system prompt, few-shot examples, explanation): a backend may compute
  each distinct prefix once and reuse its KV cache for every suffix (the transformers backend's
  ``"shared-prefix"`` engine), or order requests so a server's prefix cache hits (openai).
  :func:`split_encode` builds a :class:`SplitPrompt` from a chat with a split marker in it.

Reading several positions of one prompt (the all-at-once simulation layout: a rating slot per
token of a window) is a transformers-backend method (``slot_distribution_ids``);
:func:`locate_slots` finds the positions from character offsets of the text.

:func:`render` turns a chat into the prompt text (the tokenizer's chat template, or a plain
``System:/User:/Assistant:`` fallback), :func:`answer_token_ids` maps answers to single token ids.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "AnswerDistribution",
    "Backend",
    "BackendError",
    "Generation",
    "Message",
    "SplitPrompt",
    "answer_token_ids",
    "check_split_prompts",
    "encode_prompt",
    "locate_slots",
    "render",
    "split_encode",
    "uses_chat_template",
]

log = logging.getLogger(__name__)

Message = dict[str, str]
"""One chat message: ``{"role": "system" | "user" | "assistant", "content": ...}``."""

_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


class BackendError(RuntimeError):
    """A backend could not answer (server down, timed out, refused the request)."""


class Generation(NamedTuple):
    """One generated reply.

    ``finish_reason`` is ``"stop"`` (end of sequence), ``"length"`` (``max_new_tokens`` hit), or
    whatever the server said; ``"malformed"`` when a server's answer had no text where one was
    expected. Empty or malformed replies are returned as they are; :attr:`ok` is the flag a
    caller checks before parsing, and retries (e.g. with another seed) when it is false.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str

    @property
    def ok(self) -> bool:
        """False for an empty (whitespace-only) or malformed reply: the caller should retry."""
        return bool(self.text.strip()) and self.finish_reason != "malformed"


class AnswerDistribution(NamedTuple):
    """Next-token probabilities of the answer tokens after the prefilled answer prefix."""

    probs: np.ndarray
    """float64 ``[n_prompts, n_answers]``: probability of each answer token (not renormalized)."""
    mass: np.ndarray
    """float64 ``[n_prompts]``: ``probs.sum(1)``, the answer tokens' total probability mass."""


class SplitPrompt(NamedTuple):
    """A prompt as token ids, cut where the part shared with other prompts ends.

    The prompt is exactly ``prefix + suffix`` (no re-tokenization at the cut). Many prompts share
    one ``prefix`` (equal tuples); ``suffix`` must not be empty (the answer is read after it).
    """

    prefix: tuple[int, ...]
    """Token ids of the shared part (may be empty)."""
    suffix: tuple[int, ...]
    """Token ids of the prompt's own part, ending where the answer token is predicted."""


@runtime_checkable
class Backend(Protocol):
    """What the explain, score and simulate stages call; see the module docstring."""

    name: str
    model: str

    def generate(
        self,
        chats: Sequence[Sequence[Message]],
        *,
        max_new_tokens: int = 200,
        temperature: float = 0.0,
        seed: int = 0,
    ) -> list[Generation]:
        """A reply to each chat (greedy at temperature 0, seeded sampling otherwise)."""
        ...

    def answer_distribution(
        self, chats: Sequence[Sequence[Message]], answer_prefix: str, answers: Sequence[str]
    ) -> AnswerDistribution:
        """Next-token probabilities of ``answers`` after each chat + prefilled ``answer_prefix``."""
        ...

    def answer_distribution_ids(
        self, prompts: Sequence[SplitPrompt], answer_ids: Sequence[int]
    ) -> AnswerDistribution:
        """``p[i, j] = softmax(next-token logits after prefix+suffix of prompt i)[answer_ids[j]]``
        (float32 softmax, not renormalized); rows in the order of ``prompts``."""
        ...

    def close(self) -> None:
        """Release the model or connections."""
        ...


# --------------------------------------------------------------------------------------------
# Prompt text
# --------------------------------------------------------------------------------------------

_warned_plain: set[str] = set()


def uses_chat_template(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` has a chat template (else :func:`render` uses the plain format)."""
    return bool(getattr(tokenizer, "chat_template", None))


def _check_chat(chat: Sequence[Message]) -> None:
    if not chat:
        raise ValueError("empty chat: a prompt needs at least one message")
    for m in chat:
        if m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise ValueError(
                f"malformed message {m!r}: expected {{'role': one of {sorted(_ROLES)}, "
                "'content': str}"
            )


def render(tokenizer: Any, chat: Sequence[Message], *, answer_prefix: str | None) -> str:
    """The prompt text of ``chat``, ending where the assistant's reply starts.

    With a chat template: ``apply_chat_template(chat, add_generation_prompt=True)`` followed by
    ``answer_prefix`` (the assistant's answer starts with it). Without one, the plain fallback
    (logged once per tokenizer)::

        System: {content}

        User: {content}

        Assistant: {answer_prefix}

    where the last line is ``Assistant:`` alone when there is no prefix (the model writes the
    space itself, as a BPE tokenizer prefers).
    """
    _check_chat(chat)
    prefix = answer_prefix or ""
    if uses_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(
            [dict(m) for m in chat], tokenize=False, add_generation_prompt=True
        )
        return str(text) + prefix
    key = str(getattr(tokenizer, "name_or_path", "")) or repr(type(tokenizer))
    if key not in _warned_plain:
        _warned_plain.add(key)
        log.warning(
            "tokenizer %s has no chat template: prompts use the plain 'System:/User:/Assistant:' "
            "format",
            key,
        )
    turns = [f"{_ROLES[m['role']]}: {m['content']}" for m in chat]
    turns.append(f"Assistant: {prefix}" if prefix else "Assistant:")
    return "\n\n".join(turns)


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a :func:`render` ed prompt: a chat template writes its own special tokens
    (BOS included where the model wants one), the plain format gets the tokenizer's usual ones."""
    ids = tokenizer(text, add_special_tokens=not uses_chat_template(tokenizer))["input_ids"]
    return [int(i) for i in ids]


def split_encode(
    tokenizer: Any, chat: Sequence[Message], split_at: str, answer_prefix: str | None
) -> SplitPrompt:
    """Render ``chat`` (:func:`render`, with ``answer_prefix``) and cut its text at the marker.

    Exactly one message content contains the marker string ``split_at`` once; the rendered text
    is cut there and the marker dropped: ``text = head + split_at + tail``. The prefix is
    ``encode_prompt(head)`` (the chat template's special-token rule, so a BOS lands in the
    prefix), the suffix ``tail`` tokenized with ``add_special_tokens=False``. The two halves are
    tokenized separately, so a BPE merge across the cut cannot happen: the prompt's tokens may
    differ from tokenizing the whole text (cut at a newline or after a space to keep them equal),
    but every prompt with the same ``head`` gets the very same prefix ids, which is what lets a
    backend reuse the prefix's KV cache.

    Raises:
        ValueError: ``split_at`` empty, missing from the rendered prompt or found more than once
            (the chat template or another message may contain it too), or nothing after it.
    """
    if not split_at:
        raise ValueError("split_at must be a non-empty marker string")
    text = render(tokenizer, chat, answer_prefix=answer_prefix)
    count = text.count(split_at)
    if count != 1:
        where = [i for i, m in enumerate(chat) if split_at in m.get("content", "")]
        raise ValueError(
            f"the split marker {split_at!r} must appear exactly once in the rendered prompt; "
            f"found {count} times (in the contents of messages {where})"
        )
    head, tail = text.split(split_at)
    suffix = _pieces(tokenizer, tail)
    if not suffix:
        raise ValueError(
            f"nothing follows the split marker {split_at!r}: the suffix would be empty"
        )
    prefix = encode_prompt(tokenizer, head)
    return SplitPrompt(tuple(prefix), tuple(suffix))


def check_split_prompts(
    prompts: Sequence[SplitPrompt], answer_ids: Sequence[int], *, max_length: int | None = None
) -> None:
    """The input checks every backend's ``answer_distribution_ids`` makes.

    Raises:
        ValueError: no answers, repeated answer ids, an empty suffix or a prompt longer than
            ``max_length`` (naming the prompt indices).
    """
    if not len(answer_ids):
        raise ValueError("no answer ids given")
    if len(set(answer_ids)) != len(answer_ids):
        raise ValueError(f"answer ids {list(answer_ids)} repeat")
    empty = [i for i, p in enumerate(prompts) if not p.suffix]
    if empty:
        raise ValueError(
            f"prompts {empty[:10]} have an empty suffix: the answer is read after the suffix's "
            "last token, so every prompt needs at least one suffix token"
        )
    if max_length is not None:
        long = [
            (i, len(p.prefix) + len(p.suffix))
            for i, p in enumerate(prompts)
            if len(p.prefix) + len(p.suffix) > max_length
        ]
        if long:
            raise ValueError(
                f"prompts longer than max_length={max_length} tokens (index, length): {long[:10]}"
            )


def locate_slots(
    tokenizer: Any, text: str, slots: Sequence[int], *, model: str | None = None
) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` (no special tokens) and, for each slot (a character offset in
    ``text``), the index of the token just before it: the position whose next-token
    distribution is what the model predicts for the slot.

    Found from the fast tokenizer's ``return_offsets_mapping``, never from token ids: slot
    ``s`` needs a token that starts exactly at ``s`` (the token before it then ends the text
    that precedes the slot).

    Raises:
        ValueError: a slow tokenizer (no offsets), or a slot whose start is not a token
            boundary (the tokenizer merged the slot's text with the text before it); one line
            naming ``model`` (default: the tokenizer's ``name_or_path``) and the slot's text.
    """
    name = model or str(getattr(tokenizer, "name_or_path", "")) or type(tokenizer).__name__
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"the tokenizer of {name} is not a fast tokenizer: rating slots are located by "
            "character offsets, which only fast tokenizers give"
        )
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = [int(i) for i in enc["input_ids"]]
    starts: dict[int, int] = {}
    for j, (start, end) in enumerate(enc["offset_mapping"]):
        if end > start:
            starts.setdefault(int(start), j)
    where: list[int] = []
    for s in slots:
        j = starts.get(int(s))
        if j is None or j == 0:
            end = text.find("\n", s)
            slot_text = text[s : end if end >= 0 else len(text)]
            line_start = text.rfind("\n", 0, s) + 1
            raise ValueError(
                f"the tokenizer of {name} merges the rating slot {slot_text!r} with the text "
                f"before it ({text[line_start:s]!r} at offset {s} is not a token boundary): "
                "the slots of this layout cannot be located for this model"
            )
        where.append(j - 1)
    return ids, where


def _pieces(tokenizer: Any, text: str) -> list[int]:
    return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


def answer_token_ids(
    tokenizer: Any, answers: Sequence[str], *, prefix: str | None = None
) -> list[int]:
    """The single token id of each answer.

    Candidates, in order: the bare answer (``"7"``), then with a leading space (``" 7"``, the
    form SentencePiece and GPT-style tokenizers give a word after a space). The first that
    encodes to exactly one token is used. When ``prefix`` (the answer prefix) is given, a
    candidate must also be the token the tokenizer produces right after the prefix
    (``prefix + candidate`` encodes to the prefix's tokens plus that one), so the model is
    asked in the tokens it saw in training; the space form is then tried first when the
    prefix does not end in whitespace, and not at all when it does. Qwen2.5 gives every digit
    its own token and a space its own: ``prefix="Rating: "`` with the bare digits. Llama-3
    merges a space into the digit after it (``" 7"``): there ``prefix="Rating:"`` works and
    ``"Rating: "`` is refused (the prefix's last space would merge into the answer).

    Raises:
        ValueError: answers that are empty, duplicated, or split into several pieces (named,
            with their pieces).
    """
    if not answers:
        raise ValueError("no answers given")
    ids: list[int] = []
    bad: list[str] = []
    for answer in answers:
        if not answer:
            raise ValueError("an answer is the empty string")
        forms = [answer]
        if not answer[0].isspace() and not (prefix and prefix[-1].isspace()):
            forms.append(" " + answer)  # after a space in the prefix, no second space
            if prefix:
                forms.reverse()
        head = _pieces(tokenizer, prefix) if prefix else []
        found = None
        tried = []
        for form in forms:
            pieces = _pieces(tokenizer, form)
            tried.append(f"{form!r} -> {tokenizer.convert_ids_to_tokens(pieces)}")
            if len(pieces) != 1:
                continue
            if prefix and _pieces(tokenizer, prefix + form) != [*head, pieces[0]]:
                tried[-1] += f" (merges with the prefix {prefix!r})"
                continue
            found = pieces[0]
            break
        if found is None:
            bad.append(f"{answer!r} ({'; '.join(tried)})")
        else:
            ids.append(found)
    if bad:
        raise ValueError(
            "answers must each be exactly one token; these split into several pieces: "
            + ", ".join(bad)
        )
    if len(set(ids)) != len(ids):
        raise ValueError(f"answers {list(answers)!r} map to repeated token ids {ids}")
    return ids


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------
