"""Model names -> something ``from_pretrained`` loads: :func:`resolve_model` maps the embedded
defaults' aliases (and any ``.gguf`` path) to a converted local folder, the smoke-run alias to
the tiny random Llama, and leaves every other name untouched."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from nlrw.assets.convert import convert_gguf
from nlrw.assets.simulator import SIMULATOR_ALIAS, simulator_gguf
from nlrw.assets.subject import SUBJECT_ALIAS, subject_gguf
from nlrw.assets.tiny import TINY_MODEL_ALIAS, tiny_random_llama

GENERATED_MODELS: dict[str, Callable[[], Path]] = {TINY_MODEL_ALIAS: tiny_random_llama}
"""Model aliases built locally rather than converted from a packaged GGUF."""


MODEL_ALIASES: dict[str, Callable[[], Path]] = {
    SUBJECT_ALIAS: subject_gguf,
    SIMULATOR_ALIAS: simulator_gguf,
}
"""Model aliases accepted by :func:`resolve_model`, each with the function giving its GGUF."""


def resolve_model(name_or_path: str) -> str:
    """Turn a model name into something ``from_pretrained`` loads.

    * ``"smollm2-135m"`` / ``"qwen2.5-coder-0.5b"`` (any case): the converted local folder of the
      embedded default (converted on first use, see :func:`convert_gguf`);
    * ``"tiny-random-llama"``: :func:`tiny_random_llama`, for smoke runs;
    * a path to a ``.gguf`` file: its converted folder;
    * anything else (a hub name, a local Hugging Face folder): returned unchanged.

    Raises:
        FileNotFoundError: a name ending in ``.gguf`` that is not an existing file.
        MissingPackageError: an alias whose asset package is not installed.
    """
    alias = name_or_path.strip().lower()
    if alias in GENERATED_MODELS:
        return str(GENERATED_MODELS[alias]())
    getter = MODEL_ALIASES.get(alias)
    if getter is not None:
        return str(convert_gguf(getter()))
    if name_or_path.lower().endswith(".gguf"):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return str(convert_gguf(path))
    return name_or_path
