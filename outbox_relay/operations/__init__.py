"""What the operator commands read and do, beside the running relay.

- ``schema_manager``: install and upgrade of the outbox schema, and its source (the
  version check they share with the relay is ``outbox_relay/schema_version.py``);
- ``check``: ``outbox-relay check`` (config, database and every broker answer);
- ``status``: the outbox's state, as ``outbox-relay status`` prints it;
- ``dead_letters``: list, retry and purge dead letters;
- ``replay`` and ``backfill``: re-send kept messages, snapshot a table into the
  outbox; ``copying`` holds what the two share.
"""
