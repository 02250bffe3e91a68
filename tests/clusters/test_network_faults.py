"""Network faults between the relay and each service it talks to, through toxiproxy
(issue 20, point 4): PostgreSQL, Kafka, RabbitMQ and a webhook receiver.

One relay (the real CLI in a subprocess, table source) per service, writers committing
throughout (harness.Writers: each thread its own keys, every 7th transaction rolled
back), and a toxiproxy proxy between the relay and that one service; the others are
reached directly. The faults, one after another, each removed before the next:

- degrading, which the relay must work through (messages keep being dispatched while
  the toxic is on): latency 500 ms +/- 100 ms on every answer, bandwidth 10 KB/s both
  ways, the stream sliced into pieces of 32-96 bytes both ways;
- breaking, which the relay must notice (a warning in its log, or /readyz false) and
  get over once the toxic is gone: a black hole (`timeout` 0 both ways: no data, no
  reset), `reset_peer` (every connection reset 200 ms after its first data), a cut in
  the middle of a batch and one in the middle of a commit (below).

After each, everything committed before its removal is dispatched and /readyz is true
again, without a restart. At the end: nothing lost, nothing phantom, nothing
dead-lettered, duplicates at most a batch per worker per breaking fault, each key's
first deliveries in commit order (harness.check_delivery).

The two cuts are aimed, not timed:
- mid-batch: to a broker, `limit_data` on the relay's requests (each connection closed
  a few KB into them, inside a batch's publish), held until the relay logs the failure;
  to PostgreSQL, the webhook receiver (the PostgreSQL test's broker) cuts the relay's
  database connections when a request arrives, before answering it: the batch is
  claimed, its transaction open, its publish under way;
- mid-commit, between the publish and its mark: to a broker, the answers are
  black-holed and, once the broker holds records the relay was never told about (its
  offsets or queue depth grew), the connections are cut; to PostgreSQL, the receiver
  black-holes the database's answers when a request arrives, answers it, and once the
  mark of that message has committed in PostgreSQL (read directly) the connections are
  cut: a commit whose answer the relay never got.

Kafka advertises its own address in its metadata: the broker of this module gets a
listener of its own behind the proxy (kafka.sh, KAFKA_PROXY_PORT), so the relay's
connections stay behind it; the test's reader uses the broker's plain listener.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pika
import psycopg
import pytest
from confluent_kafka import Consumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from outbox_relay.demo import local_postgres
from outbox_relay.json_lines import decode_payload
from tests import services
from tests.consumers import RabbitQueue, Received, kafka_create_topic, kafka_read
from tests.faults.harness import Writers, check_delivery, http_port
from tests.support.cli import RelayProcess
from tests.support.configs import PATIENT, write_config
from tests.support.http import HttpReceiver, Request
from tests.support.outbox import dead_letters, dispatched, pending
from tests.support.toxiproxy import STREAMS, MakeProxy, Proxy, Toxiproxy
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

BATCH, WORKERS = 50, 2
IN_FLIGHT = BATCH * WORKERS  # what one breaking fault may leave published but not marked
FLOWING = 20  # messages dispatched while a degrading toxic is on: the relay works through it
# Degrading toxics: (name, [(type, stream, attributes)]).
Toxics = list[tuple[str, str, dict[str, Any]]]  # (type, stream, attributes)
DEGRADING: list[tuple[str, Toxics]] = [
    ("latency 500 ms +/- 100", [("latency", "downstream", {"latency": 500, "jitter": 100})]),
    ("bandwidth 10 KB/s", [("bandwidth", stream, {"rate": 10}) for stream in STREAMS]),
    ("slicer", [("slicer", stream, {"average_size": 64, "size_variation": 32, "delay": 100}) for stream in STREAMS]),
]


@dataclass
class Run:
    """A relay process and its writers, and the signals the phases poll."""

    dsn: str  # the outbox's, direct
    relay: RelayProcess
    writers: Writers
    port: int = 0
    breaking: int = 0  # breaking faults so far: each may leave a batch per worker in flight
    seen_lines: int = 0
    log: list[str] = field(default_factory=list)
    began: float = field(default_factory=time.monotonic)

    def ready(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def warnings(self) -> list[dict[str, Any]]:
        """The relay's warnings and errors logged so far."""
        return [line for line in self.relay.logs() if line.get("level") in ("warning", "error")]

    def newest_id(self) -> int:
        with psycopg.connect(self.dsn) as conn:
            row = conn.execute("SELECT coalesce(max(id), 0) FROM outbox.messages").fetchone()
        return int(row[0]) if row else 0

    def waiting_up_to(self, last: int) -> int:
        """Messages up to id `last` neither dispatched nor dead-lettered."""
        with psycopg.connect(self.dsn) as conn:
            row = conn.execute(
                "SELECT count(*) FROM outbox.messages WHERE id <= %s AND dispatched_at IS NULL"
                " AND dead_lettered_at IS NULL",
                (last,),
            ).fetchone()
        return int(row[0]) if row else 0

    def dispatched_after(self, last: int) -> int:
        with psycopg.connect(self.dsn) as conn:
            row = conn.execute(
                "SELECT count(*) FROM outbox.messages WHERE id > %s AND dispatched_at IS NOT NULL", (last,)
            ).fetchone()
        return int(row[0]) if row else 0

    def recovered(self, what: str) -> None:
        """Everything committed so far gets dispatched, and /readyz says ready: the relay
        got over `what` on its own."""
        last = self.newest_id()
        wait_for(
            lambda: self.waiting_up_to(last) == 0, 120, f"everything committed before the end of {what} dispatched"
        )
        wait_for(self.ready, 60, f"/readyz true after {what}")
        self.note(f"{what}: recovered")

    def degraded(self, proxy: Proxy, what: str, toxics: Toxics) -> None:
        names = [proxy.add(kind, stream=stream, **attributes) for kind, stream, attributes in toxics]
        started = time.monotonic()
        try:
            last = self.newest_id()  # messages committed after it go through the toxic
            wait_for(lambda: self.dispatched_after(last) >= FLOWING, 60, f"messages flowing under {what}")
        finally:
            proxy.remove(*names)
        self.note(f"{what}: {FLOWING} dispatched in {time.monotonic() - started:.1f}s")
        self.recovered(what)

    def failures(self) -> float:
        """outbox_relay_publish_failures_total, all brokers and reasons."""
        text = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=5).text
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "outbox_relay_publish_failures_total"
        )

    def felt(self, warned: int, failed: float) -> bool:
        """The relay noticed a fault: a new warning in its log, a publish failure, or
        /readyz false."""
        return len(self.warnings()) > warned or self.failures() > failed or not self.ready()

    def note(self, line: str) -> None:
        line = f"{time.monotonic() - self.began:6.1f}s {line}"
        self.log.append(line)
        print(line, flush=True)

    def broken(self, what: str, fault: Callable[[], Callable[[], None]]) -> None:
        """`fault()` breaks the connection and returns how to end it; ended once the relay
        noticed, then the relay must recover."""
        self.breaking += 1
        warned, failed = len(self.warnings()), self.failures()
        started = time.monotonic()
        end = fault()
        try:
            wait_for(lambda: self.felt(warned, failed), 60, f"the relay noticing {what}")
        finally:
            end()
        self.note(f"{what}: noticed after {time.monotonic() - started:.1f}s")
        self.recovered(what)


