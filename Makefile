# Two commands do all set-up on a fresh machine: `make demo` and `make test` (each creates .venv if missing).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision come from this machine's local wheel store; everything else is pinned in constraints.txt.
PIP_INSTALL := $(PY) -m pip install --disable-pip-version-check -c constraints.txt
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -q torch==2.14.1 torchvision==0.29.1
	$(PIP_INSTALL) -q -e ".[all,dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ddcolor demo --out demo_out

# pytest exits 5 when it collects no tests: that is a failure too (any non-zero status fails make).
test: $(STAMP) lint
	@$(PY) -m pytest -q; status=$$?; \
	  if [ $$status -eq 5 ]; then echo "pytest collected no tests" >&2; fi; exit $$status

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -x

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) bench/infer.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache .ruff_cache
