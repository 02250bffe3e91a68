"""``type: kafka``, ``client: aiokafka`` (the default): publishes with aiokafka,
idempotent producer, acks=all. kafka.py chooses the client.

A message becomes a record: topic = the route's destination, key = the message key
(UTF-8), value = the payload, headers = the message headers plus ``message-id`` and
``content-type``. The adapter builds the record batches itself, one per partition per
round, and awaits every batch's answer before any result is reported, so a row is
never marked on an un-awaited send. A key's run may come in one call
(``keeps_key_order``): its records share one batch per round and the batch's fate, and
after a refusal the key's later records are not sent (adapters/_rounds.py says why the
producer alone does not give this).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any, cast

import structlog

from outbox_relay.errors import first_line
from outbox_relay.models import OutgoingMessage, PublishResult

from ._kafka_common import CLOSE_WAIT_S, NEEDS_AIOKAFKA, KafkaClientBase, KafkaOptions, start_if_missing, too_large
from ._options import TlsOptions, tls_context
from ._rounds import Batch, Entry, Rounds
from ._topics import valid_topic

try:
    from aiokafka import AIOKafkaProducer
    from aiokafka import errors as kafka_errors
    from aiokafka.record.default_records import DefaultRecordBatchBuilder
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(NEEDS_AIOKAFKA) from exc

log = structlog.get_logger("outbox_relay.kafka")


# The broker will refuse these however often we try: dead-letter them with its reason.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    kafka_errors.MessageSizeTooLargeError,
    kafka_errors.RecordListTooLargeError,
    kafka_errors.RecordTooLargeError,
    kafka_errors.InvalidTopicError,
    kafka_errors.TopicAuthorizationFailedError,
    kafka_errors.ClusterAuthorizationFailedError,
    kafka_errors.TransactionalIdAuthorizationFailed,
    kafka_errors.UnsupportedForMessageFormatError,
    kafka_errors.CorruptRecordException,
)


SIZE_ERRORS: tuple[type[BaseException], ...] = (
    kafka_errors.MessageSizeTooLargeError,
    kafka_errors.RecordListTooLargeError,
    kafka_errors.RecordTooLargeError,
)

# After any of these the idempotent producer's sequence numbers no longer match the
# broker's for some partition, and every later send to it would fail the same way:
# a new producer (new producer id, fresh sequences) is the way out. A rejected
# record leaves such a gap, so broker-side rejections start a new producer too.
PRODUCER_RESET_ERRORS: tuple[type[BaseException], ...] = (
    kafka_errors.OutOfOrderSequenceNumber,
    kafka_errors.UnknownProducerId,
    kafka_errors.InvalidProducerEpoch,
    kafka_errors.InvalidProducerIdMapping,
    kafka_errors.ProducerFenced,
    *PERMANENT_ERRORS,
)


# The broker is not answering at all (down, restarting, unreachable): nothing is wrong
# with the message, so waiting for it spends none of its attempts and a long outage
# dead-letters nothing. Other retriable errors (leader changes, not enough replicas,
# unknown topic) count, so a condition that never clears ends in a dead letter.
BROKER_AWAY_ERRORS: tuple[type[BaseException], ...] = (
    kafka_errors.KafkaConnectionError,
    kafka_errors.KafkaTimeoutError,
    kafka_errors.RequestTimedOutError,
    kafka_errors.NodeNotReadyError,
)


def _fail_buffered(producer: AIOKafkaProducer) -> None:
    """Fail the records `producer` still buffers, and take their errors as seen.

    A batch's future whose publish call ended first (its publish_timeout) has no one
    left to read its error: asyncio then logs "Future exception was never retrieved"
    at error level when it is collected, an error line per batch after every outage
    for a failure the relay already handled (the batch's rows are still pending).
    """
    accumulator = producer._message_accumulator
    # aiokafka's internals, read defensively: without them only the error lines remain.
    batches = [batch for queue in getattr(accumulator, "_batches", {}).values() for batch in queue]
    batches += list(getattr(accumulator, "_pending_batches", ()))
    accumulator.fail_all(kafka_errors.KafkaTimeoutError("producer closed by outbox-relay"))
    for batch in batches:
        futures = [getattr(batch, "future", None), *(future for future, _ in getattr(batch, "_msg_futures", ()))]
        for future in futures:
            if future is not None and future.done() and not future.cancelled():
                future.exception()


async def stop_within(producer: AIOKafkaProducer, wait: float) -> None:
    """Stop `producer`, waiting at most about 2 x `wait`.

    aiokafka's stop() first waits for every buffered record to be delivered, which with
    idempotence during a broker outage is forever: a relay told to stop would hang, and
    a producer reset would hold every worker. Past `wait`, the records still buffered
    are failed (aiokafka has no public call for that: its accumulator's fail_all, the
    same it uses on a fatal error), which lets stop() close the connections.
    """
    stopping = asyncio.ensure_future(producer.stop())
    done, _ = await asyncio.wait({stopping}, timeout=wait)
    if not done:
        log.warning("kafka_producer_stop_dropping_buffered_records", waited_s=wait)
        _fail_buffered(producer)
        done, _ = await asyncio.wait({stopping}, timeout=wait)
    if not done:
        # Still stuck: end what stop() would have ended, so that no sender task keeps
        # retrying records and no connection stays open behind a "closed" producer.
        stopping.cancel()
        sender = producer._sender
        if sender is not None and sender.sender_task is not None:
            sender.sender_task.cancel()
        try:
            await asyncio.wait_for(producer.client.close(), wait)
        except Exception as exc:  # closing is best effort here; the producer is dropped
            log.warning("kafka_producer_close_failed", error=first_line(exc))
        log.warning("kafka_producer_stop_abandoned", waited_s=2 * wait)
        return
    try:
        stopping.result()
    except Exception as exc:
        # stop() can fail inside aiokafka's sender: during a broker outage, a batch that
        # fail_all (above) had already failed was re-enqueued (KeyError). The producer is
        # dropped either way, so close its connections and go on: raising here ended the
        # relay's WAL source, and with it the relay process (an exactly-once abort).
        log.warning("kafka_producer_stop_failed", error_type=type(exc).__name__, error=first_line(exc))
        try:
            await asyncio.wait_for(producer.client.close(), wait)
        except Exception as close_exc:  # best effort, as above
            log.warning("kafka_producer_close_failed", error=first_line(close_exc))


def _host_port(server: str) -> str:
    host, colon, port = server.rpartition(":")
    if not colon or not port.isdigit():
        host, port = server, "9092"  # no port given (a bare host, or a bracketed IPv6)
    return f"{host.strip('[]')}:{port}"


class _ClientErrors(logging.Handler):
    """While active, keeps the last error aiokafka logged about one of `servers` (it
    logs the cause of a failed bootstrap and raises a generic error). aiokafka's logger
    is the process's: another broker's adapter connecting at the same time logs there
    too, so only lines naming this adapter's servers count."""

    def __init__(self, servers: str | Sequence[str]) -> None:
        super().__init__(logging.ERROR)
        listed = servers.split(",") if isinstance(servers, str) else servers
        # aiokafka writes 'Unable connect to "host:port": cause', the host unbracketed,
        # the port 9092 when none was given. Host and port: two listeners of one broker
        # (PLAINTEXT and SASL_SSL) are two adapters' servers.
        self._servers = [f'"{_host_port(server.strip())}"' for server in listed]
        self.last: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if not any(server in message for server in self._servers):
            return
        # 'Unable connect to "host:port": <cause>': keep the cause.
        self.last = first_line(message.split('": ', 1)[-1])[:500] if message else None

    def __enter__(self) -> _ClientErrors:
        logging.getLogger("aiokafka").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("aiokafka").removeHandler(self)


def producer_settings(options: KafkaOptions, transactional_id: str | None = None) -> dict[str, Any]:
    """aiokafka producer arguments; the benchmark's raw producer uses the same."""
    settings: dict[str, Any] = {
        **client_settings(options),
        "acks": "all",
        "enable_idempotence": True,
        "compression_type": None if options.compression == "none" else options.compression,
        "linger_ms": int(options.linger * 1000),
        "max_batch_size": options.max_batch_size,
        "max_request_size": options.max_request_size,
    }
    if transactional_id is not None:
        settings["transactional_id"] = transactional_id
    return settings


def client_settings(options: KafkaOptions) -> dict[str, Any]:
    """What every aiokafka client of the broker block shares: servers, timeout, TLS, SASL."""
    settings: dict[str, Any] = {
        "bootstrap_servers": options.bootstrap_servers,
        "client_id": options.client_id,
        "request_timeout_ms": int(options.request_timeout * 1000),
    }
    tls = options.tls
    if tls:
        settings["ssl_context"] = tls_context(tls if isinstance(tls, TlsOptions) else TlsOptions())
    if options.sasl:
        settings["security_protocol"] = "SASL_SSL" if tls else "SASL_PLAINTEXT"
        settings["sasl_mechanism"] = options.sasl.mechanism
        settings["sasl_plain_username"] = options.sasl.username
        settings["sasl_plain_password"] = options.sasl.password.get_secret_value()
    elif tls:
        settings["security_protocol"] = "SSL"
    return settings


def classify(exc: BaseException) -> PublishResult:
    """A failed send, as the engine should treat it."""
    reason = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
    if isinstance(exc, PERMANENT_ERRORS):
        return PublishResult.permanent(reason)
    if isinstance(exc, BROKER_AWAY_ERRORS):
        return PublishResult.unavailable(reason)
    return PublishResult.transient(reason)


class _TopicCreatedOnFirstUse(logging.Filter):
    """aiokafka logs "Topic ... not found in cluster metadata" at error level when the
    broker answers a topic's first metadata request while it creates the topic (Kafka's
    auto.create.topics.enable): the record is then published fine, and an error line
    for it sends a newcomer looking for a fault. So, for a topic's first
    CREATION_GRACE_S of "not found", the line goes down to debug; past that (a topic
    that stays missing, or one deleted under a running relay) it keeps aiokafka's level,
    the one line that names the topic. Every other aiokafka line keeps its level."""

    CREATION_GRACE_S = 5.0

    def __init__(self) -> None:
        super().__init__()
        self._first_missing: dict[object, float] = {}  # topic -> when first said missing

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "Topic %s not found in cluster metadata" and isinstance(record.args, tuple) and record.args:
            if len(self._first_missing) > 10_000:  # bounded, whatever topics come and go
                self._first_missing.clear()
            first = self._first_missing.setdefault(record.args[0], time.monotonic())
            if time.monotonic() - first < self.CREATION_GRACE_S:
                record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


# On aiokafka's logger, not a handler: whoever handles its records (the relay's log
# setup, a test's capture) sees the lowered level.
logging.getLogger("aiokafka.cluster").addFilter(_TopicCreatedOnFirstUse())


class KafkaAdapter(KafkaClientBase):
    # Same key, same partition, one batch per partition per round, and a key that
    # failed is left out of later rounds (adapters/_rounds.py): a key's run can go in
    # one call.
    def __init__(self, name: str, options: KafkaOptions, *, transactional_id: str | None = None):
        super().__init__(name, options, transactional_id=transactional_id)
        self._producer: AIOKafkaProducer | None = None

    async def connect(self) -> None:
        producer = AIOKafkaProducer(**producer_settings(self.options, self._transactional_id))
        errors = _ClientErrors(self.options.bootstrap_servers)
        try:
            with errors:
                await producer.start()  # connects and fetches metadata
        except BaseException as exc:
            await producer.stop()
            if isinstance(exc, kafka_errors.KafkaConnectionError) and errors.last:
                # aiokafka raises "Unable to bootstrap from [...]" and only logs why (a
                # refused SASL login, a certificate it does not trust): say why.
                raise ConnectionError(f"kafka unreachable: {errors.last}") from None
            raise
        self._producer = producer

    async def _new_producer(self, seen: AIOKafkaProducer | None) -> None:
        """Replace the producer `seen` by a fresh one, once: workers sharing this adapter
        may ask together, and only the first replaces it (no leaked producers)."""
        async with self._lifecycle:
            if self._producer is not seen:
                return
            log.info("kafka_producer_reset", broker=self.name)
            await self.close()
            try:
                await self.connect()
            except Exception as exc:
                # Left disconnected: the next publish connects or answers "unavailable".
                log.warning("kafka_producer_reset_failed", broker=self.name, error=repr(exc))

    async def close(self) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            await stop_within(producer, CLOSE_WAIT_S)

    async def ready(self) -> bool:
        # Starts a producer if there is none, as publish would: the engine probes a
        # broker that stopped answering with ready() before it sends it messages again.
        if await self._reconnect() is not None or self._producer is None:
            return False
        try:
            await asyncio.wait_for(self._producer.client.fetch_all_metadata(), self.options.request_timeout)
        except Exception:
            return False
        return bool(self._producer.client.cluster.brokers())

    async def _topics_without_metadata(
        self, producer: AIOKafkaProducer, batch: Sequence[OutgoingMessage]
    ) -> dict[str, PublishResult]:
        """Topics of the batch without metadata: their messages fail alone and early
        (adapters/_topics.py); without this, `send` waits the whole request timeout for
        each and holds up the rest of the batch."""
        topics = {out.destination for out in batch if valid_topic(out.destination)}
        return await self._topics.missing(topics, producer.partitions_for)

    async def _reconnect(self) -> str | None:
        if self._transactional_id is not None:
            # Its owner restarts it, between transactions (kafka_transactions.py).
            return None if self._producer is not None else "transactional producer not started"
        # repr: aiokafka's connection errors often have an empty message.
        return await start_if_missing(self, repr)

    async def publish(self, batch: Sequence[OutgoingMessage]) -> Sequence[PublishResult]:
        problem = await self._reconnect()
        if problem is not None:
            return [PublishResult.unavailable(problem)] * len(batch)
        producer = self._producer
        if producer is None:
            return [PublishResult.unavailable("kafka producer not connected")] * len(batch)
        missing = await self._topics_without_metadata(producer, batch)
        rounds = Rounds(batch)
        for topic in {out.destination for out in batch if valid_topic(out.destination)} - set(missing):
            # Returns at once when the producer has the topic's metadata; a producer
            # started since the topic was first seen (a reset) fetches it, as send() would.
            try:
                await producer.partitions_for(topic)
            except Exception as exc:
                missing[topic] = classify(exc)
        partitions = _Partitions(producer, self.options.max_batch_size)
        for index, out in enumerate(batch):
            entry = Entry(index, out)
            entry.early = self._refused_early(entry, missing)
            partition = 0 if entry.early is not None else partitions.of(out.destination, entry.key, entry.size)
            rounds.queue((out.destination, partition), entry)
        while rounds:
            answered = await self._send_round(producer, rounds)
            if not answered:
                break
            if self._producer is not producer:  # reset after a refusal: the rest goes on the new one
                producer = self._producer
                if producer is None:
                    rounds.answer_the_rest(PublishResult.unavailable("kafka producer not connected"))
        return rounds.final()

    def _refused_early(self, entry: Entry, missing: Mapping[str, PublishResult]) -> PublishResult | None:
        out = entry.out
        if not valid_topic(out.destination):
            return PublishResult.permanent(f"invalid Kafka topic name {out.destination!r}")
        if out.destination in missing:
            return missing[out.destination]
        size = entry.size = DefaultRecordBatchBuilder.estimate_size_in_bytes(
            entry.key, out.message.payload, entry.headers
        )
        if size > self.options.max_request_size:  # what AIOKafkaProducer.send refuses too
            return too_large(size, self.options, by_broker=False)
        return None

    async def _send_round(self, producer: AIOKafkaProducer, rounds: Rounds) -> bool:
        """Send one round (one batch per partition, _rounds.py) and settle its answers.
        False if nothing was left to send."""

        def add(builder: object, entry: Entry) -> bool:
            appended = builder.append(  # type: ignore[attr-defined]
                timestamp=None, key=entry.key, value=entry.out.message.payload, headers=entry.headers
            )
            return appended is not None

        batches = rounds.next_round(lambda _group: producer.create_batch(), add)
        if not batches:
            return False
        outcomes = await asyncio.gather(*(self._send_batch(producer, b) for b in batches), return_exceptions=True)
        reset = False
        for sent, outcome in zip(batches, outcomes, strict=True):
            if isinstance(outcome, asyncio.CancelledError):  # the producer dropped it (a reset)
                outcome = kafka_errors.KafkaTimeoutError("batch dropped by a producer reset")
            if not isinstance(outcome, BaseException):
                # The batch's metadata holds its base offset: its records follow it in
                # the order they were appended, one offset each. A batch the broker had
                # already (a duplicate sequence after a retry) comes back with no valid
                # offset: its receipt names the partition only.
                partition, base = outcome.partition, outcome.offset  # type: ignore[attr-defined]
                for n, entry in enumerate(sent.entries):
                    receipt = f'{{"partition":{partition},"offset":{base + n}}}' if base >= 0 else None
                    rounds.settle(entry, PublishResult.acked(receipt or f'{{"partition":{partition}}}'))
                continue
            reset = reset or isinstance(outcome, PRODUCER_RESET_ERRORS)
            self.fenced = self.fenced or isinstance(outcome, kafka_errors.ProducerFenced)
            if isinstance(outcome, SIZE_ERRORS) and len(sent.entries) > 1:
                log.info("kafka_batch_too_large", broker=self.name, records=len(sent.entries))
                rounds.again_alone(sent)
                continue
            result = classify(outcome)
            if isinstance(outcome, kafka_errors.MessageSizeTooLargeError):  # one record, alone in its batch
                result = too_large(sent.entries[0].size, self.options, by_broker=True)
            for entry in sent.entries:
                rounds.settle(entry, result)
        if reset and self._transactional_id is None:
            await self._new_producer(producer)
        return True

    @staticmethod
    async def _send_batch(producer: AIOKafkaProducer, batch: Batch) -> object:
        topic, partition = cast(tuple[str, int], batch.group)
        delivered = await producer.send_batch(batch.builder, topic, partition=partition)
        return await delivered


class _Partitions:
    """The partition of each record of one call, chosen here because the batches are
    built here: the producer's own partitioner (murmur2 of the key, as send() would
    choose), over the topic's partitions read once per call (send() reads them, as new
    lists, for every record) and applied once per key.

    Keyless records stick to one partition, picked at random among the available ones
    (as the partitioner picks a keyless record's) and not yet used by this call while
    there is one, until about a record batch's worth (`max_batch_size`) went to it;
    then the next is picked: the "sticky" partitioning
    of Kafka's own clients (KIP-480). Keyless records have no order to keep, and fewer,
    fuller batches mean fewer produce requests for the client and the broker, where a
    partition per record spread a call thin over every partition. Never more than a
    batch per partition: a round sends one batch per partition (adapters/_rounds.py),
    so a call of large records still spreads over the partitions and goes in as few
    rounds as before.
    """

    def __init__(self, producer: AIOKafkaProducer, batch_bytes: int):
        self._producer = producer
        self._batch_bytes = batch_bytes
        self._lists: dict[str, tuple[list[int], list[int]]] = {}
        self._keyed: dict[tuple[str, bytes], int] = {}
        self._sticky: dict[str, tuple[int, int]] = {}  # topic -> (partition, bytes so far)
        self._used: dict[str, set[int]] = {}  # topic -> partitions keyless records went to

    def of(self, topic: str, key: bytes | None, size: int) -> int:
        if key is not None:
            chosen = self._keyed.get((topic, key))
            if chosen is None:
                chosen = self._keyed[(topic, key)] = self._pick(topic, key)
            return chosen
        partition, filled = self._sticky.get(topic, (-1, 0))
        if partition < 0 or (filled and filled + size > self._batch_bytes):
            partition, filled = self._pick_keyless(topic), 0
        self._sticky[topic] = (partition, filled + size)
        return partition

    def _pick(self, topic: str, key: bytes) -> int:
        return int(self._producer._partitioner(key, *self._partitions(topic)))

    def _pick_keyless(self, topic: str) -> int:
        every, available = self._partitions(topic)
        candidates = available or every
        used = self._used.setdefault(topic, set())
        unused = [partition for partition in candidates if partition not in used]
        chosen = random.choice(unused or candidates)
        used.add(chosen)
        return int(chosen)

    def _partitions(self, topic: str) -> tuple[list[int], list[int]]:
        """The topic's partitions and its available ones, as send() reads them."""
        lists = self._lists.get(topic)
        if lists is None:
            metadata = self._producer._metadata
            lists = self._lists[topic] = (
                list(metadata.partitions_for_topic(topic)),
                list(metadata.available_partitions_for_topic(topic)),
            )
        return lists
