# The study's commands. `make` alone lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROFILE ?= default

.PHONY: help setup test lint format report lab bench clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $@

setup: $(STAMP) ## Create .venv from the exact pins in requirements.txt (only when missing or stale)

lint: $(STAMP) ## ruff lint and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP) ## Apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: $(STAMP) lint ## Lint, then the test suite (CPU, tiny models)
	$(PY) -m pytest -q

report: $(STAMP) ## Run every notebook with papermill and build reports/$(PROFILE)/index.html
	@echo "make report: the notebooks are not written yet (issue 4)" >&2; exit 1

lab: $(STAMP) ## JupyterLab on the project's environment
	cd notebooks && ../$(VENV)/bin/jupyter lab

clean: ## Remove generated reports (keeps .venv)
	rm -rf reports/*/
