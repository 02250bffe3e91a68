"""One relay, two brokers: orders.* to Kafka, emails.* to RabbitMQ. An outage of one
holds back only the messages routed to it."""

from __future__ import annotations

import asyncio
import uuid
from urllib.parse import urlsplit

import psycopg

from outbox_relay.assembly import build_adapters
from outbox_relay.engine.relay import Relay
from tests.consumers import RabbitQueue, kafka_create_topic, kafka_read, rabbit_read
from tests.support.configs import make_config
from tests.support.outbox import write
from tests.support.relay import running_relay
from tests.support.toxiproxy import MakeProxy
from tests.support.waiting import wait_until


def failures(relay: Relay, broker: str) -> float:
    """How many answers of `broker` (or of the relay for it) were not an ack, so far."""
    return sum(
        s.value
        for metric in relay.metrics.registry.collect()
        for s in metric.samples
        if s.name == "outbox_relay_publish_failures_total" and s.labels["broker"] == broker
    )


def pending_for(dsn: str, prefix: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM outbox.messages WHERE dispatched_at IS NULL "
            "AND dead_lettered_at IS NULL AND topic LIKE %s",
            (prefix + "%",),
        ).fetchone()
    return int(row[0]) if row else 0


async def test_rabbitmq_outage_holds_back_only_emails(
    db: str, kafka_bootstrap: str, amqp_url: str, proxy: MakeProxy
) -> None:
    topic = f"multi-{uuid.uuid4().hex[:10]}"
    exchange = f"multi-{uuid.uuid4().hex[:10]}"
    await kafka_create_topic(kafka_bootstrap, topic)
    parts = urlsplit(amqp_url)
    server = proxy(f"{parts.hostname or '127.0.0.1'}:{parts.port or 5672}")
    proxied = amqp_url.replace(f":{parts.port}/", f":{server.port}/")
    queue = RabbitQueue(amqp_url, exchange, exchange + ".q")
    config = make_config(
        db,
        brokers={
            "kafka": {"type": "kafka", "bootstrap_servers": kafka_bootstrap},
            "mq": {"type": "rabbitmq", "url": proxied, "exchange": exchange},
        },
        routes=[{"topic": "orders.*", "broker": "kafka", "destination": topic}, {"topic": "emails.*", "broker": "mq"}],
        max_attempts=3,  # an outage must not spend attempts: nothing may be dead-lettered
    )
    try:
        async with running_relay(config, build_adapters(config)) as relay:
            first = await write(db, "orders.created", ["o1"], 5)
            await write(db, "emails.sent", ["e1"], 5)
            await wait_until(lambda: pending_for(db, "") == 0, timeout=30)

            server.disable()  # RabbitMQ unreachable from the relay
            before = failures(relay, "mq")
            orders = await write(db, "orders.created", ["o2", "o3"], 20)
            emails = await write(db, "emails.sent", ["e2", "e3"], 20)
            await wait_until(lambda: pending_for(db, "orders.") == 0, timeout=30)
            # The positive signal: several retry rounds for the emails, each answering the
            # head of both keys: more rounds than max_attempts, were the outage to spend them.
            await wait_until(lambda: failures(relay, "mq") >= before + 2 * 4, timeout=30)
            assert pending_for(db, "emails.") == 40, "emails wait while RabbitMQ is away"

            server.enable()
            await wait_until(lambda: pending_for(db, "emails.") == 0, timeout=60)
        with psycopg.connect(db) as conn:
            assert conn.execute(
                "SELECT count(*) FROM outbox.messages WHERE dead_lettered_at IS NOT NULL"
            ).fetchone() == (0,)
        kafka_ids = {r.message_id for r in await kafka_read(kafka_bootstrap, topic, 45)}
        assert kafka_ids == set(first.committed) | set(orders.committed)
        rabbit_ids = {r.message_id for r in await rabbit_read(queue, 45)}
        assert set(emails.committed) <= rabbit_ids
    finally:
        queue.close()


