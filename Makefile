# adaptive_nb — set-up, demo and tests. Everything installs into .venv.
#   make demo   run examples/quickstart.ipynb headless on CPU → build/quickstart.{ipynb,html}
#   make test   lint, type-check and run the test suite (browser tests included)
#   make lab    open JupyterLab on examples/
# On a GPU machine pick a CUDA build of torch:  make test TORCH_SPEC="torch>=2.3"

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU set-up: torch 2.13.0 (a CPU build lies on this machine's disk). Override on GPU hosts.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test lint lab browser-deps bench clean gpu-check

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -e ".[lab,test,ray]"
	touch $@

demo: setup
	$(BIN)/python examples/execute.py examples/quickstart.ipynb build

# Debian's chromium for the Playwright browser tests (no browser download).
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian chromium for the browser tests"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

lint: setup
	$(BIN)/ruff check adaptive_nb tests benchmarks examples/execute.py
	$(BIN)/ruff format --check adaptive_nb tests benchmarks examples/execute.py
	$(BIN)/mypy

test: setup browser-deps lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lab: setup
	$(BIN)/jupyter lab examples/ $(if $(filter 0,$(shell id -u)),--allow-root,)

bench: setup
	$(BIN)/python benchmarks/overhead.py

# GPU correctness check for a machine with its own Python and a CUDA build of torch (no
# Jupyter packages, no registry): installs nothing, puts the repo on PYTHONPATH, runs every
# gpu-marked test and benchmarks/gpu_check.py; results in $(GPU_CHECK_OUT). Without CUDA it
# reports "no CUDA device: skipped" and exits 0.  make gpu-check PYTHON=/path/to/python
GPU_CHECK_OUT ?= build/gpu-check
GPU_TESTS ?= $(sort $(shell grep -l 'pytest.mark.gpu' tests/test_*.py))
gpu-check:
	@mkdir -p $(GPU_CHECK_OUT)
	@rm -f $(GPU_CHECK_OUT)/pytest.xml
	-PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" timeout 180 $(PYTHON) -m pytest -m gpu \
	  -rs -p no:cacheprovider --junitxml=$(GPU_CHECK_OUT)/pytest.xml $(GPU_TESTS)
	PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" timeout 280 $(PYTHON) \
	  benchmarks/gpu_check.py --out $(GPU_CHECK_OUT) --junit $(GPU_CHECK_OUT)/pytest.xml

clean:
	rm -rf build dist .pytest_cache .mypy_cache .ruff_cache
