# Two commands for a new user (see README):
#   make demo   set everything up in .venv and run the main job (a real run on the bundled digits)
#   make test   set everything up in .venv and run the default test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup demo demo-ko test test-all lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "lightning-eff needs Python >= 3.10, got " + sys.version' 
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python benchmarks/demo_ncfm.py

demo-ko: $(STAMP)
	$(BIN)/lightning-eff fit --config configs/ko/digits.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

test-all: $(STAMP)
	$(BIN)/python -m pytest -m "slow or not slow"

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/ko.py

clean:
	rm -rf $(VENV) outputs lightning_logs .pytest_cache
