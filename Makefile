# Two commands for a new user (see README):
#   make demo   set everything up in .venv and run the main job (a real run on the bundled digits)
#   make test   set everything up in .venv and run the default test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

# A second environment for the oldest transformers pyproject.toml allows: a venv whose site-packages holds a
# .pth that appends the main venv's site-packages (torch, lightning, ... are shared, not reinstalled) and that
# installs only these pins, which shadow the main venv's. `make test-oldest` runs the transformers-facing
# tests (marker `transformers_compat`) there; .ci/run calls it after `make test`.
# kernels is pinned too: transformers 5.25+ depends on kernels 0.19 (which needs huggingface_hub >= 1.32), and
# transformers 4.53 imports kernels whenever it is installed, so the shared, newer kernels would break it.
# kernels 0.8.1 is the release of transformers 4.53's time (huggingface_hub >=0.26,<1).
OLDEST_VENV  ?= .venv-oldest
OLDEST_STAMP := $(OLDEST_VENV)/.installed-stamp
OLDEST_TRANSFORMERS := transformers==4.53.3 tokenizers==0.21.4 huggingface_hub==0.34.4 kernels==0.8.1

.PHONY: setup demo demo-ko test test-all test-oldest lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "lightning-eff needs Python >= 3.10, got " + sys.version' 
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m benchmarks.demo_ncfm

demo-ko: $(STAMP)
	$(BIN)/lightning-eff fit --config configs/ko/digits.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

test-all: $(STAMP)
	$(BIN)/python -m pytest -m "slow or not slow"

$(OLDEST_STAMP): $(STAMP) Makefile
	test -x $(OLDEST_VENV)/bin/python || $(BIN)/python -m venv $(OLDEST_VENV)
	$(BIN)/python -c 'import sysconfig; print("import site; site.addsitedir(%r)" % sysconfig.get_paths()["purelib"])' \
		> "$$($(OLDEST_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_lightning_eff_main_venv.pth"
	$(OLDEST_VENV)/bin/python -m pip install --no-deps $(OLDEST_TRANSFORMERS)
	touch $(OLDEST_STAMP)

test-oldest: $(OLDEST_STAMP)
	$(OLDEST_VENV)/bin/python -c 'import transformers as t; print("oldest env: transformers", t.__version__, "from", t.__file__)'
	$(OLDEST_VENV)/bin/python -m pytest -m "transformers_compat and not slow"

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python -m benchmarks.ko

clean:
	rm -rf $(VENV) $(OLDEST_VENV) outputs lightning_logs .pytest_cache
