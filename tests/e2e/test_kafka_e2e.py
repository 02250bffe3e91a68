"""The relay publishing to a real Kafka broker, read back with an independent consumer."""

from __future__ import annotations

import logging
import re
import uuid

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka import errors as kafka_errors

from outbox_relay import enqueue
from outbox_relay.assembly import build_adapters
from tests.consumers import kafka_create_topic, kafka_read
from tests.support.configs import make_config
from tests.support.outbox import dead_letters, pending, sequence_by_key, write
from tests.support.relay import running_relay
from tests.support.waiting import wait_until


def kafka_config(db: str, bootstrap: str, topic: str, client: str = "aiokafka", **relay: object):  # type: ignore[no-untyped-def]
    return make_config(
        db,
        brokers={"events": {"type": "kafka", "bootstrap_servers": bootstrap, "client": client}},
        routes=[{"topic": "orders.*", "broker": "events", "destination": topic}],
        **relay,
    )


@pytest.mark.parametrize("client", ["aiokafka", "librdkafka"])
async def test_committed_messages_arrive_in_key_order_and_rolled_back_never(
    db: str, kafka_bootstrap: str, client: str
) -> None:
    topic = f"e2e-{uuid.uuid4().hex[:10]}"
    await kafka_create_topic(kafka_bootstrap, topic, partitions=3)
    config = kafka_config(db, kafka_bootstrap, topic, client, batch_size=100)
    async with running_relay(config, build_adapters(config)):
        written = await write(db, "orders.created", [f"order-{i}" for i in range(10)], 40, rollback_every=7)
        await wait_until(lambda: pending(db) == 0, timeout=60)
    received = await kafka_read(kafka_bootstrap, topic, len(written.committed))
    ids = {r.message_id for r in received}
    assert ids == set(written.committed), "every committed message arrives, with its message-id header"
    assert not ids & written.rolled_back
    assert all(r.headers["content-type"] == "application/json" for r in received)
    assert all(r.key == written.committed[r.message_id][0] for r in received)
    order = sequence_by_key([r.payload for r in received])
    for key, ns in order.items():
        assert ns == sorted(n for k, n in written.committed.values() if k == key), key


@pytest.mark.parametrize("client", ["aiokafka", "librdkafka"])
async def test_a_size_refusal_says_the_size_and_the_limit(db: str, kafka_bootstrap: str, client: str) -> None:
    """The broker's refusal names neither ("[Error 10] MessageSizeTooLargeError"): the
    dead letter's reason says how large the record was and which limit it is over."""
    topic = f"e2e-limits-{uuid.uuid4().hex[:10]}"
    await kafka_create_topic(kafka_bootstrap, topic, partitions=1, **{"max.message.bytes": "4096"})
    with psycopg.connect(db) as conn:
        over_topic = enqueue(conn, "orders.created", {"pad": "x" * 6_000}, key="a")  # the broker refuses it
        over_producer = enqueue(conn, "orders.created", {"pad": "x" * 20_000}, key="b")  # refused before sending
        conn.commit()
    config = make_config(
        db,
        brokers={
            "events": {
                "type": "kafka",
                "bootstrap_servers": kafka_bootstrap,
                "client": client,
                "max_request_size": 16_384,
            }
        },
        routes=[{"topic": "orders.*", "broker": "events", "destination": topic}],
    )
    async with running_relay(config, build_adapters(config)):
        await wait_until(lambda: pending(db) == 0, timeout=60)
    reasons = {mid: reason for mid, _, reason in dead_letters(db)}
    size = r"(\d{1,2},\d{3}) bytes"
    by_broker = re.fullmatch(
        f"MessageSizeTooLargeError: the broker refused the record of {size} as larger than the topic's"
        r" max\.message\.bytes \(by default the broker's message\.max\.bytes; the producer's max_request_size is"
        r" 16,384\)",
        reasons[str(over_topic)],
    )
    assert by_broker, reasons[str(over_topic)]
    assert 6_000 < int(by_broker[1].replace(",", "")) < 6_400  # the record with its framing
    by_producer = re.fullmatch(
        f"MessageSizeTooLargeError: the record is {size}, larger than the producer's max_request_size 16,384"
        r" \(raise max_request_size in the broker block, and the topic's max\.message\.bytes with it\)",
        reasons[str(over_producer)],
    )
    assert by_producer, reasons[str(over_producer)]
    assert 20_000 < int(by_producer[1].replace(",", "")) < 20_400


