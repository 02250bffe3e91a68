"""The relay against a 3-broker Kafka cluster (KRaft, each node broker and controller)
under the faults one node cannot have: a partition's leader SIGKILLed, 2 of 3 brokers
stopped for a minute, a rolling restart, the active controller killed.

Each scenario runs two relays side by side, one per Kafka client (aiokafka and
librdkafka), each with its own database, writers committing throughout and a topic of
its own with 3 replicas and `min.insync.replicas=2` (the producers: acks=all,
idempotent); the fault hits both at once, which halves the suite's time. For each
relay: nothing lost, nothing dead-lettered, duplicates at most what was in flight at
each fault (a batch per worker, plus one trial message per probe cycle of an open
circuit), each key's first deliveries in commit order (harness.check_delivery); and
/readyz and the metrics, sampled throughout, say what happened while it happened.

One cluster for the module, healthy again (3 nodes, every partition fully in sync)
before each test.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.consumers import kafka_read
from tests.faults.harness import Ledger, Writers, check_delivery, http_port
from tests.support.cli import RelayProcess
from tests.support.configs import PATIENT, write_config
from tests.support.databases import fresh_database
from tests.support.kafka_cluster import NODE_IDS, KafkaCluster, kafka_cluster
from tests.support.outbox import pending
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow

BATCH, WORKERS = 50, 2
IN_FLIGHT = BATCH * WORKERS  # what one fault can leave unanswered in a producer
CLIENTS = ("aiokafka", "librdkafka")
OUTAGE_S = 60.0  # 2 of 3 brokers stopped this long


@pytest.fixture(scope="module")
def cluster() -> Iterator[KafkaCluster]:
    with kafka_cluster() as found:
        yield found


@pytest.fixture
def healthy(cluster: KafkaCluster) -> KafkaCluster:
    """The module's cluster with its 3 nodes up and every partition fully in sync."""
    cluster.restore()
    return cluster


@pytest.fixture
def databases(admin_dsn: str, template_db: str) -> Iterator[dict[str, str]]:
    """A fresh outbox database per client."""
    with contextlib.ExitStack() as stack:
        yield {client: stack.enter_context(fresh_database(admin_dsn, template_db)) for client in CLIENTS}


@dataclass(frozen=True)
class Sample:
    at: float  # time.monotonic()
    ready: bool
    circuit_open: float | None  # outbox_relay_broker_circuit_open{broker="kafka"}
    connected: float | None  # outbox_relay_broker_connected{broker="kafka"}
    published: float  # outbox_relay_messages_published_total{broker="kafka"}, every destination


@dataclass
class Watch:
    """/readyz and the broker's metrics of one relay, sampled every 0.25 s in a thread:
    what the relay said during a fault, to set beside what the cluster went through."""

    port: int
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Watch:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=5) as client:
            while not self._stop.is_set():
                sample = self._sample(client)
                if sample is not None:
                    self.samples.append(sample)
                self._stop.wait(0.25)

    @staticmethod
    def _sample(client: httpx.Client) -> Sample | None:
        try:
            ready = client.get("/readyz").status_code == 200
            text = client.get("/metrics").text
        except httpx.HTTPError:
            return None
        values: dict[str, float] = {}
        published = 0.0
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.labels.get("broker") != "kafka":
                    continue
                if s.name == "outbox_relay_messages_published_total":
                    published += s.value
                else:
                    values[s.name] = s.value
        return Sample(
            time.monotonic(),
            ready,
            values.get("outbox_relay_broker_circuit_open"),
            values.get("outbox_relay_broker_connected"),
            published,
        )

    def published(self) -> float:
        return self.samples[-1].published if self.samples else 0.0

    def wait(self, predicate: Callable[[Sample], bool], timeout: float, what: str) -> Sample:
        """Until a sample taken from now on satisfies `predicate`; that sample."""
        start = len(self.samples)

        def found() -> Sample | None:
            return next((s for s in self.samples[start:] if predicate(s)), None)

        wait_for(lambda: found() is not None, timeout, what)
        sample = found()
        assert sample is not None
        return sample

    def between(self, start: float, end: float) -> list[Sample]:
        return [s for s in self.samples if start <= s.at <= end]


@dataclass
class Relay:
    """One client's relay of a scenario: its database, topic, process, writers, watch."""

    client: str
    db: str
    topic: str
    process: RelayProcess
    writers: Writers
    watch: Watch | None = None

    def logged(self, event: str) -> int:
        return sum(1 for line in self.process.logs() if line.get("event") == event)


