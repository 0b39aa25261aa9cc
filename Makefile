# un0-bench: `make bench` and `make test` each work alone on a fresh clone (they create .venv).
# The venv has the `ray` extra, so `make test` runs the Ray executor's tests on a local 2-CPU cluster.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# NB: torch is installed first, pinned to the CPU wheel, so the package's torch range is already
# satisfied and pip never pulls a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: install bench test test-all lint clean browser

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev,ray]'
	touch $(STAMP)

bench: $(STAMP)
	$(PY) -m un0_bench.suite --out reports/latest

# The report's browser test uses Debian's Chromium. Installing it needs root and apt; without it the
# test is skipped and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ; } || \
	  echo "chromium could not be installed: the browser test will be skipped"

test: $(STAMP) browser
	$(PY) -m pytest -q

# Also the tests marked slow (full-size quality checks); `make test` deselects them.
test-all: $(STAMP) browser
	$(PY) -m pytest -q -m "not gpu"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs reports/latest .pytest_cache build *.egg-info
