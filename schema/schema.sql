-- outbox-relay schema, current version (SCHEMA_VERSION in outbox_relay/sqlfiles.py).
-- Placeholders in braces are the quoted schema name and the NOTIFY channel literal,
-- filled in by psycopg.sql; literal braces are doubled. The migrations under
-- migrations/ must build exactly this (tests/migration checks it).

CREATE SCHEMA IF NOT EXISTS {schema};

CREATE TABLE {schema}.schema_version (
    version integer PRIMARY KEY,
    installed_at timestamptz NOT NULL DEFAULT now()
);

-- Where enqueue writes this outbox's messages, in one row: `table` (a row in messages,
-- which the relay claims) or `wal` (a logical decoding message, in the WAL only, which
-- the relay streams from a replication slot: outbox_relay/sources/wal/). enqueue_binary
-- never reads this row: switching replaces its body (schema/sources.sql), so an enqueue
-- pays nothing to find its source. The row says which body is installed, since when and
-- who switched, for `status`, `check` and the relay (queries.sql, outbox_source).
CREATE TABLE {schema}.settings (
    one_row boolean PRIMARY KEY DEFAULT true CONSTRAINT settings_one_row CHECK (one_row),
    source text NOT NULL DEFAULT 'table' CONSTRAINT settings_source_known CHECK (source IN ('table', 'wal')),
    source_changed_at timestamptz NOT NULL DEFAULT now(),
    source_changed_by name NOT NULL DEFAULT current_user,
    -- A switch keeps each key's order (migrations/0009_switch_order.sql says how):
    -- while drain_gate is set (a switch from wal, the slot not yet drained) the claim
    -- takes no keyed row from that id on, and the drain parks with ids from drain_next,
    -- below it; wal_slot is the slot the switch to wal used, which that drain reads.
    drain_gate bigint,
    drain_next bigint,
    wal_slot text,
    -- The last WAL message done (acked or parked) that the slot's confirmed position
    -- may not cover yet (its commit's start LSN, its own LSN): written with a park, and
    -- after each batch that ends inside a transaction; what a restarted relay skips.
    done_through_commit pg_lsn,
    done_through pg_lsn
);
INSERT INTO {schema}.settings DEFAULT VALUES;

-- Header names are free-form except `message-id`, which the relay sets itself.
-- plpgsql (not SQL) so its plan is cached per session: this runs on every insert
-- that carries headers, on the application's write path.
CREATE FUNCTION {schema}.headers_valid(headers jsonb) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    name text;
    value jsonb;
BEGIN
    IF jsonb_typeof(headers) IS DISTINCT FROM 'object' THEN
        RETURN false;
    END IF;
    FOR name, value IN SELECT * FROM jsonb_each(headers) LOOP
        IF jsonb_typeof(value) <> 'string' OR length(name) NOT BETWEEN 1 AND 255
           OR lower(name) = 'message-id' THEN
            RETURN false;
        END IF;
    END LOOP;
    RETURN true;
END
$$;

-- What a topic, a key and the headers may be, as domains rather than table CHECK
-- constraints: PostgreSQL plans a table's CHECK expressions anew for every INSERT
-- statement, a domain's once per session, and on the write path that difference is
-- most of what the outbox row costs (docs/explanation/performance.md, "Latency and the write path"). Named like the table
-- constraints they replace, so a direct INSERT fails the same way.
CREATE DOMAIN {schema}.topic_name AS text
    -- A bounded repetition ({{1,249}}) makes Postgres' regex several times slower on
    -- the write path: the length is checked separately.
    CONSTRAINT messages_topic_valid CHECK (VALUE ~ '^[A-Za-z0-9._:/-]+$' AND length(VALUE) <= 249);

-- A key is 1 to 2,048 bytes of UTF-8, counted in bytes, not characters: it is in the
-- claim's index entries (key, id), which PostgreSQL caps at 2,704 bytes whether or not
-- the key compresses (1,024 CJK characters made an entry of 3,096 bytes, and the INSERT
-- failed). validation.py, MAX_KEY_BYTES, says the same. NOT VALID as an upgrade from
-- version 5 leaves it (migrations/0006_key_bytes.sql says why): every key written is
-- checked; only rows written before are not.
CREATE DOMAIN {schema}.message_key AS text;
ALTER DOMAIN {schema}.message_key ADD CONSTRAINT messages_key_valid
    CHECK (octet_length(VALUE) BETWEEN 1 AND 2048) NOT VALID;

CREATE DOMAIN {schema}.message_headers AS jsonb
    -- Most messages carry no headers: the equality short-circuits the function call.
    CONSTRAINT messages_headers_valid CHECK (VALUE = '{{}}'::jsonb OR {schema}.headers_valid(VALUE));

-- One row per message. `id` is the enqueue order that per-key ordering follows;
-- `message_id` is the stable identity that travels to the broker for deduplication.
-- State is per row (no cursor), so out-of-order commits never leave gaps.
CREATE TABLE {schema}.messages (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id uuid NOT NULL DEFAULT gen_random_uuid(),
    topic {schema}.topic_name NOT NULL,
    key {schema}.message_key,
    payload bytea NOT NULL,
    content_type text NOT NULL DEFAULT 'application/json',
    headers {schema}.message_headers NOT NULL DEFAULT '{{}}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,
    last_error text,
    dispatched_at timestamptz,
    dead_lettered_at timestamptz,
    dead_letter_reason text,
    -- Where a dispatched message landed, in the broker's words, with the broker and
    -- destination (migrations/0011_receipts.sql): written by the mark.
    receipt jsonb,
    -- When the dead-letter topic acked this dead letter (migrations/0012_dead_letter_topic.sql);
    -- NULL while it is pending, dispatched, or dead-lettered and not published yet.
    dead_letter_published_at timestamptz,
    CONSTRAINT messages_one_final_state CHECK (dispatched_at IS NULL OR dead_lettered_at IS NULL)
)
-- Rows are inserted, updated once or twice, then deleted by retention: vacuum often
-- so dead tuples stay bounded under a steady load.
WITH (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.02
);

-- The claim's two indexes, one entry per enqueued row (each row is in exactly one):
-- keyed pending rows by (key, id), so the claim finds each key's head with one index
-- descent, skipping from key to key, without reading the rows behind a head; keyless
-- pending rows by when they are due (created, or retry time), so rows waiting for a
-- retry are never walked and retried rows do not starve behind new ones.
-- Both leave dispatched and dead-lettered rows out, however many retention keeps.
-- COLLATE "C": keys compare as bytes (faster, and the same order on every server).
CREATE INDEX messages_keyed_pending_idx ON {schema}.messages (key COLLATE "C", id)
    WHERE key IS NOT NULL AND dispatched_at IS NULL AND dead_lettered_at IS NULL;

CREATE INDEX messages_keyless_pending_idx
    ON {schema}.messages ((coalesce(next_attempt_at, created_at)), id)
    WHERE key IS NULL AND dispatched_at IS NULL AND dead_lettered_at IS NULL;

-- Retention deletes dispatched rows by age.
CREATE INDEX messages_dispatched_idx ON {schema}.messages (dispatched_at)
    WHERE dispatched_at IS NOT NULL;

-- Dead letters: listed by `dead-letters`, and under `hold` the claim asks "is there a
-- dead letter before this head?", one probe per claimed key.
CREATE INDEX messages_dead_letters_idx ON {schema}.messages (key COLLATE "C", id)
    WHERE dead_lettered_at IS NOT NULL;

-- Dead letters newest first, a page at a time (the console, migrations/0014_console.sql):
-- a row enters it when it is dead-lettered, never at enqueue or at a mark.
CREATE INDEX messages_dead_letters_by_id_idx ON {schema}.messages (id)
    WHERE dead_lettered_at IS NOT NULL;

-- Dead letters the dead-letter topic has not acked (dead_letters.publish_to): what its
-- publisher takes, oldest first. An enqueue or a mark never writes an entry.
CREATE INDEX messages_dead_letters_unpublished_idx ON {schema}.messages (id)
    WHERE dead_lettered_at IS NOT NULL AND dead_letter_published_at IS NULL;

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

-- outbox.receipt() finds a message by its id among the dispatched rows. Partial: a row
-- gets its entry when it is marked, never at enqueue, so the application's write path
-- pays nothing for it.
CREATE INDEX messages_dispatched_message_id_idx ON {schema}.messages (message_id)
    WHERE dispatched_at IS NOT NULL;

-- ... and a dead letter by its id (`status --message-id`, the console's lookup,
-- `dead-letters requeue|purge --message-id`; migrations/0015_message_id_lookup.sql): an entry
-- when a row is dead-lettered, never at enqueue. Hash, not btree: a hash index answers
-- `message_id = ...` and nothing else, so no other query over dead letters can be
-- planned through it. Pending rows have none: it would cost every enqueue (the optional
-- messages_pending_message_id_idx, docs/how-to/console.md).
CREATE INDEX messages_dead_letters_message_id_idx ON {schema}.messages USING hash (message_id)
    WHERE dead_lettered_at IS NOT NULL;

-- Receipts of the messages the WAL source streams (relay.wal.receipts): they have no
-- row in messages. One row per acked message, written per dispatched batch before its
-- position is confirmed (sources/wal/parking.py); deleted after relay.retention.
CREATE TABLE {schema}.wal_receipts (
    message_id uuid NOT NULL,
    topic text NOT NULL,
    key text,
    dispatched_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    receipt jsonb
);
CREATE INDEX wal_receipts_message_id_idx ON {schema}.wal_receipts (message_id);
CREATE INDEX wal_receipts_dispatched_at_idx ON {schema}.wal_receipts (dispatched_at);

-- The receipt of a message's latest delivery, with when and after how many attempts;
-- NULL when none is kept (pending, dead-lettered, never enqueued, streamed without
-- relay.wal.receipts, or deleted by retention). A replay delivers the same message id
-- again: the latest wins, a dispatched row's or a streamed message's.
-- SECURITY DEFINER: the application's role may not read messages.
CREATE FUNCTION {schema}.receipt(message_id uuid) RETURNS jsonb
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
-- Only the roles granted it (grants_*.sql).
REVOKE EXECUTE ON FUNCTION {schema}.receipt(uuid) FROM PUBLIC;

-- The operator's actions on dead letters (`dead-letters requeue|purge`, the console's
-- buttons: operations/dead_letters.py calls these). SECURITY DEFINER, so that a role can
-- be granted them and nothing else on messages (the console's: grants_console_actions.sql):
-- they touch dead letters only, whatever they are given. The selection is Selection's
-- (a NULL filter matches all). Requeue: back to pending with a fresh attempt budget; the
-- reason moves to last_error so the history is not lost; the row keeps its id, so it
-- sorts before later messages of its key. Purge: up to max_rows per call (the caller
-- repeats, each call its own short transaction). Both return the message ids they took.
-- PL/pgSQL with custom plans (migrations/0015_message_id_lookup.sql): each call's
-- statement is planned with its values, so a NULL filter drops out and chosen ids are
-- probes of messages_dead_letters_message_id_idx; a LANGUAGE sql body is planned without
-- them, and read every dead letter for three ids.
CREATE FUNCTION {schema}.requeue_dead_letters(message_ids uuid[], topic_regex text, cut timestamptz)
RETURNS SETOF uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog SET plan_cache_mode = force_custom_plan AS $$
BEGIN
    RETURN QUERY
    UPDATE {schema}.messages AS m
    SET dead_lettered_at = NULL,
        dead_letter_reason = NULL,
        dead_letter_published_at = NULL,
        last_error = 'requeued after dead letter: ' || m.dead_letter_reason,
        attempts = 0,
        next_attempt_at = NULL
    WHERE m.dead_lettered_at IS NOT NULL
      AND (requeue_dead_letters.message_ids IS NULL OR m.message_id = ANY(requeue_dead_letters.message_ids))
      AND (requeue_dead_letters.topic_regex IS NULL OR m.topic ~ requeue_dead_letters.topic_regex)
      AND (requeue_dead_letters.cut IS NULL OR m.dead_lettered_at < requeue_dead_letters.cut)
    RETURNING m.message_id;
END
$$;
REVOKE EXECUTE ON FUNCTION {schema}.requeue_dead_letters(uuid[], text, timestamptz) FROM PUBLIC;

CREATE FUNCTION {schema}.purge_dead_letters(message_ids uuid[], topic_regex text, cut timestamptz, max_rows integer)
RETURNS SETOF uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog SET plan_cache_mode = force_custom_plan AS $$
BEGIN
    RETURN QUERY
    DELETE FROM {schema}.messages AS m
    WHERE m.dead_lettered_at IS NOT NULL
      AND m.id IN (
        SELECT d.id FROM {schema}.messages AS d
        WHERE d.dead_lettered_at IS NOT NULL
          AND (purge_dead_letters.message_ids IS NULL OR d.message_id = ANY(purge_dead_letters.message_ids))
          AND (purge_dead_letters.topic_regex IS NULL OR d.topic ~ purge_dead_letters.topic_regex)
          AND (purge_dead_letters.cut IS NULL OR d.dead_lettered_at < purge_dead_letters.cut)
        -- At most 10,000 a call, whatever the caller asks: one call is one transaction.
        LIMIT least(coalesce(purge_dead_letters.max_rows, 1000), 10000))
    RETURNING m.message_id;
END
$$;
REVOKE EXECUTE ON FUNCTION {schema}.purge_dead_letters(uuid[], text, timestamptz, integer) FROM PUBLIC;

-- Live relays report here (heartbeat), so `status` can show who is running and
-- how many messages each holds in flight (row locks are invisible to other sessions).
CREATE TABLE {schema}.relays (
    relay_id uuid PRIMARY KEY,
    hostname text NOT NULL,
    pid integer NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    in_flight integer NOT NULL DEFAULT 0,
    -- The relay's package version, source (table or wal) and each broker's state
    -- (per broker name: connected, circuit_open), for the console.
    version text,
    source text,
    brokers jsonb
);

-- What each relay did between two heartbeats (published, failed, dead-lettered, the
-- oldest pending age it saw): the console charts the last hour from these rows, the same
-- chart on every console replica and after a restart. Each heartbeat deletes rows older
-- than an hour (migrations/0014_console.sql).
CREATE TABLE {schema}.relay_samples (
    relay_id uuid NOT NULL,
    sampled_at timestamptz NOT NULL DEFAULT now(),
    published bigint NOT NULL,
    failed bigint NOT NULL,
    dead_lettered bigint NOT NULL,
    -- The relay's lag when sampled: the oldest pending message's age and, while it
    -- streams from the WAL, its WAL source's lag if larger (NULL: not read).
    oldest_pending_age_s double precision
);
CREATE INDEX relay_samples_sampled_at_idx ON {schema}.relay_samples (sampled_at);

-- `outbox-relay replay` re-publishes dispatched messages by copying them to the tail of
-- the outbox (same message id, a header naming the replay), chunk by chunk; each replay
-- is recorded here (who, when, what, how far): visible in `status`, resumable after a
-- crash, never repeated by accident.
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
    finished_at timestamptz,
    -- The role that recorded it, filled by record_guard (below) whatever the INSERT
    -- said: a resume by another role asks first. NULL: recorded before version 7.
    created_by name,
    -- Selected rows not copied: their key is over the limit of message_key (written
    -- before version 6), and a copy is a new message (replay_copy_chunk says why).
    skipped bigint NOT NULL DEFAULT 0
);

