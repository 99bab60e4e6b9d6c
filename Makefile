# The two commands: `make up` (start the local stack) and `make test` (run every test).
SHELL := /bin/bash
VENV := .venv
TP := $(VENV)/bin/tracepipe
STAMP := $(VENV)/.bootstrapped
TEST_STAMP := $(VENV)/.bootstrapped-test

.PHONY: up down status migrate test lint bootstrap analyst analyst-revoke analysts bench

$(STAMP): pyproject.toml requirements.lock scripts/bootstrap.sh scripts/apt.sh db/ext/tp_guard/tp_guard.c db/ext/tp_guard/Makefile
	scripts/bootstrap.sh
	touch $@

bootstrap: $(STAMP)

# chromium and wrk: only `make test` and `make bench` need them, not `make up`
$(TEST_STAMP): $(STAMP) scripts/bootstrap-test.sh scripts/apt.sh
	scripts/bootstrap-test.sh
	touch $@

up: $(STAMP)  ## start the whole local stack in the background; prints the proxy URL (SCALE=N: N PostgREST and ext; REPLICA=1: a read replica; POOLER=1: PgBouncer)
	$(if $(SCALE),TP_SCALE=$(SCALE) )$(if $(REPLICA),TP_REPLICA=$(REPLICA) )$(if $(POOLER),TP_POOLER=$(POOLER) )$(TP) up

down: $(STAMP)  ## stop the local stack
	$(if $(SCALE),TP_SCALE=$(SCALE) )$(if $(REPLICA),TP_REPLICA=$(REPLICA) )$(if $(POOLER),TP_POOLER=$(POOLER) )$(TP) down

status: $(STAMP)  ## each component's state, pid and address (port or unix socket)
	$(TP) status

migrate: $(STAMP)  ## apply pending migrations, then the API surface and policies
	$(TP) migrate

test: $(TEST_STAMP)  ## every test, against a throwaway stack of its own
	$(VENV)/bin/pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy ext tracepipe

analyst: $(STAMP)  ## NAME=alice [SUITES=id1,id2]: an analyst login role; prints its connection URL last
	@test -n "$(NAME)" || { echo "usage: make analyst NAME=alice [SUITES=id1,id2]" >&2; exit 2; }
	$(TP) analyst create '$(NAME)' $(if $(SUITES),--suites '$(SUITES)')

analyst-revoke: $(STAMP)  ## NAME=alice: drop an analyst's role, ending its open sessions
	@test -n "$(NAME)" || { echo "usage: make analyst-revoke NAME=alice" >&2; exit 2; }
	$(TP) analyst revoke '$(NAME)'

analysts: $(STAMP)  ## list the analysts, their suites and open sessions
	$(TP) analyst list

bench: $(TEST_STAMP)  ## the benchmark suite on a throwaway stack (QUICK=1: a ~2-minute subset); writes bench/results/
	$(VENV)/bin/python -m bench.run $(if $(filter 1 yes true,$(QUICK)),--quick)

.PHONY: demo
demo: $(STAMP)  ## load a realistic sample into the running stack (make up first); prints how to sign in
	$(TP) demo

.PHONY: soak
soak: $(TEST_STAMP)  ## 5 min of 100 users on a throwaway stack (MINUTES=n; FAULTS=1: each component SIGKILLed in turn; FLOOD=1: beside a flooding key), then fuzzing with FUZZ_EXAMPLES=100 per operation
	$(VENV)/bin/python -m loadtest.run --minutes $(or $(MINUTES),5)$(if $(filter 1 yes true,$(FAULTS)), --faults)$(if $(filter 1 yes true,$(FLOOD)), --flood)
	TP_FUZZ_EXAMPLES=$(or $(FUZZ_EXAMPLES),100) $(VENV)/bin/pytest -q -p no:cacheprovider tests/test_fuzz.py

.PHONY: soak-tokens
soak-tokens: $(TEST_STAMP)  ## PostgREST's RSS over TOKENS=100000 distinct access tokens on a throwaway stack
	$(VENV)/bin/python -m loadtest.tokens --tokens $(or $(TOKENS),100000)
