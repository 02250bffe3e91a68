"""One contract, run against every built-in adapter with its real broker or sink.

Each subclass says how to build the adapter for a fresh destination and how to read
that destination with an independent client; the tests are the contract of
outbox_relay.adapter.Adapter.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from outbox_relay_adapters.file import FileAdapter, FileOptions
from outbox_relay_adapters.kafka import create as create_kafka
from outbox_relay_adapters.nats import create as create_nats
from outbox_relay_adapters.rabbitmq import create as create_rabbitmq
from outbox_relay_adapters.redis_streams import create as create_redis
from outbox_relay_adapters.sqs import create as create_sqs
from outbox_relay_adapters.stdout import StdoutAdapter
from outbox_relay_adapters.webhook import create as create_webhook

from outbox_relay.adapter import Adapter, keeps_key_order
from outbox_relay.json_lines import decode_payload
from outbox_relay.models import Message, Outcome, OutgoingMessage
from tests.consumers import (
    RabbitQueue,
    Received,
    SqsQueue,
    kafka_read,
    kafka_scan_to_end,
    rabbit_read,
    received_of,
    redis_entries,
    redis_read,
    sqs_read,
)
from tests.services import (
    KAFKA_SCRAM_PASSWORD,
    KAFKA_SCRAM_USER,
    NATS_PASSWORD,
    NATS_USER,
    REDIS_RELAY_PASSWORD,
    REDIS_RELAY_USER,
    NatsServer,
    Secure,
    SqsServer,
)
from tests.support.factories import message
from tests.support.http import HttpReceiver, answer
from tests.support.jetstream import make_stream, message_at, stream_read

Reader = Callable[[int], Awaitable[list[Received]]]
# locate([(receipt, message id)]) -> the message id an independent client finds where
# each receipt says its message landed, in the order given.
Locator = Callable[[list[tuple[dict[str, Any], str]]], Awaitable[list[str]]]


@dataclass
class Target:
    adapter: Adapter
    destination: str
    read: Reader  # read(count) -> what an independent client sees
    explicit: bool = False
    locate: Locator | None = None  # None: the adapter gives no receipt


def record_to_received(record: dict[str, Any]) -> Received:
    payload = decode_payload(record)
    raw = (
        payload
        if isinstance(payload, bytes)
        else (payload.encode() if isinstance(payload, str) else json.dumps(payload, separators=(",", ":")).encode())
    )
    return Received(record["message_id"], record["key"], raw, record["headers"])


def kafka_locator(bootstrap: str, topic: str) -> Locator:
    """The message id of the record at each receipt's partition and offset."""

    async def locate(receipts: list[tuple[dict[str, Any], str]]) -> list[str]:
        at: dict[tuple[int, int], str] = {}
        await kafka_scan_to_end(
            bootstrap,
            topic,
            lambda r: at.__setitem__((r.partition, r.offset), received_of(r).message_id),
            isolation_level="read_uncommitted",
        )
        return [at.get((receipt["partition"], receipt["offset"]), "nothing there") for receipt, _ in receipts]

    return locate


def rabbit_locator(queue: RabbitQueue, exchange: str) -> Locator:
    """RabbitMQ gives a message no position: the receipt names the exchange and routing
    key it was confirmed for, and the queue bound there holds the message."""

    async def locate(receipts: list[tuple[dict[str, Any], str]]) -> list[str]:
        assert all(receipt["exchange"] == exchange and receipt["confirmed"] is True for receipt, _ in receipts)
        received = {r.message_id: r for r in await rabbit_read(queue, len(receipts))}
        return [
            mid
            for receipt, mid in receipts
            if mid in received and received[mid].properties["routing_key"] == receipt["routing_key"]
        ]

    return locate


def nats_locator(url: str, stream: str, ca_file: str | None = None) -> Locator:
    """The message id (Nats-Msg-Id) of the message at each receipt's stream sequence."""

    async def locate(receipts: list[tuple[dict[str, Any], str]]) -> list[str]:
        assert all(receipt["stream"] == stream and receipt["duplicate"] is False for receipt, _ in receipts)
        return [await message_at(url, stream, receipt["seq"], ca_file=ca_file) for receipt, _ in receipts]

    return locate


def redis_locator(url: str, stream: str) -> Locator:
    """The message id of the entry each receipt names (its stream key and entry id)."""

    async def locate(receipts: list[tuple[dict[str, Any], str]]) -> list[str]:
        assert all(receipt["stream"] == stream for receipt, _ in receipts)
        at = {r.properties["id"]: r.message_id for r in redis_entries(url, stream)}
        return [at.get(receipt["id"], "nothing there") for receipt, _ in receipts]

    return locate


def sqs_locator(queue: SqsQueue) -> Locator:
    """SQS gives a message no readable position: the receipt names the queue and SQS's own
    message id (and a FIFO queue's sequence number, when the server gives one), and the
    queue holds a message with that SQS id (and sequence number) and the relay's id."""

    async def locate(receipts: list[tuple[dict[str, Any], str]]) -> list[str]:
        assert all(receipt["queue_url"] == queue.url for receipt, _ in receipts), receipts
        held = {r.properties["sqs_message_id"]: r for r in await sqs_read(queue, len(receipts))}
        found = []
        for receipt, _ in receipts:
            there = held.get(receipt["sqs_message_id"])
            # ElasticMQ 1.7.1 answers a FIFO SendMessageBatch without SequenceNumber (SQS
            # gives one): compared when the receipt has it.
            sequence = receipt.get("sequence_number")
            if there is None or (sequence is not None and there.properties["sequence_number"] != sequence):
                found.append("nothing there")
            else:
                found.append(there.message_id)
        return found

    return locate


class AdapterContract:
    @pytest.fixture
    async def target(self) -> AsyncIterator[Target]:  # overridden by each adapter
        raise NotImplementedError
        yield

    async def _publish(self, target: Target, messages: list[Message]) -> list[Outcome]:
        batch = [OutgoingMessage(m, target.destination, target.explicit) for m in messages]
        results = await target.adapter.publish(batch)
        assert len(results) == len(batch)
        return [r.outcome for r in results]

    async def test_ready_after_connect(self, target: Target) -> None:
        assert await target.adapter.ready()

    async def test_empty_batch(self, target: Target) -> None:
        assert list(await target.adapter.publish([])) == []

    async def test_every_message_is_acked_and_readable_with_its_id(self, target: Target) -> None:
        messages = [message(i, key=f"k{i % 7}" if i % 3 else None) for i in range(60)]
        assert await self._publish(target, messages) == [Outcome.ACKED] * 60
        received = await target.read(60)
        assert sorted(r.message_id for r in received) == sorted(str(m.message_id) for m in messages)
        by_id = {str(m.message_id): m for m in messages}
        for r in received:
            assert r.payload == by_id[r.message_id].payload

    async def test_binary_payload_and_headers_survive(self, target: Target) -> None:
        sent = message(
            1,
            payload=b"\x00\xffbinary",
            content_type="application/octet-stream",
            headers={"trace-id": "abc", "tenant": "t1"},
        )
        assert await self._publish(target, [sent]) == [Outcome.ACKED]
        [got] = await target.read(1)
        assert got.message_id == str(sent.message_id)
        assert got.payload == b"\x00\xffbinary"
        assert got.headers["trace-id"] == "abc" and got.headers["tenant"] == "t1"

    async def test_a_keys_run_in_one_call_arrives_in_order(self, target: Target) -> None:
        # Adapters that declare keeps_key_order are handed a key's whole run at once.
        if not keeps_key_order(target.adapter):
            # Only these are handed one message per key per call.
            assert type(target.adapter).__name__ in {"WebhookAdapter", "RabbitAdapter", "NatsAdapter"}
            return
        run = [message(i, key="hot") for i in range(300)]
        assert await self._publish(target, run) == [Outcome.ACKED] * 300
        received = await target.read(300)
        assert [r.message_id for r in received] == [str(m.message_id) for m in run]

    async def test_each_ack_says_where_its_message_landed(self, target: Target) -> None:
        messages = [message(i, key=f"k{i % 3}" if i % 2 else None) for i in range(12)]
        batch = [OutgoingMessage(m, target.destination, target.explicit) for m in messages]
        results = await target.adapter.publish(batch)
        assert [r.outcome for r in results] == [Outcome.ACKED] * 12
        if target.locate is None:
            assert [r.receipt for r in results] == [None] * 12
            return
        receipts = [json.loads(r.receipt or "null") for r in results]
        assert all(isinstance(receipt, dict) for receipt in receipts), receipts
        ids = [str(m.message_id) for m in messages]
        assert await target.locate(list(zip(receipts, ids, strict=True))) == ids

    async def test_ack_means_already_readable(self, target: Target) -> None:
        sent = [message(i) for i in range(5)]
        assert await self._publish(target, sent) == [Outcome.ACKED] * 5
        # No waiting beyond the reader's own poll: the ack came after the broker had it.
        assert len(await target.read(5)) == 5


