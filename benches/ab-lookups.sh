#!/bin/bash
# CPU per status look-up of two worker binaries, A and B, in alternating order (A B, B A, ...):
# each run starts the worker on its own database (100,000 domains), then `wrk` (Debian `wrk`)
# sends `GET /domains/{random known domain}` closed loop for SECS seconds (1 thread, 8
# connections, no ingest). Prints, per run, the requests answered and the CPU per request of the
# worker and of that database's Postgres backends (from /proc), and per pair the ratio of the
# worker's CPU per request, A / B (above 1: B spends less). Closed loop on purpose: this measures
# what a look-up costs, not its latency under load (the open-loop `status` stage of `make bench`
# does that).
#
#   benches/ab-lookups.sh BIN_A BIN_B [PAIRS] [SECS]
#
# Needs RabbitMQ and Postgres on 127.0.0.1 (`make services`). Deletes what it created.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
bin_a=$1 bin_b=$2 pairs=${3:-4} secs=${4:-8}
command -v wrk > /dev/null || { echo "ab-lookups.sh needs wrk (apt-get install wrk)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
psql_() { psql -h 127.0.0.1 -U postgres -Atq "$@"; }
cat > "$work/lookup.lua" <<'EOF'
math.randomseed(11)
request = function()
  return wrk.format("GET", "/domains/d" .. math.random(0, 99999) .. ".example")
end
EOF

run() { # BIN TAG -> "TAG requests worker_us_per_request postgres_us_per_request"
    local bin=$1 tag=abl_$$_$2 pid out
    local db=$tag queue=${tag}_q exchange=${tag}_x
    psql_ -c "CREATE DATABASE $db"
    AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f CATCHALL_EXCHANGE=$exchange \
        CATCHALL_QUEUE=$queue DATABASE_URL=postgres://postgres@127.0.0.1/$db \
        HTTP_ADDR=127.0.0.1:18193 LOG_FORMAT=json "$bin" > "$work/$tag.log" 2>&1 &
    pid=$!
    await_ready 18193 "$bin" "$work/$tag.log"
    psql_ -d "$db" -c "INSERT INTO domains (domain, delivered) SELECT 'd' || x || '.example', x FROM generate_series(0, 99999) x" \
        -c "VACUUM ANALYZE domains"
    pg_cpu() { # clock ticks of the database's backends
        local sum=0
        for p in $(pgrep -f "postgres: .* $db " || true); do
            sum=$((sum + $(awk '{print $14 + $15}' "/proc/$p/stat")))
        done
        echo "$sum"
    }
    local w0 p0 w1 p1 n
    w0=$(awk '{print $14 + $15}' "/proc/$pid/stat"); p0=$(pg_cpu)
    out=$(wrk -t1 -c8 -d"${secs}s" -s "$work/lookup.lua" http://127.0.0.1:18193)
    w1=$(awk '{print $14 + $15}' "/proc/$pid/stat"); p1=$(pg_cpu)
    grep -q 'Non-2xx' <<< "$out" && { echo "non-2xx answers: $out" >&2; exit 1; }
    n=$(grep -o '[0-9]* requests in' <<< "$out" | cut -d' ' -f1)
    kill -TERM "$pid" && wait "$pid" || true
    drop_run "$queue" "$exchange" "$db"
    local hz
    hz=$(getconf CLK_TCK)
    python3 -c "print('$2', $n, round(($w1 - $w0) * 1e6 / $hz / $n, 1), round(($p1 - $p0) * 1e6 / $hz / $n, 1))"
}

echo "run requests worker_cpu_us_per_request postgres_cpu_us_per_request ($secs s each, closed loop)"
ratios=()
for pair in $(seq 1 "$pairs"); do
    if [ $((pair % 2)) = 1 ]; then
        a=$(run "$bin_a" "a$pair"); b=$(run "$bin_b" "b$pair")
    else
        b=$(run "$bin_b" "b$pair"); a=$(run "$bin_a" "a$pair")
    fi
    echo "$a"; echo "$b"
    ratios+=("$(awk -v a="$(cut -d' ' -f3 <<< "$a")" -v b="$(cut -d' ' -f3 <<< "$b")" 'BEGIN { printf "%.3f", a / b }')")
done
python3 - "${ratios[@]}" <<'EOF'
import statistics, sys
r = sorted(float(x) for x in sys.argv[1:])
print(f"worker CPU per request, A / B per pair: {r}; median {statistics.median(r):.3f}")
EOF
