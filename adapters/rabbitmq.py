"""``type: rabbitmq``: publishes with pika on the relay's own event loop, with
publisher confirms and ``mandatory=True``.

- Confirms with a window: up to ``confirm_window`` messages are outstanding at once,
  never one round trip per message. Acks and nacks may cover many delivery tags at
  once (``multiple=True``). A nack is transient.
- Unroutable messages come back as ``basic.return`` before their ack; they are a
  permanent failure, dead-lettered with reason ``unroutable``, never silently lost.
  A return carries no delivery tag, only the message: it is matched to the one
  unconfirmed delivery tag with its message id. Two copies of one message id (a
  ``replay --again``) are never unconfirmed at once: the second is published once the
  first is confirmed, or a return could be matched to the wrong copy (and an
  unroutable copy marked acked).
- A message becomes: exchange = the route's destination (or the ``exchange``
  option when the route names none), routing key = the message topic (or the
  ``routing_key`` template), properties message_id, content_type, timestamp,
  persistent delivery mode and the headers.
- On connection or channel loss every unconfirmed message is published again later,
  never marked; the next publish reconnects. A broker that went away (the socket lost,
  the node stopped, paused on the minority side of a partition, or frozen) is an
  outage: the messages spend no attempt (``unavailable``). A closure the broker chose
  for an error (a channel closed with 406, a connection closed for a frame error),
  which a message may have caused, spends one (``transient``): see ``lost_result``.
- ``urls`` names several addresses (the nodes of a cluster): a connect tries them in
  turn, starting after the one whose connection was last lost, until one opens.

pika is not thread-safe; everything here runs on the event loop's thread, through
pika's asyncio connection adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

import structlog
from pydantic import AfterValidator, Field, field_validator, model_validator

from outbox_relay.adapter import KeyStops
from outbox_relay.durations import Duration
from outbox_relay.errors import first_line
from outbox_relay.models import OutgoingMessage, PublishResult
from outbox_relay.redact import redact_text

from ._options import Options, TlsOptions, parse_options, tls_context

try:
    import pika
    from pika.adapters.asyncio_connection import AsyncioConnection
    from pika.channel import Channel
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("the rabbitmq adapter needs pika: pip install 'outbox-relay[rabbitmq]'") from exc

UNROUTABLE = "unroutable"
PERSISTENT = 2
# connection.close reply codes that say the node went away, not that the client erred:
# 320 CONNECTION_FORCED (the node shutting down, or pausing itself on the minority side
# of a partition).
NODE_WENT_AWAY = frozenset({320})

log = structlog.get_logger("outbox_relay.rabbitmq")


@functools.lru_cache(maxsize=1024)
def _json_text(text: str) -> str:
    """`text` as a JSON string: an exchange's name, the same for every message of a route."""
    return json.dumps(text)


def lost_result(reason: BaseException) -> Callable[[str], PublishResult]:
    """How a message left unconfirmed (or unsent) by a closed channel or connection
    counts, by why it closed.

    The broker going away is an outage, not the message's doing: ``unavailable``, no
    attempt spent, so a node lost during a partition turns nothing into a dead letter
    (tests/clusters/test_rabbitmq_cluster.py: a message could live through a nack and
    two connection losses, and ``max_attempts: 3`` dead-lettered it). A closure the
    broker decided on for an error (a channel closed by the broker: 406 for a message
    over the queue's or the broker's size limit; a connection closed for a protocol
    error) may be a message's doing: ``transient``, so such a message is dead-lettered
    after ``max_attempts`` instead of taking the broker down again and again.
    """
    if isinstance(reason, pika.exceptions.ConnectionClosedByBroker):
        return PublishResult.unavailable if reason.reply_code in NODE_WENT_AWAY else PublishResult.transient
    if isinstance(reason, pika.exceptions.ChannelClosedByBroker):
        return PublishResult.transient
    if isinstance(reason, pika.exceptions.AMQPConnectionError | OSError | TimeoutError):
        return PublishResult.unavailable  # the socket lost, a heartbeat missed, a refused reconnect
    return PublishResult.transient


def _amqp_url(value: str) -> str:
    # The URL may hold a password: no error shows any of it.
    if not value.startswith(("amqp://", "amqps://")):
        raise ValueError("must be an amqp:// or amqps:// URL")
    try:
        pika.URLParameters(value)
    except Exception as exc:
        raise ValueError(f"invalid AMQP URL: {type(exc).__name__}") from None
    return value


