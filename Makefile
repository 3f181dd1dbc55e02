# catchall tasks. `make start` runs the worker and what it needs; `make test` runs the tests.
SHELL := /bin/bash
CARGO ?= cargo
EVENTS ?= 10000
# Where pip puts the validators' commands (.ci/deps.sh): the interpreter's scripts directory and
# the user's. Under pyenv the first is not on the PATH until `pyenv rehash`, so on a fresh machine
# `make lint` found no check-jsonschema right after installing it.
PY_BIN := $(shell python3 -c 'import os, site, sysconfig; print(sysconfig.get_path("scripts") + os.pathsep + os.path.join(site.USER_BASE, "bin"))' 2>/dev/null)
export PATH := $(if $(PY_BIN),$(PY_BIN):)$(PATH)

# The prerequisites install with apt one after another: `make -j test` would run apt twice at once.
.NOTPARALLEL:

.PHONY: deps start services events createEvents test extra-stop nextest chaos bench bench-baseline bench-claim bench-pg soak lint lint-rust lint-deploy build postfix

## start: make sure RabbitMQ and Postgres answer (starting them), then run the worker in the foreground
start: services
	$(CARGO) run --release --bin catchall

## deps: install the tools lint and the tests need (promtool, the PyPI validators, pika) if missing
deps:
	bash .ci/deps.sh

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
test: deps services build nextest postfix
	bash .ci/extra.sh  # TLS broker and Postgres, 3-node cluster, replica (tests/it/{tls,cluster,replica}.rs)
	$(CARGO) nextest run --workspace --no-fail-fast
	bash .ci/vendor-test.sh  # the patched crates' own unit tests (vendor/README.md)

## extra-stop: stop the extra servers `make test` leaves running (TLS, cluster, replica): they take CPU
## while idle, so stop them before `make bench`
extra-stop:
	bash .ci/extra.sh stop

# postfix: the Debian package tests/it/tail.rs runs its own instance of (installed if missing,
# never configured or started as a system service)
postfix:
	bash .ci/postfix.sh

# Every test runs in its own process under nextest (the metrics recorder is per process).
nextest:
	@$(CARGO) nextest --version >/dev/null 2>&1 || $(CARGO) install --locked cargo-nextest --version 0.9.143

## chaos: the fault-injection run alone (two workers, random faults, at least 200,000 events), with its report
chaos: build nextest
	CHAOS_SEED=$${CHAOS_SEED:-$$(date +%s)} $(CARGO) nextest run --workspace --no-capture -E 'test(chaos)'

## bench: throughput and latency against the machine's own ceilings (BENCH_EVENTS, BENCH_DOMAINS scale it);
## the open-loop stages publish with the release producer, built first
bench: services
	$(CARGO) build --release -p catchall-producer
	$(CARGO) bench --bench bench

## bench-baseline: make bench with BASELINE's worker (a git revision; default cbf388c, the commit
## before issue 8) beside ours in every round: ours / baseline, paired per round
BASELINE ?= cbf388c
bench-baseline: services
	rm -rf target/baseline-src && mkdir -p target/baseline-src
	git archive $(BASELINE) | tar -x -C target/baseline-src
	cd target/baseline-src && CARGO_TARGET_DIR=$(CURDIR)/target/baseline $(CARGO) build --release --bin catchall
	$(CARGO) build --release -p catchall-producer
	BENCH_BASELINE_BIN=$(CURDIR)/target/baseline/release/catchall $(CARGO) bench --bench bench

## bench-claim: Postgres CPU per claimed id, the worker's claim against the one it replaced, the
## pre-issue-8 single table, a plain insert, uuid ids by COPY and a claim that skips the
## partition of now() (BENCH_REPEATS rounds, interleaved; issue 13)
bench-claim: services
	BENCH_STAGES=claim $(CARGO) bench --bench bench

## soak: SOAK_MINUTES (default 30) of the producer's generator stream at half the measured capacity
## (SOAK_RATE sets it): throughput, RSS, dedup table size and freshness per minute, as a table and
## target/bench/soak.svg (issue 13)
soak: services
	$(CARGO) build --release -p catchall-producer
	BENCH_STAGES=soak $(CARGO) bench --bench bench

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

## lint: formatting, clippy, and every operations file checked by its ecosystem's own validator
## (compose, Dockerfile, Kubernetes, KEDA, Prometheus, Grafana, GitHub workflow); .ci/run installs them
lint: deps lint-rust lint-deploy

lint-rust:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# The Compose Specification of ../shared when present (the session's copy), else check-jsonschema's own.
COMPOSE_SCHEMA := $(if $(wildcard ../shared/compose-spec.json),--schemafile ../shared/compose-spec.json,--builtin-schema vendor.compose-spec)
K8S_CORE := $(filter-out %/kustomization.yaml %/keda-scaledobject.yaml,$(wildcard deploy/kubernetes/*.yaml))
LINT_OUT := target/lint

lint-deploy:
	@mkdir -p $(LINT_OUT)
	check-jsonschema $(COMPOSE_SCHEMA) compose.yaml
	python3 deploy/lint/compose_check.py compose.yaml
	hadolint Dockerfile
	kubernetes-validate --strict --quiet $(K8S_CORE)
	python3 deploy/lint/kustomization_check.py deploy/kubernetes
	python3 deploy/lint/crd_schema.py deploy/kubernetes/schemas/keda.sh_scaledobjects.yaml v1alpha1 $(LINT_OUT)/keda-scaledobject.schema.json
	check-jsonschema --schemafile $(LINT_OUT)/keda-scaledobject.schema.json deploy/kubernetes/keda-scaledobject.yaml
	promtool check config deploy/prometheus/prometheus.yml
	promtool check rules deploy/prometheus/alerts.yml
	promtool test rules deploy/prometheus/alerts.test.yml
	python3 deploy/lint/dashboard_rules.py $(LINT_OUT)/dashboard-rules.yml deploy/grafana/dashboards/*.json
	promtool check rules $(LINT_OUT)/dashboard-rules.yml
	check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml
	check-jsonschema --builtin-schema custom.github-workflows-require-timeout .github/workflows/*.yml
