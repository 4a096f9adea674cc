# The two commands of the README: `make demo` and `make test`. Both set everything up first, once: the setup
# is redone only when setup.py, pyproject.toml, csrc/ or the pins below change (stamp: .venv/.setup-done).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# GDRD_BUILD_CUDA: auto (default) builds the CUDA extension when nvcc and a CUDA torch exist; 1 requires it.
export GDRD_BUILD_CUDA ?= auto
export TORCH_CUDA_ARCH_LIST ?= 9.0
export MAX_JOBS ?= 2

# torch: the CUDA build where CUDA can run or be compiled for (a GPU or nvcc), else the CPU build (0.75 GB
# instead of 4.4 GB). PyPI's Linux torch 2.13.0 is the CUDA one: elsewhere, point pip at the CPU wheels,
# e.g. PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu. Only with CUDA: triton (1 GB; on a
# CPU-only machine its kernels run only in the interpreter) and the benchmarks' peers (torchdistill,
# pytorch-metric-learning). `make test EXTRAS=app,demo,test,triton,peers` adds them anywhere.
HAVE_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 || command -v nvcc >/dev/null 2>&1 && echo yes)
TORCH ?= $(if $(HAVE_CUDA),torch==2.14.1,torch==2.13.0)
EXTRAS ?= app,demo,test$(if $(HAVE_CUDA),$(comma)triton$(comma)peers)
comma := ,
# torchvision (pulled by torchdistill, with the peers) must match the torch in use. None beside the CPU torch
# 2.13.0: PyPI's torchvision 0.28.0 does not load with that wheel ("operator torchvision::nms does not exist"),
# and diffusers then fails to import; gdrd_fast decodes images with PIL where torchvision is absent.
TORCHVISION = $(if $(findstring 2.14,$(TORCH)),torchvision==0.29.1)

STAMP := $(VENV)/.setup-done
PINS := $(VENV)/.setup-pins
CSRC := $(shell find csrc -type f)

.PHONY: setup demo test bench docs gpu-wheels gpu-prebuilt gpu-replica gpu-rehearsal FORCE
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# rewritten only when a pin changes, so that the stamp below sees the change
$(PINS): FORCE | $(BIN)/python
	@echo "$(TORCH) $(TORCHVISION) [$(EXTRAS)] GDRD_BUILD_CUDA=$(GDRD_BUILD_CUDA) TORCH_CUDA_ARCH_LIST=$(TORCH_CUDA_ARCH_LIST)" > $@.new
	@cmp -s $@.new $@ && rm $@.new || mv $@.new $@

# -v: pip shows the compiler's progress (minutes with CUDA) instead of a silent spinner
$(STAMP): setup.py pyproject.toml $(CSRC) $(PINS)
	@rm -f $@
	$(BIN)/python -m pip install --upgrade pip "setuptools>=77"
	$(BIN)/python -m pip install "$(TORCH)" $(TORCHVISION) numpy ninja
	$(BIN)/python -m pip install -v --no-build-isolation -e ".[$(EXTRAS)]" "$(TORCH)" $(TORCHVISION)
	$(BIN)/python -m gdrd_fast env
	@touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/gdrd-fast demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

bench: $(STAMP)
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

# The GPU machine's extensions built here, for its Python 3.12 and torch 2.11.0+cu130 (GPU_PYTHON: a Python
# with that torch): carry gdrd_fast/*cpython-312* with the tree and benchmarks/gpu/run.sh uses them
# instead of building, if they were built from the same sources.
GPU_PYTHON ?= python3.12
gpu-prebuilt:
	GDRD_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 $(GPU_PYTHON) setup.py build_ext --inplace

# A CPU replica of the GPU machine's stack (Python 3.12, torch 2.11.0, triton 3.6.0, numpy 2.5.2 and the
# rest of its packages: benchmarks/gpu/replica-requirements.txt), rebuilt when that list changes.
GPU_REPLICA ?= .ci/venvs/gpu
PYTHON312 ?= $(firstword $(wildcard /root/.pyenv/versions/3.12.*/bin/python) $(shell command -v python3.12))
gpu-replica: $(GPU_REPLICA)/.replica-done
$(GPU_REPLICA)/.replica-done: benchmarks/gpu/replica-requirements.txt
	rm -rf $(GPU_REPLICA)
	$(PYTHON312) -m venv $(GPU_REPLICA)
	$(GPU_REPLICA)/bin/python -m pip install -q -r benchmarks/gpu/replica-requirements.txt
	@touch $@

# benchmarks/gpu/run.sh rehearsed on that replica as the device call runs it: offline, bare HOME, stub
# nvidia-smi, once as it is and once with a crash and a hang injected (benchmarks/gpu/rehearse.sh)
gpu-rehearsal: gpu-replica
	GPU_PYTHON=$(GPU_REPLICA)/bin/python benchmarks/gpu/rehearse.sh

FORCE:
