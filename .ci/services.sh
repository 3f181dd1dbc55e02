#!/usr/bin/env bash
# Makes sure RabbitMQ and Postgres answer on 127.0.0.1 (5672, 5432): starts them on this machine
# (installing them with apt-get if missing), then creates the `catchall` database if it is
# missing. Local services only: compose.yaml needs a .env with non-default credentials, which
# the tests' defaults (guest/guest, postgres with trust) are not.
set -euo pipefail

answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { # port name seconds
  for _ in $(seq 1 "$3"); do answers "$1" && return 0; sleep 1; done
  echo "services: $2 does not answer on 127.0.0.1:$1" >&2
  return 1
}
cd "$(dirname "$0")"
# Installed without starting their services (on a machine with systemd the package would
# start its own cluster, and the start below would then fail as "already running").
source ./apt.sh

if ! answers 5432; then
  command -v pg_ctlcluster >/dev/null || apt_install_no_start postgresql
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  if ! pg_lsclusters -h 2>/dev/null | grep -q " main "; then
    as_root pg_createcluster "$version" main
  fi
  # Trust local connections, as the README's defaults expect (postgres user, no password).
  hba=/etc/postgresql/$version/main/pg_hba.conf
  if ! as_root grep -q '^host all all 127.0.0.1/32 trust' "$hba"; then
    as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\nlocal all all trust' "$hba"
    echo "services: $hba now trusts every local connection (the tests' defaults); remove its first three lines to undo" >&2
  fi
  if pg_lsclusters -h | grep " main " | grep -q online; then
    # Running, but not on 127.0.0.1:5432 yet or without the lines above: read them.
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main reload
  else
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start
  fi
fi
wait_port 5432 Postgres 60

if ! answers 5672; then
  command -v rabbitmq-server >/dev/null || apt_install_no_start rabbitmq-server
  # On loopback only (AMQP, Erlang distribution, epmd), as the extra nodes (extra-lib.sh):
  # Debian's defaults listen on every interface.
  as_root env RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 ERL_EPMD_ADDRESS=127.0.0.1 \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
    rabbitmq-server -detached
  # Not `rabbitmqctl await_startup`: right after -detached the node is not registered with epmd
  # yet, and it fails at once ("node not running at all"). The AMQP port opens as the boot ends.
fi
wait_port 5672 RabbitMQ 120

if ! psql -h 127.0.0.1 -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'catchall'" | grep -q 1; then
  psql -h 127.0.0.1 -U postgres -qc "CREATE DATABASE catchall"
fi
echo "services: RabbitMQ and Postgres answer; database catchall exists"
