# Two entry points: `make demo` and `make test`. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A CPU torch by default. On a GPU machine: make demo TORCH=torch (CUDA build from PyPI).
# Elsewhere without a GPU, a CPU wheel index keeps the download small:
#   make demo TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint format clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	# Test-only reference DINOv2 code; its metadata pins torch 2.0 and xformers, hence --no-deps.
	$(BIN)/pip install --quiet --no-deps dinov2==0.0.1.dev2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/rayrm demo --config configs/demo.yaml

test: $(STAMP)
	$(BIN)/ruff check rayrm jobs tests bench
	$(BIN)/ruff format --check rayrm jobs tests bench
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check rayrm jobs tests bench

format: $(STAMP)
	$(BIN)/ruff format rayrm jobs tests bench
	$(BIN)/ruff check --fix rayrm jobs tests bench

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
