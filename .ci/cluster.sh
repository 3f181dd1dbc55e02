#!/usr/bin/env bash
# A 3-node RabbitMQ cluster for tests/it/cluster.rs, made unless it already runs (idempotent):
# catchall-c1..c3@localhost on 127.0.0.1:5701..5703 (dist ports 25701..25703), c2 and c3
# joined to c1. A node left stopped (stop_app) by an interrupted test is started again; when a
# node is down, the cluster is made anew.
# Needs: rabbitmq-server (installed with apt-get when missing).
set -euo pipefail
cd "$(dirname "$0")"
. ./extra-lib.sh
need rabbitmq-server rabbitmq-server

conf() { # port
  printf 'listeners.tcp.1 = 127.0.0.1:%s\nloopback_users = none\ncluster_partition_handling = pause_minority\n' "$1"
}
# A node that is not running (after `make extra-stop`, a reboot, a crash): the cluster is made
# afresh, every node stopped and its state wiped. Restarting the three from their old state
# failed once in a clean-clone CI run: c2, syncing feature flags with peers still starting,
# crashed (RabbitMQ 3.10: `incompatible_feature_flags`, `{badmap,undefined}` in
# rabbit_feature_flags:enable_dependencies/2). The tests keep nothing in the cluster.
for i in 1 2 3; do
  if ! rabbit_node_runs "catchall-c$i"; then
    for j in 1 2 3; do
      if rmqctl "catchall-c$j@localhost" ping >/dev/null 2>&1; then
        rmqctl "catchall-c$j@localhost" stop >/dev/null
      fi
      as_root rm -rf "$CI_DIR/catchall-c$j/mnesia"
    done
    break
  fi
done
started=()
for i in 1 2 3; do
  if ! rabbit_node_runs "catchall-c$i"; then
    start_rabbit_node "catchall-c$i" "2570$i" "$(conf "570$i")" rabbitmq_management_agent
    started+=("$i")
  fi
done
for i in 1 2 3; do
  if [[ " ${started[*]} " == *" $i "* ]]; then
    await_rabbit_node "catchall-c$i"
  elif ! answers "570$i"; then
    # The Erlang node runs but its app was stopped (an interrupted test): start it.
    rmqctl "catchall-c$i@localhost" start_app >/dev/null
  fi
done
# Nodes not yet in c1's cluster: stop and reset them in parallel, join one at a time, start
# them in parallel.
joining=()
for i in 2 3; do
  if ! rmqctl catchall-c1@localhost cluster_status --formatter json 2>/dev/null \
      | grep -q "catchall-c$i@localhost"; then
    joining+=("$i")
  fi
done
# Runs `$1 NODE_NUMBER` for each joining node in parallel; fails if any of them fails (a bare
# `wait` would return 0 whatever they returned).
each_joining() { # function
  local pids=() pid
  for i in "${joining[@]}"; do "$1" "$i" >/dev/null & pids+=("$!"); done
  for pid in "${pids[@]}"; do wait "$pid"; done
}
stop_and_reset() { rmqctl "catchall-c$1@localhost" stop_app && rmqctl "catchall-c$1@localhost" reset; }
start_app() { rmqctl "catchall-c$1@localhost" start_app; }
if [ "${#joining[@]}" -gt 0 ]; then
  each_joining stop_and_reset
  for i in "${joining[@]}"; do
    rmqctl "catchall-c$i@localhost" join_cluster catchall-c1@localhost >/dev/null
  done
  each_joining start_app
fi
# A clean-clone CI run failed here: c1 answered cluster_status with "rabbit_is_not_running"
# (its app not running) after c2 and c3 had joined and started. Not reproduced; a likely cause
# is pause_minority stopping c1's app for a moment while it saw too few nodes running. So await
# the cluster itself (all three nodes running as c1 sees them) rather than ask once.
running=""
for _ in $(seq 1 90); do
  running=$(rmqctl catchall-c1@localhost cluster_status --formatter json 2>/dev/null \
    | grep -o '"running_nodes":\[[^]]*\]') || true
  if [ "$(grep -o 'catchall-c[123]@localhost' <<<"$running" | sort -u | wc -l)" = 3 ]; then
    echo "cluster: RabbitMQ nodes on 5701-5703 ($running)"
    exit 0
  fi
  sleep 1
done
echo "cluster: the three nodes are not all running after 90 s; c1 sees: ${running:-no answer}" >&2
rmqctl catchall-c1@localhost cluster_status >&2 || true
for i in 1 2 3; do tail -n 20 "$CI_DIR/catchall-c$i/log/catchall-c$i@localhost.log" >&2 || true; done
exit 1
