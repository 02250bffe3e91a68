"""``type: kafka`` with ``client: librdkafka``: publishes with confluent-kafka.

librdkafka builds and sends record batches in C threads, so the Python side of a
message is one ``produce()`` call (a fraction of aiokafka's per-message CPU: README,
"Performance"). Same guarantees as the aiokafka client: idempotent producer,
``acks=all``, a row marked only on its delivery report, a key's run in one call (same
key, same partition, records kept in order), the same record layout and the same
error classes.

Left to itself, librdkafka goes on after the broker rejects a record batch (too large
for the topic): later records of the partition are delivered, ahead of the rejected
batch's innocent records sent again. ``enable.gapless.guarantee`` makes such a
rejection fatal instead: the producer stops, nothing after the gap is delivered, and
the adapter starts a new producer and re-sends the rejected batch's records one by
one, in order, so only the record that is really too large is dead-lettered, as the
aiokafka client does.

Delivery reports are served by a thread of our own that polls the producer and
hands each poll's reports to the event loop at once (one loop call per poll, not
per message).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import structlog

from outbox_relay.adapter import KeyStops
from outbox_relay.errors import first_line
from outbox_relay.models import OutgoingMessage, PublishResult

from ._options import TlsOptions
from ._topics import METADATA_WAIT_S, TopicMetadata
from .kafka import CLOSE_WAIT_S, KafkaOptions, record_headers, start_if_missing, valid_topic

try:
    from confluent_kafka import KafkaError, KafkaException, Producer
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the kafka adapter's librdkafka client needs confluent-kafka: pip install 'outbox-relay[librdkafka]'"
    ) from exc

log = structlog.get_logger("outbox_relay.kafka")

POLL_S = 0.02

# The broker will refuse these however often we try: dead-letter them with its reason.
PERMANENT_CODES = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_MSG_SIZE,
        KafkaError.TOPIC_EXCEPTION,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.UNSUPPORTED_FOR_MESSAGE_FORMAT,
        KafkaError.INVALID_MSG,
        KafkaError.INVALID_RECORD,
        KafkaError._INVALID_ARG,
    }
)

# The broker is not answering at all: waiting spends none of the message's attempts.
AWAY_CODES = frozenset(
    {
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._MSG_TIMED_OUT,
        KafkaError._TIMED_OUT,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError.NETWORK_EXCEPTION,
        KafkaError._RESOLVE,
        KafkaError.BROKER_NOT_AVAILABLE,
        KafkaError._WAIT_COORD,
    }
)


SIZE_CODES = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE})

# Failed because of another record: the producer stopped (a gap another record left)
# or its queue was purged when it was replaced. Nothing is wrong with the message: it
# waits, without spending an attempt, for the new producer.
COLLATERAL_CODES = frozenset(
    {KafkaError._FATAL, KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT, KafkaError._GAPLESS_GUARANTEE}
)


def classify(error: Any) -> PublishResult:
    """A KafkaError, as the engine should treat it. Reasons name the error the way the
    aiokafka client does (MessageSizeTooLarge ...), with librdkafka's code after it."""
    code = error.code()
    reason = f"{error.name()}: {error.str()}"
    if code in SIZE_CODES:
        reason = f"MessageSizeTooLarge ({error.name()}): {error.str()}"
    if code in COLLATERAL_CODES or (error.fatal() and code not in PERMANENT_CODES):
        return PublishResult.unavailable(reason)
    if code in PERMANENT_CODES:
        return PublishResult.permanent(reason)
    if code in AWAY_CODES:
        return PublishResult.unavailable(reason)
    return PublishResult.transient(reason)


