# The README's commands. Everything runs from a virtualenv made here (.venv), so a fresh
# machine needs only python3 (3.11+), RabbitMQ and Postgres reachable by URL.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# make test's workers (pytest-xdist): each test file runs whole on one worker, so a module's shared stack
# is started once; most tests wait on sockets and timers, so three workers pay on two cores.
TEST_WORKERS ?= 3
# The locked dependencies, with hashes (make lock writes both): the runtime ones plus the test extra
# for the venv, the runtime ones alone for the Dockerfile.
LOCK := requirements/test.txt
RUNTIME_LOCK := requirements/runtime.txt
UV_COMPILE = $(VENV)/bin/uv pip compile pyproject.toml --universal --python-version 3.11 --generate-hashes \
	--custom-compile-command "make lock" --quiet

.PHONY: up test unit e2e install lint lock lock-upgrade bench proto clean

# Exactly the locked versions (pip refuses any file whose hash the lock does not list), then the
# project itself without resolving anything; a changed lock or pyproject.toml reinstalls.
$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --require-hashes -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) requirements/check.py
	touch $(STAMP)

install: $(STAMP)

## Bring the whole stack up in the foreground (Ctrl-C stops it).
up: $(STAMP)
	$(PY) -m devstack up

## The gates (ruff, mypy strict), then unit, end-to-end, deployment and broker tests against real RabbitMQ
## and Postgres on TEST_WORKERS workers, then the fault scenarios (tests/faults, marker faults) alone: they
## kill and restart services under load and judge recovery times, which other tests' load would distort.
## Prints the slowest tests and the suite's wall time; exit 5 (no test collected) is a failure.
test: lint
	@start=$$(date +%s); \
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not faults" --durations=20 $(PYTEST_ARGS); rc=$$?; \
	$(PY) -m pytest -m faults --durations=10 $(PYTEST_ARGS); faults=$$?; \
	echo "suite wall time: $$(( $$(date +%s) - start )) s"; \
	if [ $$rc -eq 5 ] || [ $$faults -eq 5 ]; then echo "pytest collected no tests: that is a failure" >&2; fi; \
	if [ $$rc -ne 0 ]; then exit $$rc; fi; exit $$faults

## The gates configured in pyproject.toml: ruff (lint) and mypy (strict on libs/ and services/).
lint: $(STAMP)
	$(VENV)/bin/ruff check .; ruff=$$?; $(VENV)/bin/mypy; exit $$(( ruff || $$? ))

## Re-resolve the lock after a change to pyproject.toml's dependencies (pins that still fit are kept).
lock: $(VENV)/bin/uv
	$(UV_COMPILE) --extra test -o $(LOCK)
	$(UV_COMPILE) --constraint $(LOCK) -o $(RUNTIME_LOCK)

## Move every locked dependency to its newest release that pyproject.toml allows.
lock-upgrade: $(VENV)/bin/uv
	$(UV_COMPILE) --extra test --upgrade -o $(LOCK)
	$(UV_COMPILE) --constraint $(LOCK) -o $(RUNTIME_LOCK)

# uv comes from the lock (test extra); a venv that cannot install the lock yet (a dependency added
# to pyproject.toml and not locked) still gets uv, so that make lock can repair it.
$(VENV)/bin/uv:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet 'uv>=0.13'

unit: $(STAMP)
	$(PY) -m pytest tests/unit --durations=20 $(PYTEST_ARGS)

e2e: $(STAMP)
	$(PY) -m pytest tests/e2e --durations=20 $(PYTEST_ARGS)

## HTTP load against a running `make up` stack.
bench: $(STAMP)
	$(PY) bench/http_provision.py -n 5000 -c 64

## Regenerate the protobuf classes from libs/common/provisioning_common/proto/transport.proto.
proto: $(STAMP)
	cd libs/common/provisioning_common/proto && ../../../../$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. transport.proto

clean:
	rm -rf $(VENV) .pytest_cache
