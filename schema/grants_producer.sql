-- An application role, {role}, that only enqueues (from SQL or from Python).
GRANT USAGE ON SCHEMA {schema} TO {role};
-- INSERT of the columns an enqueue fills, and no other: the row's id, message id,
-- timestamps, attempts and state are the outbox's (an application that chose its id
-- could collide with everyone's next enqueue; one that set next_attempt_at to
-- 'infinity' would block its key forever; dispatched_at would forge a delivery).
-- The REVOKE first makes these statements also narrow an older, table-wide grant.
REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON {schema}.messages FROM {role};
GRANT INSERT (topic, key, payload, content_type, headers) ON {schema}.messages TO {role};
-- RETURNING message_id needs SELECT on that one column, and nothing more.
GRANT SELECT (message_id) ON {schema}.messages TO {role};
GRANT EXECUTE ON FUNCTION {schema}.enqueue(text, text, jsonb, jsonb) TO {role};
GRANT EXECUTE ON FUNCTION {schema}.enqueue_binary(text, text, bytea, jsonb, text) TO {role};
-- The headers domain's check calls it on every insert that carries headers: a
-- database that revoked EXECUTE from PUBLIC would refuse those inserts without this.
GRANT EXECUTE ON FUNCTION {schema}.headers_valid(jsonb) TO {role};
-- A committer that skips its NOTIFY counts the skip, and the relay reads the count
-- (schema.sql, "Wakes the relay"): granted here too, not left to PUBLIC's default.
GRANT EXECUTE ON FUNCTION {schema}.note_skipped_wakeup() TO {role};
GRANT EXECUTE ON FUNCTION {schema}.skipped_wakeups() TO {role};
-- `outbox-relay backfill --dsn` is best run as the application's role, which may read
-- its own tables: it checks the schema version and records its progress.
GRANT SELECT ON {schema}.schema_version TO {role};
-- Every column but created_by, which the database fills with the role's name, and
-- progress only (grants_relay.sql says why). The REVOKE narrows older, table-wide grants.
REVOKE INSERT, UPDATE ON {schema}.backfills FROM {role};
GRANT SELECT ON {schema}.backfills TO {role};
GRANT INSERT (requested_by, source, total) ON {schema}.backfills TO {role};
GRANT UPDATE (copied, cursor_key, finished_at) ON {schema}.backfills TO {role};
-- Where a message landed (schema.sql, receipt): by id, without reading messages.
GRANT EXECUTE ON FUNCTION {schema}.receipt(uuid) TO {role};
