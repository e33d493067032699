# Two commands for a new user: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-quick up enqueue status bench verify clean

$(VENV)/.installed: requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-test.txt
	touch $@

## demo: run the whole job offline on data/ against a local SQS endpoint and API stand-in
demo: $(VENV)/.installed
	$(PY) -m stack demo

## test: the full test suite, reliability trials included
test: $(VENV)/.installed
	$(PY) -m pytest

## test-quick: the test suite without the long reliability trials
test-quick: $(VENV)/.installed
	$(PY) -m pytest -m "not trial"

## up: keep the local stack (SQS endpoint, stand-in, worker, Flower on :5555) running until Ctrl+C
up: $(VENV)/.installed
	$(PY) -m stack up

LOCAL_ENV := var/local.env
NEED_UP = @test -f $(LOCAL_ENV) || { echo "error: $(LOCAL_ENV) not found: start the stack with make up first" >&2; exit 2; }

## enqueue: send data/ to the stack that `make up` runs
enqueue: $(VENV)/.installed
	$(NEED_UP)
	set -a && . ./$(LOCAL_ENV) && set +a && $(PY) enqueue.py

## status: show the newest run on the stack that `make up` runs, until nothing is left
status: $(VENV)/.installed
	$(NEED_UP)
	set -a && . ./$(LOCAL_ENV) && set +a && $(PY) enqueue.py status --wait

## bench: measure speed against the original algorithm and the API's bound
bench: $(VENV)/.installed
	$(PY) bench/run.py

## verify: check every stored file against the manifest
verify: $(VENV)/.installed
	$(PY) -m tasks.store verify

clean:
	rm -rf var
