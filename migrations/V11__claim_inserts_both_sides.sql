-- Near a partition bound (UTC midnight), a claim no longer takes advisory locks (V9, V10): it
-- inserts each new key on both sides of the bound, so that two attempts of one key made on
-- either side of it meet on one unique index, as attempts meet anywhere else. With V10, a
-- claim of more than 64 keys (single-event messages: thousands per batch) locked its 128 hash
-- buckets exclusively near midnight, so two batches in flight ran one after the other for the
-- 20 minutes a day of the window (README, "The midnight window").
--
-- Every claim looks its keys up in every partition and inserts the others with a plain INSERT,
-- in (key, stamp) order; a concurrent claim of a key in the same partition makes it wait, then
-- fail with unique_violation, and the batch is applied again and meets the key. Outside the
-- window the stamp is now(), as before. Within `lock_window` of UTC midnight (where the upkeep
-- puts every bound: whole UTC days) a claim reads the bounds of the partitions and takes the
-- one nearest to now, if it lies within `lock_window`: its keys go in twice, stamped with the
-- bound's last microsecond and with the bound itself, that is once on each side of it. The two
-- stamps always fall in two partitions (a bound separates them), one of them the partition of
-- now().
--
-- Why two attempts of a key always meet: a batch transaction lives less than the window (see
-- src/store/dedup.rs), so two attempts that overlap in time start less than the window apart.
-- If no bound lies between their starts, both insert into the partition of their start (which
-- the window's stamps include). If one does, it is the bound nearest to each of them (bounds
-- are days apart), and both insert on both sides of it. Either way both insert the key into
-- one partition, and its unique index makes the later insert wait for the earlier
-- transaction. No deadlock: every claim inserts in (key, stamp) order, and the stamps of
-- claims that can meet lie within the window of one bound, where they map to partitions in
-- the same order (the default partition can lie on both sides of a partition, so that needs a
-- window well under half a partition: 10 minutes against at least a day). Replicas of V8
-- during a rolling upgrade (their own statements: bucket locks, then a plain insert at now())
-- meet these claims the same way; replicas of V9 and V10 call this function.
--
-- Keys claimed near a bound are kept in two partitions, each copy dropped with its partition;
-- the ids gauge counts them twice, and their applied_at is the bound (or its last
-- microsecond), not the transaction's start. A key claimed up to 10 minutes before midnight
-- goes to the default partition when the partition after midnight is missing (the upkeep
-- failed for a day); creating that partition then moves it out of the default one, as V5 does
-- for any row there (an upkeep round that races such an insert fails, and the next one runs
-- it again). A held key comes back once, whatever number of partitions hold it.
CREATE OR REPLACE FUNCTION applied_messages_claim(keys bytea[], lock_window interval) RETURNS SETOF bytea
LANGUAGE plpgsql SET enable_seqscan = off AS $$
DECLARE
    t time := (now() AT TIME ZONE 'UTC')::time;
    stamps timestamptz[] := ARRAY[now()];
    near timestamptz;
BEGIN
    IF least(t - '00:00'::time, '24:00'::time - t) < lock_window THEN
        SELECT bound INTO near
        FROM pg_inherits i,
             LATERAL (VALUES (applied_messages_lower(i.inhrelid)),
                             (applied_messages_upper(i.inhrelid))) b(bound)
        WHERE i.inhparent = 'applied_messages'::regclass
          AND bound > now() - lock_window AND bound < now() + lock_window
        ORDER BY abs(extract(epoch FROM bound - now()))
        LIMIT 1;
        IF near IS NOT NULL THEN
            stamps := ARRAY[near - interval '1 microsecond', near];
        END IF;
    END IF;
    RETURN QUERY
    WITH held AS MATERIALIZED (
        SELECT message_id FROM applied_messages WHERE message_id = ANY(keys)),
    claimed AS (
        INSERT INTO applied_messages (message_id, applied_at)
        SELECT id, stamp
        FROM (SELECT DISTINCT id FROM unnest(keys) id
              WHERE id NOT IN (SELECT message_id FROM held)) fresh,
             unnest(stamps) stamp
        ORDER BY id, stamp)
    SELECT DISTINCT message_id FROM held;
END $$;
