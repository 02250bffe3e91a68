"""Shared fixtures: a real PostgreSQL with one fresh database per test, Kafka,
RabbitMQ and toxiproxy. The helpers the tests share are in tests/support."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from outbox_relay.demo import local_postgres
from tests import services
from tests.support.databases import create_template, fresh_database
from tests.support.toxiproxy import MakeProxy, Proxy, Toxiproxy


@pytest.fixture(scope="session")
def pg() -> Iterator[tuple[str, local_postgres.LocalPostgres | None]]:
    with services.postgres() as found:
        yield found


@pytest.fixture(scope="session")
def kafka_service() -> Iterator[tuple[str, services.LocalBroker | None]]:
    with services.kafka() as found:
        yield found


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_service: tuple[str, Any]) -> str:
    return str(kafka_service[0])


@pytest.fixture(scope="session")
def rabbitmq_service() -> Iterator[tuple[str, services.LocalBroker | None]]:
    with services.rabbitmq() as found:
        yield found


@pytest.fixture(scope="session")
def amqp_url(rabbitmq_service: tuple[str, Any]) -> str:
    return str(rabbitmq_service[0])


@pytest.fixture(scope="session")
def kafka_secure(kafka_service: tuple[str, Any]) -> Iterator[services.Secure]:
    """The SASL_SSL listener of a local Kafka (the session's, or one of its own)."""
    if kafka_service[1] is not None:
        yield services.kafka_sasl_ssl(kafka_service[1])
        return
    with services.local_broker("kafka.sh", 3) as broker:
        yield services.kafka_sasl_ssl(broker)


@pytest.fixture(scope="session")
def rabbitmq_secure(rabbitmq_service: tuple[str, Any]) -> Iterator[services.Secure]:
    """The AMQPS listener of a local RabbitMQ (the session's, or one of its own)."""
    if rabbitmq_service[1] is not None:
        yield services.rabbitmq_amqps(rabbitmq_service[1])
        return
    with services.local_broker("rabbitmq.sh", 4) as broker:
        yield services.rabbitmq_amqps(broker)


@pytest.fixture(scope="session")
def toxiproxy() -> Iterator[Toxiproxy]:
    """One toxiproxy server for the session; each test makes its own proxies (and deletes
    them: `proxy` below)."""
    with services.toxiproxy() as api:
        yield api


@pytest.fixture
def proxy(toxiproxy: Toxiproxy) -> Iterator[MakeProxy]:
    """proxy(upstream) -> a new toxiproxy proxy to `upstream` (host:port), deleted after the test."""
    made: list[Proxy] = []

    def make(upstream: str) -> Proxy:
        made.append(toxiproxy.proxy(f"t-{uuid.uuid4().hex[:12]}", upstream))
        return made[-1]

    yield make
    for each in made:
        each.delete()


@pytest.fixture(scope="session")
def admin_dsn(pg: tuple[str, Any]) -> str:
    return pg[0]


@pytest.fixture(scope="session")
def template_db(admin_dsn: str) -> str:
    """A database with the outbox schema installed, cloned for each test."""
    return create_template(admin_dsn)


@pytest.fixture
def db(admin_dsn: str, template_db: str) -> Iterator[str]:
    """DSN of a fresh database with the outbox schema (schema 'outbox') installed."""
    with fresh_database(admin_dsn, template_db) as dsn:
        yield dsn


@pytest.fixture
def empty_db(admin_dsn: str) -> Iterator[str]:
    """DSN of a fresh database without the outbox schema."""
    with fresh_database(admin_dsn, None) as dsn:
        yield dsn


@pytest.fixture
def tmp_file(tmp_path: Path) -> Path:
    return tmp_path / "out.jsonl"
