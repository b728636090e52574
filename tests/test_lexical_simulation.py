"""``tools/lexical_simulation.py``: the explanation's quoted words checked against the marked
token, as a simulator, on a real smoke run whose explanations are rewritten by hand."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from nlrw.contexts import read_contexts, true_activations
from nlrw.explain import quoted_words
from nlrw.model.subject import load_tokenizer

TOOL = Path(__file__).resolve().parent.parent / "tools" / "lexical_simulation.py"


def _measure(run_dir: Path, split: str = "calibration") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(TOOL), str(run_dir), "--split", split],
        capture_output=True,
        text=True,
        check=False,
    )


def _explain_as(run_dir: Path, texts: dict[int, str]) -> None:
    path = run_dir / "explanations.parquet"
    table = pl.read_parquet(path)
    text = [texts.get(lat, e) for lat, e in zip(table["latent"], table["explanation"], strict=True)]
    table.with_columns(
        pl.Series("explanation", text, pl.String),
        pl.Series("quoted_words", [quoted_words(t) for t in text], pl.List(pl.String)),
    ).write_parquet(path)


def test_quoting_the_active_contexts_marked_tokens_finds_them(
    finished_smoke_run: Path, tmp_path: Path
) -> None:
    b = tmp_path / "b"
    shutil.copytree(finished_smoke_run, b)
    latents = pl.read_parquet(b / "explanations.parquet")["latent"].to_list()
    # The evaluation split: the smoke run's 12 contexts there against 6 for calibration.
    contexts = read_contexts(b, "eval").sort("context_id")
    ids = contexts["context_id"].to_numpy()
    active = true_activations(b, latents, ids) > 0
    tokenizer = load_tokenizer("tiny-random-llama")
    marked = ["".join(tokenizer.decode([x[-1]]).split()).casefold() for x in contexts["input_ids"]]
    # The latent active on most contexts that end in a token with a visible word (a marked
    # token of whitespace only can be quoted by no explanation).
    worded = np.array([bool(m) for m in marked])
    i = int(np.argmax((active & worded).sum(axis=1)))
    assert (active[i] & worded).any() and not active[i].all()
    words = sorted({marked[c] for c in np.flatnonzero(active[i] & worded)})
    texts = {latents[i]: "Tokens " + " ".join(f'"{w}"' for w in words)}
    texts |= {lat: 'The word "zzzqqq"' for j, lat in enumerate(latents) if j != i}
    _explain_as(b, texts)
    done = _measure(b, "eval")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    row = next(r for r in report["latents"] if r["latent"] == latents[i])
    match = np.array([m in words for m in marked])
    assert row["matches_when_active"] == int((match & active[i]).sum()) > 0
    assert row["matches"] == int(match.sum())
    # A 0/1 score's AUROC, ties counted half: (1 + TPR − FPR) / 2.
    true_positive = (match & active[i]).sum() / active[i].sum()
    false_positive = (match & ~active[i]).sum() / (~active[i]).sum()
    assert row["lexical_auroc"] == pytest.approx((1 + true_positive - false_positive) / 2)
    assert row["lexical_auroc"] > 0.5
    # A quoted word no context ends in rates every context alike: chance.
    for other in report["latents"]:
        if other["latent"] != latents[i] and other["lexical_auroc"] is not None:
            assert other["lexical_auroc"] == 0.5 and other["matches"] == 0
    assert report["latents_quoting"] == len(latents)


def test_a_run_with_too_few_quoting_explanations_is_refused(
    finished_smoke_run: Path, tmp_path: Path
) -> None:
    b = tmp_path / "b"
    shutil.copytree(finished_smoke_run, b)
    latents = pl.read_parquet(b / "explanations.parquet")["latent"].to_list()
    _explain_as(b, dict.fromkeys(latents, "Nothing quoted here"))
    done = _measure(b)
    assert done.returncode != 0 and "fewer than two explanations quote words" in done.stderr
