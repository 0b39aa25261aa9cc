# un0-bench: `make bench` and `make test` each work alone on a fresh clone (they create .venv).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# NB: torch is installed first, pinned to the CPU wheel, so the package's torch range is already
# satisfied and pip never pulls a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: install bench test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

bench: $(STAMP)
	$(PY) -m bench.suite --out reports/latest

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs reports/latest .pytest_cache build *.egg-info
