-- Where enqueue writes: the two bodies of {schema}.enqueue_binary, one per source, and
-- the record of the switch. outbox_relay/operations/schema_manager.py, set_source,
-- applies them in one transaction. Placeholders as in schema.sql, plus {prefix}: the
-- logical message prefix of this outbox (sources/wal/framing.py, PREFIX_FOR).
--
-- Why a switch replaces the function rather than the function reading the settings
-- row: enqueue is on the application's write path, and reading a row (or a GUC) on
-- every call costs a lookup that the WAL source's whole budget cannot spare (issue 18:
-- its enqueue should cost no more than an INSERT of the same bytes). CREATE OR REPLACE
-- keeps the function's OID, owner and GRANTs, and a session's cached plans and compiled
-- body are invalidated by it: the next call, in any session, runs the new body. A call
-- running while the switch commits finishes with the body it started with.
--
-- Both bodies validate alike, with the same errors and codes, and return a fresh
-- gen_random_uuid() (the table's default for message_id): a caller cannot tell the
-- sources apart but by where the message goes. The table body is schema.sql's, word
-- for word (tests/integration/test_sources.py checks that switching back restores it).

-- name: use_table_source
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

-- name: use_wal_source
-- The checks are the table body's, word for word, on the same lines (its two extra
-- variables share one line), so an error's CONTEXT names the same line too; the
-- domains of messages add nothing to them (the same rules).
-- The frame is version 1.0 of sources/wal/framing.py, built as tests/support/wal.py's
-- FRAME_FUNCTION (proven equal to framing.encode), inline: one expression, which
-- plpgsql evaluates on its fast path for simple expressions (a PERFORM would go through
-- the executor, and a call to another function would cost a call). octet_length of a
-- text is its length in the database's encoding, which is UTF8 (install refuses any
-- other), so it is the length of its convert_to(..., 'UTF8').
-- SECURITY DEFINER with a pinned search_path: pg_logical_emit_message is executable by
-- PUBLIC by default and checks no attribute (PostgreSQL 15), so in WAL mode any role
-- that can connect could write frames into the relay's stream, which it publishes;
-- set_source revokes it from PUBLIC (the function's owner keeps it), and this body runs
-- with its owner's rights, so a producer still needs only EXECUTE on enqueue, as in
-- table mode. search_path is pg_catalog then pg_temp (never searched for functions or
-- operators), so a caller's objects cannot stand in for what the body calls; the
-- functions outside the checks are qualified all the same, and the checks keep the
-- table body's words so their errors stay identical.
CREATE OR REPLACE FUNCTION {schema}.enqueue_binary(
    topic text,
    key text,
    payload bytea,
    headers jsonb DEFAULT '{{}}'::jsonb,
    content_type text DEFAULT 'application/octet-stream'
) RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    new_id uuid; written pg_lsn;
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
    new_id := pg_catalog.gen_random_uuid();
    headers := coalesce(headers, '{{}}'::pg_catalog.jsonb);
    content_type := coalesce(content_type, 'application/octet-stream');
    written := pg_catalog.pg_logical_emit_message(true, {prefix},
        '\x10'::pg_catalog.bytea
        || pg_catalog.uuid_send(new_id)
        || pg_catalog.int2send(pg_catalog.octet_length(topic)::pg_catalog.int2) || pg_catalog.convert_to(topic, 'UTF8')
        || coalesce(
            pg_catalog.int2send(pg_catalog.octet_length(key)::pg_catalog.int2) || pg_catalog.convert_to(key, 'UTF8'),
            pg_catalog.int2send(-1::pg_catalog.int2))
        || pg_catalog.int4send(pg_catalog.octet_length(content_type)) || pg_catalog.convert_to(content_type, 'UTF8')
        || pg_catalog.int4send(pg_catalog.octet_length(headers::text)) || pg_catalog.convert_to(headers::text, 'UTF8')
        || pg_catalog.int4send(pg_catalog.octet_length(payload)) || payload);
    RETURN new_id;
END
$$;

-- name: record_source
UPDATE {schema}.settings
SET source = %(source)s, source_changed_at = now(), source_changed_by = current_user
WHERE source IS DISTINCT FROM %(source)s;

-- name: emit_message_access
-- Each variant of pg_logical_emit_message this server has (of the argument lists given;
-- PostgreSQL 17 adds a flush argument), whether PUBLIC may execute it (its ACL, or the
-- default ACL while it has none), whether the current role may revoke that (a superuser
-- or a member of the function's owner: anyone else's REVOKE only warns), and whether
-- the owner of {schema}.enqueue_binary, which runs the WAL body, may execute it without
-- PUBLIC (a superuser, or granted).
WITH owner AS (
    SELECT p.proowner AS oid FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
    WHERE n.nspname = %(schema)s AND p.proname = 'enqueue_binary'
)
SELECT v.args,
       EXISTS (
           SELECT FROM pg_catalog.aclexplode(coalesce(p.proacl, pg_catalog.acldefault('f', p.proowner))) AS a
           WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE'
       ) AS public_executes,
       coalesce((SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = current_user), false)
           OR pg_catalog.pg_has_role(current_user, p.proowner, 'USAGE') AS can_revoke,
       o.name AS owner,
       coalesce(o.super, true) OR EXISTS (
           SELECT FROM pg_catalog.aclexplode(coalesce(p.proacl, pg_catalog.acldefault('f', p.proowner))) AS a
           WHERE a.grantee = o.oid AND a.privilege_type = 'EXECUTE'
       ) AS owner_executes
FROM pg_catalog.unnest(%(variants)s::text[]) WITH ORDINALITY AS v(args, n)
JOIN pg_catalog.pg_proc p ON p.oid = pg_catalog.to_regprocedure('pg_catalog.pg_logical_emit_message(' || v.args || ')')
LEFT JOIN (
    SELECT r.oid, r.rolname AS name, r.rolsuper AS super FROM owner JOIN pg_catalog.pg_roles r ON r.oid = owner.oid
) AS o ON true
ORDER BY v.n;

-- name: wal_slot_exists
-- The outbox's own slot (the one its relay streams), logical, of pgoutput, in this
-- database and not invalidated: messages emitted before it exists are decoded by no slot
-- the relay reads, so the WAL source is not turned on without it.
SELECT EXISTS (
    SELECT FROM pg_replication_slots
    WHERE slot_name = %(slot)s AND slot_type = 'logical' AND plugin = 'pgoutput'
      AND database = current_database() AND wal_status IS DISTINCT FROM 'lost'
);

-- A switch keeps each key's order (schema.sql, settings; migrations/0009_switch_order.sql).

-- name: take_source_fence
-- The fence, taken alone by a switch (and shared by every enqueue_binary call and by a
-- backfill chunk): the switch waits until each transaction that enqueued has ended, so
-- no transaction enqueues with the old body after the switch (a session keeps a body
-- it already ran for the rest of its transaction), and enqueues that come meanwhile
-- wait for the switch. Run under the caller's lock_timeout (set_source).
SELECT pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext({channel} || '.source'));

