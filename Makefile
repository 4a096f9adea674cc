# The two commands of the README: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# GDRD_BUILD_CUDA: auto (default) builds the CUDA extension when nvcc and a CUDA torch exist; 1 requires it.
export GDRD_BUILD_CUDA ?= auto
export TORCH_CUDA_ARCH_LIST ?= 9.0
export MAX_JOBS ?= 2

.PHONY: setup demo test bench docs gpu-wheels
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

# The site (docs/, mkdocs.yml) into site/, warnings as errors. The API pages are read from the sources,
# so only the docs extra's packages are needed (pyproject.toml; ruff formats the signatures), not a build.
DOCS_DEPS := "mkdocs>=1.6" "mkdocs-material>=9.5" "mkdocstrings[python]>=1.0" "mkdocstrings-python>=2.0" ruff
docs: $(BIN)/python
	$(BIN)/python -m pip install -q $(DOCS_DEPS)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict

# Wheels the GPU machine lacks and cannot download (Python 3.12, no network): carry .whl/ with the
# tree; benchmarks/gpu/run.sh installs them first.
GPU_WHEELS := tqdm pyyaml inf-cl
gpu-wheels: $(BIN)/python
	$(BIN)/python -m pip download -q $(GPU_WHEELS) --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl
