-- Version 2: the claim skips from key to key instead of walking every pending row
-- (docs/explanation/how-it-works.md), and the write path loses its per-INSERT CHECK planning.
-- - one pending index per row kind, replacing the id-ordered pending index and the
--   per-key probe index; one dead-letter index by key;
-- - topic, key and headers validated by domains instead of table CHECK constraints
--   (same constraint names, same errors on a direct INSERT).
-- Changing the three columns' types rewrites the table under an exclusive lock: on a
-- large outbox, run `schema install` when the backlog is drained (retention keeps
-- dispatched rows: `relay.retention` short, or delete them first). The new indexes
-- may be built beforehand with CREATE INDEX CONCURRENTLY under these names.

CREATE DOMAIN {schema}.topic_name AS text
    -- A bounded repetition ({{1,249}}) makes Postgres' regex several times slower on
    -- the write path: the length is checked separately.
    CONSTRAINT messages_topic_valid CHECK (VALUE ~ '^[A-Za-z0-9._:/-]+$' AND length(VALUE) <= 249);

CREATE DOMAIN {schema}.message_key AS text
    CONSTRAINT messages_key_valid CHECK (length(VALUE) BETWEEN 1 AND 1024);

CREATE DOMAIN {schema}.message_headers AS jsonb
    -- Most messages carry no headers: the equality short-circuits the function call.
    CONSTRAINT messages_headers_valid CHECK (VALUE = '{{}}'::jsonb OR {schema}.headers_valid(VALUE));

DROP INDEX {schema}.messages_pending_idx;
DROP INDEX {schema}.messages_key_undispatched_idx;
DROP INDEX {schema}.messages_dead_lettered_idx;

ALTER TABLE {schema}.messages
    DROP CONSTRAINT messages_topic_valid,
    DROP CONSTRAINT messages_key_valid,
    DROP CONSTRAINT messages_headers_valid,
    ALTER COLUMN topic TYPE {schema}.topic_name,
    ALTER COLUMN key TYPE {schema}.message_key,
    ALTER COLUMN headers TYPE {schema}.message_headers;

CREATE INDEX IF NOT EXISTS messages_keyed_pending_idx ON {schema}.messages (key COLLATE "C", id)
    WHERE key IS NOT NULL AND dispatched_at IS NULL AND dead_lettered_at IS NULL;

CREATE INDEX IF NOT EXISTS messages_keyless_pending_idx
    ON {schema}.messages ((coalesce(next_attempt_at, created_at)), id)
    WHERE key IS NULL AND dispatched_at IS NULL AND dead_lettered_at IS NULL;

CREATE INDEX IF NOT EXISTS messages_dead_letters_idx ON {schema}.messages (key COLLATE "C", id)
    WHERE dead_lettered_at IS NOT NULL;
