"""Tests of the score stage: detection prompt text (golden), metrics against hand computations,
the derangement, disjointness from the explainer's examples (windows, and sequences on a run
directory's cache), the stage with fake backends, the confidence intervals and the sizing."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from nlrw import explain, score
from nlrw.backends.base import AnswerDistribution, Generation, Message
from nlrw.config.score import examples_for_se
from nlrw.explain import ExplainConfig
from nlrw.pipeline import load_preset
from nlrw.prompts import detection as prompt
from nlrw.score import ScoreConfig, derangement, p_yes
from support import SOURCE_TOKENS, FakeExplainer, synthetic_source


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


# --------------------------------------------------------------------------------------------
# Sequences disjoint from the explainer's, on a run directory's cache
# --------------------------------------------------------------------------------------------

CTX, WINDOW = 32, 8  # 4 windows per sequence


class _Tokenizer:
    def decode(self, ids: Sequence[int]) -> str:
        return "".join(SOURCE_TOKENS[int(i)] for i in ids)


def _cache_run(run_dir: Path, n_seq: int = 60, seed: int = 0) -> np.ndarray:
    """A run directory with held-out tokens and a finished latent cache in the cache stage's
    layout (``nlrw.cache``): latent 0 fires on " cat", latent 1 on " dog" (in about half the
    windows, across every sequence), latent 2 (on ".") only in four windows of sequences 5 and 9.
    Returns the dense activations ``[rows, 3]``."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, len(SOURCE_TOKENS), size=(n_seq, CTX))
    tokens[tokens == 5] = 2  # "." only where latent 2 fires
    for seq, pos in [(5, 1), (5, 9), (5, 20), (9, 30)]:
        tokens[seq, pos] = 5
    src = run_dir / "activations" / "eval"
    src.mkdir(parents=True)
    np.save(src / "tokens.npy", tokens.astype(np.int32))
    flat = tokens.reshape(-1)
    strength = rng.uniform(0.5, 5.0, size=flat.size)
    dense = np.stack([np.where(flat == tok, strength, 0.0) for tok in (1, 7, 5)], axis=1)
    row, latent = np.nonzero(dense)
    order = np.lexsort((row, latent))
    row, latent = row[order].astype(np.int64), latent[order].astype(np.int32)
    value = dense[row, latent].astype(np.float32)
    out = run_dir / "latents"
    out.mkdir()
    pl.DataFrame({"row": row, "latent": latent, "value": value}).write_parquet(
        out / "part-000000.parquet"
    )
    window = (row // CTX) * (CTX // WINDOW) + (row % CTX) // WINDOW
    top = (
        pl.DataFrame({"latent": latent, "window": window, "value": value})
        .group_by("latent", "window")
        .agg(pl.col("value").max().alias("max_activation"))
        .sort(["latent", "max_activation", "window"], descending=[False, True, False])
        .with_columns(pl.int_range(pl.len()).over("latent").cast(pl.Int32).alias("rank"))
        .filter(pl.col("rank") < 80)
    )
    top.write_parquet(out / "top_windows.parquet")
    counts = np.bincount(latent, minlength=3)
    pl.DataFrame({"latent": np.arange(3, dtype=np.int32), "count": counts}).write_parquet(
        out / "stats.parquet"
    )
    (out / "parts.json").write_text(
        json.dumps({"parts": [{"chunk": 0, "file": "part-000000.parquet"}]})
    )
    n_windows = n_seq * (CTX // WINDOW)
    (out / "cache.json").write_text(
        json.dumps(
            {
                "ctx_len": CTX,
                "window_len": WINDOW,
                "windows_per_sequence": CTX // WINDOW,
                "activations": str(src),
                "result": {"n_rows": n_seq * CTX, "n_windows": n_windows},
            }
        )
    )
    return dense


def test_scoring_examples_never_share_a_sequence_with_the_explainers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dense = _cache_run(tmp_path)
    source = explain.CacheSource(tmp_path, tokenizer=_Tokenizer())
    assert score.sequence_layout(source) == (4, 240)
    words = {" cat": "cat", " dog": "dog"}

    def reply(chat: Sequence[Message], seed: int) -> str:
        tok = re.search(r"<<( ?\S+?)>>", chat[-1]["content"])
        assert tok is not None
        return f"The word {words.get(tok.group(1), 'period')}."

    ecfg = ExplainConfig(n_bins=4, examples_per_bin=2, min_count=1)
    explain.run(ecfg, tmp_path, backend=FakeExplainer(reply), source=source, progress=False)
    cfg = ScoreConfig(n_bins=4, target_se=0.1, part_size=2)  # 13 per class: 4 x 4 + 13
    assert (cfg.examples_per_bin, cfg.n_non_activating) == (4, 13)
    with caplog.at_level("WARNING", logger="nlrw.score"):
        scores = score.run(cfg, tmp_path, backend=KeywordScorer(), source=source, progress=False)
    shown = {
        r["latent"]: r["windows"]
        for r in pl.read_parquet(tmp_path / "explanations.parquet").iter_rows(named=True)
    }
    window_max = dense.reshape(-1, WINDOW, 3).max(1)  # [windows, latents]
    for r in scores.iter_rows(named=True):
        latent, windows = r["latent"], np.array(r["windows"])
        blocked = {w // 4 for w in shown[latent]}
        assert blocked and not blocked & {int(w) // 4 for w in windows}
        labels = np.array(r["labels"], dtype=bool)
        assert (window_max[windows[labels], latent] > 0).all()
        assert (window_max[windows[~labels], latent] == 0).all()
        # the candidates removed, by brute force
        top = source.top_windows(latent)
        near = np.array([s * 4 + j for s in blocked for j in range(4)])
        assert r["n_excluded_sequences"] == len(blocked)
        assert r["n_removed_activating"] == sum(
            1 for w in top.tolist() if w // 4 in blocked and w not in shown[latent]
        )
        assert r["n_removed_non_activating"] == int((window_max[near, latent] == 0).sum())
    full = scores.filter(pl.col("latent") < 2)
    assert (full["n_activating"] == 16).all() and (full["n_non_activating"] == 13).all()
    assert (full["n_removed_activating"] > 0).all() and (full["balanced_accuracy"] == 1.0).all()
    # latent 2's four windows were all shown to the explainer: nothing left to score it on
    rare = scores.row(2, named=True)
    assert rare["n_activating"] == 0 and rare["n_non_activating"] == 13
    assert np.isnan(rare["balanced_accuracy"]) and np.isnan(rare["balanced_accuracy_se"])
    assert "latent 2 (0 + 13)" in caplog.text and "fewer examples" in caplog.text
    record = json.loads((tmp_path / "score.json").read_text())
    assert record["short_latents"] == [{"latent": 2, "n_activating": 0, "n_non_activating": 13}]
    assert record["examples_asked"] == {"activating": 16, "non_activating": 13}
    excluded = record["sequence_exclusion"]
    assert excluded["windows_per_sequence"] == 4
    assert excluded["removed_activating_candidates"] == scores["n_removed_activating"].sum()
    assert excluded["removed_non_activating_candidates"] == scores["n_removed_non_activating"].sum()
    assert record["mean_balanced_accuracy_se"] == pytest.approx(
        scores["balanced_accuracy_se"].drop_nans().mean()
    )
    diff = record["real_minus_shuffled_balanced_accuracy"]
    assert diff["n_latents"] == 2 and diff["ci_low"] <= diff["mean"] <= diff["ci_high"]


# --------------------------------------------------------------------------------------------
# Confidence intervals and sizing
# --------------------------------------------------------------------------------------------


def test_balanced_accuracy_interval_by_hand() -> None:
    # 10 activating, all called; 10 non-activating, 5 called: BA = (1 + 0.5) / 2 = 0.75.
    labels = np.r_[np.ones(10, bool), np.zeros(10, bool)]
    probs = np.r_[np.full(10, 0.9), np.full(5, 0.9), np.full(5, 0.1)]
    # Agresti-Caffo: t = 11/12, s = 6/12; se = 0.5 sqrt(t(1-t)/12 + s(1-s)/12)
    se = 0.5 * np.sqrt((11 / 12) * (1 / 12) / 12 + 0.25 / 12)
    assert se == pytest.approx(0.0824607, abs=1e-7)
    got = score.balanced_accuracy_interval(probs, labels)
    assert got.se == pytest.approx(se)
    # centred on (t + s) / 2 = 0.708333, +- 1.959964 se
    assert got.low == pytest.approx(0.546713, abs=1e-6)
    assert got.high == pytest.approx(0.869954, abs=1e-6)
    # A perfect score on 50 + 50 still has a standard error (not 0) and stays within [0, 1].
    perfect = score.balanced_accuracy_interval(
        np.r_[np.ones(50), np.zeros(50)], np.r_[labels[:10].repeat(5), labels[10:].repeat(5)]
    )
    assert perfect.se == pytest.approx(0.5 * np.sqrt(2 * (51 / 52) * (1 / 52) / 52))
    assert perfect.high == 1.0 and 0.9 < perfect.low < 1.0
    # Chance at the worst case p = 0.5 with 50 per class: SE <= 0.05, the sizing's promise.
    half = np.r_[np.ones(25), np.zeros(25), np.ones(25), np.zeros(25)]
    chance = score.balanced_accuracy_interval(half, np.r_[np.ones(50, bool), np.zeros(50, bool)])
    assert chance.se == pytest.approx(0.5 * np.sqrt(2 * 0.25 / 52)) and chance.se <= 0.05
    assert np.isnan(score.balanced_accuracy_interval([0.9], [True]).se)


def test_paired_difference_by_hand() -> None:
    got = score.paired_difference([0.7, 0.8, 0.9, float("nan")], [0.6, 0.6, 0.6, 0.5])
    # d = 0.1, 0.2, 0.3: mean 0.2, sd 0.1, se 0.1 / sqrt 3; t_{0.975, 2} = 4.302653
    assert got["n_latents"] == 3 and got["mean"] == pytest.approx(0.2)
    assert got["se"] == pytest.approx(0.1 / np.sqrt(3))
    assert got["ci_low"] == pytest.approx(0.2 - 4.302653 * 0.1 / np.sqrt(3), abs=1e-6)
    assert got["ci_high"] == pytest.approx(0.2 + 4.302653 * 0.1 / np.sqrt(3), abs=1e-6)
    one = score.paired_difference([0.7], [0.5])
    assert one["mean"] == pytest.approx(0.2) and one["ci_low"] is None


def test_target_se_sizes_the_examples() -> None:
    assert [examples_for_se(s) for s in (0.05, 0.1, 0.03, 0.5)] == [50, 13, 139, 1]
    cfg = ScoreConfig(n_bins=4, examples_per_bin=2, n_non_activating=8, target_se=0.05)
    assert (cfg.examples_per_bin, cfg.n_non_activating) == (13, 50)
    # the sizing replaces the given counts, and a config rebuilt from its fields is the same
    big = ScoreConfig(n_bins=10, examples_per_bin=10, n_non_activating=100, target_se=0.05)
    assert (big.examples_per_bin, big.n_non_activating) == (5, 50)
    assert ScoreConfig(**big.__dict__) == big
    assert ScoreConfig(target_se=None).examples_per_bin == 10
    demo = load_preset("demo").score
    assert demo.target_se is not None and demo.target_se <= 0.05
    assert demo.n_bins * demo.examples_per_bin >= 50 and demo.n_non_activating >= 50


@pytest.mark.parametrize("bad", [0.0, -0.05, float("nan"), float("inf")])
def test_target_se_must_be_positive(bad: float) -> None:
    with pytest.raises(ValueError, match=r"score\.target_se must be a positive number"):
        ScoreConfig(target_se=bad)
