-- Least privilege for the relay's own role, {role}: it reads and updates messages,
-- deletes them for retention, and writes its heartbeat. Nothing outside {schema}.
-- Applications that enqueue need only: GRANT USAGE ON SCHEMA and EXECUTE on enqueue
-- functions (or INSERT on messages), shown at the end.
GRANT USAGE ON SCHEMA {schema} TO {role};
GRANT SELECT, UPDATE, DELETE ON {schema}.messages TO {role};
GRANT SELECT ON {schema}.schema_version TO {role};
GRANT SELECT, INSERT, UPDATE, DELETE ON {schema}.relays TO {role};
-- A committer that skips its NOTIFY counts the skip, and the relay reads the count
-- (schema.sql, "Wakes the relay"): granted here too, not left to PUBLIC's default.
GRANT EXECUTE ON FUNCTION {schema}.note_skipped_wakeup() TO {role};
GRANT EXECUTE ON FUNCTION {schema}.skipped_wakeups() TO {role};
-- `outbox-relay replay` (run with the relay's config) copies dispatched messages to the
-- tail of the outbox and records the replay: INSERT of the copied columns only, the
-- headers domain's check function, and the replays table.
GRANT INSERT (message_id, topic, key, payload, content_type, headers) ON {schema}.messages TO {role};
GRANT EXECUTE ON FUNCTION {schema}.headers_valid(jsonb) TO {role};
GRANT SELECT, INSERT, UPDATE ON {schema}.replays TO {role};
-- `outbox-relay backfill` records its progress (it reads the snapshotted table with a
-- role that may: its own --dsn, or this one after a GRANT SELECT on that table).
GRANT SELECT, INSERT ON {schema}.backfills TO {role};
-- Progress only: a role that could rewrite a backfill's source could have a later
-- `--resume` by a stronger role copy a table of its choosing.
GRANT UPDATE (copied, cursor_key, finished_at) ON {schema}.backfills TO {role};
