# The two commands of the README. Both create (or reuse) .venv and install everything it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STUDY_DIR ?= runs/default-study
PYTEST_ARGS ?=

.PHONY: study test test-slow lint env clean-env

env: $(VENV)/.installed

# torch/torchvision first: pip takes them from this machine's local wheels; the constraints file
# (pip freeze of a working install) makes a fresh machine resolve the same versions.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	# batchgenerators -> unittest2 installs a stray argparse that breaks every Prefect server
	$(PY) -m pip uninstall -y -q argparse || true
	$(PY) -c "import argparse; assert hasattr(argparse, 'BooleanOptionalAction'), 'stray argparse still installed'"
	touch $@

# The default cohort is built first and checked against data_manifest.csv (every file's sha256, or its NIfTI content
# where this Python's zlib gzips to other bytes), so a machine that
# makes other data stops within a minute, not after the training; the study then reuses the built cohort.
# build-phantom's defaults are the study's (tests/test_phantom.py checks that).
# SAMPLER=distilled: the study samples with a shipped distilled student (synth/shipped.py) instead of training one:
# the 2-step one, or with STEPS=4 the 4-step one. STEPS is the study's --steps (any sampler).
study: $(VENV)/.installed
	$(VENV)/bin/medddpm build-phantom --out $(STUDY_DIR)/cohort
	$(VENV)/bin/medddpm validate $(STUDY_DIR)/cohort/data_manifest.csv --against data_manifest.csv
	$(VENV)/bin/medddpm study --out $(STUDY_DIR) $(if $(SAMPLER),--sampler $(SAMPLER)) $(if $(STEPS),--steps $(STEPS))

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

# The rules are in pyproject.toml ([tool.ruff.lint]).
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

test-slow: $(VENV)/.installed
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

# Rebuild the shipped demo generator (synth/pretrained/) and its card: hours on 2 cores, resumable under WORK.
# FROM: where the chain starts (v3 = only v4's run; v2, v1 or scratch reruns the earlier stages too).
FROM ?= v3
.PHONY: demo-generator
demo-generator: $(VENV)/.installed
	@test -n "$(WORK)" || { echo "usage: make demo-generator WORK=/path/to/workdir [FROM=v3|v2|v1|scratch]" >&2; exit 2; }
	$(PY) scripts/pretrain_demo_generator.py --work $(WORK) --from $(FROM)

clean-env:
	rm -rf $(VENV)
