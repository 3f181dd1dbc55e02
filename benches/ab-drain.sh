#!/bin/bash
# Whole drains of two worker binaries, A and B, in alternating order (A B, B A, ...): each drain
# gets its own database (the domains pre-created, as in `make bench`), exchange and queue; the
# queue is filled with the producer first, then the worker starts and drains it. Time: from just
# before the worker starts to the moment its metrics count every event (polled every 50 ms), both
# on the server's clock. (Until V11 the end was max(applied_at); near midnight V11 stamps ids
# with the partition bound instead.) Prints one line per drain and, per pair, time(A) / time(B)
# (above 1: B is faster). Throwaway-grade on purpose: the paired ratios of `make
# bench-baseline` are the figures of record; this one measures what the bench does not (the
# whole process, start-up included) with less machinery.
#
#   benches/ab-drain.sh BIN_A BIN_B [PAIRS] [EVENTS] [EVENTS_PER_MESSAGE]
#
# AB_ENV_A, AB_ENV_B: settings for A's (B's) worker, e.g. `AB_ENV_B=CLAIM_WINDOW=13h` to run
# the claim's midnight path at any hour with one binary as A and B.
#
# AB_SQL_A, AB_SQL_B: SQL run on A's (B's) database after its migrations, e.g. `ALTER TABLE
# domains DROP COLUMN catch_all_1000` on ours to drain without migration V7's listing flag and
# index, or V7 itself on a baseline from before it (`AB_SQL_A="$(grep -v '^--'
# migrations/V7__catch_all_listing_index.sql)"`), so that both sides carry the same schema.
#
# AB_HEAD_BULK=N: in front of the events, one window of the worker's first prefetch as a mixed
# stream brings it: 63 single-event messages and one message of N events with long domain names
# (about 230 bytes each, so N=400 is a 90 KiB body). The prefetch is raised once, at the end of
# that window, for what it saw (a raise for its largest body kept single-event batches small for
# the rest of the drain).
#
# Needs RabbitMQ and Postgres on 127.0.0.1 (`make services`) and the release producer
# (`cargo build --release -p catchall-producer`). Deletes what it created.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
bin_a=$1 bin_b=$2 pairs=${3:-6} events=${4:-200000} per_message=${5:-1}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
psql_() { psql -h 127.0.0.1 -U postgres -Atq "$@"; }

# The same events for every drain: random domains out of 100,000, 1 in 50 a bounce.
python3 - "$events" > "$work/events.ndjson" <<'EOF'
import random, sys
random.seed(7)
for _ in range(int(sys.argv[1])):
    kind = 'bounced' if random.random() < 0.02 else 'delivered'
    print('{"domain":"d%d.example","type":"%s"}' % (random.randrange(100000), kind))
EOF
head_bulk=${AB_HEAD_BULK:-0}
[[ "$head_bulk" =~ ^[0-9]+$ ]] && [ "$head_bulk" -le 4000 ] ||
    { echo "AB_HEAD_BULK must be a number of events up to 4000 (one message): $head_bulk" >&2; exit 2; }
if [ "$head_bulk" -gt 0 ]; then
    python3 - "$head_bulk" "$work/head-small.ndjson" "$work/head-bulk.ndjson" <<'EOF'
import sys
bulk, small, large = int(sys.argv[1]), sys.argv[2], sys.argv[3]
with open(small, 'w') as f:
    for i in range(63):
        print('{"domain":"d%d.example","type":"delivered"}' % i, file=f)
stem = '.'.join(c * 60 for c in 'abc')
with open(large, 'w') as f:
    for i in range(bulk):
        print('{"domain":"%s.d%d.example","type":"delivered"}' % (stem, i % 100), file=f)
EOF
    events=$((events + 63 + head_bulk))
fi

