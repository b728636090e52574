"""Print pip requirements from pyproject.toml: the runtime dependencies, or the given groups.

    tools/requirements.py                  runtime dependencies + the build backend (maturin)
    tools/requirements.py dev ray          only the named optional extras

The Makefile installs the first list for `make run` (what the pipeline needs, nothing else)
and adds the extras for `make test` and `make bench` (test tools, llama-cpp-python, Ray), so
that the heavy wheels (torch) are installed once and kept: pip skips what is satisfied.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

pyproject = tomllib.loads(Path("pyproject.toml").read_text())
project = pyproject["project"]
extras = sys.argv[1:]
if extras:
    requirements = [r for extra in extras for r in project["optional-dependencies"][extra]]
else:
    requirements = list(project["dependencies"]) + list(pyproject["build-system"]["requires"])
print("\n".join(requirements))
