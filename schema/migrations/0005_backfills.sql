-- Version 5: backfills. `outbox-relay backfill` snapshots an existing table into the
-- outbox, one message per row, chunk by chunk in keyset order; this table records each
-- backfill and how far it got, so that it resumes after a crash with nothing missing
-- and nothing twice. Cheap to apply: one new table.

CREATE TABLE {schema}.backfills (
    backfill_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    requested_by text NOT NULL,
    requested_at timestamptz NOT NULL DEFAULT now(),
    -- What is snapshotted: the table, the topic, the key column, the filters.
    source jsonb NOT NULL,
    total bigint NOT NULL,
    copied bigint NOT NULL DEFAULT 0,
    -- The primary key of the last row copied, as text (NULL: none yet); each chunk moves
    -- it in the chunk's transaction.
    cursor_key text[],
    finished_at timestamptz
);
