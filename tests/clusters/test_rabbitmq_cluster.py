"""The relay against a real 3-node RabbitMQ cluster with a quorum queue (issue 20,
point 2): the relay's node stopped, the queue's leader SIGKILLed, a node partitioned
away, each with writers committing throughout and the relay a real process given all
three nodes (`urls`).

Every scenario checks: nothing lost, nothing dead-lettered, nothing from a rolled-back
transaction, per-key order of first deliveries, duplicates at most what was in flight,
and that every message the outbox marked dispatched (its publisher confirm arrived) is
in the queue when it is read back at the end: a confirm is never reported for a
message the cluster lost. /readyz and the relay's broker metrics are sampled
throughout, and what they said is checked where the relay saw an outage.

One cluster for the module (about 35 s to start); each scenario leaves it whole again.
Table source only: the broker side is what differs from the single-node outage tests.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pika
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.consumers import Received
from tests.faults.harness import Ledger, Outbox, Writers, check_delivery, http_port
from tests.support.cli import RelayProcess
from tests.support.configs import PATIENT, write_config
from tests.support.rabbitmq_cluster import ClusterNode, RabbitCluster, rabbitmq_cluster
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

BATCH, WORKERS = 50, 2
IN_FLIGHT = BATCH * WORKERS * 2  # what a lost connection can leave unconfirmed, twice over
QUORUM = {"x-queue-type": "quorum"}


@pytest.fixture(scope="module")
def cluster() -> Iterator[RabbitCluster]:
    with rabbitmq_cluster() as started:
        yield started


@dataclass
class Sample:
    at: float
    ready: bool | None  # None: the relay did not answer
    connected: float | None  # outbox_relay_broker_connected{broker="mq"}
    failures: dict[str, float]  # outbox_relay_publish_failures_total{broker="mq"} by kind
    published: float


@dataclass
class Watch:
    """/readyz and /metrics of a relay, every 0.2 s, in a thread."""

    port: int
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=5) as client:
            while not self._stop.is_set():
                self.samples.append(self._sample(client))
                self._stop.wait(0.2)

    def _sample(self, client: httpx.Client) -> Sample:
        ready: bool | None
        try:
            ready = client.get("/readyz").status_code == 200
            text = client.get("/metrics").text
        except httpx.HTTPError:
            return Sample(time.monotonic(), None, None, {}, 0)
        connected, failures, published = None, {}, 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.labels.get("broker") != "mq":
                    continue
                if sample.name == "outbox_relay_broker_connected":
                    connected = sample.value
                elif sample.name == "outbox_relay_publish_failures_total":
                    failures[sample.labels["kind"]] = sample.value
                elif sample.name == "outbox_relay_messages_published_total":
                    published = sample.value
        return Sample(time.monotonic(), ready, connected, failures, published)

    def last(self) -> Sample | None:
        """The last sample the relay answered."""
        return next((s for s in reversed(self.samples) if s.ready is not None), None)

    def published(self) -> float:
        last = self.last()
        return last.published if last else 0.0

    def wait_published(self, more: int, what: str, timeout: float = 90) -> None:
        """Until the relay has published `more` messages beyond what it had now."""
        start = self.published()
        wait_for(lambda: self.published() >= start + more, timeout, what)

    def since(self, moment: float) -> list[Sample]:
        return [s for s in self.samples if s.at >= moment]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def read_queue(url: str, queue: str, expected: set[str], timeout: float = 60) -> list[Received]:
    """Everything in the queue, consumed until it is empty and every `expected` id came
    (or `timeout`): the check then names what is missing."""
    received: list[Received] = []
    seen: set[str] = set()
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=1000)
        deadline = time.monotonic() + timeout
        for method, props, body in channel.consume(queue, auto_ack=True, inactivity_timeout=2):
            if method is None:  # the queue is empty now
                if expected <= seen or time.monotonic() > deadline:
                    break
                continue
            seen.add(props.message_id)
            received.append(
                Received(
                    message_id=props.message_id,
                    key=None,
                    payload=body,
                    headers={},
                    properties={"routing_key": method.routing_key, "timestamp": props.timestamp},
                )
            )
        channel.cancel()
    finally:
        connection.close()
    return received


def dispatched_ids(dsn: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT message_id::text FROM outbox.messages WHERE dispatched_at IS NOT NULL").fetchall()
    return {str(row[0]) for row in rows}


def dead_lettered(dsn: str) -> list[tuple[int, str]]:
    """Each dead letter's attempts and reason: a failure names why, not only how many."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT attempts, dead_letter_reason FROM outbox.messages WHERE dead_lettered_at IS NOT NULL"
        ).fetchall()
    return [(int(attempts), str(reason)) for attempts, reason in rows]


def connected_to(relay: RelayProcess) -> list[str]:
    """The addresses the relay's RabbitMQ adapter connected to, in order."""
    return [str(line["address"]) for line in relay.logs() if line.get("event") == "rabbitmq_connected"]


