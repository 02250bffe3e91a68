"""Independent consumers that read what the relay published: aiokafka, pika basic_get,
redis-py's XRANGE (its synchronous client: nothing of the adapter's) and boto3's SQS
ReceiveMessage.

They share nothing with the adapters under test, so a passing test means the broker
really holds the message.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import boto3
import pika
import redis
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka import errors as kafka_errors
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.support.waiting import wait_until


@dataclass
class Received:
    message_id: str
    key: str | None
    payload: bytes
    headers: dict[str, str] = field(default_factory=dict)
    properties: dict[str, Any] = field(default_factory=dict)


async def kafka_read(
    bootstrap: str,
    topic: str,
    count: int,
    *,
    timeout: float = 30.0,
    distinct: bool = True,
    isolation_level: str = "read_uncommitted",
) -> list[Received]:
    """Read `topic` from the beginning until `count` distinct messages (by message-id
    header; records without one count each) arrived or `timeout` passed. Duplicates
    do not count, so a test that allows them still reads every message.
    `distinct=False`: until `count` records arrived, copies included."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
        metadata_max_age_ms=1000,
        isolation_level=isolation_level,
    )
    await consumer.start()
    received: list[Received] = []
    seen: set[str | tuple[int, int]] = set()
    try:
        deadline = time.monotonic() + timeout
        while (len(seen) if distinct else len(received)) < count and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    headers = {k: v.decode() for k, v in record.headers}
                    seen.add(headers.get("message-id") or (record.partition, record.offset))
                    received.append(
                        Received(
                            message_id=headers.get("message-id", ""),
                            key=record.key.decode() if record.key is not None else None,
                            payload=record.value or b"",
                            headers=headers,
                            # timestamp (ms): the producer's, or the broker's append time (LogAppendTime topics).
                            properties={
                                "partition": record.partition,
                                "offset": record.offset,
                                "timestamp": record.timestamp,
                            },
                        )
                    )
    finally:
        await consumer.stop()
    return received


async def kafka_scan_to_end(
    bootstrap: str, topic: str, each: Callable[[ConsumerRecord], None], *, isolation_level: str, timeout: float = 60.0
) -> None:
    """Hand `each` every record of `topic` the consumer can see now, partition by
    partition in offset order: read from the beginning until its position reaches each
    partition's end offset (with read_committed, the last stable offset: every
    transaction before it is decided). The end is the positive signal that nothing more
    is there, so a test can count copies. `each` keeps what it needs of a record (a long
    soak's read-back would not fit in memory whole)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None, isolation_level=isolation_level
    )
    await consumer.start()
    try:
        cluster = await consumer._client.fetch_all_metadata()
        partitions = [TopicPartition(topic, p) for p in sorted(cluster.partitions_for_topic(topic) or [])]
        assert partitions, f"topic {topic!r} has no partitions"
        ends = await consumer.end_offsets(partitions)
        deadline = time.monotonic() + timeout
        for tp in partitions:  # one at a time: each partition's records in offset order
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            while await consumer.position(tp) < ends[tp]:
                assert time.monotonic() < deadline, f"{topic!r} not read to its end within {timeout}s"
                batches = await consumer.getmany(tp, timeout_ms=500)
                for record in batches.get(tp, []):
                    if record.offset < ends[tp]:
                        each(record)
    finally:
        await consumer.stop()


def received_of(record: ConsumerRecord) -> Received:
    headers = {k: v.decode() for k, v in record.headers}
    return Received(
        message_id=headers.get("message-id", ""),
        key=record.key.decode() if record.key is not None else None,
        payload=record.value or b"",
        headers=headers,
        properties={"partition": record.partition, "offset": record.offset, "timestamp": record.timestamp},
    )


async def kafka_read_to_end(
    bootstrap: str, topic: str, *, isolation_level: str, timeout: float = 60.0
) -> list[Received]:
    """Every record of `topic` the consumer can see now (kafka_scan_to_end), ordered by
    partition and offset."""
    received: list[Received] = []
    await kafka_scan_to_end(
        bootstrap, topic, lambda r: received.append(received_of(r)), isolation_level=isolation_level, timeout=timeout
    )
    return received


async def kafka_create_topic(bootstrap: str, topic: str, *, partitions: int = 3, **config: str) -> None:
    """Create `topic` (replication factor 1, `config` as its settings) and return once
    the broker serves it (kafka_topic_served).

    CreateTopics answers each topic with an error code, which aiokafka's admin client
    hands back without raising: a refused creation used to pass unnoticed, and the
    relay's producer then auto-created the topic with the broker's defaults (3
    partitions, none of `config`). A topic that exists already is taken as it is."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        response = await admin.create_topics([NewTopic(topic, partitions, 1, topic_configs=config or None)])
    finally:
        await admin.close()
    for name, code, *why in response.topic_errors:  # (topic, error_code[, error_message])
        error = kafka_errors.for_code(code)
        if code and error is not kafka_errors.TopicAlreadyExistsError:
            raise error(f"topic {name!r} not created: {why[0] if why and why[0] else error.description}")
    await kafka_topic_served(bootstrap, topic)