-- `outbox-relay backfill` snapshots an existing table into the outbox, one message per
-- row, chunk by chunk in keyset order; each backfill is recorded here with how far it
-- got, so that it resumes after a crash with nothing missing and nothing twice.
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
    finished_at timestamptz,
    -- As in replays: the role that recorded it, and a resume by another role asks first.
    created_by name
);

-- A resume acts on what a replay's or backfill's record says (the messages it copies,
-- the table it reads) with the privileges of the role that resumes it, asking first
-- only when another role recorded it. So a record names its creator truly and keeps
-- what it selects, whatever the GRANTs: an upgrade keeps older versions' table-wide
-- INSERT and UPDATE on these tables (the chart's hook runs `schema install`, which
-- grants nothing), and a DBA may grant more than grants_*.sql does.
-- - INSERT: created_by is current_user, whatever the statement said. current_user, not
--   session_user: it is the role the statement's privileges are checked as (the one
--   SET ROLE chose), the one a resume compares with (replay_get, backfill_get) and
--   whose privileges the backfill read its table with. session_user is the login: behind
--   a shared login or a pooler that sets roles, every record would name the same login,
--   and a weak role's record would look like the operator's own. SET ROLE reaches only
--   roles the session's login is a member of, so a record never names a role whose
--   privileges its writer could not use. SECURITY INVOKER (the default) on purpose: a
--   definer's function sees its owner as current_user.
-- - UPDATE: only the progress columns (the trigger's arguments) may change; anything
--   else is refused (insufficient_privilege), for every role. Changing a record
--   otherwise takes its owner disabling the trigger.
CREATE FUNCTION {schema}.record_guard() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    changed text;
BEGIN
    IF TG_OP = 'INSERT' THEN
        NEW.created_by := current_user;
        RETURN NEW;
    END IF;
    SELECT string_agg(n.key, ', ' ORDER BY n.key) INTO changed
    FROM jsonb_each(to_jsonb(NEW)) AS n
    WHERE n.key <> ALL (TG_ARGV) AND n.value IS DISTINCT FROM to_jsonb(OLD) -> n.key;
    IF changed IS NOT NULL THEN
        RAISE EXCEPTION 'outbox: % of %.% cannot change once recorded: only its progress (%) does',
            changed, TG_TABLE_SCHEMA, TG_TABLE_NAME, array_to_string(TG_ARGV, ', ')
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER replays_record_guard
    BEFORE INSERT OR UPDATE ON {schema}.replays
    FOR EACH ROW EXECUTE FUNCTION {schema}.record_guard('copied', 'cursor_id', 'skipped', 'finished_at');

CREATE TRIGGER backfills_record_guard
    BEFORE INSERT OR UPDATE ON {schema}.backfills
    FOR EACH ROW EXECUTE FUNCTION {schema}.record_guard('copied', 'cursor_key', 'finished_at');

-- Wakes the relay. NOTIFY takes a database-wide lock at commit, which serializes every
-- notifying committer, so the notification is coalesced twice over:
-- - the trigger is deferred to commit time and Postgres folds identical notifications
--   of one transaction into one, so a transaction notifies at most once;
-- - only a transaction that gets the advisory lock notifies. One that finds another
--   transaction holding it skips its own NOTIFY, counting the skip instead
--   (wakeups_skipped, a sequence: no lock, no row, survives any rollback).
-- The skip is a bet that the holder's notification wakes the relay after this commit is
-- visible. It can lose: the holder may roll back (a later deferred constraint failed, or
-- it took the lock early with SET CONSTRAINTS ALL IMMEDIATE), or commit and be claimed
-- before this commit shows. So the relay reads the counter every 250 ms and, when it
-- moved, claims (engine/wakeup.py): a skipped notification delays a message by about a
-- quarter of a second, never by the poll interval. `outbox-relay schema notify off`
-- disables the trigger.
CREATE SEQUENCE {schema}.wakeups_skipped;

-- SECURITY DEFINER: roles that only enqueue, or only relay, need no grant on the
-- sequence (an upgrade cannot know which roles those are).
CREATE FUNCTION {schema}.note_skipped_wakeup() RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS $$
    SELECT nextval('{schema}.wakeups_skipped'::regclass)
$$;

CREATE FUNCTION {schema}.skipped_wakeups() RETURNS bigint
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog AS $$
    SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {schema}.wakeups_skipped
$$;

CREATE FUNCTION {schema}.notify_relay() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF pg_try_advisory_xact_lock(hashtext({channel})) THEN
        PERFORM pg_notify({channel}, '');
    ELSE
        PERFORM {schema}.note_skipped_wakeup();
    END IF;
    RETURN NULL;
END
$$;

CREATE CONSTRAINT TRIGGER messages_notify_relay
    AFTER INSERT ON {schema}.messages
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION {schema}.notify_relay();

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

-- plpgsql rather than SQL: a SQL function called from a client statement is planned
-- anew on every call, which costs more than everything else the enqueue does.
CREATE FUNCTION {schema}.enqueue(topic text, key text, payload jsonb, headers jsonb DEFAULT '{{}}'::jsonb)
RETURNS uuid
LANGUAGE plpgsql AS $$
BEGIN
    RETURN {schema}.enqueue_binary(topic, key, convert_to(payload::text, 'UTF8'), headers, 'application/json');
END
$$;
