"""nlrw: partially rewrite a transformer in natural language.

One MLP of a language model is approximated by a sparse transcoder; an LLM explains each
latent; an LLM simulator predicts each latent's activation from its explanation; the
simulated latents are spliced back into the model and the rise in next-token loss measures
how faithful the explanations are (Paulo & Belrose, 2025).

The CPU hot paths live in the Rust extension ``nlrw._core``; the Python wrappers in
:mod:`nlrw.model.topk`, :mod:`nlrw.model.quantiles` and :mod:`nlrw.model.shards` are the public
surface. The layout and its layer rule: ``docs/architecture.md``.
"""

from __future__ import annotations

from nlrw._core import ShardError
from nlrw._core import __version__ as __version__

__all__ = ["ShardError", "__version__"]
