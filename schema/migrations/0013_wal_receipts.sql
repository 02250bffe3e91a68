-- Version 13: receipts of the messages the WAL source streams (issue 22).
--
-- A message the WAL source publishes has no row in messages to keep its receipt in.
-- With relay.wal.receipts the relay writes one row here per acked message, in one
-- statement per dispatched batch (sources/wal/parking.py, record_receipts), before it
-- confirms the batch's position; retention deletes them after relay.retention, as it
-- deletes dispatched rows. outbox.receipt() and `status --message-id` read both.
CREATE TABLE {schema}.wal_receipts (
    message_id uuid NOT NULL,
    topic text NOT NULL,
    key text,
    dispatched_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    receipt jsonb
);
CREATE INDEX wal_receipts_message_id_idx ON {schema}.wal_receipts (message_id);
CREATE INDEX wal_receipts_dispatched_at_idx ON {schema}.wal_receipts (dispatched_at);

-- The latest delivery of a message id, from a dispatched row or a streamed message's
-- receipt (a replay of a streamed message is a row: either may be the latest).
CREATE OR REPLACE FUNCTION {schema}.receipt(message_id uuid) RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog AS $$
    SELECT r.receipt FROM (
        SELECT coalesce(m.receipt, '{{}}'::jsonb)
               || jsonb_build_object('dispatched_at', m.dispatched_at, 'attempts', m.attempts) AS receipt,
               m.dispatched_at AS at
        FROM {schema}.messages AS m
        WHERE m.message_id = receipt.message_id AND m.dispatched_at IS NOT NULL
        UNION ALL
        SELECT coalesce(w.receipt, '{{}}'::jsonb)
               || jsonb_build_object('dispatched_at', w.dispatched_at, 'attempts', 1, 'source', 'wal'),
               w.dispatched_at
        FROM {schema}.wal_receipts AS w
        WHERE w.message_id = receipt.message_id) AS r
    ORDER BY r.at DESC
    LIMIT 1
$$;
REVOKE EXECUTE ON FUNCTION {schema}.receipt(uuid) FROM PUBLIC;
