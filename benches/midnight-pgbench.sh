#!/bin/bash
# What the claim's window near UTC midnight (migrations V9-V11) costs, measured with `pgbench`
# in interleaved rounds: two clients (IN_FLIGHT), each transaction a batch of the worker's
# (`src/store.rs`): a claim of IDS new random ids (default 25: 2,500 events in 100-event
# messages; 2,500: single-event messages), then the upsert of 2,500 random domains out of
# DOMAINS, sorted; every run on a fresh clone of a template, after a checkpoint.
#
#   outside   V11, a window of zero: the claim's plain path (any hour but 20 minutes a day)
#   v10       V10's claim with the window covering now: a claim of up to 64 ids locks its
#             ids, a larger one its hash buckets
#   v11       V11's claim with the window covering now: it inserts its ids on both sides of
#             the partition bound nearest to now
#
#   [IDS=25] benches/midnight-pgbench.sh [ROUNDS] [TRANSACTIONS_PER_CLIENT] [DOMAINS]
#
# Prints every run's transactions/s and Postgres CPU per transaction (all server processes,
# from /proc, so it must run on the database's machine), then each round's tps ratio to
# `outside`. Needs Postgres on 127.0.0.1 and pgbench; drops the databases it made.
set -euo pipefail
rounds=${1:-3} tx=${2:-200} domains=${3:-1000000} ids=${IDS:-25}
here=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
variants=(outside v10 v11)
psql_() { psql -h 127.0.0.1 -U postgres -q -v ON_ERROR_STOP=1 "$@"; }
cleanup() {
    for db in midnight_v10 midnight_v11 midnight_run; do
        psql_ -d postgres -c "DROP DATABASE IF EXISTS $db" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

# CPU ticks of every Postgres process: the live ones and, through the postmaster's cutime and
# cstime, the backends that exited (pgbench's, when it ends).
postmaster=$(head -1 "$(psql_ -d postgres -Atc 'SHOW data_directory')/postmaster.pid")
pg_ticks() {
    local total=0 pid
    for pid in $(pgrep -P "$postmaster") "$postmaster"; do
        total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)))
    done
    echo $((total + $(awk '{print $16 + $17}' "/proc/$postmaster/stat")))
}

# Templates: V1-V10, and V1-V11; DOMAINS domains, vacuumed.
for v in v10 v11; do
    db=midnight_$v last=${v#v}
    psql_ -d postgres -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
    for f in $(ls "$here"/migrations/V*.sql | sort -V); do
        n=$(basename "$f" | sed 's/^V\([0-9]*\)__.*/\1/')
        if [ "$n" -le "$last" ]; then psql_ -d "$db" -f "$f"; fi
    done
    psql_ -d "$db" -c "SELECT applied_messages_extend(1, now() + interval '2 days')" >/dev/null
    psql_ -d "$db" -c "INSERT INTO domains (domain, delivered, bounced)
        SELECT 'd' || i || '.bench.example', i % 50, (i % 7 = 0)::int FROM generate_series(0, $domains - 1) i"
    psql_ -d "$db" -c "VACUUM ANALYZE"
done

# One batch; $1: the claim's window.
batch() {
    cat <<SQL
BEGIN ISOLATION LEVEL READ COMMITTED;
SELECT count(*) FROM applied_messages_claim(
    ARRAY(SELECT decode(md5(random()::text), 'hex') FROM generate_series(1, $ids) ORDER BY 1), '$1');
INSERT INTO domains AS d (domain, delivered, bounced, other_bounced)
SELECT 'd' || i || '.bench.example', 1 + (i % 3 = 0)::int, (i % 11 = 0)::int, 0
FROM (SELECT DISTINCT (random() * ($domains - 1))::int AS i FROM generate_series(1, 2500)) s ORDER BY 1
ON CONFLICT (domain) DO UPDATE
SET delivered = d.delivered + EXCLUDED.delivered, bounced = d.bounced + EXCLUDED.bounced,
    other_bounced = d.other_bounced + EXCLUDED.other_bounced;
COMMIT;
SQL
}
# A window that covers now and, as the 10 minutes around midnight do, one partition bound:
# the distance to the nearest UTC midnight, plus 10 minutes (two bounds within 10 minutes of
# noon).
window=$(psql_ -d postgres -Atc "SELECT extract(epoch FROM least(t - '00:00'::time, '24:00'::time - t))::int + 600
    FROM (SELECT (now() AT TIME ZONE 'UTC')::time AS t) now")
batch '0 seconds' > "$work/outside.sql"
batch "$window seconds" > "$work/v10.sql"
cp "$work/v10.sql" "$work/v11.sql"

declare -A tps
hz=$(getconf CLK_TCK)
for r in $(seq 1 "$rounds"); do
    n=${#variants[@]}
    for i in $(seq 0 $((n - 1))); do
        v=${variants[$(((i + r) % n))]}
        template=midnight_v11
        [ "$v" = v10 ] && template=midnight_v10
        psql_ -d postgres -c "DROP DATABASE IF EXISTS midnight_run" \
            -c "CREATE DATABASE midnight_run TEMPLATE $template" -c CHECKPOINT
        before=$(pg_ticks)
        tps[$r,$v]=$(pgbench -h 127.0.0.1 -U postgres -n -c 2 -j 1 -t "$tx" -f "$work/$v.sql" midnight_run 2>/dev/null |
            awk '/^tps/ {printf "%.1f", $3; exit}')
        ms=$(awk -v t=$(($(pg_ticks) - before)) -v hz="$hz" -v n=$((2 * tx)) 'BEGIN { printf "%.1f", t * 1000 / hz / n }')
        echo "round $r  $v  ${tps[$r,$v]} tps  Postgres $ms CPU-ms per transaction"
    done
done
echo "tps ratio to outside, per round:"
for v in "${variants[@]:1}"; do
    line="$v:"
    for r in $(seq 1 "$rounds"); do line+=" $(awk -v a="${tps[$r,$v]}" -v b="${tps[$r,outside]}" 'BEGIN { printf "%.3f", a / b }')"; done
    echo "  $line"
done
