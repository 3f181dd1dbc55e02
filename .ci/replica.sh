#!/usr/bin/env bash
# A Postgres primary and its streaming replica for tests/it/replica.rs, made unless they
# already run (idempotent): cluster catchall_primary on 127.0.0.1:5434, and catchall_replica on
# 127.0.0.1:5435 made from it with pg_basebackup (hot standby). A replica left stopped by an
# interrupted test is started again. Trust auth on 127.0.0.1, like the main cluster.
# Needs: postgresql (installed with apt-get when missing).
set -euo pipefail
cd "$(dirname "$0")"
. ./extra-lib.sh
need pg_createcluster postgresql
version=$(pg_version)
ctl() { pg_cluster pg_ctlcluster --skip-systemctl-redirect "$version" "$@"; }
online() { pg_clusters | grep " $1 " | grep -q online; }
wait_pg() { for _ in $(seq 1 30); do answers "$1" && return 0; sleep 1; done; return 1; }

if ! pg_clusters | grep -q " catchall_primary "; then
  pg_cluster pg_createcluster "$version" catchall_primary --port 5434 >/dev/null
fi
conf=/etc/postgresql/$version/catchall_primary
changed=0
put "$conf/conf.d/catchall.conf" \
  "$(printf "listen_addresses = '127.0.0.1'\nwal_level = replica\nmax_wal_senders = 5")" && changed=1
put "$conf/pg_hba.conf" \
  "$(printf 'local all all trust\nhost all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust')" \
  && changed=1
if ! online catchall_primary; then
  ctl catchall_primary start
elif [ "$changed" = 1 ]; then
  ctl catchall_primary restart
fi
wait_pg 5434

# The replica is made when its data directory has no standby.signal (written last by
# pg_basebackup -R): a cluster left half-made by an interrupted run is dropped and made again.
replica_data() { pg_clusters | awk '$2 == "catchall_replica" {print $6}'; }
data=$(replica_data)
if [ -z "$data" ] || ! as_root test -f "$data/standby.signal"; then
  if [ -n "$data" ]; then
    pg_cluster pg_dropcluster --stop "$version" catchall_replica
  fi
  pg_cluster pg_createcluster "$version" catchall_replica --port 5435 >/dev/null
  conf=/etc/postgresql/$version/catchall_replica
  printf "listen_addresses = '127.0.0.1'\nhot_standby = on\n" \
    | as_root tee "$conf/conf.d/catchall.conf" >/dev/null
  printf 'local all all trust\nhost all all 127.0.0.1/32 trust\n' \
    | as_root tee "$conf/pg_hba.conf" >/dev/null
  data=$(replica_data)
  as_root find "$data" -mindepth 1 -delete
  # A physical replication slot on the primary keeps the WAL the replica still needs; created
  # by pg_basebackup (-C) only the first time.
  slot=(-S catchall_replica)
  if ! as_root runuser -u postgres -- psql -p 5434 -qAtc \
      "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'catchall_replica'" | grep -q 1; then
    slot=(-C "${slot[@]}")
  fi
  as_root runuser -u postgres -- pg_basebackup -h 127.0.0.1 -p 5434 -U postgres -D "$data" -R \
    -X stream -c fast "${slot[@]}"
fi
online catchall_replica || ctl catchall_replica start
wait_pg 5435
# The replica must answer SQL and be in recovery (streaming), not merely accept TCP.
in_recovery=$(psql -h 127.0.0.1 -p 5435 -U postgres -Atc 'SELECT pg_is_in_recovery()')
# A replica test killed while it held replay paused (the lag tests) leaves it paused: resume.
if [ "$in_recovery" = t ]; then
  psql -h 127.0.0.1 -p 5435 -U postgres -Atc 'SELECT pg_wal_replay_resume()' >/dev/null
fi
if [ "$in_recovery" != t ]; then
  echo "replica: Postgres on 5435 is not a replica in recovery (pg_is_in_recovery: $in_recovery)" >&2
  exit 1
fi
echo "replica: Postgres primary on 5434, streaming replica on 5435 (in recovery)"