def address(node: ClusterNode) -> str:
    return f"127.0.0.1:{node.port}"


@dataclass
class Run:
    """What a scenario gets: the relay, its watch, where it connects first."""

    relay: RelayProcess
    watch: Watch
    first: ClusterNode
    queue: str


def scenario(
    db: str,
    cluster: RabbitCluster,
    tmp_path: Path,
    *,
    relay_on: int,
    leader_on: int,
    fault: Callable[[Run], None],
    broker: dict[str, str] | None = None,
    publish_timeout: str = "10s",
) -> tuple[Ledger, Watch, RelayProcess]:
    """A quorum queue led by node `leader_on`, a relay given the three nodes starting
    with node `relay_on`, writers committing; `fault(run)` once traffic flows (it
    leaves the cluster whole again), more traffic, then the checks."""
    leader = cluster.nodes[leader_on - 1]
    exchange = f"cluster-{uuid.uuid4().hex[:8]}"
    queue = exchange + ".q"
    # A quorum queue's first leader is the node it was declared on (client-local).
    declaring = pika.BlockingConnection(pika.URLParameters(leader.url))
    try:
        channel = declaring.channel()
        channel.exchange_declare(exchange, exchange_type="topic", durable=True)
        channel.queue_declare(queue, durable=True, arguments=QUORUM)
        channel.queue_bind(queue, exchange, routing_key="#")
    finally:
        declaring.close()
    assert cluster.leader(queue) is leader
    cluster.wait_online(queue)
    order = [cluster.nodes[(relay_on - 1 + i) % 3] for i in range(3)]
    config = write_config(
        tmp_path / "relay.yaml",
        db,
        brokers={
            "mq": {
                "type": "rabbitmq",
                "urls": [node.url for node in order],
                "exchange": exchange,
                "connect_timeout": "5s",
                "heartbeat": "5s",
                **(broker or {}),
            }
        },
        routes=[{"topic": "*", "broker": "mq"}],
        timing=PATIENT,
        batch_size=BATCH,
        workers=WORKERS,
        max_attempts=3,  # an outage spends no attempts: nothing may be dead-lettered
        publish_timeout=publish_timeout,
    )
    relay = RelayProcess(config)
    # Two writers, one message a transaction every ~10 ms each: a few thousand messages
    # a scenario, enough to have some in flight at any moment and quick to read back.
    writers = Writers(db, "orders.created", count=2, pause=0.01).start()
    watch: Watch | None = None
    try:
        watch = Watch(http_port(relay))
        watch.wait_published(100, "traffic flowing before the fault")
        assert connected_to(relay) == [address(order[0])]
        try:
            fault(Run(relay, watch, order[0], queue))
        except AssertionError as failed:
            raise AssertionError(f"{failed}; the queue then: {cluster.queues().get(queue)}") from None
        watch.wait_published(100, "traffic flowing after the fault")
        ledger = writers.stop()
        Outbox(db, "table").wait_dispatched(120)
        wait_for(lambda: (last := watch.last()) is not None and last.ready, 60, "/readyz true at the end")
        assert relay.terminate() == 0
    finally:
        writers.stop()
        relay.close()
        if watch is not None:
            watch.stop()
    failures = [
        {k: line.get(k) for k in ("event", "message_id", "reason", "attempt", "attempts")}
        for line in relay.logs()
        if line.get("event") in ("publish_failed", "message_dead_lettered")
    ]
    assert dead_lettered(db) == [], f"a node going away spends no attempts; the relay's failures: {failures}"
    confirmed = dispatched_ids(db)
    reader = next(node for node in cluster.nodes if node.name in cluster.running())
    received = read_queue(reader.url, queue, set(ledger.committed))
    lost = confirmed - {r.message_id for r in received}
    assert not lost, f"{len(lost)} messages confirmed (marked dispatched) are not in the queue"
    duplicates = check_delivery(received, ledger, uncertain=writers.uncertain, max_duplicates=IN_FLIGHT)
    last = watch.last()
    assert last is not None
    failures = last.failures
    print(f"committed={len(ledger.committed)} duplicates={duplicates} failures={failures}")
    assert failures.get("permanent", 0) == 0
    # Each copy was published again after its first try went unconfirmed, which the
    # metrics count as a failure (transient: the connection or channel was lost;
    # unavailable: no answer within publish_timeout): they account for every duplicate.
    unconfirmed = failures.get("transient", 0) + failures.get("unavailable", 0)
    assert unconfirmed >= duplicates, "a duplicate the metrics do not show"
    return ledger, watch, relay


