"""``python -m nlrw``: the same command line as the ``nlrw`` console script."""

from nlrw.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
