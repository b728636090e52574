"""Run every benchmark (``benches/bench_*.py``), print a table and write ``results.json``.

Usage: ``python benches/run.py [--quick] [NAME ...]`` (names filter by substring).
Each bench module has ``run(quick: bool) -> list[dict]`` returning rows made by
:func:`common.result`; ``ratio`` is baseline time / our time, measured in the same run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
_COLUMNS = {"name", "ours_median_s", "baseline", "baseline_median_s", "ratio", "target"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "names", nargs="*", help="only run benches whose name contains one of these"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--out", default=str(HERE / "results.json"))
    args = parser.parse_args()

    modules = sorted(p.stem for p in HERE.glob("bench_*.py"))
    if args.names:
        modules = [m for m in modules if any(n in m for n in args.names)]
    rows: list[dict] = []
    for name in modules:
        print(f"== {name}", flush=True)
        rows += importlib.import_module(name).run(quick=args.quick)

    header = (
        f"{'name':<24} {'ours (s)':>10} {'baseline':<34} {'base (s)':>10} "
        f"{'ratio':>7} {'target':>7}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        target = f"{r['target']:.1f}x" if r.get("target") is not None else ""
        print(
            f"{r['name']:<24} {r['ours_median_s']:>10.4f} {r['baseline']:<34.34} "
            f"{r['baseline_median_s']:>10.4f} {r['ratio']:>6.2f}x {target:>7}"
        )
        for key, value in r.items():
            if key not in {
                "name",
                "ours_median_s",
                "baseline",
                "baseline_median_s",
                "ratio",
                "target",
            }:
                print(f"    {key}: {value}")
    meta = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\nwrote {args.out} ({meta})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
