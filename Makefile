# The two user-facing targets are `make demo` and `make check`; both set up what they need
# (Debian packages from packages.txt, a virtualenv at .venv with cowd installed editable) and
# are safe to run again.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP_DEPS := $(VENV)/.deps-stamp
STAMP_PIP := $(VENV)/.pip-stamp
PYTEST_ARGS ?=

.PHONY: demo check deps venv lint bench clean-venv

deps: $(STAMP_DEPS)
$(STAMP_DEPS): packages.txt tools/install-deps
	tools/install-deps packages.txt
	@mkdir -p $(VENV) && touch $@

venv: $(STAMP_PIP)
$(STAMP_PIP): pyproject.toml $(STAMP_DEPS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dev]'
	@touch $@

demo: venv
	tools/demo

check: venv
	$(VENV)/bin/ruff check cowd formats tools tests
	$(VENV)/bin/mypy
	$(PY) -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check cowd formats tools tests
	$(VENV)/bin/mypy

bench: venv
	$(PY) -m tools.bench formats
