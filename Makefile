# The README's commands. Everything runs from a virtualenv made here (.venv), so a fresh
# machine needs only python3 (3.11+), RabbitMQ and Postgres reachable by URL.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: up test unit e2e install bench proto clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## Bring the whole stack up in the foreground (Ctrl-C stops it).
up: $(STAMP)
	$(PY) -m devstack up

## Unit tests plus end-to-end tests against real RabbitMQ and Postgres.
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

unit: $(STAMP)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

e2e: $(STAMP)
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

## HTTP load against a running `make up` stack.
bench: $(STAMP)
	$(PY) bench/http_provision.py -n 5000 -c 64

## Regenerate the protobuf classes from libs/common/provisioning_common/proto/transport.proto.
proto: $(STAMP)
	cd libs/common/provisioning_common/proto && ../../../../$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. transport.proto

clean:
	rm -rf $(VENV) .pytest_cache
