"""What the operator commands read and do, beside the running relay.

- ``schema_manager``: install, upgrade and version checks of the outbox schema;
- ``check``: ``outbox-relay check`` (config, database and every broker answer);
- ``status``: the outbox's state, as ``outbox-relay status`` prints it;
- ``dead_letters``: list, retry and purge dead letters;
- ``replay`` and ``backfill``: re-send kept messages, snapshot a table into the
  outbox; ``copying`` holds what the two share.
"""
