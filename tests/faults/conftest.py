"""Services the fault scenarios own: they kill and restart them, so they are not the
session-wide ones the other tests share. Always local processes, started by the
project's own scripts (a broker behind an env var or a container cannot be killed
from here)."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from outbox_relay.demo import local_postgres
from outbox_relay.operations import schema_manager
from tests import services
from tests.faults.harness import OWN_PG_SETTINGS


@pytest.fixture(scope="module")
def own_kafka() -> Iterator[services.LocalBroker]:
    with services.local_broker("kafka.sh", 3) as broker:
        yield broker


@pytest.fixture(scope="module")
def own_rabbitmq() -> Iterator[services.LocalBroker]:
    with services.local_broker("rabbitmq.sh", 4) as broker:
        yield broker


@pytest.fixture(scope="module")
def own_nats() -> Iterator[services.NatsServer]:
    with services.local_nats() as server:
        yield server


@pytest.fixture(scope="module")
def own_redis() -> Iterator[services.LocalBroker]:
    with services.local_redis() as broker:
        yield broker


@pytest.fixture(scope="module")
def own_elasticmq() -> Iterator[services.SqsServer]:
    with services.local_elasticmq() as server:
        yield server


@pytest.fixture
def own_pg() -> Iterator[local_postgres.LocalPostgres]:
    """A cluster of its own (fsync on: restarts must not lose what was committed), with
    logical decoding; start it again with OWN_PG_SETTINGS."""
    with local_postgres.running(OWN_PG_SETTINGS) as cluster:
        with psycopg.connect(cluster.dsn) as conn:
            schema_manager.install(conn, "outbox")
        yield cluster
