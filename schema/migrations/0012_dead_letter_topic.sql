-- Version 12: dead-letter topics (issue 22).
--
-- With `dead_letters.publish_to` configured the relay publishes each dead letter to a
-- dead-letter topic (engine/dead_letter_topic.py) and notes here when the broker acked
-- it; the dead letter stays in the table for requeue. NULL: not published yet, so a
-- dead-letter topic that was down, or configured later, still gets it. A requeue sets
-- it back to NULL: dead-lettered again, it is published again.
ALTER TABLE {schema}.messages ADD COLUMN dead_letter_published_at timestamptz;

-- The dead letters of the versions before this one are not news for a topic configured
-- from now on: they count as published (`dead-letters requeue` puts one back in play).
UPDATE {schema}.messages SET dead_letter_published_at = dead_lettered_at
WHERE dead_lettered_at IS NOT NULL;

-- What the publisher takes, oldest first. Partial: a row has an entry only between its
-- dead-lettering and that publish; an enqueue or a mark never writes one.
CREATE INDEX IF NOT EXISTS messages_dead_letters_unpublished_idx ON {schema}.messages (id)
    WHERE dead_lettered_at IS NOT NULL AND dead_letter_published_at IS NULL;
