"""The pytest fixtures several test modules share; the plain helpers are in ``support.py``.

* ``qwen``: the embedded simulator (Qwen2.5-Coder-0.5B) through the transformers backend in
  float32 on the CPU (slow tests only; module-scoped, so each module loads it once).
* ``llama_server``: llama-cpp-python's OpenAI-compatible server on a free loopback port,
  serving the simulator's GGUF; skipped where llama-cpp-python[server] is not installed.
* ``finished_smoke_run``: a finished run of the smoke preset at one torch thread
  (:func:`support.run_smoke_pinned`), made once per session for the tools that read runs
  (compare_runs, run_digest, lexical_simulation); read-only: a test that changes a run copies
  it first. (test_report and test_architecture keep their own: a run up to ``cache``, and the
  golden run.)

Imports stay light (stdlib, pytest, ``support``): pytest imports this module before any test
module, and the vLLM tests (``.venv-vllm``) set their environment before torch is imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from support import free_port, run_smoke_pinned

if TYPE_CHECKING:
    from nlrw.backends.transformers import TransformersBackend


@pytest.fixture(scope="module")
def qwen() -> Iterator[TransformersBackend]:
    from nlrw.backends.transformers import TransformersBackend

    backend = TransformersBackend("qwen2.5-coder-0.5b", dtype="float32", device="cpu")
    yield backend
    backend.close()


def _llama_server_available() -> bool:
    try:
        import llama_cpp.server  # noqa: F401  # pyright: ignore[reportMissingImports]
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def llama_server() -> Iterator[str]:
    """llama-cpp-python's OpenAI-compatible server on a free loopback port, serving the GGUF."""
    if not _llama_server_available():
        pytest.skip("llama-cpp-python[server] is not installed (pip install -e '.[dev]')")
    from nlrw.assets import SIMULATOR_ALIAS, simulator_gguf

    port = free_port()
    cmd = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(simulator_gguf()),
        "--model_alias", SIMULATOR_ALIAS,
        "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", "2048", "--n_threads", str(min(2, os.cpu_count() or 1)),
        "--logits_all", "True", "--verbose", "False",
    ]  # fmt: skip
    # The server's log goes to a file: an unread pipe fills up and blocks a chatty server.
    log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in the finally below)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 90
    try:
        while True:
            if proc.poll() is not None:
                log.seek(0)
                err = log.read().decode(errors="replace")
                pytest.fail(f"llama_cpp.server exited with {proc.returncode}: {err[-2000:]}")
            try:
                with urllib.request.urlopen(f"{base}/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("llama_cpp.server did not answer /v1/models within 90 s")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="session")
def finished_smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_smoke_pinned(tmp_path_factory.mktemp("finished_smoke_run") / "a")
