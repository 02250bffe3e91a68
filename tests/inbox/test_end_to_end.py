"""Exactly-once effects end to end: producer -> relay -> real broker -> consumers with
the inbox, every message delivered at least twice, consumers SIGKILLed mid-handler.

The producer commits credits to its outbox (some transactions rolled back); the real
`outbox-relay run` publishes them; the test publishes a second copy of every message
(same message id) beside it. Two consumer processes read the same messages at once
(Kafka: both read every partition, as zombie consumers would; RabbitMQ: competing
consumers of one queue, redelivering what a killed one held) and credit `accounts` in
the consumer's own database. Several times, at a random moment while they are
processing, both are SIGKILLed and started again. At the end every account's balance
is exactly the sum of its committed credits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.consumers import kafka_create_topic
from tests.inbox.helpers import (
    ConsumerProcess,
    RabbitExchange,
    assert_each_effect_once,
    enqueue_credits,
    kill_at_random_moments,
    pending,
    publish_kafka_copies,
)
from tests.support.cli import RelayProcess
from tests.support.configs import PATIENT, write_config
from tests.support.waiting import wait_for

MESSAGES = 200
KILLS = 5

pytestmark = pytest.mark.slow


@pytest.fixture
def rng() -> random.Random:
    seed = int(os.environ.get("OUTBOX_RELAY_TEST_SEED") or random.randrange(1 << 32))
    print(f"random seed {seed} (OUTBOX_RELAY_TEST_SEED={seed} repeats its choices)")  # shown when the test fails
    return random.Random(seed)


@pytest.fixture
def consumers() -> Iterator[list[ConsumerProcess]]:
    started: list[ConsumerProcess] = []
    yield started
    for consumer in started:
        consumer.close()


@contextlib.contextmanager
def relay_running(tmp_path: Path, db: str, brokers: dict[str, Any], routes: list[dict[str, Any]]) -> Iterator[None]:
    """The real `outbox-relay run`, stopped with SIGTERM at the end of the block."""
    relay = RelayProcess(write_config(tmp_path / "relay.yaml", db, brokers=brokers, routes=routes, timing=PATIENT))
    try:
        relay.wait_started()
        yield
        assert relay.terminate() == 0
    finally:
        relay.close()


def kill_phase(consumers: list[ConsumerProcess], consumer_db: str, credits: int, rng: random.Random) -> None:
    last_lines = kill_at_random_moments(consumers, consumer_db, kills=KILLS, total=credits, rng=rng)
    for consumer in consumers:
        consumer.close()
    # At least one kill landed between an effect and its commit (the effect was then
    # rolled back by PostgreSQL, and done again on a redelivery).
    assert any(line.startswith("handling ") for line in last_lines), last_lines


def test_kafka_every_effect_once_despite_duplicates_zombies_and_kills(
    db: str,
    consumer_db: str,
    kafka_bootstrap: str,
    tmp_path: Path,
    rng: random.Random,
    consumers: list[ConsumerProcess],
) -> None:
    topic = f"inbox-{uuid.uuid4().hex[:10]}"
    asyncio.run(kafka_create_topic(kafka_bootstrap, topic, partitions=3))
    with relay_running(
        tmp_path,
        db,
        {"events": {"type": "kafka", "bootstrap_servers": kafka_bootstrap}},
        [{"topic": "credits.*", "broker": "events", "destination": topic}],
    ):
        credits = enqueue_credits(db, MESSAGES, accounts=10, rng=rng)
        asyncio.run(publish_kafka_copies(kafka_bootstrap, topic, credits))
        args = ["kafka", consumer_db, kafka_bootstrap, topic, "3"]
        consumers += [ConsumerProcess(f"c{i}", tmp_path, args) for i in range(2)]
        kill_phase(consumers, consumer_db, len(credits), rng)
        wait_for(lambda: pending(db) == 0, 30, "the relay publishing every message")
    # Two final consumers read to the end of every partition, then exit.
    final = [ConsumerProcess(f"final{i}", tmp_path, [*args, "--until-end"]) for i in range(2)]
    consumers += final
    assert [c.wait(60) for c in final] == [0, 0], [c.tail() for c in final]
    verbs = assert_each_effect_once(consumer_db, credits, consumers)
    # Each message reached the consumers at least twice (the relay's record and the copy).
    assert verbs["duplicate"] >= len(credits), verbs


def test_rabbitmq_every_effect_once_despite_duplicates_redeliveries_and_kills(
    db: str,
    consumer_db: str,
    amqp_url: str,
    tmp_path: Path,
    rng: random.Random,
    consumers: list[ConsumerProcess],
) -> None:
    name = f"inbox-{uuid.uuid4().hex[:10]}"
    exchange = RabbitExchange(amqp_url, name, name + ".billing")
    try:
        with relay_running(
            tmp_path,
            db,
            {"mq": {"type": "rabbitmq", "url": amqp_url, "exchange": name}},
            [{"topic": "credits.*", "broker": "mq"}],
        ):
            credits = enqueue_credits(db, MESSAGES, accounts=10, rng=rng)
            exchange.publish_copies(credits)
            args = ["rabbitmq", consumer_db, amqp_url, exchange.queue]
            consumers += [ConsumerProcess(f"c{i}", tmp_path, args) for i in range(2)]
            kill_phase(consumers, consumer_db, len(credits), rng)
            wait_for(lambda: pending(db) == 0, 30, "the relay publishing every message")
        # Two final consumers take what is left; each exits after a second without a
        # delivery, holding nothing unacknowledged.
        final = [ConsumerProcess(f"final{i}", tmp_path, [*args, "--until-idle"]) for i in range(2)]
        consumers += final
        assert [c.wait(60) for c in final] == [0, 0], [c.tail() for c in final]
        assert exchange.ready_messages() == 0, "every delivery acknowledged"
    finally:
        exchange.close()
    verbs = assert_each_effect_once(consumer_db, credits, consumers)
    assert verbs["duplicate"] >= len(credits), verbs
