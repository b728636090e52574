"""The ``nlrw`` command line (placeholder until the stages land)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    import nlrw

    print(f"nlrw {nlrw.__version__}", file=sys.stderr)
    return 0