@dataclass
class Scenario:
    cluster: KafkaCluster
    relays: list[Relay]

    @property
    def watches(self) -> list[Watch]:
        return [r.watch for r in self.relays if r.watch is not None]

    def wait_all(self, predicate: Callable[[Sample], bool], timeout: float, what: str) -> None:
        for relay in self.relays:
            assert relay.watch is not None
            relay.watch.wait(predicate, timeout, f"{what} ({relay.client})")

    def flowing(self, count: int = 200, timeout: float = 120) -> None:
        """Until each relay's broker acked `count` more messages (its own counter)."""
        bases = [w.published() for w in self.watches]
        for relay, base in zip(self.relays, bases, strict=True):
            assert relay.watch is not None

            def acked(sample: Sample, base: float = base) -> bool:
                return sample.published >= base + count

            relay.watch.wait(acked, timeout, f"{count} more acked ({relay.client})")


def dead_lettered(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM outbox.messages WHERE dead_lettered_at IS NOT NULL").fetchone()
    return int(row[0]) if row else -1


def start_relay(cluster: KafkaCluster, db: str, tmp_path: Path, client: str) -> Relay:
    topic = f"cluster-{client}-{uuid.uuid4().hex[:8]}"
    cluster.create_topic(topic)
    config = write_config(
        tmp_path / f"relay-{client}.yaml",
        db,
        brokers={"kafka": {"type": "kafka", "bootstrap_servers": cluster.bootstrap, "client": client}},
        routes=[{"topic": "*", "broker": "kafka", "destination": topic}],
        timing=PATIENT,
        batch_size=BATCH,
        workers=WORKERS,
        # A fault spends no attempt: with 3 allowed, a fault that did would dead-letter.
        max_attempts=3,
        publish_timeout="5s",
    )
    process = RelayProcess(config)
    writers = Writers(db, "orders.created", count=2, pause=0.02)  # about 100 messages/s
    return Relay(client, db, topic, process, writers)


async def run_scenario(
    cluster: KafkaCluster, databases: dict[str, str], tmp_path: Path, fault: Callable[[Scenario], int]
) -> Scenario:
    """Both clients' relays publish while their writers commit and `fault` runs (it
    returns how many faults it injected: each may leave a batch per worker in flight);
    then traffic must flow again, every message be dispatched, none dead-lettered, and
    the delivery checks hold for each."""
    scenario = Scenario(cluster, [])
    ledgers: dict[str, Ledger] = {}
    try:
        for client in CLIENTS:
            scenario.relays.append(start_relay(cluster, databases[client], tmp_path, client))
        for relay in scenario.relays:
            relay.writers.start()
            relay.watch = Watch(http_port(relay.process, timeout=60)).start()
        scenario.wait_all(lambda s: s.ready, 60, "/readyz true before the fault")
        scenario.flowing()
        faults = fault(scenario)
        scenario.wait_all(lambda s: s.ready and s.circuit_open == 0 and s.connected == 1, 120, "ready after the fault")
        scenario.flowing()
        for relay in scenario.relays:
            ledgers[relay.client] = relay.writers.stop()
        for relay in scenario.relays:

            def dispatched(db: str = relay.db) -> bool:
                return pending(db) == 0

            wait_for(dispatched, 120, f"every message dispatched ({relay.client})")
            assert relay.process.terminate() == 0
    finally:
        for relay in scenario.relays:
            relay.writers.stop()
            relay.process.close()
            if relay.watch is not None:
                relay.watch.stop()
    for relay in scenario.relays:
        assert dead_lettered(relay.db) == 0, f"a fault of the cluster dead-lettered messages ({relay.client})"
        ledger = ledgers[relay.client]
        received = await kafka_read(cluster.bootstrap, relay.topic, len(ledger.committed), timeout=90)
        trials = relay.logged("broker_circuit_trial")
        duplicates = check_delivery(received, ledger, max_duplicates=faults * IN_FLIGHT + trials)
        assert relay.watch is not None
        failures = Counter(
            f"{line.get('event')}"[:100] for line in relay.process.logs() if line.get("level") in ("warning", "error")
        )
        print(
            f"client={relay.client} committed={len(ledger.committed)} duplicates={duplicates} trials={trials}"
            f" not_ready={sum(1 for s in relay.watch.samples if not s.ready)}/{len(relay.watch.samples)} samples"
            f" circuit_opened={relay.logged('broker_circuit_open')} resets={relay.logged('kafka_producer_reset')}"
            f" warnings={failures.most_common(3)}"
        )
    return scenario


@pytest.mark.timeout(300)
async def test_partition_leader_sigkilled(healthy: KafkaCluster, databases: dict[str, str], tmp_path: Path) -> None:
    moved: dict[str, object] = {}

    def kill_leader(s: Scenario) -> int:
        # A node leading a partition of both relays' topics (the controller spreads
        # each topic's leaders over the 3 nodes).
        led = [{s.cluster.leader(r.topic, p) for p in range(3)} for r in s.relays]
        leader = min(set.intersection(*led))
        s.cluster.node(leader).kill()
        # The controller fences the dead broker (broker.session.timeout.ms, 6 s) and
        # elects other leaders from the ISRs.
        wait_for(
            lambda: all(s.cluster.leader(r.topic, p) not in (leader, -1) for r in s.relays for p in range(3)),
            60,
            "every partition led by another node",
        )
        moved.update(killed=leader, led_before=led)
        s.flowing()  # acked by the new leaders: the writers' keys cover every partition
        return 1

    await run_scenario(healthy, databases, tmp_path, kill_leader)
    print(f"killed node {moved['killed']}; the nodes leading each relay's partitions before: {moved['led_before']}")


@pytest.mark.timeout(420)
async def test_two_of_three_brokers_stopped_for_a_minute(
    healthy: KafkaCluster, databases: dict[str, str], tmp_path: Path
) -> None:
    # The broker left answers metadata, but no partition has 2 replicas in sync: acks=all
    # never comes. Each relay must say so (/readyz false, the circuit open, the broker
    # not connected) for as long as it lasts, dead-letter nothing, hand its producer no
    # more than a trial message per probe, and resume once 2 are back.
    window: dict[str, float] = {}

    def stop_two(s: Scenario) -> int:
        survivor = s.cluster.leader(s.relays[0].topic, 0)
        stopped = [n for n in NODE_IDS if n != survivor]
        began = time.monotonic()
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda n: s.cluster.node(n).stop(), stopped))
        window["stopped"] = time.monotonic()
        window["stopping_took"] = window["stopped"] - began
        s.wait_all(lambda x: not x.ready, 60, "/readyz false with 2 of 3 brokers stopped")
        window["noticed"] = time.monotonic()
        time.sleep(max(0.0, window["stopped"] + OUTAGE_S - time.monotonic()))  # the outage lasts this long
        window["restarting"] = time.monotonic()
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda n: s.cluster.node(n).start(), stopped))
        window["started"] = time.monotonic()
        return 1

    scenario = await run_scenario(healthy, databases, tmp_path, stop_two)
    for relay in scenario.relays:
        assert relay.watch is not None
        during = relay.watch.between(window["noticed"], window["restarting"])
        assert len(during) > 20, f"{relay.client}: the relay was sampled throughout the outage"
        assert not [s for s in during if s.ready], f"{relay.client}: /readyz ready with 2 of 3 brokers stopped"
        assert [s for s in during if s.circuit_open == 1], f"{relay.client}: the circuit never showed open"
        assert not [s for s in during if s.connected == 1], f"{relay.client}: the broker shown connected"
        # The probe's metadata request answered (the one broker left), the trial went
        # unanswered: the half-open circuit opened again, probe after probe.
        assert relay.logged("broker_circuit_half_open") >= 1, f"{relay.client}: metadata never answered"
    # The case it was meant to be: the broker left refused the writes for want of
    # replicas in sync (aiokafka logs each refusal it retries; librdkafka does not).
    aiokafka_relay = next(r for r in scenario.relays if r.client == "aiokafka")
    refusals = [e for e in aiokafka_relay.process.logs() if "NotEnoughReplicasError" in str(e.get("event"))]
    assert refusals, "the broker left never answered NotEnoughReplicas"
    print(
        f"stopping took {window['stopping_took']:.1f}s, all relays not ready after"
        f" {window['noticed'] - window['stopped']:.1f}s, outage {OUTAGE_S:.0f}s,"
        f" restart took {window['started'] - window['restarting']:.1f}s"
    )


