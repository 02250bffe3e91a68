"""The adapter interface (the port) and how adapters are found.

An adapter publishes to one broker. The core calls it only through
:class:`Adapter`, and finds adapter factories by their ``type:`` name in the
``outbox_relay.adapters`` entry-point group, so the core never imports a broker
client library and a third party can ship an adapter as its own package:

    [project.entry-points."outbox_relay.adapters"]
    mybroker = "my_package.adapter:create"

where ``create(name: str, options: Mapping[str, Any]) -> Adapter`` validates the
options (raising :class:`~outbox_relay.errors.AdapterOptionsError`) without connecting.

Optional, beside ``create`` in the same module: ``check_destination(destination: str,
explicit: bool) -> str | None``, the broker's naming rules: why it would refuse that
destination (one line), or None. ``outbox-relay check`` calls it for each route to a
broker of that type, before anything is sent, and fails naming the route: a route
whose destinations the broker refuses can only dead-letter. ``explicit`` True: the
route's own ``destination``. False: the route names none, so each message goes to a
destination named after its topic, and ``destination`` is the literal characters of
the route's topic pattern (its wildcards left out: ``tenant:*`` gives ``tenant:``),
which every such topic contains; answer only for what breaks every name containing
them (a character the broker refuses, a length), else None. A module without it is
not checked.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Protocol, runtime_checkable

from outbox_relay.errors import AdapterOptionsError, ConfigError, OutboxRelayError, first_line
from outbox_relay.models import Outcome, OutgoingMessage, PublishResult

ENTRY_POINT_GROUP = "outbox_relay.adapters"
# Where the built-in adapters are installed (pyproject.toml): each needs the extra of its
# type's name, if any.
BUILT_IN_PACKAGE = "outbox_relay_adapters."


@runtime_checkable
class Adapter(Protocol):
    """An async publisher to one broker.

    How the engine uses it (engine/brokers.py, engine/dispatch.py, engine/circuit.py):

    - One instance per broker block, shared by every worker (``relay.workers``): up to
      that many ``publish`` calls run at once on it, and ``ready()`` may run beside them.
      A worker has one call at a time per broker (its batch goes out in waves, each wave
      one call per broker), of at most ``relay.batch_size`` messages. The calls share
      the adapter's client; the adapter serialises what its client needs serialised
      (RabbitMQ publishes one call at a time, the file adapter writes one at a time, the
      Kafka adapters replace a broken producer once, under a lock).
    - Any call may be cancelled: ``publish`` at ``relay.publish_timeout`` and at
      shutdown, ``ready()`` at its caller's timeout. Nothing of a cancelled call is
      marked; the adapter must stay usable (no lock left held, no half-written record).
    - Connecting is the engine's job until the first ``connect()`` returns: it calls
      ``connect()`` in the background, again with the relay's retry backoff after each
      failure, and calls neither ``publish`` nor ``ready()`` before one succeeded (it
      answers "unavailable" for the broker's messages itself). ``connect()`` must end on
      its own (the engine gives it no timeout) and leave nothing open when it raises or
      is cancelled.
    - Reconnecting is the adapter's job: the engine never calls ``connect()`` again.
      An adapter whose connection is lost reconnects in ``publish`` (answering
      ``unavailable`` while it cannot) and in ``ready()``, which is all the engine calls
      while the broker's circuit is open.
    - ``close()``: the relay calls it once, at shutdown, after its workers stopped, and
      only if ``connect()`` succeeded; ``outbox-relay check`` calls it after a failed
      ``connect()`` too, so it must be harmless then.

    Contract for ``publish``:
    - it returns one :class:`PublishResult` per message, in the same order (any other
      number of results: every message of the call counts as a transient failure);
    - ``acked`` means the broker has durably accepted the message (a Kafka ack, a
      RabbitMQ confirm, an fsync, a 2xx) — the engine marks the row dispatched on it;
      ``permanent`` dead-letters it at once; ``transient`` spends one of its
      ``max_attempts``; ``unavailable`` (the broker, not the message, is the problem)
      spends none, and a call whose every answer is ``unavailable`` (or ``not_sent``),
      like a call with no answer within ``relay.publish_timeout``, opens the broker's
      circuit: ``publish`` is then not called until ``ready()`` answers True, and the
      next call carries one message (engine/circuit.py);
    - unless the adapter declares ``keeps_key_order = True``, a batch never holds two
      messages with the same key (the engine sends later ones of a key in a later call,
      once the earlier one is acked), so the adapter may send the whole batch
      concurrently and should: never one round trip per message;
    - it should not raise; if it does, every message of the batch counts as a
      transient failure (a ``TimeoutError`` counts as no answer: ``unavailable``, and
      the circuit opens).

    Optional attribute ``keeps_key_order`` (default False), read once when the engine
    is built, so fixed for the adapter's life. True promises that
    messages of one key handed over in one call reach the broker in the order given,
    and that once one of them is not acked, no later one of that key in the call is
    acked: the adapter answers ``PublishResult.not_sent(...)`` for those it did not
    send. A broker's own ordering is rarely enough for that: a Kafka broker that
    refused one record batch writes the partition's next one, so the Kafka adapters
    send in rounds of one batch per partition (adapters/_rounds.py). The contract
    suite checks it against each such adapter's real broker
    (tests/contract/test_key_order_contract.py). The engine then hands a key's whole run to one
    call instead of one call per message (engine/dispatch.py says what it does when
    a broker acks a later message anyway). Such an adapter may also stop when its own
    time for the call is up (SQS, NATS with key_rounds send a key's run in rounds) and
    answer ``not_sent`` for the rest of a key whose earlier messages it acked in the
    call: those are left due at once, no attempt spent (the WAL source sends them again
    in the same batch; with exactly once, another broker's are parked). ``not_sent``
    for a key's first message in the call, or a keyless one, counts as transient.
    """

    name: str  # the broker block's name in the config

    async def connect(self) -> None:
        """Connect to the broker; raise if it cannot (see the class: who calls it, when)."""
        ...

    async def close(self) -> None:
        """Disconnect; what is still unconfirmed is not acked (its rows go again)."""
        ...

    async def ready(self) -> bool:
        """True when the broker answers and the adapter can publish now. Sends no message.

        Who calls it, and so what it may cost:
        - the broker's circuit (engine/circuit.py), only while it is open, in the
          background at the retry backoff's growing interval, cancelled after
          ``relay.publish_timeout``. ``publish`` is not called meanwhile, so an adapter
          that lost its connection reconnects here, as ``publish`` would (bounded by its
          own connect timeout). True only half-opens the circuit: one trial message goes
          next, and its answer closes the circuit (a broker can answer and ack nothing);
        - /readyz, at most once a second (answers are cached), for each broker a route
          uses whose circuit is closed, cancelled after 2 s (observability/health.py): a
          slower answer reads as "not ready";
        - ``outbox-relay check``, once, after ``connect()``.
        So it may cost one round trip to the broker (a Kafka metadata request, a
        RabbitMQ channel opened and closed, an HTTP HEAD), plus a reconnect when the
        connection was lost. An exception counts as False.
        """
        ...

    async def publish(self, batch: Sequence[OutgoingMessage]) -> Sequence[PublishResult]:
        """Publish `batch`: one result per message, in order (see the class)."""
        ...


class Fenced(OutboxRelayError):
    """A newer producer with the same transactional id started (another relay took the
    stream over): this one may publish nothing more."""


class TransactionFailed(OutboxRelayError):
    """A transaction could not be committed, or whether it was is not known (the answer
    was lost): what it holds is published only if the positions topic says so."""


class PositionsTopicError(OutboxRelayError):
    """The positions topic is not fit to keep positions (not compacted, not readable):
    relaying exactly once cannot start until it is mended."""


class PositionUndecided(TimeoutError):
    """The positions topic holds a transaction still open past the wait (another
    relay's: the topic is shared by every slot, and Kafka aborts it at its transaction
    timeout): the position cannot be read yet. Not the broker away: try again later."""


@runtime_checkable
class Transactions(Protocol):
    """One transactional producer of an exactly-once broker (sources/wal/exactly_once.py
    drives it). An adapter offers it with ``exactly_once = True`` and
    ``transactions(transactional_id) -> Transactions``.

    Each batch: ``begin()``, any number of ``publish`` calls (the contract of
    :meth:`Adapter.publish`: acked here means written inside the transaction, seen by
    ``read_committed`` consumers only once it commits), then ``commit(key, position)``,
    which writes the position to the positions topic in the same transaction and
    commits: the records and the position become visible together, or neither does.
    After any failure the caller calls ``abort()`` and ``start()`` again, then reads
    ``position(key)`` to learn what was committed before it sends anything.
    """

    fenced: bool  # set once a newer producer with the same id fenced this one

    async def start(self) -> None:
        """Connect, check (or create) the positions topic, and register the
        transactional id: every earlier producer with it is fenced, and the transaction
        it left open aborted. Raises PositionsTopicError for a topic unfit for
        positions, PositionUndecided while another producer's transaction on it is open,
        anything else when the broker cannot be reached (try again later)."""
        ...

    async def position(self, key: str) -> bytes | None:
        """The last committed position written under `key`, read ``read_committed``."""
        ...

    async def begin(self) -> None: ...

    async def publish(self, batch: Sequence[OutgoingMessage]) -> Sequence[PublishResult]: ...

    async def commit(self, key: str, position: bytes) -> None:
        """Write `position` under `key` and commit; raises Fenced or TransactionFailed."""
        ...

    async def abort(self) -> None:
        """Abort the open transaction, best effort, and drop the producer; never raises."""
        ...

    async def close(self) -> None: ...


def transactions_of(adapter: Adapter) -> Callable[[str], Transactions] | None:
    """The adapter's exactly-once factory when its broker block says ``exactly_once``."""
    if not getattr(adapter, "exactly_once", False):
        return None
    factory = getattr(adapter, "transactions", None)
    return factory if callable(factory) else None


def keeps_key_order(adapter: Adapter) -> bool:
    """Whether `adapter` may be handed several messages of one key in one call."""
    return bool(getattr(adapter, "keeps_key_order", False))


class KeyStops:
    """For an adapter that keeps key order: which keys already failed in this call.

    ``held(out)`` answers ``not_sent`` for a message whose key failed earlier in the
    call (do not send it); ``note(out, result)`` records a failure. ``settle`` applies
    the same rule to results that came back together: a failure after its key's first
    failure was caused by it (the records of a key in one Kafka round share a record
    batch and its fate), so it spends no attempt and becomes ``not_sent``.
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
DestinationCheck = Callable[[str, bool], "str | None"]


@dataclass
class ReadBack:
    """What a broker holds where receipts say messages landed (`outbox-relay audit`)."""

    # (destination, partition, offset) -> the message id of the record there, or None
    # when there is none (deleted by the broker's retention or compaction, a topic
    # recreated, an offset not written yet).
    found: dict[tuple[str, int, int], str | None]
    # Message ids met more than once among the records read (delivered twice).
    repeated: dict[str, int] = field(default_factory=dict)
    # Places a reader cannot see yet (written, but behind a transaction still open on
    # their partition): neither there nor missing.
    undecided: set[tuple[str, int, int]] = field(default_factory=set)
    # Records read from the broker to check them (the audit's cost: what is checked
    # and the records between nearby places, not the topic's size).
    records_read: int = 0


# read_back(options, places): the broker's records at those places, read with the
# broker block's own connection options. Optional, beside ``create``: an adapter whose
# module has none is not audited.
ReadBackHook = Callable[[Mapping[str, Any], Sequence[tuple[str, int, int]]], Awaitable[ReadBack]]


@functools.cache
def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


@functools.cache
def installed() -> dict[str, AdapterFactory]:
    """Adapter factories by type name, as installed entry points."""
    return {name: _lazy(name, ep.load) for name, ep in _entry_points().items()}


def destination_check(type_name: str) -> DestinationCheck | None:
    """The naming rules of adapter `type_name`: the ``check_destination`` function of
    the module that holds its factory (see the module docstring), or None."""
    ep = _entry_points().get(type_name)
    if ep is None:
        return None
    try:
        module = importlib.import_module(ep.module)
    except ImportError:  # create() said so already, naming what to install
        return None
    hook = getattr(module, "check_destination", None)
    return hook if callable(hook) else None


def read_back_hook(type_name: str) -> ReadBackHook | None:
    """The ``read_back`` function of adapter `type_name`'s module (ReadBackHook), or None."""
    ep = _entry_points().get(type_name)
    if ep is None:
        return None
    try:
        module = importlib.import_module(ep.module)
    except ImportError:
        return None
    hook = getattr(module, "read_back", None)
    return hook if callable(hook) else None


def _lazy(name: str, load: Callable[[], Any]) -> AdapterFactory:
    # Load the module only when a broker of this type is configured, so a missing
    # optional client library (aiokafka, pika) only matters to those who use it.
    def factory(broker: str, options: Mapping[str, Any]) -> Adapter:
        try:
            create = load()
            return create(broker, options)  # type: ignore[no-any-return]
        except ImportError as exc:
            # A built-in adapter's ImportError says what to install (adapters/__init__.py),
            # also one its factory raises for a client it imports then (kafka's librdkafka).
            raise ConfigError(f"adapter {name!r} cannot be loaded: {first_line(exc)}") from exc

    return factory


def _inventory() -> str:
    """Which adapter types can be used, for an unknown ``type:``. Every entry point is
    registered whether or not its client library is there (the webhook's httpx is in
    an extra): only those whose module loads are installed; a built-in one that does
    not load needs its extra, named after it."""
    usable: list[str] = []
    need_extra: list[str] = []
    broken: list[str] = []
    for name, ep in sorted(_entry_points().items()):
        try:
            ep.load()
        except Exception:  # an ImportError, or whatever a third party's module raises
            (need_extra if ep.module.startswith(BUILT_IN_PACKAGE) else broken).append(name)
        else:
            usable.append(name)
    text = f"installed: {', '.join(usable) or 'none'}"
    if need_extra:
        text += f"; needing an extra: {', '.join(need_extra)}, pip install 'outbox-relay[{','.join(need_extra)}]'"
    if broken:
        text += f"; cannot be loaded: {', '.join(broken)}"
    return text


def create(type_name: str, broker: str, options: Mapping[str, Any]) -> Adapter:
    """Build the adapter for one broker block; raise ConfigError naming the problem."""
    factories = installed()
    if type_name not in factories:
        raise ConfigError(f"unknown adapter {type_name!r} ({_inventory()})", path="type")
    try:
        return factories[type_name](broker, options)
    except ConfigError:  # AdapterOptionsError included: already names its key
        raise
    except (TypeError, ValueError) as exc:
        raise AdapterOptionsError(str(exc)) from exc
