"""What the soak runs against, all started here from the project's own scripts: a
PostgreSQL cluster of its own (outbox_relay.demo.local_postgres, fsync on: a restart
must not lose a commit), a Kafka broker (scripts/services/kafka.sh through
tests/services.py), and the relay replicas as `outbox-relay run` processes
(tests/support/cli.py). `Soak` is what a fault is handed: each field a fault may act
on, and the capabilities (`has`) a fault kind needs."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from outbox_relay.demo import local_postgres
from outbox_relay.operations import schema_manager
from tests import services
from tests.consumers import kafka_create_topic
from tests.faults.harness import APPEND_TIME, OWN_PG_SETTINGS, Outbox, relay_dsn
from tests.support.cli import RelayProcess, rss_kb
from tests.support.configs import PATIENT, write_config

# The cluster's settings, to start it again with after a restart: the fault suite's
# (logical decoding, for --source wal) and a shorter autovacuum naptime than the
# default minute, so that a 3-minute soak sees vacuum cycles in its dead tuples.
PG_SETTINGS = {**OWN_PG_SETTINGS, "autovacuum_naptime": "10s"}
BATCH, WORKERS = 50, 2
RETENTION = "10s"  # dispatched rows deleted after this: the table stays small, vacuum has work
WRITERS_TOPIC = "soak.orders"  # the outbox topic of what goes to Kafka
RABBITMQ_TOPIC = "soak.mq"  # and of what goes to RabbitMQ (soak.writers.MixedWriters.topic_of)
QUORUM = {"x-queue-type": "quorum"}  # the queue the checker reads RabbitMQ's messages from


@dataclass
class Soak:
    """The running services and relays. A fault kind names what it needs with `has`."""

    out: Path
    source: str
    outbox: Outbox
    postgres: local_postgres.LocalPostgres
    kafka: services.LocalBroker | None  # the single broker; None with a cluster (extra["kafka_cluster"])
    bootstrap: str
    topic: str
    replicas: Replicas
    pg_settings: dict[str, str] = field(default_factory=lambda: dict(PG_SETTINGS))  # to start it again with
    amqp: list[str] = field(default_factory=list)  # RabbitMQ's node URLs (none: no RabbitMQ)
    extra: dict[str, Any] = field(default_factory=dict)  # what later fault kinds act on, by capability

    def has(self, capability: str) -> bool:
        return capability in self.capabilities()

    def capabilities(self) -> set[str]:
        found = {"relays", "postgres"} | ({"kafka"} if self.kafka is not None else set())
        return found | set(self.extra)


class Replicas:
    """The relay replicas: `outbox-relay run` processes named r0, r1, ..., each with its
    own config (its DSN names it: application_name, which the WAL source's walsender
    shows). Faults stop and start them; the sampler reads their RSS and notices one that
    ended by itself (a finding: a relay never ends on its own)."""

    def __init__(self, configs: dict[str, Path]):
        self.configs = configs
        self._lock = threading.Lock()
        self.running: dict[str, RelayProcess | None] = dict.fromkeys(configs)
        self.every: list[tuple[str, RelayProcess]] = []
        self.sigterm_exits: list[tuple[str, int | None]] = []  # (name, exit code) of each SIGTERM
        self.unexpected_exits: list[dict[str, Any]] = []

    def start(self, name: str) -> str:
        with self._lock:
            relay = RelayProcess(self.configs[name])
            self.running[name] = relay
            self.every.append((name, relay))
            return f"{name} started (pid {relay.proc.pid})"

    def start_all(self) -> None:
        for name in self.configs:
            self.start(name)

    def pick(self, rng: random.Random) -> str:
        with self._lock:
            alive = sorted(name for name, relay in self.running.items() if relay is not None)
        return rng.choice(alive or sorted(self.configs))

    def _take(self, name: str) -> RelayProcess | None:
        with self._lock:
            relay, self.running[name] = self.running[name], None
        return relay

    def kill(self, name: str) -> str:
        relay = self._take(name)
        if relay is None:
            return f"{name} was not running"
        pid = relay.proc.pid
        relay.kill()
        return f"{name} (pid {pid}) SIGKILLed"

    def terminate(self, name: str, timeout: float = 60) -> str:
        relay = self._take(name)
        if relay is None:
            return f"{name} was not running"
        pid = relay.proc.pid
        # A relay SIGTERMed before it has set its handlers (still importing) dies of the
        # signal: what is checked is how a running relay stops, so it starts first.
        with contextlib.suppress(AssertionError):
            relay.wait_started(timeout)
        try:
            code: int | None = relay.terminate(timeout)
        except Exception:  # it did not exit in time: a finding, and it must go
            code = None
        relay.close()
        self.sigterm_exits.append((name, code))
        return f"{name} (pid {pid}) SIGTERMed, exit {code}"

    def terminate_all(self) -> None:
        for name in self.configs:
            self.terminate(name)

    def rss(self) -> dict[str, int | None]:
        """Each replica's resident set size in kB, None while it is not running."""
        with self._lock:
            procs = {name: relay.proc.pid if relay else None for name, relay in self.running.items()}
        out: dict[str, int | None] = {}
        for name, pid in procs.items():
            out[name] = None
            if pid is not None:
                with contextlib.suppress(OSError, AssertionError):
                    out[name] = rss_kb(pid)
        return out

    def restart_the_dead(self, t: float) -> None:
        """A replica that ended without a fault's signal is recorded and started again."""
        with self._lock:
            dead = [(n, r) for n, r in self.running.items() if r is not None and r.proc.poll() is not None]
        for name, relay in dead:
            tail = relay.log_path.read_text()[-1500:]
            self.unexpected_exits.append(
                {"t": round(t, 1), "replica": name, "code": relay.proc.returncode, "log": tail}
            )
            relay.close()
            self.start(name)

    def close(self) -> None:
        for _, relay in self.every:
            relay.close()


