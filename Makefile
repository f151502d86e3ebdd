# The two commands of the README: `make demo` (set up, then run the pipeline end to end) and
# `make test` (set up, then run every test that runs on a laptop without keys).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

# llama.cpp's CMake options: the server needs no multimodal (llava/mtmd) library and no curl.
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@echo "Installing distillery with the embedded teacher and the CPU trainer."
	@echo "The first install on a machine compiles llama-cpp-python from source (no wheel on"
	@echo "PyPI): 12-25 min on 2 cores, once. pip caches the built wheel, so later installs"
	@echo "take seconds. torch is the CPU build (2.13.0)."
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install --progress-bar off \
		'torch==2.13.0' -e '.[dev,embedded,train]'
	touch $(STAMP)

# The whole job on the embedded default: SmolLM2 teacher on 127.0.0.1, CPU student training.
demo: $(STAMP)
	$(BIN)/distillery run recipes/stock-advisor-demo.yaml --output out

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy flows tasks expectations
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python bench/engine_throughput.py

clean:
	rm -rf $(VENV) out
