"""LLM backends for the explain, score and simulate stages: one interface, several engines.

``load_backend("transformers", "qwen2.5-coder-0.5b")`` (default: in-process Hugging Face model,
CPU or GPU) or ``load_backend("openai", name, base_url=...)`` (any OpenAI-compatible server).
Every backend implements :class:`Backend`: ``generate`` (explanations) and
``answer_distribution`` (next-token probabilities of answer tokens after a prefilled answer
prefix: scoring and simulation), and ``answer_distribution_ids`` for prompts split into a
shared prefix and a suffix (:class:`SplitPrompt`, built by :func:`split_encode`), which lets
a backend compute each prefix once. ``load_backend("vllm", ...)`` runs vLLM's offline engine.

This module is the registry (:func:`backend_class`); :mod:`nlrw.backends.base` holds the
protocol and its types only, so a concrete backend imports ``base`` and nothing here. A new
backend is one file with a class taking ``(model, **options)`` and one line in
:func:`backend_class`.
"""

from __future__ import annotations

from typing import Any, Literal

from nlrw.backends.base import (
    AnswerDistribution,
    Backend,
    BackendError,
    Generation,
    Message,
    SplitPrompt,
    answer_token_ids,
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
    "backend_class",
    "backend_options",
    "load_backend",
    "render",
    "split_encode",
]


def backend_class(name: str) -> type[Any]:
    """The class of backend ``name`` (imports its module, not its heavy dependencies)."""
    if name == "transformers":
        from nlrw.backends.transformers import TransformersBackend

        return TransformersBackend
    if name == "openai":
        from nlrw.backends.openai import OpenAIBackend

        return OpenAIBackend
    if name == "vllm":
        from nlrw.backends.vllm import VLLMBackend

        return VLLMBackend
    raise ValueError(f"unknown backend {name!r}: expected 'transformers', 'openai' or 'vllm'")


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _coerce(where: str, value: Any, annotation: Any) -> Any:
    """A string option parsed to the constructor's annotated type (``int``, ``float``,
    ``bool``, ``None``); strings stay strings where the annotation allows ``str``."""
    if not isinstance(value, str):
        return value
    kinds = {part.strip() for part in str(annotation).split("|")}
    text = value.strip()
    if "None" in kinds and text.lower() in ("none", "null"):
        return None
    if kinds & {"str", "Any"} or not kinds & {"int", "float", "bool"}:
        return value  # a string type, a Literal or an alias: the constructor checks it
    if "bool" in kinds:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError(f"{where} must be true or false, got {value!r}")
    for kind, parse in (("int", int), ("float", float)):
        if kind in kinds:
            try:
                return parse(text)
            except ValueError:
                pass
    expected = "an integer" if "float" not in kinds else "a number"
    raise ValueError(f"{where} must be {expected}, got {value!r}")


def backend_options(name: str, options: Any) -> dict[str, Any]:
    """``options`` (a mapping or (name, value) pairs, e.g. a config's ``backend_options``,
    whose values come as strings from the command line or TOML) checked against backend
    ``name``'s constructor and parsed to its types: an unknown option or a value of the wrong
    type is a ``ValueError`` naming it, raised before any model or server is touched."""
    import inspect

    cls = backend_class(name)
    params = {
        p.name: p
        for p in list(inspect.signature(cls.__init__).parameters.values())[2:]  # self, model
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    out: dict[str, Any] = {}
    for key, value in dict(options).items():
        option = str(key).replace("-", "_")
        if option not in params:
            raise ValueError(
                f"backend option {key!r} is not an option of the {name} backend; it takes: "
                f"{', '.join(params)}"
            )
        out[option] = _coerce(f"backend option {key}", value, params[option].annotation)
    return out


def load_backend(
    name: Literal["transformers", "openai", "vllm"], model: str, **options: Any
) -> Backend:
    """A backend by name: ``"transformers"`` (:class:`TransformersBackend`), ``"openai"``
    (:class:`OpenAIBackend`) or ``"vllm"`` (:class:`VLLMBackend`, the ``nlrw[vllm]`` extra);
    ``options`` go to its constructor, strings parsed to its types (:func:`backend_options`)."""
    return backend_class(name)(model, **backend_options(name, options))