@dataclass
class Started:
    """The services as started: the PostgreSQL cluster the faults act on, the DSN the
    writers use, the settings to start it again with, the Kafka broker (None with a
    cluster), the bootstrap servers the checker reads, what the relays connect to
    (`relay_dsn`, `relay_bootstrap`, `relay_amqp`: through toxiproxy with --toxiproxy),
    and what later fault kinds need (Soak.extra)."""

    postgres: local_postgres.LocalPostgres
    dsn: str
    pg_settings: dict[str, str]
    kafka: services.LocalBroker | None
    bootstrap: str
    extra: dict[str, Any]
    amqp: list[str] = field(default_factory=list)  # RabbitMQ's node URLs, for the checker
    relay_dsn: str = ""
    relay_bootstrap: str = ""
    relay_amqp: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.relay_dsn = self.relay_dsn or self.dsn
        self.relay_bootstrap = self.relay_bootstrap or self.bootstrap
        self.relay_amqp = self.relay_amqp or list(self.amqp)

    def create_topic(self, topic: str) -> None:
        """The soak's topic: 3 partitions (on a cluster 3 replicas, min.insync.replicas
        2), records stamped with the broker's append time (the checker's throughput over
        time, and the WAL source's in-flight bound)."""
        if "kafka_cluster" in self.extra:
            self.extra["kafka_cluster"].create_topic(topic, 3, **APPEND_TIME)
        else:
            asyncio.run(kafka_create_topic(self.bootstrap, topic, partitions=3, **APPEND_TIME))


@contextlib.contextmanager
def started_services(
    postgres: str, *, kafka: str = "single", rabbitmq: str | None = None, toxiproxy: bool = False
) -> Iterator[Started]:
    """PostgreSQL with the outbox schema (`single`: one cluster; `failover`: a primary
    and its synchronous standby, tests/support/failover.py, the DSN naming both), a
    Kafka broker (`cluster`: 3 brokers, tests/support/kafka_cluster.py), with `rabbitmq`
    a RabbitMQ node (`single`, scripts/services/rabbitmq.sh) or 3 (`cluster`,
    tests/support/rabbitmq_cluster.py), and with `toxiproxy` a toxiproxy
    server (scripts/services/toxiproxy.sh) between the relays and each service it can
    stand in front of: PostgreSQL (single), Kafka (single: a listener of its own whose
    metadata names the proxy, kafka.sh KAFKA_PROXY_PORT) and RabbitMQ (single); all stopped and
    removed afterwards."""
    proxied = toxiproxy and kafka == "single"
    kafka_proxy_port = local_postgres.free_port() if proxied else None
    with contextlib.ExitStack() as stack, concurrent.futures.ThreadPoolExecutor(2) as pool:
        # The brokers start while PostgreSQL does (a JVM's start is the longest wait).
        if kafka == "cluster":
            from tests.support.kafka_cluster import kafka_cluster

            brokers = pool.submit(stack.enter_context, kafka_cluster())
        elif kafka_proxy_port:
            # PORT, controller, SASL_SSL, and the listener behind the proxy
            env = {"KAFKA_PROXY_PORT": str(kafka_proxy_port)}
            brokers = pool.submit(stack.enter_context, services.local_broker("kafka.sh", 4, env=env))
        else:
            brokers = pool.submit(stack.enter_context, services.local_broker("kafka.sh", 3))  # PORT, controller, SASL
        rabbit = None
        if rabbitmq == "cluster":
            from tests.support.rabbitmq_cluster import rabbitmq_cluster

            rabbit = pool.submit(stack.enter_context, rabbitmq_cluster())
        elif rabbitmq:
            rabbit = pool.submit(stack.enter_context, services.local_broker("rabbitmq.sh", 4))
        if postgres == "failover":
            from tests.support import failover

            settings = {**failover.SETTINGS, "autovacuum_naptime": PG_SETTINGS["autovacuum_naptime"]}
            pair = stack.enter_context(
                failover.replicated_pair(synchronous=True, setup=lambda conn: schema_manager.install(conn, "outbox"))
            )
            cluster, dsn, extra = pair.primary, pair.dsn, {"postgres_standby": pair}
        else:
            settings = PG_SETTINGS
            cluster = stack.enter_context(local_postgres.running(settings))
            with psycopg.connect(cluster.dsn) as conn:
                schema_manager.install(conn, "outbox")
            dsn, extra = cluster.dsn, {}
        amqp = []
        if rabbit is not None:
            extra["rabbitmq_cluster" if rabbitmq == "cluster" else "rabbitmq"] = node = rabbit.result()
            amqp = node.urls if rabbitmq == "cluster" else [rabbitmq_url(node.port)]
        if kafka == "cluster":
            extra["kafka_cluster"] = brokers.result()
            started = Started(cluster, dsn, settings, None, extra["kafka_cluster"].bootstrap, extra, amqp)
        else:
            single = brokers.result()
            started = Started(cluster, dsn, settings, single, f"127.0.0.1:{single.port}", extra, amqp)
        if toxiproxy:
            proxies = stack.enter_context(proxied_services(started, kafka_proxy_port, postgres == "single"))
            if proxies:  # none with a cluster, a failover pair and no RabbitMQ: no network faults
                extra["toxiproxy"] = proxies
        yield started


