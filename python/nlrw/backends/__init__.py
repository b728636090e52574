"""LLM backends for the explain, score and simulate stages: one interface, several engines.

``load_backend("transformers", "qwen2.5-coder-0.5b")`` (default: in-process Hugging Face model,
CPU or GPU) or ``load_backend("openai", name, base_url=...)`` (any OpenAI-compatible server).
Every backend implements :class:`Backend`: ``generate`` (explanations) and
``answer_distribution`` (next-token probabilities of answer tokens after a prefilled answer
prefix: scoring and simulation), and ``answer_distribution_ids`` for prompts split into a
shared prefix and a suffix (:class:`SplitPrompt`, built by :func:`split_encode`), which lets
a backend compute each prefix once. ``load_backend("vllm", ...)`` runs vLLM's offline engine.
"""

from nlrw.backends.base import (
    AnswerDistribution,
    Backend,
    BackendError,
    Generation,
    Message,
    SplitPrompt,
    answer_token_ids,
    load_backend,
    render,
    split_encode,
)

__all__ = [
    "AnswerDistribution",
    "Backend",
    "BackendError",
    "Generation",
    "Message",
    "SplitPrompt",
    "answer_token_ids",
    "load_backend",
    "render",
    "split_encode",
]
