#!/usr/bin/env bash
# The extra servers of the connection tests (TLS, cluster, replica), started in parallel;
# each script reuses what already runs. Fails if any of them fails.
set -uo pipefail
cd "$(dirname "$0")"
started=$(date +%s)
pids=()
for script in tls.sh cluster.sh replica.sh; do
  bash "$script" > "/tmp/catchall-ci-${script%.sh}.log" 2>&1 &
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
