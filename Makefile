# The two commands of the README: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# GDRD_BUILD_CUDA: auto (default) builds the CUDA extension when nvcc and a CUDA torch exist; 1 requires it.
export GDRD_BUILD_CUDA ?= auto
export TORCH_CUDA_ARCH_LIST ?= 9.0
export MAX_JOBS ?= 2

.PHONY: setup demo test bench gpu-wheels
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

setup: $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q "torch==2.14.1" numpy ninja
	$(BIN)/python -m pip install -q -e ".[test,triton,diffusion,demo,peers]" --no-build-isolation

demo: setup
	$(BIN)/gdrd-fast demo $(DEMO_ARGS)

test: setup
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -m pytest benchmarks --benchmark-only $(PYTEST_ARGS)

# Wheels the GPU machine lacks and cannot download (Python 3.12, no network): carry .whl/ with the
# tree; benchmarks/gpu/run.sh installs them first.
GPU_WHEELS := tqdm pyyaml inf-cl
gpu-wheels: $(BIN)/python
	$(BIN)/python -m pip download -q $(GPU_WHEELS) --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl
