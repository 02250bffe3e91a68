"""The key-order rule of ``keeps_key_order``, against each ordered adapter's real broker.

An adapter that declares ``keeps_key_order`` is handed a key's whole run in one call,
and promises that once message *i* of a key is not acked, no later message of that key
in the call is acked, nor written (outbox_relay.adapter.Adapter). The engine's ordering
tests use FakeAdapter, which obeys the rule by construction; these test the adapters.

The broker rejects a record by its size here (Kafka: the topic's ``max.message.bytes``;
RabbitMQ: a queue that refuses what would take it over ``x-max-length-bytes``; Redis:
the adapter's ``max_entry_bytes``, before sending, and the server itself in the middle of
a run: a key that is not a stream answers WRONGTYPE; SQS: the adapter's
``max_message_bytes``, and for a failure the server decides in the middle of a run, a
message of the run sent to a queue that does not exist), in the two layouts that
broke the rule before (issue 17, item 1):

- the poison first in a key's run, the run spread over several producer batches, on a
  fresh producer (a broker with no state for a producer id accepts any first sequence,
  so sequence numbers do not stop the records after a rejected batch);
- an innocent message of key ``k`` sharing a rejected batch with another key's record,
  the next message of ``k`` in a later batch.

What the broker holds is read back with an independent client, up to a marker message
published after the run (the positive signal that everything sent has arrived).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from outbox_relay_adapters.kafka import create as create_kafka
from outbox_relay_adapters.nats import create as create_nats
from outbox_relay_adapters.rabbitmq import create as create_rabbitmq
from outbox_relay_adapters.redis_streams import create as create_redis
from outbox_relay_adapters.sqs import create as create_sqs
from structlog.testing import capture_logs

from outbox_relay.adapter import Adapter, keeps_key_order
from outbox_relay.models import Message, Outcome, OutgoingMessage, PublishResult
from tests.consumers import (
    RabbitQueue,
    Received,
    SqsQueue,
    kafka_create_topic,
    kafka_read,
    rabbit_read,
    redis_entries,
    sqs_read,
)
from tests.services import NatsServer, SqsServer
from tests.support.factories import message
from tests.support.jetstream import make_stream, stream_read

LIMIT = 4096  # bytes the destination accepts: a record (Kafka) or the queue (RabbitMQ)


@dataclass
class Rejecting:
    """An adapter connected to a fresh destination that refuses records over LIMIT."""

    adapter: Adapter
    destination: str
    read_all: Callable[[str], Awaitable[list[Received]]]  # everything up to a marker's id
    destination_url: str = ""  # SQS: the queue's URL (destination is its name)


def msg(n: int, key: str, size: int) -> Message:
    return message(n, payload=b"x" * size, key=key)


def assert_rule(
    sent: list[Message], outcomes: list[Outcome], received: list[Received], *, after_the_fact: bool = False
) -> None:
    """Per key: acked messages are a prefix of its run, and the broker holds exactly those, in order.

    `after_the_fact`: the broker decides each message on its own after later ones were
    sent (RabbitMQ with pipeline_keys, a documented exception): acked ones need not be a
    prefix, but the broker still holds exactly the acked ones, in order."""
    on_broker = [r.message_id for r in received]
    assert len(on_broker) == len(set(on_broker)), f"a record was written twice: {on_broker}"
    for key in {m.key for m in sent}:
        run = [(str(m.message_id), outcome) for m, outcome in zip(sent, outcomes, strict=True) if m.key == key]
        acked = [mid for mid, outcome in run if outcome is Outcome.ACKED]
        prefix = [mid for mid, _ in run[: len(acked)]]
        assert after_the_fact or acked == prefix, (
            f"key {key!r}: a later message acked after an earlier one failed: {run}"
        )
        ids = {mid for mid, _ in run}
        assert [mid for mid in on_broker if mid in ids] == acked, (
            f"key {key!r}: the broker holds {[mid for mid in on_broker if mid in ids]}, acked in order: {acked}"
        )


Make = Callable[[dict[str, Any]], Awaitable[Rejecting]]  # client options -> a Rejecting


class KeyOrderContract:
    """Each subclass builds a `Rejecting` for the given client options."""

    # Client options that put other-1 and k-2 (3,000 + 1,500 bytes, over the limit
    # together) in one batch and k-3 in the next.
    neighbour_options: dict[str, Any] = {"max_batch_size": 4800}
    # Kafka dead-letters a record too large for the topic; RabbitMQ's nack of a full
    # queue is an answer about the queue now, not the message (transient).
    size_rejection: Outcome = Outcome.PERMANENT
    after_the_fact = False
    # The adapter logs this when a batch was refused as too large and its records go
    # again alone: the proof that a case really met a refused batch (None: no batches).
    refusal_event: str | None = "kafka_batch_too_large"

    @pytest.fixture
    async def rejecting(self) -> AsyncIterator[Make]:  # overridden
        raise NotImplementedError
        yield

    async def _run(self, target: Rejecting, sent: list[Message]) -> list[Outcome]:
        results = await target.adapter.publish([OutgoingMessage(m, target.destination, True) for m in sent])
        outcomes = [r.outcome for r in results]
        marker = message(999, key="marker")
        [marked] = await target.adapter.publish([OutgoingMessage(marker, target.destination, True)])
        assert marked.outcome is Outcome.ACKED, marked
        received = await target.read_all(str(marker.message_id))
        assert_rule(sent, outcomes, received, after_the_fact=self.after_the_fact)
        return outcomes

    async def test_poison_first_on_a_fresh_producer(self, rejecting: Make) -> None:
        target = await rejecting({"max_batch_size": 1024})
        assert keeps_key_order(target.adapter)
        sent = [msg(1, "k", 20_000), msg(2, "k", 10), msg(3, "k", 10)]
        outcomes = await self._run(target, sent)
        assert outcomes[0] is self.size_rejection, outcomes
        if not self.after_the_fact:
            assert outcomes[1:] == [Outcome.NOT_SENT] * 2, outcomes

    async def test_innocent_neighbour_in_a_rejected_batch(self, rejecting: Make) -> None:
        await self._innocent_neighbour(await rejecting(self.neighbour_options))

    async def _innocent_neighbour(self, target: Rejecting) -> None:
        sent = [msg(1, "other", 3000), msg(2, "k", 1500), msg(3, "k", 600)]
        with capture_logs() as logs:
            outcomes = await self._run(target, sent)
        if self.refusal_event is not None:
            assert any(e["event"] == self.refusal_event for e in logs), "no batch was refused: the case proves nothing"
        # Each fits alone: none of them is the poison, so none is dead-lettered.
        assert Outcome.PERMANENT not in outcomes, outcomes
        assert outcomes[0] is Outcome.ACKED, outcomes


class TestKafka(KeyOrderContract):
    options: dict[str, Any] = {}

    async def test_a_request_limit_below_the_batch_size_splits_no_run(self, rejecting: Make) -> None:
        # A client ends a batch at max_request_size when that is the smaller limit.
        options = {"max_batch_size": 10_000, "max_request_size": 5000}
        await self._innocent_neighbour(await rejecting(options))
        target = await rejecting(options)
        outcomes = await self._run(target, [msg(1, "k", 4200), msg(2, "k", 600), msg(3, "k", 600)])
        assert outcomes == [Outcome.PERMANENT, Outcome.NOT_SENT, Outcome.NOT_SENT], outcomes

    async def test_a_record_refused_before_sending_leaves_its_keys_earlier_answer_alone(self, rejecting: Make) -> None:
        # k-2 is over max_request_size (refused before it is sent) while k-1, in flight,
        # is refused by the broker: k-1 must get its own answer, not "not_sent".
        target = await rejecting({"max_batch_size": 16_384, "max_request_size": 8000})
        outcomes = await self._run(target, [msg(1, "k", 5000), msg(2, "k", 9000), msg(3, "k", 10)])
        assert outcomes == [Outcome.PERMANENT, Outcome.NOT_SENT, Outcome.NOT_SENT], outcomes

    @pytest.fixture
    async def rejecting(self, kafka_bootstrap: str) -> AsyncIterator[Make]:
        adapters: list[Adapter] = []

        async def make(client_options: dict[str, Any]) -> Rejecting:
            topic = f"order-{uuid.uuid4().hex[:10]}"
            await kafka_create_topic(kafka_bootstrap, topic, partitions=1, **{"max.message.bytes": str(LIMIT)})
            adapter = create_kafka("kafka", {"bootstrap_servers": kafka_bootstrap, **client_options, **self.options})
            await adapter.connect()  # a fresh producer: the broker has no state for its id
            adapters.append(adapter)

            async def read_all(marker: str) -> list[Received]:
                received: list[Received] = []
                for _ in range(10):  # kafka_read stops at a count: read until the marker is in
                    received = await kafka_read(kafka_bootstrap, topic, len(received) + 1, timeout=5)
                    if any(r.message_id == marker for r in received):
                        return [r for r in received if r.message_id != marker]
                raise AssertionError(f"the marker never arrived on {topic}")

            return Rejecting(adapter, topic, read_all)

        yield make
        for adapter in adapters:
            await adapter.close()


class TestKafkaLibrdkafka(TestKafka):
    options = {"client": "librdkafka"}
    # The adapter over-estimates a record's size in a round (adapters/kafka_librdkafka.py),
    # so it takes a larger round limit to put other-1 and k-2 in one batch.
    neighbour_options = {"max_batch_size": 8000}


class TestRabbitMQPipelined(KeyOrderContract):
    """RabbitMQ with pipeline_keys (a key's run in one call): the queue bound to the
    exchange refuses a message that would take it over LIMIT bytes (reject-publish), so
    the broker nacks it.

    RabbitMQ judges each message when it arrives, after the next ones were published on
    the channel: it can nack *i* and take *i+1*. That is the documented price of
    ``pipeline_keys`` (docs/how-to/rabbitmq.md; the engine logs ``key_order_exception``), so
    here the broker must hold exactly what was acked, in order, and nothing else."""

    size_rejection = Outcome.TRANSIENT
    after_the_fact = True
    refusal_event = None  # every message is confirmed on its own: no batches

    @pytest.fixture
    async def rejecting(self, amqp_url: str) -> AsyncIterator[Make]:
        made: list[tuple[Adapter, RabbitQueue]] = []

        async def make(_client_options: dict[str, Any]) -> Rejecting:  # batch sizes are Kafka's
            exchange = f"order-{uuid.uuid4().hex[:10]}"
            queue = RabbitQueue(
                amqp_url,
                exchange,
                exchange + ".q",
                arguments={"x-max-length-bytes": LIMIT, "x-overflow": "reject-publish"},
            )
            adapter = create_rabbitmq("rabbit", {"url": amqp_url, "exchange": exchange, "pipeline_keys": True})
            await adapter.connect()
            made.append((adapter, queue))

            async def read_all(marker: str) -> list[Received]:
                received: list[Received] = []
                while not any(r.message_id == marker for r in received):
                    got = await rabbit_read(queue, 1)
                    assert got, f"the marker never arrived on {queue.queue}"
                    received += got
                return [r for r in received if r.message_id != marker]

            return Rejecting(adapter, exchange, read_all)

        yield make
        for adapter, queue in made:
            await adapter.close()
            queue.close()


class TestSqsFifo(KeyOrderContract):
    """SQS FIFO (ElasticMQ): SendMessageBatch judges each entry on its own and may take a
    group's entry after refusing the one before, so the adapter sends a key's run one
    message per round. The shared cases refuse by the adapter's ``max_message_bytes``
    (LIMIT) before sending; the last case has the server refuse in the middle of a run."""

    refusal_event = None  # SQS batches carry one message per key: nothing to split

    @pytest.fixture
    async def rejecting(self, sqs_server: SqsServer, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Make]:
        for name, value in sqs_server.env.items():
            monkeypatch.setenv(name, value)
        adapters: list[Adapter] = []

        async def make(_client_options: dict[str, Any]) -> Rejecting:
            # Kafka's batch sizes mean nothing here; the adapter's own limit does.
            options = {"max_message_bytes": LIMIT}
            queue = SqsQueue(sqs_server, f"order-{uuid.uuid4().hex[:10]}.fifo")
            adapter = create_sqs("sqs", {"endpoint_url": sqs_server.endpoint_url, **options})
            await adapter.connect()
            adapters.append(adapter)

            async def read_all(marker: str) -> list[Received]:
                received: list[Received] = []
                while not any(r.message_id == marker for r in received):
                    got = await sqs_read(queue, 1, timeout=10)
                    assert got, f"the marker never arrived on {queue.name}"
                    received += got
                return [r for r in received if r.message_id != marker]

            return Rejecting(adapter, queue.name, read_all, queue.url)

        yield make
        for adapter in adapters:
            await adapter.close()

    async def test_the_server_refusing_mid_run_stops_the_key(self, rejecting: Make) -> None:
        # ElasticMQ 1.7.1 takes any size and any characters (the adapter enforces SQS's
        # limits itself), so the refusal here is another one the server makes: the third
        # of key k's five goes to a queue URL that does not exist (a URL is not resolved
        # first: the server answers QueueDoesNotExist to the SendMessageBatch itself),
        # beside key j's run to the real queue.
        target = await rejecting({})
        missing = target.destination_url.rsplit("/", 1)[0] + f"/missing-{uuid.uuid4().hex[:8]}.fifo"
        sent = [
            msg(1, "k", 10),
            msg(2, "j", 10),
            msg(3, "k", 10),
            msg(4, "j", 10),
            msg(5, "k", 10),
            msg(6, "j", 10),
            msg(7, "k", 10),
            msg(8, "k", 10),
        ]
        batch = [OutgoingMessage(m, missing if m.id == 5 else target.destination, True) for m in sent]
        results = await target.adapter.publish(batch)
        outcomes = [r.outcome for r in results]
        assert outcomes == [Outcome.ACKED] * 4 + [Outcome.PERMANENT, Outcome.ACKED] + [Outcome.NOT_SENT] * 2, results
        assert "does not exist" in (results[4].reason or ""), results[4]
        marker = message(999, key="marker")
        [marked] = await target.adapter.publish([OutgoingMessage(marker, target.destination, True)])
        assert marked.outcome is Outcome.ACKED, marked
        assert_rule(sent, outcomes, await target.read_all(str(marker.message_id)))


class TestRedis(KeyOrderContract):
    """Redis: a payload over ``max_entry_bytes`` is refused before it is sent (the server
    would close the connection on a bulk over its proto-max-bulk-len); and below, the
    server itself fails an XADD in the middle of a key's run (WRONGTYPE), which in a
    plain pipeline would not stop the key's next XADD.

    Redis has no record batches shared between keys: the call's pipeline is the nearest
    thing, so the innocent-neighbour case is redone below with the neighbour refused in
    that pipeline (by the server, or by ``max_entry_bytes``)."""

    refusal_event = None  # one command per key's run: no batches shared between keys

    @pytest.mark.parametrize("refused_by", ["server", "max_entry_bytes"])
    async def test_innocent_neighbour_in_a_rejected_batch(  # type: ignore[override]
        self, rejecting: Make, redis_url: str, refused_by: str
    ) -> None:
        # The shared case sends three payloads under LIMIT that Redis all takes: nothing
        # is refused, so it could not fail. Here other-1 is refused in the call's pipeline
        # (its stream key holds a string: WRONGTYPE; or it is over max_entry_bytes), and
        # key k's run in the same pipeline must be untouched by it.
        target = await rejecting({})
        bad = f"order-bad-{uuid.uuid4().hex[:10]}"
        with redis.Redis.from_url(redis_url) as admin:
            admin.set(bad, "not a stream")
        other = msg(1, "other", 3000 if refused_by == "server" else LIMIT + 1)
        sent = [other, msg(2, "k", 1500), msg(3, "k", 600)]
        batch = [
            OutgoingMessage(m, bad if m is other and refused_by == "server" else target.destination, True) for m in sent
        ]
        results = await self._publish_and_check(target, batch)
        assert [r.outcome for r in results] == [Outcome.PERMANENT, Outcome.ACKED, Outcome.ACKED], results
        # The positive proof that the neighbour really was refused, and by whom.
        assert ("WRONGTYPE" if refused_by == "server" else "max_entry_bytes") in (results[0].reason or ""), results[0]
        with redis.Redis.from_url(redis_url) as admin:
            assert admin.get(bad) == b"not a stream"

    @pytest.mark.parametrize(
        ("fails", "expected"),
        [
            (None, [Outcome.ACKED, Outcome.ACKED, Outcome.PERMANENT, Outcome.NOT_SENT]),
            (0, [Outcome.PERMANENT, Outcome.NOT_SENT, Outcome.NOT_SENT, Outcome.NOT_SENT]),
            (1, [Outcome.ACKED, Outcome.PERMANENT, Outcome.NOT_SENT, Outcome.NOT_SENT]),
        ],
        ids=["run-acked", "first-fails", "second-fails"],
    )
    async def test_an_oversize_message_is_decided_after_its_keys_earlier_run(
        self, rejecting: Make, redis_url: str, fails: int | None, expected: list[Outcome]
    ) -> None:
        # k's third message is over max_entry_bytes (never sent). It is dead-lettered only
        # when k's first two, sent in the same call, were acked; when the server refuses
        # one of them (WRONGTYPE), a dead letter for the third would land ahead of an
        # earlier message that goes again: it must come back not_sent, as the fourth.
        target = await rejecting({})
        bad = f"order-bad-{uuid.uuid4().hex[:10]}"
        with redis.Redis.from_url(redis_url) as admin:
            admin.set(bad, "not a stream")
        run = [msg(1, "k", 100), msg(2, "k", 100), msg(3, "k", LIMIT + 1), msg(4, "k", 100)]
        sent = [run[0], msg(5, "j", 100), *run[1:]]
        poisoned = run[fails] if fails is not None else None
        batch = [OutgoingMessage(m, bad if m is poisoned else target.destination, True) for m in sent]
        results = await self._publish_and_check(target, batch)
        outcomes = [r.outcome for r in results]
        assert [o for m, o in zip(sent, outcomes, strict=True) if m.key == "k"] == expected, results
        assert outcomes[1] is Outcome.ACKED, results  # j's message, beside k's run
        if fails is not None:
            assert "WRONGTYPE" in (results[sent.index(run[fails])].reason or ""), results

    async def _publish_and_check(self, target: Rejecting, batch: list[OutgoingMessage]) -> list[PublishResult]:
        """Publish `batch`, then a marker; the rule holds for what the stream has up to it."""
        results = list(await target.adapter.publish(batch))
        marker = message(999, key="marker")
        [marked] = await target.adapter.publish([OutgoingMessage(marker, target.destination, True)])
        assert marked.outcome is Outcome.ACKED, marked
        received = await target.read_all(str(marker.message_id))
        assert_rule([out.message for out in batch], [r.outcome for r in results], received)
        return results

    @pytest.fixture
    async def rejecting(self, redis_url: str) -> AsyncIterator[Make]:
        adapters: list[Adapter] = []

        async def make(_client_options: dict[str, Any]) -> Rejecting:  # batch sizes are Kafka's
            stream = f"order-{uuid.uuid4().hex[:10]}"
            adapter = create_redis("redis", {"url": redis_url, "max_entry_bytes": LIMIT})
            await adapter.connect()
            adapters.append(adapter)

            async def read_all(marker: str) -> list[Received]:
                received = redis_entries(redis_url, stream)
                assert any(r.message_id == marker for r in received), f"the marker never arrived on {stream}"
                return [r for r in received if r.message_id != marker]

            return Rejecting(adapter, stream, read_all)

        yield make
        for adapter in adapters:
            await adapter.close()

    @pytest.mark.parametrize("layout", ["mid-run", "first", "last"])
    async def test_the_server_fails_an_xadd_in_the_middle_of_a_run(self, redis_url: str, layout: str) -> None:
        # A key's run whose messages go to two streams (routes by topic): one of them is a
        # string, so the server answers its XADD with WRONGTYPE and would take the next.
        good, bad = f"order-{uuid.uuid4().hex[:10]}", f"order-bad-{uuid.uuid4().hex[:10]}"
        with redis.Redis.from_url(redis_url) as admin:
            admin.set(bad, "not a stream")
        poisoned = {"mid-run": 2, "first": 0, "last": 4}[layout]
        run = [msg(n, "k", 100) for n in range(5)]
        others = [msg(10 + n, f"o{n}", 100) for n in range(3)]
        batch = [OutgoingMessage(m, bad if m is run[poisoned] else good, True) for m in [*run[:3], *others, *run[3:]]]
        sent = [out.message for out in batch]
        adapter = create_redis("redis", {"url": redis_url})
        await adapter.connect()
        try:
            outcomes = [r.outcome for r in await adapter.publish(batch)]
            marker = OutgoingMessage(message(999, key="marker"), good, True)
            assert [r.outcome for r in await adapter.publish([marker])] == [Outcome.ACKED]
        finally:
            await adapter.close()
        received = [r for r in redis_entries(redis_url, good) if r.message_id != str(marker.message_id)]
        assert_rule(sent, outcomes, received)
        expected_k = [Outcome.ACKED] * poisoned + [Outcome.PERMANENT] + [Outcome.NOT_SENT] * (4 - poisoned)
        assert [o for m, o in zip(sent, outcomes, strict=True) if m.key == "k"] == expected_k, outcomes
        assert [o for m, o in zip(sent, outcomes, strict=True) if m.key != "k"] == [Outcome.ACKED] * 3
        with redis.Redis.from_url(redis_url) as admin:
            assert admin.get(bad) == b"not a stream"


class TestNatsKeyRounds(KeyOrderContract):
    """NATS JetStream with key_rounds (a key's run in one call, in rounds of one message
    per key): the stream refuses a message over LIMIT bytes (its max_msg_size, JetStream
    error 10054), a permanent refusal of that message; the key's later messages are not
    sent. Without key_rounds the adapter does not keep key order (docs/how-to/nats.md)."""

    refusal_event = None  # every message has its own PubAck: no batches

    @pytest.fixture
    async def rejecting(self, nats_server: NatsServer) -> AsyncIterator[Make]:
        adapters: list[Adapter] = []

        async def make(_client_options: dict[str, Any]) -> Rejecting:  # batch sizes are Kafka's
            stream = f"order-{uuid.uuid4().hex[:10]}"
            await make_stream(nats_server.url, stream, [stream], max_msg_size=LIMIT)
            adapter = create_nats("nats", {"servers": [nats_server.url], "stream": stream, "key_rounds": True})
            await adapter.connect()
            adapters.append(adapter)

            async def read_all(marker: str) -> list[Received]:
                received = await stream_read(nats_server.url, stream, 1)
                for _ in range(50):  # up to the marker: everything published before it is in
                    if any(r.message_id == marker for r in received):
                        return [r for r in received if r.message_id != marker]
                    received = await stream_read(nats_server.url, stream, len(received) + 1, timeout=1)
                raise AssertionError(f"the marker never arrived on {stream}")

            return Rejecting(adapter, stream, read_all)

        yield make
        for adapter in adapters:
            await adapter.close()

    async def test_a_refusal_in_the_middle_of_a_keys_run(self, rejecting: Make) -> None:
        # The server refuses k-3 (over max_msg_size) after k-1 and k-2 were stored: k-4 and
        # k-5 are not written; another key's messages around it go on.
        target = await rejecting({})
        sent = [msg(1, "k", 10), msg(2, "other", 10), msg(3, "k", 10), msg(4, "k", 20_000)]
        sent += [msg(5, "k", 10), msg(6, "other", 10), msg(7, "k", 10)]
        outcomes = await self._run(target, sent)
        assert [o for m, o in zip(sent, outcomes, strict=True) if m.key == "k"] == [
            Outcome.ACKED,
            Outcome.ACKED,
            Outcome.PERMANENT,
            Outcome.NOT_SENT,
            Outcome.NOT_SENT,
        ], outcomes
        assert [o for m, o in zip(sent, outcomes, strict=True) if m.key == "other"] == [Outcome.ACKED] * 2
