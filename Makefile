# catchall tasks. `make start` runs the worker and what it needs; `make test` runs the tests.
SHELL := /bin/bash
CARGO ?= cargo
EVENTS ?= 10000

.PHONY: start services events createEvents test nextest chaos bench bench-pg lint build

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
	bash .ci/extra.sh  # TLS broker and Postgres, 3-node cluster, replica (tests/it/{tls,cluster,replica}.rs)
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

## bench-pg: batched floor and worker at BENCH_DOMAINS (default 10,000,000) with the server's Postgres
## settings, then with the recommended ones (reloadable settings only; reset afterwards)
PSQL := psql -h 127.0.0.1 -U postgres -qX
PG_TUNED := wal_compression=lz4 max_wal_size=16GB checkpoint_timeout=30min
bench-pg: services
	mkdir -p target/bench
	for s in $(PG_TUNED); do $(PSQL) -c "ALTER SYSTEM RESET $${s%%=*}"; done; $(PSQL) -c "SELECT pg_reload_conf()"
	BENCH_STAGES=batched BENCH_DOMAINS=$${BENCH_DOMAINS:-10000000} BENCH_EVENTS=$${BENCH_EVENTS:-2000000} $(CARGO) bench --bench bench
	cp target/bench/latest.json target/bench/pg-defaults.json
	for s in $(PG_TUNED); do $(PSQL) -c "ALTER SYSTEM SET $${s%%=*} = '$${s#*=}'"; done; $(PSQL) -c "SELECT pg_reload_conf()"
	BENCH_STAGES=batched BENCH_DOMAINS=$${BENCH_DOMAINS:-10000000} BENCH_EVENTS=$${BENCH_EVENTS:-2000000} $(CARGO) bench --bench bench; \
	  status=$$?; for s in $(PG_TUNED); do $(PSQL) -c "ALTER SYSTEM RESET $${s%%=*}"; done; $(PSQL) -c "SELECT pg_reload_conf()"; exit $$status
	cp target/bench/latest.json target/bench/pg-tuned.json

## lint: formatting, clippy, and compose.yaml against the Compose Specification
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	@if [ -f ../shared/compose-spec.json ] && command -v check-jsonschema >/dev/null; then \
	  check-jsonschema --schemafile ../shared/compose-spec.json compose.yaml; \
	else \
	  python3 -c 'import sys, yaml; yaml.safe_load(open("compose.yaml"))' && echo "compose.yaml parses (schema check skipped: no ../shared/compose-spec.json or check-jsonschema)"; \
	fi
