-- The claim of a batch's ids (src/store/dedup.rs): returns the keys of `keys` that some partition
-- already holds, and inserts the others into the partition of now(), in key order. A plain
-- INSERT: the look-up met every committed key (all sub-statements of a WITH run on one
-- snapshot), so a conflict can only be a concurrent claim of the same key, which waits for it
-- and fails with unique_violation if it commits (the worker applies the batch again). DISTINCT:
-- a key given twice is claimed once (the worker sends them distinct; other callers may not).
--
-- A function for one setting, `enable_seqscan = off`: the look-up must be an index probe per
-- key in every partition, whatever the statistics say. A prepared statement's generic plan is
-- made once per connection and kept; made while the partition of now() is new (empty, or
-- analysed when empty), it reads that partition with a sequential scan, and keeps doing so
-- while the partition grows to millions of ids (measured: 116 ms per claim at 200,000 ids, and
-- a bench stage that fell 30 s behind). PL/pgSQL keeps the plan for the session, planned under
-- this setting.
CREATE FUNCTION applied_messages_claim(keys bytea[]) RETURNS SETOF bytea
LANGUAGE plpgsql SET enable_seqscan = off AS $$
BEGIN
    RETURN QUERY
    WITH held AS MATERIALIZED (
        SELECT message_id FROM applied_messages WHERE message_id = ANY(keys)),
    claimed AS (
        INSERT INTO applied_messages (message_id)
        SELECT DISTINCT id FROM unnest(keys) id WHERE id NOT IN (SELECT message_id FROM held)
        ORDER BY id)
    SELECT message_id FROM held;
END $$;
