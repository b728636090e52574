"""Prompt templates of the LLM stages, kept apart from the code that calls them and pinned by
golden tests of the exact rendered text (``tests/test_explain.py``, ``tests/test_score.py``,
``tests/test_simulate.py``).

* :mod:`nlrw.prompts.explain`: the explainer's chat (highlighted top-activating examples);
* :mod:`nlrw.prompts.detection`: the detection scorer's chat (does the explanation apply?);
* :mod:`nlrw.prompts.simulation`: the simulator's chat (a 0-9 rating of the last token), in
  two layouts split into a shared prefix and a suffix;
* :mod:`nlrw.prompts.markup`: how token text is written into all three (escaping, the ``<<…>>``
  highlighting and last-token mark).

Each template module (explain, detection, simulation) exposes ``PROMPT_HASH``: a short hash of
its template strings, recorded beside every output and counted in the stage hashes, so a changed
template re-runs its stage.
"""
