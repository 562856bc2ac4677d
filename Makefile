# Two commands set everything up on a fresh machine (see README):
#   make run    venv + install + shard the bundled digits + train on 2 local Ray workers
#   make test   venv + install + the test suite (what CI runs via .ci/run)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0
# Where a CPU machine gets a CPU-only torch when no local wheel is configured for pip.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=

.PHONY: run test setup browser data-digits clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@# torch first, so the project's torch==$(TORCH_VERSION) pin is already met by the right build:
	@# a wheel pip already knows locally (find-links), else CUDA from PyPI on a GPU machine,
	@# else the CPU-only index. PyPI's default Linux wheel is a multi-GB CUDA build.
	@if $(BIN)/pip install --quiet --dry-run --no-index --no-deps torch==$(TORCH_VERSION) >/dev/null 2>&1; then \
	  $(BIN)/pip install --quiet torch==$(TORCH_VERSION); \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/pip install --quiet torch==$(TORCH_VERSION); \
	else \
	  $(BIN)/pip install --quiet torch==$(TORCH_VERSION) --index-url $(TORCH_CPU_INDEX) --extra-index-url https://pypi.org/simple; \
	fi
	$(BIN)/pip install --quiet -e ".[dev]"
	@touch $@

data/digits/manifest.json: | setup
	$(BIN)/pipeline data digits --out data/digits

data-digits: data/digits/manifest.json

run: setup data/digits/manifest.json
	$(BIN)/pipeline train configs/digits-categorical.yaml

# tests/test_ui.py drives the MLflow UI in headless Chromium (Debian package `chromium`).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium; \
	  else echo "tests need Chromium: sudo apt-get install -y chromium" >&2; exit 1; fi

# Two pytest-xdist workers: the tests that start clusters, servers or a browser run one at a time on
# one of them, the others beside them (tests/conftest.py).
test: setup browser
	$(BIN)/python -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

clean:
	rm -rf data/digits ray_results mlflow.db mlartifacts
