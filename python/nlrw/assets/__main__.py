"""``python -m nlrw.assets``: prepare every embedded asset by hand (convert the default models,
build the corpus cache)."""

import logging
import sys

from nlrw.assets import MODEL_ALIASES, austen_corpus, resolve_model

logging.basicConfig(level=logging.INFO)
for alias in MODEL_ALIASES:
    print(alias, resolve_model(alias), file=sys.stderr)
print(austen_corpus(), file=sys.stderr)
