-- Version 9: a switch of source keeps each key's order (issue 18, point 1).
--
-- From wal to table: messages still in the slot are older than every row enqueued
-- after the switch, so until a relay has streamed the slot to its end (runner.py) the
-- claim takes no keyed row from drain_gate on (rows enqueued after the switch), and a
-- message the drain parks gets an id below drain_gate (drain_next, taken from a gap the
-- switch left in the identity sequence): behind its key's older rows, before its newer
-- ones. Keyless rows have no order to keep and are never held.
-- Either way, a transaction that enqueued before a switch cannot go on with the old
-- body after it: enqueue_binary takes the source fence (an advisory lock) shared, and a
-- switch takes it alone (schema/sources.sql), so the switch waits for such transactions
-- to end (or gives up after its timeout, changing nothing).
-- wal_slot: the slot the switch to wal used, which the drain after a switch back reads.
-- done_through_commit / done_through: the last WAL message done, acked or parked (its
-- commit's start LSN and its own), written with a park and after each batch that ends
-- inside a transaction: a relay that restarts before the slot was told skips it,
-- instead of parking it twice or sending a large transaction's acked part again.

ALTER TABLE {schema}.settings
    ADD COLUMN drain_gate bigint,
    ADD COLUMN drain_next bigint,
    ADD COLUMN wal_slot text,
    ADD COLUMN done_through_commit pg_lsn,
    ADD COLUMN done_through pg_lsn;

-- The table body with the fence (schema.sql's); an outbox in wal mode gets the WAL body
-- with it right after, in the same transaction (schema_manager.install re-applies the
-- recorded source's body).
CREATE OR REPLACE FUNCTION {schema}.enqueue_binary(
    topic text,
    key text,
    payload bytea,
    headers jsonb DEFAULT '{{}}'::jsonb,
    content_type text DEFAULT 'application/octet-stream'
) RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    new_id uuid;
    max_bytes bigint := nullif(current_setting('outbox_relay.max_payload_bytes', true), '')::bigint;
BEGIN
    IF topic IS NULL OR topic !~ '^[A-Za-z0-9._:/-]+$' OR length(topic) > 249 THEN
        RAISE EXCEPTION 'outbox: invalid topic %: use 1 to 249 letters, digits or . _ - : /', quote_nullable(topic)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF key IS NOT NULL AND octet_length(key) NOT BETWEEN 1 AND 2048 THEN
        RAISE EXCEPTION 'outbox: invalid key of % bytes: must be 1 to 2048 bytes of UTF-8 or NULL', octet_length(key)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF payload IS NULL THEN
        RAISE EXCEPTION 'outbox: payload must not be NULL'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- An optional ceiling, set per database or role:
    -- ALTER DATABASE app SET outbox_relay.max_payload_bytes = '1048576';
    IF max_bytes IS NOT NULL AND octet_length(payload) > max_bytes THEN
        RAISE EXCEPTION 'outbox: payload of % bytes exceeds outbox_relay.max_payload_bytes (%)',
            octet_length(payload), max_bytes
            USING ERRCODE = 'program_limit_exceeded';
    END IF;
    IF headers IS NOT NULL AND headers <> '{{}}'::jsonb AND NOT {schema}.headers_valid(headers) THEN
        RAISE EXCEPTION 'outbox: invalid headers %: must be a JSON object of non-empty string names (not "message-id") to string values', headers
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- The fence of a switch of source (schema/sources.sql): a switch waits for every
    -- transaction that enqueued, so none of them goes on with the old body after it.
    IF NOT pg_catalog.pg_try_advisory_xact_lock_shared(pg_catalog.hashtext({channel} || '.source')) THEN
        PERFORM pg_catalog.pg_advisory_xact_lock_shared(pg_catalog.hashtext({channel} || '.source'));
    END IF;
    INSERT INTO {schema}.messages (topic, key, payload, headers, content_type)
    VALUES (topic, key, payload, coalesce(headers, '{{}}'::jsonb), coalesce(content_type, 'application/octet-stream'))
    RETURNING message_id INTO new_id;
    RETURN new_id;
END
$$;