class TestStdout(AdapterContract):
    @pytest.fixture
    async def target(self) -> AsyncIterator[Target]:
        stream = io.StringIO()
        adapter = StdoutAdapter("stdout", stream=stream)
        await adapter.connect()

        async def read(count: int) -> list[Received]:
            return [record_to_received(json.loads(line)) for line in stream.getvalue().splitlines()]

        yield Target(adapter, "out", read)
        await adapter.close()


class TestFile(AdapterContract):
    @pytest.fixture
    async def target(self, tmp_path: Path) -> AsyncIterator[Target]:
        path = tmp_path / "sink" / "out.jsonl"
        adapter = FileAdapter("file", FileOptions(path=str(path)))
        await adapter.connect()

        async def read(count: int) -> list[Received]:
            return [record_to_received(json.loads(line)) for line in path.read_text().splitlines()]

        async def locate(receipts: list[tuple[dict[str, Any], str]]) -> list[str]:
            content = path.read_bytes()
            found = []
            for receipt, _ in receipts:
                assert receipt["path"] == str(path.absolute())
                line = content[receipt["offset"] :].split(b"\n", 1)[0]
                found.append(json.loads(line)["message_id"])
            return found

        yield Target(adapter, "out", read, locate=locate)
        await adapter.close()


@pytest.fixture
def http_receiver() -> Iterator[HttpReceiver]:
    with HttpReceiver(answer(204)) as receiver:
        yield receiver


class TestWebhook(AdapterContract):
    @pytest.fixture
    async def target(self, http_receiver: HttpReceiver) -> AsyncIterator[Target]:
        # A user and a token in the URL: the receipt shows neither.
        url = http_receiver.url.replace("://", "://relay:s3cret@") + "/events?token=s3cret#x"
        adapter = create_webhook("hook", {"url": url})
        await adapter.connect()

        async def read(count: int) -> list[Received]:
            for request in http_receiver.requests:
                assert request.headers["message-id"] == request.json["message_id"]
            return [record_to_received(r.json) for r in http_receiver.requests]

        async def locate(receipts: list[tuple[dict[str, Any], str]]) -> list[str]:
            # A URL and a status name no single message: the receiver got each message,
            # at that URL (without the secrets), and answered 204.
            assert all(receipt == {"url": f"{http_receiver.url}/events", "status": 204} for receipt, _ in receipts)
            assert all("s3cret" not in json.dumps(receipt) for receipt, _ in receipts)
            got = {r.json["message_id"] for r in http_receiver.requests if r.path.startswith("/events?")}
            return [mid for _, mid in receipts if mid in got]

        yield Target(adapter, "out", read, locate=locate)
        await adapter.close()


class TestKafka(AdapterContract):
    options: dict[str, Any] = {}

    @pytest.fixture
    async def target(self, kafka_bootstrap: str) -> AsyncIterator[Target]:
        adapter = create_kafka("kafka", {"bootstrap_servers": kafka_bootstrap, **self.options})
        await adapter.connect()
        topic = f"contract-{uuid.uuid4().hex[:10]}"

        async def read(count: int) -> list[Received]:
            return await kafka_read(kafka_bootstrap, topic, count)

        yield Target(adapter, topic, read, explicit=True, locate=kafka_locator(kafka_bootstrap, topic))
        await adapter.close()


