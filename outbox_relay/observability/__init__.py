"""How the running relay is seen from outside.

- ``http_server``: ``/livez``, ``/readyz`` and ``/metrics`` on the health port;
- ``metrics``: the Prometheus metrics the relay exports;
- ``logging_setup``: structlog as JSON lines (or console), library logs included.

Trace context (W3C, producer to consumer) is public API for applications and lives
in ``outbox_relay.tracing``.
"""
