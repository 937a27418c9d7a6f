# spectrawatch — developer commands. `make demo` and `make test` set everything up themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8765
STAMP := $(VENV)/.installed

.PHONY: install demo test test-postgres test-fast lint typecheck bench docs clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch, never a CUDA build: from local disk where the machine has it
	# (CI), else from PyTorch's CPU index (plain PyPI's torch is the CUDA build)
	$(PY) -m pip install -q 'torch==2.13.0+cpu' 2>/dev/null || \
	  $(PY) -m pip install -q 'torch==2.13.0+cpu' --extra-index-url https://download.pytorch.org/whl/cpu
	$(PY) -m pip install -q -e '.[server,dev,scale]'
	touch $(STAMP)

install: $(STAMP)

## Server + a real training run streaming to it (SQLite, local blobs, in-process worker).
demo: $(STAMP)
	$(PY) -m spectrawatch demo --port $(PORT) --data-dir .spectrawatch/demo $(DEMO_ARGS)

## The whole test suite (unit, integration against real servers, e2e). Exit 5 = no tests is a failure.
test: $(STAMP)
	$(PY) -m pytest -p no:cacheprovider $(PYTEST_ARGS)

## The integration suite again in scale-out mode: PostgreSQL + procrastinate, one API and two
## worker processes per server. Needs SPECTRAWATCH_TEST_POSTGRES_URL (eval "$$(.ci/postgres.sh)").
test-postgres: $(STAMP)
	@test -n "$$SPECTRAWATCH_TEST_POSTGRES_URL" || \
	  { echo 'set SPECTRAWATCH_TEST_POSTGRES_URL: eval "$$(bash .ci/postgres.sh)"' >&2; exit 2; }
	SPECTRAWATCH_TEST_MODE=postgres $(PY) -m pytest -p no:cacheprovider tests/integration $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -p no:cacheprovider -m "not slow and not e2e" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check client server migrations tests benchmarks examples
	$(VENV)/bin/ruff format --check client server migrations tests benchmarks examples

typecheck: $(STAMP)
	$(VENV)/bin/mypy client/spectrawatch server/spectrawatch_server

## Quick benchmark; the others (and their arguments) are listed in benchmarks/RESULTS.md.
bench: $(STAMP)
	$(PY) benchmarks/ingest_load.py

## Regenerate docs/cli.md (the command-line reference) from the parser, and the pages' metric
## help (dashboards/metric_help.json) from docs/metrics.md.
docs: $(STAMP)
	$(PY) -m spectrawatch._cli_doc > docs/cli.md
	$(PY) -m spectrawatch_server.figures.metric_help docs/metrics.md > dashboards/metric_help.json

clean:
	rm -rf $(VENV) .spectrawatch build dist *.egg-info
