"""The services a benchmark run needs, and a description of the machine."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from outbox_relay.demo import local_postgres
from outbox_relay.operations import schema_manager
from tests import services  # the same provisioning as the tests: env, testcontainers, local


@dataclass
class Services:
    dsn: str
    kafka: str
    amqp: str
    kafka_dir: Path | None = None  # a broker this run started: its pid file, for its CPU
    sqs: services.SqsServer | None = None  # ElasticMQ, for the matrix's SQS row
    redis: str = ""  # a redis:// URL
    nats: str = ""  # a NATS server with JetStream (its URL)

    @property
    def kafka_pid(self) -> int | None:
        """The local Kafka broker's JVM (kafka.sh writes its pid), or None: not ours."""
        if self.kafka_dir is None:
            return None
        with contextlib.suppress(OSError, ValueError):
            return int((self.kafka_dir / "kafka.pid").read_text().split()[0])
        return None


@contextlib.contextmanager
def provisioned() -> Iterator[Services]:
    # PostgreSQL with its default durability: fsync and synchronous_commit on, as in production;
    # wal_level = logical and slots for the WAL source (a server named by OUTBOX_RELAY_BENCH_DSN
    # needs them too for the WAL part).
    dsn = os.environ.get("OUTBOX_RELAY_BENCH_DSN")
    with contextlib.ExitStack() as stack:
        if not dsn:
            settings = {"max_connections": "200", **services.LOGICAL_DECODING}
            cluster = stack.enter_context(local_postgres.running(settings))
            dsn = cluster.dsn
        kafka, kafka_broker = stack.enter_context(services.kafka())
        amqp, _ = stack.enter_context(services.rabbitmq())
        redis, _ = stack.enter_context(services.redis())
        nats = stack.enter_context(services.nats())
        sqs = stack.enter_context(services.elasticmq())
        yield Services(
            dsn, kafka, amqp, kafka_broker.directory if kafka_broker else None, sqs=sqs, redis=redis, nats=nats.url
        )


def fresh_schema(dsn: str, schema: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    with psycopg.connect(dsn) as conn:
        schema_manager.install(conn, schema)


def _proc_field(path: str, name: str) -> str | None:
    with contextlib.suppress(OSError):
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    return None


def machine() -> dict[str, str]:
    cpu = _proc_field("/proc/cpuinfo", "model name") or "unknown"
    total = _proc_field("/proc/meminfo", "MemTotal")
    mem = f"{int(total.split()[0]) / 1024 / 1024:.0f} GiB" if total else "unknown"
    java = subprocess.run(["java", "-version"], capture_output=True, text=True, check=False).stderr.splitlines()
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": mem,
        "os": platform.platform(),
        "python": platform.python_version(),
        "java": java[0] if java else "unknown",
    }
