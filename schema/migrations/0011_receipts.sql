-- Version 11: delivery receipts (issue 22).
--
-- Where each dispatched message landed, in the broker's own words (a Kafka topic,
-- partition and offset; a RabbitMQ exchange and routing key; a webhook's URL and
-- status; a file's path and line), with the broker and destination the relay chose:
-- written by the statement that marks the row dispatched (queries.sql,
-- mark_dispatched_receipts), kept as long as the row (relay.retention).
ALTER TABLE {schema}.messages ADD COLUMN receipt jsonb;

-- outbox.receipt() finds a message by its id among the dispatched rows. Partial: a row
-- gets its entry when it is marked, never at enqueue, so the application's write path
-- pays nothing for it. IF NOT EXISTS: an operator may have built it beforehand with
-- CREATE INDEX CONCURRENTLY (docs/how-to/upgrades.md), sparing enqueues the wait while it builds.
CREATE INDEX IF NOT EXISTS messages_dispatched_message_id_idx ON {schema}.messages (message_id)
    WHERE dispatched_at IS NOT NULL;

-- The receipt of a message's latest delivery, with when and after how many attempts;
-- NULL when no dispatched row of it is kept (pending, dead-lettered, never enqueued, or
-- deleted by retention). A replay delivers the same message id again: the latest wins.
-- SECURITY DEFINER: the application's role may not read messages.
CREATE FUNCTION {schema}.receipt(message_id uuid) RETURNS jsonb
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog AS $$
    SELECT coalesce(m.receipt, '{{}}'::jsonb)
           || jsonb_build_object('dispatched_at', m.dispatched_at, 'attempts', m.attempts)
    FROM {schema}.messages AS m
    WHERE m.message_id = receipt.message_id AND m.dispatched_at IS NOT NULL
    ORDER BY m.dispatched_at DESC, m.id DESC
    LIMIT 1
$$;
-- Only the roles granted it (grants_*.sql).
REVOKE EXECUTE ON FUNCTION {schema}.receipt(uuid) FROM PUBLIC;
