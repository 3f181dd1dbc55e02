#!/bin/bash
# Requests dropped when a connection reaches its lifetime, for two worker binaries A and B in
# alternating order (A B, A B, ...): each run starts the worker on its own database and queue,
# then CLIENTS keep-alive clients (Python `requests`: a pooled connection the server has
# already closed is noticed and replaced before reuse) poll `GET /healthz` every GAP seconds
# for SECS seconds beside two busy loops (a loaded machine widens the window between a
# client's write and the server reading it). A connection lives at least 60 s, so each client's
# connection reaches its lifetime about SECS / 60 times. Prints, per run, the answered requests
# and the failed ones by error.
#
#   benches/keepalive-lifetime.sh BIN_A BIN_B [PAIRS] [SECS] [CLIENTS] [GAP]
#
# Needs RabbitMQ and Postgres on 127.0.0.1 (`make services`) and python3-requests. Deletes what
# it created.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
bin_a=$1 bin_b=$2 pairs=${3:-2} secs=${4:-130} clients=${5:-24} gap=${6:-0.002}
python3 -c 'import requests' 2> /dev/null || { echo "keepalive-lifetime.sh needs python3-requests" >&2; exit 1; }
work=$(mktemp -d)
busy=() worker=
trap 'kill "${busy[@]}" $worker 2> /dev/null || true; rm -rf "$work"' EXIT
psql_() { psql -h 127.0.0.1 -U postgres -Atq "$@"; }
cat > "$work/poll.py" <<'EOF'
import collections, sys, threading, time
import requests
base, secs, clients, gap = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
errors, answered, lock = collections.Counter(), [0], threading.Lock()
def poll():
    session, end = requests.Session(), time.time() + secs
    while time.time() < end:
        try:
            status = session.get(base + "/healthz", timeout=5).status_code
            error = None if status == 200 else f"status {status}"
        except Exception as e:
            error = f"{type(e).__name__}: {str(e)[:100]}"
        with lock:
            if error: errors[error] += 1
            else: answered[0] += 1
        time.sleep(gap)
threads = [threading.Thread(target=poll) for _ in range(clients)]
for t in threads: t.start()
for t in threads: t.join()
print(f"answered {answered[0]} failed {sum(errors.values())}")
for error, n in errors.items(): print(f"  {n} × {error}")
EOF

run() { # BIN TAG
    local bin=$1 tag=kal_$$_$2
    local db=$tag queue=${tag}_q exchange=${tag}_x
    psql_ -c "CREATE DATABASE $db"
    AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f CATCHALL_EXCHANGE=$exchange \
        CATCHALL_QUEUE=$queue DATABASE_URL=postgres://postgres@127.0.0.1/$db \
        HTTP_ADDR=127.0.0.1:18194 LOG_FORMAT=json "$bin" > "$work/$tag.log" 2>&1 &
    worker=$!
    await_ready 18194 "$bin" "$work/$tag.log"
    yes > /dev/null & busy=($!)
    yes > /dev/null & busy+=($!)
    echo "$2 ($bin):"
    python3 "$work/poll.py" http://127.0.0.1:18194 "$secs" "$clients" "$gap"
    kill "${busy[@]}"; busy=()
    kill -TERM "$worker" && wait "$worker" || true
    worker=
    drop_run "$queue" "$exchange" "$db"
}

for i in $(seq 1 "$pairs"); do
    run "$bin_a" "a$i"
    run "$bin_b" "b$i"
done
