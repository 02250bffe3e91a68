-- outbox-relay schema, current version (SCHEMA_VERSION in outbox_relay/sqlfiles.py).
-- Placeholders in braces are the quoted schema name and the NOTIFY channel literal,
-- filled in by psycopg.sql; literal braces are doubled. The migrations under
-- migrations/ must build exactly this (tests/migration checks it).

CREATE SCHEMA IF NOT EXISTS {schema};

CREATE TABLE {schema}.schema_version (
    version integer PRIMARY KEY,
    installed_at timestamptz NOT NULL DEFAULT now()
);

-- Header names are free-form except `message-id`, which the relay sets itself.
CREATE FUNCTION {schema}.headers_valid(headers jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT jsonb_typeof(headers) = 'object' AND NOT EXISTS (
        SELECT 1 FROM jsonb_each(headers) AS h(name, value)
        WHERE jsonb_typeof(h.value) <> 'string'
           OR length(h.name) NOT BETWEEN 1 AND 255
           OR lower(h.name) = 'message-id'
    )
$$;

-- One row per message. `id` is the enqueue order that per-key ordering follows;
-- `message_id` is the stable identity that travels to the broker for deduplication.
-- State is per row (no cursor), so out-of-order commits never leave gaps.
CREATE TABLE {schema}.messages (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id uuid NOT NULL DEFAULT gen_random_uuid(),
    topic text NOT NULL,
    key text,
    payload bytea NOT NULL,
    content_type text NOT NULL DEFAULT 'application/json',
    headers jsonb NOT NULL DEFAULT '{{}}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,
    last_error text,
    dispatched_at timestamptz,
    dead_lettered_at timestamptz,
    dead_letter_reason text,
    CONSTRAINT messages_topic_valid CHECK (topic ~ '^[A-Za-z0-9._:/-]{{1,249}}$'),
    CONSTRAINT messages_key_valid CHECK (key IS NULL OR length(key) BETWEEN 1 AND 1024),
    CONSTRAINT messages_headers_valid CHECK ({schema}.headers_valid(headers)),
    CONSTRAINT messages_one_final_state CHECK (dispatched_at IS NULL OR dead_lettered_at IS NULL)
)
-- Rows are inserted, updated once or twice, then deleted by retention: vacuum often
-- so dead tuples stay bounded under a steady load.
WITH (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.02
);

-- The claim walks pending rows in enqueue order; the partial index keeps dispatched
-- and dead-lettered rows out of that walk however many of them retention keeps.
CREATE INDEX messages_pending_idx ON {schema}.messages (id)
    WHERE dispatched_at IS NULL AND dead_lettered_at IS NULL;

-- "Is there an earlier undispatched message with my key?": one probe per candidate.
-- Dead-lettered rows stay in it so the `hold` policy can see them.
CREATE INDEX messages_key_undispatched_idx ON {schema}.messages (key, id)
    WHERE dispatched_at IS NULL AND key IS NOT NULL;

CREATE INDEX messages_dispatched_idx ON {schema}.messages (dispatched_at)
    WHERE dispatched_at IS NOT NULL;

CREATE INDEX messages_dead_lettered_idx ON {schema}.messages (dead_lettered_at)
    WHERE dead_lettered_at IS NOT NULL;

-- Live relays report here (heartbeat), so `status` can show who is running and
-- how many messages each holds in flight (row locks are invisible to other sessions).
CREATE TABLE {schema}.relays (
    relay_id uuid PRIMARY KEY,
    hostname text NOT NULL,
    pid integer NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    in_flight integer NOT NULL DEFAULT 0
);

-- Fires once per INSERT statement and Postgres folds identical (channel, payload)
-- pairs within a transaction, so a transaction sends at most one notification:
-- NOTIFY takes a database-wide lock at commit, and fewer notifying commits means
-- less serialization. `outbox-relay schema notify off` disables it; the relay's poll
-- then finds new rows alone.
CREATE FUNCTION {schema}.notify_relay() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify({channel}, '');
    RETURN NULL;
END
$$;

CREATE TRIGGER messages_notify_relay
    AFTER INSERT ON {schema}.messages
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.notify_relay();

-- The one place that turns arguments into a row, with errors that name the problem.
-- An error aborts the caller's transaction, as any SQL error does.
CREATE FUNCTION {schema}.enqueue_binary(
    topic text,
    key text,
    payload bytea,
    headers jsonb DEFAULT '{{}}'::jsonb,
    content_type text DEFAULT 'application/octet-stream'
) RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    new_id uuid;
BEGIN
    IF topic IS NULL OR topic !~ '^[A-Za-z0-9._:/-]{{1,249}}$' THEN
        RAISE EXCEPTION 'outbox: invalid topic %: use 1 to 249 letters, digits or . _ - : /', quote_nullable(topic)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF key IS NOT NULL AND length(key) NOT BETWEEN 1 AND 1024 THEN
        RAISE EXCEPTION 'outbox: invalid key: must be 1 to 1024 characters or NULL'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF payload IS NULL THEN
        RAISE EXCEPTION 'outbox: payload must not be NULL'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT {schema}.headers_valid(coalesce(headers, '{{}}'::jsonb)) THEN
        RAISE EXCEPTION 'outbox: invalid headers %: must be a JSON object of non-empty string names (not "message-id") to string values', headers
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO {schema}.messages (topic, key, payload, headers, content_type)
    VALUES (topic, key, payload, coalesce(headers, '{{}}'::jsonb), coalesce(content_type, 'application/octet-stream'))
    RETURNING message_id INTO new_id;
    RETURN new_id;
END
$$;

CREATE FUNCTION {schema}.enqueue(topic text, key text, payload jsonb, headers jsonb DEFAULT '{{}}'::jsonb)
RETURNS uuid
LANGUAGE sql AS $$
    SELECT {schema}.enqueue_binary(topic, key, convert_to(payload::text, 'UTF8'), headers, 'application/json')
$$;