class TestKafkaLibrdkafka(TestKafka):
    options = {"client": "librdkafka"}


class TestRabbitMQ(AdapterContract):
    options: dict[str, Any] = {}

    @pytest.fixture
    async def target(self, amqp_url: str) -> AsyncIterator[Target]:
        exchange = f"contract-{uuid.uuid4().hex[:10]}"
        queue = RabbitQueue(amqp_url, exchange, exchange + ".q")
        adapter = create_rabbitmq("rabbit", {"url": amqp_url, "exchange": exchange, **self.options})
        await adapter.connect()

        async def read(count: int) -> list[Received]:
            return await rabbit_read(queue, count)

        yield Target(adapter, exchange, read, explicit=True, locate=rabbit_locator(queue, exchange))
        await adapter.close()
        queue.close()


class TestRabbitMQPipelined(TestRabbitMQ):
    """RabbitMQ with pipeline_keys: a key's run in one call, on one channel."""

    options = {"pipeline_keys": True}


class TestSqsFifo(AdapterContract):
    """SQS (ElasticMQ) through a FIFO queue named by its name (resolved with GetQueueUrl):
    groups by key, deduplication by message id."""

    suffix = ".fifo"
    by_url = False

    @pytest.fixture
    async def target(self, sqs_server: SqsServer, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Target]:
        for name, value in sqs_server.env.items():  # boto3's chain: the identity from the environment
            monkeypatch.setenv(name, value)
        queue = SqsQueue(sqs_server, f"contract-{uuid.uuid4().hex[:10]}{self.suffix}")
        adapter = create_sqs("sqs", {"endpoint_url": sqs_server.endpoint_url})
        await adapter.connect()

        async def read(count: int) -> list[Received]:
            return await sqs_read(queue, count)

        destination = queue.url if self.by_url else queue.name
        yield Target(adapter, destination, read, explicit=True, locate=sqs_locator(queue))
        await adapter.close()


class TestSqsStandard(TestSqsFifo):
    """A standard queue, named by its URL. SQS promises a standard queue no order to its
    consumers; the adapter still sends a key's run in order (ElasticMQ keeps it)."""

    suffix = ""
    by_url = True


# --- the same contract over TLS, with SASL for Kafka (scripts/services: certs.sh) ----------


class TestKafkaSaslSsl(AdapterContract):
    """Kafka through its SASL_SSL listener: SCRAM-SHA-512, the broker verified by the test CA."""

    options: dict[str, Any] = {}

    @pytest.fixture
    async def target(self, kafka_secure: Secure) -> AsyncIterator[Target]:
        adapter = create_kafka(
            "kafka",
            {
                "bootstrap_servers": kafka_secure.address,
                "tls": {"ca_file": kafka_secure.ca_file},
                "sasl": {"mechanism": "SCRAM-SHA-512", "username": KAFKA_SCRAM_USER, "password": KAFKA_SCRAM_PASSWORD},
                **self.options,
            },
        )
        await adapter.connect()
        topic = f"contract-sasl-{uuid.uuid4().hex[:10]}"

        async def read(count: int) -> list[Received]:
            return await kafka_read(kafka_secure.plain, topic, count)

        yield Target(adapter, topic, read, explicit=True, locate=kafka_locator(kafka_secure.plain, topic))
        await adapter.close()


class TestKafkaLibrdkafkaSaslSsl(TestKafkaSaslSsl):
    options = {"client": "librdkafka"}


class TestRabbitMQTls(AdapterContract):
    """RabbitMQ over amqps://, the broker verified by the test CA."""

    @pytest.fixture
    async def target(self, rabbitmq_secure: Secure) -> AsyncIterator[Target]:
        exchange = f"contract-tls-{uuid.uuid4().hex[:10]}"
        queue = RabbitQueue(rabbitmq_secure.plain, exchange, exchange + ".q")
        adapter = create_rabbitmq(
            "rabbit",
            {"url": rabbitmq_secure.address, "exchange": exchange, "tls": {"ca_file": rabbitmq_secure.ca_file}},
        )
        await adapter.connect()

        async def read(count: int) -> list[Received]:
            return await rabbit_read(queue, count)

        yield Target(adapter, exchange, read, explicit=True, locate=rabbit_locator(queue, exchange))
        await adapter.close()
        queue.close()


