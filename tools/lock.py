#!/usr/bin/env python3
"""Write the lock files `make run` and `make test` install from: exact versions of every
distribution the project's requirements pull in, read from the environment at hand.

    .venv/bin/python tools/lock.py          # rewrites requirements/run.lock, test.lock
    .venv/bin/python tools/lock.py --check  # fails when they disagree with pyproject.toml

`run.lock` is the closure of pyproject's runtime dependencies plus the build backend (what the
pipeline needs); `test.lock` adds the `dev` and `ray` extras' closures (what the tests,
lints and benches need), without repeating run.lock's pins. The closure follows each
installed distribution's `Requires-Dist` with its environment markers and requested extras.

Upgrading a dependency is a deliberate commit: upgrade it in `.venv`, re-run this script,
re-measure (`make bench`, the demo's tables), and commit the lock files with the numbers.
"""

from __future__ import annotations

import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "requirements"


def closure(roots: list[str]) -> dict[str, str]:
    """``{canonical name: version}`` of the installed distributions ``roots`` need."""
    found: dict[str, str] = {}
    todo: list[tuple[Requirement, frozenset[str]]] = [(Requirement(r), frozenset()) for r in roots]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        req, _ = todo.pop()
        name = canonicalize_name(req.name)
        key = (name, frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"tools/lock.py: {req.name} is not installed here") from None
        found[name] = dist.version
        for spec in dist.requires or []:
            child = Requirement(spec)
            if child.marker is not None:
                ok = any(child.marker.evaluate({"extra": extra}) for extra in [*req.extras, ""])
                if not ok:
                    continue
            todo.append((child, frozenset()))
    return found


def _write(path: Path, pins: dict[str, str], header: str) -> None:
    lines = [f"# {header}", "# Written by tools/lock.py; do not edit by hand.", ""]
    lines += [f"{name}=={version}" for name, version in sorted(pins.items())]
    path.write_text("\n".join(lines) + "\n")


def _read(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    pins = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name] = version
    return pins


def main() -> int:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]
    own = canonicalize_name(project["name"])
    runtime = list(project["dependencies"]) + list(pyproject["build-system"]["requires"])
    extras = [r for extra in ("dev", "ray") for r in project["optional-dependencies"][extra]]
    run = {k: v for k, v in closure(runtime).items() if k != own}
    test = {k: v for k, v in closure(runtime + extras).items() if k != own and k not in run}
    if "--check" in sys.argv[1:]:
        stale = [
            name
            for name, pins in (("run.lock", run), ("test.lock", test))
            if _read(OUT / name) != pins
        ]
        if stale:
            print(
                f"tools/lock.py: requirements/{', '.join(stale)} disagree with pyproject.toml or "
                "the installed versions; run tools/lock.py and commit the result",
                file=sys.stderr,
            )
            return 1
        return 0
    OUT.mkdir(exist_ok=True)
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    _write(OUT / "run.lock", run, f"What `make run` installs (Python {py}, Linux x86_64).")
    _write(OUT / "test.lock", test, "What `make test` adds on top of run.lock.")
    print(f"run.lock: {len(run)} pins; test.lock: {len(test)} more")
    return 0


if __name__ == "__main__":
    sys.exit(main())
