-- Least privilege for the relay's own role, {role}: it reads and updates messages,
-- deletes them for retention, and writes its heartbeat. Nothing outside {schema}.
-- Applications that enqueue need only: GRANT USAGE ON SCHEMA and EXECUTE on enqueue
-- functions (or INSERT on messages), shown at the end.
GRANT USAGE ON SCHEMA {schema} TO {role};
GRANT SELECT, UPDATE, DELETE ON {schema}.messages TO {role};
GRANT SELECT ON {schema}.schema_version TO {role};
-- Where enqueue writes (`table` or `wal`): the relay, `status` and `check` read it.
GRANT SELECT ON {schema}.settings TO {role};
-- The WAL source keeps each key's order across a switch and parks a message once
-- (schema.sql, settings): it moves the drain's ids and the parked position, and ends
-- the drain with the slot.
GRANT UPDATE (drain_gate, drain_next, done_through_commit, done_through) ON {schema}.settings TO {role};
GRANT SELECT, INSERT, UPDATE, DELETE ON {schema}.relays TO {role};
-- Its heartbeat's samples, for the console's chart (schema.sql, relay_samples): it writes
-- its own and deletes those older than an hour.
GRANT SELECT, INSERT, DELETE ON {schema}.relay_samples TO {role};
-- `dead-letters requeue|purge` run with the relay's config call these (schema.sql).
GRANT EXECUTE ON FUNCTION {schema}.requeue_dead_letters(uuid[], text, timestamptz) TO {role};
GRANT EXECUTE ON FUNCTION {schema}.purge_dead_letters(uuid[], text, timestamptz, integer) TO {role};
-- A committer that skips its NOTIFY counts the skip, and the relay reads the count
-- (schema.sql, "Wakes the relay"): granted here too, not left to PUBLIC's default.
GRANT EXECUTE ON FUNCTION {schema}.note_skipped_wakeup() TO {role};
GRANT EXECUTE ON FUNCTION {schema}.skipped_wakeups() TO {role};
-- `outbox-relay replay` (run with the relay's config) copies dispatched messages to the
-- tail of the outbox and records the replay: INSERT of the copied columns only, the
-- headers domain's check function, and the replays table.
GRANT INSERT (message_id, topic, key, payload, content_type, headers) ON {schema}.messages TO {role};
-- The id too, for the WAL source's drain only (parking.py): a message parked while the
-- slot drains after a switch to table takes an id from the gap below drain_gate.
GRANT INSERT (id) ON {schema}.messages TO {role};
GRANT EXECUTE ON FUNCTION {schema}.headers_valid(jsonb) TO {role};
-- A resume acts on what a replay's or backfill's record says, with the privileges of
-- the role that resumes it. So a role records them with every column but created_by,
-- which the database fills with the role's name (a resume by another role names it and
-- asks first), and updates progress only: a role that could rewrite a record's
-- selection or source could have a stronger role's `--resume` copy what it chose. The
-- REVOKEs first narrow the table-wide grants of older versions.
REVOKE INSERT, UPDATE ON {schema}.replays FROM {role};
GRANT SELECT ON {schema}.replays TO {role};
GRANT INSERT (requested_by, selection, max_source_id, as_of, total) ON {schema}.replays TO {role};
GRANT UPDATE (copied, cursor_id, skipped, finished_at) ON {schema}.replays TO {role};
-- `outbox-relay backfill` records its progress (it reads the snapshotted table with a
-- role that may: its own --dsn, or this one after a GRANT SELECT on that table).
REVOKE INSERT, UPDATE ON {schema}.backfills FROM {role};
GRANT SELECT ON {schema}.backfills TO {role};
GRANT INSERT (requested_by, source, total) ON {schema}.backfills TO {role};
GRANT UPDATE (copied, cursor_key, finished_at) ON {schema}.backfills TO {role};
-- What became of each message (schema.sql, outcomes): written with the outcome it
-- reports, deleted past outcomes.retention. Retention skips the rows an application
-- transaction is taking (FOR UPDATE SKIP LOCKED), and a row lock needs UPDATE on one
-- column: recorded_at, which the relay never changes.
GRANT SELECT, INSERT, DELETE ON {schema}.outcomes TO {role};
GRANT UPDATE (recorded_at) ON {schema}.outcomes TO {role};
-- The WAL source's receipts (relay.wal.receipts): written per batch, deleted by retention.
GRANT SELECT, INSERT, DELETE ON {schema}.wal_receipts TO {role};
