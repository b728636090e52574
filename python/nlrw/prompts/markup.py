"""How token text is written into the LLM stages' prompts, shared by all three of them.

* :func:`escape`: control characters as escapes (``\\n``), so an example stays on its line; the
  explainer's examples and activation pairs, the scorer's example texts and the simulator's
  texts and explanations all go through it;
* :func:`highlight` (with :func:`highlighted_mask`): the explainer's examples, every token above
  a fraction of the example's max activation wrapped ``<<…>>``, consecutive ones merged;
* :func:`mark_last`: the simulator's texts, the last token wrapped ``<<…>>``.

The rendered prompts are pinned byte for byte by the golden tests (``tests/test_explain.py``,
``tests/test_score.py``, ``tests/test_simulate.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["escape", "highlight", "highlighted_mask", "mark_last"]


def escape(text: str) -> str:
    """Newlines, tabs and other control characters written as escapes (``\\n``), so an example
    stays on its line of the prompt."""
    return "".join(
        ch if ch.isprintable() or ch == " " else ch.encode("unicode_escape").decode("ascii")
        for ch in text
    )


def highlighted_mask(acts: np.ndarray, threshold: float) -> np.ndarray:
    """Tokens whose activation exceeds ``threshold x`` the example's max (none if max <= 0)."""
    acts = np.asarray(acts, dtype=np.float64)
    top = float(acts.max()) if acts.size else 0.0
    if top <= 0.0:
        return np.zeros(acts.shape, dtype=bool)
    return acts > threshold * top


def highlight(tokens: Sequence[str], acts: np.ndarray, threshold: float = 0.2) -> str:
    """The example's text with highlighted tokens wrapped ``<<…>>``, consecutive ones merged."""
    mask = highlighted_mask(acts, threshold)
    parts: list[str] = []
    for i, tok in enumerate(tokens):
        opens = mask[i] and (i == 0 or not mask[i - 1])
        closes = mask[i] and (i == len(tokens) - 1 or not mask[i + 1])
        parts.append(("<<" if opens else "") + escape(tok) + (">>" if closes else ""))
    return "".join(parts)


def mark_last(head: str, last: str) -> str:
    """``head`` + ``last`` wrapped ``<<…>>``, control characters escaped; leading spaces of
    ``last`` stay outside the marks (``" cat"`` -> ``" <<cat>>"``) unless it is all spaces."""
    body = last.lstrip(" ")
    lead = last[: len(last) - len(body)]
    if not body:
        lead, body = "", last
    return f"{escape(head)}{lead}<<{escape(body)}>>"
