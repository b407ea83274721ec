# revpers — every target installs what it needs into .venv first.
PYTHON ?= python3
VENV   ?= .venv
# The CPU build of PyTorch used in CI; on a CUDA machine set TORCH="torch" (or a CUDA wheel spec).
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
DEMO_BUNDLE ?= build/demo-bundle
DEMO_OUT    ?= demo-out

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[server,dev]"
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/python -m revpers.demo --bundle $(DEMO_BUNDLE) --out $(DEMO_OUT)

clean:
	rm -rf build $(DEMO_OUT) .pytest_cache
