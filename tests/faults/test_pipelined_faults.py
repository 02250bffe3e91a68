"""A hot key's run goes to the broker in one call (pipelined); the broker dies in the
middle of that call. Whatever part of the run it had acked, the first deliveries of
the key must still be in enqueue order, nothing lost, duplicates bounded."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from outbox_relay import enqueue
from tests.consumers import RabbitQueue, Received, kafka_create_topic, kafka_read
from tests.faults.harness import Ledger, check_delivery
from tests.services import LocalBroker
from tests.support.cli import RelayProcess
from tests.support.configs import PATIENT, write_config
from tests.support.outbox import dispatched, pending
from tests.support.waiting import wait_for

# A drain of 6,000 messages by a relay process with a broker restart in it: well within
# a minute on a quiet machine, several under a loaded one.
pytestmark = pytest.mark.timeout(300)

BATCH = 500
BACKLOG = 6000  # one key, so every batch is one run of BATCH messages in one call


def hot_backlog(dsn: str, topic: str) -> Ledger:
    ledger = Ledger()
    with psycopg.connect(dsn) as conn:
        for n in range(BACKLOG):
            key = "hot" if n % 10 else "warm"  # two keys, one of them nine tenths of the load
            mid = enqueue(conn, topic, {"key": key, "n": n, "pad": "x" * 512}, key=key)
            ledger.committed[str(mid)] = (key, n)
        conn.commit()
    return ledger


def kill_mid_drain(db: str, config: Path, topic: str, *, down: Callable[[], None], up: Callable[[], None]) -> Ledger:
    ledger = hot_backlog(db, topic)
    relay = RelayProcess(config)
    try:
        # Down while the drain is under way: some runs acked, one in flight.
        wait_for(lambda: dispatched(db) >= BATCH, 60, "the drain under way")
        down()
        time.sleep(2)  # the outage: the broker stays down this long
        up()
        wait_for(lambda: pending(db) == 0, 180, "every message dispatched after the restart")
        assert relay.terminate() == 0
    finally:
        relay.close()
    with psycopg.connect(db) as conn:
        row = conn.execute("SELECT count(*) FROM outbox.messages WHERE dead_lettered_at IS NOT NULL").fetchone()
    assert row == (0,), "the outage dead-lettered nothing"
    return ledger


@pytest.mark.parametrize("client", ["aiokafka", "librdkafka"])
async def test_kafka_killed_in_the_middle_of_a_hot_key_run(
    db: str, own_kafka: LocalBroker, tmp_path: Path, client: str
) -> None:
    bootstrap = f"127.0.0.1:{own_kafka.port}"
    topic = f"hot-{uuid.uuid4().hex[:8]}"
    await kafka_create_topic(bootstrap, topic, partitions=1)
    config = write_config(
        tmp_path / "relay.yaml",
        db,
        brokers={"kafka": {"type": "kafka", "bootstrap_servers": bootstrap, "request_timeout": "5s", "client": client}},
        routes=[{"topic": "*", "broker": "kafka", "destination": topic}],
        timing=PATIENT,
        batch_size=BATCH,
        workers=2,  # the duplicate bound below counts two workers
        max_attempts=3,
    )
    ledger = kill_mid_drain(db, config, "orders.created", down=own_kafka.kill, up=own_kafka.start)
    received = await kafka_read(bootstrap, topic, len(ledger.committed), timeout=60)
    check_delivery(received, ledger, max_duplicates=BATCH * 2 * 4)


@pytest.mark.parametrize("pipeline_keys", [False, True])
async def test_rabbitmq_stopped_in_the_middle_of_a_hot_key_run(
    db: str, own_rabbitmq: LocalBroker, tmp_path: Path, pipeline_keys: bool
) -> None:
    url = f"amqp://guest:guest@127.0.0.1:{own_rabbitmq.port}/%2F"
    exchange = f"hot-{uuid.uuid4().hex[:8]}"
    RabbitQueue(url, exchange, exchange + ".q").close()  # durable: read it after the restart
    config = write_config(
        tmp_path / "relay.yaml",
        db,
        brokers={
            "mq": {
                "type": "rabbitmq",
                "url": url,
                "exchange": exchange,
                "connect_timeout": "2s",
                "pipeline_keys": pipeline_keys,
            }
        },
        routes=[{"topic": "*", "broker": "mq"}],
        timing=PATIENT,
        batch_size=BATCH,
        workers=2,  # the duplicate bound below counts two workers
        max_attempts=3,
    )
    ledger = kill_mid_drain(db, config, "emails.sent", down=own_rabbitmq.stop, up=own_rabbitmq.start)
    # Every row is marked dispatched (kill_mid_drain), so the broker confirmed each: the
    # queue holds all of them and their copies now. Read it to empty, rather than wait a
    # fixed time for copies that may not come (under load that wait outlasted the test).
    reader = RabbitQueue(url, exchange, exchange + ".q")
    received: list[Received] = []
    try:
        await asyncio.to_thread(reader.scan, received.append)
    finally:
        reader.close()
    check_delivery(received, ledger, max_duplicates=BATCH * 2 * 4)
