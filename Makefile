# revpers — every target installs what it needs into .venv first.
PYTHON ?= python3
VENV   ?= .venv
# The CPU build of PyTorch used in CI; on a CUDA machine set TORCH="torch" (or a CUDA wheel spec).
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
DEMO_BUNDLE ?= build/demo-bundle
DEMO_OUT    ?= demo-out

.PHONY: install test test-fast lint format demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[server,dev,batch,eval]"
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

# the quick lane: no tritonserver, no slow end-to-end tests (pytest markers "server" and "slow")
test-fast: install
	$(BIN)/python -m pytest -q -m "not server and not slow"

# ruff (lint + format check), import-linter (layer contracts), tools/check_layout.py (cycles, nested imports)
lint: install
	$(BIN)/ruff check revpers client benchmarks tests tools
	$(BIN)/ruff format --check revpers client benchmarks tests tools
	$(BIN)/lint-imports
	$(BIN)/python tools/check_layout.py

format: install
	$(BIN)/ruff check --fix revpers client benchmarks tests tools
	$(BIN)/ruff format revpers client benchmarks tests tools

demo: install
	$(BIN)/python -m revpers.cli.demo --bundle $(DEMO_BUNDLE) --out $(DEMO_OUT)

# Benchmarks (benchmarks/README.md): results in benchmarks/results/. BENCH_ARGS goes to the CPU ones
# (e.g. BENCH_ARGS="--steps 100"); gpu_fullsize runs only where CUDA is available.
BENCH_STAMP = $(VENV)/.installed-bench
BENCH_ARGS ?=
BACKEND    ?= onnxruntime

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[server,dev,bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.stages --backend $(BACKEND) $(BENCH_ARGS)
	$(BIN)/python -m benchmarks.compare --backend $(BACKEND) $(BENCH_ARGS)
	if $(BIN)/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		$(BIN)/python -m benchmarks.gpu_fullsize; \
	else \
		echo "no CUDA device: gpu_fullsize runs its CPU dry run only"; \
		$(BIN)/python -m benchmarks.gpu_fullsize --device cpu --tiny --steps 10 --fast-steps 5; \
	fi
	$(BIN)/python -m benchmarks.flops

clean:
	rm -rf build $(DEMO_OUT) .pytest_cache
