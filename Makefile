# The commands the README gives. Each sets up .venv first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint format bench-kernels clean

setup:
	@bash scripts/setup_env.sh

## Fresh machine -> quantized, evaluated and served default model, with a report.
demo: setup
	$(VENV)/bin/awq-plugin demo

## The whole test suite (what CI runs).
test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench-kernels: setup
	$(VENV)/bin/awq-plugin bench kernels --json results/bench_kernels.json --png results/bench_kernels.png

clean:
	rm -rf build *.egg-info .pytest_cache .ruff_cache
