"""Brokers and PostgreSQL going away under load and coming back; a network stall.

/readyz must say false during an outage and true after it; the relay must resume on
its own; the delivery checks of harness.check_delivery hold throughout. The Kafka,
NATS, Redis and SQS outages and the PostgreSQL restarts run over both sources: in WAL
mode an outage shorter than relay.wal.park_after pauses the stream and parks nothing,
a longer one parks what waits into the table, and the keys' order holds across both
paths.
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
from outbox_relay_adapters.sqs import create as create_sqs

from outbox_relay.demo import local_postgres
from outbox_relay.models import Outcome, OutgoingMessage
from tests.consumers import (
    RabbitQueue,
    SqsQueue,
    kafka_create_topic,
    kafka_read,
    rabbit_read,
    redis_read,
    sqs_client,
    sqs_read,
)
from tests.faults.harness import (
    OWN_PG_SETTINGS,
    SOURCES,
    Ledger,
    Outbox,
    Writers,
    check_delivery,
    http_port,
    outbox_in,
    writers_for,
)
from tests.services import LocalBroker, NatsServer, SqsServer
from tests.support.cli import RelayProcess
from tests.support.configs import PATIENT, write_config
from tests.support.factories import message
from tests.support.jetstream import make_stream, stream_read
from tests.support.outbox import pending
from tests.support.toxiproxy import MakeProxy
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
    outbox: Outbox,
    config: Path,
    topic: str,
    *,
    down: Callable[[], None],
    up: Callable[[], None],
    down_for: float = 3.0,
    kill_while_paused: bool = False,
    slower_writers: float = 1.0,
) -> tuple[Ledger, RelayProcess]:
    """Writers commit while the broker goes `down` and, `down_for` seconds after /readyz
    said so, comes back `up`; /readyz follows; nothing may be dead-lettered (an outage
    spends no attempts). `kill_while_paused` (WAL mode): the relay is SIGKILLed while its
    stream pauses, holding what waits unconfirmed, and another one started. Returns the
    ledger and the last (stopped) relay, for its logs."""
    relay = RelayProcess(config)
    writers = writers_for(outbox, topic, slower=slower_writers).start()
    try:
        port = http_port(relay)
        wait_for(lambda: ready(port), 30, "ready before the outage")
        time.sleep(1.5)  # traffic flowing before the fault
        down()
        wait_for(lambda: not ready(port), 30, "/readyz false during the outage")
        if kill_while_paused:
            wait_for(lambda: logged(relay, "wal_broker_outage_pausing"), 30, "the stream paused")
            relay.kill()  # what it held comes again from the slot: never confirmed
            relay = RelayProcess(config)
            port = http_port(relay)
            wait_for(lambda: logged(relay, "wal_broker_outage_pausing"), 60, "the next relay paused too")
        time.sleep(down_for)  # the outage lasts this long
        up()
        wait_for(lambda: ready(port), 90, "/readyz true after the outage")
        time.sleep(1.5)  # traffic flowing after it
        ledger = writers.stop()
        outbox.wait_dispatched(120)
        assert relay.terminate() == 0
    finally:
        writers.stop()
        relay.close()
    with psycopg.connect(outbox.dsn) as conn:
        assert dead_letter_count(conn) == 0
    return ledger, relay


def logged(relay: RelayProcess, event: str) -> int:
    return sum(1 for line in relay.logs() if line.get("event") == event)


def check_wal_outage(outbox: Outbox, relay: RelayProcess, parked: int, *, parks: bool) -> None:
    """In WAL mode (nothing for the table source): the stream paused for the outage and,
    as `parks` says, an outage longer than relay.wal.park_after parked what waited into
    the table, a shorter one nothing (it ended, then the stream went on)."""
    if outbox.source != "wal":
        return
    assert logged(relay, "wal_broker_outage_pausing") >= 1, "the stream paused for the outage"
    if parks:
        assert parked > 0 and logged(relay, "wal_messages_parked") >= 1, "then parked past park_after"
    else:
        assert logged(relay, "wal_broker_outage_ended") >= 1
        assert parked == 0, "an outage shorter than park_after parks nothing"
        assert logged(relay, "wal_messages_parked") == 0


@pytest.mark.parametrize("source", SOURCES)
async def test_kafka_killed_and_restarted(db: str, own_kafka: LocalBroker, tmp_path: Path, source: str) -> None:
    bootstrap = f"127.0.0.1:{own_kafka.port}"
    topic = f"outage-{uuid.uuid4().hex[:8]}"
    await kafka_create_topic(bootstrap, topic)
    with outbox_in(db, source) as outbox:
        config = write_config(
            tmp_path / "relay.yaml",
            db,
            brokers={"kafka": {"type": "kafka", "bootstrap_servers": bootstrap, "request_timeout": "5s"}},
            routes=[{"topic": "*", "broker": "kafka", "destination": topic}],
            timing=PATIENT,
            batch_size=BATCH,
            workers=WORKERS,
            max_attempts=3,
            # In WAL mode calls that end at a short publish_timeout, so the outage answers
            # WAIT (not a late ack) and the stream pauses; park_after far beyond the
            # outage (Kafka's restart takes 10-30 s on a loaded machine): it parks nothing.
            **outbox.settings(park_after="600s"),
            **({"publish_timeout": "2s"} if source == "wal" else {}),
        )  # an outage must spend no attempts: nothing may be dead-lettered
        # In WAL mode also killed while it pauses: what it held is at least once too.
        wal = source == "wal"
        ledger, relay = outage(
            outbox, config, "orders.created", down=own_kafka.kill, up=own_kafka.start, kill_while_paused=wal
        )
        parked = outbox.parked()
    received = await kafka_read(bootstrap, topic, len(ledger.committed), timeout=60)
    duplicates = check_delivery(received, ledger, max_duplicates=BATCH * WORKERS * 2)
    print(f"source={source} committed={len(ledger.committed)} parked={parked} duplicates={duplicates}")
    if source == "wal":
        assert logged(relay, "wal_broker_outage_pausing") >= 1, "the stream paused for the outage"
        assert logged(relay, "wal_broker_outage_ended") >= 1
        assert parked == 0, "an outage shorter than park_after parks nothing"
        assert logged(relay, "wal_messages_parked") == 0


# WAL mode with one client: what it adds (pause, park, order across both paths) is the
# source's, the same whatever the client.
@pytest.mark.parametrize(("client", "source"), [("aiokafka", "table"), ("librdkafka", "table"), ("aiokafka", "wal")])
async def test_kafka_outage_of_several_publish_timeouts_dead_letters_nothing(
    db: str, own_kafka: LocalBroker, tmp_path: Path, client: str, source: str
) -> None:
    # The default request_timeout (30 s): aiokafka's idempotent producer retries its
    # records for as long as the broker is away, so every publish call during the outage
    # ends at publish_timeout. Five of them, with two attempts allowed: were a timeout to
    # spend an attempt, messages would be dead-lettered. The records handed over before
    # the outage was noticed may be delivered twice, no more. In WAL mode the outage also
    # outlasts relay.wal.park_after: what waits is parked into the table, and each key
    # parked follows it there, in order, until the table engine has delivered it.
    bootstrap = f"127.0.0.1:{own_kafka.port}"
    topic = f"long-outage-{uuid.uuid4().hex[:8]}"
    await kafka_create_topic(bootstrap, topic)
    with outbox_in(db, source) as outbox:
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
            **outbox.settings(park_after="5s"),
        )
        ledger, relay = outage(outbox, config, "orders.created", down=own_kafka.kill, up=own_kafka.start, down_for=10.0)
        parked = outbox.parked()
    received = await kafka_read(bootstrap, topic, len(ledger.committed), timeout=60)
    duplicates = check_delivery(received, ledger, max_duplicates=BATCH * WORKERS)
    if source == "wal":
        assert logged(relay, "wal_broker_outage_pausing") >= 1, "the stream paused first"
        assert parked > 0 and logged(relay, "wal_messages_parked") >= 1, "then parked past park_after"
    print(f"client={client} source={source} committed={len(ledger.committed)} parked={parked} duplicates={duplicates}")


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
    ledger, _ = outage(Outbox(db, "table"), config, "emails.sent", down=own_rabbitmq.stop, up=own_rabbitmq.start)
    reader = RabbitQueue(url, exchange, exchange + ".q")
    try:
        received = await rabbit_read(reader, len(ledger.committed) + BATCH * WORKERS * 2, timeout=15)
    finally:
        reader.close()
    check_delivery(received, ledger, max_duplicates=BATCH * WORKERS * 2)


@pytest.mark.parametrize("source", SOURCES)
async def test_nats_stopped_longer_than_every_timeout_and_restarted(
    db: str, own_nats: NatsServer, tmp_path: Path, source: str
) -> None:
    # Stopped for 10 s, past the adapter's timeout and connect_timeout (2 s) and the
    # relay's publish_timeout (3 s): nothing dead-lettered (max_attempts 2), nothing lost,
    # the stream (file store) still there after the restart. A re-send of what was in
    # flight falls in the stream's duplicate window (2 minutes): stored once. In WAL mode
    # this is the brokers' outage that parks (park_after 5 s, half the outage): the
    # stream pauses, then what waits goes into the table, and each key parked follows
    # it there, in order (Redis and SQS pause without parking).
    assert own_nats.broker is not None
    stream = f"outage-{uuid.uuid4().hex[:8]}"
    await make_stream(own_nats.url, stream, [f"{stream}.>"])
    with outbox_in(db, source) as outbox:
        config = write_config(
            tmp_path / "relay.yaml",
            db,
            brokers={
                "js": {
                    "type": "nats",
                    "servers": [own_nats.url],
                    "subject": stream + ".{destination}",
                    "stream": stream,
                    "timeout": "2s",
                    "connect_timeout": "2s",
                }
            },
            routes=[{"topic": "*", "broker": "js"}],
            timing=PATIENT,
            batch_size=BATCH,
            workers=WORKERS,
            max_attempts=2,
            publish_timeout="3s",
            **outbox.settings(park_after="5s"),
        )
        broker = own_nats.broker
        ledger, relay = outage(outbox, config, "orders.created", down=broker.stop, up=broker.start, down_for=10.0)
        parked = outbox.parked()
    received = await stream_read(own_nats.url, stream, len(ledger.committed), timeout=30)
    duplicates = check_delivery(received, ledger, max_duplicates=BATCH * WORKERS * 2)
    check_wal_outage(outbox, relay, parked, parks=True)
    print(f"source={source} committed={len(ledger.committed)} parked={parked} duplicates={duplicates}")


# WAL mode killed only, the harsher (what the source adds does not depend on how).
@pytest.mark.parametrize(("how", "source"), [("stopped", "table"), ("killed", "table"), ("killed", "wal")])
async def test_redis_down_longer_than_every_timeout_and_back(
    db: str, own_redis: LocalBroker, tmp_path: Path, how: str, source: str
) -> None:
    # Down for 10 s: five publish timeouts and five of the adapter's timeouts, with two
    # attempts allowed: were an outage to spend attempts, messages would be dead-lettered.
    # SIGKILLed, the AOF (appendfsync always) still holds every entry it acked. In WAL
    # mode park_after is far beyond the outage: the stream pauses, parks nothing, and
    # resumes (NATS's outage is the one that parks).
    url = f"redis://127.0.0.1:{own_redis.port}/0"
    stream = f"outage-{uuid.uuid4().hex[:8]}"
    with outbox_in(db, source) as outbox:
        config = write_config(
            tmp_path / "relay.yaml",
            db,
            brokers={"r": {"type": "redis", "url": url, "timeout": "2s"}},
            routes=[{"topic": "*", "broker": "r", "destination": stream}],
            timing=PATIENT,
            batch_size=BATCH,
            workers=WORKERS,
            max_attempts=2,
            publish_timeout="2s",
            **outbox.settings(park_after="600s"),
        )
        down = own_redis.stop if how == "stopped" else own_redis.kill
        ledger, relay = outage(outbox, config, "orders.created", down=down, up=own_redis.start, down_for=10.0)
        parked = outbox.parked()
    received = await redis_read(url, stream, len(ledger.committed), timeout=30)
    duplicates = check_delivery(received, ledger, max_duplicates=BATCH * WORKERS * 2)
    check_wal_outage(outbox, relay, parked, parks=False)
    print(f"how={how} source={source} committed={len(ledger.committed)} parked={parked} duplicates={duplicates}")


@pytest.mark.parametrize("source", SOURCES)
async def test_sqs_stopped_longer_than_every_timeout_and_restarted(
    db: str, own_elasticmq: SqsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    # ElasticMQ keeps its queues (queues-storage) and messages (an H2 database) in its
    # DIR (scripts/services/elasticmq.sh): it comes back with the queue the relay writes
    # to and what it held, as SQS would. Down for 12 s: past request_timeout and
    # connect_timeout (2 s each) and publish_timeout (5 s), with max_attempts 2: an
    # outage that spent attempts would dead-letter. In WAL mode park_after is far beyond
    # the outage: the stream pauses, parks nothing, and resumes (NATS's outage is the
    # one that parks).
    assert own_elasticmq.broker is not None
    for name, value in own_elasticmq.env.items():
        monkeypatch.setenv(name, value)  # the relay process takes its identity from these
    queue = SqsQueue(own_elasticmq, f"outage-{uuid.uuid4().hex[:8]}.fifo")
    with outbox_in(db, source) as outbox:
        config = write_config(
            tmp_path / "relay.yaml",
            db,
            brokers={
                "sqs": {
                    "type": "sqs",
                    "endpoint_url": own_elasticmq.endpoint_url,
                    "connect_timeout": "2s",
                    "request_timeout": "2s",
                }
            },
            routes=[{"topic": "*", "broker": "sqs", "destination": queue.name}],
            timing=PATIENT,
            batch_size=BATCH,
            workers=WORKERS,
            max_attempts=2,
            publish_timeout="5s",
            **outbox.settings(park_after="600s"),
        )
        broker = own_elasticmq.broker
        # Writers at a quarter of the others' pace: ElasticMQ drains ~1,000 msg/s and the
        # check reads the queue back 10 messages a request; the outage and its timeouts
        # are the same, with about 3,000 messages committed across it instead of 12,000.
        ledger, relay = outage(
            outbox, config, "emails.sent", down=broker.stop, up=broker.start, down_for=12.0, slower_writers=4.0
        )
        parked = outbox.parked()
    received = await sqs_read(queue, len(ledger.committed), timeout=60)
    duplicates = check_delivery(received, ledger, max_duplicates=BATCH * WORKERS)
    check_wal_outage(outbox, relay, parked, parks=False)
    print(f"source={source} committed={len(ledger.committed)} parked={parked} duplicates={duplicates}")


async def test_sqs_ready_after_a_restart_asks_for_each_queue_until_it_is_back(
    own_elasticmq: SqsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # After an outage the server may answer before it has restored its queues: ready()
    # must ask for every queue resolved before, on every probe until each is back, or the
    # circuit's trial message finds its queue missing. One queue is deleted right after
    # the restart, as if not restored yet.
    assert own_elasticmq.broker is not None
    for name, value in own_elasticmq.env.items():
        monkeypatch.setenv(name, value)
    tag = uuid.uuid4().hex[:8]
    kept, late = SqsQueue(own_elasticmq, f"kept-{tag}"), SqsQueue(own_elasticmq, f"late-{tag}")
    adapter = create_sqs(
        "sqs", {"endpoint_url": own_elasticmq.endpoint_url, "connect_timeout": "2s", "request_timeout": "2s"}
    )
    await adapter.connect()
    try:
        sent = await adapter.publish([OutgoingMessage(message(i), q.name, True) for i, q in enumerate((kept, late))])
        assert [r.outcome for r in sent] == [Outcome.ACKED] * 2, sent
        assert await adapter.ready()
        own_elasticmq.broker.stop()
        with pytest.raises(ConnectionError):
            await adapter.ready()
        own_elasticmq.broker.start()
        sqs_client(own_elasticmq).delete_queue(QueueUrl=late.url)
        for _ in range(3):
            with pytest.raises(ConnectionError, match=late.name):
                await adapter.ready()
        late = SqsQueue(own_elasticmq, late.name)
        assert await adapter.ready()
        again = await adapter.publish([OutgoingMessage(message(3), late.name, True)])
        assert [r.outcome for r in again] == [Outcome.ACKED], again
    finally:
        await adapter.close()


@pytest.mark.parametrize("source", SOURCES)
async def test_postgres_restarted_fast_and_immediate(
    own_pg: local_postgres.LocalPostgres, kafka_bootstrap: str, tmp_path: Path, source: str
) -> None:
    dsn = own_pg.dsn
    topic = f"pg-{uuid.uuid4().hex[:8]}"
    await kafka_create_topic(kafka_bootstrap, topic)
    restarted_at: list[int] = []  # messages committed before each restart
    with outbox_in(dsn, source) as outbox:
        config = write_config(
            tmp_path / "relay.yaml",
            dsn,
            brokers={"kafka": {"type": "kafka", "bootstrap_servers": kafka_bootstrap}},
            routes=[{"topic": "*", "broker": "kafka", "destination": topic}],
            timing=PATIENT,
            batch_size=BATCH,
            workers=WORKERS,
            poll_interval="30s",
            **outbox.settings(),
        )  # resuming must come from reconnect + LISTEN again, not the poll
        relay = RelayProcess(config)
        writers = writers_for(outbox, "orders.created").start()
        try:
            port = http_port(relay)
            wait_for(lambda: ready(port), 30, "ready")
            for mode in ("fast", "immediate"):
                time.sleep(1.5)  # traffic flowing before the fault
                restarted_at.append(len(writers.ledger.committed))
                own_pg.stop(mode)
                wait_for(lambda: not ready(port), 30, f"/readyz false while PostgreSQL is down ({mode})")
                time.sleep(1)  # the outage lasts this long
                own_pg.start(OWN_PG_SETTINGS)
                wait_for(lambda: ready(port), 60, f"/readyz true after the {mode} restart")
            time.sleep(2)  # traffic flowing after the restarts
            ledger = writers.stop()
            outbox.wait_dispatched(60)
            logs = relay.log_path.read_text()
            assert logs.count('"listening"') >= 3, "the relay LISTENs again after each restart"
            if source == "wal":
                assert logged(relay, "wal_relay_started") >= 3, "the relay streams again after each restart"
            assert relay.terminate() == 0
        finally:
            writers.stop()
            relay.close()
        parked = outbox.parked()
    received = await kafka_read(kafka_bootstrap, topic, len(ledger.committed), timeout=60)
    in_flight = BATCH * WORKERS * 2
    if source == "wal":
        # PostgreSQL keeps a slot's confirmed position in memory and writes it to disk
        # only with a checkpoint that finds the slot dirty, which a confirm alone does
        # not make it before PostgreSQL 17 (not even at a clean shutdown): after a
        # restart the slot may resume from an older position, and the transactions
        # after it are delivered again, at most once more per restart.
        in_flight += sum(restarted_at)
    duplicates = check_delivery(received, ledger, uncertain=writers.uncertain, max_duplicates=in_flight)
    assert parked == 0, "a database restart parks nothing"
    print(f"source={source} committed={len(ledger.committed)} restarts at {restarted_at} duplicates={duplicates}")


async def test_network_stall_longer_than_the_request_timeout(
    db: str, amqp_url: str, tmp_path: Path, proxy: MakeProxy
) -> None:
    parts = urlsplit(amqp_url)
    server = proxy(f"{parts.hostname or '127.0.0.1'}:{parts.port or 5672}")
    exchange = f"stall-{uuid.uuid4().hex[:8]}"
    queue = RabbitQueue(amqp_url, exchange, exchange + ".q")
    proxied = amqp_url.replace(f":{parts.port}/", f":{server.port}/")
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
        holes = server.black_hole()  # bytes stop flowing, connections stay open: longer than publish_timeout
        time.sleep(6)  # the stall lasts this long
        server.disable()  # and then the connections drop
        time.sleep(1)  # refused this long
        server.remove(*holes)
        server.enable()
        wait_for(lambda: ready(port), 60, "ready after the stall")
        ledger = writers.stop()
        wait_for(lambda: pending(db) == 0, 120, "every message dispatched")
        assert relay.terminate() == 0
        received = await rabbit_read(queue, len(ledger.committed) + 10 * BATCH * WORKERS, timeout=15)
    finally:
        writers.stop()
        relay.close()
        queue.close()
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
