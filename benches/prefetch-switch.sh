#!/bin/bash
# How far a worker's memory goes past PREFETCH_BYTES when the messages switch from small to
# large. Two drains of one binary, each with its own database, exchange and queue, filled before
# the worker starts: `large` holds only large messages (the budget's steady case), `switch` holds
# SMALL single-event messages and then the same large messages (the prefetch has risen for the
# small ones when the large ones come). Prints per drain the worker's peak RSS (VmHWM), the
# highest `catchall_unacked_bytes` seen (polled every 20 ms) and the drain's seconds.
#
#   benches/prefetch-switch.sh BIN [SMALL] [LARGE] [EVENTS_PER_LARGE]
#
# PREFETCH_BYTES (16MiB) and PREFETCH (10000, the default) are passed to the worker. TRACE=1
# prints to stderr, at each poll, the worker's RSS, prefetch gauge and events counted. Needs
# RabbitMQ and Postgres on 127.0.0.1 and the release producer. Deletes what it created.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
bin=$1 small=${2:-20000} large=${3:-1000} per_large=${4:-1000}
budget=${PREFETCH_BYTES:-16MiB} prefetch=${PREFETCH:-10000}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
psql_() { psql -h 127.0.0.1 -U postgres -Atq "$@"; }

# Large messages: events of 100 long domain names (about 230 bytes a line), so a message is
# large while the apply stays cheap (few domains per batch).
python3 - "$large" "$per_large" > "$work/large.ndjson" <<'EOF2'
import sys
messages, per = int(sys.argv[1]), int(sys.argv[2])
stem = '.'.join(c * 60 for c in 'abc')
for i in range(messages * per):
    print('{"domain":"%s.d%d.example","type":"delivered"}' % (stem, i % 100))
EOF2
python3 - "$small" > "$work/small.ndjson" <<'EOF2'
import sys
for i in range(int(sys.argv[1])):
    print('{"domain":"s%d.example","type":"delivered"}' % (i % 1000))
EOF2
events_large=$((large * per_large))

drain() { # TAG WITH_SMALL -> "TAG peak_rss_mib max_unacked_mib seconds"
    local tag=pf_$$_$1 with_small=$2 pid port=18195
    local db=$tag queue=${tag}_q exchange=${tag}_x total=$events_large
    psql_ -c "CREATE DATABASE $db"
    export AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f CATCHALL_EXCHANGE=$exchange \
        CATCHALL_QUEUE=$queue DATABASE_URL=postgres://postgres@127.0.0.1/$db \
        HTTP_ADDR=127.0.0.1:$port LOG_FORMAT=json PREFETCH_BYTES=$budget PREFETCH=$prefetch
    start() {
        "$bin" > "$work/$tag.log" 2>&1 &
        pid=$!
        await_ready "$port" "$bin" "$work/$tag.log"
    }
    stop() { kill -TERM "$pid"; timeout 20 tail --pid="$pid" -f /dev/null || kill -9 "$pid"; wait "$pid" || true; }
    start # migrates and declares the topology
    stop
    if [ "$with_small" = 1 ]; then
        "$root/target/release/catchall-producer" publish "$work/small.ndjson" > /dev/null
        total=$((total + small))
    fi
    "$root/target/release/catchall-producer" publish --batch "$per_large" "$work/large.ndjson" > /dev/null
    local t0 max=0 now counted
    t0=$(date +%s.%N)
    start
    for _ in $(seq 1 6000); do # at most 120 s
        now=$(curl -sf "http://127.0.0.1:$port/metrics" | awk '
            /^catchall_unacked_bytes / { u = $2 } /^catchall_events_total/ { n += $2 }
            END { printf "%d %d", u, n }')
        [ -z "${TRACE:-}" ] || echo "$(date +%s.%N | cut -c7-14) rss_kib=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status") $(curl -sf "http://127.0.0.1:$port/metrics" | grep -E '^catchall_prefetch_messages |^catchall_events_total' | tr '\n' ' ')" >&2
        [ "${now% *}" -gt "$max" ] && max=${now% *}
        counted=${now#* }
        [ "$counted" = "$total" ] && break
        sleep 0.02
    done
    [ "$counted" = "$total" ] || { echo "$tag: counted $counted of $total events in 120 s: $work/$tag.log" >&2; exit 1; }
    local seconds rss
    seconds=$(python3 -c "import time; print(round(time.time() - $t0, 1))")
    rss=$(awk '/^VmHWM/ {printf "%.0f", $2 / 1024}' "/proc/$pid/status")
    stop
    drop_run "$queue" "$exchange" "$db"
    python3 -c "print('$1', $rss, round($max / 1048576, 1), $seconds)"
}

echo "PREFETCH_BYTES=$budget PREFETCH=$prefetch; $large messages of $per_large events ($(($(wc -c < "$work/large.ndjson") / large / 1024)) KiB each), after $small single-event messages in 'switch'"
echo "drain peak_rss_mib max_unacked_mib seconds"
drain large 0
drain switch 1
drain large2 0
drain switch2 1
