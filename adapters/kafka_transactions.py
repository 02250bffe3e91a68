"""Exactly once into Kafka with aiokafka: one relay's transactional producer.

The WAL relay (outbox_relay/sources/wal/exactly_once.py) puts each batch in one Kafka
transaction together with the position the batch reaches, written to the broker block's
``offsets_topic`` (compacted: the last position of each key is kept). A ``read_committed``
consumer sees the records and the position together or not at all; a relay that starts
reads the last committed position back and skips what it covers, so a record is never
committed twice whatever stops where.

Fencing: the transactional id is the same for every relay that streams one slot, so
``start()`` (Kafka's InitProducerId) bumps its epoch: any older producer with the id
(a relay frozen, then thawed after a standby took over) is refused from then on
(``ProducerFenced``), and the transaction it left open is aborted.

The records go out through the adapter's own code (kafka_aiokafka.py: rounds, partitions,
early refusals), on a KafkaAdapter made transactional, which never replaces its
producer itself: after any failure the relay aborts, which drops the producer, and
starts a new one (a rejected record leaves a gap in the idempotent sequence; a new
producer id is the sure way past it).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import structlog

from outbox_relay.adapter import Fenced, TransactionFailed
from outbox_relay.errors import first_line
from outbox_relay.models import OutgoingMessage, PublishResult

from ._kafka_common import CLOSE_WAIT_S, NEEDS_AIOKAFKA, KafkaOptions
from ._offsets import check_cleanup_policy, new_topic_settings, undecided, windows
from .kafka_aiokafka import KafkaAdapter, client_settings, stop_within

try:
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka import errors as kafka_errors
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(NEEDS_AIOKAFKA) from exc

log = structlog.get_logger("outbox_relay.kafka")

POLL_MS = 100  # each poll of the offsets topic's read-back (KafkaTransactions._last_of)


def _retrieve_errors(producer: Any) -> None:
    """Read the errors aiokafka left in futures nobody awaits. A fenced producer's
    sender dies and fails the transaction's waiter and each record batch's drain
    waiter: unread, each is logged ("Future exception was never retrieved", with a
    ProducerFenced traceback) whenever it is garbage-collected."""
    accumulator = producer._message_accumulator
    batches = [*(b for queue in accumulator._batches.values() for b in queue), *accumulator._pending_batches]
    for waiter in [producer._txn_manager._transaction_waiter, *(b._drain_waiter for b in batches)]:
        if waiter is not None and waiter.done() and not waiter.cancelled():
            waiter.exception()


class KafkaTransactions:
    """One transactional producer; see outbox_relay/adapter.py (Transactions)."""

    def __init__(self, name: str, options: KafkaOptions, transactional_id: str):
        self.name = name
        self.transactional_id = transactional_id
        self._options = options
        self._topic = options.offsets_topic
        self._publisher = KafkaAdapter(name, options, transactional_id=transactional_id)
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
        producer = self._producer()
        try:
            # The producer registers its transactional id in the background (aiokafka's
            # sender): wait for it here, so that a fenced or unauthorised id, or a
            # coordinator that cannot be found, fails start() and not the first send.
            await asyncio.wait_for(producer._txn_manager.wait_for_pid(), self._timeout)
        except BaseException:
            await self.abort()
            raise
        log.info("kafka_transactions_started", broker=self.name, transactional_id=self.transactional_id)

    def _producer(self) -> Any:
        producer = self._publisher._producer
        if producer is None:
            raise TransactionFailed("the transactional producer is not started")
        return producer

    async def begin(self) -> None:
        await self._producer().begin_transaction()

    async def publish(self, batch: Sequence[OutgoingMessage]) -> Sequence[PublishResult]:
        producer = self._publisher._producer
        if producer is not None and producer._txn_manager.is_in_transaction():
            # The offsets partition joins the transaction now, in the AddPartitionsToTxn
            # request of the batch's own partitions, instead of in a request of its own
            # when commit() writes the position: a round trip less per transaction (the
            # benchmark's exactly-once latency: docs/explanation/performance-wal.md,
            # "Exactly once against its targets").
            producer._txn_manager.maybe_add_partition_to_txn(TopicPartition(self._topic, 0))
        return await self._publisher.publish(batch)

    async def commit(self, key: str, position: bytes) -> None:
        producer = self._producer()
        try:
            sent = await producer.send(self._topic, position, key=key.encode("utf-8"), partition=0)
            await asyncio.wait_for(sent, self._timeout)
            await asyncio.wait_for(producer.commit_transaction(), self._timeout)
        except (kafka_errors.ProducerFenced, kafka_errors.InvalidProducerEpoch) as exc:
            self._publisher.fenced = True
            raise Fenced(f"transactional id {self.transactional_id!r} fenced: {first_line(exc)}") from exc
        except Exception as exc:
            if self._publisher.fenced:
                raise Fenced(f"transactional id {self.transactional_id!r} fenced") from exc
            raise TransactionFailed(f"commit failed: {type(exc).__name__}: {first_line(exc)}") from exc

    async def abort(self) -> None:
        producer = self._publisher._producer
        if producer is None:
            return
        if producer._txn_manager.is_in_transaction():
            with contextlib.suppress(Exception):
                # Best effort: the next start() aborts what this one cannot (a broker
                # away), since a new producer with the same id ends its transaction.
                await asyncio.wait_for(producer.abort_transaction(), min(self._timeout, CLOSE_WAIT_S))
        self._publisher._producer = None
        await stop_within(producer, CLOSE_WAIT_S)
        _retrieve_errors(producer)

    async def close(self) -> None:
        await self.abort()

    async def position(self, key: str) -> bytes | None:
        """Read the offsets topic back from its end, a window at a time, until a
        committed record of `key` turns up (_offsets.windows). First wait for every
        transaction on it to be decided (_stable_end): raises PositionUndecided past
        request_timeout, which the relay retries."""
        consumer = AIOKafkaConsumer(
            **client_settings(self._options),
            isolation_level="read_committed",
            enable_auto_commit=False,
            group_id=None,
        )
        try:
            await consumer.start()
            tp = TopicPartition(self._topic, 0)
            consumer.assign([tp])
            first = (await consumer.beginning_offsets([tp]))[tp]
            end = await self._stable_end(consumer, tp)
            wanted = key.encode("utf-8")
            for start, stop in windows(first, end):
                found = await self._last_of(consumer, tp, wanted, start, stop)
                if found is not None:
                    return found
            return None
        finally:
            await consumer.stop()

    async def _stable_end(self, consumer: Any, tp: Any) -> int:
        """The end of the offsets partition once everything written to it is decided:
        read_committed reads stop at the last stable offset, behind the first open
        transaction, which may be another relay's (the topic is shared by every slot),
        and every later position (this relay's own too) is invisible until it ends. So
        wait for the last stable offset to reach the high watermark read first."""
        high = await _high_watermark(self._options, tp)
        deadline = asyncio.get_running_loop().time() + self._timeout
        while True:
            stable = int((await consumer.end_offsets([tp]))[tp])
            if stable >= high:
                return stable
            if asyncio.get_running_loop().time() > deadline:
                raise undecided(self._topic, high, self._timeout)
            await asyncio.sleep(POLL_MS / 1000)

    async def _last_of(self, consumer: Any, tp: Any, key: bytes, start: int, end: int) -> bytes | None:
        consumer.seek(tp, start)
        found: bytes | None = None
        deadline = asyncio.get_running_loop().time() + self._timeout
        while await consumer.position(tp) < end:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"offsets topic {self._topic!r} not read back within {self._timeout:g}s")
            # Short polls: where a fetch holds only aborted records and transaction markers
            # (an aborted transaction at the end of the topic), getmany returns nothing
            # while the position moves past them, and a long poll would wait it all out.
            batches = await consumer.getmany(tp, timeout_ms=POLL_MS)
            for record in batches.get(tp, []):
                if record.offset < end and record.key == key:
                    found = record.value
        return found

    async def _check_offsets_topic(self) -> None:
        """Create the offsets topic if it is missing; refuse one that is not compacted."""
        admin = AIOKafkaAdminClient(**client_settings(self._options))
        try:
            await admin.start()
            if self._topic not in await admin.list_topics():
                replicas, config = new_topic_settings(len((await admin.describe_cluster())["brokers"]))
                with contextlib.suppress(kafka_errors.TopicAlreadyExistsError):
                    await admin.create_topics([NewTopic(self._topic, 1, replicas, topic_configs=config)])
                log.info("kafka_offsets_topic_created", broker=self.name, topic=self._topic, replicas=replicas)
                return
            check_cleanup_policy(self.name, self._topic, await self._cleanup_policy(admin))
        finally:
            await admin.close()

    async def _cleanup_policy(self, admin: Any) -> str:
        resource = ConfigResource(ConfigResourceType.TOPIC, self._topic, configs=None)
        for response in await admin.describe_configs([resource]):
            for _code, _message, _type, _name, entries in response.resources:
                for entry in entries:
                    if entry[0] == "cleanup.policy":
                        return str(entry[1])
        return "delete"


async def _high_watermark(options: KafkaOptions, tp: Any) -> int:
    """The partition's end as a read_uncommitted consumer sees it: every record written."""
    consumer = AIOKafkaConsumer(**client_settings(options), enable_auto_commit=False, group_id=None)
    try:
        await consumer.start()
        return int((await consumer.end_offsets([tp]))[tp])
    finally:
        await consumer.stop()