@contextlib.contextmanager
def proxied_services(started: Started, kafka_port: int | None, postgres: bool) -> Iterator[dict[str, Any]]:
    """A toxiproxy server with a proxy in front of each service it can proxy, and the
    relays' addresses in `started` pointed at them; yields the proxies by service."""
    with services.toxiproxy() as api:
        proxies: dict[str, Any] = {}
        if postgres:
            proxies["postgres"] = api.proxy("soak-postgres", f"127.0.0.1:{started.postgres.port}")
            started.relay_dsn = make_conninfo(started.dsn, host="127.0.0.1", port=str(proxies["postgres"].port))
        if kafka_port is not None and started.kafka is not None:
            upstream = f"127.0.0.1:{started.kafka.port + 3}"
            proxies["kafka"] = api.proxy("soak-kafka", upstream, listen=f"127.0.0.1:{kafka_port}")
            started.relay_bootstrap = proxies["kafka"].address
        if "rabbitmq" in started.extra:
            proxies["rabbitmq"] = api.proxy("soak-rabbitmq", f"127.0.0.1:{started.extra['rabbitmq'].port}")
            started.relay_amqp = [rabbitmq_url(proxies["rabbitmq"].port)]
        yield proxies


def rabbitmq_url(port: int) -> str:
    return f"amqp://guest:guest@127.0.0.1:{port}/%2F"


def relay_configs(out: Path, outbox: Outbox, started: Started, topic: str, replicas: int) -> dict[str, Path]:
    """Each replica's config: the relay's addresses of `started` (through toxiproxy, if
    it runs), every message to Kafka's `topic`, but with RabbitMQ the topic
    RABBITMQ_TOPIC to RabbitMQ's exchange of the same name as `topic`."""
    (out / "relays").mkdir(parents=True, exist_ok=True)
    kafka = {"type": "kafka", "bootstrap_servers": started.relay_bootstrap, "request_timeout": "5s"}
    brokers: dict[str, Any] = {"kafka": kafka}
    routes: list[dict[str, Any]] = [{"topic": "*", "broker": "kafka", "destination": topic}]
    if started.relay_amqp:
        # A cluster's nodes all named: the relay connects to the next one when its node goes.
        urls = {"urls": started.relay_amqp} if len(started.relay_amqp) > 1 else {"url": started.relay_amqp[0]}
        brokers["mq"] = {"type": "rabbitmq", **urls, "exchange": topic, "connect_timeout": "2s"}
        routes.insert(0, {"topic": RABBITMQ_TOPIC, "broker": "mq"})
    configs = {}
    for i in range(replicas):
        name = f"r{i}"
        configs[name] = write_config(
            out / "relays" / f"{name}.yaml",
            relay_dsn(started.relay_dsn, name),
            brokers=brokers,
            routes=routes,
            timing=PATIENT,
            batch_size=BATCH,
            workers=WORKERS,
            retention=RETENTION,
            publish_timeout="5s",
            **outbox.settings(),
        )
    return configs