drain() { # BIN TAG [SQL [ENV]] -> "TAG seconds worker_cpu_s worker_peak_rss_mib events_per_batch"
    local bin=$1 tag=ab_$$_$2 sql=${3:-} settings=${4:-} pid rss
    local db=$tag queue=${tag}_q exchange=${tag}_x
    psql_ -c "CREATE DATABASE $db"
    export AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f CATCHALL_EXCHANGE=$exchange \
        CATCHALL_QUEUE=$queue DATABASE_URL=postgres://postgres@127.0.0.1/$db \
        HTTP_ADDR=127.0.0.1:18191 LOG_FORMAT=json
    start() {
        env $settings "$bin" > "$work/$tag.log" 2>&1 &
        pid=$!
        await_ready 18191 "$bin" "$work/$tag.log"
    }
    start # migrates and declares the topology
    kill -TERM "$pid" && wait "$pid" || true
    [ -z "$sql" ] || psql_ -d "$db" -c "$sql"
    psql_ -d "$db" -c "INSERT INTO domains (domain) SELECT 'd' || x || '.example' FROM generate_series(0, 99999) x" \
        -c "VACUUM ANALYZE domains"
    if [ "$head_bulk" -gt 0 ]; then
        "$root/target/release/catchall-producer" publish "$work/head-small.ndjson" > /dev/null
        "$root/target/release/catchall-producer" publish --batch "$head_bulk" "$work/head-bulk.ndjson" > /dev/null
    fi
    "$root/target/release/catchall-producer" publish --batch "$per_message" "$work/events.ndjson" > /dev/null
    local t0 t1 cpu per_batch
    t0=$(psql_ -d "$db" -c "SELECT extract(epoch FROM clock_timestamp())")
    start
    # The worker's own count (committed events), cheaper to poll than summing the table.
    until [ "$(curl -sf http://127.0.0.1:18191/metrics |
        awk '/^catchall_events_total/ { n += $2 } END { printf "%d", n }')" = "$events" ]; do
        sleep 0.05
    done
    [ "$(psql_ -d "$db" -c 'SELECT sum(delivered + bounced + other_bounced) FROM domains')" = "$events" ] ||
        { echo "the worker counted $events events, the table holds others" >&2; exit 1; }
    t1=$(psql_ -d "$db" -c "SELECT extract(epoch FROM clock_timestamp())")
    cpu=$(awk '{print ($14 + $15) / 100}' "/proc/$pid/stat")
    per_batch=$(curl -sf http://127.0.0.1:18191/metrics | awk '
        /^catchall_batch_events_sum/ { s = $2 } /^catchall_batch_events_count/ { c = $2 }
        END { printf "%.0f", c ? s / c : 0 }')
    rss=$(awk '/^VmHWM/ {printf "%.1f", $2 / 1024}' "/proc/$pid/status")
    kill -TERM "$pid" && wait "$pid" || true
    drop_run "$queue" "$exchange" "$db"
    python3 -c "print('$2', round($t1 - $t0, 2), $cpu, $rss, $per_batch)"
}

echo "drain seconds worker_cpu_s worker_peak_rss_mib events_per_batch ($events events, $per_message per message)"
ratios=()
for pair in $(seq 1 "$pairs"); do
    if [ $((pair % 2)) = 1 ]; then
        a=$(drain "$bin_a" "a$pair" "${AB_SQL_A:-}" "${AB_ENV_A:-}"); b=$(drain "$bin_b" "b$pair" "${AB_SQL_B:-}" "${AB_ENV_B:-}")
    else
        b=$(drain "$bin_b" "b$pair" "${AB_SQL_B:-}" "${AB_ENV_B:-}"); a=$(drain "$bin_a" "a$pair" "${AB_SQL_A:-}" "${AB_ENV_A:-}")
    fi
    echo "$a"; echo "$b"
    ratios+=("$(awk -v a="$(cut -d' ' -f2 <<< "$a")" -v b="$(cut -d' ' -f2 <<< "$b")" 'BEGIN { printf "%.3f", a / b }')")
done
python3 - "${ratios[@]}" <<'EOF'
import statistics, sys
r = sorted(float(x) for x in sys.argv[1:])
print(f"time(A) / time(B) per pair: {r}; median {statistics.median(r):.3f}")
EOF
