"""Print the project's pip requirements (runtime + the given extras) from pyproject.toml.

The Makefile installs these into .venv before building the Rust extension, so that the
heavy wheels (torch) are installed once and kept: pip skips what is already satisfied.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
requirements = list(project["dependencies"])
for extra in sys.argv[1:]:
    requirements += project["optional-dependencies"][extra]
print("\n".join(requirements))
