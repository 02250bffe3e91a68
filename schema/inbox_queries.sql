-- Every query the consumer inbox runs (outbox_relay/inbox/), once each. `-- name: x`
-- starts query x. {schema} is the quoted inbox schema; %(name)s are bound parameters.

-- name: first_time
-- On the consumer's path, once per message, in the caller's transaction.
SELECT {schema}.first_time(%(message_id)s::uuid, %(consumer)s::text);

-- name: prune
-- One batch of retention, in its own transaction.
SELECT {schema}.prune(make_interval(secs => %(older_than_s)s::double precision), %(max_rows)s::integer);

-- name: version
SELECT max(version) FROM {schema}.inbox_version;

-- name: has_version_table
SELECT to_regclass(format('%%I.inbox_version', %(schema)s::text)) IS NOT NULL;

-- name: schema_objects
-- Tables, indexes, sequences, views and functions already in the schema: a schema
-- that holds any and no inbox_version is someone else's.
SELECT (SELECT count(*) FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
        WHERE n.nspname = %(schema)s)
     + (SELECT count(*) FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace
        WHERE n.nspname = %(schema)s);

-- name: install_lock
-- Installs of one schema serialize here: the second finds the work done.
SELECT pg_advisory_xact_lock(hashtext('outbox_relay.inbox.' || %(schema)s::text));
