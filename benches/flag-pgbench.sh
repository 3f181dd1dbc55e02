#!/bin/bash
# What the catch-all listing's flag (`domains.catch_all_1000`, migration V7) costs the
# counter upsert, measured with `pgbench` in interleaved rounds (one client, 2,500 sorted
# upserts of random domains out of 100,000 per transaction, 1 in 50 a bounce), one database per
# variant, all seeded alike:
#
#   none       no flag, no index (the floor)
#   generated  V7: a stored generated column and its partial index
#   trigger    a plain column that a row trigger corrects when a write leaves it wrong
#   plain      a plain column that the upsert sets itself, with nothing to keep other writers right
#
#   benches/flag-pgbench.sh [ROUNDS] [SECONDS]
#
# Prints the mean latency (ms per upsert) of every variant in every round, then each round's
# ratios to `none`, then checks that every flag matches the counters. Needs Postgres on
# 127.0.0.1 and pgbench; drops the databases it made.
set -euo pipefail
rounds=${1:-6} secs=${2:-10}
work=$(mktemp -d)
variants=(none generated trigger plain)
psql_() { psql -h 127.0.0.1 -U postgres -q -v ON_ERROR_STOP=1 "$@"; }
cleanup() {
    for v in "${variants[@]}"; do psql_ -d postgres -c "DROP DATABASE IF EXISTS flag_$v" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

cat > "$work/generated.sql" <<'SQL'
ALTER TABLE domains ADD COLUMN catch_all_1000 boolean GENERATED ALWAYS AS (bounced = 0 AND delivered > 1000) STORED;
CREATE INDEX domains_catch_all_1000 ON domains (domain) WHERE catch_all_1000;
SQL
{ cat "$work/generated.sql"; echo "ALTER TABLE domains ALTER COLUMN catch_all_1000 DROP EXPRESSION;"; } > "$work/plain.sql"
{ cat "$work/plain.sql"; cat <<'SQL'; } > "$work/trigger.sql"
ALTER TABLE domains ALTER COLUMN catch_all_1000 SET DEFAULT false;
CREATE FUNCTION domains_catch_all_1000() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.catch_all_1000 := NEW.bounced = 0 AND NEW.delivered > 1000;
    RETURN NEW;
END $$;
CREATE TRIGGER domains_catch_all_1000 BEFORE INSERT OR UPDATE ON domains FOR EACH ROW
    WHEN (NEW.catch_all_1000 IS DISTINCT FROM (NEW.bounced = 0 AND NEW.delivered > 1000))
    EXECUTE FUNCTION domains_catch_all_1000();
SQL

# The upsert of `src/store.rs` over generated batches; `plain` sets the flag as well.
upsert() {
    local flag_col="" flag_val="" flag_set=""
    if [ "$1" = plain ]; then
        flag_col=", catch_all_1000" flag_val=", x % 50 <> 0 AND 1 > 1000"
        flag_set=", catch_all_1000 = d.bounced + EXCLUDED.bounced = 0 AND d.delivered + EXCLUDED.delivered > 1000"
    fi
    cat <<SQL
\set seed random(1, 1000000000)
INSERT INTO domains AS d (domain, delivered, bounced, other_bounced$flag_col)
SELECT 'd' || lpad(x::text, 6, '0'), (x % 50 <> 0)::int, (x % 50 = 0)::int, 0$flag_val
FROM (SELECT DISTINCT (hashint4(:seed + g) & 2147483647) % 100000 AS x FROM generate_series(1, 2560) g) s ORDER BY 1
ON CONFLICT (domain) DO UPDATE
SET delivered = d.delivered + EXCLUDED.delivered, bounced = d.bounced + EXCLUDED.bounced,
    other_bounced = d.other_bounced + EXCLUDED.other_bounced$flag_set;
SQL
}

for v in "${variants[@]}"; do
    psql_ -d postgres -c "DROP DATABASE IF EXISTS flag_$v" -c "CREATE DATABASE flag_$v"
    # V1's table (with V4's column) and V3's index; counters spread across the threshold.
    psql_ -d "flag_$v" <<'SQL'
CREATE TABLE domains (
    domain    text   COLLATE "C" PRIMARY KEY,
    delivered bigint NOT NULL DEFAULT 0 CHECK (delivered >= 0),
    bounced   bigint NOT NULL DEFAULT 0 CHECK (bounced >= 0),
    other_bounced bigint NOT NULL DEFAULT 0 CHECK (other_bounced >= 0)
) WITH (fillfactor = 90);
CREATE INDEX domains_never_bounced ON domains (domain) WHERE bounced = 0;
INSERT INTO domains (domain, delivered, bounced)
SELECT 'd' || lpad(i::text, 6, '0'), (random() * 2000)::int,
       CASE WHEN random() < 0.3 THEN (random() * 5)::int ELSE 0 END
FROM generate_series(0, 99999) i;
SQL
    [ "$v" = none ] || psql_ -d "flag_$v" -f "$work/$v.sql"
    psql_ -d "flag_$v" -c "VACUUM ANALYZE domains"
    upsert "$v" > "$work/upsert_$v.sql"
done

declare -A ms
for r in $(seq 1 "$rounds"); do
    n=${#variants[@]}
    for i in $(seq 0 $((n - 1))); do
        v=${variants[$(((i + r) % n))]}
        ms[$r,$v]=$(pgbench -h 127.0.0.1 -U postgres -n -f "$work/upsert_$v.sql" -T "$secs" -c 1 "flag_$v" 2>/dev/null |
            awk '/latency average/ {print $4}')
        echo "round $r  $v  ${ms[$r,$v]} ms"
    done
done
echo "ratio to none, per round:"
for v in "${variants[@]:1}"; do
    line="$v:"
    for r in $(seq 1 "$rounds"); do line+=" $(awk -v a="${ms[$r,$v]}" -v b="${ms[$r,none]}" 'BEGIN { printf "%.3f", a / b }')"; done
    echo "  $line"
done
for v in "${variants[@]:1}"; do
    wrong=$(psql_ -d "flag_$v" -Atc "SELECT count(*) FROM domains WHERE catch_all_1000 IS DISTINCT FROM (bounced = 0 AND delivered > 1000)")
    echo "$v: $wrong flags that do not match the counters"
done
