-- Creating a partition moves the default partition's rows of its range into it, then attaches
-- it (V5). Claims may insert into the default meanwhile: when no partition covers now() (the
-- upkeep failed or the workers were down for longer than a partition and a day), every claim
-- does. A row a claim inserted after the move, or had not committed when the move ran, was left
-- in the default; ATTACH then found a row of the new range there and failed (23514: "updated
-- partition constraint for default partition would be violated"), every round, and the
-- partition of now() was never made. The default is now locked before the move (ACCESS
-- EXCLUSIVE, which ATTACH takes anyway): the move waits for the claims under way and sees
-- their rows, and no claim adds one until the partition is attached. Normally the default is
-- empty and the lock is held for milliseconds. (SHARE ROW EXCLUSIVE would deadlock: upgraded
-- to ACCESS EXCLUSIVE at ATTACH, it waits for claims that hold ACCESS SHARE and wait for it.)
CREATE OR REPLACE FUNCTION applied_messages_partition(day date, days int DEFAULT 1) RETURNS boolean
LANGUAGE plpgsql
SET DateStyle = 'ISO' SET TimeZone = 'UTC'
AS $$
DECLARE
    name text := format('applied_messages_p%s', to_char(day, 'YYYYMMDD'));
    lo timestamptz := day::timestamp AT TIME ZONE 'UTC';
    hi timestamptz := (day + days)::timestamp AT TIME ZONE 'UTC';
BEGIN
    IF to_regclass(name) IS NOT NULL THEN
        RETURN false;
    END IF;
    EXECUTE format('CREATE TABLE %I (LIKE applied_messages INCLUDING DEFAULTS)', name);
    EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I CHECK (applied_at >= %L AND applied_at < %L)',
                   name, name || '_range', lo, hi);
    LOCK TABLE applied_messages_default IN ACCESS EXCLUSIVE MODE;
    EXECUTE format('WITH moved AS (DELETE FROM applied_messages_default '
                   'WHERE applied_at >= %L AND applied_at < %L RETURNING *) '
                   'INSERT INTO %I SELECT * FROM moved', lo, hi, name);
    EXECUTE format('CREATE UNIQUE INDEX %I ON %I (message_id)', name || '_message_id', name);
    EXECUTE format('ALTER TABLE applied_messages ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                   name, lo, hi);
    RETURN true;
END $$;
