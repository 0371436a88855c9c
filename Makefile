# Two commands a user needs (see README):
#   make demo   -> creates .venv, installs synthcxr (pinned torch pair), runs `synthcxr demo`
#   make test   -> creates .venv, installs synthcxr + test tools (+ Chromium for browser tests, dicom3tools), runs pytest
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP_FLAGS ?=

.PHONY: setup demo test test-fast browser test-tools lint clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install $(PIP_FLAGS) -c constraints.txt -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/synthcxr demo $(DEMO_ARGS)

browser:
	bash scripts/install_browser.sh

test-tools:
	bash scripts/install_test_tools.sh

test: setup browser test-tools
	bash scripts/run_tests.sh $(PYTEST_ARGS)

test-fast: setup
	bash scripts/run_tests.sh -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check src tests benchmarks

clean-venv:
	rm -rf $(VENV)
