"""The WAL source: outbox messages written to the WAL alone, streamed from a slot.

Why: a table outbox pays for every message with a heap row, two index entries, an
UPDATE when it is acked and a dead tuple to vacuum. ``pg_logical_emit_message(true,
prefix, content)`` writes a message into the WAL only, inside the producer's
transaction, and logical decoding hands it out in commit order if, and only if, that
transaction commits (a rolled-back subtransaction's messages are dropped; a prepared
transaction's arrive at COMMIT PREPARED). Nothing is stored that needs cleaning up.

How, in layers that each stand alone:

- ``framing``: the bytes of one outbox message (message id, topic, key, content type,
  headers, payload) inside a logical message: versioned, big-endian, length-prefixed,
  so any language (SQL included: uuid_send, int2send, int4send) can produce it. The
  prefix, ``outbox-relay:<schema>``, keeps two outboxes in one database apart.
- ``pgoutput``: the few messages of the replication protocol and of the pgoutput
  plugin (version 1, ``messages 'true'``) the relay needs: XLogData, keepalive, Begin,
  Commit, Message; the standby status update it sends; LSNs.
- ``stream``: an async reader of a slot over psycopg 3's libpq-level COPY BOTH, which
  yields each committed transaction's messages with our prefix in parts of bounded
  size, answers keepalives and reports the position the caller confirmed.
- ``slot``: the slot (plugin pgoutput) and the publication (no table: pgoutput insists on
  a publication, and logical messages do not depend on its tables), and how far behind
  the slot is (the WAL it keeps on disk).
- ``relay``: streams the slot through the table engine's dispatcher (same adapters,
  routes, key order, retry and dead-letter policy) and confirms each commit once its
  messages are acked or parked; ``outcomes`` sorts each dispatch round's answer, and
  ``parking`` puts what the brokers did not take, and every later message of its key,
  into the outbox table, whose engine retries it.

Positions: a transaction is confirmed by its commit's end LSN, once all its messages
and all before it are done; never by a message's own LSN, which PostgreSQL sets to the
end of the message's WAL record (trusting it caused Debezium's duplicates and losses
after restarts, dbz#2004 and dbz#2058). The slot keeps the WAL from its restart
position on until then, so after a crash the messages not confirmed come again: at
least once, nothing lost.
"""
