-- Per-domain counters. fillfactor leaves room on each page so counter updates can be HOT
-- (heap-only tuple) updates that touch no index. Keys use the "C" collation: byte order, the
-- order the worker sorts them in, and plain memcmp comparisons instead of locale rules.
CREATE TABLE domains (
    domain    text   COLLATE "C" PRIMARY KEY,
    delivered bigint NOT NULL DEFAULT 0 CHECK (delivered >= 0),
    bounced   bigint NOT NULL DEFAULT 0 CHECK (bounced >= 0)
) WITH (fillfactor = 90);

-- Message ids already applied, written in the same transaction as the counters, so a
-- redelivered or republished message is counted once. Purged after the retention.
CREATE TABLE applied_messages (
    message_id text        COLLATE "C" PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);
-- BRIN: ids arrive in applied_at order, so a block-range index finds the old ones for the
-- purge at almost no cost per insert (a btree here costs a second index write per message).
CREATE INDEX applied_messages_applied_at ON applied_messages USING brin (applied_at);
