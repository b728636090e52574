"""Options of the calibrate stage (:mod:`nlrw.calibrate`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["METHODS", "SPLITS", "CalibrateConfig", "Method"]


Method = Literal["uncalibrated", "quantile", "isotonic", "gate"]


METHODS: tuple[Method, ...] = ("uncalibrated", "quantile", "isotonic", "gate")
"""Every calibration method, in their default order."""


SPLITS = ("eval", "calibration")


@dataclass(frozen=True)
class CalibrateConfig:
    """Options of the ``calibrate`` stage."""

    methods: tuple[Method, ...] = METHODS
    """Calibration methods to compute, side by side: uncalibrated (E/9 x max, the paper's
    first mapping), quantile (the paper's quantile normalization), isotonic and gate (nlrw's,
    fitted on the calibration split)."""

    sim_quantiles: int = 0
    """Entries of each latent's table of simulated scores at mid-rank positions (quantile
    method); 0: one per fitted context, the exact (r - 1/2)/n of every score."""

    quantile_ranks: Literal["random", "mid"] = "random"
    """Quantile method: random (each score's probability drawn uniformly within the range
    its rank, or its run of ties, covers; seeded: exact in distribution at any frequency)
    or mid (the middle of that range; deterministic, never activates a latent rarer than
    1/(2n))."""

    quantile_fit: Literal["eval", "calibration"] = "eval"
    """Contexts whose simulated scores define F_sim for the quantile method: eval (the
    paper's protocol: the very contexts evaluated) or calibration (held out)."""

    gate_budget: float = 0.25
    """The gate admits at most gate_budget x k false-positive latents per context in
    expectation over all simulated latents (k: the coder's top-k): each latent's threshold
    is set for specificity 1 - gate_budget x k / N on the calibration split; > 0."""

    gate_min_specificity: float = 0.9
    """The budget only tightens the gate: each latent's specificity is at least this (with few
    simulated latents the budget alone would allow a latent to be a false positive on most
    contexts); in (0, 1]."""

    gate_specificity: float | None = None
    """Overrides the budget: the gate's threshold is the smallest score t with P(E < t |
    inactive) at least this, on the calibration split; in (0, 1]."""

    min_calibration_contexts: int = 10
    """A latent with fewer calibration contexts gets the fallback (all zeros) for isotonic
    and gate."""

    min_calibration_active: int = 1
    """A latent with fewer active calibration contexts gets the fallback (all zeros) for
    isotonic and gate."""

    seed: int = 0
    """Recorded for provenance; every method is deterministic and draws nothing."""

    def __post_init__(self) -> None:
        methods = tuple(self.methods)
        if not methods:
            raise ValueError(f"methods must name at least one of {', '.join(METHODS)}")
        for m in methods:
            if m not in METHODS:
                raise ValueError(f"unknown calibration method {m!r}; methods: {', '.join(METHODS)}")
        if len(set(methods)) != len(methods):
            raise ValueError(f"methods lists a method twice: {methods}")
        object.__setattr__(self, "methods", methods)  # a list from TOML becomes a tuple
        for name, minimum in (
            ("sim_quantiles", 0),
            ("min_calibration_contexts", 1),
            ("min_calibration_active", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if self.quantile_fit not in SPLITS:
            raise ValueError(
                f"quantile_fit must be 'eval' or 'calibration', got {self.quantile_fit!r}"
            )
        if self.sim_quantiles == 1:
            raise ValueError("sim_quantiles must be 0 (one per context) or >= 2, got 1")
        if self.quantile_ranks not in ("random", "mid"):
            raise ValueError(
                f"quantile_ranks must be 'random' or 'mid', got {self.quantile_ranks!r}"
            )
        s = self.gate_specificity
        if s is not None and (
            isinstance(s, bool) or not isinstance(s, int | float) or not 0.0 < s <= 1.0
        ):
            raise ValueError(f"gate_specificity must be in (0, 1], got {s!r}")
        b = self.gate_budget
        if isinstance(b, bool) or not isinstance(b, int | float) or not b > 0:
            raise ValueError(f"gate_budget must be > 0, got {b!r}")
        m = self.gate_min_specificity
        if isinstance(m, bool) or not isinstance(m, int | float) or not 0.0 < m <= 1.0:
            raise ValueError(f"gate_min_specificity must be in (0, 1], got {m!r}")
