#!/usr/bin/env bash
# The extra servers of the connection tests (TLS, cluster, replica), started in parallel;
# each script reuses what already runs. Fails if any of them fails.
set -uo pipefail
cd "$(dirname "$0")"
started=$(date +%s)
# The packages the three scripts need, installed here one at a time: the scripts run in
# parallel and must not run apt-get at the same time (dpkg lock).
. ./extra-lib.sh
# `extra.sh stop` (make extra-stop): stops them, data kept (the next run starts them again). They
# take CPU while they idle (four RabbitMQ nodes, three Postgres clusters): stop them before a bench.
if [ "${1:-}" = stop ]; then
  status=0
  for node in catchall-c3 catchall-c2 catchall-c1 catchall-tls; do
    if rmqctl "$node@localhost" ping >/dev/null 2>&1; then
      rmqctl "$node@localhost" stop >/dev/null || status=1
    fi
  done
  version=$(pg_version)
  for cluster in catchall_replica catchall_primary catchall_tls; do
    if pg_clusters 2>/dev/null | grep " $cluster " | grep -q online; then
      pg_cluster pg_ctlcluster --skip-systemctl-redirect "$version" "$cluster" stop || status=1
    fi
  done
  if [ "$status" = 0 ]; then echo "extra servers stopped"; else echo "extra servers: a stop failed" >&2; fi
  exit $status
fi
for pair in openssl:openssl rabbitmq-server:rabbitmq-server pg_createcluster:postgresql; do
  if ! need "${pair%%:*}" "${pair#*:}"; then
    echo "extra servers: installing ${pair#*:} failed" >&2
    exit 1
  fi
done
# The scripts run under `timeout`, away from the terminal: sudo asks for its password here.
if [ "$(id -u)" != 0 ]; then sudo -v; fi
pids=()
for script in tls.sh cluster.sh replica.sh; do
  # Bounded: a node that hangs must fail the run, not hold it until CI's own limit.
  timeout 600 bash "$script" > "/tmp/catchall-ci-${script%.sh}.log" 2>&1 &
  pids+=("$!")
done
status=0
for i in 0 1 2; do
  script=$(echo tls.sh cluster.sh replica.sh | cut -d' ' -f$((i + 1)))
  if wait "${pids[$i]}"; then
    tail -n 1 "/tmp/catchall-ci-${script%.sh}.log"
  else
    echo "extra servers: .ci/$script failed:" >&2
    cat "/tmp/catchall-ci-${script%.sh}.log" >&2
    status=1
  fi
done
echo "extra servers ready in $(( $(date +%s) - started )) s"
exit $status
