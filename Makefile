# The README's two commands: `make run` (install + the whole DAG on the embedded synthetic market)
# and `make test` (install + the test suite). Everything else is a helper.
SHELL := /bin/bash
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
PYTHON := $(shell command -v python3)
UV := $(PYTHON) -m uv
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export UV_COMPILE_BYTECODE := 1
export PATH := $(BIN):$(PATH)

.PHONY: install run test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml uv.lock
	@$(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	$(UV) sync --frozen --extra pipeline --extra edge
	@touch $@

run: install
	dvc repro
	cryptoml summary

test: install
	python -m pytest

lint: install
	ruff check .
	ruff format --check .
	mypy
	lint-imports

bench: install
	python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
