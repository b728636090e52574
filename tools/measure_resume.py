"""Measure what a kill mid-simulation costs: SIGKILL ``nlrw run`` during the simulate stage,
run it again, and count the prompts simulated twice.

Usage (on a run directory whose stages up to ``explain``/``score`` are done, e.g. a copy of
``runs/demo`` made with ``cp -al``)::

    python tools/measure_resume.py RUN_DIR --preset demo --kill-at 0.6 [-- OVERRIDES...]

The simulate stage is forced to start afresh (its parts are removed), then:

1. ``nlrw run --until simulate`` runs as a child process; its progress bar (``simulate: …
   N/M``) is read from stderr, and once ``N ≥ kill_at · M`` the whole process group is killed
   with SIGKILL, as a crash or a pre-empted job would be;
2. the same command runs again to the end. It keeps the finished parts, holding ``N0``
   prompts, so the prompts computed before the kill and lost are ``repeated ≥ N_kill − N0``:
   at most one chunk (``chunk_latents × contexts``) by design. The bar moves once per backend
   call (``bar_step`` prompts), so up to one more step may have been under way at the kill;
   ``extra_s``, the two runs' wall time less an uninterrupted run's, counts it too.

Printed: the prompts and seconds before the kill, ``N0``, the repeated prompts and their share
of a chunk, the parts kept (and that their files were not rewritten: same inode and mtime),
the resumed run's wall time and, with ``--uninterrupted-s`` (the wall time of the same
command run without a kill), the extra seconds the kill cost. Nothing is asserted: this is a
measurement.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

_BAR = re.compile(r"simulate:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")


def _progress(log: Path) -> list[tuple[int, int]]:
    text = log.read_text(errors="replace") if log.exists() else ""
    return [(int(n), int(m)) for n, m in _BAR.findall(text.replace("\r", "\n"))]


def _parts(run_dir: Path) -> dict[str, tuple[int, int]]:
    folder = run_dir / "simulations.parts"
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.glob("part-*"))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--kill-at", type=float, default=0.6, help="fraction of the prompts")
    parser.add_argument(
        "--uninterrupted-s", type=float, help="wall time of the same command without a kill"
    )
    parser.add_argument("overrides", nargs="*", help="passed to nlrw run (after --)")
    args = parser.parse_args()
    run_dir: Path = args.run_dir
    nlrw = str(Path(sys.executable).with_name("nlrw"))
    cmd = [nlrw, "run", "--preset", args.preset, "--run-dir", str(run_dir)]
    cmd += ["--until", "simulate", *args.overrides]

    # A fresh simulate stage: drop its record, parts and table (upstream stages stay done).
    for path in ("stages/simulate.json", "simulate.json", "simulations.parquet"):
        (run_dir / path).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "simulations.parts", ignore_errors=True)

    first = run_dir / "measure_resume.first.log"
    with first.open("w") as err:
        started = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT, start_new_session=True)
        while child.poll() is None:
            seen = _progress(first)
            if seen and seen[-1][1] and seen[-1][0] >= args.kill_at * seen[-1][1]:
                os.killpg(child.pid, signal.SIGKILL)
                break
            time.sleep(0.2)
        child.wait()
        killed_after = time.perf_counter() - started
    seen = _progress(first)
    if not seen or child.returncode != -signal.SIGKILL:
        print(f"the first run ended (status {child.returncode}) before the kill; see {first}")
        return 1
    n_kill, total = seen[-1]
    kept = _parts(run_dir)

    second = run_dir / "measure_resume.second.log"
    with second.open("w") as err:
        started = time.perf_counter()
        subprocess.run(cmd, stdout=err, stderr=subprocess.STDOUT, check=True)
        resumed_s = time.perf_counter() - started
    import polars as pl

    n0 = sum(pl.read_parquet(run_dir / "simulations.parts" / name).height for name in kept)
    values = sorted({n for n, _ in seen})
    steps = [b - a for a, b in itertools.pairwise(values)]
    after = _parts(run_dir)
    untouched = all(after.get(name) == stamp for name, stamp in kept.items())
    record = json.loads((run_dir / "simulate.json").read_text())
    cfg = record["config"]
    chunk = cfg["chunk_latents"] * record["n_contexts"]
    repeated = n_kill - n0
    stage_s = json.loads((run_dir / "stages" / "simulate.json").read_text())["seconds"]
    print(
        json.dumps(
            {
                "prompts_total": total,
                "chunk_prompts": chunk,
                "killed_at_prompt": n_kill,
                "bar_step": max(steps, default=None),
                "killed_after_s": round(killed_after, 1),
                "parts_kept": len(kept),
                "parts_kept_untouched": untouched,
                "resumed_from_prompt": n0,
                "repeated_prompts": repeated,
                "repeated_share_of_chunk": round(repeated / chunk, 3),
                "resumed_run_s": round(resumed_s, 1),
                "resumed_stage_s": round(stage_s, 1),
                "resumed_prompts_per_s": record["throughput"]["prompts_per_second"],
                "extra_s": (
                    round(killed_after + resumed_s - args.uninterrupted_s, 1)
                    if args.uninterrupted_s
                    else None
                ),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
