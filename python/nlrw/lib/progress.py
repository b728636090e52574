"""Progress bars for long stages: one place decides how a bar looks and when it is off."""

from __future__ import annotations

from typing import Any

__all__ = ["progress_bar"]


def progress_bar(
    total: int, desc: str, unit: str = "latent", *, enabled: bool = True, initial: int = 0
) -> Any:
    """A tqdm bar over ``total`` items (``initial`` already done), or ``None`` when disabled,
    so callers write ``if bar: bar.update(n)``."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, smoothing=0.1
    )