AmqpUrl = Annotated[str, AfterValidator(_amqp_url)]


class RabbitOptions(Options):
    # The broker's amqp:// or amqps:// (TLS) URL: user, password, host, port, vhost; or
    # urls. Its password from the environment (`${RABBITMQ_PASSWORD}`); errors never show it.
    url: AmqpUrl | None = None
    # The nodes of a cluster, tried in turn (RabbitAdapter.connect); exactly one of
    # url and urls.
    urls: list[AmqpUrl] | None = Field(default=None, min_length=1)
    exchange: str = ""  # "" is the default exchange: routing key = queue name
    # The type exchanges are declared with (declare: true); an exchange that exists with
    # another type is refused (406) and its messages dead-lettered.
    exchange_type: Literal["direct", "topic", "fanout", "headers"] = "topic"
    declare: bool = True  # declare exchanges (durable); false: check they exist
    routing_key: str = "{topic}"  # template over {topic}, {key}, {destination}
    # Messages published and not yet confirmed at once, over every call; a publish waits
    # for room. What is unconfirmed when a connection is lost is published again.
    confirm_window: int = Field(default=1000, ge=1, le=100_000)
    # Hand a key's run over in one call (faster for hot keys). Off by default: RabbitMQ
    # can nack a message and confirm the next (a queue with x-overflow reject-publish
    # under load) or return one as unroutable after routing the next, and then a later
    # message of the key is delivered first (docs/how-to/rabbitmq.md).
    pipeline_keys: bool = False
    # The AMQP heartbeat timeout the relay asks for (whole seconds; 0: none): a connection
    # silent about that long is taken as lost, by the relay and by the broker.
    heartbeat: Duration = 30.0
    # How long opening a connection, a channel or an exchange declare may take (then the
    # next address is tried); a connection the broker blocks (an alarm) 3x as long is dropped.
    connect_timeout: Duration = 10.0
    # TLS settings; amqps:// alone means TLS with the system's CAs. With an amqp:// URL
    # TLS goes to its port, 5672 unless given: use amqps:// (5671) or name the port.
    tls: TlsOptions | None = None

    @model_validator(mode="after")
    def _one_of_url_and_urls(self) -> RabbitOptions:
        if (self.url is None) == (self.urls is None):
            raise ValueError("give either url (one address) or urls (a list of addresses), not both or neither")
        return self

    @property
    def addresses(self) -> list[str]:
        """The URLs to connect to, in the order given."""
        return [self.url] if self.url is not None else list(self.urls or [])

    @field_validator("heartbeat")
    @classmethod
    def _whole_seconds(cls, value: float) -> float:
        # AMQP negotiates heartbeats in whole seconds, and 0 turns them off: 500ms would
        # have become 0, silently disabling the dead-connection check.
        if 0 < value < 1:
            raise ValueError("must be at least 1s (AMQP heartbeats are whole seconds), or 0 to turn them off")
        return value

    @field_validator("routing_key")
    @classmethod
    def _template(cls, value: str) -> str:
        try:
            value.format(topic="t", key="k", destination="d")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"invalid template {value!r}: use {{topic}}, {{key}} or {{destination}} ({exc})") from None
        return value


class ChannelLost(Exception):
    """The connection or channel went away with messages unconfirmed; `result` says
    how its messages count (lost_result: an outage, or a closure the broker chose)."""

    def __init__(self, why: str, result: Callable[[str], PublishResult] = PublishResult.unavailable):
        super().__init__(why)
        self.result = result


class _DeclareFailed(Exception):
    def __init__(self, reason: BaseException):
        super().__init__(repr(reason))
        self.reason = reason


# Replies that refuse an exchange declare for good: 404 not found (passive), 406
# precondition failed (exists with another type or durability).
# 404: missing (declare: false); 406: declared with another type; 403: the user may not
# declare it (no configure permission) or the name is reserved (amq.*).
EXCHANGE_REFUSED = {403, 404, 406}
# A refused exchange is answered from memory this long, then asked again: it may have
# been created (or fixed) meanwhile.
REMEMBER_REFUSAL_S = 5.0
AMQP_SHORT_STRING = 255  # bytes: content type, header names, routing key
# pika failing to build the frames: the message itself cannot be carried.
UNENCODABLE: tuple[type[BaseException], ...] = (
    pika.exceptions.ShortStringTooLong,
    struct.error,
    UnicodeError,
    TypeError,
    ValueError,
)


