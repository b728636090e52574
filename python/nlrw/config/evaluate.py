"""Options of the evaluate stage (:mod:`nlrw.evaluate`): :class:`EvaluateConfig` and the names
its definition needs (the controls, the default fractions and synthetic qualities, the
synthetic calibrations, the literal types of a choice and of the random mode)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from nlrw.lib.types import DTypeOption

__all__ = [
    "CONTROLS",
    "DEFAULT_FRACTIONS",
    "DEFAULT_QUALITIES",
    "SUMMARY_COLUMNS_SINCE_CONTROLS",
    "SYNTHETIC_CALIBRATIONS",
    "Choice",
    "EvaluateConfig",
    "Positions",
    "RandomMode",
    "check_margin",
]

CONTROLS = ("matched_zero", "oracle_support", "oracle_magnitude")
"""The controls evaluated beside each simulated row (same calibration, fraction, choice and
trial)."""

DEFAULT_FRACTIONS = (0.001, 0.01, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0)
"""The paper's fractions of simulated latents."""

DEFAULT_QUALITIES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
"""Target AUROCs of the synthetic simulators."""

SYNTHETIC_CALIBRATIONS = ("uncalibrated", "quantile")
"""Calibrations a synthetic simulator can be given (both need only the cache's statistics)."""

Choice = Literal["top", "random"]
RandomMode = Literal["fixed", "per-context"]
Positions = Literal["last", "all"]


