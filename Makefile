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

.PHONY: setup demo test lint lab browser-deps bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -e ".[lab,test]"
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

clean:
	rm -rf build dist .pytest_cache .mypy_cache .ruff_cache
