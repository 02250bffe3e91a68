"""A key's run in one call to a real Kafka broker, and a broker-side rejection in the
middle of it (record too large for the topic's max.message.bytes): what came before
is delivered and marked, the rejected message is dead-lettered, and what came after
follows the dead-letter policy (release: delivered after it; hold: never delivered
ahead of it). The broker's own log is read back with an independent consumer."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from outbox_relay import enqueue
from outbox_relay.assembly import build_adapters
from outbox_relay.models import OutgoingMessage, PublishResult
from tests.consumers import kafka_create_topic, kafka_read
from tests.support.configs import make_config
from tests.support.outbox import dead_letters, pending, sequence_by_key
from tests.support.relay import running_relay
from tests.support.waiting import wait_until

RUN = 30


async def records_in(bootstrap: str, topic: str) -> int:
    """How many records partition 0 of `topic` holds now (its end offset), from the broker."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        partition = TopicPartition(topic, 0)
        return int((await consumer.end_offsets([partition]))[partition])
    finally:
        await consumer.stop()


# The poison first, on the relay's fresh producer: a broker with no state for a producer
# id accepts any first sequence, so nothing but the adapter keeps the run from going on.
@pytest.mark.parametrize("poison_at", [15, 0], ids=["poison mid-run", "poison first"])
@pytest.mark.parametrize("batch_bytes", [262_144, 1024], ids=["run in one record batch", "run over many batches"])
@pytest.mark.parametrize("client", ["aiokafka", "librdkafka"])
@pytest.mark.parametrize("policy", ["release", "hold"])
async def test_rejection_in_the_middle_of_a_run(
    db: str, kafka_bootstrap: str, policy: str, client: str, batch_bytes: int, poison_at: int
) -> None:
    # Many batches: the records after the rejected batch are in later requests of the
    # same partition, which the producer must not let through ahead of it.
    topic = f"e2e-run-{uuid.uuid4().hex[:10]}"
    await kafka_create_topic(kafka_bootstrap, topic, partitions=1, **{"max.message.bytes": "4096"})
    with psycopg.connect(db) as conn:
        for n in range(RUN):
            pad = "x" * (20_000 if n == poison_at else 10)
            mid = enqueue(conn, "orders.created", {"key": "k", "n": n, "pad": pad}, key="k")
            if n == poison_at:
                poison = str(mid)
        for i in range(5):
            enqueue(conn, "orders.created", {"key": f"other-{i}", "n": 0}, key=f"other-{i}")
        conn.commit()
    config = make_config(
        db,
        brokers={
            "events": {
                "type": "kafka",
                "bootstrap_servers": kafka_bootstrap,
                "client": client,
                "max_batch_size": batch_bytes,
            }
        },
        routes=[{"topic": "orders.*", "broker": "events", "destination": topic}],
        dead_letter_policy=policy,
    )
    adapters = build_adapters(config)
    calls: list[int] = []  # how many messages of key k each publish call carried
    real_publish = adapters["events"].publish

    async def spy(batch: Sequence[OutgoingMessage]) -> Sequence[PublishResult]:
        calls.append(sum(1 for out in batch if out.message.key == "k"))
        return await real_publish(batch)

    adapters["events"].publish = spy  # type: ignore[method-assign]
    held = RUN - poison_at - 1
    async with running_relay(config, adapters):
        # The positive signal: the poison message dead-lettered and everything that
        # may go has gone; under hold, exactly the run after the poison is left.
        await wait_until(
            lambda: len(dead_letters(db)) == 1 and pending(db) == (held if policy == "hold" else 0), timeout=60
        )
    # The first call that carried key k carried its whole run (another worker's call may
    # come first with only the other keys: the relay runs several workers).
    assert next(c for c in calls if c) == RUN, f"the whole run went in one call: {calls}"
    [(mid, key, reason)] = dead_letters(db)
    assert (mid, key) == (poison, "k")
    assert "TooLarge" in reason, reason
    expected_k = list(range(poison_at)) + ([] if policy == "hold" else list(range(poison_at + 1, RUN)))
    total = await records_in(kafka_bootstrap, topic)
    received = await kafka_read(kafka_bootstrap, topic, total)
    assert len(received) == total
    order = sequence_by_key([r.payload for r in received])
    assert order.get("k", []) == expected_k, "first deliveries in enqueue order; under hold nothing after the poison"
    assert all(order[f"other-{i}"] == [0] for i in range(5))
    if policy == "hold":
        assert poison not in {r.message_id for r in received}
