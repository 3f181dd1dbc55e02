-- Bounces that prove nothing about catch-all (mailbox full, policy or spam blocks, 4.x.x…),
-- counted apart from the bounces that prove a recipient does not exist (SPEC §3).
--
-- On a live table: ADD COLUMN with a constant DEFAULT and NOT NULL is a catalogue change since
-- PostgreSQL 11 (existing rows read the default; no table rewrite, no long lock). The CHECK is
-- added NOT VALID so it does not scan existing rows either: they all hold the default 0, and
-- every new or updated row is checked.
ALTER TABLE domains ADD COLUMN other_bounced bigint NOT NULL DEFAULT 0;
ALTER TABLE domains ADD CONSTRAINT domains_other_bounced_check CHECK (other_bounced >= 0) NOT VALID;
