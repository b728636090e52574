"""The shared metrics (``nlrw.lib.metrics``): hand-worked cases and the pairwise definition."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nlrw.lib.metrics import auroc, balanced_accuracy, pearson


def test_balanced_accuracy_by_hand() -> None:
    labels = np.array([1, 1, 1, 1, 0, 0], dtype=bool)
    probs = np.array([0.9, 0.6, 0.5, 0.1, 0.2, 0.7])
    # p > 0.5: TP = 2 of 4 (0.5 is not above), TN = 1 of 2 -> (0.5 + 0.5) / 2
    assert balanced_accuracy(probs, labels) == pytest.approx(0.5)
    assert balanced_accuracy(probs, labels, threshold=0.05) == pytest.approx((1.0 + 0.0) / 2)
    assert balanced_accuracy(np.where(labels, 1.0, 0.0), labels) == 1.0
    assert np.isnan(balanced_accuracy(np.ones(3), np.ones(3, bool)))


def test_auroc_by_hand() -> None:
    labels = np.array([1, 1, 0, 0, 0], dtype=bool)
    probs = np.array([0.8, 0.4, 0.4, 0.3, 0.9])
    # pairs (pos, neg): 0.8 beats 0.4, 0.3, not 0.9 -> 2; 0.4 ties 0.4 (1/2), beats 0.3 -> 1.5
    assert auroc(probs, labels) == pytest.approx(3.5 / 6)
    assert auroc(np.where(labels, 0.9, 0.1), labels) == 1.0
    assert auroc(np.full(5, 0.5), labels) == 0.5
    assert auroc([1.0, 1.0, 1.0], [True, False, False]) == 0.5
    assert np.isnan(auroc(np.ones(3), np.zeros(3, bool)))


def test_auroc_equals_the_pairwise_definition_with_ties() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(2, 40))
        scores = np.round(rng.uniform(0, 5, n))  # many ties
        labels = rng.random(n) < 0.4
        pos, neg = scores[labels], scores[~labels]
        if not len(pos) or not len(neg):
            assert math.isnan(auroc(scores, labels))
            continue
        diff = pos[:, None] - neg[None, :]
        want = (diff > 0).mean() + 0.5 * (diff == 0).mean()
        assert auroc(scores, labels) == pytest.approx(want, abs=1e-12)


def test_pearson() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=50), rng.normal(size=50)
    assert pearson(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-12)
    assert math.isnan(pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    assert math.isnan(pearson([1.0], [2.0]))
