# Two commands matter: `make run` (serve) and `make test` (the suite). Both set everything up first.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8000
REDIS_URL ?=
MODEL_DIR ?= .models/tiny
DATA_DIR ?= .data
# CPU wheel where there is no NVIDIA driver, a CUDA build where there is; override freely.
TORCH_INDEX ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo https://download.pytorch.org/whl/cu126 || echo https://download.pytorch.org/whl/cpu)
EXTRAS ?= api,worker,dev

export PORT REDIS_URL DATA_DIR MODEL_DIR
export HF_HUB_DISABLE_TELEMETRY := 1
export REDOCLY_TELEMETRY := off

# Unless pointed at real weights, serve the project's own tiny random-weight SDXL (it draws noise).
ifeq ($(origin SDXL_BASE_MODEL), undefined)
export SDXL_BASE_MODEL := $(MODEL_DIR)/base
export SDXL_REFINER_MODEL := $(MODEL_DIR)/refiner
export HF_HUB_OFFLINE := 1
endif

.PHONY: help venv system model run test test-tools lint openapi bench load chaos test-containers clean

help:
	@echo "make run    - serve the API on 127.0.0.1:$(PORT) with one worker (tiny model unless SDXL_BASE_MODEL is set)"
	@echo "make test   - run the test suite (unit, in-process API, end-to-end), all but the slow fault drills"
	@echo "make lint   - ruff + mypy"
	@echo "make chaos  - the slow fault drills (kill -9, Redis restarts, outages): pytest -m slow"
	@echo "make test-containers - build the images and run the compose stack in Docker (root, Debian)"
	@echo "make bench  - CPU benchmarks (JSON lines)   make load - load run"

system:
	@scripts/ensure_system.sh $(if $(REDIS_URL),no,yes)

# PYTHONWARNINGS: setuptools prints a boxed notice on every editable install (not a problem of ours)
$(VENV)/.installed: pyproject.toml | system
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch alone first, from TORCH_INDEX (its deps come from PyPI below), so the extras keep this build
	$(PY) -m pip install -q --no-deps --extra-index-url $(TORCH_INDEX) torch==2.13.0
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install -q -e '.[$(EXTRAS)]'
	@touch $@

venv: $(VENV)/.installed

$(MODEL_DIR)/base/model_index.json: | venv
	HF_HUB_OFFLINE=1 $(PY) -m tools.models build-tiny $(MODEL_DIR)

# the previews' tiny TAESD-XL, beside the tiny model (a model built before it existed gets it here)
$(MODEL_DIR)/taesd/config.json: | venv
	HF_HUB_OFFLINE=1 $(PY) -m tools.models build-tiny-taesd $(MODEL_DIR)/taesd

# tiny random LoRA adapters and presets beside it (docs/adapters.md): what `make run` serves as SDXL_ADAPTERS_DIR
$(MODEL_DIR)/adapters/adapters.json: | venv
	HF_HUB_OFFLINE=1 $(PY) -m tools.models build-tiny-adapters $(MODEL_DIR)/adapters

model: $(if $(filter $(MODEL_DIR)/base,$(SDXL_BASE_MODEL)),$(MODEL_DIR)/base/model_index.json $(MODEL_DIR)/taesd/config.json $(MODEL_DIR)/adapters/adapters.json,)

run: venv model
	$(PY) scripts/run_local.py

# Browser (playground) and Node (OpenAPI lint) tools the suite uses; installed when missing.
test-tools:
	@scripts/ensure_chromium.sh
	@scripts/ensure_node_tools.sh

# OMP_NUM_THREADS=1: the tests run API, workers and pytest side by side; torch's threads would fight
TEST_ENV := HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 SDXL_TEST_MODEL_DIR=$(MODEL_DIR)

# tests/unit, tests/api (in-process) and tests/e2e (real processes); the fault drills (marked slow) are `make chaos`
test: venv model test-tools
	$(TEST_ENV) $(PY) -m pytest -q -m "not slow and not containers" $(PYTEST_ARGS)

PACKAGES := app worker common cli dispatcher cleanup tools

lint: venv
	$(VENV)/bin/ruff check $(PACKAGES) tests bench scripts
	$(VENV)/bin/mypy $(PACKAGES)
	$(VENV)/bin/lint-imports  # the import contracts in pyproject.toml

openapi: venv
	$(PY) scripts/export_openapi.py

bench: venv model
	HF_HUB_OFFLINE=1 $(PY) bench/run_all.py

load: venv model
	HF_HUB_OFFLINE=1 $(PY) bench/load.py

# exactly the tests marked slow: kill -9 and SIGTERM of busy workers, Redis restarts, storage outages
chaos: venv model
	$(TEST_ENV) $(PY) -m pytest -q -m "slow and not containers" $(PYTEST_ARGS)

# the images built and the compose stack run in Docker (tests/deploy/test_containers.py): starts dockerd and
# builds the debian:bookworm-slim base when they are missing (scripts/containers/test.sh says how)
test-containers: venv model
	$(TEST_ENV) PY=$(PY) scripts/containers/test.sh $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .models .data .pytest_cache
