PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test demo lint clean

$(BIN)/svqmae: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@# CPU-only machines: take the local CPU build of torch first, so nothing pulls a CUDA build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	@touch $(BIN)/svqmae

setup: $(BIN)/svqmae

test: setup
	$(BIN)/python -m pytest tests

demo: setup
	$(BIN)/svqmae demo --out runs/demo

lint: setup
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs
