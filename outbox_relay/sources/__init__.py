"""Where the relay's messages come from: one interface, two sources.

- ``base``: what a source is to the engine (it hands messages to the dispatcher, is
  told back acked / retry / wait / dead, and records that before taking more).
- ``table``: rows of the outbox table, claimed, dispatched and recorded by workers.
- ``wal``: logical decoding messages streamed from a replication slot (pgoutput), with
  the table as its retry path (parking).

The engine above them (engine/: dispatch, routing, retry, circuits, the relay process)
is the same for both.
"""
