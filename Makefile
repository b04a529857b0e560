# tailseed: every target sets up what it needs on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/default.yaml
RAY_ADDRESS ?=
SET ?=
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup augment test bench eval tiny-model gpu-check lint clean

setup: $(STAMP)

# Keep an existing torch (a cluster or GPU image's CUDA build) through system site packages;
# otherwise pin the CPU build, since a plain `torch` requirement pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "setup: keeping the torch of $(PYTHON)"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		echo "setup: no torch found, installing the CPU build torch==2.13.0"; \
		$(PYTHON) -m venv $(VENV) && $(PY) -m pip install -q torch==2.13.0; \
	fi
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

augment: $(STAMP)
	$(VENV)/bin/tailseed augment --config $(CONFIG) $(foreach s,$(SET),--set $(s)) $(if $(RAY_ADDRESS),--ray-address $(RAY_ADDRESS),)

test: $(STAMP)
	$(PY) -m pytest -q --durations=25 tests

bench: $(STAMP)
	$(PY) -m research.bench

eval: $(STAMP)
	$(PY) -m research.evaluate

tiny-model: $(STAMP)
	$(PY) -m research.train_tiny_model --out models/tiny-digits

gpu-check: $(STAMP)
	$(PY) -m research.gpu_check

lint: $(STAMP)
	$(VENV)/bin/ruff check tailseed pipeline stages jobs research tests
	$(VENV)/bin/ruff format --check tailseed pipeline stages jobs research tests

clean:
	rm -rf out data
