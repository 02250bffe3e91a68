"""The adapter interface (the port) and how adapters are found.

An adapter publishes to one broker. The core calls it only through
:class:`Adapter`, and finds adapter factories by their ``type:`` name in the
``outbox_relay.adapters`` entry-point group, so the core never imports a broker
client library and a third party can ship an adapter as its own package:

    [project.entry-points."outbox_relay.adapters"]
    mybroker = "my_package.adapter:create"

where ``create(name: str, options: Mapping[str, Any]) -> Adapter`` validates the
options (raising :class:`~outbox_relay.errors.AdapterOptionsError`) without connecting.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

from outbox_relay.errors import AdapterOptionsError, ConfigError
from outbox_relay.models import Outcome, OutgoingMessage, PublishResult

ENTRY_POINT_GROUP = "outbox_relay.adapters"


@runtime_checkable
class Adapter(Protocol):
    """An async publisher to one broker.

    Contract for ``publish``:
    - it returns one :class:`PublishResult` per message, in the same order;
    - ``acked`` means the broker has durably accepted the message (a Kafka ack, a
      RabbitMQ confirm, an fsync, a 2xx) — the engine marks the row dispatched on it;
    - unless the adapter declares ``keeps_key_order = True``, a batch never holds two
      messages with the same key (the engine sends later ones of a key in a later call,
      once the earlier one is acked), so the adapter may send the whole batch
      concurrently and should: never one round trip per message;
    - it should not raise; if it does, every message of the batch counts as a
      transient failure.

    Optional attribute ``keeps_key_order`` (default False). True promises that
    messages of one key handed over in one call reach the broker in the order given,
    and that once one of them is not acked, no later one of that key in the call is
    acked: the adapter answers ``PublishResult.not_sent(...)`` for those it did not
    send, or the broker refuses them (Kafka's idempotent producer fails the rest of a
    partition after a rejected batch). The engine then hands a key's whole run to one
    call instead of one call per message (engine/dispatch.py says what it does when
    a broker acks a later message anyway).
    """

    name: str

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def ready(self) -> bool:
        """True when the broker answers and the adapter can publish now.

        An adapter that lost its connection reconnects here, as ``publish`` would
        (bounded by its own connect timeout): the engine stops calling ``publish`` for
        a broker that answered nothing within ``relay.publish_timeout`` and probes it
        with ``ready()`` until it says True (engine/circuit.py). /readyz calls it too.
        """
        ...

    async def publish(self, batch: Sequence[OutgoingMessage]) -> Sequence[PublishResult]: ...


def keeps_key_order(adapter: Adapter) -> bool:
    """Whether `adapter` may be handed several messages of one key in one call."""
    return bool(getattr(adapter, "keeps_key_order", False))


class KeyStops:
    """For an adapter that keeps key order: which keys already failed in this call.

    ``held(out)`` answers ``not_sent`` for a message whose key failed earlier in the
    call (do not send it); ``note(out, result)`` records a failure. ``settle`` applies
    the same rule to results that came back together: a failure after its key's first
    failure was caused by it (Kafka rejects the rest of a partition), so it spends no
    attempt and becomes ``not_sent``.
    """

    def __init__(self) -> None:
        self._failed: set[str] = set()

    def held(self, out: OutgoingMessage) -> PublishResult | None:
        key = out.message.key
        if key is not None and key in self._failed:
            return PublishResult.not_sent(f"not sent: an earlier message of key {key!r} failed")
        return None

    def note(self, out: OutgoingMessage, result: PublishResult) -> PublishResult:
        if result.outcome is not Outcome.ACKED and out.message.key is not None:
            self._failed.add(out.message.key)
        return result

    def settle_one(self, out: OutgoingMessage, result: PublishResult) -> PublishResult:
        """`result` for `out`, or ``not_sent`` if it failed after its key already had."""
        if result.outcome is not Outcome.ACKED:
            result = self.held(out) or result
        return self.note(out, result)

    def settle(self, batch: Sequence[OutgoingMessage], results: Sequence[PublishResult]) -> list[PublishResult]:
        return [self.settle_one(out, result) for out, result in zip(batch, results, strict=True)]


AdapterFactory = Callable[[str, Mapping[str, Any]], Adapter]


@functools.cache
def installed() -> dict[str, AdapterFactory]:
    """Adapter factories by type name, as installed entry points."""
    found: dict[str, AdapterFactory] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found[ep.name] = _lazy(ep.name, ep.load)
    return found


def _lazy(name: str, load: Callable[[], Any]) -> AdapterFactory:
    # Load the module only when a broker of this type is configured, so a missing
    # optional client library (aiokafka, pika) only matters to those who use it.
    def factory(broker: str, options: Mapping[str, Any]) -> Adapter:
        try:
            create = load()
        except ImportError as exc:
            raise ConfigError(
                f"adapter {name!r} cannot be loaded: {exc} "
                f"(install it with: pip install 'outbox-relay[{name}]')"
            ) from exc
        return create(broker, options)  # type: ignore[no-any-return]

    return factory


def create(type_name: str, broker: str, options: Mapping[str, Any]) -> Adapter:
    """Build the adapter for one broker block; raise ConfigError naming the problem."""
    factories = installed()
    if type_name not in factories:
        names = ", ".join(sorted(factories)) or "none"
        raise ConfigError(f"unknown adapter {type_name!r} (installed: {names})", path="type")
    try:
        return factories[type_name](broker, options)
    except AdapterOptionsError:
        raise
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise AdapterOptionsError(str(exc)) from exc