async def kafka_topic_served(bootstrap: str, topic: str, *, timeout: float = 60.0) -> None:
    """Return once the broker serves `topic`: its metadata lists the topic, and the
    leader of each partition answers for it (ListOffsets, which a leader answers only
    once it holds the partition's log, as a produce needs).

    CreateTopics answers when the controller has committed the topic, not when the
    broker serves it. A relay started at once could find no metadata for it within its
    5 s wait: each of its messages then spends an attempt, and the topic is taken as
    missing for 5 s more (adapters/_topics.py), about the time the tests' quick
    retries (50 ms to 500 ms) take to spend the other 9 of 10 attempts. A broker slow
    to serve a new topic (the first one of a broker just started, on a loaded machine)
    could so dead-letter messages a test expects delivered."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        listed: set[int] = set()

        async def in_metadata() -> bool:
            cluster = await consumer._client.fetch_all_metadata()
            listed.update(cluster.partitions_for_topic(topic) or ())
            return bool(listed)

        await wait_until(in_metadata, timeout=timeout, interval=0.05, what=f"topic {topic!r} in the broker's metadata")
        # aiokafka retries ListOffsets while a leader is unknown or not ready yet.
        await asyncio.wait_for(consumer.end_offsets([TopicPartition(topic, p) for p in sorted(listed)]), timeout)
    finally:
        await consumer.stop()


class RabbitQueue:
    """A durable queue bound to an exchange, read with basic_get (pika, blocking)."""

    def __init__(
        self,
        url: str,
        exchange: str,
        queue: str,
        binding: str = "#",
        exchange_type: str = "topic",
        arguments: dict[str, Any] | None = None,
    ):
        self._connection = pika.BlockingConnection(pika.URLParameters(url))
        self._channel = self._connection.channel()
        self._channel.exchange_declare(exchange, exchange_type=exchange_type, durable=True)
        self._channel.queue_declare(queue, durable=True, arguments=arguments)
        self._channel.queue_bind(queue, exchange, routing_key=binding)
        self.queue = queue

    def read(self, count: int, *, timeout: float = 20.0) -> list[Received]:
        received: list[Received] = []
        deadline = time.monotonic() + timeout
        while len(received) < count and time.monotonic() < deadline:
            method, props, body = self._channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                self._connection.sleep(0.05)
                continue
            received.append(_received(method, props, body))
        return received

    def scan(self, each: Callable[[Received], None]) -> int:
        """Hand `each` every message the queue holds now, in queue order, until it is
        empty (the positive signal once nothing publishes any more); return how many."""
        handed = 0
        while True:
            method, props, body = self._channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                return handed
            each(_received(method, props, body))
            handed += 1

    def close(self) -> None:
        if self._connection.is_open:
            self._connection.close()


def _received(method: Any, props: Any, body: bytes) -> Received:
    return Received(
        message_id=props.message_id,
        key=None,
        payload=body,
        headers={k: str(v) for k, v in (props.headers or {}).items()},
        properties={
            "routing_key": method.routing_key,
            "content_type": props.content_type,
            "delivery_mode": props.delivery_mode,
            "timestamp": props.timestamp,
        },
    )


async def rabbit_read(queue: RabbitQueue, count: int, *, timeout: float = 20.0) -> list[Received]:
    return await asyncio.to_thread(queue.read, count, timeout=timeout)


def redis_entry(stream: str, entry_id: bytes | str, fields: dict[bytes, bytes]) -> Received:
    """A stream entry as the redis adapter writes it (adapters/redis_streams.py)."""
    key = fields.get(b"key")
    return Received(
        message_id=fields[b"message_id"].decode(),
        key=key.decode() if key is not None else None,
        payload=fields[b"payload"],
        headers=json.loads(fields[b"headers"]),
        properties={
            "stream": stream,
            "id": entry_id.decode() if isinstance(entry_id, bytes) else entry_id,
            "topic": fields[b"topic"].decode(),
            "content_type": fields[b"content_type"].decode(),
            "created_at": fields[b"created_at"].decode(),
        },
    )


def redis_entries(url: str, stream: str) -> list[Received]:
    """Every entry of `stream` now, in stream order (XRANGE - +)."""
    with redis.Redis.from_url(url) as client:
        return [redis_entry(stream, entry_id, fields) for entry_id, fields in client.xrange(stream, "-", "+")]


async def redis_read(url: str, stream: str, count: int, *, timeout: float = 20.0) -> list[Received]:
    """The entries of `stream`, once it holds at least `count` (or at `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        received = await asyncio.to_thread(redis_entries, url, stream)
        if len(received) >= count or time.monotonic() > deadline:
            return received
        await asyncio.sleep(0.05)


class SqsEndpoint(Protocol):
    """Where an SQS-compatible server is, and the identity to sign with (tests.services.SqsServer)."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str


def sqs_client(server: SqsEndpoint) -> Any:
    """A boto3 SQS client of its own, with the server's identity given explicitly."""
    return boto3.session.Session().client(
        "sqs",
        endpoint_url=server.endpoint_url,
        region_name=server.region,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
    )


class SqsQueue:
    """A queue made for a test (FIFO when its name ends in .fifo), read with a boto3
    client that shares nothing with the adapter: ReceiveMessage, then DeleteMessageBatch
    (a FIFO queue hands out a group's next message only once the one before is deleted)."""

    def __init__(self, server: SqsEndpoint, name: str):
        self._client = sqs_client(server)
        attributes = {"FifoQueue": "true"} if name.endswith(".fifo") else {}
        self.name = name
        self.url: str = self._client.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]

    def _receive(self, wait: int) -> list[Received]:
        answer = self._client.receive_message(
            QueueUrl=self.url,
            MaxNumberOfMessages=10,
            WaitTimeSeconds=wait,
            AttributeNames=["All"],  # what servers without MessageSystemAttributeNames read
            MessageSystemAttributeNames=["All"],
            MessageAttributeNames=["All"],
        )
        messages = answer.get("Messages", [])
        if messages:
            self._client.delete_message_batch(
                QueueUrl=self.url,
                Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)],
            )
        return [_sqs_received(m, self.url) for m in messages]

    def read(self, count: int, *, timeout: float = 20.0) -> list[Received]:
        received: list[Received] = []
        deadline = time.monotonic() + timeout
        while len(received) < count and time.monotonic() < deadline:
            received += self._receive(wait=1)
        return received

    def scan(self, each: Callable[[Received], None]) -> int:
        """Hand `each` every message the queue holds now, in queue order, until a receive
        finds none; return how many."""
        handed = 0
        while got := self._receive(wait=0):
            for received in got:
                each(received)
            handed += len(got)
        return handed


def _sqs_received(message: dict[str, Any], url: str) -> Received:
    attributes = {name: value.get("StringValue", "") for name, value in message.get("MessageAttributes", {}).items()}
    body = message["Body"]
    payload = base64.b64decode(body) if attributes.get("body-encoding") == "base64" else body.encode()
    system = message.get("Attributes", {})
    message_id = attributes.get("message-id", "")
    group = system.get("MessageGroupId")
    return Received(
        message_id=message_id,
        key=None if group == message_id else group,  # a keyless message's group is its id
        payload=payload,
        headers=json.loads(attributes.get("headers", "{}")),
        properties={
            "queue_url": url,
            "sqs_message_id": message["MessageId"],
            "sequence_number": system.get("SequenceNumber"),
            "deduplication_id": system.get("MessageDeduplicationId"),
            "attributes": attributes,
        },
    )


async def sqs_read(queue: SqsQueue, count: int, *, timeout: float = 20.0) -> list[Received]:
    return await asyncio.to_thread(queue.read, count, timeout=timeout)
