# The two user-facing targets are `make demo` and `make check`; both set up what they need
# (Debian packages from packages.txt, a virtualenv at .venv with cowd installed editable) and
# are safe to run again.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP_DEPS := $(VENV)/.deps-stamp
STAMP_PIP := $(VENV)/.pip-stamp
PYTEST_ARGS ?=

.PHONY: demo check check-quick deps venv lint bench clean-venv install

deps: $(STAMP_DEPS)
$(STAMP_DEPS): packages.txt tools/install-deps
	tools/install-deps packages.txt
	@mkdir -p $(VENV) && touch $@

venv: $(STAMP_PIP)
$(STAMP_PIP): pyproject.toml $(STAMP_DEPS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dev,bench]'
	@touch $@

demo: venv
	tools/demo

# Every tier: tests/unit, tests/integration (real peers, root, FUSE, loop), tests/guest (VMs).
check: venv
	$(VENV)/bin/ruff check cowd formats tools tests
	$(VENV)/bin/mypy
	$(PY) -m pytest $(PYTEST_ARGS)

# The unit tier only (no root, no qemu, no guest, no daemons): seconds, for every edit.
check-quick: venv
	$(VENV)/bin/ruff check cowd formats tools tests
	$(VENV)/bin/mypy
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

# The man page, bash completion and systemd unit (contrib/, generated from the parser by
# tools/gen_manpage.py) into PREFIX: the venv by default, `make install PREFIX=/usr/local`
# as root for the whole system (the unit then goes to /etc/systemd/system).  Idempotent.
PREFIX ?= $(VENV)
install: venv
	tools/install-extras $(PREFIX)

lint: venv
	$(VENV)/bin/ruff check cowd formats tools tests
	$(VENV)/bin/mypy

bench: venv
	$(PY) -m tools.bench formats
