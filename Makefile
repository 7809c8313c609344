# Modelfleet. `make demo` and `make test` each set up everything they need from scratch.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
REQS := $(wildcard requirements/*.txt)
STAMP := $(VENV)/.installed-$(shell cat $(REQS) | sha256sum | cut -c1-16)

.PHONY: setup test demo up lint format bench clean clean-up

setup: $(STAMP)

$(STAMP): $(REQS)
	scripts/system-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements/dev.txt
	rm -f $(VENV)/.installed-*
	touch $@

## test: set up, start PostgreSQL/Redis if needed, run the whole suite (slow e2e tests included)
test: setup
	scripts/with-services.sh $(PY) -m pytest $(PYTEST_ARGS)

## demo: set up, start the control plane, a broker and twelve agents, tell the rollout story
## (DEMO_DEVICES=N: a simulated fleet of N devices beside them); see scripts/demo/
demo: setup
	scripts/with-services.sh $(PY) -m scripts.demo

## up: the production processes (Procfile) with production settings until Ctrl-C; state in var/up
up: setup
	scripts/with-services.sh $(PY) scripts/up.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

## bench: the registry pipeline benchmark (see docs/benchmarks.md)
bench: setup
	scripts/with-services.sh $(PY) bench/registry_pipeline.py

# The project's own databases only: the demo's, the demo test's, and the test databases
# pytest-django leaves behind when a run is killed (test_modelfleet, test_modelfleet_gw<N>).
CLEAN_DATABASES := modelfleet_demo modelfleet_demo_test test_modelfleet 'test_modelfleet_gw%'

## clean: remove var/demo and var/test and drop the demo's and leftover test databases
clean:
	rm -rf var/test var/demo
	scripts/drop-databases.sh $(CLEAN_DATABASES)

## clean-up: what make up keeps (var/up: secrets, TLS, keys) and its database modelfleet_up
clean-up:
	rm -rf var/up
	scripts/drop-databases.sh modelfleet_up
