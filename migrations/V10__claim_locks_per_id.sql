-- Near UTC midnight (V9's `lock_window`) every claim locked the hash buckets of its ids, and
-- with 128 buckets two batches of unrelated ids almost always share one (25 ids each: 99 % of
-- pairs), so the second waited for the first's COMMIT and two batches in flight ran one at a
-- time. Measured with benches/midnight-pgbench.sh (2 connections, 1,000,000 domains, batches of
-- 2,500 events and 25 ids): 0.75-0.79 of the throughput outside the window, for the 20 minutes
-- a day inside it; with this version 0.95-0.99.
--
-- Now a claim of at most 64 keys locks each key (its 32-bit hash, key space 1667326825) in
-- exclusive mode and the key's bucket in shared mode: two such claims wait for each other only
-- when they share a key (or, one in 2^32, its hash), or when Postgres' lock queue puts one
-- behind a claim that waits to lock a bucket of the other exclusively. A claim of more keys
-- (single-event messages: thousands per batch, so nearly every bucket) still locks its
-- buckets in exclusive mode, as before, and while one waits for or holds them near midnight
-- every claim serialises behind it, as with V9. So a batch never takes more than 128 advisory
-- locks (64 + 64 here), whatever its size, and the server's lock table
-- (`max_locks_per_transaction`) sizes as before. A bucket lock in
-- exclusive mode waits for every claim of the bucket, large or small, so any two claims of one
-- key still meet.
--
-- No deadlock: every claim takes its locks in one global order (buckets ascending, then the
-- keys' hashes ascending, as int4), so a claim only ever waits for a lock above all those it
-- holds. This needs one claim per transaction (the worker's): a second claim could upgrade a
-- shared bucket lock to exclusive, or take locks below those it holds.
--
-- During a rolling upgrade, replicas of V8 take the same bucket locks in exclusive mode (their
-- own statement), and so do V9's calls already running when this body replaces V9's (later
-- calls of V9 replicas run this body: same name and signature). Exclusive bucket locks meet
-- every claim of this version on a shared key, so the upgrade needs nothing more.
CREATE OR REPLACE FUNCTION applied_messages_claim(keys bytea[], lock_window interval) RETURNS SETOF bytea
LANGUAGE plpgsql SET enable_seqscan = off AS $$
DECLARE
    t time := (now() AT TIME ZONE 'UTC')::time;
    small boolean := cardinality(keys) <= 64;
    hashes int4[];
BEGIN
    IF least(t - '00:00'::time, '24:00'::time - t) < lock_window THEN
        hashes := ARRAY(SELECT DISTINCT ('x' || substr(md5(id), 1, 8))::bit(32)::int4
                        FROM unnest(keys) id);
        PERFORM count(CASE WHEN small THEN pg_advisory_xact_lock_shared(1667326824, bucket)
                           ELSE pg_advisory_xact_lock(1667326824, bucket) END)
        FROM (SELECT DISTINCT hash & 127 AS bucket FROM unnest(hashes) hash
              ORDER BY bucket) buckets;
        IF small THEN
            PERFORM count(pg_advisory_xact_lock(1667326825, hash))
            FROM (SELECT hash FROM unnest(hashes) hash ORDER BY hash) sorted;
        END IF;
    END IF;
    RETURN QUERY
    WITH held AS MATERIALIZED (
        SELECT message_id FROM applied_messages WHERE message_id = ANY(keys)),
    claimed AS (
        INSERT INTO applied_messages (message_id)
        SELECT DISTINCT id FROM unnest(keys) id WHERE id NOT IN (SELECT message_id FROM held)
        ORDER BY id)
    SELECT message_id FROM held;
END $$;
