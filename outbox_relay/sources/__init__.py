"""Where the relay's messages come from.

- ``wal``: logical decoding messages streamed from a replication slot (pgoutput).

The outbox table (``outbox_relay.engine.store``) is the other source.
"""
