#!/usr/bin/env bash
# TLS servers for tests/it/tls.rs, started unless they already run (idempotent):
# - certificates made with openssl in $CI_DIR/certs: a CA, a server certificate for localhost
#   and 127.0.0.1, a client certificate (CN catchall_client), and an unrelated second CA;
# - RabbitMQ node catchall-tls@localhost with a TLS-only listener on 127.0.0.1:5671 and
#   127.0.0.2:5671 (dist port 25671), EXTERNAL (client certificate) login enabled;
# - Postgres cluster catchall_tls on port 5433 (127.0.0.1 and 127.0.0.2): ssl = on, hostssl
#   only, `cert` authentication for the user catchall_client.
# Needs: openssl, rabbitmq-server, postgresql (installed with apt-get when missing).
set -euo pipefail
cd "$(dirname "$0")"
. ./extra-lib.sh
need openssl openssl
need rabbitmq-server rabbitmq-server
need pg_createcluster postgresql

certs=$CI_DIR/certs
# Owned by the caller: openssl below writes as the caller (root in CI, or a user with sudo).
as_root install -d -o "$(id -u)" "$certs"
if [ ! -f "$certs/done" ]; then
  cd "$certs"
  ca() { # name subject
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=$2" \
      -keyout "$1.key" -out "$1.pem" 2>/dev/null
  }
  signed() { # name subject ext
    openssl req -newkey rsa:2048 -nodes -subj "/CN=$2" -keyout "$1.key" -out "$1.csr" 2>/dev/null
    printf '%s\n' "$3" > "$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile "$1.ext" -out "$1.pem" 2>/dev/null
  }
  ca ca "catchall test CA"
  ca other-ca "an unrelated CA"
  signed server localhost "subjectAltName=DNS:localhost,IP:127.0.0.1
extendedKeyUsage=serverAuth"
  signed client catchall_client "extendedKeyUsage=clientAuth"
  chmod 644 ./*.pem server.key  # the rabbitmq user reads the server key
  chmod 600 ca.key other-ca.key client.key
  touch done
  cd - >/dev/null
fi

# RabbitMQ, TLS only.
if ! rabbit_node_runs catchall-tls || ! answers 5671; then
  start_rabbit_node catchall-tls 25671 "listeners.tcp = none
listeners.ssl.1 = 127.0.0.1:5671
listeners.ssl.2 = 127.0.0.2:5671
ssl_options.cacertfile = $certs/ca.pem
ssl_options.certfile = $certs/server.pem
ssl_options.keyfile = $certs/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = false
auth_mechanisms.1 = PLAIN
auth_mechanisms.2 = EXTERNAL
ssl_cert_login_from = common_name" rabbitmq_auth_mechanism_ssl
  rabbit_started=1
fi

# Postgres, hostssl only.
version=$(pg_version)
pgconf=/etc/postgresql/$version/catchall_tls
if ! pg_clusters | grep -q " catchall_tls "; then
  pg_cluster pg_createcluster "$version" catchall_tls --port 5433 >/dev/null
fi
# Written on every run (see `put`): a run interrupted after the copy and before the rest is
# repaired by the next one.
changed=0
if ! as_root test -f "$pgconf/server.key" || ! as_root cmp -s "$certs/server.pem" "$pgconf/server.pem" \
  || ! as_root cmp -s "$certs/server.key" "$pgconf/server.key"; then
  as_root cp "$certs/server.pem" "$certs/server.key" "$certs/ca.pem" "$pgconf/"
  as_root chown postgres:postgres "$pgconf/server.pem" "$pgconf/server.key" "$pgconf/ca.pem"
  as_root chmod 600 "$pgconf/server.key"
  changed=1
fi
put "$pgconf/conf.d/catchall-tls.conf" "listen_addresses = '127.0.0.1,127.0.0.2'
ssl = on
ssl_cert_file = '$pgconf/server.pem'
ssl_key_file = '$pgconf/server.key'
ssl_ca_file = '$pgconf/ca.pem'" && changed=1
put "$pgconf/pg_hba.conf" "local   all all                    trust
hostssl all catchall_client 127.0.0.0/8 cert
hostssl all all             127.0.0.0/8 trust" && changed=1
if ! pg_clusters | grep " catchall_tls " | grep -q online; then
  pg_cluster pg_ctlcluster --skip-systemctl-redirect "$version" catchall_tls start
elif [ "$changed" = 1 ]; then
  pg_cluster pg_ctlcluster --skip-systemctl-redirect "$version" catchall_tls restart
fi
for _ in $(seq 1 30); do answers 5433 && break; sleep 1; done
answers 5433 || { echo "tls: Postgres does not answer on 127.0.0.1:5433" >&2; exit 1; }
as_root runuser -u postgres -- psql -p 5433 -qAtc \
  "DO \$\$ BEGIN CREATE ROLE catchall_client LOGIN CREATEDB; EXCEPTION WHEN duplicate_object THEN NULL; END \$\$"

if [ -n "${rabbit_started:-}" ]; then
  await_rabbit_node catchall-tls
fi
rmqctl catchall-tls@localhost list_users -q 2>/dev/null | grep -q '^catchall_client' || {
  rmqctl catchall-tls@localhost add_user catchall_client "$(openssl rand -hex 16)" >/dev/null
  rmqctl catchall-tls@localhost clear_password catchall_client >/dev/null
}
rmqctl catchall-tls@localhost set_permissions -p / catchall_client '.*' '.*' '.*' >/dev/null
echo "tls: RabbitMQ amqps on 5671, Postgres ssl on 5433; certificates in $certs"
