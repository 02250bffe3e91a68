-- Version 14: what the operator console (outbox_relay/console/) shows of the relays.
--
-- Each relay's heartbeat now names its version, source and each broker's state (connected,
-- circuit open), and writes a sample of what
-- it did since the last one (published, failed, dead-lettered, the oldest pending age it
-- saw). The console charts the last hour from these rows: from the database, so every
-- console replica draws the same chart, from the first request after a restart, over
-- every relay replica and either source. One row per relay per heartbeat (5 s by
-- default: 720 an hour per relay); each heartbeat deletes rows older than an hour.
ALTER TABLE {schema}.relays ADD COLUMN version text;
ALTER TABLE {schema}.relays ADD COLUMN source text;
-- Each broker's state at the heartbeat, by name: connected, circuit_open (booleans).
ALTER TABLE {schema}.relays ADD COLUMN brokers jsonb;

CREATE TABLE {schema}.relay_samples (
    relay_id uuid NOT NULL,
    sampled_at timestamptz NOT NULL DEFAULT now(),
    -- Since the relay's previous sample.
    published bigint NOT NULL,
    failed bigint NOT NULL,
    dead_lettered bigint NOT NULL,
    -- The oldest pending message's age when sampled (NULL: nothing pending, or not read).
    oldest_pending_age_s double precision
);
CREATE INDEX relay_samples_sampled_at_idx ON {schema}.relay_samples (sampled_at);

-- The console lists dead letters newest first, a page at a time: by id among dead
-- letters only. A row enters this index when it is dead-lettered, never at enqueue or
-- at a mark (the predicate is false for them), so the write path pays nothing for it.
-- IF NOT EXISTS: a large outbox may build it beforehand with CREATE INDEX CONCURRENTLY
-- under this name (docs/how-to/upgrades.md), sparing enqueues the wait while it builds.
CREATE INDEX IF NOT EXISTS messages_dead_letters_by_id_idx ON {schema}.messages (id)
    WHERE dead_lettered_at IS NOT NULL;

-- The operator's actions on dead letters (`dead-letters requeue|purge`, the console's
-- buttons: operations/dead_letters.py calls these). SECURITY DEFINER, so that a role can
-- be granted them and nothing else on messages (the console's: grants_console_actions.sql):
-- they touch dead letters only, whatever they are given. The selection is Selection's
-- (a NULL filter matches all). Requeue: back to pending with a fresh attempt budget; the
-- reason moves to last_error so the history is not lost; the row keeps its id, so it
-- sorts before later messages of its key. Purge: up to max_rows per call (the caller
-- repeats, each call its own short transaction). Both return the message ids they took.
CREATE FUNCTION {schema}.requeue_dead_letters(message_ids uuid[], topic_regex text, cut timestamptz)
RETURNS SETOF uuid
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS $$
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
    RETURNING m.message_id
$$;
REVOKE EXECUTE ON FUNCTION {schema}.requeue_dead_letters(uuid[], text, timestamptz) FROM PUBLIC;

CREATE FUNCTION {schema}.purge_dead_letters(message_ids uuid[], topic_regex text, cut timestamptz, max_rows integer)
RETURNS SETOF uuid
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS $$
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
    RETURNING m.message_id
$$;
REVOKE EXECUTE ON FUNCTION {schema}.purge_dead_letters(uuid[], text, timestamptz, integer) FROM PUBLIC;
