-- The WAL source's SQL, one named query each, loaded by outbox_relay/sources/wal/slot.py
-- (beside queries.sql and inbox_queries.sql: every query of the project lives in schema/).
-- Names reach these texts only through psycopg.sql: {slot} and {publication} as
-- literals, {publication_id} as an identifier. No query of the slot takes parameters, so
-- each one runs over the simple query protocol, the only one a replication connection
-- speaks. The last section, the WAL source's way into the outbox table, runs on an
-- ordinary connection, with parameters and {schema} (the outbox schema's identifier).

-- name: wal_level
SELECT current_setting('wal_level')

-- name: role_can_replicate
-- A slot needs the REPLICATION attribute (or a superuser): checked before anything is
-- created, so a refusal leaves no publication behind. Amazon RDS and Aurora give no
-- role that attribute: membership in their rds_replication role stands for it there
-- (a server without that role has no such rule; CASE keeps pg_has_role from being
-- asked about a role that does not exist).
SELECT current_user,
       rolreplication OR rolsuper
       OR CASE WHEN to_regrole('rds_replication') IS NULL THEN false
               ELSE pg_has_role(current_user, 'rds_replication', 'MEMBER') END
FROM pg_roles WHERE rolname = current_user

-- name: publication_exists
SELECT EXISTS (SELECT FROM pg_publication WHERE pubname = {publication})

-- name: create_publication
-- No table: the relay reads logical decoding messages, which pgoutput sends whatever
-- the publication holds, but it still wants a publication to name.
CREATE PUBLICATION {publication_id}

-- name: drop_publication
DROP PUBLICATION IF EXISTS {publication_id}

-- name: slot_identity
SELECT plugin, database, current_database() FROM pg_replication_slots WHERE slot_name = {slot}

-- name: create_slot
SELECT pg_create_logical_replication_slot({slot}, 'pgoutput')

-- name: drop_slot
SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = {slot}

-- name: slot_state
-- The current position is the primary's insert position, or on a standby the last one
-- replayed (pg_current_wal_lsn() fails during recovery). LSNs as text: parsed by
-- pgoutput.parse_lsn, one format on every connection.
SELECT active,
       active_pid,
       wal_status,
       safe_wal_size,
       restart_lsn::text,
       confirmed_flush_lsn::text,
       (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text
FROM pg_replication_slots
WHERE slot_name = {slot}

-- name: start_replication
-- proto_version 1: no streaming of transactions in progress, so a transaction arrives
-- only once it committed (a prepared one at COMMIT PREPARED: two_phase is off).
START_REPLICATION SLOT {slot_id} LOGICAL {start} (proto_version '1', publication_names {publication}, messages 'true')

-- The table as the WAL source's retry path (outbox_relay/sources/wal/parking.py): a
-- message the brokers did not take is parked, inserted into the outbox table, and the
-- table engine takes it over; every later message of its key follows it there.

-- name: held_keys_snapshot
-- Every key the table holds back (the rule of held_keys below), up to %(limit)s + 1 of
-- each kind: the relay keeps them in memory and checks each part against them, one
-- query a second instead of one per part. A skip scan, as walk_keys: one index descent
-- per key, however many rows each has; past the limit the relay asks per part instead.
WITH RECURSIVE pending(key) AS (
    (SELECT m.key FROM {schema}.messages AS m
     WHERE m.key IS NOT NULL AND m.dispatched_at IS NULL AND m.dead_lettered_at IS NULL
     ORDER BY m.key COLLATE "C" LIMIT 1)
    UNION ALL
    SELECT n.key FROM pending AS p
    CROSS JOIN LATERAL (
        SELECT m.key FROM {schema}.messages AS m
        WHERE m.key COLLATE "C" > p.key COLLATE "C"
          AND m.key IS NOT NULL AND m.dispatched_at IS NULL AND m.dead_lettered_at IS NULL
        ORDER BY m.key COLLATE "C" LIMIT 1) AS n
), dead(key) AS (
    (SELECT d.key FROM {schema}.messages AS d
     WHERE d.dead_lettered_at IS NOT NULL AND d.key IS NOT NULL
     ORDER BY d.key COLLATE "C" LIMIT 1)
    UNION ALL
    SELECT n.key FROM dead AS p
    CROSS JOIN LATERAL (
        SELECT d.key FROM {schema}.messages AS d
        WHERE d.key COLLATE "C" > p.key COLLATE "C" AND d.dead_lettered_at IS NOT NULL
        ORDER BY d.key COLLATE "C" LIMIT 1) AS n
)
(SELECT false AS dead, key FROM pending LIMIT %(limit)s + 1)
UNION ALL
(SELECT true, key FROM dead WHERE %(hold_dead_letters)s LIMIT %(limit)s + 1)

-- name: held_keys
-- Which of these keys the table holds back, so that a message of theirs read from the
-- WAL must be parked behind what the table holds, never published around it: the key
-- has a pending row (parked, waiting for a retry or behind one) or, under `hold`, a dead
-- letter; the claim's own rule (queries.sql, walk_keys). Scalar subqueries, not EXISTS:
-- they stay one index probe per key (the partial indexes of pending rows and of dead
-- letters) and are never turned into a join that reads a whole index. Run after
-- batch_settings (queries.sql), whose planner settings keep them on those indexes.
SELECT k.key
FROM unnest(%(keys)s::text[]) AS k(key)
WHERE (SELECT m.id FROM {schema}.messages AS m
       WHERE m.key COLLATE "C" = k.key COLLATE "C"
         AND m.key IS NOT NULL AND m.dispatched_at IS NULL AND m.dead_lettered_at IS NULL
       LIMIT 1) IS NOT NULL
   OR (%(hold_dead_letters)s
       AND (SELECT d.id FROM {schema}.messages AS d
            WHERE d.key COLLATE "C" = k.key COLLATE "C" AND d.dead_lettered_at IS NOT NULL
            LIMIT 1) IS NOT NULL)

-- name: park_messages
-- Parked messages as pending rows, in the order given (stream order): the identity is
-- drawn row by row after the ORDER BY, so ids, the table's enqueue order, follow it.
-- The columns the relay's role may insert (grants_relay.sql); a row's state (attempts,
-- retry time, dead letter) is then written by record_outcomes (queries.sql), the
-- table engine's own statement for what an outcome means, in the same transaction.
INSERT INTO {schema}.messages (message_id, topic, key, payload, content_type, headers)
SELECT p.message_id, p.topic, p.key, p.payload, p.content_type, p.headers::jsonb
FROM unnest(%(message_ids)s::uuid[], %(topics)s::text[], %(keys)s::text[], %(payloads)s::bytea[],
            %(content_types)s::text[], %(headers)s::text[]) WITH ORDINALITY
     AS p(message_id, topic, key, payload, content_type, headers, n)
ORDER BY p.n
RETURNING id

-- name: park_messages_at
-- park_messages while the slot drains after a switch to table: each row takes its id
-- from %(first_id)s on (settings.drain_next, the gap below the drain gate), in the order
-- given, so it goes behind its key's older rows and before the rows enqueued since.
INSERT INTO {schema}.messages (id, message_id, topic, key, payload, content_type, headers) OVERRIDING SYSTEM VALUE
SELECT %(first_id)s::bigint + p.n - 1, p.message_id, p.topic, p.key, p.payload, p.content_type, p.headers::jsonb
FROM unnest(%(message_ids)s::uuid[], %(topics)s::text[], %(keys)s::text[], %(payloads)s::bytea[],
            %(content_types)s::text[], %(headers)s::text[]) WITH ORDINALITY
     AS p(message_id, topic, key, payload, content_type, headers, n)
ORDER BY p.n
RETURNING id

-- name: park_begin
-- The first statement of a park: the settings row locked until it commits, so a switch
-- of source (which updates it) comes wholly before or after the park; the drain's next
-- id when one is pending (NULL: the identity's own).
SELECT drain_next FROM {schema}.settings FOR UPDATE

-- name: slot_streamed_by
-- Exactly once: which walsender streams the slot, read inside a park, after park_begin.
-- A relay whose walsender is no longer the slot's (it was frozen or cut off, and another
-- relay took the slot over and is sending the same batch) parks nothing: its Kafka
-- commit would be fenced, but its park would have doubled the other relay's.
SELECT active_pid FROM pg_replication_slots WHERE slot_name = %(slot)s

-- name: park_end
-- The last statement of a park: the drain's next id moved past the rows parked at it,
-- and the position of the last message done (done_through: what a restart skips).
UPDATE {schema}.settings
SET drain_next = drain_next + %(count)s,
    done_through_commit = %(commit_lsn)s::text::pg_lsn,
    done_through = %(lsn)s::text::pg_lsn

-- name: mark_done
-- A batch that ends inside a transaction is done (acked, or parked with park_end): the
-- slot cannot be told before the commit, so a restart would send its messages again.
UPDATE {schema}.settings
SET done_through_commit = %(commit_lsn)s::text::pg_lsn, done_through = %(lsn)s::text::pg_lsn

-- name: parked_of
-- Which of these message ids are in the table: read once, when an exactly-once relay
-- starts after a park that committed while its Kafka transaction did not
-- (sources/wal/exactly_once.py). A scan, and only then: in WAL mode the table holds
-- only what was parked.
SELECT m.message_id FROM {schema}.messages AS m WHERE m.message_id = ANY(%(ids)s::uuid[])

-- name: done_through
-- Never a position beyond the WAL inserted so far: one from another cluster (a restore,
-- a migration) would skip messages that were never parked.
SELECT done_through_commit::text, done_through::text FROM {schema}.settings
WHERE done_through_commit <= pg_current_wal_insert_lsn()

-- The WAL source inside `outbox-relay run` (outbox_relay/sources/wal/runner.py), on an
-- ordinary connection, with parameters.

-- name: wal_insert_end
-- The end of the WAL inserted so far (not only written: a transaction that committed
-- with synchronous_commit off has its commit record there before it is written out).
-- Read once a relay saw the switch to table: the switch waited for every transaction
-- that enqueued (the fence), so every WAL message of the outbox lies before it.
SELECT pg_current_wal_insert_lsn()::text

-- name: switch_state
-- Whether the drain after a switch to table is pending (its gate set), and the slot the
-- switch to wal used (schema.sql, settings).
SELECT drain_gate IS NOT NULL, wal_slot FROM {schema}.settings

-- name: close_drain_gate
-- The slot is drained (or gone): rows enqueued after the switch may be claimed.
UPDATE {schema}.settings SET drain_gate = NULL, drain_next = NULL WHERE drain_gate IS NOT NULL

-- name: max_slot_wal_keep_size
-- -1: a slot may keep WAL without limit (a stalled relay fills the disk); otherwise
-- PostgreSQL invalidates a slot that falls further behind.
SELECT current_setting('max_slot_wal_keep_size')

-- name: record_receipts
-- relay.wal.receipts: one row per acked message of a dispatched batch, in one statement
-- (receipts as text, cast here: a jsonb[] parameter costs the client far more per element).
INSERT INTO {schema}.wal_receipts (message_id, topic, key, receipt)
SELECT id, topic, key, receipt::jsonb
FROM unnest(%(message_ids)s::uuid[], %(topics)s::text[], %(keys)s::text[], %(receipts)s::text[])
    AS r(id, topic, key, receipt);

-- name: record_delivered
-- outcomes.delivered: one outcome row per acked message of those topics, written per
-- dispatched batch before its position is confirmed (the table source writes them in
-- the statement that marks its rows: queries.sql, mark_dispatched_feeding).
INSERT INTO {schema}.outcomes
    (message_id, topic, key, outcome, attempts, payload, content_type, headers, enqueued_at, receipt)
SELECT id, topic, key, 'delivered', 1, payload, content_type, headers::jsonb, enqueued_at, receipt::jsonb
FROM unnest(%(message_ids)s::uuid[], %(topics)s::text[], %(keys)s::text[], %(payloads)s::bytea[],
            %(content_types)s::text[], %(headers)s::text[], %(enqueued_at)s::timestamptz[], %(receipts)s::text[])
    AS d(id, topic, key, payload, content_type, headers, enqueued_at, receipt);