@dataclass(frozen=True)
class EvaluateConfig:
    """Options of the ``evaluate`` stage (defaults: the paper's grid, nlrw's fixed trials)."""

    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    """Fractions f in (0, 1] of the simulated latents given simulated values
    (n_sel = max(1, round(f x number simulated)))."""

    choices: tuple[Choice, ...] = ("top", "random")
    """How the n_sel latents are chosen: "top" by balanced accuracy (scores.parquet), "random"
    seeded (see n_trials and random)."""

    n_trials: int = 5
    """Random choices drawn per fraction (seeded); their CE is averaged per context."""

    random: RandomMode = "fixed"
    """"fixed": one random subset per trial for every context (a coherent rewrite);
    "per-context": a fresh subset per trial and context (the paper's code)."""

    calibrations: tuple[str, ...] | None = None
    """Calibrations of calibration.parquet to evaluate (None: all present)."""

    missing_explanations: Literal["exclude", "error"] = "exclude"
    """Latents active on eval contexts that were never simulated (no usable explanation), and
    simulated latents without a balanced accuracy when "top" is a choice: "exclude" keeps their
    true values (their number is recorded), "error" refuses to evaluate."""

    max_contexts: int | None = None
    """Evaluate only the first this many eval contexts (None: all)."""

    positions: Positions = "last"
    """Where the hookpoint is rewritten and CE scored: "last" (the paper's: the window's last
    position, the token the simulator rated) or "all" (every position of the window, top-k
    re-applied per position, CE the mean over the window's ctx_len next-token predictions;
    needs the all-at-once simulate layout, which rates every position; the synthetic
    simulators are left out). See nlrw.evaluate.positions."""

    dtype: DTypeOption = "float32"
    """Precision of the subject model (recorded; "auto" is bfloat16 on a GPU)."""

    device: str = "auto"
    """Device of the subject and the coder ("auto": the first GPU, else the CPU)."""

    batch_size: int = 256
    """Rows (context x condition) per single-token forward; contexts are grouped so that
    their conditions fill a batch. Memory: each row holds its own copy of the prefix's KV
    cache (2 x layers x ctx_len x kv width floats)."""

    part_size: int = 16
    """Contexts per checkpointed part (a kill loses at most one part)."""

    n_bootstrap: int = 1000
    """Bootstrap resamples of the contexts for the 95 % confidence intervals."""

    n_permutations: int = 10000
    """Random sign flips of the paired sign-flip tests against zero ablation."""

    shuffled: bool | None = None
    """The shuffled-explanation control (condition shuffled, beside every simulated row):
    the latents of the simulate stage's control take their calibrated simulations made with
    another latent's explanation (calibration_shuffled.parquet), the others their real ones.
    None: when the run has the control; true: required (an error says how to make it)."""

    controls: tuple[str, ...] = CONTROLS
    """Controls evaluated beside every simulated row: matched_zero (the rewritten latents set
    to 0), oracle_support (simulated values on the true support), oracle_magnitude (the
    simulated support with true magnitudes; needs the cache's mean active values)."""

    synthetic_qualities: tuple[float, ...] = DEFAULT_QUALITIES
    """Target AUROCs in [0.5, 1] of the synthetic simulators, evaluated on every latent of the
    coder (empty: no synthetic condition)."""

    synthetic_calibrations: tuple[str, ...] = SYNTHETIC_CALIBRATIONS
    """Calibrations of the synthetic scores: uncalibrated and/or quantile."""

    synthetic_fractions: tuple[float, ...] | None = (1.0,)
    """Fractions of all the coder's latents rewritten by the synthetic simulators (None: the
    same as fractions). Default: every latent, the frontier's question; each further
    fraction costs a row per quality, calibration, choice and trial."""

    equivalence_margin: float = 0.25
    """TOST margin against zero ablation, as a fraction of the gap mean CE(zero ablation) -
    mean CE(transcoder) measured on the same contexts; > 0."""

    equivalence_margin_nats: float | None = None
    """TOST margin in nats, instead of the fraction of the gap (None: use
    equivalence_margin); > 0."""

    alpha: float = 0.05
    """Level of the equivalence test and of the Holm-adjusted claims, in (0, 1)."""

    seed: int = 0
    """Seed of the random choices, random_k latents, bootstrap and permutation test."""

    progress: bool = True
    """Show a progress bar (contexts/s)."""

    def __post_init__(self) -> None:
        if not self.fractions:
            raise ValueError("fractions must not be empty")
        for f in self.fractions:
            if not (isinstance(f, int | float) and 0.0 < f <= 1.0):
                raise ValueError(f"every fraction must be in (0, 1], got {f!r}")
        if len(set(self.fractions)) != len(self.fractions):
            raise ValueError(f"fractions must be distinct, got {self.fractions}")
        if not self.choices or any(c not in ("top", "random") for c in self.choices):
            raise ValueError(f"choices must be a non-empty subset of top, random: {self.choices}")
        if len(set(self.choices)) != len(self.choices):
            raise ValueError(f"choices must be distinct, got {self.choices}")
        if self.random not in ("fixed", "per-context"):
            raise ValueError(f"random must be 'fixed' or 'per-context', not {self.random!r}")
        if self.missing_explanations not in ("exclude", "error"):
            raise ValueError(
                "missing_explanations must be 'exclude' or 'error', "
                f"not {self.missing_explanations!r}"
            )
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16: {self.dtype!r}")
        for name in ("n_trials", "batch_size", "part_size", "n_bootstrap", "n_permutations"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.positions not in ("last", "all"):
            raise ValueError(f"positions must be 'last' or 'all', not {self.positions!r}")
        if self.max_contexts is not None and self.max_contexts < 1:
            raise ValueError(f"max_contexts must be at least 1, got {self.max_contexts}")
        if self.calibrations is not None and not self.calibrations:
            raise ValueError("calibrations must be None (all) or name at least one")
        unknown = [c for c in self.controls if c not in CONTROLS]
        if unknown or len(set(self.controls)) != len(self.controls):
            raise ValueError(
                f"controls must be distinct names among {', '.join(CONTROLS)}, got {self.controls}"
            )
        for q in self.synthetic_qualities:
            if not (isinstance(q, int | float) and 0.5 <= q <= 1.0):
                raise ValueError(f"every synthetic_qualities level must be in [0.5, 1], got {q!r}")
        if len(set(self.synthetic_qualities)) != len(self.synthetic_qualities):
            raise ValueError(f"synthetic_qualities must be distinct: {self.synthetic_qualities}")
        bad = [c for c in self.synthetic_calibrations if c not in SYNTHETIC_CALIBRATIONS]
        if bad or len(set(self.synthetic_calibrations)) != len(self.synthetic_calibrations):
            raise ValueError(
                "synthetic_calibrations must be distinct names among "
                f"{', '.join(SYNTHETIC_CALIBRATIONS)}, got {self.synthetic_calibrations}"
            )
        if self.synthetic_qualities and not self.synthetic_calibrations:
            raise ValueError("synthetic_calibrations must name at least one calibration")
        if self.synthetic_fractions is not None:
            if not self.synthetic_fractions:
                raise ValueError("synthetic_fractions must be None (as fractions) or not empty")
            for f in self.synthetic_fractions:
                if not (isinstance(f, int | float) and 0.0 < f <= 1.0):
                    raise ValueError(
                        f"every synthetic_fractions entry must be in (0, 1], got {f!r}"
                    )
            if len(set(self.synthetic_fractions)) != len(self.synthetic_fractions):
                raise ValueError(
                    f"synthetic_fractions must be distinct: {self.synthetic_fractions}"
                )
        check_margin("equivalence_margin", self.equivalence_margin)
        if self.equivalence_margin_nats is not None:
            check_margin("equivalence_margin_nats", self.equivalence_margin_nats)
        if not (isinstance(self.alpha, int | float) and 0.0 < self.alpha < 1.0):
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha!r}")


def check_margin(name: str, value: float) -> None:
    """Refuse an equivalence margin that is not a finite number > 0 (``name`` in the message)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0 (an equivalence margin), got {value!r}")


SUMMARY_COLUMNS_SINCE_CONTROLS = (
    "quality",
    "p_value_holm",
    "p_better",
    "p_better_holm",
    "equivalence_margin",
    "p_equivalent",
    "p_equivalent_holm",
    "equivalent_to_zero",
)
"""Summary columns added with the controls and equivalence tests (issue 17): a summary
without them was written before them, and the report refuses it (here, torch-free, so that
the report reads it without importing the evaluate stage)."""
