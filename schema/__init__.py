"""The outbox schema as SQL files: ``schema.sql`` (the current DDL), numbered
``migrations/``, ``queries.sql`` (every query the relay runs) and ``grants.sql``.

Installed as the package ``outbox_relay.schema`` so the files ship in the wheel;
``outbox_relay.sqlfiles`` loads them.
"""
