"""Builds the running parts from a Config: one adapter per broker, then the Relay.

This is the one place (with the CLI that calls it) where concrete adapters are
chosen, by their ``type:`` through the adapter registry; the engine itself only
ever sees the Adapter protocol, so it never imports a broker client.
"""

from __future__ import annotations

from outbox_relay import adapter as adapter_registry
from outbox_relay.adapter import Adapter
from outbox_relay.config import Config, key_path
from outbox_relay.engine.relay import Relay
from outbox_relay.errors import ConfigError
from outbox_relay.observability.health import Mount
from outbox_relay.sources.base import RelayObserver
from outbox_relay.sources.wal.runner import WalSource

# With exactly_once, a relay that takes the slot after a park committed and its Kafka
# transaction did not reads which of that transaction's messages the table holds
# (wal_queries.sql, parked_of): those it must not send again. A parked message that the
# table workers (this relay's or another replica's) dispatched and retention deleted
# before that read would be sent a second time. The read comes within seconds of a
# start or takeover; an hour leaves room for a slow one.
EXACTLY_ONCE_MIN_RETENTION_S = 3600.0


def build_adapters(config: Config) -> dict[str, Adapter]:
    """One adapter per broker block, options validated; errors name the key path."""
    adapters: dict[str, Adapter] = {}
    for name, broker in config.brokers.items():
        try:
            adapters[name] = adapter_registry.create(broker.type, name, broker.options)
        except ConfigError as exc:
            # key_path: a broker name may hold a line break or a dot; the error stays one line.
            path = ".".join(p for p in (key_path(("brokers", name)), exc.path) if p)
            raise ConfigError(exc.reason, source=config.source, path=path) from None
    _check_exactly_once(config, adapters)
    return adapters


def _check_exactly_once(config: Config, adapters: dict[str, Adapter]) -> None:
    """One exactly-once broker at most, only of an adapter that offers it, and dispatched
    rows kept long enough for a takeover to tell what was parked."""
    chosen = [name for name, a in adapters.items() if getattr(a, "exactly_once", False)]
    for name in chosen:
        if adapter_registry.transactions_of(adapters[name]) is None:
            raise ConfigError(
                f"adapter type {config.brokers[name].type!r} cannot publish exactly once",
                source=config.source,
                path=".".join((key_path(("brokers", name)), "exactly_once")),
            )
    if len(chosen) > 1:
        raise ConfigError(
            f"exactly_once is set on {len(chosen)} brokers ({', '.join(chosen)}): a relay's transactions"
            " cover one Kafka broker; keep it on one",
            source=config.source,
            path=".".join((key_path(("brokers", chosen[1])), "exactly_once")),
        )
    if chosen and config.relay.retention < EXACTLY_ONCE_MIN_RETENTION_S:
        raise ConfigError(
            f"must be at least 1h with {key_path(('brokers', chosen[0]))}.exactly_once (got"
            f" {config.relay.retention:g}s): a relay taking the WAL slot over reads the parked messages kept in"
            " the table so as not to send them again",
            source=config.source,
            path="relay.retention",
        )


def build_relay(config: Config, *, observer: RelayObserver | None = None, mount: Mount | None = None) -> Relay:
    """The relay with its table workers and the WAL source beside them (which streams
    only when the outbox's source is wal, or drains a slot a switch to table left).
    `mount`: an app its health port serves too; the CLI hands in the console there
    (console.enabled), which lies above this module."""
    return Relay(config, build_adapters(config), observer=observer, sources=[WalSource(config)], mount=mount)
