"""Regenerate the smoke run's golden tables (``tests/golden/smoke``) that
``tests/test_architecture.py::test_smoke_tables_equal_the_golden_ones`` compares against.

    python tools/golden_smoke.py            # golden/smoke/<this CPU's torch capability>/
    python tools/golden_smoke.py --reference  # golden/smoke/ itself

Run it only in a commit that means to change results (and say so in its message), or to add
the tables of a CPU instruction set that has none (see ``golden_dir`` in the test): the smoke
run trains a transcoder, whose latents differ by ~0.4% between instruction sets.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from test_architecture import GOLDEN, TABLES, run_smoke  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--reference", action="store_true", help="write golden/smoke/ itself, not a CPU's folder"
    )
    args = parser.parse_args()
    capability = torch.backends.cpu.get_cpu_capability()
    out = GOLDEN if args.reference else GOLDEN / capability.lower()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "smoke"
        run_smoke(run_dir)
        for table, name in TABLES.items():
            shutil.copyfile(run_dir / table, out / name)
    print(f"wrote {len(TABLES)} tables to {out} (torch capability {capability})")


if __name__ == "__main__":
    main()
