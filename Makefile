# HawAda developer entry points. `make demo` and `make test` are the two commands in README.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# Re-install only when the project's dependencies change.
STAMP := $(VENV)/.hawada-installed

.PHONY: venv install demo test test-fast lint clean-var

venv: $(PY)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q -e '.[engine,service,dev]' $(TORCH_PINS)
	touch $(STAMP)

install: $(STAMP)

## demo: set up, start the embedded service, compress a small model over HTTP, print results
demo: install
	$(PY) -m hawada.demo

## test: the whole suite (unit, integration against real Celery/Redis/PostgreSQL when up)
test: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) -m pytest -q

## test-fast: skip tests marked slow
test-fast: install
	$(PY) -m pytest -q -m "not slow"

## lint: ruff (lint + format check), mypy (strict on core/ and adapters/; bench/ too), import contracts
# mypy and lint-imports find hawada.<layer> through the committed links hawada/<layer> ->
# ../<layer> (docs/internals.md). --no-cache: grimp's cache keys each module's imports by that
# file's mtime alone, so an import recorded while its target was outside the graph stays
# dropped; the whole graph builds in under a second anyway.
lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy -p hawada
	$(PY) -m mypy bench
	$(VENV)/bin/lint-imports --no-cache

clean-var:
	rm -rf var/demo
