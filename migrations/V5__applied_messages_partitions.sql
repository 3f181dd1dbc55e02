-- Time partitions of applied_messages (issue 8): ids older than the retention go with their
-- partition (DROP TABLE: no row-by-row DELETE, no vacuum debt, cheap at hundreds of millions
-- of ids). Days are UTC days of `applied_at`, which is the applying transaction's start time.
--
-- Uniqueness: a unique index of a partitioned table must contain the partition key, so there
-- is none on the parent; each partition has its own unique index on message_id. The worker's
-- claim first looks an id up in every partition (one index probe per partition) and inserts
-- it with ON CONFLICT DO NOTHING, which the partition's unique index turns into a wait on a
-- concurrent insert of the same id on the same day. Near midnight two attempts of one id could
-- start on either side of it and meet no common index: the worker takes transaction-scoped
-- advisory locks on the ids' hash buckets in that window (src/store/dedup.rs).
--
-- Partitions are created ahead by the worker's upkeep (applied_messages_extend: chained
-- ranges of a width that follows the retention, a third of it, 1 to 7 days: fewer partitions
-- to probe per claim, ids kept up to one width past the retention); the DEFAULT partition is a safety net so an insert
-- never fails when the upkeep has not run. Creating a partition moves the default's rows of
-- that day into it.
--
-- The existing table: empty (a new install), it is replaced; with rows, it becomes the
-- partition of everything before tomorrow (named after today, so the upkeep drops it whole
-- once tomorrow is older than the retention). Attaching it scans it once to check the range.
ALTER TABLE applied_messages RENAME TO applied_messages_v4;
ALTER INDEX applied_messages_pkey RENAME TO applied_messages_v4_pkey;
ALTER INDEX applied_messages_applied_at RENAME TO applied_messages_v4_applied_at;

CREATE TABLE applied_messages (
    message_id bytea       NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
) PARTITION BY RANGE (applied_at);
-- For the overdue gauge (ids kept past the retention: the default partition, a partition the
-- upkeep failed to drop); BRIN costs almost nothing per insert.
CREATE INDEX applied_messages_applied_at ON applied_messages USING brin (applied_at);
CREATE TABLE applied_messages_default PARTITION OF applied_messages DEFAULT;
CREATE UNIQUE INDEX applied_messages_default_message_id ON applied_messages_default (message_id);

-- The upper bound of a partition (NULL for the default one), read from the catalogue.
CREATE FUNCTION applied_messages_upper(partition oid) RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT substring(pg_get_expr(relpartbound, oid) FROM 'TO \(''([^'']+)''\)')::timestamptz
    FROM pg_class WHERE oid = partition
$$;

-- Creates the partition of `days` UTC days from `day` if none has its name (by its first
-- day); true when it created it. ATTACH (not CREATE … PARTITION OF) takes only a SHARE UPDATE
-- EXCLUSIVE lock on the parent, so inserts go on; the CHECK constraint lets it skip scanning
-- the new table.
CREATE FUNCTION applied_messages_partition(day date, days int DEFAULT 1) RETURNS boolean
LANGUAGE plpgsql AS $$
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
    EXECUTE format('WITH moved AS (DELETE FROM applied_messages_default '
                   'WHERE applied_at >= %L AND applied_at < %L RETURNING *) '
                   'INSERT INTO %I SELECT * FROM moved', lo, hi, name);
    EXECUTE format('CREATE UNIQUE INDEX %I ON %I (message_id)', name || '_message_id', name);
    EXECUTE format('ALTER TABLE applied_messages ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                   name, lo, hi);
    RETURN true;
END $$;

-- Chains partitions of `days` days each after the last one (or from today) until the
-- partitions cover `until`; returns how many it created. Chained ranges never overlap, so
-- the width may change between runs (it follows the retention).
CREATE FUNCTION applied_messages_extend(days int, until timestamptz) RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
    today date := (now() AT TIME ZONE 'UTC')::date;
    next date;
    made int := 0;
BEGIN
    SELECT max(applied_messages_upper(inhrelid) AT TIME ZONE 'UTC')::date INTO next
    FROM pg_inherits WHERE inhparent = 'applied_messages'::regclass;
    IF next IS NULL OR next < today THEN
        next := today;
    END IF;
    WHILE next::timestamp AT TIME ZONE 'UTC' < until LOOP
        IF applied_messages_partition(next, days) THEN
            made := made + 1;
        END IF;
        next := next + days;
    END LOOP;
    RETURN made;
END $$;

DO $$
DECLARE
    today date := (now() AT TIME ZONE 'UTC')::date;
    name text := format('applied_messages_p%s', to_char(today, 'YYYYMMDD'));
BEGIN
    IF EXISTS (SELECT 1 FROM applied_messages_v4) THEN
        EXECUTE format('ALTER TABLE applied_messages_v4 RENAME TO %I', name);
        EXECUTE format('ALTER INDEX applied_messages_v4_pkey RENAME TO %I', name || '_message_id');
        DROP INDEX applied_messages_v4_applied_at;
        EXECUTE format('ALTER TABLE applied_messages ATTACH PARTITION %I FOR VALUES FROM (MINVALUE) TO (%L)',
                       name, (today + 1)::timestamp AT TIME ZONE 'UTC');
    ELSE
        DROP TABLE applied_messages_v4;
    END IF;
    PERFORM applied_messages_partition(today + i) FROM generate_series(0, 2) i;
END $$;