class TestRedis(AdapterContract):
    @pytest.fixture
    async def target(self, redis_url: str) -> AsyncIterator[Target]:
        stream = f"contract-{uuid.uuid4().hex[:10]}"
        adapter = create_redis("redis", {"url": redis_url})
        await adapter.connect()

        async def read(count: int) -> list[Received]:
            return await redis_read(redis_url, stream, count)

        yield Target(adapter, stream, read, explicit=True, locate=redis_locator(redis_url, stream))
        await adapter.close()


class TestRedisTls(AdapterContract):
    """Redis over TLS as its ACL user ``relay`` (XADD, EVAL, PING, INFO on secure-* only),
    the server verified by the test CA."""

    @pytest.fixture
    async def target(self, redis_secure: Secure) -> AsyncIterator[Target]:
        stream = f"secure-contract-{uuid.uuid4().hex[:10]}"
        adapter = create_redis(
            "redis",
            {
                "url": redis_secure.address,
                "username": REDIS_RELAY_USER,
                "password": REDIS_RELAY_PASSWORD,
                "tls": {"ca_file": redis_secure.ca_file},
            },
        )
        await adapter.connect()

        async def read(count: int) -> list[Received]:
            return await redis_read(redis_secure.plain, stream, count)

        yield Target(adapter, stream, read, explicit=True, locate=redis_locator(redis_secure.plain, stream))
        await adapter.close()


async def nats_target(server: NatsServer, prefix: str, **options: Any) -> AsyncIterator[Target]:
    """A stream of its own, the subject the route's destination, for TestNats and
    TestNatsKeyRounds (their adapters differ only in `options`)."""
    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    subject = f"contract.{name}"
    await make_stream(server.url, name, [subject])
    adapter = create_nats("nats", {"servers": [server.url], "stream": name, **options})
    await adapter.connect()

    async def read(count: int) -> list[Received]:
        return await stream_read(server.url, name, count)

    yield Target(adapter, subject, read, explicit=True, locate=nats_locator(server.url, name))
    await adapter.close()


class TestNats(AdapterContract):
    """NATS JetStream: a stream of its own per test, the subject the route's destination."""

    @pytest.fixture
    async def target(self, nats_server: NatsServer) -> AsyncIterator[Target]:
        async for target in nats_target(nats_server, "contract"):
            yield target


class TestNatsKeyRounds(AdapterContract):
    """NATS with key_rounds: a key's whole run in one call, sent in rounds (keeps_key_order)."""

    @pytest.fixture
    async def target(self, nats_server: NatsServer) -> AsyncIterator[Target]:
        async for target in nats_target(nats_server, "contract-rounds", key_rounds=True):
            yield target


class TestNatsTls(AdapterContract):
    """NATS over TLS (the server verified by the test CA), as a user with a password."""

    @pytest.fixture
    async def target(self, nats_secure: NatsServer) -> AsyncIterator[Target]:
        name = f"contract-tls-{uuid.uuid4().hex[:10]}"
        subject = f"contract.{name}"
        tls_url, ca = nats_secure.tls_url, nats_secure.ca_file
        await make_stream(tls_url, name, [subject], ca_file=ca)
        options = {
            "servers": [nats_secure.tls_url],
            "tls": {"ca_file": ca},
            "user": NATS_USER,
            "password": NATS_PASSWORD,
        }
        adapter = create_nats("nats", options)
        await adapter.connect()

        async def read(count: int) -> list[Received]:
            return await stream_read(tls_url, name, count, ca_file=ca)

        yield Target(adapter, subject, read, explicit=True, locate=nats_locator(tls_url, name, ca))
        await adapter.close()