def toxics_ended(proxy: Proxy, names: list[str]) -> Callable[[], None]:
    return lambda: proxy.remove(*names)


def black_hole(proxy: Proxy) -> Callable[[], None]:
    return toxics_ended(proxy, proxy.black_hole())


def reset_peer(proxy: Proxy) -> Callable[[], None]:
    return toxics_ended(proxy, [proxy.add("reset_peer", stream="upstream", timeout=200)])


def cut_mid_batch(proxy: Proxy, after: int) -> Callable[[], None]:
    return toxics_ended(proxy, [proxy.add("limit_data", stream="upstream", bytes=after)])


def degrade_and_break(run: Run, proxy: Proxy, *, cut_after: int = 2048) -> None:
    """The faults of the module docstring against `proxy`, in order, but for the aimed
    cuts of PostgreSQL and the cut mid-commit (each test's own). `cut_after`: the bytes
    of the relay's requests a connection carries before it is cut: past its handshake,
    inside a batch (a batch's publish to Kafka or RabbitMQ is several KB: 50 messages of
    ~200 bytes and their headers; a webhook POST of one message ~700 bytes, each on a
    connection of its own)."""
    for what, toxics in DEGRADING:
        run.degraded(proxy, what, toxics)
    run.broken("a black hole", lambda: black_hole(proxy))
    run.broken("reset_peer", lambda: reset_peer(proxy))
    run.broken(
        f"limit_data (a cut {cut_after} bytes into the relay's requests)",
        lambda: cut_mid_batch(proxy, cut_after),
    )


