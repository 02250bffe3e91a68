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
CREATE INDEX messages_dead_letters_by_id_idx ON {schema}.messages (id)
    WHERE dead_lettered_at IS NOT NULL;
