PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.installed-docs

.PHONY: setup demo test check docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[dev,docs]"
	touch $(DOCS_STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m examples.demo

# The unit tests; the slowest ones (marked slow: research outcomes, subprocess and
# benchmark smoke runs, the widest parametric batteries) run in `make check`.
test: $(STAMP)
	$(PY) -m pytest -n 2 -m "not slow" --durations=15

# Research outcomes the unit tests leave to the benchmarks: each fails on a missed target.
check: $(STAMP)
	$(PY) -m pytest -n 2 -m slow --durations=15
	$(PY) -m benchmarks.maxpool --check

# The HTML site in docs/_build/html; any Sphinx warning fails the build, and so does
# a public name missing from the built pages (docs/check_html.py).
docs: $(DOCS_STAMP)
	JAX_PLATFORMS=cpu $(PY) -m sphinx -b html -W --keep-going -q docs docs/_build/html
	JAX_PLATFORMS=cpu $(PY) docs/check_html.py docs/_build/html

clean:
	rm -rf $(VENV) .pytest_cache docs/_build docs/api build dist