def cut_mid_commit(run: Run, proxy: Proxy, held: Callable[[], int], what: str) -> None:
    """To a broker: its answers black-holed until it holds records the relay was never
    told of, then every connection cut. A try where nothing landed (the one request in
    flight was appended, and answered, before the hole) is given up and made again, up
    to 3 times."""
    run.breaking += 1
    for attempt in range(1, 4):
        hit = answers_lost(run, proxy, held, what)
        run.recovered(f"a cut mid-commit (try {attempt}, {'hit' if hit else 'missed'})")
        if hit:
            return
    raise AssertionError(f"{what}: no records landed with their answers lost in 3 tries")


def answers_lost(run: Run, proxy: Proxy, held: Callable[[], int], what: str) -> bool:
    """One try of cut_mid_commit. Records the broker holds (`held`) beyond those the relay
    marked dispatched since the hole began, counted once the relay has felt the hole (its
    publish failed: the acks it did get are marked by then), are records whose ack was
    lost: then the connections are cut, inside that commit."""
    records, marked = held(), dispatched(run.dsn)
    warned, failed = len(run.warnings()), run.failures()
    holes = proxy.black_hole("downstream")
    try:
        wait_for(lambda: run.felt(warned, failed), 60, f"the relay noticing {what}'s lost answers")
        hit = poll(lambda: held() - records > dispatched(run.dsn) - marked, 5)
        if hit:
            proxy.disable()
        return hit
    finally:
        proxy.remove(*holes)
        proxy.enable()


def poll(predicate: Callable[[], bool], timeout: float) -> bool:
    """Whether `predicate` comes true within `timeout` seconds (polled)."""
    try:
        wait_for(predicate, timeout, "")
    except AssertionError:
        return False
    return True


def start(dsn: str, config: Path, topic: str) -> Run:
    relay = RelayProcess(config)
    writers = Writers(dsn, topic, count=2, pause=0.05)
    run = Run(dsn, relay, writers)
    try:
        run.port = http_port(relay)
        wait_for(run.ready, 60, "the relay ready")
        writers.start()
        before = dispatched(dsn)
        wait_for(lambda: dispatched(dsn) >= before + FLOWING, 60, "messages flowing before the faults")
    except BaseException:
        writers.stop()
        relay.close()
        raise
    return run


def finish(run: Run) -> Any:
    """Writers stopped, everything dispatched, the relay stopped cleanly; the ledger."""
    try:
        ledger = run.writers.stop()
        wait_for(lambda: pending(run.dsn) == 0, 120, "every message dispatched")
        assert run.relay.terminate() == 0
    finally:
        run.writers.stop()
        run.relay.close()
    assert dead_letters(run.dsn) == [], "a network fault spends no message's attempts"
    return ledger


def relay_config(tmp_path: Path, dsn: str, broker: dict[str, Any], destination: str | None = None) -> Path:
    route = {"topic": "*", "broker": "out"} | ({"destination": destination} if destination else {})
    return write_config(
        tmp_path / "relay.yaml",
        dsn,
        brokers={"out": broker},
        routes=[route],
        timing=PATIENT,
        batch_size=BATCH,
        workers=WORKERS,
        publish_timeout="2s",
        # A network fault must spend no attempts that matter: the relay's own policy is
        # tested elsewhere; here a dead letter is a failure.
        max_attempts=1000,
    )


def webhook_received(receiver: HttpReceiver) -> list[Received]:
    out = []
    for request in receiver.accepted():
        body = request.json
        out.append(Received(body["message_id"], body["key"], json.dumps(decode_payload(body)).encode()))
    return out


def host_port(dsn: str) -> str:
    params = conninfo_to_dict(dsn)
    return f"{params.get('host') or '127.0.0.1'}:{params.get('port') or 5432}"


