-- The consumer inbox, current version (INBOX_SCHEMA_VERSION in outbox_relay/sqlfiles.py).
-- It lives in the CONSUMER's database, beside the tables its handlers change: a
-- message id is recorded in the same transaction as the message's business effect,
-- so either both commit or neither does (docs/how-to/inbox.md).
-- {schema} is the quoted schema name, filled in by psycopg.sql; literal braces are
-- doubled.

CREATE SCHEMA IF NOT EXISTS {schema};

-- Named apart from the outbox's `schema_version`, so an inbox installed by mistake
-- into an outbox schema (or the reverse) is refused instead of mistaken for it.
CREATE TABLE {schema}.inbox_version (
    version integer PRIMARY KEY,
    installed_at timestamptz NOT NULL DEFAULT now()
);

-- One row per message a consumer has processed. The primary key is the whole point:
-- a second transaction that records the same (consumer, message_id) waits on the
-- first one's uncommitted row, then conflicts if it committed (a duplicate) or
-- inserts if it rolled back (the first attempt never happened).
CREATE TABLE {schema}.processed (
    consumer text NOT NULL DEFAULT 'default',
    message_id uuid NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id),
    CONSTRAINT processed_consumer_valid CHECK (length(consumer) BETWEEN 1 AND 200)
)
-- Insert-only, then deleted by retention: vacuum often so the table stays small.
WITH (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.02
);

-- Retention walks this index oldest first, so each batch reads only what it deletes.
CREATE INDEX processed_processed_at ON {schema}.processed (processed_at);

-- true the first time `consumer` sees `message_id` (and records it, in the caller's
-- transaction); false when a committed transaction recorded it before. Run it in the
-- same transaction as the business effect, before the effect:
--   BEGIN; SELECT inbox.first_time($1, 'billing'); -- false: skip the effect; COMMIT;
-- plpgsql (not SQL) so its plan is cached per session: it runs once per message.
-- Under REPEATABLE READ or SERIALIZABLE, a concurrent transaction that recorded the
-- same id and committed after this snapshot was taken makes it fail with
-- serialization_failure (40001): retry the whole transaction, as for any conflict.
CREATE FUNCTION {schema}.first_time(message_id uuid, consumer text DEFAULT 'default') RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF first_time.message_id IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'inbox: message_id is null: a message without a message id cannot be deduplicated';
    END IF;
    IF first_time.consumer IS NULL OR length(first_time.consumer) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'inbox: consumer must be 1 to 200 characters';
    END IF;
    INSERT INTO {schema}.processed (consumer, message_id)
    VALUES (first_time.consumer, first_time.message_id)
    ON CONFLICT DO NOTHING;
    RETURN FOUND;
END
$$;

-- Retention: deletes at most `max_rows` rows recorded longer ago than `older_than`
-- and returns how many it deleted. Call it in its own transaction, again and again
-- until it returns 0 (`outbox-relay inbox prune` does): small batches keep each
-- transaction's locks and WAL short. Keep `older_than` above the longest time in
-- which a message can be delivered again (docs/how-to/inbox.md, "Retention").
CREATE FUNCTION {schema}.prune(older_than interval, max_rows integer DEFAULT 1000) RETURNS integer
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    deleted integer;
BEGIN
    IF older_than IS NULL OR older_than < interval '0' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'inbox: older_than must be an interval of 0 or more';
    END IF;
    IF max_rows IS NULL OR max_rows < 1 THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'inbox: max_rows must be 1 or more';
    END IF;
    DELETE FROM {schema}.processed AS p
    USING (SELECT o.consumer, o.message_id FROM {schema}.processed AS o
           WHERE o.processed_at < now() - older_than
           ORDER BY o.processed_at
           LIMIT max_rows
           -- Two prunes at once (two cron jobs) share the work instead of queueing.
           FOR UPDATE SKIP LOCKED) AS old
    WHERE p.consumer = old.consumer AND p.message_id = old.message_id;
    GET DIAGNOSTICS deleted = ROW_COUNT;
    RETURN deleted;
END
$$;
