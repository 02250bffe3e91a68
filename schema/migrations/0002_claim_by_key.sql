-- Version 2: the claim skips from key to key instead of walking every pending row
-- (README, "How it works"). Replaces the id-ordered pending index and the per-key
-- probe index by one index per row kind; no table rewrite, no data change.
-- Large outboxes: the index builds take a lock that blocks enqueues while they run;
-- on a busy table, build them first with CREATE INDEX CONCURRENTLY under these names.

CREATE INDEX IF NOT EXISTS messages_keyed_pending_idx ON {schema}.messages (key COLLATE "C", id)
    WHERE key IS NOT NULL AND dispatched_at IS NULL AND dead_lettered_at IS NULL;

CREATE INDEX IF NOT EXISTS messages_keyless_pending_idx
    ON {schema}.messages ((coalesce(next_attempt_at, '-infinity'::timestamptz)), id)
    WHERE key IS NULL AND dispatched_at IS NULL AND dead_lettered_at IS NULL;

CREATE INDEX IF NOT EXISTS messages_dead_letters_by_key_idx ON {schema}.messages (key COLLATE "C", id)
    WHERE dead_lettered_at IS NOT NULL AND key IS NOT NULL;

DROP INDEX {schema}.messages_pending_idx;
DROP INDEX {schema}.messages_key_undispatched_idx;
