"""Shared fixtures: a real PostgreSQL, one fresh database per test, relay helpers."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from outbox_relay.adapter import Adapter
from outbox_relay.config import Config, parse
from outbox_relay.demo import local_postgres
from outbox_relay.engine.relay import Relay
from outbox_relay.operations import schema_manager
from tests import services

TEMPLATE = "outbox_relay_template"


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
def admin_dsn(pg: tuple[str, Any]) -> str:
    return pg[0]


def dsn_for(admin_dsn: str, dbname: str) -> str:
    return make_conninfo(admin_dsn, dbname=dbname)


@pytest.fixture(scope="session")
def template_db(admin_dsn: str) -> str:
    """A database with the outbox schema installed, cloned for each test."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(TEMPLATE)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEMPLATE)))
    with psycopg.connect(dsn_for(admin_dsn, TEMPLATE)) as conn:
        schema_manager.install(conn, "outbox")
    return TEMPLATE


@contextlib.contextmanager
def _fresh_database(admin_dsn: str, template: str | None) -> Iterator[str]:
    name = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        if template:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)))
        else:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield dsn_for(admin_dsn, name)
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def db(admin_dsn: str, template_db: str) -> Iterator[str]:
    """DSN of a fresh database with the outbox schema (schema 'outbox') installed."""
    with _fresh_database(admin_dsn, template_db) as dsn:
        yield dsn


@pytest.fixture
def empty_db(admin_dsn: str) -> Iterator[str]:
    """DSN of a fresh database without the outbox schema."""
    with _fresh_database(admin_dsn, None) as dsn:
        yield dsn


def make_config(
    dsn: str,
    *,
    brokers: Mapping[str, Mapping[str, Any]] | None = None,
    routes: list[Mapping[str, Any]] | None = None,
    schema: str = "outbox",
    **relay: Any,
) -> Config:
    """A validated Config; relay settings as keyword arguments (durations as strings)."""
    import yaml

    tree = {
        "database": {"dsn": dsn, "schema": schema},
        "relay": {"poll_interval": "200ms", "retry": {"initial": "50ms", "max": "500ms"}, **relay},
        "http": {"host": "127.0.0.1", "port": 0},
        "brokers": dict(brokers or {"main": {"type": "stdout"}}),
        "routes": routes or [{"topic": "*", "broker": next(iter(brokers or {"main": 0}))}],
    }
    return parse(yaml.safe_dump(tree), source="test.yaml", env={})


@contextlib.asynccontextmanager
async def running_relay(
    config: Config, adapters: Mapping[str, Adapter], **kwargs: Any
) -> AsyncIterator[Relay]:
    """Run a Relay in this event loop for the duration of the block."""
    relay = Relay(config, adapters, **kwargs)
    task = asyncio.create_task(relay.run())
    started = asyncio.create_task(relay.started.wait())
    done, _ = await asyncio.wait({task, started}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        started.cancel()
        task.result()  # raises the startup error
    assert started in done, "relay did not start within 30s"
    try:
        yield relay
    finally:
        relay.stop()
        await asyncio.wait_for(task, timeout=60)


async def wait_until(predicate: Callable[[], Any], *, timeout: float = 20.0, interval: float = 0.02) -> None:
    """Poll `predicate` until truthy; fail with a clear message after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


@pytest.fixture
def tmp_file(tmp_path: Path) -> Path:
    return tmp_path / "out.jsonl"