def producer_config(options: KafkaOptions) -> dict[str, Any]:
    """librdkafka settings equivalent to the aiokafka client's (kafka.producer_settings)."""
    servers = options.bootstrap_servers
    timeout_ms = int(options.request_timeout * 1000)
    config: dict[str, Any] = {
        "bootstrap.servers": servers if isinstance(servers, str) else ",".join(servers),
        "client.id": options.client_id,
        "enable.idempotence": True,
        "acks": "all",
        "compression.type": options.compression,
        "linger.ms": options.linger * 1000,
        "batch.size": options.max_batch_size,
        "message.max.bytes": options.max_request_size,
        "request.timeout.ms": timeout_ms,
        # Never give a record up: a record that timed out is not covered by the gapless
        # guarantee (a later one of its partition could be delivered before it is sent
        # again). The relay's publish_timeout decides how long a call may take.
        "message.timeout.ms": 0,
        # Same key, same partition as aiokafka and the Java client (murmur2), so switching
        # clients, or replicas on both, never splits a key over two partitions.
        "partitioner": "murmur2_random",
        "queue.buffering.max.messages": 1_000_000,
        # A rejected batch stops the producer rather than leave a gap (module docstring).
        "enable.gapless.guarantee": True,
        # One request in flight per broker, as aiokafka: with several, a request sent after
        # a rejected one can still be written (a broker that has no state for a new
        # producer id accepts its first sequence as it comes), ahead of the rejected
        # batch's innocent records sent again.
        "max.in.flight.requests.per.connection": 1,
    }
    tls = options.tls
    if tls:
        settings = tls if isinstance(tls, TlsOptions) else TlsOptions()
        config.update(
            {
                "ssl.ca.location": settings.ca_file,
                "ssl.certificate.location": settings.cert_file,
                "ssl.key.location": settings.key_file,
                "ssl.key.password": settings.key_password.get_secret_value() if settings.key_password else None,
                "ssl.endpoint.identification.algorithm": "https" if settings.check_hostname else "none",
            }
        )
    if options.sasl:
        config.update(
            {
                "security.protocol": "SASL_SSL" if tls else "SASL_PLAINTEXT",
                "sasl.mechanism": options.sasl.mechanism,
                "sasl.username": options.sasl.username,
                "sasl.password": options.sasl.password.get_secret_value(),
            }
        )
    elif tls:
        config["security.protocol"] = "SSL"
    return {k: v for k, v in config.items() if v is not None}


class _Reports:
    """The polling thread: serves delivery reports and settles their futures on the loop."""

    def __init__(self, producer: Any, loop: asyncio.AbstractEventLoop):
        self._producer = producer
        self._loop = loop
        self._stop = threading.Event()
        self._ready: list[tuple[asyncio.Future[Any], Any]] = []
        self.fatal: str | None = None
        self._thread = threading.Thread(target=self._run, name="librdkafka-reports", daemon=True)
        self._thread.start()

    def delivered(self, future: asyncio.Future[Any], error: Any, _message: Any) -> None:
        # Called by producer.poll() on the polling thread; the future gets the error or None.
        if error is not None and error.fatal():
            self.fatal = error.str()
        self._ready.append((future, error))

    def error(self, error: Any) -> None:
        # librdkafka's error callback (poll() serves it): a fatal error stops the producer.
        if error.fatal():
            self.fatal = error.str()

    def _run(self) -> None:
        purged = False
        while not self._stop.is_set():
            try:
                self._producer.poll(POLL_S)
            except KafkaException as exc:  # a fatal error surfaces here too; reports go on
                self.fatal = self.fatal or str(exc)
            if self.fatal is not None and not purged:
                # A stopped producer never sends what it still holds, and records are never
                # timed out (message.timeout.ms 0): purge them, so every caller gets a
                # report ("purged": not the record's fault) and the adapter can start anew.
                purged = True
                with contextlib.suppress(Exception):
                    self._producer.purge()
                continue
            if self._ready:
                ready, self._ready = self._ready, []
                with contextlib.suppress(RuntimeError):  # the loop closed under us: nobody waits
                    self._loop.call_soon_threadsafe(_settle, ready)

    def stop(self) -> None:
        """Serve what is left (reports of purged records included), then stop polling."""
        self._stop.set()
        self._thread.join(5)
        with contextlib.suppress(KafkaException):
            self._producer.poll(0)
        if self._ready:
            ready, self._ready = self._ready, []
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(_settle, ready)


