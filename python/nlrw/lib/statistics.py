"""The inference of the evaluate stage: paired tests against zero ablation, equivalence,
multiplicity and the bootstrap, as small pure functions over arrays.

Every comparison is *paired*: a condition and zero ablation are evaluated on the same contexts,
and the unit is the per-context difference ``d_c = CE_c(condition) − CE_c(zero ablation)``
(random choices: the trials are averaged per context first). With ``n`` contexts,
``d̄ = mean(d)``, ``s`` the sample standard deviation of d and ``se = s / √n``:

* **Difference** (two-sided sign-flip permutation test, :func:`paired_sign_flip_p`):
  ``H0: d is symmetric about 0``; ``p = (1 + #{|mean(σ·d)| ≥ |d̄|}) / (1 + B)`` over ``B``
  random sign vectors σ.
* **Better than zero ablation** (one-sided sign-flip test, :func:`sign_flip_p_less`):
  ``H1: the condition's CE is lower``; ``p = (1 + #{mean(σ·d) ≤ d̄}) / (1 + B)``.
* **Equivalence** (paired TOST, :func:`tost_paired`): with margin ``m > 0`` nats, two one-sided
  t-tests of ``H0⁻: μ ≤ −m`` and ``H0⁺: μ ≥ m`` (μ the mean difference)::

      t⁻ = (d̄ + m) / se,   p⁻ = 1 − T_{n−1}(t⁻)
      t⁺ = (d̄ − m) / se,   p⁺ = T_{n−1}(t⁺)
      p_TOST = max(p⁻, p⁺)

  and the condition is *equivalent to zero ablation* within ±m when ``p_TOST < α``. A large
  two-sided p-value is not evidence of similarity; a small ``p_TOST`` is (Schuirmann 1987).
  ``T_ν`` is Student's t distribution function (:func:`student_t_cdf`), computed here from the
  regularized incomplete beta function (no scipy).
* **Multiplicity** (:func:`holm`): Holm's step-down adjustment of the ``m`` p-values of one
  family: with ``p_(1) ≤ … ≤ p_(m)``, ``p̃_(i) = max_{j ≤ i} min(1, (m − j + 1) p_(j))``.
  Rejecting where ``p̃ < α`` controls the family-wise error rate at α under any dependence.
* **Bootstrap** (:func:`hierarchical_bootstrap_means`): percentile CIs of a mean over contexts
  and trials from resamples of the contexts *and* of the trials (with replacement, each level
  independently), so that where the latents of a trial are drawn at random the interval also
  reflects which latents were drawn. With one trial it is the ordinary bootstrap of contexts.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

__all__ = [
    "TostResult",
    "hierarchical_bootstrap_means",
    "holm",
    "paired_sign_flip_p",
    "regularized_incomplete_beta",
    "sign_flip_p_less",
    "student_t_cdf",
    "tost_paired",
]


# --------------------------------------------------------------------------------------------
# Student's t distribution
# --------------------------------------------------------------------------------------------


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of ``I_x(a, b)`` (modified Lentz; Numerical Recipes' betacf)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """``I_x(a, b) = B(x; a, b) / B(a, b)`` for ``a, b > 0``, ``x ∈ [0, 1]``.

    The continued fraction converges fast for ``x < (a + 1) / (a + b + 2)``; above, the
    symmetry ``I_x(a, b) = 1 − I_{1−x}(b, a)`` is used.
    """
    if not (a > 0 and b > 0):
        raise ValueError(f"a and b must be > 0, got {a}, {b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x}")
    if x == 0.0 or x == 1.0:
        return x
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """``T_ν(t) = P(T ≤ t)`` for Student's t with ``ν = df > 0`` degrees of freedom.

    ``P(|T| > |t|) = I_{ν/(ν+t²)}(ν/2, 1/2)``, so ``T_ν(t) = 1 − ½ I(…)`` for ``t ≥ 0`` and
    ``½ I(…)`` below; ``±inf`` give 1 and 0.
    """
    if not df > 0:
        raise ValueError(f"df must be > 0, got {df}")
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


# --------------------------------------------------------------------------------------------
# Tests against zero ablation
# --------------------------------------------------------------------------------------------


def paired_sign_flip_p(diff: npt.ArrayLike, signs: np.ndarray) -> float:
    """Two-sided p-value of a sign-flip permutation test of ``mean(diff) = 0``.

    ``signs`` ``[n_permutations, n]`` of ±1: ``p = (1 + #{|mean(s·d)| ≥ |mean(d)|}) /
    (1 + n_permutations)`` (a relative tolerance of 1e-12 counts ties as extreme).
    """
    d = np.asarray(diff, dtype=np.float64)
    observed = abs(d.mean())
    flipped = np.abs(signs @ d) / len(d)
    extreme = int(np.count_nonzero(flipped >= observed * (1 - 1e-12)))
    return (1 + extreme) / (1 + signs.shape[0])


def sign_flip_p_less(diff: npt.ArrayLike, signs: np.ndarray) -> float:
    """One-sided sign-flip p-value for ``mean(diff) < 0`` (the condition beats the reference).

    ``p = (1 + #{mean(s·d) ≤ mean(d)}) / (1 + n_permutations)``, ties within a relative
    1e-12 counted as extreme; a ``diff`` of all zeros gives 1.
    """
    d = np.asarray(diff, dtype=np.float64)
    observed = d.mean()
    flipped = (signs @ d) / len(d)
    extreme = int(np.count_nonzero(flipped <= observed + abs(observed) * 1e-12))
    return (1 + extreme) / (1 + signs.shape[0])


class TostResult(NamedTuple):
    """A paired two one-sided tests (TOST) of equivalence within ``±margin``."""

    p_value: float
    """``max(p_lower, p_upper)``."""
    p_lower: float
    """p of ``H0: μ ≤ −margin``."""
    p_upper: float
    """p of ``H0: μ ≥ margin``."""
    t_lower: float
    t_upper: float
    equivalent: bool
    """``p_value < alpha``."""


def tost_paired(diff: npt.ArrayLike, margin: float, alpha: float = 0.05) -> TostResult:
    """Paired TOST of ``|μ| < margin`` from the per-context differences (module docstring).

    A zero standard error (every difference equal) makes each t infinite with the sign of
    its numerator: the test then says whether the common difference lies inside the margin.
    Needs at least two differences and ``margin > 0``.
    """
    d = np.asarray(diff, dtype=np.float64)
    if d.ndim != 1 or d.size < 2:
        raise ValueError(f"TOST needs at least two paired differences, got {d.size}")
    if not np.isfinite(d).all():
        raise ValueError("TOST: the differences must be finite")
    if not (math.isfinite(margin) and margin > 0):
        raise ValueError(f"the equivalence margin must be > 0, got {margin}")
    n = d.size
    mean = float(d.mean())
    se = float(d.std(ddof=1)) / math.sqrt(n)

    def ratio(num: float) -> float:
        if se > 0:
            return num / se
        return math.inf if num > 0 else (-math.inf if num < 0 else 0.0)

    t_lower, t_upper = ratio(mean + margin), ratio(mean - margin)
    p_lower = 1.0 - student_t_cdf(t_lower, n - 1)
    p_upper = student_t_cdf(t_upper, n - 1)
    p = max(p_lower, p_upper)
    return TostResult(p, p_lower, p_upper, t_lower, t_upper, bool(p < alpha))


def holm(p_values: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Holm-adjusted p-values (module docstring), in the input's order.

    NaN entries are not part of the family (they stay NaN and do not count in ``m``).
    """
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"p_values must be 1-D, got shape {p.shape}")
    out = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    if valid.size == 0:
        return out
    if ((p[valid] < 0) | (p[valid] > 1)).any():
        raise ValueError("p-values must lie in [0, 1]")
    m = valid.size
    order = valid[np.argsort(p[valid], kind="stable")]
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(scaled)
    return out


# --------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------


def hierarchical_bootstrap_means(
    values: npt.ArrayLike, context_draws: np.ndarray, trial_draws: np.ndarray
) -> npt.NDArray[np.float64]:
    """Bootstrap replicates of the mean of ``values`` ``[n_contexts, n_trials]``.

    Replicate b averages ``values[context_draws[b, i], trial_draws[b, j]]`` over i and j:
    ``context_draws`` ``[B, n_contexts]`` and ``trial_draws`` ``[B, n_trials]`` are indices
    drawn with replacement (two independent levels). One trial: the ordinary bootstrap of
    the context mean.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError(f"values must be [n_contexts, n_trials], got shape {v.shape}")
    if context_draws.shape[1] != v.shape[0] or trial_draws.shape[1] != v.shape[1]:
        raise ValueError(
            f"draws of shapes {context_draws.shape} and {trial_draws.shape} do not match "
            f"values of shape {v.shape}"
        )
    if context_draws.shape[0] != trial_draws.shape[0]:
        raise ValueError("context_draws and trial_draws must have as many replicates")
    # Mean over the resampled contexts of each trial, then over the resampled trials.
    per_trial = v[context_draws].mean(axis=1)  # [B, n_trials]
    return np.take_along_axis(per_trial, trial_draws, axis=1).mean(axis=1)
