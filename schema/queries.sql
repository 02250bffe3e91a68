-- Every query the relay and the CLI run, once each. `-- name: x` starts query x.
-- {schema} is the quoted schema identifier; %(name)s are bound parameters.

-- name: schema_version
SELECT max(version) FROM {schema}.schema_version;

-- name: outbox_schemas
-- The schemas of this database that hold an outbox (its version table and its
-- messages), named when the configured schema holds none: a typo in database.schema
-- should be answered with the outbox that exists, not with "install one".
SELECT n.nspname FROM pg_namespace AS n
WHERE EXISTS (SELECT 1 FROM pg_class AS c
              WHERE c.relnamespace = n.oid AND c.relname = 'schema_version' AND c.relkind = 'r')
  AND EXISTS (SELECT 1 FROM pg_class AS c
              WHERE c.relnamespace = n.oid AND c.relname = 'messages' AND c.relkind IN ('r', 'p'))
ORDER BY n.nspname;

-- name: batch_settings
-- The first statement of every batch's transaction, for that transaction only
-- (set_config(..., true), as SET LOCAL): plan the claim on its indexes whatever the
-- table's statistics (OutboxStore.claim says why), end the session of a relay that
-- hangs mid-batch (%(idle_ms)s NULL: the server's setting stays), and end a statement
-- (a lock wait) before the relay's own deadline on answers gives the connection up
-- (database.query_timeout): the server then frees the backend itself, where a
-- connection given up client-side would leave it waiting (%(statement_ms)s NULL: the
-- server's setting stays; a COMMIT waiting for a synchronous standby is not covered:
-- the relay's cancel request ends that wait, connections.py). Never for the
-- session: behind a pooler in transaction mode (pgbouncer) a server session serves
-- other clients between two transactions, which would inherit them (an application
-- without sequential scans), and the relay's next transaction may land on a server
-- session that never had them.
SELECT set_config('jit', 'off', true),
       set_config('max_parallel_workers_per_gather', '0', true),
       set_config('enable_seqscan', 'off', true),
       set_config('enable_bitmapscan', 'off', true),
       set_config('idle_in_transaction_session_timeout',
                  coalesce(%(idle_ms)s::text, current_setting('idle_in_transaction_session_timeout')), true),
       set_config('statement_timeout',
                  coalesce(%(statement_ms)s::text, current_setting('statement_timeout')), true);

-- name: gauge_settings
-- For the rest of this transaction only (see batch_settings): no JIT compilation for
-- a count over a large backlog (the pending gauge), and the server ends a count that
-- takes longer than %(statement_ms)s ms (half the relay's query_timeout): the gauge
-- is skipped that once and the connection stays, so the heartbeat and retention go
-- on, where the relay's deadline on answers would give the connection up each time.
SELECT set_config('jit', 'off', true),
       set_config('statement_timeout', %(statement_ms)s::text, true);

-- name: walk_keys
-- The claim, step 1: which keys have a publishable head? A skip scan over the keyed
-- pending index: each step is one index descent to the first pending row of the next
-- key, so a key costs the same whatever its backlog, and rows held back behind a head
-- that waits (retry time, broker outage) are never read. Walks in key order from
-- %(after)s (the relay's rotating cursor, so every key gets its turn) and stops after
-- %(limit)s due heads or %(max_visits)s keys, whichever comes first. Returns every key
-- visited; the last one is where the next walk starts. A head is due when its retry
-- time has come, under `hold` no dead letter of its key comes before it, and it lies
-- below the drain gate (settings.drain_gate: after a switch from the WAL source, no
-- keyed row enqueued after it goes before its key's messages still in the slot).
WITH RECURSIVE walk(visited, found, key, id, due) AS (
    (SELECT 1, m.due::int, m.key, m.id, m.due
     FROM (SELECT m.key, m.id,
                  coalesce(m.next_attempt_at <= clock_timestamp(), true)
                  AND NOT (%(hold_dead_letters)s AND EXISTS (
                        SELECT 1 FROM {schema}.messages AS d
                        WHERE d.key COLLATE "C" = m.key COLLATE "C" AND d.id < m.id
                          AND d.dead_lettered_at IS NOT NULL))
                  AND m.id < (SELECT coalesce(s.drain_gate, 9223372036854775807) FROM {schema}.settings AS s) AS due
           FROM {schema}.messages AS m
           WHERE m.key COLLATE "C" > %(after)s::text
             AND m.key IS NOT NULL AND m.dispatched_at IS NULL AND m.dead_lettered_at IS NULL
           ORDER BY m.key COLLATE "C", m.id
           LIMIT 1) AS m)
    UNION ALL
    SELECT w.visited + 1, w.found + n.due::int, n.key, n.id, n.due
    FROM walk AS w
    CROSS JOIN LATERAL (
        SELECT m.key, m.id,
               coalesce(m.next_attempt_at <= clock_timestamp(), true)
               AND NOT (%(hold_dead_letters)s AND EXISTS (
                     SELECT 1 FROM {schema}.messages AS d
                     WHERE d.key COLLATE "C" = m.key COLLATE "C" AND d.id < m.id
                       AND d.dead_lettered_at IS NOT NULL))
               AND m.id < (SELECT coalesce(s.drain_gate, 9223372036854775807) FROM {schema}.settings AS s) AS due
        FROM {schema}.messages AS m
        WHERE m.key COLLATE "C" > w.key COLLATE "C"
          AND m.key IS NOT NULL AND m.dispatched_at IS NULL AND m.dead_lettered_at IS NULL
        ORDER BY m.key COLLATE "C", m.id
        LIMIT 1) AS n
    WHERE w.visited < %(max_visits)s AND w.found < %(limit)s
      -- a walk that wrapped round stops where the previous one began
      AND (%(until)s::text IS NULL OR w.key COLLATE "C" < %(until)s::text)
)
SELECT key, id, due FROM walk;

-- name: claim_runs
-- The claim, step 2: lock the heads found by walk_keys (FOR UPDATE SKIP LOCKED: a head
-- another relay holds is skipped, and with it its whole key), then read and lock each
-- locked key's run: its pending rows from the head on, in enqueue order. Every relay
-- finds the same head for a key, so normally nobody else holds a row of the run and
-- the run's locks never wait. They are there for the one way a key's head can move
-- backwards while a run of it is in flight: a dead letter requeued under `release`
-- (its id is before the run). The relay that takes the requeued row as head then
-- waits for the in-flight batch to commit and finds its rows dispatched (PostgreSQL
-- re-checks a row's WHERE after waiting for its lock), instead of publishing them a
-- second time. Under `hold`, a key with a dead letter before its head is skipped, and
-- a run stops before the key's next dead letter. The caller cuts each run at its
-- first row not yet due. Neither a head nor a run reaches the drain gate (walk_keys).
-- At most %(max_heads)s heads are locked, the oldest first (a walk that saw every key
-- leaves the other workers their share of them: OutboxStore._claim_keyed).
WITH gate AS (
    SELECT coalesce(s.drain_gate, 9223372036854775807) AS below FROM {schema}.settings AS s
), heads AS (
    SELECT m.id, m.key,
           CASE WHEN %(hold_dead_letters)s THEN (
               SELECT min(d.id) FROM {schema}.messages AS d
               WHERE d.key COLLATE "C" = m.key COLLATE "C" AND d.id > m.id
                 AND d.dead_lettered_at IS NOT NULL) END AS stop_id
    FROM {schema}.messages AS m
    WHERE m.id = ANY(%(head_ids)s::bigint[])
      AND m.dispatched_at IS NULL AND m.dead_lettered_at IS NULL
      AND coalesce(m.next_attempt_at <= clock_timestamp(), true)
      AND NOT (%(hold_dead_letters)s AND EXISTS (
            SELECT 1 FROM {schema}.messages AS d
            WHERE d.key COLLATE "C" = m.key COLLATE "C" AND d.id < m.id
              AND d.dead_lettered_at IS NOT NULL))
      AND m.id < (SELECT gate.below FROM gate)
    ORDER BY m.id
    LIMIT %(max_heads)s
    FOR UPDATE OF m SKIP LOCKED
), runs AS (
    SELECT r.*
    FROM heads AS h
    CROSS JOIN LATERAL (
        SELECT m.id, m.message_id, m.topic, m.key, m.payload, m.content_type,
               NULLIF(m.headers, '{{}}'::jsonb) AS headers,  -- most rows have none: skip decoding them
               -- created_at within what Python can load (a row written by hand with
               -- 'infinity' would fail every claim that reads it, and crash-loop the relay)
               m.attempts, least(greatest(m.created_at, '0001-01-02'), '9999-12-30') AS created_at, coalesce(m.next_attempt_at <= clock_timestamp(), true) AS due,
               octet_length(m.payload) AS size  -- from the TOAST header: the payload is not read
        FROM {schema}.messages AS m
        WHERE m.key COLLATE "C" = h.key COLLATE "C" AND m.id >= h.id
          AND (h.stop_id IS NULL OR m.id < h.stop_id)
          AND m.id < (SELECT gate.below FROM gate)
          AND m.key IS NOT NULL AND m.dispatched_at IS NULL AND m.dead_lettered_at IS NULL
        ORDER BY m.key COLLATE "C", m.id
        LIMIT %(per_key)s
        FOR UPDATE OF m) AS r
)
-- The byte budget (see claim_keyless); rows come in id order, so a cut keeps each
-- key's share a prefix of its run.
SELECT r.id, r.message_id, r.topic, r.key,
       CASE WHEN r.size <= %(max_payload)s::bigint AND r.bytes_before < %(max_bytes)s::bigint THEN r.payload END,
       r.content_type, r.headers, r.attempts, r.created_at, r.size, r.due
FROM (SELECT runs.*,
             coalesce(sum(CASE WHEN size <= %(max_payload)s::bigint THEN size ELSE 0 END)
                      OVER (ORDER BY id ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS bytes_before
      FROM runs) AS r
ORDER BY r.id;

-- name: claim_keyless
-- Keyless rows have no order to keep: any due one may go, each locked on its own.
-- Their index is ordered by when they are due (a row never tried is due when it was
-- created, so enqueue order; a retried one at its retry time, so it takes its turn
-- among the new ones instead of starving behind them), and rows waiting for a retry
-- or for a broker in outage lie past the range this reads and are never walked.
--
-- A claim carries at most max_bytes of payload (relay.max_batch_bytes), so a
-- few huge rows cannot take the relay's memory with them: payloads are returned while
-- the bytes of the rows before stay under the budget (the first row always, whatever
-- its size), and NULL after that; the relay drops those rows from the batch untouched.
-- A payload over max_payload (relay.max_payload_bytes) is never returned either:
-- its size alone (octet_length reads the TOAST header, not the value) is enough to
-- dead-letter it, so one huge row cannot crash the relay on every restart.
WITH claimed AS (
    SELECT m.id, m.message_id, m.topic, m.key, m.payload, m.content_type,
           NULLIF(m.headers, '{{}}'::jsonb) AS headers,
           m.attempts, least(greatest(m.created_at, '0001-01-02'), '9999-12-30') AS created_at,  -- loadable: see claim_runs
           octet_length(m.payload) AS size,
           coalesce(m.next_attempt_at, m.created_at) AS due_at
    FROM {schema}.messages AS m
    WHERE m.key IS NULL AND m.dispatched_at IS NULL AND m.dead_lettered_at IS NULL
      -- statement_timestamp(), not clock_timestamp(): stable, so the index range ends there
      AND coalesce(m.next_attempt_at, m.created_at) <= statement_timestamp()
    ORDER BY coalesce(m.next_attempt_at, m.created_at), m.id
    LIMIT %(limit)s
    FOR UPDATE OF m SKIP LOCKED
)
SELECT c.id, c.message_id, c.topic, c.key,
       CASE WHEN c.size <= %(max_payload)s::bigint AND c.bytes_before < %(max_bytes)s::bigint THEN c.payload END,
       c.content_type, c.headers, c.attempts, c.created_at, c.size
FROM (SELECT claimed.*,
             coalesce(sum(CASE WHEN size <= %(max_payload)s::bigint THEN size ELSE 0 END)
                      OVER (ORDER BY due_at, id ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS bytes_before
      FROM claimed) AS c
ORDER BY c.due_at, c.id;

-- name: mark_dispatched
-- Every acked row of the batch in one statement, after the broker acknowledged it.
UPDATE {schema}.messages
SET dispatched_at = clock_timestamp(), attempts = attempts + 1
WHERE id = ANY(%(ids)s::bigint[]);

-- name: mark_dispatched_receipts
-- mark_dispatched with each row's receipt (where the broker put it, relay.receipts):
-- %(receipts)s is one text, the receipts in the order of %(ids)s, one per line, an
-- empty line where there is none. One text, not an array: psycopg spent 11-14 µs per
-- element dumping a list of strings, ten times what the rest of the mark costs the
-- relay (a JSON text holds no raw line break, engine/dispatch.py).
UPDATE {schema}.messages AS m
SET dispatched_at = clock_timestamp(), attempts = m.attempts + 1, receipt = nullif(r.receipt, '')::jsonb
FROM unnest(%(ids)s::bigint[], string_to_array(%(receipts)s::text, E'\n')) AS r(id, receipt)
WHERE m.id = r.id;

-- name: mark_dispatched_feeding
-- mark_dispatched_receipts, and a `delivered` outcome for the rows of %(feed_ids)s (their
-- topic is in outcomes.delivered), in the same statement: the outcome exists exactly when
-- the mark committed. Only the fed rows' payloads come out of the UPDATE.
WITH marked AS (
    UPDATE {schema}.messages AS m
    SET dispatched_at = clock_timestamp(), attempts = m.attempts + 1, receipt = nullif(r.receipt, '')::jsonb
    FROM unnest(%(ids)s::bigint[], string_to_array(%(receipts)s::text, E'\n')) AS r(id, receipt)
    WHERE m.id = r.id
    RETURNING m.id, m.message_id, m.topic, m.key, m.attempts, m.content_type, m.headers, m.created_at,
              m.receipt, CASE WHEN m.id = ANY(%(feed_ids)s::bigint[]) THEN m.payload END AS payload)
INSERT INTO {schema}.outcomes
    (message_id, topic, key, outcome, attempts, payload, content_type, headers, enqueued_at, receipt)
SELECT message_id, topic, key, 'delivered', attempts, payload, content_type, headers, created_at, receipt
FROM marked
WHERE payload IS NOT NULL
ORDER BY id;

-- name: delete_dispatched
-- relay.retention 0s: the acked rows are deleted where they would be marked. Nothing is
-- kept to replay anyway, and a DELETE writes no new row version and no index entries
-- (benchmarks/sql_floor.py, 2026-12-07: claim + this delete 9.2 us of PostgreSQL CPU a
-- message keyless, against 23.7 for claim + mark_dispatched_receipts).
DELETE FROM {schema}.messages
WHERE id = ANY(%(ids)s::bigint[]);

-- name: delete_dispatched_feeding
-- delete_dispatched, with mark_dispatched_feeding's `delivered` outcomes.
WITH deleted AS (
    DELETE FROM {schema}.messages
    WHERE id = ANY(%(ids)s::bigint[])
    RETURNING id, message_id, topic, key, attempts + 1 AS attempts, content_type, headers, created_at,
              CASE WHEN id = ANY(%(feed_ids)s::bigint[]) THEN payload END AS payload)
INSERT INTO {schema}.outcomes (message_id, topic, key, outcome, attempts, payload, content_type, headers, enqueued_at)
SELECT message_id, topic, key, 'delivered', attempts, payload, content_type, headers, created_at
FROM deleted
WHERE payload IS NOT NULL
ORDER BY id;

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

-- name: record_outcomes_feeding
-- record_outcomes for a batch with dead letters (outcomes.dead_lettered): each gets its
-- `dead_lettered` outcome in the same statement, so the outcome exists exactly when the
-- dead letter committed. Only the dead rows' payloads come out of the UPDATE. A batch
-- without one takes record_outcomes: no outcome to write, and a relay role not yet
-- granted the outcomes table (an upgrade before its GRANTs) still records retries.
WITH recorded AS (
    UPDATE {schema}.messages AS m SET
        attempts = m.attempts + CASE WHEN o.outcome = 'wait' THEN 0 ELSE 1 END,
        next_attempt_at = CASE WHEN o.outcome IN ('retry', 'wait')
                               THEN clock_timestamp() + make_interval(secs => o.delay_s) END,
        last_error = o.error,
        dead_lettered_at = CASE WHEN o.outcome = 'dead' THEN clock_timestamp() END,
        dead_letter_reason = CASE WHEN o.outcome = 'dead' THEN o.error END
    FROM unnest(%(ids)s::bigint[], %(outcomes)s::text[], %(errors)s::text[], %(delays)s::float8[])
         AS o(id, outcome, error, delay_s)
    WHERE m.id = o.id
    RETURNING m.id, m.message_id, m.topic, m.key, m.attempts, m.dead_letter_reason, m.content_type,
              m.headers, m.created_at, CASE WHEN o.outcome = 'dead' THEN m.payload END AS payload)
INSERT INTO {schema}.outcomes
    (message_id, topic, key, outcome, reason, attempts, payload, content_type, headers, enqueued_at)
SELECT message_id, topic, key, 'dead_lettered', dead_letter_reason, attempts, payload, content_type, headers,
       created_at
FROM recorded
WHERE payload IS NOT NULL
ORDER BY id;

-- name: delete_expired
-- Retention: small batches so a large backlog of old rows never holds long locks
-- or produces one huge transaction.
DELETE FROM {schema}.messages
WHERE id IN (
    SELECT id FROM {schema}.messages
    WHERE dispatched_at < clock_timestamp() - make_interval(secs => %(retention_s)s)
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED);

-- name: delete_expired_wal_receipts
-- relay.wal.receipts: receipts of streamed messages older than relay.retention, oldest
-- first, in small batches (their dispatched_at index).
DELETE FROM {schema}.wal_receipts
WHERE ctid IN (
    SELECT ctid FROM {schema}.wal_receipts
    WHERE dispatched_at < clock_timestamp() - make_interval(secs => %(retention_s)s)
    ORDER BY dispatched_at
    LIMIT %(limit)s);

-- name: delete_expired_outcomes
-- outcomes.retention: outcomes the application left, oldest first, in small batches;
-- rows an application transaction holds are left for the next round. How many were
-- dead letters: a compensation that will now never run, which the relay warns about.
WITH deleted AS (
    DELETE FROM {schema}.outcomes
    WHERE id IN (
        SELECT id FROM {schema}.outcomes
        WHERE recorded_at < clock_timestamp() - make_interval(secs => %(retention_s)s)
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED)
    RETURNING outcome)
SELECT count(*), count(*) FILTER (WHERE outcome = 'dead_lettered') FROM deleted;

-- name: heartbeat
INSERT INTO {schema}.relays (relay_id, hostname, pid, in_flight, version, source, brokers)
VALUES (%(relay_id)s, %(hostname)s, %(pid)s, %(in_flight)s, %(version)s, %(source)s, %(brokers)s)
ON CONFLICT (relay_id) DO UPDATE
SET heartbeat_at = now(), in_flight = excluded.in_flight, version = excluded.version, source = excluded.source,
    brokers = excluded.brokers;

-- name: relay_sample
-- What the relay did since its previous heartbeat, for the console's chart; and the
-- samples older than the chart's hour go (one indexed range, a few rows each time).
WITH expired AS (
    DELETE FROM {schema}.relay_samples WHERE sampled_at < now() - interval '1 hour')
INSERT INTO {schema}.relay_samples (relay_id, published, failed, dead_lettered, oldest_pending_age_s)
VALUES (%(relay_id)s, %(published)s, %(failed)s, %(dead_lettered)s, %(oldest_pending_age_s)s);

-- name: relay_samples_granted
-- Whether this role may write samples now (a role refused them asks each heartbeat, and
-- starts sampling once granted, without a restart): a catalog read, never an error in
-- the server's log.
-- Each privilege on its own: a list ('INSERT, DELETE') is true when any one is held. The
-- sample's DELETE of old rows reads them, so SELECT too.
SELECT coalesce(bool_and(has_table_privilege(c.oid, 'INSERT') AND has_table_privilege(c.oid, 'DELETE')
                         AND has_table_privilege(c.oid, 'SELECT')), false)
FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s AND c.relname = 'relay_samples';

-- name: forget_relay
DELETE FROM {schema}.relays WHERE relay_id = %(relay_id)s;

-- name: forget_stale_relays
DELETE FROM {schema}.relays WHERE heartbeat_at < now() - make_interval(secs => %(stale_s)s);

-- name: status_totals
SELECT
    count(*) FILTER (WHERE dead_lettered_at IS NULL) AS pending,
    count(*) FILTER (WHERE dead_lettered_at IS NOT NULL) AS dead_lettered,
    extract(epoch FROM clock_timestamp() - min(created_at) FILTER (WHERE dead_lettered_at IS NULL AND isfinite(created_at)))
        AS oldest_pending_age_s
FROM {schema}.messages
WHERE dispatched_at IS NULL;

-- name: status_by_topic
SELECT topic,
    count(*) FILTER (WHERE dead_lettered_at IS NULL) AS pending,
    count(*) FILTER (WHERE dead_lettered_at IS NOT NULL) AS dead_lettered,
    extract(epoch FROM clock_timestamp() - min(created_at) FILTER (WHERE dead_lettered_at IS NULL AND isfinite(created_at)))
        AS oldest_pending_age_s
FROM {schema}.messages
WHERE dispatched_at IS NULL
GROUP BY topic
ORDER BY topic;

-- name: status_dispatched
SELECT count(*) AS dispatched FROM {schema}.messages WHERE dispatched_at IS NOT NULL;

-- name: message_by_id_settled
-- `status --message-id` and the console's lookup: the rows of a message id (a replay's
-- copies share it) that left the backlog, each part one probe of its message-id index,
-- its WHERE the index's: dispatched rows (messages_dispatched_message_id_idx) and dead
-- letters (messages_dead_letters_message_id_idx, version 15). The pending rows are
-- message_by_id_pending's: the caller reads both (operations/message_lookup.py).
SELECT * FROM (
    SELECT id, topic, key, created_at, attempts, next_attempt_at, last_error, dispatched_at,
           dead_lettered_at, dead_letter_reason, receipt,
           (SELECT h.value FROM jsonb_each_text(headers) AS h WHERE lower(h.key) = 'traceparent' LIMIT 1)
    FROM {schema}.messages WHERE message_id = %(message_id)s AND dispatched_at IS NOT NULL
    UNION ALL
    SELECT id, topic, key, created_at, attempts, next_attempt_at, last_error, dispatched_at,
           dead_lettered_at, dead_letter_reason, receipt,
           (SELECT h.value FROM jsonb_each_text(headers) AS h WHERE lower(h.key) = 'traceparent' LIMIT 1)
    FROM {schema}.messages WHERE message_id = %(message_id)s AND dead_lettered_at IS NOT NULL) AS rows
ORDER BY id;

-- name: message_by_id_pending
-- The pending rows of a message id, keyed and keyless, each part's WHERE the claim's
-- index's, so that with sequential scans off no part reads the whole table. No pending
-- message-id index exists unless the operator built the optional one
-- (messages_pending_message_id_idx, docs/how-to/console.md: it costs every enqueue): then each part
-- probes it; without it each reads its claim index through, a cost that grows with the
-- backlog (0.75 s at 1,000,000 pending, benchmarks/console_pages.py), never with what
-- retention keeps. The console asks it apart, after its page has answered.
SELECT * FROM (
    SELECT id, topic, key, created_at, attempts, next_attempt_at, last_error, dispatched_at,
           dead_lettered_at, dead_letter_reason, receipt,
           (SELECT h.value FROM jsonb_each_text(headers) AS h WHERE lower(h.key) = 'traceparent' LIMIT 1)
    FROM {schema}.messages
    WHERE message_id = %(message_id)s AND key IS NOT NULL AND dispatched_at IS NULL AND dead_lettered_at IS NULL
    UNION ALL
    SELECT id, topic, key, created_at, attempts, next_attempt_at, last_error, dispatched_at,
           dead_lettered_at, dead_letter_reason, receipt,
           (SELECT h.value FROM jsonb_each_text(headers) AS h WHERE lower(h.key) = 'traceparent' LIMIT 1)
    FROM {schema}.messages
    WHERE message_id = %(message_id)s AND key IS NULL AND dispatched_at IS NULL AND dead_lettered_at IS NULL) AS rows
ORDER BY id;

-- name: wal_receipts_by_id
-- A message the WAL source streamed has no row: its receipts (relay.wal.receipts), in
-- the shape of message_by_id's rows. Asked apart: a relay role granted before schema
-- version 13 may not read wal_receipts, and still looks up rows (message_lookup.py).
SELECT NULL::bigint, topic, key, NULL::timestamptz, 1, NULL::timestamptz, NULL::text, dispatched_at,
       NULL::timestamptz, NULL::text, receipt, NULL::text
FROM {schema}.wal_receipts WHERE message_id = %(message_id)s
ORDER BY dispatched_at;

-- name: status_relays
SELECT relay_id, hostname, pid, started_at, heartbeat_at, in_flight,
       extract(epoch FROM now() - heartbeat_at) AS heartbeat_age_s
FROM {schema}.relays
ORDER BY started_at;

-- name: status_behind_dead_letters
-- `status`: keys that have a dead letter and pending messages after it, and how many
-- such messages. Under dead_letter_policy hold they wait until the dead letter is
-- requeued or purged; under release they go as usual (status says which when it knows
-- the policy). Per key with a dead letter: its first from the dead letters' (key, id)
-- index, then one range of the claim's keyed index for what is pending after it (an
-- index-only count), as dead_letters_held_behind_selected: the cost grows with the
-- keys that have dead letters and the messages behind them, never with what retention
-- keeps.
WITH dead AS MATERIALIZED (
    SELECT key COLLATE "C" AS key, min(id) AS first_id
    FROM {schema}.messages
    WHERE dead_lettered_at IS NOT NULL AND key IS NOT NULL
    GROUP BY key COLLATE "C")
SELECT count(*) FILTER (WHERE b.pending > 0) AS keys, coalesce(sum(b.pending), 0)::bigint AS messages
FROM dead AS d
CROSS JOIN LATERAL (
    SELECT count(*) AS pending FROM {schema}.messages AS m
    WHERE m.key COLLATE "C" = d.key AND m.id > d.first_id
      AND m.key IS NOT NULL AND m.dispatched_at IS NULL AND m.dead_lettered_at IS NULL) AS b;

-- name: dead_letters_list
-- `dead-letters list`: the dead letters that match every filter given (NULL: any),
-- oldest first, through the dead letters' id index (with --key, their (key, id) one:
-- the key compared as that index sorts it, COLLATE "C").
SELECT message_id, topic, key, attempts, created_at, dead_lettered_at, dead_letter_reason
FROM {schema}.messages
WHERE dead_lettered_at IS NOT NULL
  AND (%(topic_regex)s::text IS NULL OR topic ~ %(topic_regex)s)
  AND (%(key)s::text IS NULL OR key COLLATE "C" = %(key)s)
  AND (%(since)s::timestamptz IS NULL OR dead_lettered_at >= %(since)s)
ORDER BY id
LIMIT %(limit)s;

-- name: dead_letters_of_message
-- `dead-letters show`: the dead letters of a message id (a replay's copy shares the
-- id, and may be dead-lettered too), without their payloads (console_payload reads one,
-- for --payload: a role may lack SELECT on the column). Through the dead letters'
-- index: the cost grows with the dead letters, never with what retention keeps.
SELECT id, message_id, topic, key, attempts, created_at, dead_lettered_at, dead_letter_reason,
       dead_letter_published_at, last_error, content_type, headers
FROM {schema}.messages
WHERE message_id = %(message_id)s AND dead_lettered_at IS NOT NULL
ORDER BY id;

-- name: requeue_dead_letters
-- `dead-letters requeue` and the console: the function (schema.sql) does it.
SELECT * FROM {schema}.requeue_dead_letters(%(message_ids)s, %(topic_regex)s, %(cut)s);

-- name: purge_dead_letters
SELECT * FROM {schema}.purge_dead_letters(%(message_ids)s, %(topic_regex)s, %(cut)s, %(max_rows)s);

-- name: dead_letters_requeue
-- The function's body (requeue_dead_letters, schema.sql), run as a statement by a role
-- granted before schema version 14 (operations/dead_letters.py): such a role holds
-- UPDATE on messages but not EXECUTE on the function.
-- Back to pending with a fresh attempt budget; the reason moves to last_error so the
-- history is not lost. Keeps its id, so it sorts before later messages of its key.
-- The selection (`dead-letters requeue` and `purge`, operations/dead_letters.py
-- Selection): dead letters that match every filter given (a NULL filter matches all);
-- the caller refuses a selection with no filter unless it was asked for with --all.
UPDATE {schema}.messages
SET dead_lettered_at = NULL,
    dead_letter_reason = NULL,
    dead_letter_published_at = NULL,
    last_error = 'requeued after dead letter: ' || dead_letter_reason,
    attempts = 0,
    next_attempt_at = NULL
WHERE dead_lettered_at IS NOT NULL
  AND (%(message_ids)s::uuid[] IS NULL OR message_id = ANY(%(message_ids)s))
  AND (%(topic_regex)s::text IS NULL OR topic ~ %(topic_regex)s)
  AND (%(cut)s::timestamptz IS NULL OR dead_lettered_at < %(cut)s)
RETURNING message_id;

-- name: dead_letter_topic_lock
-- One publisher at a time per outbox, whatever the replicas: the dead-letter topic gets
-- each key's dead letters in the order they were dead-lettered. Held by the transaction.
SELECT pg_try_advisory_xact_lock(hashtext(%(lock)s));

-- name: dead_letter_topic_take
-- Dead letters the dead-letter topic has not acked, oldest first, through their partial
-- index (engine/dead_letter_topic.py), locked; their sizes only: the caller takes the
-- rows that fit relay.max_batch_bytes (dead_letter_topic_rows), as the claim does.
SELECT id, octet_length(payload)
FROM {schema}.messages
WHERE dead_lettered_at IS NOT NULL AND dead_letter_published_at IS NULL
  AND NOT topic = ANY(%(resting)s::text[])  -- topics whose destination refuses copies, for now
ORDER BY id
LIMIT %(limit)s
FOR UPDATE SKIP LOCKED;

-- name: dead_letter_topic_rows
-- The rows taken, in id order. A payload over relay.max_payload_bytes stays in the
-- database: its size travels instead.
SELECT id, message_id, topic, key,
       CASE WHEN octet_length(payload) <= %(max_payload)s THEN payload END AS payload,
       content_type, headers, attempts, created_at, octet_length(payload) AS size,
       dead_lettered_at, dead_letter_reason
FROM {schema}.messages
WHERE id = ANY(%(ids)s)
ORDER BY id;

-- name: dead_letter_topic_published
UPDATE {schema}.messages
SET dead_letter_published_at = now()
WHERE id = ANY(%(ids)s) AND dead_lettered_at IS NOT NULL;

-- name: pending_gauge
-- For the lag metrics: keyed and keyless pending rows each through their own claim
-- index (a predicate the partial indexes match), never the rows retention keeps. Ages
-- over finite created_at only: 'infinity' (written by hand) cannot be subtracted.
SELECT sum(n) AS pending, max(age) AS oldest_pending_age_s
FROM (
    SELECT count(*) AS n, extract(epoch FROM clock_timestamp() - min(created_at) FILTER (WHERE isfinite(created_at))) AS age
    FROM {schema}.messages
    WHERE key IS NOT NULL AND dispatched_at IS NULL AND dead_lettered_at IS NULL
    UNION ALL
    SELECT count(*), extract(epoch FROM clock_timestamp() - min(created_at) FILTER (WHERE isfinite(created_at)))
    FROM {schema}.messages
    WHERE key IS NULL AND dispatched_at IS NULL AND dead_lettered_at IS NULL
) AS kinds;

-- name: oldest_transaction
-- The oldest open transaction in this database: it holds back vacuum of the outbox
-- table, so dead tuples pile up and claims slow down. Without pg_read_all_stats a
-- role sees only its own sessions' xact_start.
SELECT pid, state, extract(epoch FROM clock_timestamp() - xact_start) AS age_s
FROM pg_stat_activity
WHERE xact_start IS NOT NULL AND pid <> pg_backend_pid() AND datname = current_database()
ORDER BY xact_start
LIMIT 1;

-- name: skipped_wakeups
-- How many NOTIFYs committers have skipped so far (schema.sql, "Wakes the relay").
SELECT {schema}.skipped_wakeups();

-- name: dead_letters_cut
-- `dead-letters purge --older-than`: the cut, taken once, so that what is deleted is
-- what was counted and shown (however long the user takes to answer).
SELECT clock_timestamp() - make_interval(secs => %(older_than_s)s);

-- name: dead_letters_count_selected
-- How many dead letters `dead-letters purge` would delete (shown before it asks) and,
-- when ids are a filter (then there are at most that many), which: the command names
-- the ids it was given that it will not delete. Selection as in dead_letters_requeue.
SELECT count(*), array_agg(message_id) FILTER (WHERE %(message_ids)s::uuid[] IS NOT NULL)
FROM {schema}.messages
WHERE dead_lettered_at IS NOT NULL
  AND (%(message_ids)s::uuid[] IS NULL OR message_id = ANY(%(message_ids)s))
  AND (%(topic_regex)s::text IS NULL OR topic ~ %(topic_regex)s)
  AND (%(cut)s::timestamptz IS NULL OR dead_lettered_at < %(cut)s);

-- name: dead_letters_held_behind_selected
-- Pending messages of keys whose dead letter `dead-letters purge` would delete, later
-- than it: under dead_letter_policy hold they wait behind it, and go once it is gone,
-- unless a dead letter the purge keeps still stands before them. Per key the selection
-- holds: pending rows after its first selected dead letter and before its first kept
-- one, one range of the claim's keyed index (an index-only count), with one probe of
-- the dead letters' index per key for the kept one. Asked per pending row instead (the
-- shape before), it joined every pending keyed row to the dead letters: 0.5 s with
-- 1,000,000 pending and 100,000 dead letters (benchmarks/console_pages.py).
WITH selected AS MATERIALIZED (
    SELECT d.key, min(d.id) AS first_id
    FROM {schema}.messages AS d
    WHERE d.dead_lettered_at IS NOT NULL AND d.key IS NOT NULL
      AND (%(message_ids)s::uuid[] IS NULL OR d.message_id = ANY(%(message_ids)s))
      AND (%(topic_regex)s::text IS NULL OR d.topic ~ %(topic_regex)s)
      AND (%(cut)s::timestamptz IS NULL OR d.dead_lettered_at < %(cut)s)
    GROUP BY d.key),
held AS MATERIALIZED (
    SELECT s.key, s.first_id,
           (SELECT k.id FROM {schema}.messages AS k
            WHERE k.key COLLATE "C" = s.key COLLATE "C" AND k.dead_lettered_at IS NOT NULL
              AND NOT ((%(message_ids)s::uuid[] IS NULL OR k.message_id = ANY(%(message_ids)s))
                       AND (%(topic_regex)s::text IS NULL OR k.topic ~ %(topic_regex)s)
                       AND (%(cut)s::timestamptz IS NULL OR k.dead_lettered_at < %(cut)s))
            ORDER BY k.key COLLATE "C", k.id
            LIMIT 1) AS kept_id
    FROM selected AS s)
SELECT count(*)
FROM held AS h
JOIN {schema}.messages AS m
  ON m.key COLLATE "C" = h.key COLLATE "C" AND m.id > h.first_id
 AND m.id < coalesce(h.kept_id, 9223372036854775807)
WHERE m.key IS NOT NULL AND m.dispatched_at IS NULL AND m.dead_lettered_at IS NULL;

-- name: dead_letters_purge
-- The function's body (purge_dead_letters, schema.sql), for a role granted before
-- schema version 14, as dead_letters_requeue. Deletes up to max_rows of the selected
-- dead letters: the caller repeats until none is left, each batch its own short
-- transaction (no long lock on the outbox).
DELETE FROM {schema}.messages
WHERE dead_lettered_at IS NOT NULL
  AND id IN (SELECT id FROM {schema}.messages
             WHERE dead_lettered_at IS NOT NULL
               AND (%(message_ids)s::uuid[] IS NULL OR message_id = ANY(%(message_ids)s))
               AND (%(topic_regex)s::text IS NULL OR topic ~ %(topic_regex)s)
               AND (%(cut)s::timestamptz IS NULL OR dead_lettered_at < %(cut)s)
             LIMIT %(max_rows)s)
RETURNING message_id;

-- Replays (`outbox-relay replay`, outbox_relay/operations/replay.py). The selection: dispatched
-- rows, not copies made by an earlier replay, enqueued before the replay began, that
-- match every filter given (a NULL filter matches all).

-- name: replay_max_source_id
SELECT coalesce(max(id), 0), clock_timestamp() FROM {schema}.messages;

-- name: replay_open_transactions
-- The transactions that hold an id now (the snapshot's in-progress ones), taken after
-- replay_max_source_id's as_of: a relay batch that marked rows before as_of and has not
-- committed yet is among them (its claim locked rows, so it has an id).
SELECT pg_current_snapshot()::text;

-- name: replay_still_open
-- How many of those are still in progress (pg_xact_status needs no privilege).
SELECT count(*) FROM pg_snapshot_xip(%(snapshot)s::pg_snapshot) AS x WHERE pg_xact_status(x) = 'in progress';

-- name: replay_wal_period
-- When enqueue wrote into the WAL, as far as settings tell: a message published
-- straight from the WAL never was a row, so no replay can copy it. In wal mode, since
-- source_changed_at; in table mode switched back from wal, until source_changed_at (since
-- when, settings do not keep). Never switched: source_changed_at is still the settings
-- row's creation, the installed_at of the schema version that created it (8, or a
-- fresh install's later one): the same transaction, so the same now().
SELECT s.source,
       s.source_changed_at,
       s.source_changed_at > (SELECT min(v.installed_at) FROM {schema}.schema_version AS v WHERE v.version >= 8)
FROM {schema}.settings AS s;

-- name: replay_count
-- Per topic: the rows selected, and how many of them a copy skips (replay_copy_chunk).
SELECT topic, count(*), count(*) FILTER (WHERE octet_length(key) > %(max_key_bytes)s) FROM {schema}.messages
WHERE id > %(cursor)s AND id <= %(max_id)s AND dispatched_at <= %(as_of)s
  AND NOT (headers ? 'outbox-replay-id')
  AND (%(topic_regex)s::text IS NULL OR topic ~ %(topic_regex)s)
  AND (%(key)s::text IS NULL OR key = %(key)s)
  AND (%(since)s::timestamptz IS NULL OR created_at >= %(since)s)
  AND (%(until)s::timestamptz IS NULL OR created_at < %(until)s)
  AND (%(message_ids)s::uuid[] IS NULL OR message_id = ANY(%(message_ids)s))
GROUP BY topic ORDER BY topic;

-- name: replay_copy_chunk
-- One chunk, in its own short transaction: copies the next rows of the selection to
-- the tail of the outbox (new ids, so per-key order puts them after everything
-- enqueued before them), in source order, and moves the replay's cursor with them.
-- A chunk looks at ids up to window_end only, so that a narrow selection (one key,
-- a few message ids) in a large table still costs short transactions; the cursor
-- then moves to the window's end, or to the last row copied when the chunk is full.
-- A row whose key is over max_key_bytes (written before schema version 6, when a key
-- was 1,024 characters) is skipped and counted: a copy is a new message, and no new
-- message takes such a key (one the key index cannot hold fails the INSERT, and the
-- replay could never pass its chunk); the cursor moves past it like any row.
WITH source AS (
    SELECT id, message_id, topic, key, payload, content_type, headers FROM {schema}.messages
    WHERE id > %(cursor)s AND id <= %(window_end)s AND dispatched_at <= %(as_of)s
      AND NOT (headers ? 'outbox-replay-id')
      AND (%(topic_regex)s::text IS NULL OR topic ~ %(topic_regex)s)
      AND (%(key)s::text IS NULL OR key = %(key)s)
      AND (%(since)s::timestamptz IS NULL OR created_at >= %(since)s)
      AND (%(until)s::timestamptz IS NULL OR created_at < %(until)s)
      AND (%(message_ids)s::uuid[] IS NULL OR message_id = ANY(%(message_ids)s))
    ORDER BY id
    LIMIT %(chunk)s
), copies AS (
    INSERT INTO {schema}.messages (message_id, topic, key, payload, content_type, headers)
    SELECT message_id, topic, key, payload, content_type,
           headers || jsonb_build_object('outbox-replay-id', %(replay_id)s::text)
    FROM source WHERE key IS NULL OR octet_length(key) <= %(max_key_bytes)s ORDER BY id
    RETURNING 1
), moved AS (
    SELECT CASE WHEN (SELECT count(*) FROM source) = %(chunk)s THEN (SELECT max(id) FROM source)
                ELSE %(window_end)s END AS cursor_id
)
UPDATE {schema}.replays
SET copied = copied + (SELECT count(*) FROM copies),
    skipped = skipped + (SELECT count(*) FROM source) - (SELECT count(*) FROM copies),
    cursor_id = (SELECT cursor_id FROM moved),
    finished_at = CASE WHEN (SELECT cursor_id FROM moved) >= max_source_id THEN now() END
WHERE replay_id = %(replay_id)s AND cursor_id = %(cursor)s
RETURNING copied, cursor_id, finished_at IS NOT NULL AS finished;

-- name: replay_begin
INSERT INTO {schema}.replays (requested_by, selection, max_source_id, as_of, total)
VALUES (%(requested_by)s, %(selection)s, %(max_id)s, %(as_of)s, %(total)s)
RETURNING replay_id;

-- name: replay_get
-- `own`: recorded by the role that reads it (a resume by another role asks first).
SELECT replay_id, requested_by, requested_at, selection, max_source_id, total, copied, cursor_id, finished_at,
       created_by, coalesce(created_by = current_user, false) AS own, skipped
FROM {schema}.replays WHERE replay_id = %(replay_id)s;

-- name: replay_same_selection
-- The latest replay of the same filters that selected any message the selection
-- matches now, and how many of them. The filters are compared as given (`--since 2h`
-- and `--since 120m` are one filter); the windows by the instants they stood for
-- (`resolved`, fixed when each replay counted): `--since 1h` two hours later covers
-- other messages, and is another selection.
SELECT r.replay_id, r.requested_at, r.finished_at, shared.n, r.selection -> 'resolved'
FROM {schema}.replays r
CROSS JOIN LATERAL (
    SELECT count(*) AS n FROM {schema}.messages
    WHERE id <= least(%(max_id)s, r.max_source_id) AND dispatched_at <= least(%(as_of)s, r.as_of)
      AND NOT (headers ? 'outbox-replay-id')
      AND (%(topic_regex)s::text IS NULL OR topic ~ %(topic_regex)s)
      AND (%(key)s::text IS NULL OR key = %(key)s)
      AND (%(message_ids)s::uuid[] IS NULL OR message_id = ANY(%(message_ids)s))
      AND (%(since)s::timestamptz IS NULL OR created_at >= %(since)s)
      AND (%(until)s::timestamptz IS NULL OR created_at < %(until)s)
      AND (r.selection -> 'resolved' ->> 'since' IS NULL
           OR created_at >= (r.selection -> 'resolved' ->> 'since')::timestamptz)
      AND (r.selection -> 'resolved' ->> 'until' IS NULL
           OR created_at < (r.selection -> 'resolved' ->> 'until')::timestamptz)
) AS shared
WHERE r.selection - 'resolved' = %(selection)s::jsonb - 'resolved' AND shared.n > 0
ORDER BY r.replay_id DESC LIMIT 1;

-- name: status_replays
-- Who asked, as the command said (OS user and host), and the role, as the database
-- recorded it (before schema version 7 the command said that too).
SELECT replay_id, requested_by || coalesce(' as ' || created_by, '') AS requested_by, requested_at, selection,
       total, copied, skipped, finished_at
FROM {schema}.replays ORDER BY replay_id DESC LIMIT %(limit)s;

-- name: replay_lock
-- Taken first in each chunk's transaction: one process copies a replay at a time.
SELECT cursor_id, max_source_id, as_of, finished_at IS NOT NULL FROM {schema}.replays
WHERE replay_id = %(replay_id)s FOR UPDATE NOWAIT;

-- Backfills (`outbox-relay backfill`, outbox_relay/operations/backfill.py). The chunk itself is
-- composed in Python: it names the user's table and columns (as quoted identifiers).

-- name: backfill_begin
INSERT INTO {schema}.backfills (requested_by, source, total)
VALUES (%(requested_by)s, %(source)s, %(total)s)
RETURNING backfill_id;

-- name: backfill_get
-- `own`: recorded by the role that reads it (a resume by another role asks first).
SELECT backfill_id, source, total, copied, cursor_key, finished_at IS NOT NULL,
       created_by, coalesce(created_by = current_user, false) AS own
FROM {schema}.backfills WHERE backfill_id = %(backfill_id)s;

-- name: backfill_lock
-- Taken first in each chunk's transaction: one process copies a backfill at a time.
SELECT cursor_key, copied, finished_at IS NOT NULL FROM {schema}.backfills
WHERE backfill_id = %(backfill_id)s FOR UPDATE NOWAIT;

-- name: backfill_advance
UPDATE {schema}.backfills
SET copied = copied + %(rows)s, cursor_key = coalesce(%(cursor_key)s, cursor_key),
    finished_at = CASE WHEN %(finished)s THEN now() END
WHERE backfill_id = %(backfill_id)s
RETURNING copied;

-- name: status_backfills
-- Who asked and the role, as in status_replays.
SELECT backfill_id, requested_by || coalesce(' as ' || created_by, '') AS requested_by, requested_at, source,
       total, copied, finished_at
FROM {schema}.backfills ORDER BY backfill_id DESC LIMIT %(limit)s;

-- name: backfill_same_source
-- The backfills of the same topic, key column and filters, newest first, with the table
-- as recorded: the caller compares tables as the catalog resolves them (`orders` and
-- `public.orders` can be one table).
SELECT backfill_id, requested_at, finished_at IS NOT NULL, source ->> 'table' FROM {schema}.backfills
WHERE source - 'table' = %(source)s::jsonb - 'table' ORDER BY backfill_id DESC;

-- name: enqueue_source
-- Where enqueue_binary writes now, read from its installed body: a switch of source
-- replaces the body (schema/sources.sql), and only the WAL source's emits logical
-- decoding messages (tests/integration/test_sources.py checks this agrees with settings).
-- From the catalog, which every role may read, not from settings, which a producer role
-- (the one a backfill runs as) may not. No row: the function is missing.
SELECT CASE WHEN strpos(p.prosrc, 'pg_logical_emit_message') > 0 THEN 'wal' ELSE 'table' END
FROM pg_catalog.pg_proc AS p
WHERE p.oid = to_regprocedure(format('%%I.enqueue_binary(text, text, bytea, jsonb, text)', %(schema)s::text));

-- name: outbox_source
-- Where enqueue writes (`table` or `wal`), since when and who switched (schema.sql,
-- settings; schema/sources.sql switches it), and whether the drain after a switch to
-- table is pending (its gate holds keyed rows enqueued since), and the slot the last
-- switch to wal used.
SELECT source, source_changed_at, source_changed_by, drain_gate IS NOT NULL, wal_slot FROM {schema}.settings;

-- name: audit_dispatched
-- `outbox-relay audit`: the latest %(limit)s rows dispatched in the window, newest first,
-- through the dispatched index; %(topic_re)s: a topic glob as a regular expression
-- (operations/audit.py), NULL for every topic.
SELECT message_id, topic, receipt
FROM {schema}.messages
WHERE dispatched_at >= clock_timestamp() - make_interval(secs => %(since_s)s)
  AND (%(topic_re)s::text IS NULL OR topic ~ %(topic_re)s::text)
ORDER BY dispatched_at DESC
LIMIT %(limit)s;

-- The operator console (outbox_relay/console/read_model.py). Each query reads through an
-- index whose predicate it repeats: the console's pages must not scan the outbox, however
-- large the backlog (tests/console/test_console_pages.py checks their plans).

-- name: console_pending_keyed
-- Pending keyed messages by topic, through the claim's keyed index: how many, over how
-- many keys (the key shape: one hot key, a few aggregates, a key per message), the
-- longest key's backlog, and the oldest.
SELECT topic, sum(n)::bigint AS pending, count(*) AS keys, max(n) AS longest_key, min(oldest) AS oldest
FROM (
    SELECT topic, key, count(*) AS n, min(created_at) FILTER (WHERE isfinite(created_at)) AS oldest
    FROM {schema}.messages
    WHERE key IS NOT NULL AND dispatched_at IS NULL AND dead_lettered_at IS NULL
    GROUP BY topic, key) AS per_key
GROUP BY topic;

-- name: console_pending_keyless
-- Pending keyless messages by topic, through the claim's keyless index.
SELECT topic, count(*) AS pending, min(created_at) FILTER (WHERE isfinite(created_at)) AS oldest
FROM {schema}.messages
WHERE key IS NULL AND dispatched_at IS NULL AND dead_lettered_at IS NULL
GROUP BY topic;

-- name: console_dead_by_topic
-- Dead letters by topic, through the dead letters' index.
SELECT topic, count(*) AS dead_lettered
FROM {schema}.messages
WHERE dead_lettered_at IS NOT NULL
GROUP BY topic;

-- name: console_relays
SELECT relay_id, hostname, pid, version, source, brokers, started_at, in_flight,
       extract(epoch FROM now() - heartbeat_at) AS heartbeat_age_s
FROM {schema}.relays
ORDER BY started_at;

-- name: console_samples
-- The chart: every relay's samples of the last hour, summed by minute (lag: the
-- largest oldest-pending age any relay saw in the minute).
SELECT date_trunc('minute', sampled_at) AS minute, sum(published)::bigint AS published,
       sum(failed)::bigint AS failed, sum(dead_lettered)::bigint AS dead_lettered,
       max(oldest_pending_age_s) AS lag_s
FROM {schema}.relay_samples
WHERE sampled_at >= now() - interval '1 hour'
GROUP BY 1
ORDER BY 1;

-- name: console_dead_letters
-- One page of dead letters matching every filter given (NULL: any), newest first, after
-- the previous page's last id (keyset: a page costs the same however deep). Through the
-- dead letters' id index (migrations/0014_console.sql).
SELECT id, message_id, topic, key, attempts, created_at, dead_lettered_at, dead_letter_reason,
       dead_letter_published_at
FROM {schema}.messages
WHERE dead_lettered_at IS NOT NULL
  AND (%(before)s::bigint IS NULL OR id < %(before)s)
  AND (%(topic_regex)s::text IS NULL OR topic ~ %(topic_regex)s)
  AND (%(key)s::text IS NULL OR key COLLATE "C" = %(key)s)
  AND (%(reason)s::text IS NULL OR dead_letter_reason ILIKE %(reason)s)
  AND (%(since)s::timestamptz IS NULL OR dead_lettered_at >= %(since)s)
  AND (%(until)s::timestamptz IS NULL OR dead_lettered_at < %(until)s)
ORDER BY id DESC
LIMIT %(limit)s;

-- name: console_dead_letters_count
-- How many dead letters match the filters ("showing 50 of 1,204"): the console's page,
-- and `dead-letters list` (operations/dead_letters.py: no reason or until), counted up to
-- %(cap)s: a filter that matches most of 100,000 dead letters stops there ("more than
-- 10,000") instead of reading them all; one that matches few still reads every dead
-- letter's entry (benchmarks/console_pages.py reports that shape). The key compared as
-- the dead letters' (key, id) index sorts it (COLLATE "C"), so a key's count reads its
-- entries only.
SELECT count(*)
FROM (SELECT 1
      FROM {schema}.messages
      WHERE dead_lettered_at IS NOT NULL
        AND (%(topic_regex)s::text IS NULL OR topic ~ %(topic_regex)s)
        AND (%(key)s::text IS NULL OR key COLLATE "C" = %(key)s)
        AND (%(reason)s::text IS NULL OR dead_letter_reason ILIKE %(reason)s)
        AND (%(since)s::timestamptz IS NULL OR dead_lettered_at >= %(since)s)
        AND (%(until)s::timestamptz IS NULL OR dead_lettered_at < %(until)s)
      LIMIT %(cap)s) AS matched;

-- name: console_dead_letter
-- One dead letter, by its row id, without its payload (console_payload reads that, only
-- where the console may show payloads: its role may lack SELECT on the column).
SELECT id, message_id, topic, key, attempts, created_at, dead_lettered_at, dead_letter_reason,
       dead_letter_published_at, last_error, content_type, headers
FROM {schema}.messages
WHERE id = %(id)s AND dead_lettered_at IS NOT NULL;

-- name: console_payload
SELECT payload FROM {schema}.messages WHERE id = %(id)s AND dead_lettered_at IS NOT NULL;

