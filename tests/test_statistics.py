"""nlrw.lib.statistics against hand-worked examples and closed forms (no statsmodels or scipy here).

Student's t has closed forms for 1 and 2 degrees of freedom (``½ + atan(t)/π`` and
``½ + t / (2√(2 + t²))``) and tabulated quantiles for others; the TOST and Holm examples are
worked by hand in the comments.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from nlrw.lib import statistics as st


@pytest.mark.parametrize("t", [-30.0, -2.5, -1.0, -0.1, 0.0, 0.3, 1.0, 4.0, 50.0])
def test_student_t_cdf_closed_forms(t: float) -> None:
    assert st.student_t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
    assert st.student_t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)


@pytest.mark.parametrize(
    ("quantile", "df", "p"),
    [  # tabulated Student t quantiles
        (2.570582, 5, 0.975),
        (1.812461, 10, 0.95),
        (5.840909, 3, 0.995),
        (2.042272, 30, 0.975),
        (1.983972, 100, 0.975),
    ],
)
def test_student_t_cdf_table(quantile: float, df: int, p: float) -> None:
    assert st.student_t_cdf(quantile, df) == pytest.approx(p, abs=2e-7)
    assert st.student_t_cdf(-quantile, df) == pytest.approx(1 - p, abs=2e-7)


def test_student_t_cdf_limits_and_bad_input() -> None:
    assert st.student_t_cdf(math.inf, 4) == 1.0 and st.student_t_cdf(-math.inf, 4) == 0.0
    # large df: the normal distribution, Φ(1.959964) = 0.975
    assert st.student_t_cdf(1.959964, 1e7) == pytest.approx(0.975, abs=1e-6)
    with pytest.raises(ValueError, match="df must be > 0"):
        st.student_t_cdf(1.0, 0)


def test_tost_hand_worked_not_equivalent() -> None:
    # d = (1, 2, 3): mean 2, s = 1, se = 1/√3, df = 2; margin 3.
    # t⁻ = (2 + 3)√3 = 5√3, p⁻ = 1 − T₂(5√3) = ½ − 5√3 / (2√77)
    # t⁺ = (2 − 3)√3 = −√3, p⁺ = T₂(−√3) = ½ − √3 / (2√5) ≈ 0.1127 → not equivalent.
    r = st.tost_paired([1.0, 2.0, 3.0], margin=3.0)
    assert r.t_lower == pytest.approx(5 * math.sqrt(3))
    assert r.t_upper == pytest.approx(-math.sqrt(3))
    assert r.p_lower == pytest.approx(0.5 - 5 * math.sqrt(3) / (2 * math.sqrt(77)))
    assert r.p_upper == pytest.approx(0.5 - math.sqrt(3) / (2 * math.sqrt(5)))
    assert r.p_value == pytest.approx(0.11270166537925831)
    assert not r.equivalent


def test_tost_hand_worked_equivalent() -> None:
    # d = (−0.1, 0.1, 0, 0.2, −0.2): mean 0, s = √(0.1/4) = 0.158114, se = 0.0707107, df = 4;
    # margin 0.5: t⁻ = 0.5 / se = 7.0711, t⁺ = −7.0711, p = 1 − T₄(7.0711).
    # T₄ closed form: ½ + ½·t(t² + 6) / (t² + 4)^{3/2}; at t = √50: 1 − p = ½ + ½·√50·56/54^{1.5}.
    r = st.tost_paired([-0.1, 0.1, 0.0, 0.2, -0.2], margin=0.5)
    t = math.sqrt(50)
    expected = 0.5 - 0.5 * t * (t * t + 6) / (t * t + 4) ** 1.5
    assert r.t_lower == pytest.approx(t) and r.t_upper == pytest.approx(-t)
    assert r.p_value == pytest.approx(expected, rel=1e-9)
    assert r.p_value == pytest.approx(0.0010553, abs=1e-7)
    assert r.equivalent


def test_tost_constant_differences_and_bad_input() -> None:
    # every difference equal (exactly representable: zero standard error)
    assert st.tost_paired([0.25, 0.25, 0.25], margin=0.5).p_value == 0.0
    assert st.tost_paired([0.75, 0.75, 0.75], margin=0.5).p_value == 1.0
    with pytest.raises(ValueError, match="margin must be > 0"):
        st.tost_paired([0.1, 0.2], margin=0.0)
    with pytest.raises(ValueError, match="margin must be > 0"):
        st.tost_paired([0.1, 0.2], margin=-1.0)
    with pytest.raises(ValueError, match="at least two"):
        st.tost_paired([0.1], margin=1.0)


def test_tost_rejects_at_the_stated_rate_at_the_margin() -> None:
    # True mean exactly at the margin: TOST must call equivalence in at most ~α of samples.
    rng = np.random.default_rng(0)
    calls = [st.tost_paired(rng.normal(0.2, 1.0, 30), margin=0.2).equivalent for _ in range(2000)]
    assert np.mean(calls) < 0.065
    # ... and with a true mean of 0 and a wide margin it calls equivalence nearly always.
    calls = [st.tost_paired(rng.normal(0.0, 1.0, 30), margin=1.0).equivalent for _ in range(200)]
    assert np.mean(calls) > 0.95


def test_holm_hand_worked() -> None:
    # sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → max(0.06, 0.04)
    got = st.holm([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(got, [0.03, 0.06, 0.06, 0.02])
    # capped at 1; NaN is outside the family (m = 3 here)
    got = st.holm([0.5, np.nan, 0.2, 0.01])
    np.testing.assert_allclose(got, [0.5, np.nan, 0.4, 0.03])
    assert np.isnan(st.holm([np.nan])).all()
    np.testing.assert_allclose(st.holm([0.9, 0.8]), [1.0, 1.0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        st.holm([0.5, 1.5])


def test_holm_is_bonferroni_for_the_smallest_and_monotone() -> None:
    p = np.random.default_rng(1).random(50) ** 3
    adj = st.holm(p)
    assert adj[np.argmin(p)] == pytest.approx(min(1.0, 50 * p.min()))
    order = np.argsort(p)
    assert (np.diff(adj[order]) >= 0).all() and (adj >= p).all()


def test_one_sided_sign_flip_equals_exact_enumeration() -> None:
    diff = np.array([-0.3, -0.1, 0.05, -0.4, -0.2, 0.1, -0.25])
    signs = np.array(list(itertools.product([-1.0, 1.0], repeat=len(diff))))
    exact = sum((s * diff).mean() <= diff.mean() + 1e-12 for s in signs)
    assert st.sign_flip_p_less(diff, signs) == pytest.approx((1 + exact) / (1 + len(signs)))
    # a condition worse than the reference is not "better": p near 1
    assert st.sign_flip_p_less(-diff, signs) > 0.9
    assert st.sign_flip_p_less(np.zeros(7), signs) == 1.0


def test_hierarchical_bootstrap_resamples_both_levels() -> None:
    # Two trials whose means differ by 10 and no context-level noise: a bootstrap over contexts
    # alone has zero width, the hierarchical one spans the trials.
    values = np.column_stack([np.zeros(20), np.full(20, 10.0)])
    rng = np.random.default_rng(0)
    ctx = rng.integers(0, 20, size=(500, 20))
    trials = rng.integers(0, 2, size=(500, 2))
    means = st.hierarchical_bootstrap_means(values, ctx, trials)
    assert set(np.unique(means)) == {0.0, 5.0, 10.0}
    np.testing.assert_allclose(np.percentile(means, [2.5, 97.5]), [0.0, 10.0])
    fixed = st.hierarchical_bootstrap_means(values, ctx, np.tile([0, 1], (500, 1)))
    np.testing.assert_allclose(fixed, 5.0)
    # one trial: the ordinary bootstrap of the contexts
    one = rng.normal(size=(20, 1))
    np.testing.assert_allclose(
        st.hierarchical_bootstrap_means(one, ctx, np.zeros((500, 1), int)), one[ctx, 0].mean(1)
    )
    with pytest.raises(ValueError, match="do not match"):
        st.hierarchical_bootstrap_means(values, ctx[:, :5], trials)
