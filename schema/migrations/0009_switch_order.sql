-- Version 9: a switch of source keeps each key's order (issue 18, point 1).
--
-- From wal to table: messages still in the slot are older than every row enqueued
-- after the switch, so until a relay has streamed the slot to its end (runner.py) the
-- claim takes no keyed row from drain_gate on (rows enqueued after the switch), and a
-- message the drain parks gets an id below drain_gate (drain_next, taken from a gap the
-- switch left in the identity sequence): behind its key's older rows, before its newer
-- ones. Keyless rows have no order to keep and are never held.
-- From table to wal: wal_settled is false until a relay has seen every transaction that
-- could still enqueue a row through the table body end, before it reads the table's
-- held keys and publishes the first WAL message.
-- parked_through_commit / parked_through: the last WAL message parked (its commit's
-- start LSN and its own), written with the park: a relay that restarts before the slot
-- was told skips what the table already holds instead of parking it twice.

ALTER TABLE {schema}.settings
    ADD COLUMN drain_gate bigint,
    ADD COLUMN drain_next bigint,
    ADD COLUMN wal_settled boolean NOT NULL DEFAULT true,
    ADD COLUMN parked_through_commit pg_lsn,
    ADD COLUMN parked_through pg_lsn;
