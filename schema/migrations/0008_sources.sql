-- Version 8: where enqueue writes, recorded in one row (schema.sql, settings): `table`,
-- as every version before, or `wal` (logical decoding messages, issue 18). An upgraded
-- outbox starts as `table`, which is what its enqueue_binary does; switching replaces
-- that function's body (schema/sources.sql) and records it here. Cheap to apply: one
-- small table, nothing on messages.

CREATE TABLE {schema}.settings (
    one_row boolean PRIMARY KEY DEFAULT true CONSTRAINT settings_one_row CHECK (one_row),
    source text NOT NULL DEFAULT 'table' CONSTRAINT settings_source_known CHECK (source IN ('table', 'wal')),
    source_changed_at timestamptz NOT NULL DEFAULT now(),
    source_changed_by name NOT NULL DEFAULT current_user
);
INSERT INTO {schema}.settings DEFAULT VALUES;
