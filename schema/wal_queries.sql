-- The WAL source's SQL, one named query each, loaded by outbox_relay/sources/wal/slot.py
-- (beside queries.sql and inbox_queries.sql: every query of the project lives in schema/).
-- Names reach these texts only through psycopg.sql: {slot} and {publication} as
-- literals, {publication_id} as an identifier. No query takes parameters, so each one
-- runs over the simple query protocol, the only one a replication connection speaks.

-- name: wal_level
SELECT current_setting('wal_level')

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
