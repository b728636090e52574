"""Prompt templates of the LLM stages, kept apart from the code that calls them and pinned by
golden tests of the exact rendered text (``tests/test_explain.py``, ``tests/test_score.py``).

* :mod:`nlrw.prompts.explain`: the explainer's chat (highlighted top-activating examples);
* :mod:`nlrw.prompts.detection`: the detection scorer's chat (does the explanation apply?).

Each module exposes ``PROMPT_HASH``: a short hash of its template strings, recorded beside every
output so a changed template is visible in the results.
"""
