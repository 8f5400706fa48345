# Two commands on a fresh machine with Python 3.11 and pip:
#   make demo   set up, then run the main job on its embedded default
#   make test   set up, then run the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned in pyproject.toml and installed in the same pip command as everything else:
# that resolves to the local CPU wheel and pulls no CUDA packages.
PIP_INSTALL := $(BIN)/python -m pip install --disable-pip-version-check -q

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

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