def _settle(ready: list[tuple[asyncio.Future[Any], Any]]) -> None:
    for future, result in ready:
        if not future.done():
            future.set_result(result)


class LibrdkafkaAdapter:
    keeps_key_order = True  # same key, same partition; librdkafka keeps a partition in order

    def __init__(self, name: str, options: KafkaOptions):
        self.name = name
        self.options = options
        self._producer: Any = None
        self._reports: _Reports | None = None
        self._lifecycle = asyncio.Lock()  # connect and reset, one at a time
        self._topics = TopicMetadata(min(METADATA_WAIT_S, options.request_timeout))

    async def connect(self) -> None:
        errors: list[_Reports] = []  # the error callback reaches the reports object made below
        early: list[str] = []  # errors before that: why a connect failed (a refused login, an untrusted CA)

        def on_error(error: Any) -> None:
            if errors:
                errors[0].error(error)
            else:
                early.append(str(error.str()))

        producer = Producer(
            {**producer_config(self.options), "error_cb": on_error}, logger=logging.getLogger("outbox_relay.librdkafka")
        )  # not raw lines on stderr
        try:
            # Connected and the cluster's metadata fetched, as the aiokafka client does.
            await asyncio.to_thread(producer.list_topics, timeout=self.options.request_timeout)
        except KafkaException as exc:
            why = early[-1] if early else (exc.args[0].str() if exc.args else str(exc))
            raise ConnectionError(f"kafka unreachable: {first_line(why)[:500]}") from exc
        self._producer = producer
        self._reports = _Reports(producer, asyncio.get_running_loop())
        errors.append(self._reports)

    async def close(self) -> None:
        producer, reports = self._producer, self._reports
        self._producer = self._reports = None
        if reports is not None:
            await asyncio.to_thread(reports.stop)  # flush below serves what is left
        if producer is not None:
            # Records still queued after a short wait are purged (their rows stay pending
            # in the outbox and go again): during an outage flush() would wait for them
            # until request_timeout, holding up a reset or the relay's exit.
            left = await asyncio.to_thread(producer.flush, min(CLOSE_WAIT_S, self.options.request_timeout))
            if left:
                log.warning("kafka_producer_close_purging", records=left)
                producer.purge()
                await asyncio.to_thread(producer.flush, 0)

    async def ready(self) -> bool:
        # Starts a producer if there is none, as publish would: the engine probes a
        # broker that stopped answering with ready() before it sends it messages again.
        if await self._reconnect() is not None or self._producer is None:
            return False
        try:
            # /readyz waits 2 s: a probe must not hold a pool thread longer than that.
            wait = min(2.0, self.options.request_timeout)
            metadata = await asyncio.to_thread(self._producer.list_topics, timeout=wait)
        except KafkaException:
            return False
        return bool(metadata.brokers)

    async def _reconnect(self) -> str | None:
        return await start_if_missing(self, str)

    async def publish(self, batch: Sequence[OutgoingMessage]) -> Sequence[PublishResult]:
        problem = await self._reconnect()
        if problem is not None:
            return [PublishResult.unavailable(problem)] * len(batch)
        producer, reports = self._producer, self._reports
        if producer is None or reports is None:
            return [PublishResult.unavailable("kafka producer not connected")] * len(batch)
        missing = await self._topics_without_metadata(producer, batch)
        stops = KeyStops()
        pending: list[asyncio.Future[Any] | PublishResult] = []
        for out in batch:
            sent = stops.held(out) or missing.get(out.destination) or await self._produce(producer, reports, out)
            if isinstance(sent, PublishResult):
                stops.note(out, sent)
            pending.append(sent)
        errors = [await item if isinstance(item, asyncio.Future) else item for item in pending]
        if reports.fatal is not None:
            await self._new_producer(producer, reports.fatal)
        return await self._settle_size_errors(batch, errors)

    async def _settle_size_errors(self, batch: Sequence[OutgoingMessage], errors: list[Any]) -> list[PublishResult]:
        """ "Too large" is about a whole record batch, so it may be a neighbour's fault:
        each such record is sent again on its own, in batch order, a key stopping at its
        first failure (a later failure of a key was caused by it: not_sent); what still
        fails alone is really too large."""
        final: list[PublishResult] = []
        stops = KeyStops()
        for out, error in zip(batch, errors, strict=True):
            if isinstance(error, PublishResult):
                final.append(stops.settle_one(out, error))
            elif error is None:
                final.append(stops.note(out, PublishResult.acked()))
            elif error.code() in SIZE_CODES:
                final.append(stops.note(out, stops.held(out) or await self._send_alone(out)))
            else:
                final.append(stops.settle_one(out, classify(error)))
        return final

    async def _send_alone(self, out: OutgoingMessage) -> PublishResult:
        producer, reports = self._producer, self._reports
        if producer is None or reports is None:
            return PublishResult.unavailable("kafka producer not connected")
        sent = await self._produce(producer, reports, out)
        if isinstance(sent, PublishResult):
            return sent
        error = await sent
        if reports.fatal is not None:
            await self._new_producer(producer, reports.fatal)
        return PublishResult.acked() if error is None else classify(error)

    async def _new_producer(self, seen: Any, why: str) -> None:
        """After a fatal error the producer refuses everything: start a new one (a new
        producer id), once, whichever worker sees it first. If the new one cannot connect
        now, the next publish connects (or answers "unavailable" until it can)."""
        async with self._lifecycle:
            if self._producer is not seen:
                return
            log.info("kafka_producer_reset", broker=self.name, error=why)
            old, reports = self._producer, self._reports
            self._producer = self._reports = None
            # Purge first (nothing left to flush when the old producer is dropped), then
            # let the reports thread serve the purged records' reports (their callers are
            # waiting), then stop it.
            with contextlib.suppress(Exception):
                old.purge()
            if reports is not None:
                await asyncio.to_thread(reports.stop)
            try:
                await self.connect()
            except BaseException as exc:
                log.warning("kafka_producer_reset_failed", broker=self.name, error=repr(exc))
                if not isinstance(exc, Exception):
                    raise

    async def _topics_without_metadata(
        self, producer: Any, batch: Sequence[OutgoingMessage]
    ) -> dict[str, PublishResult]:
        """Topics of the batch without metadata: their messages fail alone and early
        (adapters/_topics.py) instead of holding the whole call until publish_timeout."""
        topics = {out.destination for out in batch if valid_topic(out.destination)}
        wait = min(METADATA_WAIT_S, self.options.request_timeout)
        return await self._topics.missing(
            topics, lambda topic: asyncio.to_thread(self._wait_for_topic, producer, topic, wait)
        )

    @staticmethod
    def _wait_for_topic(producer: Any, topic: str, wait: float) -> None:
        """Metadata for `topic`, asking again while the broker creates it (auto-creation
        answers "leader not available" at first); KafkaException if it never comes."""
        deadline = time.monotonic() + wait
        while True:
            metadata = producer.list_topics(topic, timeout=max(0.1, deadline - time.monotonic()))
            found = metadata.topics.get(topic)
            if found is not None and found.error is None and found.partitions:
                return
            if time.monotonic() >= deadline:
                raise KafkaException(found.error if found is not None else "no such topic")
            time.sleep(0.1)

    async def _produce(
        self, producer: Any, reports: _Reports, out: OutgoingMessage
    ) -> asyncio.Future[Any] | PublishResult:
        if not valid_topic(out.destination):
            return PublishResult.permanent(f"invalid Kafka topic name {out.destination!r}")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        key = out.message.key.encode("utf-8") if out.message.key is not None else None
        while True:
            try:
                producer.produce(
                    out.destination,
                    value=out.message.payload,
                    key=key,
                    headers=record_headers(out),
                    on_delivery=lambda err, msg, f=future: reports.delivered(f, err, msg),
                )
                return future
            except BufferError:
                await asyncio.sleep(POLL_S)  # the local queue is full: the polling thread drains it
            except KafkaException as exc:
                return classify(exc.args[0])
