-- A claim (src/store/dedup.rs) inserts its fresh ids into the partition of now() with
-- ON CONFLICT DO NOTHING, so that partition's unique index already turns away the ids it holds
-- (committed, or being inserted by a concurrent transaction: the insert waits for it). The
-- look-up beforehand is only needed in the other partitions; this function gives the bounds of
-- the one it may skip, so that run-time partition pruning leaves it out (with partitions a
-- third of the retention wide, the current one is also the largest and the most written).
--
-- [lo, hi) of the partition that covers now(), or (infinity, infinity) when none does (the
-- row goes to the default partition, and every partition is looked up). Read from the
-- catalogue, so it follows whatever the upkeep created.
--
-- The bounds are read back from pg_get_expr's text, which is printed in the session's DateStyle
-- and TimeZone: in a non-ISO style a zone abbreviation can read back as another zone's (CST,
-- IST, PST…), hours off. So these functions, and V5's applied_messages_upper (which also
-- decides which partitions have expired), run with ISO and UTC whatever the session says; so do
-- V5's functions that write bounds into DDL with %L (an operator may call them from psql). The
-- worker's own connections are ISO and UTC too (src/store.rs), V5's first partitions included.
ALTER FUNCTION applied_messages_upper(oid) SET DateStyle = 'ISO' SET TimeZone = 'UTC';
ALTER FUNCTION applied_messages_partition(date, int) SET DateStyle = 'ISO' SET TimeZone = 'UTC';
ALTER FUNCTION applied_messages_extend(int, timestamptz) SET DateStyle = 'ISO' SET TimeZone = 'UTC';

-- The lower bound of a partition (-infinity for MINVALUE, NULL for the default partition).
CREATE FUNCTION applied_messages_lower(partition oid) RETURNS timestamptz
LANGUAGE sql STABLE SET DateStyle = 'ISO' SET TimeZone = 'UTC' AS $$
    SELECT CASE WHEN bound LIKE 'FOR VALUES FROM (MINVALUE)%' THEN '-infinity'::timestamptz
                ELSE substring(bound FROM 'FROM \(''([^'']+)''\)')::timestamptz END
    FROM (SELECT pg_get_expr(relpartbound, oid) AS bound FROM pg_class WHERE oid = partition) b
$$;

CREATE FUNCTION applied_messages_current(OUT lo timestamptz, OUT hi timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT coalesce(max(p.lo), 'infinity'), coalesce(max(p.hi), 'infinity')
    FROM (SELECT applied_messages_lower(inhrelid) AS lo, applied_messages_upper(inhrelid) AS hi
          FROM pg_inherits WHERE inhparent = 'applied_messages'::regclass) p
    WHERE p.lo <= now() AND now() < p.hi
$$;
