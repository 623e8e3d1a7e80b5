# Entry points. `make repro` on a fresh clone installs everything and runs the pipeline.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SHARED ?= ../shared
WEIGHTS := mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5
KERAS_DIR := $(if $(KERAS_HOME),$(KERAS_HOME),$(HOME)/.keras)/models
PORT ?= 5000
# DVC's stage commands call `python`: make it the project's.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: help install lock weights repro test test-fast lint format params ui benchmark clean
.DEFAULT_GOAL := help

help:  ## this list
	@awk 'BEGIN {FS = ":.*?## "} /^[a-zA-Z_-]+:.*?## / {printf "  make %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(VENV)/.installed  ## the project and its dependencies, in .venv; the offline plots page

# Reinstalled when pyproject.toml or the lock file changes; the lock pins every version.
$(VENV)/.installed: pyproject.toml requirements.lock | $(BIN)/python
	@echo "install: the pinned dependencies (requirements.lock) into $(VENV): a few minutes the first time (TensorFlow alone is hundreds of MB: pip shows a bar on a terminal)"
	$(BIN)/python -m pip install --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -m pipeline.plots_template > /dev/null
	@touch $@

weights:  ## make the MobileNetV2 ImageNet weights available offline (Keras' cache)
	@mkdir -p "$(KERAS_DIR)"
	@if [ -f "$(KERAS_DIR)/$(WEIGHTS)" ]; then echo "weights: $(KERAS_DIR)/$(WEIGHTS) is there"; \
	elif [ -f "$(SHARED)/models/$(WEIGHTS)" ]; then \
	  cp "$(SHARED)/models/$(WEIGHTS)" "$(KERAS_DIR)/$(WEIGHTS)" && echo "weights: copied to $(KERAS_DIR)"; \
	else echo "weights: $(WEIGHTS) not found in $(SHARED)/models/ nor $(KERAS_DIR): the steps download nothing, so copy the file to $(KERAS_DIR)/ (or run with model.weights=null)"; exit 2; fi

repro: install weights  ## the whole pipeline on the default data
	$(BIN)/dvc repro

# pytest-xdist workers, each taking whole test files (module fixtures are built once): one per
# core plus one, which keeps the cores busy while a worker waits on a subprocess, a server or the
# shared smoke project (measured on 2 cores: 14 m 29 s with 2 workers, 12 m 55 s with 3).
PYTEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print((os.cpu_count() or 1) + 1)")
test: install weights  ## the whole test suite (whole pipelines included)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile --durations=15

test-fast: install weights  ## the tests that run no whole pipeline (`-m "not slow"`)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile -m "not slow" --durations=10

lint: install  ## ruff: lint and format check (what CI runs first)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install  ## ruff: fix what can be fixed, format
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

lock: install  ## pin the installed versions in requirements.lock (after changing pyproject.toml)
	$(BIN)/python -m pip freeze --exclude-editable | sed '1i # The exact versions `make install` and CI install (pip freeze of a working .venv: `make lock` refreshes it).' > requirements.lock

params:  ## recompose params.yaml from conf/ (what DVC does on `dvc exp run -S`)
	$(BIN)/python -m pipeline.params

ui:  ## browse runs: http://127.0.0.1:$(PORT) (one worker: enough for one person)
	@echo "MLflow UI: http://127.0.0.1:$(PORT)/#/experiments?workflowType=machine_learning (the runs, not GenAI traces)"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port $(PORT) --workers 1

benchmark: install weights  ## the pipeline's cost vs the plain script it replaces (ratios; ~10 min; exit 1 = a target missed)
	$(BIN)/python benchmarks/bench.py $(BENCH_ARGS)

clean:  ## generated outputs (keeps the venv)
	rm -rf data models reports/*_figures outputs multirun mlflow.db mlartifacts mlruns dvc_plots
