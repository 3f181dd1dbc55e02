# catchall tasks. `make start` runs the worker and what it needs; `make test` runs the tests.
SHELL := /bin/bash
CARGO ?= cargo
EVENTS ?= 10000

.PHONY: start services events createEvents test nextest chaos bench lint build

## start: make sure RabbitMQ and Postgres answer (starting them), then run the worker in the foreground
start: services
	$(CARGO) run --release --bin catchall

## services: start RabbitMQ and Postgres if they do not answer, and create the catchall database
services:
	bash .ci/services.sh

## events: publish $(EVENTS) synthetic events (the original createEvents)
events:
	$(CARGO) run --release -p catchall-producer -- generate --events $(EVENTS)

createEvents: events

build:
	$(CARGO) build --workspace --all-targets

## test: unit and integration tests against the real RabbitMQ and Postgres
test: build nextest
	$(CARGO) nextest run --workspace --no-fail-fast

# Every test runs in its own process under nextest (the metrics recorder is per process).
nextest:
	@$(CARGO) nextest --version >/dev/null 2>&1 || $(CARGO) install --locked cargo-nextest

## chaos: the fault-injection run alone (two workers, random faults, 200,000 events), with its report
chaos: build nextest
	CHAOS_SEED=$${CHAOS_SEED:-$$(date +%s)} $(CARGO) nextest run --workspace --no-capture -E 'test(chaos)'

## bench: throughput and latency against the machine's own ceilings (BENCH_EVENTS, BENCH_DOMAINS scale it)
bench: services
	$(CARGO) bench --bench bench

## lint: formatting, clippy, and compose.yaml against the Compose Specification
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	@if [ -f ../shared/compose-spec.json ] && command -v check-jsonschema >/dev/null; then \
	  check-jsonschema --schemafile ../shared/compose-spec.json compose.yaml; \
	else \
	  python3 -c 'import sys, yaml; yaml.safe_load(open("compose.yaml"))' && echo "compose.yaml parses (schema check skipped: no ../shared/compose-spec.json or check-jsonschema)"; \
	fi
