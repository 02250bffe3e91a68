"""Shared fixtures: a real PostgreSQL with one fresh database per test, Kafka,
RabbitMQ, Redis, NATS with JetStream, ElasticMQ (SQS), toxiproxy and an S3 object
store. The helpers the tests share are in tests/support."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from outbox_relay.demo import local_postgres
from tests import services
from tests.support.databases import create_template, fresh_database
from tests.support.toxiproxy import MakeProxy, Proxy, Toxiproxy

# The session's services start once the tests are collected, before the first test:
# pytest-timeout's clock covers a test's fixture setup too, and the first test of a run
# would otherwise pay for starting them (PostgreSQL, a cold Kafka JVM: in a fresh
# container, more than the 120 s a test has, so the first test failed and the others
# passed). Only those the collected tests use; a service that cannot start fails each
# test that needs it, with its error.
_SERVICES: dict[str, Callable[[], contextlib.AbstractContextManager[Any]]] = {
    "pg": services.postgres,
    "kafka_service": services.kafka,
    "rabbitmq_service": services.rabbitmq,
    "redis_service": services.redis,
    "toxiproxy": services.toxiproxy,
    "sqs_server": services.elasticmq,
    "s3_store": services.seaweedfs,
    "nats_server": services.nats,
}
_started: dict[str, Any] = {}
_failed: dict[str, BaseException] = {}
_running = contextlib.ExitStack()


def pytest_collection_finish(session: pytest.Session) -> None:
    option = session.config.option
    runs_nothing = ("collectonly", "showfixtures", "show_fixtures_per_test", "setupplan", "setuponly")
    if any(getattr(option, name, False) for name in runs_nothing) or session.testsfailed:
        return  # no test will run (a listing, or collection errors end the run)
    wanted = {name for item in session.items for name in getattr(item, "fixturenames", ())}
    for name, start in _SERVICES.items():
        if name in wanted:
            try:
                _started[name] = _running.enter_context(start())
            except Exception as exc:
                _failed[name] = exc


@pytest.hookimpl(trylast=True)  # after pytest's own, which tears down what fixtures are left (Ctrl-C)
def pytest_sessionfinish(session: pytest.Session) -> None:
    _running.close()


@contextlib.contextmanager
def _service(name: str) -> Iterator[Any]:
    """The service started before the tests, or (a test run some other way) one of its own."""
    if name in _failed:
        raise RuntimeError(f"{name} did not start") from _failed[name]
    if name in _started:
        yield _started[name]
        return
    with _SERVICES[name]() as found:
        yield found


@pytest.fixture(scope="session")
def pg() -> Iterator[tuple[str, local_postgres.LocalPostgres | None]]:
    with _service("pg") as found:
        yield found


@pytest.fixture(scope="session")
def kafka_service() -> Iterator[tuple[str, services.LocalBroker | None]]:
    with _service("kafka_service") as found:
        yield found


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_service: tuple[str, Any]) -> str:
    return str(kafka_service[0])


@pytest.fixture(scope="session")
def rabbitmq_service() -> Iterator[tuple[str, services.LocalBroker | None]]:
    with _service("rabbitmq_service") as found:
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
def redis_service() -> Iterator[tuple[str, services.LocalBroker | None]]:
    with _service("redis_service") as found:
        yield found


@pytest.fixture(scope="session")
def redis_url(redis_service: tuple[str, Any]) -> str:
    return str(redis_service[0])


@pytest.fixture(scope="session")
def redis_secure(redis_service: tuple[str, Any]) -> Iterator[services.Secure]:
    """The TLS port of a local Redis, with its ACL users (the session's, or one of its own)."""
    if redis_service[1] is not None:
        yield services.redis_tls(redis_service[1])
        return
    with services.local_redis() as broker:
        yield services.redis_tls(broker)


@pytest.fixture(scope="session")
def toxiproxy() -> Iterator[Toxiproxy]:
    """One toxiproxy server for the session; each test makes its own proxies (and deletes
    them: `proxy` below)."""
    with _service("toxiproxy") as api:
        yield api


@pytest.fixture(scope="session")
def s3_store() -> Iterator[services.S3Store]:
    """One S3 object store (SeaweedFS) for the session; each test makes its own buckets."""
    with _service("s3_store") as store:
        yield store


@pytest.fixture(scope="session")
def nats_server() -> Iterator[services.NatsServer]:
    """One NATS server with JetStream for the session; each test makes its own streams."""
    with _service("nats_server") as server:
        yield server


@pytest.fixture(scope="session")
def nats_secure(nats_server: services.NatsServer) -> Iterator[services.NatsServer]:
    """A local NATS server (the session's, or one of its own): its TLS, its users."""
    if nats_server.broker is not None:
        yield nats_server
        return
    with services.local_nats() as server:
        yield server


@pytest.fixture(scope="session")
def sqs_server() -> Iterator[services.SqsServer]:
    """One SQS-compatible server (ElasticMQ) for the session; each test makes its own queues."""
    with _service("sqs_server") as server:
        yield server


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


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """For a test that runs the CLI's logging set-up in this process: configure() binds
    structlog and routes the libraries' logging to the stderr of that moment (the test's
    capture, CliRunner's); undone afterwards, so no later test depends on it."""
    yield
    structlog.reset_defaults()
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if type(h).__name__ != "_LibraryHandler"]