class Trigger:
    """The webhook receiver's hook: the next request after `arm` runs `action` (in the
    receiver's thread, before the request is answered) and is remembered."""

    def __init__(self) -> None:
        self._armed: Callable[[Request], None] | None = None
        self.hit = threading.Event()
        self.message_id = ""

    def arm(self, action: Callable[[Request], None]) -> None:
        self.hit.clear()
        self._armed = action

    def respond(self, request: Request) -> tuple[int, float]:
        action, self._armed = self._armed, None
        if action is not None:
            self.message_id = request.headers["message-id"]
            action(request)
            self.hit.set()
        return 200, 0.0


# A commit of the relay held open from the inside: a deferred trigger on its marks takes
# an advisory lock that the test holds, so the COMMIT waits, sent and not answered.
COMMIT_GATE = 20_004
COMMIT_GATE_SQL = """
CREATE FUNCTION public.fault_commit_gate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(20004);
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER fault_commit_gate AFTER UPDATE OF dispatched_at ON outbox.messages
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    WHEN (OLD.dispatched_at IS NULL AND NEW.dispatched_at IS NOT NULL)
    EXECUTE FUNCTION public.fault_commit_gate();
"""


def commits_held(dsn: str) -> int:
    """The relay's sessions whose COMMIT waits at the gate."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'outbox-relay' AND query = 'COMMIT' AND wait_event = 'advisory'"
        ).fetchone()
    return int(row[0]) if row else 0


def cut_inside_commit(run: Run, database: Proxy) -> None:
    """The relay's connections cut while a COMMIT of its marks is in PostgreSQL, then that
    commit let through: it commits, and the relay never hears of it."""
    with psycopg.connect(run.dsn, autocommit=True) as gate:
        gate.execute("SELECT pg_advisory_lock(%s)", (COMMIT_GATE,))
        try:
            wait_for(lambda: commits_held(run.dsn) > 0, 60, "a COMMIT of the relay's marks in PostgreSQL")
            database.disable()
            before = dispatched(run.dsn)
        finally:
            gate.execute("SELECT pg_advisory_unlock(%s)", (COMMIT_GATE,))
    try:
        wait_for(lambda: dispatched(run.dsn) > before, 60, "the cut COMMIT committed")
    finally:
        database.enable()
    run.recovered("a cut of the database inside a COMMIT")


def test_postgres(db: str, proxy: MakeProxy, tmp_path: Path) -> None:
    with psycopg.connect(db) as conn:
        conn.execute(COMMIT_GATE_SQL)
    database = proxy(host_port(db))
    dsn = make_conninfo(db, host="127.0.0.1", port=str(database.port))
    trigger = Trigger()
    with HttpReceiver(trigger.respond) as receiver:
        config = relay_config(tmp_path, dsn, {"type": "webhook", "url": receiver.url, "timeout": "5s"})
        run = start(db, config, "orders.created")
        try:
            degrade_and_break(run, database)

            # Mid-batch: the batch's transaction cut while its publish is under way.
            def cut(request: Request) -> None:
                database.disable()
                database.enable()

            trigger.arm(cut)
            wait_for(trigger.hit.is_set, 60, "a request arriving mid-batch")
            run.breaking += 1
            run.recovered("a cut of the database mid-batch")
            cut_in_batch = trigger.message_id
            run.breaking += 1
            cut_inside_commit(run, database)
            ledger = finish(run)
        finally:
            run.writers.stop()
            run.relay.close()
        received = webhook_received(receiver)
    duplicates = check_delivery(received, ledger, max_duplicates=IN_FLIGHT * run.breaking)
    copies = sum(1 for r in received if r.message_id == cut_in_batch)
    assert copies >= 2, "the message acked while its batch's connection was cut is sent again (the batch rolled back)"
    print(f"postgres: committed={len(ledger.committed)} duplicates={duplicates}")


def test_webhook(db: str, proxy: MakeProxy, tmp_path: Path) -> None:
    with HttpReceiver(lambda request: (200, 0.0)) as receiver:
        endpoint = proxy(f"127.0.0.1:{receiver.port}")
        config = relay_config(
            tmp_path, db, {"type": "webhook", "url": f"http://{endpoint.address}/events", "timeout": "2s"}
        )
        run = start(db, config, "orders.created")
        try:
            degrade_and_break(run, endpoint, cut_after=300)
            cut_mid_commit(run, endpoint, lambda: len(receiver.requests), "the webhook receiver")
            ledger = finish(run)
        finally:
            run.writers.stop()
            run.relay.close()
        received = webhook_received(receiver)
    duplicates = check_delivery(received, ledger, max_duplicates=IN_FLIGHT * run.breaking)
    print(f"webhook: committed={len(ledger.committed)} duplicates={duplicates}")


def test_rabbitmq(db: str, amqp_url: str, proxy: MakeProxy, tmp_path: Path) -> None:
    parts = urlsplit(amqp_url)
    broker = proxy(f"{parts.hostname or '127.0.0.1'}:{parts.port or 5672}")
    exchange = f"net-{uuid.uuid4().hex[:8]}"
    queue = RabbitQueue(amqp_url, exchange, exchange + ".q")
    proxied = amqp_url.replace(f":{parts.port}/", f":{broker.port}/")
    config = relay_config(
        tmp_path,
        db,
        {"type": "rabbitmq", "url": proxied, "exchange": exchange, "connect_timeout": "2s", "heartbeat": "5s"},
    )
    run = start(db, config, "orders.created")
    try:
        degrade_and_break(run, broker)
        cut_mid_commit(run, broker, lambda: queue_depth(amqp_url, queue.queue), "RabbitMQ")
        ledger = finish(run)
        # Every publish was confirmed before the relay stopped: the queue holds them all.
        received = queue.read(queue_depth(amqp_url, queue.queue), timeout=30)
    finally:
        run.writers.stop()
        run.relay.close()
        queue.close()
    duplicates = check_delivery(received, ledger, max_duplicates=IN_FLIGHT * run.breaking)
    print(f"rabbitmq: committed={len(ledger.committed)} duplicates={duplicates}")


def queue_depth(url: str, queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        connection.close()


@dataclass
class ProxiedKafka:
    bootstrap: str  # the broker's plain listener, for the test's reader
    proxy: Proxy  # in front of the listener whose metadata names the proxy


@pytest.fixture(scope="module")
def proxied_kafka(toxiproxy: Toxiproxy) -> Iterator[ProxiedKafka]:
    listen = local_postgres.free_port()
    # Ports PORT..PORT+3: plain, controller, SASL_SSL, and the listener behind the proxy.
    with services.local_broker("kafka.sh", 4, env={"KAFKA_PROXY_PORT": str(listen)}) as broker:
        proxy = toxiproxy.proxy(
            f"kafka-{uuid.uuid4().hex[:8]}", f"127.0.0.1:{broker.port + 3}", listen=f"127.0.0.1:{listen}"
        )
        try:
            yield ProxiedKafka(f"127.0.0.1:{broker.port}", proxy)
        finally:
            proxy.delete()


def kafka_records(bootstrap: str, topic: str) -> int:
    """Records in `topic` (the sum of its partitions' high watermarks)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "network-faults", "enable.auto.commit": False})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return sum(
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)[1] for p in partitions
        )
    finally:
        consumer.close()


@pytest.mark.parametrize("client", ["aiokafka", "librdkafka"])
async def test_kafka(db: str, proxied_kafka: ProxiedKafka, tmp_path: Path, client: str) -> None:
    topic = f"net-{uuid.uuid4().hex[:8]}"
    await kafka_create_topic(proxied_kafka.bootstrap, topic)
    broker = proxied_kafka.proxy
    config = relay_config(
        tmp_path,
        db,
        {"type": "kafka", "bootstrap_servers": broker.address, "client": client, "request_timeout": "5s"},
        topic,
    )
    run = start(db, config, "orders.created")
    try:
        degrade_and_break(run, broker)
        cut_mid_commit(run, broker, lambda: kafka_records(proxied_kafka.bootstrap, topic), "Kafka")
        ledger = finish(run)
    finally:
        run.writers.stop()
        run.relay.close()
    received = await kafka_read(proxied_kafka.bootstrap, topic, len(ledger.committed), timeout=60)
    duplicates = check_delivery(received, ledger, max_duplicates=IN_FLIGHT * run.breaking)
    print(f"kafka {client}: committed={len(ledger.committed)} duplicates={duplicates}")
