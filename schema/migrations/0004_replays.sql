-- Version 4: replays. `outbox-relay replay` re-publishes dispatched messages by copying
-- them to the tail of the outbox (same message id, a header naming the replay), chunk
-- by chunk; this table records each replay (who, when, what, how far) so that it is
-- visible in `status`, resumable after a crash, and never repeated by accident.
-- Cheap to apply: one new table; the messages table is not touched.

CREATE TABLE {schema}.replays (
    replay_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    requested_by text NOT NULL,
    requested_at timestamptz NOT NULL DEFAULT now(),
    -- The selection as given (topic glob, key, since, until, message ids): a replay of
    -- the same selection again needs --again.
    selection jsonb NOT NULL,
    -- Source rows with an id above this were enqueued after the replay began (copies
    -- included): never selected, so a replay cannot feed on its own copies.
    max_source_id bigint NOT NULL,
    -- Rows dispatched after this (when the selection was counted) are not selected:
    -- what the replay copies is what it counted.
    as_of timestamptz NOT NULL,
    total bigint NOT NULL,
    copied bigint NOT NULL DEFAULT 0,
    -- The last source id copied: each chunk moves it in the chunk's transaction.
    cursor_id bigint NOT NULL DEFAULT 0,
    finished_at timestamptz
);
