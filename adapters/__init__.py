"""The built-in broker adapters, one module each, registered as entry points
(``outbox_relay.adapters``) in pyproject.toml. Installed as ``outbox_relay_adapters``.

Each module has a ``create(broker_name, options) -> Adapter`` factory that
validates its options and imports its client library only when used. A client
library that is missing raises an ImportError saying what to install
(``pip install 'outbox-relay[webhook]'``): the registry (outbox_relay/adapter.py)
shows it as it is, in one line.
"""
