"""Brokers and PostgreSQL going away under load and coming back; a network stall.

/readyz must say false during an outage and true after it; the relay must resume on
its own; the delivery checks of harness.check_delivery hold throughout.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest

from outbox_relay.demo import local_postgres
from tests.consumers import RabbitQueue, kafka_create_topic, kafka_read, rabbit_read
from tests.faults.harness import Ledger, Writers, check_delivery, http_port
from tests.services import LocalBroker
from tests.support.cli import RelayProcess
from tests.support.configs import PATIENT, write_config
from tests.support.outbox import pending
from tests.support.proxy import ThreadedProxy
from tests.support.waiting import wait_for

BATCH, WORKERS = 50, 2


def dead_letter_count(conn: psycopg.Connection[tuple[int]]) -> int:
    row = conn.execute("SELECT count(*) FROM outbox.messages WHERE dead_lettered_at IS NOT NULL").fetchone()
    return row[0] if row else -1


def ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def outage(
    db: str, config: Path, topic: str, *, down: Callable[[], None], up: Callable[[], None], down_for: float = 3.0
) -> Ledger:
    """Writers commit while the broker goes `down` and, `down_for` seconds after /readyz
    said so, comes back `up`; /readyz follows; nothing may be dead-lettered (an outage
    spends no attempts). Returns the ledger."""
    relay = RelayProcess(config)
    writers = Writers(db, topic).start()
    try:
        port = http_port(relay)
        wait_for(lambda: ready(port), 30, "ready before the outage")
        time.sleep(1.5)  # traffic flowing before the fault
        down()
        wait_for(lambda: not ready(port), 30, "/readyz false during the outage")
        time.sleep(down_for)  # the outage lasts this long
        up()
        wait_for(lambda: ready(port), 90, "/readyz true after the outage")
        time.sleep(1.5)  # traffic flowing after it
        ledger = writers.stop()
        wait_for(lambda: pending(db) == 0, 120, "every message dispatched")
        assert relay.terminate() == 0
    finally:
        writers.stop()
        relay.close()
    with psycopg.connect(db) as conn:
        assert dead_letter_count(conn) == 0
    return ledger


async def test_kafka_killed_and_restarted(db: str, own_kafka: LocalBroker, tmp_path: Path) -> None:
    bootstrap = f"127.0.0.1:{own_kafka.port}"
    topic = f"outage-{uuid.uuid4().hex[:8]}"
    await kafka_create_topic(bootstrap, topic)
    config = write_config(
        tmp_path / "relay.yaml",
        db,
        brokers={"kafka": {"type": "kafka", "bootstrap_servers": bootstrap, "request_timeout": "5s"}},
        routes=[{"topic": "*", "broker": "kafka", "destination": topic}],
        timing=PATIENT,
        batch_size=BATCH,
        workers=WORKERS,
        max_attempts=3,
    )  # an outage must spend no attempts: nothing may be dead-lettered
    ledger = outage(db, config, "orders.created", down=own_kafka.kill, up=own_kafka.start)
    received = await kafka_read(bootstrap, topic, len(ledger.committed), timeout=60)
    check_delivery(received, ledger, max_duplicates=BATCH * WORKERS * 2)


@pytest.mark.parametrize("client", ["aiokafka", "librdkafka"])
async def test_kafka_outage_of_several_publish_timeouts_dead_letters_nothing(
    db: str, own_kafka: LocalBroker, tmp_path: Path, client: str
) -> None:
    # The default request_timeout (30 s): aiokafka's idempotent producer retries its
    # records for as long as the broker is away, so every publish call during the outage
    # ends at publish_timeout. Five of them, with two attempts allowed: were a timeout to
    # spend an attempt, messages would be dead-lettered. The records handed over before
    # the outage was noticed may be delivered twice, no more.
    bootstrap = f"127.0.0.1:{own_kafka.port}"
    topic = f"long-outage-{uuid.uuid4().hex[:8]}"
    await kafka_create_topic(bootstrap, topic)
    config = write_config(
        tmp_path / "relay.yaml",
        db,
        brokers={"kafka": {"type": "kafka", "bootstrap_servers": bootstrap, "client": client}},
        routes=[{"topic": "*", "broker": "kafka", "destination": topic}],
        timing=PATIENT,
        batch_size=BATCH,
        workers=WORKERS,
        max_attempts=2,
        publish_timeout="2s",
    )
    ledger = outage(db, config, "orders.created", down=own_kafka.kill, up=own_kafka.start, down_for=10.0)
    received = await kafka_read(bootstrap, topic, len(ledger.committed), timeout=60)
    check_delivery(received, ledger, max_duplicates=BATCH * WORKERS)


async def test_rabbitmq_stopped_and_restarted(db: str, own_rabbitmq: LocalBroker, tmp_path: Path) -> None:
    url = f"amqp://guest:guest@127.0.0.1:{own_rabbitmq.port}/%2F"
    exchange = f"outage-{uuid.uuid4().hex[:8]}"
    queue = RabbitQueue(url, exchange, exchange + ".q")
    queue.close()  # the exchange and queue are durable: read them after the restart
    config = write_config(
        tmp_path / "relay.yaml",
        db,
        brokers={"mq": {"type": "rabbitmq", "url": url, "exchange": exchange, "connect_timeout": "2s"}},
        routes=[{"topic": "*", "broker": "mq"}],
        timing=PATIENT,
        batch_size=BATCH,
        workers=WORKERS,
        max_attempts=3,
    )
    ledger = outage(db, config, "emails.sent", down=own_rabbitmq.stop, up=own_rabbitmq.start)
    reader = RabbitQueue(url, exchange, exchange + ".q")
    try:
        received = await rabbit_read(reader, len(ledger.committed) + BATCH * WORKERS * 2, timeout=15)
    finally:
        reader.close()
    check_delivery(received, ledger, max_duplicates=BATCH * WORKERS * 2)


async def test_postgres_restarted_fast_and_immediate(
    own_pg: local_postgres.LocalPostgres, kafka_bootstrap: str, tmp_path: Path
) -> None:
    dsn = own_pg.dsn
    topic = f"pg-{uuid.uuid4().hex[:8]}"
    await kafka_create_topic(kafka_bootstrap, topic)
    config = write_config(
        tmp_path / "relay.yaml",
        dsn,
        brokers={"kafka": {"type": "kafka", "bootstrap_servers": kafka_bootstrap}},
        routes=[{"topic": "*", "broker": "kafka", "destination": topic}],
        timing=PATIENT,
        batch_size=BATCH,
        workers=WORKERS,
        poll_interval="30s",
    )  # resuming must come from reconnect + LISTEN again, not the poll
    relay = RelayProcess(config)
    writers = Writers(dsn, "orders.created").start()
    try:
        port = http_port(relay)
        wait_for(lambda: ready(port), 30, "ready")
        for mode in ("fast", "immediate"):
            time.sleep(1.5)  # traffic flowing before the fault
            own_pg.stop(mode)
            wait_for(lambda: not ready(port), 30, f"/readyz false while PostgreSQL is down ({mode})")
            time.sleep(1)  # the outage lasts this long
            own_pg.start({"max_connections": "100"})
            wait_for(lambda: ready(port), 60, f"/readyz true after the {mode} restart")
        time.sleep(2)  # traffic flowing after the restarts
        ledger = writers.stop()
        wait_for(lambda: pending(dsn) == 0, 60, "every message dispatched after the restarts")
        logs = relay.log_path.read_text()
        assert logs.count('"listening"') >= 3, "the relay LISTENs again after each restart"
        assert relay.terminate() == 0
    finally:
        writers.stop()
        relay.close()
    received = await kafka_read(kafka_bootstrap, topic, len(ledger.committed), timeout=60)
    check_delivery(received, ledger, uncertain=writers.uncertain, max_duplicates=BATCH * WORKERS * 2)


async def test_network_stall_longer_than_the_request_timeout(db: str, amqp_url: str, tmp_path: Path) -> None:
    parts = urlsplit(amqp_url)
    proxy = ThreadedProxy(parts.hostname or "127.0.0.1", parts.port or 5672)
    exchange = f"stall-{uuid.uuid4().hex[:8]}"
    queue = RabbitQueue(amqp_url, exchange, exchange + ".q")
    proxied = amqp_url.replace(f":{parts.port}/", f":{proxy.port}/")
    config = write_config(
        tmp_path / "relay.yaml",
        db,
        brokers={
            "mq": {"type": "rabbitmq", "url": proxied, "exchange": exchange, "connect_timeout": "2s", "heartbeat": "5s"}
        },
        routes=[{"topic": "*", "broker": "mq"}],
        timing=PATIENT,
        batch_size=BATCH,
        workers=WORKERS,
        publish_timeout="2s",
        max_attempts=1000,
    )
    relay = RelayProcess(config)
    writers = Writers(db, "emails.sent").start()
    try:
        port = http_port(relay)
        wait_for(lambda: ready(port), 30, "ready before the stall")
        time.sleep(1.5)  # traffic flowing before the fault
        proxy.stall()  # bytes stop flowing, connections stay open: longer than publish_timeout
        time.sleep(6)  # the stall lasts this long
        proxy.cut()  # and then the connections drop
        time.sleep(1)  # refused this long
        proxy.restore()
        wait_for(lambda: ready(port), 60, "ready after the stall")
        ledger = writers.stop()
        wait_for(lambda: pending(db) == 0, 120, "every message dispatched")
        assert relay.terminate() == 0
        received = await rabbit_read(queue, len(ledger.committed) + 10 * BATCH * WORKERS, timeout=15)
    finally:
        writers.stop()
        relay.close()
        queue.close()
        proxy.close()
    logs = relay.log_path.read_text()
    assert "no answer within publish_timeout" in logs or "channel closed" in logs or "connection lost" in logs
    check_delivery(received, ledger, max_duplicates=10 * BATCH * WORKERS)


@pytest.mark.parametrize("client", ["aiokafka", "librdkafka"])
async def test_sigterm_during_a_kafka_outage_exits_within_the_shutdown_timeout(
    db: str, own_kafka: LocalBroker, tmp_path: Path, client: str
) -> None:
    # The producer holds records it cannot deliver (idempotence: forever); closing it
    # must not wait for them, or the relay never exits while the broker is away.
    bootstrap = f"127.0.0.1:{own_kafka.port}"
    topic = f"term-{uuid.uuid4().hex[:8]}"
    await kafka_create_topic(bootstrap, topic)
    shutdown_timeout = 3.0
    config = write_config(
        tmp_path / "relay.yaml",
        db,
        brokers={"kafka": {"type": "kafka", "bootstrap_servers": bootstrap, "client": client}},
        routes=[{"topic": "*", "broker": "kafka", "destination": topic}],
        timing=PATIENT,
        batch_size=BATCH,
        workers=WORKERS,
        publish_timeout="2s",
        shutdown_timeout=f"{shutdown_timeout}s",
    )
    relay = RelayProcess(config)
    writers = Writers(db, "orders.created").start()
    try:
        port = http_port(relay)
        wait_for(lambda: ready(port), 30, "ready before the outage")
        own_kafka.kill()
        # The positive signal: a publish went unanswered, so the producer holds records.
        wait_for(lambda: "broker_circuit_open" in relay.log_path.read_text(), 60, "the outage seen by the relay")
        writers.stop()
        started = time.monotonic()
        code = relay.terminate(timeout=shutdown_timeout + 30)
        took = time.monotonic() - started
    finally:
        writers.stop()
        relay.close()
        own_kafka.start()
    assert code == 0, relay.log_path.read_text()[-1500:]
    assert took <= shutdown_timeout + 5, f"exit took {took:.1f}s"