@pytest.mark.parametrize("client", ["aiokafka", "librdkafka"])
async def test_oversize_message_is_dead_lettered_while_others_flow(db: str, kafka_bootstrap: str, client: str) -> None:
    topic = f"e2e-small-{uuid.uuid4().hex[:10]}"
    await kafka_create_topic(kafka_bootstrap, topic, partitions=1, **{"max.message.bytes": "4096"})
    with psycopg.connect(db) as conn:
        enqueue(conn, "orders.created", {"key": "k", "n": 0}, key="k")
        big = enqueue(conn, "orders.created", {"key": "k", "n": 1, "pad": "x" * 20_000}, key="k")
        enqueue(conn, "orders.created", {"key": "k", "n": 2}, key="k")
        for i in range(5):
            enqueue(conn, "orders.created", {"key": f"other-{i}", "n": 0}, key=f"other-{i}")
        conn.commit()
    config = kafka_config(db, kafka_bootstrap, topic, client)
    async with running_relay(config, build_adapters(config)):
        await wait_until(lambda: pending(db) == 0, timeout=60)
    [(mid, key, reason)] = dead_letters(db)
    assert (mid, key) == (str(big), "k")
    assert "MessageSizeTooLarge" in reason or "RecordTooLarge" in reason or "RecordListTooLarge" in reason, reason
    received = await kafka_read(kafka_bootstrap, topic, 7)
    assert len(received) == 7
    assert str(big) not in {r.message_id for r in received}
    # dead_letter_policy release (the default): the key goes on after its poison message.
    assert sequence_by_key([r.payload for r in received])["k"] == [0, 2]


async def test_a_topic_created_on_first_use_logs_no_error(
    db: str, kafka_bootstrap: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker creates the topic on its first use (auto.create.topics.enable): aiokafka
    says "Topic ... not found in cluster metadata", at error level before, for a message
    then published fine. Now at debug."""
    caplog.set_level(logging.DEBUG, logger="aiokafka")
    topic = f"e2e-created-{uuid.uuid4().hex[:10]}"  # not created: the relay's first record creates it
    with psycopg.connect(db) as conn:
        mid = enqueue(conn, "orders.created", {"n": 1}, key="k")
        conn.commit()
    config = kafka_config(db, kafka_bootstrap, topic)
    async with running_relay(config, build_adapters(config)):
        await wait_until(lambda: pending(db) == 0, timeout=60)
    [received] = await kafka_read(kafka_bootstrap, topic, 1)  # published: the positive signal
    assert received.message_id == str(mid)
    aiokafka = [r for r in caplog.records if r.name.startswith("aiokafka")]
    lowered = [r for r in aiokafka if r.getMessage() == f"Topic {topic} not found in cluster metadata"]
    assert lowered, "the broker answers a new topic's first request with 'unknown topic': else nothing is shown"
    assert {r.levelno for r in lowered} == {logging.DEBUG}
    assert [r.getMessage() for r in aiokafka if r.levelno >= logging.ERROR] == []


async def test_invalid_topic_name_is_dead_lettered_with_reason(db: str, kafka_bootstrap: str) -> None:
    with psycopg.connect(db) as conn:
        enqueue(conn, "orders.created", {"key": "a", "n": 0})
        conn.commit()
    config = kafka_config(db, kafka_bootstrap, "not a topic!")
    async with running_relay(config, build_adapters(config)):
        await wait_until(lambda: pending(db) == 0, timeout=30)
    [(_, _, reason)] = dead_letters(db)
    assert reason == "invalid Kafka topic name 'not a topic!'"


async def test_the_topic_helper_fails_on_a_refused_topic_and_returns_once_the_topic_is_served(
    kafka_bootstrap: str,
) -> None:
    # tests/consumers.kafka_create_topic, which the tests above start from. A refused
    # creation used to pass unnoticed (the relay then auto-created the topic with the
    # broker's defaults: no 4096-byte limit for the oversize test to meet).
    refused = f"e2e-refused-{uuid.uuid4().hex[:10]}"
    with pytest.raises(kafka_errors.InvalidConfigurationError, match=refused):
        await kafka_create_topic(kafka_bootstrap, refused, partitions=1, **{"max.message.bytes": "many"})
    # Served when it returns: a new client's first look finds every partition with its leader.
    topic = f"e2e-served-{uuid.uuid4().hex[:10]}"
    await kafka_create_topic(kafka_bootstrap, topic, partitions=3)
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        cluster = await consumer._client.fetch_all_metadata()
    finally:
        await consumer.stop()
    partitions = cluster.partitions_for_topic(topic) or set()
    assert partitions == {0, 1, 2}
    assert all(cluster.leader_for_partition(TopicPartition(topic, p)) not in (None, -1) for p in partitions)
