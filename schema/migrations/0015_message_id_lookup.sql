-- Version 15: a dead letter found by its message id through an index.
--
-- Until now only dispatched rows were indexed by message id (0011_receipts.sql); a dead
-- letter was found by reading the dead letters' indexes through (~0.2 s among 100,000,
-- benchmarks/console_pages.py) for `status --message-id`, the console's lookup, and
-- every "these ids" selection of `dead-letters requeue|purge` and the console's
-- confirmation. A row gets its entry when it is dead-lettered, never at enqueue or at a
-- mark: the write path pays nothing for it.
--
-- Hash, not btree: a hash index answers `message_id = ...` and nothing else, so no other
-- query over dead letters (the console's pages and counts, the claim's probe under
-- hold) can be planned through it; and its entries are a 4-byte hash, not the 16-byte id.
--
-- Pending rows get no such index: one costs every enqueue an entry, measured between
-- nothing and a quarter of enqueue throughput at 16 clients with a 1,000,000-row backlog
-- (benchmarks/results/optional_index_2026-12-07.txt; docs/how-to/console.md describes the
-- optional index for operators who want the lookup fast at any backlog).
--
-- IF NOT EXISTS: a large outbox may build it beforehand with CREATE INDEX CONCURRENTLY
-- under this name (docs/how-to/upgrades.md), sparing enqueues the wait while it builds.
-- A concurrent build that failed leaves an invalid index of that name, which IF NOT
-- EXISTS would take as built: refused, with what to do.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_index
               WHERE indexrelid = to_regclass('{schema}.messages_dead_letters_message_id_idx')
                 AND NOT indisvalid) THEN
        RAISE EXCEPTION 'index messages_dead_letters_message_id_idx is invalid (a CREATE INDEX CONCURRENTLY that failed): drop it and upgrade again';
    END IF;
END
$$;
CREATE INDEX IF NOT EXISTS messages_dead_letters_message_id_idx ON {schema}.messages USING hash (message_id)
    WHERE dead_lettered_at IS NOT NULL;

-- The operator's actions on dead letters (0014), so that chosen ids are probes of the
-- index above: REPLACE keeps their owner and grants.
-- PL/pgSQL with custom plans: each call's
-- statement is planned with its values, so a NULL filter drops out and chosen ids are
-- probes of messages_dead_letters_message_id_idx; a LANGUAGE sql body is planned without
-- them, and read every dead letter for three ids.
CREATE OR REPLACE FUNCTION {schema}.requeue_dead_letters(message_ids uuid[], topic_regex text, cut timestamptz)
RETURNS SETOF uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog SET plan_cache_mode = force_custom_plan AS $$
BEGIN
    RETURN QUERY
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
    RETURNING m.message_id;
END
$$;

CREATE OR REPLACE FUNCTION {schema}.purge_dead_letters(message_ids uuid[], topic_regex text, cut timestamptz, max_rows integer)
RETURNS SETOF uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog SET plan_cache_mode = force_custom_plan AS $$
BEGIN
    RETURN QUERY
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
    RETURNING m.message_id;
END
$$;