@pytest.mark.timeout(420)
async def test_rolling_restart_of_all_three(healthy: KafkaCluster, databases: dict[str, str], tmp_path: Path) -> None:
    def rolling(s: Scenario) -> int:
        for node_id in NODE_IDS:
            node = s.cluster.node(node_id)
            node.stop()  # a controlled shutdown: its leaders move first
            node.start()
            # As an operator's rolling restart does: the next node only once this one
            # is back in every ISR, and the relays still ack.
            s.cluster.restore()
            s.flowing(100)
        return len(NODE_IDS)

    await run_scenario(healthy, databases, tmp_path, rolling)


@pytest.mark.timeout(300)
async def test_active_controller_killed(healthy: KafkaCluster, databases: dict[str, str], tmp_path: Path) -> None:
    elected: dict[str, int] = {}

    def kill_controller(s: Scenario) -> int:
        controller = s.cluster.controller()
        s.cluster.node(controller).kill()
        wait_for(lambda: s.cluster.controller() != controller, 60, "another controller elected")
        elected.update(old=controller, new=s.cluster.controller())
        s.flowing()
        return 1

    await run_scenario(healthy, databases, tmp_path, kill_controller)
    assert elected["new"] != elected["old"]
    print(f"controller {elected['old']} killed, {elected['new']} elected")