def _unfit_for_amqp(out: OutgoingMessage, routing_key: str) -> str | None:
    """Why AMQP cannot carry this message at all (its short strings are 255 bytes), or None."""
    if len(routing_key.encode("utf-8")) > AMQP_SHORT_STRING:
        return "routing key longer than 255 bytes"
    if len(out.message.content_type.encode("utf-8")) > AMQP_SHORT_STRING:
        return "content type longer than 255 bytes"
    for name in out.message.headers:
        if len(name.encode("utf-8")) > AMQP_SHORT_STRING:
            return f"header name {name[:40]!r}... longer than 255 bytes"
    return None


def connection_parameters(options: RabbitOptions, url: str | None = None) -> pika.URLParameters:
    """pika's parameters for `url`, one of the options' addresses (default: the first)."""
    url = options.addresses[0] if url is None else url
    params = pika.URLParameters(url)
    params.heartbeat = math.ceil(options.heartbeat)
    params.socket_timeout = options.connect_timeout
    params.blocked_connection_timeout = options.connect_timeout * 3
    params.connection_attempts = 1
    if options.tls is not None or url.startswith("amqps://"):
        params.ssl_options = pika.SSLOptions(tls_context(options.tls or TlsOptions()), params.host)
    return params


def where(url: str) -> str:
    """host:port of an AMQP URL: how errors and logs name an address (never its
    credentials)."""
    params = pika.URLParameters(url)
    return f"{params.host}:{params.port}"


def _passwords(urls: Sequence[str]) -> list[str]:
    return [unquote(urlsplit(url).password or "") for url in urls]