def latencies(dsn: str, ids: set[str]) -> list[float]:
    """Seconds from commit (created_at) to dispatch for the given message ids, dispatched ones only."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT extract(epoch FROM dispatched_at - created_at)::float8 FROM outbox.messages "
            "WHERE message_id::text = ANY(%s) AND dispatched_at IS NOT NULL",
            (list(ids),),
        ).fetchall()
    return [r[0] for r in rows]


async def test_a_black_holed_broker_holds_back_only_its_own_messages(
    db: str, kafka_bootstrap: str, amqp_url: str, proxy: MakeProxy
) -> None:
    # RabbitMQ stops answering without refusing anything (the proxy keeps the connection
    # and holds the bytes back), for several publish timeouts. Its messages wait, spending
    # no attempt; once the relay has seen it answer nothing, Kafka's messages go out in
    # well under a second; when it answers again, its messages go too.
    topic = f"hole-{uuid.uuid4().hex[:10]}"
    exchange = f"hole-{uuid.uuid4().hex[:10]}"
    await kafka_create_topic(kafka_bootstrap, topic)
    parts = urlsplit(amqp_url)
    server = proxy(f"{parts.hostname or '127.0.0.1'}:{parts.port or 5672}")
    proxied = amqp_url.replace(f":{parts.port}/", f":{server.port}/")
    queue = RabbitQueue(amqp_url, exchange, exchange + ".q")
    publish_timeout = 1.0
    config = make_config(
        db,
        brokers={
            "kafka": {"type": "kafka", "bootstrap_servers": kafka_bootstrap},
            "mq": {"type": "rabbitmq", "url": proxied, "exchange": exchange},
        },
        routes=[{"topic": "orders.*", "broker": "kafka", "destination": topic}, {"topic": "emails.*", "broker": "mq"}],
        publish_timeout=f"{publish_timeout}s",
        max_attempts=2,  # a spent attempt would show as a dead letter
    )
    try:
        async with running_relay(config, build_adapters(config)) as relay:
            await write(db, "emails.sent", ["e0"], 3)
            await wait_until(lambda: pending_for(db, "") == 0, timeout=30)

            def circuit_open() -> bool:
                return (
                    relay.metrics.registry.get_sample_value("outbox_relay_broker_circuit_open", {"broker": "mq"}) == 1
                )

            server.stall()
            emails = await write(db, "emails.sent", ["e1", "e2"], 10)
            await wait_until(circuit_open, timeout=30)
            stalled_at = asyncio.get_running_loop().time()
            orders: set[str] = set()
            while asyncio.get_running_loop().time() - stalled_at < 4 * publish_timeout:
                emails = await write(db, "emails.sent", ["e3"], 1, written=emails)
                batch = await write(db, "orders.created", ["o1", "o2"], 2)
                orders |= set(batch.committed)
                await wait_until(lambda batch=batch: pending_for(db, "orders.") == 0, timeout=30)  # type: ignore[misc]
            assert circuit_open(), "the probe must not close the circuit while RabbitMQ answers nothing"
            slowest = max(latencies(db, orders))
            assert slowest < 1.0, f"an order waited {slowest:.3f}s behind the black-holed broker"
            assert pending_for(db, "emails.") == len(emails.committed), "emails wait while RabbitMQ is away"

            server.heal()
            await wait_until(lambda: pending_for(db, "emails.") == 0, timeout=60)
            assert not circuit_open()
        with psycopg.connect(db) as conn:
            assert conn.execute(
                "SELECT count(*) FROM outbox.messages WHERE dead_lettered_at IS NOT NULL"
            ).fetchone() == (0,)
        expected = set(emails.committed)
        received: list[str] = []
        deadline = asyncio.get_running_loop().time() + 30
        while not expected <= set(received) and asyncio.get_running_loop().time() < deadline:
            received += [r.message_id for r in await rabbit_read(queue, 1000, timeout=1.0)]
        assert expected <= set(received)
        # Only the emails handed to RabbitMQ before the stall was noticed may come twice.
        assert len(received) - len(set(received)) <= 20, len(received) - len(set(received))
    finally:
        queue.close()
