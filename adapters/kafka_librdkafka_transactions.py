"""Exactly once into Kafka with librdkafka (confluent-kafka): one relay's transactional
producer, as kafka_transactions.py is for aiokafka (same protocol, same offsets topic,
same positions; its docstring says how the relay uses them).

Fencing: ``start()`` runs ``init_transactions``, which bumps the transactional id's
epoch, so any older producer with the id is refused from then on (librdkafka's fatal
``_FENCED``) and the transaction it left open is aborted.

The records go out through the adapter's own code (kafka_librdkafka.py: rounds,
partitions, early refusals) on a LibrdkafkaAdapter made transactional, which never
replaces its producer itself: after any failure the relay aborts, which drops the
producer, and starts a new one. librdkafka's transactional calls block: they run in a
thread, as the adapter's flush() does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any

import structlog

from outbox_relay.adapter import Fenced, TransactionFailed
from outbox_relay.errors import first_line
from outbox_relay.models import OutgoingMessage, PublishResult

from ._kafka_common import CLOSE_WAIT_S, KafkaOptions
from ._offsets import check_cleanup_policy, new_topic_settings, not_read_back, undecided, windows
from .kafka_librdkafka import FENCED_CODES, LIBRDKAFKA_LOG, LibrdkafkaAdapter, client_config, fatal_error

try:
    from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

    # Re-exported by confluent_kafka.admin without __all__, which mypy does not see.
    from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType  # type: ignore[attr-defined]
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the kafka adapter's librdkafka client needs confluent-kafka: pip install 'outbox-relay[librdkafka]'"
    ) from exc

log = structlog.get_logger("outbox_relay.kafka")
POLL_S = 0.5
STABLE_WAIT_S = 0.1  # between looks at the last stable offset (_stable_end)


def _error_of(exc: BaseException) -> Any:
    """The KafkaError a confluent-kafka call raised (fatal ones too: fatal_error)."""
    found = fatal_error(exc)
    if found is None and isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        found = exc.args[0]
    return found


def _marks(consumer: Any, tp: Any, timeout: float) -> tuple[int, int]:
    """The partition's (low, high) watermarks from the broker: the high one is the last
    stable offset for a read_committed consumer, the high watermark otherwise (both seen
    on the broker while a transaction was open). Raises KafkaException on a timeout."""
    low, high = consumer.get_watermark_offsets(tp, timeout, cached=False)
    return int(low), int(high)


class LibrdkafkaTransactions:
    """One transactional producer; see outbox_relay/adapter.py (Transactions)."""

    def __init__(self, name: str, options: KafkaOptions, transactional_id: str):
        self.name = name
        self.transactional_id = transactional_id
        self._options = options
        self._topic = options.offsets_topic
        self._publisher = LibrdkafkaAdapter(name, options, transactional_id=transactional_id)
        self._timeout = options.request_timeout
        self._topic_checked = False

    @property
    def fenced(self) -> bool:
        return self._publisher.fenced

    async def start(self) -> None:
        await self.abort()
        if not self._topic_checked:
            await self._check_offsets_topic()
            self._topic_checked = True
        await self._publisher.connect()
        try:
            # Registers the id (fencing every older producer with it, aborting what one
            # left open), so that a fenced or unauthorised id, or a coordinator that
            # cannot be found, fails start() and not the first send.
            await asyncio.to_thread(self._producer().init_transactions, self._timeout)
        except BaseException as exc:
            await self.abort()
            error = _error_of(exc)
            if error is None:
                raise
            raise ConnectionError(f"kafka transactions not started: {first_line(error.str())}") from exc
        log.info("kafka_transactions_started", broker=self.name, transactional_id=self.transactional_id)

    def _producer(self) -> Any:
        producer = self._publisher._producer
        if producer is None:
            raise TransactionFailed("the transactional producer is not started")
        return producer

    async def begin(self) -> None:
        try:
            self._producer().begin_transaction()  # local: no broker round trip
        except KafkaException as exc:
            self._note_fenced(exc)
            raise

    async def publish(self, batch: Sequence[OutgoingMessage]) -> Sequence[PublishResult]:
        return await self._publisher.publish(batch)

    async def commit(self, key: str, position: bytes) -> None:
        if self.fenced:
            raise Fenced(f"transactional id {self.transactional_id!r} fenced")
        producer = self._producer()
        try:
            producer.produce(self._topic, value=position, key=key.encode("utf-8"), partition=0)
            # Sends what is still queued (the position), then commits; raises if any
            # record of the transaction failed or no answer came within the timeout.
            await asyncio.to_thread(producer.commit_transaction, self._timeout)
        except (KafkaException, SystemError, BufferError) as exc:
            if self._note_fenced(exc):
                raise Fenced(f"transactional id {self.transactional_id!r} fenced: {self._reason(exc)}") from exc
            raise TransactionFailed(f"commit failed: {self._reason(exc)}") from exc

    def _note_fenced(self, exc: BaseException) -> bool:
        """Whether `exc` says a newer producer fenced this one (noted on the adapter)."""
        error = _error_of(exc)
        if error is not None and (error.fatal() or error.code() in FENCED_CODES):
            self._publisher.fell(error)
        return self.fenced

    @staticmethod
    def _reason(exc: BaseException) -> str:
        error = _error_of(exc)
        return f"{error.name()}: {first_line(error.str())}" if error is not None else first_line(exc)

    async def abort(self) -> None:
        producer, self._publisher._producer = self._publisher._producer, None
        if producer is None:
            return
        with contextlib.suppress(Exception):
            # Best effort (no open transaction, a broker away, a fatal error): the next
            # start() aborts what this one cannot, since a new producer with the same id
            # ends its transaction.
            await asyncio.to_thread(producer.abort_transaction, min(self._timeout, CLOSE_WAIT_S))
        with contextlib.suppress(Exception):
            # What is left is of the aborted transaction: purged, not delivered.
            producer.purge()
            await asyncio.to_thread(producer.flush, 0)

    async def close(self) -> None:
        await self.abort()

    async def position(self, key: str) -> bytes | None:
        """Read the offsets topic back from its end, a window at a time, until a
        committed record of `key` turns up (_offsets.windows). First wait for every
        transaction on it to be decided (_stable_end): raises PositionUndecided past
        request_timeout, which the relay retries. In one thread, which closes its
        consumers itself: a cancelled call's thread still polls them, up to its deadlines."""
        try:
            return await asyncio.to_thread(self._read_position, key.encode("utf-8"))
        except KafkaException as exc:
            raise ConnectionError(f"offsets_topic {self._topic!r} not read: {self._reason(exc)}") from exc

    def _consumer(self, isolation: str) -> Any:
        return Consumer(
            {
                **client_config(self._options),
                # Required by confluent-kafka; no group is joined (assign) nor committed to.
                "group.id": f"{self._options.client_id}-positions",
                # librdkafka's default is read_committed: always said.
                "isolation.level": isolation,
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "logger": LIBRDKAFKA_LOG,
            }
        )

    def _read_position(self, key: bytes) -> bytes | None:
        tp = TopicPartition(self._topic, 0)
        high = self._high_watermark(tp)
        consumer = self._consumer("read_committed")
        try:
            first, end = self._stable_end(consumer, tp, high)
            for start, stop in windows(first, end):
                found = self._last_of(consumer, key, start, stop)
                if found is not None:
                    return found
            return None
        finally:
            consumer.close()

    def _high_watermark(self, tp: Any) -> int:
        """The partition's end as a read_uncommitted consumer sees it: every record written."""
        consumer = self._consumer("read_uncommitted")
        try:
            return _marks(consumer, tp, self._timeout)[1]
        finally:
            consumer.close()

    def _stable_end(self, consumer: Any, tp: Any, high: int) -> tuple[int, int]:
        """The offsets partition's (first, end) once everything written to it up to `high`
        is decided. A read_committed consumer's end is the last stable offset, behind the
        first open transaction, which may be another relay's (the topic is shared by every
        slot): every later position, this relay's own too, is invisible until it ends, and
        reading up to it would find a stale one. So wait for it to reach `high`."""
        deadline = time.monotonic() + self._timeout
        while True:
            first, stable = _marks(consumer, tp, max(deadline - time.monotonic(), STABLE_WAIT_S))
            if stable >= high:
                return first, stable
            if time.monotonic() > deadline:
                raise undecided(self._topic, high, self._timeout)
            time.sleep(STABLE_WAIT_S)

    def _last_of(self, consumer: Any, key: bytes, start: int, end: int) -> bytes | None:
        """The last value of `key` in offsets [start, end)."""
        consumer.assign([TopicPartition(self._topic, 0, start)])
        found: bytes | None = None
        deadline = time.monotonic() + self._timeout
        while time.monotonic() < deadline:
            message = consumer.poll(POLL_S)
            if message is None:
                continue
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:  # read_committed: the last stable offset
                    return found
                raise KafkaException(error)
            if message.offset() >= end:
                return found
            if message.key() == key:
                found = message.value()
            if message.offset() == end - 1:
                return found
        raise not_read_back(self._topic, self._timeout)

    async def _check_offsets_topic(self) -> None:
        """Create the offsets topic if it is missing; refuse one that is not compacted."""
        admin = AdminClient(client_config(self._options), logger=LIBRDKAFKA_LOG)
        try:
            # All topics: asking for this one by name could have the broker create it
            # (auto.create.topics.enable) with the default, deleting, policy.
            metadata = await asyncio.to_thread(admin.list_topics, timeout=self._timeout)
            if self._topic not in metadata.topics:
                replicas, config = new_topic_settings(len(metadata.brokers))
                new = NewTopic(self._topic, num_partitions=1, replication_factor=replicas, config=config)
                try:
                    await self._result(admin.create_topics([new], request_timeout=self._timeout)[self._topic])
                except KafkaException as exc:
                    if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                        raise
                log.info("kafka_offsets_topic_created", broker=self.name, topic=self._topic, replicas=replicas)
                return
            resource = ConfigResource(ResourceType.TOPIC, self._topic)
            entries = await self._result(admin.describe_configs([resource], request_timeout=self._timeout)[resource])
            found = entries.get("cleanup.policy")
            check_cleanup_policy(self.name, self._topic, "delete" if found is None else str(found.value))
        except KafkaException as exc:
            raise ConnectionError(f"offsets_topic {self._topic!r} not checked: {self._reason(exc)}") from exc

    async def _result(self, future: Any) -> Any:
        """The result of an admin call's future, waited for without holding the loop."""
        return await asyncio.wait_for(asyncio.wrap_future(future), self._timeout + CLOSE_WAIT_S)
