"""Formatting shared by the report's figures, tables, HTML and Markdown.

The display order and labels of the summary's conditions and calibrations, numbers as the
report prints them ("—" where a value is missing or not finite), loss recovered (shown only
where its denominator is not noise), and control characters made visible.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

BASELINES = ("clean", "transcoder", "zero_ablation", "random_k")
BASELINE_LABELS = {
    "clean": "clean model",
    "transcoder": "transcoder",
    "zero_ablation": "zero ablation",
    "random_k": "random active latents",
}
CALIBRATIONS = ("uncalibrated", "quantile", "isotonic", "gate")


def baseline_labels(evaluation: Mapping[str, Any] | None) -> dict[str, str]:
    """:data:`BASELINE_LABELS` for the run's coder (``eval.json``'s ``coder_kind``): an SAE's
    reconstruction is labelled as one, not as a transcoder."""
    if (evaluation or {}).get("coder_kind") == "sae":
        return BASELINE_LABELS | {"transcoder": "SAE reconstruction"}
    return dict(BASELINE_LABELS)


CONTROL_LABELS = {
    "simulated": "simulated",
    "shuffled": "shuffled explanations (another latent's explanation)",
    "matched_zero": "matched zero (chosen latents = 0)",
    "oracle_support": "oracle support (true support, simulated values)",
    "oracle_magnitude": "oracle magnitude (simulated support, true values)",
    "synthetic": "synthetic simulator",
}


def calibration_order(name: str) -> tuple[int, str]:
    return (CALIBRATIONS.index(name) if name in CALIBRATIONS else len(CALIBRATIONS), name)


def choice_label(choice: str | None) -> str:
    return {"top": "top-by-score", "random": "random"}.get(choice or "", choice or "")


def finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def as_float(x: Any) -> float | None:
    """``x`` as a float where it is a finite number (not a bool), else None."""
    return float(x) if finite(x) and not isinstance(x, bool) else None


def fmt(x: Any, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if finite(x) else "—"


def fmt_p(p: Any) -> str:
    if not finite(p):
        return "—"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def fmt_fraction(f: Any) -> str:
    if not finite(f):
        return ""
    pct = 100 * f
    return f"{pct:.3g}%"


def fmt_share(x: Any) -> str:
    """A share in [0, 1] as a percentage with one decimal; never "0.0%" or "100.0%" for a
    share strictly between 0 and 1."""
    if not finite(x):
        return "—"
    pct = 100 * x
    if 0 < pct < 0.05:
        return "< 0.1%"
    if 99.95 <= pct < 100:
        return "> 99.9%"
    return f"{pct:.1f}%"


def fmt_ci(low: Any, high: Any, digits: int = 3) -> str:
    if not (finite(low) and finite(high)):
        return "—"
    return f"[{low:.{digits}f}, {high:.{digits}f}]"


MIN_RECOVERY_GAP = 0.01
"""Nats per token zero ablation must lie above clean for loss recovered to be shown: below it
the ratio's denominator is noise (a random model's −2724%)."""


def loss_recovered(result: dict[str, Any]) -> float | None:
    """``loss_recovered`` of a recovery record, None where its denominator vanishes."""
    clean, zero, lr = result.get("ce_clean"), result.get("ce_zero"), result.get("loss_recovered")
    if not (isinstance(clean, int | float) and isinstance(zero, int | float) and finite(lr)):
        return None
    return lr if abs(zero - clean) >= MIN_RECOVERY_GAP else None  # NaN gaps fail this too


def fmt_recovered(result: dict[str, Any]) -> str:
    lr = loss_recovered(result)
    if lr is not None:
        return fmt(lr, 4)
    return f"— (zero ablation within {MIN_RECOVERY_GAP} nats of clean: the ratio is undefined)"


CONTROL_CHAR = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """Control characters other than newline and tab as ``\\xNN`` escapes."""
    return CONTROL_CHAR.sub(lambda m: m.group(0).encode("unicode_escape").decode("ascii"), text)
