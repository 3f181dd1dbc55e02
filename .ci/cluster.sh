#!/usr/bin/env bash
# A 3-node RabbitMQ cluster for tests/it/cluster.rs, made unless it already runs (idempotent):
# catchall-c1..c3@localhost on 127.0.0.1:5701..5703 (dist ports 25701..25703), c2 and c3
# joined to c1. A node left stopped (stop_app) by an interrupted test is started again.
# Needs: rabbitmq-server (installed with apt-get when missing).
set -euo pipefail
cd "$(dirname "$0")"
. ./extra-lib.sh
need rabbitmq-server rabbitmq-server

conf() { # port
  printf 'listeners.tcp.1 = 127.0.0.1:%s\nloopback_users = none\ncluster_partition_handling = pause_minority\n' "$1"
}
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
if [ "${#joining[@]}" -gt 0 ]; then
  for i in "${joining[@]}"; do
    (rmqctl "catchall-c$i@localhost" stop_app && rmqctl "catchall-c$i@localhost" reset) >/dev/null &
  done
  wait
  for i in "${joining[@]}"; do
    rmqctl "catchall-c$i@localhost" join_cluster catchall-c1@localhost >/dev/null
  done
  for i in "${joining[@]}"; do rmqctl "catchall-c$i@localhost" start_app >/dev/null & done
  wait
fi
running=$(rmqctl catchall-c1@localhost cluster_status --formatter json | grep -o '"running_nodes":\[[^]]*\]')
echo "cluster: RabbitMQ nodes on 5701-5703 ($running)"
