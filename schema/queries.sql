-- Every query the relay and the CLI run, once each. `-- name: x` starts query x.
-- {schema} is the quoted schema identifier; %(name)s are bound parameters.

-- name: schema_version
SELECT max(version) FROM {schema}.schema_version;

-- name: claim_heads
-- The batch: pending, due rows that are the first undispatched row of their key
-- (keyless rows always qualify), in enqueue order. FOR UPDATE SKIP LOCKED lets several
-- relays claim side by side without waiting on each other; the locks are held by the
-- claiming transaction until the outcome is recorded, so a relay that dies releases
-- its rows at once. A row locked by another relay is still undispatched, so the
-- NOT EXISTS below keeps every later row of its key out of everyone's batch.
SELECT m.id, m.message_id, m.topic, m.key, m.payload, m.content_type,
       NULLIF(m.headers, '{{}}'::jsonb) AS headers,  -- most rows have none: skip decoding them
       m.attempts, m.created_at
FROM {schema}.messages AS m
WHERE m.dispatched_at IS NULL
  AND m.dead_lettered_at IS NULL
  AND (m.next_attempt_at IS NULL OR m.next_attempt_at <= clock_timestamp())
  AND (m.key IS NULL OR NOT EXISTS (
        SELECT 1 FROM {schema}.messages AS p
        WHERE p.key = m.key
          AND p.id < m.id
          AND p.dispatched_at IS NULL
          AND (p.dead_lettered_at IS NULL OR %(hold_dead_letters)s)))
ORDER BY m.id
LIMIT %(limit)s
FOR UPDATE OF m SKIP LOCKED;

-- name: follower_candidates
-- Later undispatched rows of keys whose head this transaction holds, so that a busy
-- key moves more than one message per batch. The caller keeps, per key, only the
-- unbroken run of due rows after the head; anything after a gap waits.
SELECT m.id, m.key, m.dead_lettered_at IS NOT NULL AS dead,
       (m.next_attempt_at IS NULL OR m.next_attempt_at <= clock_timestamp()) AS due
FROM {schema}.messages AS m
JOIN unnest(%(keys)s::text[], %(head_ids)s::bigint[]) AS h(key, head_id)
  ON m.key = h.key AND m.id > h.head_id
WHERE m.dispatched_at IS NULL
ORDER BY m.id
LIMIT %(limit)s;

-- name: claim_ids
SELECT m.id, m.message_id, m.topic, m.key, m.payload, m.content_type,
       NULLIF(m.headers, '{{}}'::jsonb) AS headers,  -- most rows have none: skip decoding them
       m.attempts, m.created_at
FROM {schema}.messages AS m
WHERE m.id = ANY(%(ids)s::bigint[])
  AND m.dispatched_at IS NULL
  AND m.dead_lettered_at IS NULL
ORDER BY m.id
FOR UPDATE OF m SKIP LOCKED;

-- name: mark_dispatched
-- Every acked row of the batch in one statement, after the broker acknowledged it.
UPDATE {schema}.messages
SET dispatched_at = clock_timestamp(), attempts = attempts + 1
WHERE id = ANY(%(ids)s::bigint[]);

-- name: record_outcomes
-- The rows that were not acked, in one statement:
-- `retry` rows wait for next_attempt_at, `wait` rows
-- too but without spending an attempt (their broker was unreachable), `dead` rows are
-- dead-lettered with their reason. Rows the batch did not attempt are
-- not listed and stay as they were.
UPDATE {schema}.messages AS m SET
    attempts = m.attempts + CASE WHEN o.outcome = 'wait' THEN 0 ELSE 1 END,
    next_attempt_at = CASE WHEN o.outcome IN ('retry', 'wait')
                           THEN clock_timestamp() + make_interval(secs => o.delay_s) END,
    last_error = o.error,
    dead_lettered_at = CASE WHEN o.outcome = 'dead' THEN clock_timestamp() END,
    dead_letter_reason = CASE WHEN o.outcome = 'dead' THEN o.error END
FROM unnest(%(ids)s::bigint[], %(outcomes)s::text[], %(errors)s::text[], %(delays)s::float8[])
     AS o(id, outcome, error, delay_s)
