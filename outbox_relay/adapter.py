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
from outbox_relay.models import OutgoingMessage, PublishResult

ENTRY_POINT_GROUP = "outbox_relay.adapters"


@runtime_checkable
class Adapter(Protocol):
    """An async publisher to one broker.

    Contract for ``publish``:
    - it returns one :class:`PublishResult` per message, in the same order;
    - ``acked`` means the broker has durably accepted the message (a Kafka ack, a
      RabbitMQ confirm, an fsync, a 2xx) — the engine marks the row dispatched on it;
    - a batch never holds two messages with the same key (the engine sends later ones
      of a key in a later call, once the earlier one is acked), so the adapter may
      send the whole batch concurrently and should: never one round trip per message;
    - it should not raise; if it does, every message of the batch counts as a
      transient failure.
    """

    name: str

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def ready(self) -> bool:
        """True when the broker is reachable and the adapter can publish now."""
        ...

    async def publish(self, batch: Sequence[OutgoingMessage]) -> Sequence[PublishResult]: ...


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
