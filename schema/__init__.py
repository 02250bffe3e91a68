"""The outbox schema as SQL files: ``schema.sql`` (the current DDL), numbered
``migrations/``, ``queries.sql`` (every query the relay runs) and ``grants_*.sql``
(one per role); the consumer inbox's ``inbox.sql``, ``inbox_queries.sql`` and
``grants_inbox.sql``.

Installed as the package ``outbox_relay.schema`` so the files ship in the wheel;
``outbox_relay.sqlfiles`` loads them.
"""
