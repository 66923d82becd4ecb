PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test demo docs lint clean

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

# the documentation site in site/, with strict checking: a broken link, reference or generated page fails
docs: setup
	$(BIN)/python -c "import mkdocs, material, mkdocstrings_handlers.python" 2>/dev/null || $(BIN)/pip install -q -e ".[dev,docs]"
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

lint: setup
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs site
