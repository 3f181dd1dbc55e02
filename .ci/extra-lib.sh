# Shared by .ci/tls.sh, .ci/cluster.sh and .ci/replica.sh: extra RabbitMQ nodes and Postgres
# clusters beside the main ones (5672, 5432), which these functions never touch.
# Everything lives under $CI_DIR (default /tmp/catchall-ci), which the tests read too.
CI_DIR=${CATCHALL_CI_DIR:-/tmp/catchall-ci}
RABBIT_BIN=/usr/lib/rabbitmq/bin

# as_root, apt_install_no_start (callers cd to .ci/ first).
. ./apt.sh
answers() { (exec 3<>"/dev/tcp/${2:-127.0.0.1}/$1") 2>/dev/null; }
# Installs PACKAGE when COMMAND is missing. .ci/extra.sh calls it for all three scripts, one
# at a time, before starting them in parallel (so they never run apt-get at the same time).
need() { # command package
  command -v "$1" >/dev/null && return 0
  apt_install_no_start "$2"
}
pg_version() { ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1; }
# put FILE TEXT: writes TEXT (and a newline) to FILE as root unless it holds it already; true
# when it wrote. Configuration is written on every run, so a run interrupted between making a
# cluster and configuring it is repaired by the next one.
put() {
  [ "$(as_root cat "$1" 2>/dev/null)" = "$2" ] && return 1
  # A failed write ends the script (its callers read false as "unchanged").
  printf '%s\n' "$2" | as_root tee "$1" >/dev/null || { echo "put: writing $1 failed" >&2; exit 1; }
}
# postgresql-common's commands read the configuration of every cluster (ports, sockets), and
# stop with "Invalid data directory for cluster 15 catchall_tls" on a cluster whose
# pg_createcluster is still writing it. tls.sh and replica.sh run in parallel (a clean-clone CI
# run failed so), so every cluster command of theirs takes one lock: `pg_cluster COMMAND ARGS`
# runs a pg_*cluster command as root holding it, `pg_clusters` lists the clusters (`-h`).
# `-o`: the command does not inherit the lock's descriptor, or a server that pg_ctlcluster
# starts would hold the lock for as long as it runs.
PG_LOCK=/tmp/catchall-ci-pgcluster.lock
pg_cluster() { as_root flock -o "$PG_LOCK" "$@"; }
pg_clusters() { flock -o "$PG_LOCK" pg_lsclusters -h; }

# rabbitmqctl against NODE, as the rabbitmq user (who holds the Erlang cookie).
rmqctl() { # node args...
  local node=$1; shift
  # -t: rabbitmqctl waits for ever by default on most commands (a node that hangs); 180 s is
  # plenty for nodes started together (a lone clustered start_app may wait up to 300 s for the
  # others; then it fails here). Not with a --timeout of its own.
  local timeout=(-t 180)
  [[ " $* " == *" --timeout "* ]] && timeout=()
  as_root runuser -u rabbitmq -- env ERL_EPMD_ADDRESS=127.0.0.1 "$RABBIT_BIN/rabbitmqctl" "${timeout[@]}" -n "$node" "$@"
}

# Starts a RabbitMQ node NAME@localhost in $CI_DIR/NAME (owned by the rabbitmq user) with the
# given rabbitmq.conf text and plugins, unless it already runs. Does not wait for it.
# A node that answers `ping` but not `status` is broken: its working directory (the checkout
# an earlier run started it from) is gone, so it cannot spawn a command (os:cmd: enoent) and
# `stop_app` fails. Such a node is stopped (killed when it will not stop) and started anew.
rabbit_node_runs() { # name
  rmqctl "$1@localhost" ping >/dev/null 2>&1 || return 1
  rmqctl "$1@localhost" status >/dev/null 2>&1 && return 0
  echo "extra: RabbitMQ node $1 answers but is broken; restarting it" >&2
  rmqctl "$1@localhost" stop >/dev/null 2>&1 \
    || { [ -f "$CI_DIR/$1/pid" ] && as_root kill -9 "$(cat "$CI_DIR/$1/pid")"; } || true
  for _ in $(seq 1 30); do rmqctl "$1@localhost" ping >/dev/null 2>&1 || return 1; sleep 1; done
  return 1
}

start_rabbit_node() { # name dist_port conf_text plugins
  local name=$1 dist=$2 conf=$3 plugins=$4 dir=$CI_DIR/$1
  if rabbit_node_runs "$name"; then return 0; fi
  as_root mkdir -p "$dir/mnesia" "$dir/log"
  printf '%s\n' "$conf" | as_root tee "$dir/rabbitmq.conf" >/dev/null
  printf '[%s].\n' "$plugins" | as_root tee "$dir/enabled_plugins" >/dev/null
  printf 'ERL_EPMD_ADDRESS=127.0.0.1\nexport ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"\n' \
    | as_root tee "$dir/env.conf" >/dev/null
  as_root chown -R rabbitmq:rabbitmq "$dir"
  # Started from its own directory, which outlives the checkout that runs this script.
  cd "$dir"
  as_root runuser -u rabbitmq -- env \
    RABBITMQ_NODENAME="$name@localhost" RABBITMQ_DIST_PORT="$dist" \
    RABBITMQ_CONF_ENV_FILE="$dir/env.conf" RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" \
    RABBITMQ_MNESIA_BASE="$dir/mnesia" RABBITMQ_LOG_BASE="$dir/log" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" RABBITMQ_PID_FILE="$dir/pid" \
    "$RABBIT_BIN/rabbitmq-server" -detached
  cd - >/dev/null
}

await_rabbit_node() { # name
  rmqctl "$1@localhost" await_startup --timeout 300 >/dev/null
}