def test_the_relays_node_stopped_it_goes_on_through_another(db: str, cluster: RabbitCluster, tmp_path: Path) -> None:
    """Node 1, the relay's, stopped cleanly (it closes its clients' connections), the
    queue led by node 2: the relay's next publish connects to node 2, the next address;
    what was unconfirmed on node 1 is published again. Node 1 then comes back."""
    stopped_at: list[float] = []

    def fault(run: Run) -> None:
        stopped_at.append(time.monotonic())
        run.first.stop()
        run.watch.wait_published(100, "publishing through another node while node 1 is down")
        assert connected_to(run.relay)[1:2] == [address(cluster.nodes[1])], "the next address: node 2"
        run.first.start()
        cluster.wait_all_running()

    _ledger, watch, _relay = scenario(db, cluster, tmp_path, relay_on=1, leader_on=2, fault=fault)
    during = watch.since(stopped_at[0])
    print(f"readyz false in {sum(1 for s in during if s.ready is False)} of {len(during)} samples")


def test_the_queues_leader_killed(db: str, cluster: RabbitCluster, tmp_path: Path) -> None:
    """Node 3, the quorum queue's leader, SIGKILLed while the relay publishes through
    node 1: the two left elect a new leader, the relay's connection stays up and its
    confirms resume (a majority stored each message it confirms). Node 3 then rejoins."""

    def fault(run: Run) -> None:
        killed = cluster.nodes[2]
        killed.kill()
        wait_for(
            lambda: (new := cluster.leader(run.queue)) is not None and new is not killed,
            60,
            "a new leader elected",
            interval=1,
        )
        run.watch.wait_published(100, "confirms resuming under the new leader")
        killed.start()
        cluster.wait_all_running()

    _ledger, _watch, relay = scenario(db, cluster, tmp_path, relay_on=1, leader_on=3, fault=fault)
    assert connected_to(relay) == [address(cluster.nodes[0])], "the relay's own node never went away"


def test_a_node_partitioned_away(db: str, cluster: RabbitCluster, tmp_path: Path) -> None:
    """Node 2, the relay's and the queue's leader, cut off its two peers.

    Imitates: a network split between the RabbitMQ nodes, with the clients' network
    intact. The cut is made in node 2's Erlang distribution (rabbitmq.sh node-partition:
    it takes a cookie for its peers that neither side has and drops its links, so every
    reconnect fails the handshake); no root and no packet filter needed. Node 2 finds
    itself in the minority and pauses (cluster_partition_handling = pause_minority),
    closing its clients' connections and its listener; the majority elects a new leader.
    Does not imitate: packets lost or delayed between the relay and a node (the
    toxiproxy tests do that), a split noticed only after net_ticktime (here the links
    drop at once), nor a minority that keeps serving clients (pause_minority forbids it).
    """
    cut_at: list[float] = []

    def fault(run: Run) -> None:
        cut_at.append(time.monotonic())
        run.first.partition()
        try:
            run.watch.wait_published(100, "publishing through the majority while node 2 is cut off")
        finally:
            run.first.heal()
        assert address(cluster.nodes[2]) in connected_to(run.relay)[1:], "reconnected on the majority side"
        cluster.wait_all_running()

    scenario(db, cluster, tmp_path, relay_on=2, leader_on=2, fault=fault)


def test_the_relays_node_frozen(db: str, cluster: RabbitCluster, tmp_path: Path) -> None:
    """Node 1, the relay's, frozen (SIGSTOP) while the queue is led by node 2.

    Imitates: a hung node, or a black hole between the relay and its node: the relay's
    connection stays open, with no reset and no answer. Its publish call times out
    (publish_timeout), the broker's circuit opens (/readyz false, broker_connected 0),
    and the probe gets no channel within connect_timeout: the relay must then give that
    connection up and connect to the next node, not wait for the AMQP heartbeat
    (60 s here, so only the probe can be what moves it). The peers declare node 1 down
    after net_ticktime; after SIGCONT it finds itself cut off, pauses (pause_minority)
    and rejoins."""
    frozen_at: list[float] = []

    def fault(run: Run) -> None:
        frozen_at.append(time.monotonic())
        run.first.freeze()
        try:
            # publish_timeout 5 s + connect_timeout 3 s + backoff: well inside the 60 s
            # heartbeat (which would close the connection after 60-120 s).
            run.watch.wait_published(100, "publishing through another node while node 1 is frozen", timeout=50)
        finally:
            run.first.thaw()
        assert address(cluster.nodes[1]) in connected_to(run.relay)[1:], "connected to the next address"
        cluster.wait_all_running()

    _ledger, watch, _relay = scenario(
        db,
        cluster,
        tmp_path,
        relay_on=1,
        leader_on=2,
        fault=fault,
        broker={"heartbeat": "60s", "connect_timeout": "3s"},
        publish_timeout="5s",
    )
    during = watch.since(frozen_at[0])
    assert any(s.ready is False for s in during), "/readyz said false while the relay's node answered nothing"
    assert any(s.connected == 0 for s in during), "broker_connected said 0 meanwhile"
