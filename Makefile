# covidcxr: `make run` sets up and runs the main job; `make test` sets up and runs every test.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch build: this pin installs from the package index (CPU and CUDA capable). Override for another build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# Development data: the shared copy beside the project, unless COVIDCXR_DATA is already set.
SHARED_DATA := $(abspath ../shared/data/cxr)
COVIDCXR_DATA ?= $(if $(wildcard $(SHARED_DATA)/metadata.csv),$(SHARED_DATA),)
export COVIDCXR_DATA
# Main job: the recipe trains with its own preset (covidcxr.presets, chosen by patient-grouped cross-validation).
# A rerun replaces runs/146 whole, once the new run is complete (never a mix of two runs).
# Override on the command line, e.g. `make run RECIPE=covid_vs_normal_392 OUT=runs/392 TRAIN_ARGS="--cv 5"`.
RECIPE ?= covid_vs_pneumonia_146
OUT ?= runs/146
TRAIN_ARGS ?=
NB_WORKERS ?= 2

.PHONY: install data run test nbtest pytest check docs need-quarto readme studies clean
install: $(VENV)/.installed

$(VENV)/.installed: settings.ini setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

run: install data
	$(BIN)/covidcxr train --recipe $(RECIPE) --out $(OUT) --overwrite $(TRAIN_ARGS)

# Data step: the dataset $COVIDCXR_DATA names, else ~/.covidcxr/data, fetched there first when it is missing (the public
# sources at pinned commits, resumable, checked: covidcxr.fetch.ensure_data). With neither data nor network it says
# exactly what to do and stops (exit 3).
data: install
	@$(BIN)/python -W ignore::FutureWarning -c 'import sys; from covidcxr.fetch import ensure_data; sys.exit(ensure_data())'

test: install check nbtest pytest

# the library is in sync with the notebooks, and the notebooks are clean
check: install
	$(BIN)/nbdev_export
	$(BIN)/nbdev_clean
	@if git rev-parse --git-dir >/dev/null 2>&1; then \
		git diff --exit-code --stat -- covidcxr nbs || { echo "nbdev_export / nbdev_clean changed files: commit them"; exit 1; }; fi
	$(BIN)/python tools/nb2readme.py --check

nbtest: install
	OMP_NUM_THREADS=1 $(BIN)/nbdev_test --n_workers $(NB_WORKERS) --timing

pytest: install
	$(BIN)/pytest -q tests

# README.md from nbs/index.ipynb, without Quarto
readme: install
	$(BIN)/python tools/nb2readme.py

# The docs site in _docs: `nbdev_docs` inside .venv (README.md comes from `readme` just before, so nbdev leaves it).
# It needs Quarto on PATH: without it nbdev would install Quarto system-wide (sudo) and pip-install the project,
# so this target refuses first. (The GitHub docs workflow, deploy.yaml, does not use it.)
docs: need-quarto install readme
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/nbdev_docs --n_workers $(NB_WORKERS)

need-quarto:
	@PATH="$(abspath $(BIN)):$$PATH"; command -v quarto >/dev/null 2>&1 || { echo "make docs needs Quarto (https://quarto.org); it is not installed here, and this target will not install it" >&2; exit 1; }

# the study notebooks (20+) in their full setting, outputs saved into the notebooks (for the docs)
studies: install
	for nb in nbs/2[0-9]_*.ipynb; do COVIDCXR_FULL=1 $(BIN)/jupyter nbconvert --to notebook --execute --inplace \
		--ExecutePreprocessor.timeout=-1 "$$nb" || exit 1; done
	$(BIN)/nbdev_clean

clean:
	rm -rf _proc _docs runs
