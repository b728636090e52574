"""LLM backends for the explain, score and simulate stages: one interface, several engines.

``load_backend("transformers", "qwen2.5-coder-0.5b")`` (default: in-process Hugging Face model,
CPU or GPU) or ``load_backend("openai", name, base_url=...)`` (any OpenAI-compatible server).
Every backend implements :class:`Backend`: ``generate`` (explanations) and
``answer_distribution`` (next-token probabilities of answer tokens after a prefilled answer
prefix: scoring and simulation).
"""

from nlrw.backends.base import (
    AnswerDistribution,
    Backend,
    BackendError,
    Generation,
    Message,
    answer_token_ids,
    load_backend,
    render,
)

__all__ = [
    "AnswerDistribution",
    "Backend",
    "BackendError",
    "Generation",
    "Message",
    "answer_token_ids",
    "load_backend",
    "render",
]
