# un0-bench: `make bench` and `make test` each work alone on a fresh clone (they create .venv).
# The venv has the `ray` extra, so `make test` runs the Ray executor's tests on a local 2-CPU cluster.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# NB: torch is installed first, pinned to the CPU wheel, so the package's torch range is already
# satisfied and pip never pulls a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: install bench bench-full bench-scale test test-all lint clean browser

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev,ray]'
	touch $(STAMP)

bench: $(STAMP)
	$(PY) -m un0_bench.suite --out reports/latest

# Every baseline and variant (50-step int8 and bf16 included): over an hour on 2 CPU cores.
bench-full: $(STAMP)
	$(PY) -m un0_bench.suite --suite full --out reports/full

# Un-0 at real scale, projected (no weights, offline, minutes on a CPU): counted FLOPs of the published Un-0 sizes
# and ADM 64x64, projected J/image on H100, the factor and the analog break-even; plus the validation table.
bench-scale: $(STAMP)
	$(PY) -m un0_bench.scale --out reports/scale

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
	rm -rf $(VENV) runs reports/latest reports/scale .pytest_cache build *.egg-info