class RabbitAdapter:
    def __init__(self, name: str, options: RabbitOptions):
        self.name = name
        self.options = options
        # With pipeline_keys, one channel publishes a key's run in the order given; a
        # message refused before it was published stops its key for the rest of the
        # call, but a nack or an unroutable return is known only after later ones were
        # published (RabbitOptions.pipeline_keys, engine/dispatch.py).
        self.keeps_key_order = options.pipeline_keys
        self._connection: AsyncioConnection | None = None
        self._channel: Channel | None = None
        self._next_tag = 0
        # delivery tag -> (its call's future, message id, receipt if confirmed)
        self._unconfirmed: dict[int, tuple[asyncio.Future[PublishResult], str, str]] = {}
        # The unconfirmed delivery tag of each message id (one at most: _publish_one), how
        # a basic.return, which names no tag, finds its message.
        self._tag_of: dict[str, int] = {}
        # Why the broker returned a delivery tag: read when its confirm arrives.
        self._returned: dict[int, str] = {}
        # Delivery tags that a copy of the same message id waits on before it is published.
        self._copy_waiters: dict[int, asyncio.Event] = {}
        # Exchanges known to be usable, on this connection (an exchange can be deleted:
        # the broker then closes the channel with 404, and the set is emptied).
        self._usable: set[str] = set()
        # Exchanges the broker refused, and until when that answer is trusted: an
        # exchange missing now (declare: false) may be created in a minute.
        self._refused: dict[str, tuple[float, str]] = {}
        self._window: asyncio.Semaphore = asyncio.Semaphore(options.confirm_window)
        self._lock = asyncio.Lock()
        # The address the next connect tries first: the one after the address whose
        # connection was lost (that node may be the one that went away).
        self._next_address = 0
        self._address = 0  # of the current (or last) connection
        # Set by a nack on the current channel: the next batch goes on a new channel.
        self._renew_channel = False

    # -- connection --------------------------------------------------------------------

    async def connect(self) -> None:
        """Open a connection to the first address that takes it, trying each once,
        from the one after the address last lost; else one ConnectionError naming every
        address's failure (host:port, no credentials)."""
        addresses = self.options.addresses
        failures: list[str] = []
        start = self._next_address
        for step in range(len(addresses)):
            index = (start + step) % len(addresses)
            try:
                await self._connect_to(addresses[index])
            except Exception as exc:
                failures.append(f"{where(addresses[index])}: {first_line(exc)}")
                continue
            self._address = self._next_address = index
            if len(addresses) > 1:
                log.info("rabbitmq_connected", broker=self.name, address=where(addresses[index]))
            return
        reasons = redact_text("; ".join(failures), _passwords(addresses))
        if len(addresses) == 1:
            raise ConnectionError(f"cannot connect to RabbitMQ at {reasons}")
        raise ConnectionError(f"cannot connect to RabbitMQ at any of its {len(addresses)} addresses: {reasons}")

    async def _connect_to(self, url: str) -> None:
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[AsyncioConnection] = loop.create_future()

        def on_open(conn: Any) -> None:
            if not opened.done():
                opened.set_result(conn)

        def on_open_error(conn: Any, error: BaseException) -> None:
            if not opened.done():
                opened.set_exception(ConnectionError(repr(error)))

        connection = AsyncioConnection(
            connection_parameters(self.options, url),
            on_open_callback=on_open,
            on_open_error_callback=on_open_error,
            on_close_callback=self._on_connection_closed,
            custom_ioloop=loop,
        )
        # A new connection re-learns every exchange: what was refused may exist by now,
        # what was usable may have been deleted meanwhile.
        self._usable.clear()
        self._refused.clear()
        try:
            try:
                await asyncio.wait_for(opened, self.options.connect_timeout)
            except TimeoutError:
                raise ConnectionError(f"not connected within {self.options.connect_timeout:g}s") from None
            self._connection = connection
            self._renew_channel = False
            await self._open_channel()
            if self.options.exchange:
                problem = await self._ensure_exchange(self.options.exchange)
                if problem is not None:
                    raise ConnectionError(problem)
        except BaseException:
            with contextlib.suppress(Exception):
                connection.close()
            self._connection = None
            raise

    async def _open_channel(self) -> None:
        assert self._connection is not None
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[Channel] = loop.create_future()
        self._connection.channel(on_open_callback=ready.set_result)
        channel = await asyncio.wait_for(ready, self.options.connect_timeout)
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        confirmed: asyncio.Future[None] = loop.create_future()
        # Confirms carry a delivery tag of their channel: bound to it, so a late confirm
        # from a channel since replaced cannot settle the new channel's same-numbered tag.
        channel.confirm_delivery(
            lambda frame: self._on_confirm(frame, channel), callback=lambda _frame: confirmed.set_result(None)
        )
        await asyncio.wait_for(confirmed, self.options.connect_timeout)
        # Confirms of the channel replaced can no longer settle anything (_on_confirm):
        # what still waits on it is "maybe delivered", so it goes again.
        self._fail_unconfirmed("channel replaced before its confirms arrived", PublishResult.unavailable)
        self._channel = channel
        self._next_tag = 0  # delivery tags restart at 1 on every channel

    async def close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        self._fail_unconfirmed("adapter closed", PublishResult.unavailable)
        if connection is not None and connection.is_open:
            connection.close()

    async def ready(self) -> bool:
        """One round trip to the broker (a channel opened and closed), reconnecting first
        if the connection was lost, as publish would. The engine probes a broker that
        stopped answering with ready() before it sends it messages again, so "the socket
        is open" is not enough: a black-holed connection looks open until the heartbeat
        gives up on it. A connection that opens no channel within connect_timeout is
        given up at once (see _give_up), so the next probe connects again, to the next
        address."""
        connection = self._connection
        if connection is None or not connection.is_open:
            async with self._lock:
                return await self._ensure_open() is None
        try:
            channel = await self._side_channel()
        except Exception as exc:
            self._give_up(connection, f"no channel within {self.options.connect_timeout:g}s: {first_line(exc)}")
            return False
        with contextlib.suppress(Exception):
            channel.close()
        return True

    async def _side_channel(self) -> Channel:
        """A channel beside the publishing one, for a probe or a declare: whatever the
        broker answers there (a 404 closes the channel) leaves the publishing channel,
        and the confirms still due on it, alone."""
        assert self._connection is not None
        loop = asyncio.get_running_loop()
        opened: asyncio.Future[Channel] = loop.create_future()

        def on_open(channel: Channel) -> None:
            if opened.done():  # too late: the caller gave up on it
                with contextlib.suppress(Exception):
                    channel.close()
            else:
                opened.set_result(channel)

        self._connection.channel(on_open_callback=on_open)
        return await asyncio.wait_for(opened, self.options.connect_timeout)

    def _give_up(self, connection: Any, why: str) -> None:
        """Drop a connection that looks open but answers nothing (a frozen node, a black
        hole): only the AMQP heartbeat would close it, after up to two heartbeats
        (a minute by default), and until then every probe and publish would wait on it
        instead of trying the next address."""
        current = self._connection
        if current is None or connection is not current:
            return  # already replaced
        self._connection = None
        self._channel = None
        self._next_address = (self._address + 1) % len(self.options.addresses)
        self._fail_unconfirmed(f"connection given up: {why}", PublishResult.unavailable)
        log.info("rabbitmq_connection_given_up", broker=self.name, address=where(self.options.addresses[self._address]))
        with contextlib.suppress(Exception):
            current.close()

    def _on_connection_closed(self, connection: Any, reason: BaseException) -> None:
        if connection is not self._connection and self._connection is not None:
            return  # an older connection finishing its close: the current one is fine
        self._connection = None
        self._channel = None
        # The next connect starts with the next address: this node may be gone.
        self._next_address = (self._address + 1) % len(self.options.addresses)
        self._fail_unconfirmed(f"connection lost: {reason!r}", lost_result(reason))

    def _on_channel_closed(self, channel: Any, reason: BaseException) -> None:
        if channel is not self._channel and self._channel is not None:
            # An older channel finishing its close: its messages were failed when it was
            # replaced; the futures now waiting belong to the current channel.
            return
        self._channel = None
        if isinstance(reason, pika.exceptions.ChannelClosedByBroker) and reason.reply_code == 404:
            # An exchange is gone (deleted while cached, or refused by a passive check).
            # Which one the broker does not say: forget them all and declare again. The
            # other messages on the channel did nothing wrong: they wait, no attempt spent.
            self._usable.clear()
            self._fail_unconfirmed(f"channel closed by the broker: {reason!r}", PublishResult.unavailable)
            return
        # A connection's loss closes its channels first, with the connection's reason.
        self._fail_unconfirmed(f"channel closed: {reason!r}", lost_result(reason))

    def _fail_unconfirmed(self, why: str, result: Callable[[str], PublishResult] = PublishResult.transient) -> None:
        # Unconfirmed means "maybe delivered": the row stays pending and is published
        # again; consumers dedupe by message id.
        pending, self._unconfirmed = self._unconfirmed, {}
        for tag, (future, message_id, _receipt) in pending.items():
            self._settled(tag, message_id)
            if not future.done():
                future.set_result(result(why))
        self._returned.clear()

    async def _ensure_open(self) -> str | None:
        """Reconnect or reopen the channel if needed; the reason if it cannot."""
        try:
            if self._connection is None or not self._connection.is_open:
                if self._connection is not None:
                    with contextlib.suppress(Exception):
                        self._connection.close()  # closing or broken: do not strand it
                    self._connection = None
                    self._next_address = (self._address + 1) % len(self.options.addresses)
                await self.connect()
            elif self._channel is None or not self._channel.is_open:
                await self._open_channel()
        except Exception as exc:
            return f"RabbitMQ unreachable: {first_line(exc)}"  # a timeout's message is empty
        return None

    async def _new_channel(self) -> str | None:
        """Replace a channel the broker nacked on. A channel's quorum queue client can
        stay bound to a leader that is gone: RabbitMQ 3.10 took it from the queue's
        record, stale while a node was cut off, and that channel then nacked every
        publish for minutes, while a new channel on the same connection found the new
        leader (tests/clusters/test_rabbitmq_cluster.py, the partition). A nack is rare
        otherwise (a full queue with x-overflow reject-publish), so a new channel per
        batch that had one costs little."""
        # Other calls' confirms still due on the old channel (they published before this
        # call took the lock, and await their confirms outside it) settle there first:
        # the renewal would fail them as "maybe delivered", and a call answered only
        # that way looks like an outage to the engine, which stops calling the broker.
        due = [future for future, _, _ in self._unconfirmed.values() if not future.done()]
        if due:
            await asyncio.wait(due, timeout=self.options.connect_timeout)
        if self._connection is None or not self._connection.is_open:
            problem = await self._ensure_open()  # lost in the wait: a new connection, a new channel
            if problem is None:
                self._renew_channel = False
            return problem
        old = self._channel
        try:
            await self._open_channel()
        except Exception as exc:
            return f"RabbitMQ unreachable: {first_line(exc)}"
        # Cleared only once replaced: a call cancelled or failed before that leaves the
        # renewal to the next, and nacks of the wait were the old channel's.
        self._renew_channel = False
        if old is not None:
            with contextlib.suppress(Exception):
                old.close()
        log.info("rabbitmq_channel_renewed", broker=self.name, reason="nacked by the broker")
        return None

    # -- exchanges -----------------------------------------------------------------------

    async def _ensure_exchange(self, name: str) -> str | None:
        """None if `name` can be published to; else why not (the channel is reopened)."""
        if name == "" or name in self._usable:
            return None
        refused = self._refused.get(name)
        if refused is not None and refused[0] > time.monotonic():
            return refused[1]
        try:
            channel = await self._side_channel()
        except Exception as exc:
            raise ChannelLost(f"cannot open a channel to declare {name!r}: {exc!r}") from None
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def closed(_channel: Any, reason: BaseException) -> None:
            if not done.done():
                done.set_exception(_DeclareFailed(reason))

        def declared(_frame: Any) -> None:
            if not done.done():
                done.set_result(None)

        channel.add_on_close_callback(closed)
        channel.exchange_declare(
            name,
            exchange_type=self.options.exchange_type,
            durable=True,
            passive=not self.options.declare,
            callback=declared,
        )
        try:
            await asyncio.wait_for(done, self.options.connect_timeout)
        except TimeoutError:
            waited = self.options.connect_timeout
            raise ChannelLost(f"no answer to the declare of {name!r} within {waited:g}s") from None
        except _DeclareFailed as failed:
            reason = failed.reason
            code = getattr(reason, "reply_code", None)
            if isinstance(reason, pika.exceptions.ChannelClosedByBroker) and code in EXCHANGE_REFUSED:
                # The broker refused this exchange (missing when checked passively, or of
                # another type): a fact about the exchange, so remember it. The refusal
                # closed only the declaring channel: the other messages go on.
                why = f"exchange {name!r} unusable: {code} {reason.reply_text}"
                self._refused[name] = (time.monotonic() + REMEMBER_REFUSAL_S, why)
                return why
            # The channel or connection went away for some other reason: nothing is
            # known about the exchange; the messages count as its closure says.
            raise ChannelLost(f"channel closed while declaring {name!r}: {reason!r}", lost_result(reason)) from None
        finally:
            if channel.is_open:
                with contextlib.suppress(Exception):
                    channel.close()
        self._usable.add(name)
        self._refused.pop(name, None)
        return None

    # -- publishing ------------------------------------------------------------------------

    def _on_return(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        if channel is not self._channel:
            return  # an older channel's message: failed when that channel closed
        # RabbitMQ sends basic.return before the ack of the same message, so the message
        # is still unconfirmed, and it is the only unconfirmed one with its id.
        tag = self._tag_of.get(properties.message_id)
        if tag is not None:
            self._returned[tag] = f"{UNROUTABLE} ({method.reply_code} {method.reply_text})"

    def _settled(self, tag: int, message_id: str) -> None:
        """`tag` is confirmed or failed: its message id may go out again."""
        if self._tag_of.get(message_id) == tag:
            del self._tag_of[message_id]
        waiter = self._copy_waiters.pop(tag, None)
        if waiter is not None:
            waiter.set()

    def _on_confirm(self, frame: Any, channel: Any = None) -> None:
        if channel is not None and channel is not self._channel:
            return  # an older channel's tag: its messages were already failed when it closed
        method = frame.method
        acked = isinstance(method, pika.spec.Basic.Ack)
        tags = [t for t in self._unconfirmed if t <= method.delivery_tag] if method.multiple else [method.delivery_tag]
        for tag in tags:
            entry = self._unconfirmed.pop(tag, None)
            if entry is None:
                continue
            future, message_id, receipt = entry
            self._settled(tag, message_id)
            returned = self._returned.pop(tag, None)
            if future.done():
                continue
            if not acked:
                self._renew_channel = True
                future.set_result(PublishResult.transient("nacked by the broker"))
            elif returned is not None:
                future.set_result(PublishResult.permanent(returned))
            else:
                future.set_result(PublishResult.acked(receipt))

    def _properties(self, out: OutgoingMessage) -> pika.BasicProperties:
        message = out.message
        return pika.BasicProperties(
            message_id=str(message.message_id),
            content_type=message.content_type,
            timestamp=int(message.created_at.timestamp()),
            delivery_mode=PERSISTENT,
            headers=dict(message.headers),
        )

    def _target(self, out: OutgoingMessage) -> tuple[str, str]:
        exchange = out.destination if out.explicit_destination else self.options.exchange
        key = self.options.routing_key.format(
            topic=out.message.topic, key=out.message.key or "", destination=out.destination
        )
        return exchange, key

    async def _publish_one(self, out: OutgoingMessage) -> asyncio.Future[PublishResult] | PublishResult:
        exchange, routing_key = self._target(out)
        unfit = _unfit_for_amqp(out, routing_key)
        if unfit is not None:
            return PublishResult.permanent(unfit)
        try:
            problem = await self._ensure_exchange(exchange)
        except ChannelLost as lost:  # nothing known about the exchange, nothing sent
            return lost.result(str(lost))
        if problem is not None:
            return PublishResult.permanent(problem)
        await self._after_earlier_copy(str(out.message_id))
        await self._window.acquire()
        channel = self._channel
        if channel is None or not channel.is_open:
            self._window.release()
            # Closed while this call waited for the confirm window: not sent.
            return PublishResult.unavailable("channel closed before publish")
        try:
            channel.basic_publish(exchange, routing_key, out.message.payload, self._properties(out), mandatory=True)
        except Exception as exc:
            # Nothing reached the broker, so its delivery-tag counter did not move: ours
            # must not either, or every later confirm would settle the wrong message.
            self._window.release()
            if isinstance(exc, UNENCODABLE):
                return PublishResult.permanent(f"cannot encode the message for AMQP: {exc!r}")
            return PublishResult.transient(f"publish failed: {exc!r}")
        future: asyncio.Future[PublishResult] = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda _f: self._window.release())
        self._next_tag += 1
        receipt = f'{{"exchange":{_json_text(exchange)},"routing_key":{json.dumps(routing_key)},"confirmed":true}}'
        self._unconfirmed[self._next_tag] = (future, str(out.message_id), receipt)
        self._tag_of[str(out.message_id)] = self._next_tag
        return future

    async def _after_earlier_copy(self, message_id: str) -> None:
        """Wait until no copy of `message_id` is unconfirmed (rare: a `replay --again`
        copy beside its original, or a copy still unconfirmed from a call that timed
        out). A basic.return names the message, not its delivery tag: with two copies
        unconfirmed, the return of an unroutable copy could settle the other copy, and
        the unroutable one would be marked acked."""
        while (tag := self._tag_of.get(message_id)) is not None:
            waiter = self._copy_waiters.setdefault(tag, asyncio.Event())
            await waiter.wait()

    async def publish(self, batch: Sequence[OutgoingMessage]) -> Sequence[PublishResult]:
        # One call's publishes at a time: no other call opens a connection or renews the
        # channel between them, so a call's messages of a key all go on one channel.
        async with self._lock:
            problem = await self._ensure_open()
            if problem is None and self._renew_channel:
                problem = await self._new_channel()
            if problem is not None:
                return [PublishResult.unavailable(problem)] * len(batch)
            stops = KeyStops()
            pending: list[asyncio.Future[PublishResult] | PublishResult] = []
            for out in batch:
                item = stops.held(out) or await self._publish_one(out)
                if isinstance(item, PublishResult):
                    stops.note(out, item)
                pending.append(item)
        # Its confirms are awaited outside the lock, so the next call (another worker's
        # batch: other keys) publishes meanwhile; a tag is counted in the same step as its
        # publish (_publish_one), so calls interleaved this way keep the tags in step. A
        # channel renewed after a nack waits for these confirms first (_new_channel), up
        # to connect_timeout; what is still unconfirmed then fails (maybe delivered: it
        # goes again). Holding the lock through the confirms made the workers' calls take
        # turns: a confirm round trip per call, and more workers drained slower.
        results = [
            (await item) if isinstance(item, asyncio.Future) else item  # every confirm awaited
            for item in pending
        ]
        return KeyStops().settle(batch, results)


def create(name: str, options: Mapping[str, Any]) -> RabbitAdapter:
    return RabbitAdapter(name, parse_options(RabbitOptions, options))


def check_destination(destination: str, explicit: bool) -> str | None:
    """Why RabbitMQ would refuse a route's destination, or None: the naming hook
    `outbox-relay check` calls for every route (outbox_relay/adapter.py). A route's own
    destination is the exchange, an AMQP short string; without one, the exchange is the
    `exchange` option and the topic goes into the routing key, checked per message."""
    if explicit and len(destination.encode("utf-8")) > AMQP_SHORT_STRING:
        return f"RabbitMQ exchange names are at most {AMQP_SHORT_STRING} bytes, not {len(destination.encode())}"
    return None
