-- message_id is an AMQP short string: up to 255 arbitrary bytes, not necessarily UTF-8 (and it
-- may contain NUL, which text cannot hold). Deduplication compares the exact bytes, so two ids
-- that differ only in invalid bytes stay two messages. Existing ids keep their UTF-8 bytes.
ALTER TABLE applied_messages
    ALTER COLUMN message_id TYPE bytea USING convert_to(message_id, 'UTF8');