WHERE m.id = o.id;

-- name: delete_expired
-- Retention: small batches so a large backlog of old rows never holds long locks
-- or produces one huge transaction.
DELETE FROM {schema}.messages
WHERE id IN (
    SELECT id FROM {schema}.messages
    WHERE dispatched_at < clock_timestamp() - make_interval(secs => %(retention_s)s)
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED);

-- name: heartbeat
INSERT INTO {schema}.relays (relay_id, hostname, pid, in_flight)
VALUES (%(relay_id)s, %(hostname)s, %(pid)s, %(in_flight)s)
ON CONFLICT (relay_id) DO UPDATE
SET heartbeat_at = now(), in_flight = excluded.in_flight;

-- name: forget_relay
DELETE FROM {schema}.relays WHERE relay_id = %(relay_id)s;

-- name: forget_stale_relays
DELETE FROM {schema}.relays WHERE heartbeat_at < now() - make_interval(secs => %(stale_s)s);

-- name: status_totals
SELECT
    count(*) FILTER (WHERE dead_lettered_at IS NULL) AS pending,
    count(*) FILTER (WHERE dead_lettered_at IS NOT NULL) AS dead_lettered,
    extract(epoch FROM clock_timestamp() - min(created_at) FILTER (WHERE dead_lettered_at IS NULL))
        AS oldest_pending_age_s
FROM {schema}.messages
WHERE dispatched_at IS NULL;

-- name: status_by_topic
SELECT topic,
    count(*) FILTER (WHERE dead_lettered_at IS NULL) AS pending,
    count(*) FILTER (WHERE dead_lettered_at IS NOT NULL) AS dead_lettered,
    extract(epoch FROM clock_timestamp() - min(created_at) FILTER (WHERE dead_lettered_at IS NULL))
        AS oldest_pending_age_s
FROM {schema}.messages
WHERE dispatched_at IS NULL
GROUP BY topic
ORDER BY topic;

-- name: status_dispatched
SELECT count(*) AS dispatched FROM {schema}.messages WHERE dispatched_at IS NOT NULL;

-- name: status_relays
SELECT relay_id, hostname, pid, started_at, heartbeat_at, in_flight,
       extract(epoch FROM now() - heartbeat_at) AS heartbeat_age_s
FROM {schema}.relays
ORDER BY started_at;

-- name: dead_letters_list
SELECT message_id, topic, key, attempts, created_at, dead_lettered_at, dead_letter_reason
FROM {schema}.messages
WHERE dead_lettered_at IS NOT NULL
  AND (%(topic_like)s::text IS NULL OR topic LIKE %(topic_like)s)
ORDER BY id
LIMIT %(limit)s;

-- name: dead_letters_requeue
-- Back to pending with a fresh attempt budget; the reason moves to last_error so the
-- history is not lost. Keeps its id, so it sorts before later messages of its key.
UPDATE {schema}.messages
SET dead_lettered_at = NULL,
    dead_letter_reason = NULL,
    last_error = 'requeued after dead letter: ' || dead_letter_reason,
    attempts = 0,
    next_attempt_at = NULL
WHERE dead_lettered_at IS NOT NULL
  AND (%(all)s OR message_id = ANY(%(message_ids)s::uuid[])
       OR (%(topic_like)s::text IS NOT NULL AND topic LIKE %(topic_like)s))
RETURNING message_id;

-- name: pending_gauge
-- For the lag metrics: walks only the pending index.
SELECT count(*) AS pending,
       extract(epoch FROM clock_timestamp() - min(created_at)) AS oldest_pending_age_s
FROM {schema}.messages
WHERE dispatched_at IS NULL AND dead_lettered_at IS NULL;

-- name: oldest_transaction
-- The oldest open transaction in this database: it holds back vacuum of the outbox
-- table, so dead tuples pile up and claims slow down. Without pg_read_all_stats a
-- role sees only its own sessions' xact_start.
SELECT pid, state, extract(epoch FROM clock_timestamp() - xact_start) AS age_s
FROM pg_stat_activity
WHERE xact_start IS NOT NULL AND pid <> pg_backend_pid() AND datname = current_database()
ORDER BY xact_start
LIMIT 1;
