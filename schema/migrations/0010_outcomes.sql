-- Version 10: what became of each message, fed back to the application (issue 22).
--
-- A dead-lettered message cannot be made atomic with the business write that enqueued
-- it any more: the application must compensate (cancel the order, refund), and it can
-- only do that reliably if it learns of the failure in its own database, in a
-- transaction of its own. The relay writes one row here per message dead-lettered (and,
-- for the topics `outcomes.delivered` names, per message delivered), in the statement
-- that records the outcome on the message (queries.sql: record_outcomes, mark_*), so a
-- row exists exactly when that outcome committed. The application reads and deletes
-- rows in its own transactions (grants_producer.sql); the relay deletes what is older
-- than `outcomes.retention`. A copy of the message, not a reference: a dead letter may
-- be purged, and a delivered row deleted by retention, before the application looks.
CREATE TABLE {schema}.outcomes (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id uuid NOT NULL,
    topic text NOT NULL,
    key text,
    outcome text NOT NULL CONSTRAINT outcomes_outcome_known CHECK (outcome IN ('dead_lettered', 'delivered')),
    -- The dead letter's reason (NULL when delivered).
    reason text,
    -- Publish attempts the message took, this one included.
    attempts integer NOT NULL,
    payload bytea NOT NULL,
    content_type text NOT NULL,
    headers jsonb NOT NULL,
    enqueued_at timestamptz NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- Where a delivered message landed (messages.receipt; NULL for a dead letter).
    receipt jsonb
);

-- Retention deletes by age.
CREATE INDEX outcomes_recorded_at_idx ON {schema}.outcomes (recorded_at);

-- A wake-up for the application, on a channel of its own (the relay's channel would
-- wake every relay for nothing): `outbox_relay_outcomes`, with the outbox's schema as
-- payload. Coalesced as the relay's is (notify_relay below says why: a NOTIFY takes a
-- database-wide lock at commit): identical notifications of one transaction fold into
-- one, and a transaction that finds another one holding the advisory lock skips its
-- own, counting on that one's. A statement that wrote no row notifies nobody. A hint,
-- not a delivery: the application also looks on a timer (docs/how-to/outcomes.md).
CREATE FUNCTION {schema}.notify_outcomes() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT FROM written)
       AND pg_try_advisory_xact_lock(hashtext('outbox_relay_outcomes.' || TG_TABLE_SCHEMA)) THEN
        PERFORM pg_notify('outbox_relay_outcomes', TG_TABLE_SCHEMA);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER outcomes_notify
    AFTER INSERT ON {schema}.outcomes
    REFERENCING NEW TABLE AS written
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.notify_outcomes();

-- The application's way to handle outcomes, from any language, in its own transaction:
-- up to max_rows of them (only those of one outcome, of some topics, when given), oldest
-- first, deleted as they are returned. Rows another transaction is taking are skipped
-- (SKIP LOCKED), so several instances of the application never handle one twice; a
-- transaction that rolls back gives its rows back. SECURITY DEFINER: locking rows takes
-- UPDATE, which the application's role is not granted on the table (it could forge an
-- outcome's fields).
CREATE FUNCTION {schema}.take_outcomes(
    max_rows integer DEFAULT 100,
    only_outcome text DEFAULT NULL,
    only_topics text[] DEFAULT NULL
) RETURNS SETOF {schema}.outcomes
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
BEGIN
    IF max_rows IS NULL OR max_rows < 1 THEN
        RAISE EXCEPTION 'outbox: take_outcomes max_rows must be 1 or more, got %', quote_nullable(max_rows)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF only_outcome IS NOT NULL AND only_outcome NOT IN ('dead_lettered', 'delivered') THEN
        RAISE EXCEPTION 'outbox: unknown outcome %: use dead_lettered, delivered or NULL (both)', quote_literal(only_outcome)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    WITH taken AS (
        DELETE FROM {schema}.outcomes
        WHERE id IN (
            SELECT o.id FROM {schema}.outcomes AS o
            WHERE (only_outcome IS NULL OR o.outcome = only_outcome)
              AND (only_topics IS NULL OR o.topic = ANY(only_topics))
            ORDER BY o.id
            LIMIT max_rows
            FOR UPDATE SKIP LOCKED)
        RETURNING *)
    SELECT * FROM taken ORDER BY taken.id;
END
$$;
-- Only the roles granted it (grants_producer.sql): it deletes what it returns.
REVOKE EXECUTE ON FUNCTION {schema}.take_outcomes(integer, text, text[]) FROM PUBLIC;