-- name: open_drain_gate
-- wal -> table: until a relay has streamed the slot to its end and dropped it
-- (runner.py), the claim takes no keyed row from drain_gate on, and the messages the
-- drain parks take ids from drain_next, in the gap below it that this leaves in the
-- identity sequence (2^40 ids: more than any slot holds), so they go behind their key's
-- older rows and before every row enqueued after the switch. Set whatever slot the
-- caller names: the drain reads the slot the switch to wal recorded (wal_slot).
UPDATE {schema}.settings
SET drain_next = b.id, drain_gate = pg_catalog.setval(b.seq, b.id + 1099511627776) + 1
FROM (SELECT s.seq, pg_catalog.nextval(s.seq) AS id
      FROM pg_catalog.pg_get_serial_sequence(%(messages)s, 'id') AS s(seq)) AS b;

-- name: record_wal_slot
-- table -> wal: the slot enqueue's messages go to from now on; and what an earlier slot
-- parked (done_through: another slot's positions, maybe another cluster's) is
-- forgotten.
UPDATE {schema}.settings SET wal_slot = %(slot)s, done_through_commit = NULL, done_through = NULL;

-- name: drain_pending
-- The drain after a switch to table has not ended: its gate is still set.
SELECT drain_gate IS NOT NULL FROM {schema}.settings;
