# The two commands of the README. Both create (or reuse) .venv and install everything it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STUDY_DIR ?= runs/default-study
PYTEST_ARGS ?=

.PHONY: study test test-slow env clean-env

env: $(VENV)/.installed

# torch/torchvision first: pip takes them from this machine's local wheels; the constraints file
# (pip freeze of a working install) makes a fresh machine resolve the same versions.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	# batchgenerators -> unittest2 installs a stray argparse that breaks every Prefect server (stack.md G1)
	$(PY) -m pip uninstall -y -q argparse || true
	$(PY) -c "import argparse; assert hasattr(argparse, 'BooleanOptionalAction'), 'stray argparse still installed'"
	touch $@

study: $(VENV)/.installed
	$(VENV)/bin/medddpm study --out $(STUDY_DIR)

test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

test-slow: $(VENV)/.installed
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

clean-env:
	rm -rf $(VENV)
