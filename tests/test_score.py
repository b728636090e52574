"""Tests of the score stage: detection prompt text (golden), metrics against hand computations,
the derangement, disjointness from the explainer's examples, the stage with fake backends."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from nlrw import explain, score
from nlrw.backends.base import AnswerDistribution, Generation, Message
from nlrw.explain import ExplainConfig
from nlrw.prompts import detection as prompt
from nlrw.score import ScoreConfig, derangement, p_yes
from support import FakeExplainer, synthetic_source


def test_golden_detection_prompt() -> None:
    chat = prompt.render_chat("The word cat", ["the cat sat", "a dog\\nran"])
    assert chat == [
        {
            "role": "system",
            "content": (
                "You are an intelligent and meticulous linguistics researcher. You will be given "
                'a description of a feature of text, such as "male pronouns" or "text with '
                'negative sentiment", and several numbered text examples. For each example, '
                "decide whether the feature is present in it.\n"
                "\n"
                'Answer for every example in turn, one line each, as "Example N: Yes" if the '
                'feature is present in example N, or "Example N: No" if it is not. Write '
                "nothing else."
            ),
        },
        {
            "role": "user",
            "content": ("Feature: The word cat\n\nExample 1: the cat sat\nExample 2: a dog\\nran"),
        },
    ]
    assert prompt.answer_prefix(3) == "Example 3:"
    assert prompt.ANSWERS == ("Yes", "No")


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def test_p_yes_renormalizes_over_the_two_answers() -> None:
    probs = np.array([[0.3, 0.1], [0.0, 0.0], [0.02, 0.06]])
    assert p_yes(probs) == pytest.approx([0.75, 0.5, 0.25])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_derangement_has_no_fixed_point(seed: int) -> None:
    for n in range(2, 60):
        d = derangement(n, seed)
        assert sorted(d.tolist()) == list(range(n))
        assert not np.any(d == np.arange(n))
    assert derangement(1, seed).tolist() == [0]
    assert np.array_equal(derangement(30, seed), derangement(30, seed))


# --------------------------------------------------------------------------------------------
# Examples
# --------------------------------------------------------------------------------------------


def test_scoring_examples_are_disjoint_from_the_explainers() -> None:
    source = synthetic_source()
    ecfg = ExplainConfig(n_bins=10, examples_per_bin=4)
    scfg = ScoreConfig(n_bins=10, examples_per_bin=10, n_non_activating=50)
    for latent in (0, 1, 2):
        seen = explain.explainer_examples(source, latent, ecfg)
        ex = score.scoring_examples(source, latent, seen.tolist(), scfg)
        active = ex.windows[ex.labels]
        inactive = ex.windows[~ex.labels]
        assert not set(active.tolist()) & set(seen.tolist())
        assert set(active.tolist()) <= set(source.top_windows(latent).tolist())
        assert len(set(active.tolist())) == len(active)
        assert (source.activations(latent, inactive) == 0).all()
        assert len(inactive) == 50 and len(ex.texts) == len(ex.windows)
        # ten from each bin where the bin has ten left after the explainer's four
        top = source.top_windows(latent)
        bins = explain.bin_ranks(len(top), 10)
        rank = {w: r for r, w in enumerate(top.tolist())}
        per_bin = np.bincount(
            [next(b for b, ranks in enumerate(bins) if rank[w] in ranks) for w in active.tolist()],
            minlength=10,
        )
        assert per_bin.tolist() == [min(10, len(b) - 4) for b in bins]


# --------------------------------------------------------------------------------------------
# The stage with fake backends
# --------------------------------------------------------------------------------------------


class KeywordScorer:
    """A scorer that says Yes exactly when the example's text holds the explanation's word."""

    name = "keyword"
    model = "keyword"

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls: list[tuple[int, str]] = []
        self.fail_after = fail_after

    def generate(self, *_: object, **__: object) -> list[Generation]:
        raise AssertionError("the scorer never generates")

    def answer_distribution(
        self, chats: Sequence[Sequence[Message]], answer_prefix: str, answers: Sequence[str]
    ) -> AnswerDistribution:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("killed")
        assert tuple(answers) == ("Yes", "No")
        self.calls.append((len(chats), answer_prefix))
        index = int(answer_prefix.removeprefix("Example ").removesuffix(":"))
        probs = []
        for chat in chats:
            user = chat[-1]["content"]
            word = re.match(r"Feature: The word (\S+)", user)
            assert word is not None
            line = re.search(rf"^Example {index}: (.*)$", user, re.M)
            assert line is not None
            hit = {"cat": " cat", "dog": " dog", "period": "."}[word.group(1)] in line.group(1)
            probs.append([0.8, 0.1] if hit else [0.05, 0.45])
        p = np.array(probs)
        return AnswerDistribution(p, p.sum(1))

    def close(self) -> None:
        pass


def explained(tmp_path: Path) -> None:
    def reply(chat: Sequence[Message], seed: int) -> str:
        tok = re.search(r"<<( ?)(\S+?)>>", chat[-1]["content"])
        assert tok is not None
        return f"The word {dict(cat='cat', dog='dog').get(tok.group(2), 'period')}."

    cfg = ExplainConfig(n_bins=4, examples_per_bin=2, min_count=10)
    table = explain.run(
        cfg, tmp_path, backend=FakeExplainer(reply), source=synthetic_source(), progress=False
    )
    ok = table.filter(pl.col("status") == "ok")
    assert ok["explanation"].to_list() == ["The word cat", "The word dog", "The word period"]


def test_run_scores_and_shuffled_baseline(tmp_path: Path) -> None:
    explained(tmp_path)
    source = synthetic_source()
    cfg = ScoreConfig(n_bins=4, examples_per_bin=5, n_non_activating=20, part_size=2)
    scorer = KeywordScorer()
    scores = score.run(cfg, tmp_path, backend=scorer, source=source, progress=False)
    assert scores.columns == list(score.SCHEMA)
    assert scores.equals(pl.read_parquet(tmp_path / "scores.parquet"))
    assert (tmp_path / "score.json").is_file()
    assert scores["latent"].to_list() == [0, 1, 2]
    cat_dog = scores.filter(pl.col("latent") < 2)
    assert (cat_dog["balanced_accuracy"] == 1.0).all()
    assert (cat_dog["auroc"] == 1.0).all()
    assert (scores["shuffled_balanced_accuracy"] < 0.75).all()
    assert (scores["shuffled_from"] != scores["latent"]).all()
    assert sorted(scores["shuffled_from"].to_list()) == [0, 1, 2]
    assert (scores["n_activating"] == 20).all() and (scores["n_non_activating"] == 20).all()
    assert scores["mean_mass"].is_between(0.5, 0.9).all()
    # one call per example position per part: 40 examples in 8 prompts, real + shuffled
    assert scorer.calls == [(32, f"Example {i}:") for i in range(1, 6)] + [
        (16, f"Example {i}:") for i in range(1, 6)
    ]
    for row in scores.iter_rows(named=True):
        assert len(row["probs"]) == len(row["labels"]) == len(row["windows"]) == 40
        assert not np.isnan(row["probs"]).any() and not np.isnan(row["shuffled_probs"]).any()


def test_score_resumes_after_a_kill(tmp_path: Path) -> None:
    explained(tmp_path)
    source = synthetic_source()
    cfg = ScoreConfig(n_bins=4, examples_per_bin=2, n_non_activating=6, part_size=1)
    # 8 activating + 6 non-activating = 14 examples in prompts of 5, 5, 4: 5 calls per part
    with pytest.raises(KeyboardInterrupt):
        score.run(cfg, tmp_path, backend=KeywordScorer(fail_after=5), source=source, progress=False)
    assert len(list((tmp_path / "scores.parts").glob("part-*.parquet"))) == 1
    assert not (tmp_path / "scores.parquet").exists()
    scorer = KeywordScorer()
    scores = score.run(cfg, tmp_path, backend=scorer, source=source, progress=False)
    assert len(scorer.calls) == 2 * 5  # only the two latents left
    fresh_dir = tmp_path / "fresh"
    fresh_dir.mkdir()
    (fresh_dir / "explanations.parquet").write_bytes(
        (tmp_path / "explanations.parquet").read_bytes()
    )
    fresh = score.run(cfg, fresh_dir, backend=KeywordScorer(), source=source, progress=False)
    assert fresh.equals(scores)


class _OneAnswerAtATime:
    """The same real backend with its split-prompt path hidden: every example's answer is then
    a whole-prompt forward (the reference for the shared-prefix path)."""

    def __init__(self, backend: object) -> None:
        self._backend = backend
        self.name, self.model = "reference", "reference"

    def answer_distribution(self, chats, answer_prefix, answers):
        return self._backend.answer_distribution(chats, answer_prefix, answers)  # type: ignore[attr-defined]


@pytest.mark.parametrize("chat_template", [True, False])
def test_shared_prefix_scoring_equals_one_forward_per_answer(chat_template: bool) -> None:
    from nlrw.backends.transformers import TransformersBackend
    from support import tiny_model, tiny_tokenizer

    backend = TransformersBackend(
        "tiny",
        dtype="float32",
        device="cpu",
        tokenizer=tiny_tokenizer(chat_template=chat_template),
        model_obj=tiny_model("qwen2"),
        max_length=2048,  # rotary positions: the tiny config's 256 is no hard limit
    )
    jobs = [
        ("The word cat", ["a cat sat", "the dog ran", "cats and dogs", "no", "it rained"]),
        ("Words about rain", ["it rained", "a cat sat", "wet"]),
    ]
    fast = score.score_texts(backend, jobs, examples_per_prompt=2)
    slow = score.score_texts(_OneAnswerAtATime(backend), jobs, examples_per_prompt=2)  # type: ignore[arg-type]
    for (py_fast, mass_fast), (py_slow, mass_slow) in zip(fast, slow, strict=True):
        np.testing.assert_allclose(py_fast, py_slow, atol=1e-5)
        np.testing.assert_allclose(mass_fast, mass_slow, atol=1e-5)
