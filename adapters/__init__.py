"""The built-in broker adapters, one module each, registered as entry points
(``outbox_relay.adapters``) in pyproject.toml. Installed as ``outbox_relay_adapters``.

Each module has a ``create(broker_name, options) -> Adapter`` factory that
validates its options and imports its client library only when used.
"""
