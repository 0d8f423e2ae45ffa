# The commands the README gives. Each sets up .venv first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-all lint format bench-kernels bench-soak bench-large-model clean

setup:
	@bash scripts/setup_env.sh

## Fresh machine -> quantized, evaluated and served default model, with a report.
demo: setup
	$(VENV)/bin/awq-plugin demo

## Lint and the test suite without the tests marked `full` (what CI runs; about 13 minutes here).
## Two workers, one test file each at a time (a file's module fixtures, such as a vLLM server,
## stay in one process); about half the suite waits on subprocesses, so two overlap well.
test: setup lint
	$(VENV)/bin/pytest -m "not full" -n 2 --dist loadfile

## Everything, including long kills, soak, tensor parallel and the larger calibrations (about
## an hour here): before a release, or after touching serving, caching or resumable runs.
test-all: setup lint
	$(VENV)/bin/pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench-kernels: setup
	$(VENV)/bin/awq-plugin bench kernels --json results/bench_kernels.json --png results/bench_kernels.png

## 64 clients against vllm serve with the plugin for 10 minutes (about 15 minutes with start-up).
bench-soak: setup
	$(VENV)/bin/awq-plugin bench soak --duration 600 --json results/soak.json --png results/soak.png

## Quantize a synthetic 2.7B Llama (4.97 GiB in bf16) in at most a third of that in RAM (~20 min).
bench-large-model: setup
	$(VENV)/bin/awq-plugin bench large-model --threads 1 --json results/bench_large_model.json --png results/bench_large_model.png

clean:
	rm -rf build *.egg-info .pytest_cache .ruff_cache
