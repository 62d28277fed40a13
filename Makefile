# Two commands do all set-up: `make demo` (venv, install, main job) and `make test` (venv,
# install, every test). Every install goes through constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean bench bench-compare baseline notebooks strip-notebooks

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/ptdit reproduce

test: $(STAMP)
	PTDIT_NOTEBOOK_SIZE=small HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests \
		bench/regression/test_exact.py --nbmake $(NBMAKE) notebooks/*.ipynb $(PYTEST_ARGS)
	@if [ "$$CI" = true ]; then $(MAKE) --no-print-directory bench-compare PYTEST_ARGS=; fi

# Lint: ruff (pinned in constraints.txt; rules in pyproject.toml); .ci/run runs it beside the
# tests. `make lint RUFF_ARGS=--fix` applies the safe fixes.
lint: $(STAMP)
	$(BIN)/ruff check . $(RUFF_ARGS)

# Notebooks (notebooks/README.md): executed by nbmake in this venv's kernel, outputs never
# written back; `make test` runs them at PTDIT_NOTEBOOK_SIZE=small, `make notebooks` at
# NOTEBOOK_SIZE (default full). `strip-notebooks` clears outputs before a commit.
NOTEBOOK_SIZE ?= full
NBMAKE := --nbmake-timeout=3600

notebooks: $(STAMP)
	PTDIT_NOTEBOOK_SIZE=$(NOTEBOOK_SIZE) HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q --nbmake \
		$(NBMAKE) notebooks/*.ipynb $(PYTEST_ARGS)

strip-notebooks: $(STAMP)
	$(BIN)/python notebooks/strip.py

# Regression gates (docs/regression.md). `bench`: the speed benchmarks, reported against
# bench/regression/baselines/speed-<device>.json, history saved under .benchmarks/;
# `bench-compare`: the same, failing on a confirmed regression; `baseline`: re-records the exact
# counts and this machine's speed ratios (then commit bench/regression/baselines/).
BENCH := HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q bench/regression/test_speed.py \
	--benchmark-autosave --benchmark-storage=.benchmarks --benchmark-save-data \
	--benchmark-columns=median,iqr,rounds --benchmark-sort=name

bench: $(STAMP)
	$(BENCH) $(PYTEST_ARGS)

bench-compare: $(STAMP)
	$(BENCH) --speed-gate $(PYTEST_ARGS)

baseline: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q bench/regression/test_exact.py \
		bench/regression/test_speed.py --update-baseline $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
