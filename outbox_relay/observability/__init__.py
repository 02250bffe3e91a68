"""How the running relay is seen from outside.

- ``http_server``: ``/livez``, ``/readyz`` and ``/metrics`` on the health port;
- ``health``: the liveness and readiness probes behind them, and the port's start-up;
- ``metrics``: the Prometheus metrics the relay exports, and their bookkeeping;
- ``logging_setup``: structlog as JSON lines (or console), library logs included.

Trace context (W3C, producer to consumer) is public API for applications and lives
in ``outbox_relay.tracing``.
"""
