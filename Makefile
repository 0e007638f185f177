# The study's commands. `make` alone lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROFILE ?= default

.PHONY: help setup test lint format report check-report lab bench clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-13s %s\n", $$1, $$2}'

$(STAMP): requirements.txt requirements-nodeps.txt requirements-llamacpp.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	@$(PY) -c 'import llama_cpp' 2>/dev/null || echo "building llama.cpp (llama-cpp-python, once per machine: about 15 minutes on 2 cores)"
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-llamacpp.txt
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

# ---- the report: notebooks -> papermill -> executed notebook -> nbconvert HTML -> index.html ------------------
# Each executed notebook depends on its notebook, its profile's parameter files and kvlib, so only what changed
# re-runs. A notebook runs into a staging folder and replaces the report's copy only on success; a failure stops
# make with papermill's error and keeps REPORTS/PROFILE/<notebook>.failed.ipynb for inspection.
REPORTS ?= reports
PARAMS ?= params
OUT := $(REPORTS)/$(PROFILE)
NOTEBOOKS := $(sort $(basename $(notdir $(wildcard notebooks/[0-9][0-9]_*.ipynb))))
KVLIB_SRC := $(wildcard kvlib/*.py kvlib/*/*.py kvlib/*/*/*.py)
REPORT_PY = $(PY) -m kvlib report --reports $(REPORTS) --params $(PARAMS)
# nbconvert's lab template without its CDN scripts (require.js, MathJax, mermaid): every page opens offline
PAGE_TEMPLATE := kvlib/report/templates/offline.html.j2
# the reading view: the same page without code (--no-input), linked from the index as each notebook's first page
READING_TEMPLATE := kvlib/report/templates/reading.html.j2
# one machine probe per report (read bandwidth, matmul), measured before any notebook; every notebook divides its
# MBU by it. Measured again (and every notebook re-run) when the probe's code or the profile's shared keys change.
PROBE := $(OUT)/data/machine.json
# a profile may extend another (`extends: default` in params/<profile>.yaml, kvlib.report.pipeline.base_profile):
# its notebooks then depend on the base's parameter files too
BASE := $(shell sed -n 's/^extends: *\([A-Za-z0-9_-]*\).*/\1/p' $(PARAMS)/$(PROFILE).yaml 2>/dev/null)
BASE_FILES = $(if $(BASE),$(PARAMS)/$(BASE).yaml $(wildcard $(PARAMS)/$(BASE)/$(1).yaml))
NBCONVERT = $(VENV)/bin/jupyter nbconvert --to html --log-level ERROR --output-dir $(OUT)

ifneq ($(filter report,$(MAKECMDGOALS)),)
ifeq ($(wildcard $(PARAMS)/$(PROFILE).yaml),)
$(error unknown PROFILE=$(PROFILE): no $(PARAMS)/$(PROFILE).yaml (profiles: $(basename $(notdir $(wildcard $(PARAMS)/*.yaml)))))
endif
endif

report: $(OUT)/index.html ## Run every notebook with papermill; build reports/$(PROFILE)/index.html (PROFILE=smoke|default|full|gpu)
	@echo "report: $(OUT)/index.html"

$(OUT)/index.html: $(foreach n,$(NOTEBOOKS),$(OUT)/$(n).ipynb $(OUT)/$(n).html $(OUT)/$(n).reading.html) $(KVLIB_SRC) | $(STAMP)
	@$(REPORT_PY) index --profile $(PROFILE)

$(OUT)/%.reading.html: $(OUT)/%.ipynb $(READING_TEMPLATE) $(PAGE_TEMPLATE) | $(STAMP)
	@$(NBCONVERT) --template-file $(READING_TEMPLATE) --no-input --output $*.reading $<

$(OUT)/%.html: $(OUT)/%.ipynb $(PAGE_TEMPLATE) | $(STAMP)
	@$(NBCONVERT) --template-file $(PAGE_TEMPLATE) $<

$(PROBE): kvlib/measure/roofline.py $(PARAMS)/$(PROFILE).yaml $(if $(BASE),$(PARAMS)/$(BASE).yaml) | $(STAMP)
	@$(REPORT_PY) probe --profile $(PROFILE)

.SECONDEXPANSION:
$(OUT)/%.ipynb: notebooks/%.ipynb $(PARAMS)/$(PROFILE).yaml $$(wildcard $(PARAMS)/$(PROFILE)/$$*.yaml) $$(call BASE_FILES,$$*) $(KVLIB_SRC) $(PROBE) | $(STAMP)
	@$(REPORT_PY) run $* --profile $(PROFILE)

check-report: $(STAMP) ## Open every page of reports/$(PROFILE) (index, reading views, full notebooks) in headless Chromium; fail on broken images/links; screenshots
	@$(PY) -m kvlib check-report $(OUT)

lab: $(STAMP) ## JupyterLab on the project's environment (notebooks run top to bottom with their defaults)
	cd notebooks && ../$(VENV)/bin/jupyter lab

bench: $(STAMP) ## kvlib vs HF generate and the memory floor (smollm2-135m, distilgpt2, gemma3-270m; long-context rows): reports/bench.csv, bench_long.csv (QUICK=1: smollm2-135m, < 3 min)
	$(PY) -m kvlib bench $(if $(filter-out 0,$(QUICK)),--quick)

clean: ## Remove generated reports (keeps .venv)
	rm -rf reports/*/
