# Two commands on a fresh machine with Python 3.11 and pip:
#   make demo   set up, then run the main job on its embedded default
#   make test   set up, then run the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned in pyproject.toml and installed in the same pip command as everything else:
# that resolves to the local CPU wheel and pulls no CUDA packages.
PIP_INSTALL := $(BIN)/python -m pip install --disable-pip-version-check -q

.PHONY: setup browser demo test lint clean

setup: $(VENV)/.installed browser

# Headless Chromium (Debian's package) for the browser test of the MLflow UI; installed only where
# it is missing and apt-get can run as root, so setup never fails on machines without apt.
browser:
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null \
	  || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; } \
	  || echo "chromium could not be installed: the browser test will be skipped"; fi

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -e '.[test]'
	@touch $@

demo: setup
	$(BIN)/deltamoe demo

test: setup
	$(BIN)/python -m pytest -q
	$(BIN)/ruff check .

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
