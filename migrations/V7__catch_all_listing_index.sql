-- The catch-all listing (`GET /domains?status=catch-all`, `catchall export`) walked the V3
-- index of every domain that never bounced and read each row to test `delivered > T`; the
-- domains that never bounced but are not past the threshold (status unknown: every domain new
-- to the platform starts there) made it slow: 27-39 ms for a page of the bench that came after
-- the last catch-all domain, behind ~100,000 unknown ones, against 1-3 ms for the others.
--
-- This index holds only the domains that never bounced and are past 1000 deliveries (the
-- default threshold), so a page reads about its own rows. With a threshold of 1000 or more the
-- listing walks it (and still tests `delivered > T`); below 1000 it walks the V3 index.
--
-- Why a stored generated column, not `WHERE bounced = 0 AND delivered > 1000`: a column named
-- in an index predicate makes every update that changes it a non-HOT update, so a predicate on
-- `delivered` would send every counter update through all indexes. The flag changes at most
-- twice in a domain's life (when it crosses 1000, when it first bounces), so updates stay HOT.
--
-- Adding a stored generated column rewrites the table once (ACCESS EXCLUSIVE while it runs:
-- measured in the README, about a second per million domains here); counting waits, then goes on.
ALTER TABLE domains
    ADD COLUMN catch_all_1000 boolean GENERATED ALWAYS AS (bounced = 0 AND delivered > 1000) STORED;
CREATE INDEX domains_catch_all_1000 ON domains (domain) WHERE catch_all_1000;
