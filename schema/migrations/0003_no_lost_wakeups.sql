-- Version 3: no lost wake-up. A transaction that skips its NOTIFY because another one
-- holds the notifying lock counts the skip in a sequence, and the relay claims when the
-- count moves (schema.sql, "Wakes the relay"). Cheap to apply: a sequence, two new
-- functions and the trigger's function replaced; no table is locked.

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

CREATE OR REPLACE FUNCTION {schema}.notify_relay() RETURNS trigger
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
