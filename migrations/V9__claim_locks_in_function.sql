-- The claim takes the bucket locks itself (src/store/dedup.rs). Until V8 the worker sent them
-- as a statement of their own, pipelined before the claim: one more statement per batch to
-- parse, bind and execute (0.05-0.14 ms per claim when sent alone, measured with pgbench), and
-- a window of "near midnight" fixed in the SQL text, so the path that takes them ran only
-- within 10 minutes of UTC midnight and no test could reach it at another hour.
--
-- `lock_window`: the claim first locks the hash buckets (128) of its keys when the
-- transaction started less than `lock_window` from UTC midnight (the worker passes 10
-- minutes; 12 hours or more: always). Partitions start at UTC midnight, so two attempts of one
-- id that start on either side of a boundary land in two partitions and neither index sees the
-- other's uncommitted row; the locks make the later one wait for the earlier to end. Sorted
-- bucket order: no deadlock. Key space 1667326824 ("cach", the two-`int4` form).
--
-- The look-up still follows the locks: a VOLATILE PL/pgSQL function under READ COMMITTED (the
-- worker pins it) takes a new snapshot for each statement, so the RETURN QUERY sees what the
-- transaction it waited for committed.
--
-- V8's one-argument function stays: replicas of the previous version call it (with their own
-- lock statement) during a rolling upgrade.
CREATE FUNCTION applied_messages_claim(keys bytea[], lock_window interval) RETURNS SETOF bytea
LANGUAGE plpgsql SET enable_seqscan = off AS $$
DECLARE
    t time := (now() AT TIME ZONE 'UTC')::time;
BEGIN
    IF least(t - '00:00'::time, '24:00'::time - t) < lock_window THEN
        PERFORM count(pg_advisory_xact_lock(1667326824, bucket))
        FROM (SELECT DISTINCT ('x' || substr(md5(id), 1, 8))::bit(32)::int4 & 127 AS bucket
              FROM unnest(keys) id
              ORDER BY bucket) buckets;
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
