"""The relay over TLS for real: Kafka's SASL_SSL listener (SCRAM-SHA-512), RabbitMQ's
AMQPS listener, Redis's TLS port with an ACL user and NATS over TLS (a user with a
password, an nkey user), all with certificates made at start by scripts/services/certs.sh. And
the two ways it goes wrong in production: a wrong password and a certificate the relay
does not trust. Each is one clear line in `check`, shows no secret, and the messages wait
(spending no attempt) instead of being dead-lettered."""

from __future__ import annotations

import json
import subprocess
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from outbox_relay_adapters.nats import create as create_nats
from structlog.testing import capture_logs

from outbox_relay import enqueue
from outbox_relay.assembly import build_adapters
from tests.consumers import RabbitQueue, kafka_create_topic, kafka_read, rabbit_read, redis_entries
from tests.services import (
    KAFKA_SCRAM_PASSWORD,
    KAFKA_SCRAM_USER,
    NATS_NKEY_SEED,
    NATS_PASSWORD,
    NATS_USER,
    REDIS_RELAY_PASSWORD,
    REDIS_RELAY_USER,
    ROOT,
    NatsServer,
    Secure,
)
from tests.support.cli import run_cli
from tests.support.configs import make_config, write_config
from tests.support.jetstream import make_stream, stream_read
from tests.support.outbox import count, write
from tests.support.relay import running_relay
from tests.support.waiting import wait_until


def kafka_block(secure: Secure, *, password: str = "${KAFKA_PW}", ca_file: str | None = None) -> dict[str, Any]:
    return {
        "type": "kafka",
        "bootstrap_servers": secure.address,
        "tls": {"ca_file": ca_file or secure.ca_file},
        "sasl": {"mechanism": "SCRAM-SHA-512", "username": KAFKA_SCRAM_USER, "password": password},
        "request_timeout": "5s",
    }


def rabbit_block(secure: Secure, exchange: str, *, ca_file: str | None = None) -> dict[str, Any]:
    # The password comes from the environment, as docs/reference/configuration.md says it should.
    url = secure.address.replace("guest:guest@", "guest:${AMQP_PW}@")
    return {
        "type": "rabbitmq",
        "url": url,
        "exchange": exchange,
        "tls": {"ca_file": ca_file or secure.ca_file},
        "connect_timeout": "3s",
    }


def stranger_ca(tmp_path: Path) -> str:
    """A CA that signed nothing the brokers use."""
    subprocess.run([str(ROOT / "scripts" / "services" / "certs.sh"), str(tmp_path / "other")], check=True)
    return str(tmp_path / "other" / "ca.pem")


async def test_the_relay_publishes_over_sasl_ssl_kafka_and_amqps_rabbitmq(
    db: str, kafka_secure: Secure, rabbitmq_secure: Secure
) -> None:
    topic, exchange = f"secure-{uuid.uuid4().hex[:8]}", f"secure-{uuid.uuid4().hex[:8]}"
    await kafka_create_topic(kafka_secure.plain, topic)
    queue = RabbitQueue(rabbitmq_secure.plain, exchange, exchange + ".q")
    config = make_config(
        db,
        brokers={"kafka": kafka_block(kafka_secure), "mq": rabbit_block(rabbitmq_secure, exchange)},
        routes=[{"topic": "orders.*", "broker": "kafka", "destination": topic}, {"topic": "emails.*", "broker": "mq"}],
        max_attempts=1,
        env={"KAFKA_PW": KAFKA_SCRAM_PASSWORD, "AMQP_PW": "guest"},
    )
    try:
        async with running_relay(config, build_adapters(config)):
            orders = await write(db, "orders.created", ["o1", "o2"], 10)
            emails = await write(db, "emails.sent", ["e1", "e2"], 10)
            await wait_until(lambda: count(db, "dispatched_at IS NULL") == 0, timeout=60)
        assert {r.message_id for r in await kafka_read(kafka_secure.plain, topic, 20)} == set(orders.committed)
        assert {r.message_id for r in await rabbit_read(queue, 20)} == set(emails.committed)
    finally:
        queue.close()


@pytest.mark.parametrize("broker", ["kafka", "rabbitmq"])
@pytest.mark.parametrize("fault", ["wrong password", "untrusted certificate"])
async def test_a_wrong_password_or_an_untrusted_certificate_is_one_line_and_dead_letters_nothing(
    db: str, tmp_path: Path, kafka_secure: Secure, rabbitmq_secure: Secure, broker: str, fault: str
) -> None:
    secret = "not-the-password-" + uuid.uuid4().hex[:6] if fault == "wrong password" else None
    ca = stranger_ca(tmp_path) if fault == "untrusted certificate" else None
    env = {"KAFKA_PW": secret or KAFKA_SCRAM_PASSWORD, "AMQP_PW": secret or "guest"}
    block = (
        kafka_block(kafka_secure, ca_file=ca)
        if broker == "kafka"
        else rabbit_block(rabbitmq_secure, f"bad-{uuid.uuid4().hex[:8]}", ca_file=ca)
    )
    settings: dict[str, Any] = {
        "brokers": {"b": block},
        "max_attempts": 1,
        "routes": [{"topic": "*", "broker": "b", "destination": "bad-creds"}],
    }
    path = write_config(tmp_path / "relay.yaml", db, **settings)

    checked = run_cli("check", "--config", str(path), env=env, timeout=120)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    line = [line for line in checked.stdout.splitlines() if line.startswith("broker")]
    assert len(line) == 1 and line[0].startswith(f"broker    FAIL  b ({broker}): "), checked.stdout
    # Says why, in the broker's or the TLS library's words.
    expected = ("CERTIFICATE_VERIFY_FAILED",) if ca else ("uthentication", "ACCESS_REFUSED")
    assert any(word in line[0] for word in expected), line[0]
    if secret:
        assert secret not in checked.stdout + checked.stderr

    config = make_config(db, env=env, **settings)
    with psycopg.connect(db) as conn:
        for i in range(3):
            enqueue(conn, "t", {"i": i}, key="k")
        conn.commit()
    with capture_logs() as logs:
        async with running_relay(config, build_adapters(config)):
            # The positive signal: the relay has tried the broker, and failed, twice.
            await wait_until(lambda: sum(e["event"] == "broker_unreachable" for e in logs) >= 2, timeout=60)
            with psycopg.connect(db) as conn:
                row = conn.execute(
                    "SELECT count(*) FILTER (WHERE dispatched_at IS NULL AND dead_lettered_at IS NULL),"
                    " count(*) FILTER (WHERE dead_lettered_at IS NOT NULL), max(attempts) "
                    "FROM outbox.messages"
                ).fetchone()
    assert row == (3, 0, 0), "the messages wait, spending no attempt (max_attempts is 1)"
    if secret:
        assert not [e for e in logs if secret in repr(e)]


def nats_block(server: NatsServer, prefix: str, *, ca_file: str | None = None, **auth: Any) -> dict[str, Any]:
    # The password comes from the environment, as docs/reference/configuration.md says it should.
    return {
        "type": "nats",
        "servers": [server.tls_url],
        "subject": prefix + ".{destination}",
        "tls": {"ca_file": ca_file or server.ca_file},
        "connect_timeout": "3s",
        **(auth or {"user": NATS_USER, "password": "${NATS_PW}"}),
    }


@pytest.mark.parametrize("auth", ["password", "nkey"])
async def test_the_relay_publishes_to_nats_over_tls_as_a_user(
    db: str, tmp_path: Path, nats_secure: NatsServer, auth: str
) -> None:
    stream = f"secure-{uuid.uuid4().hex[:8]}"
    await make_stream(nats_secure.tls_url, stream, [f"{stream}.>"], ca_file=nats_secure.ca_file)
    seed = tmp_path / "relay.nk"
    seed.write_text(NATS_NKEY_SEED)
    seed.chmod(0o600)
    block = nats_block(nats_secure, stream, **({"nkey_seed_file": str(seed)} if auth == "nkey" else {}))
    config = make_config(
        db,
        brokers={"js": block},
        routes=[{"topic": "*", "broker": "js"}],
        max_attempts=1,
        env={"NATS_PW": NATS_PASSWORD},
    )
    async with running_relay(config, build_adapters(config)):
        written = await write(db, "orders.created", ["o1", "o2"], 10)
        await wait_until(lambda: count(db, "dispatched_at IS NULL") == 0, timeout=60)
    got = await stream_read(nats_secure.tls_url, stream, 20, ca_file=nats_secure.ca_file)
    assert {r.message_id for r in got} == set(written.committed)


@pytest.mark.parametrize("fault", ["wrong password", "untrusted certificate"])
async def test_nats_with_a_wrong_password_or_an_untrusted_certificate_is_one_line_and_dead_letters_nothing(
    db: str, tmp_path: Path, nats_secure: NatsServer, fault: str
) -> None:
    secret = "not-the-password-" + uuid.uuid4().hex[:6] if fault == "wrong password" else None
    ca = stranger_ca(tmp_path) if fault == "untrusted certificate" else None
    env = {"NATS_PW": secret or NATS_PASSWORD}
    settings: dict[str, Any] = {
        "brokers": {"b": nats_block(nats_secure, "bad-creds", ca_file=ca)},
        "max_attempts": 1,
        "routes": [{"topic": "*", "broker": "b"}],
    }
    path = write_config(tmp_path / "relay.yaml", db, **settings)

    checked = run_cli("check", "--config", str(path), env=env, timeout=120)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    line = [line for line in checked.stdout.splitlines() if line.startswith("broker")]
    assert len(line) == 1 and line[0].startswith("broker    FAIL  b (nats): "), checked.stdout
    # Says why, in the server's or the TLS library's words.
    expected = "CERTIFICATE_VERIFY_FAILED" if ca else "Authorization Violation"
    assert expected in line[0], line[0]
    if secret:
        assert secret not in checked.stdout + checked.stderr

    config = make_config(db, env=env, **settings)
    with psycopg.connect(db) as conn:
        for i in range(3):
            enqueue(conn, "t", {"i": i}, key="k")
        conn.commit()
    with capture_logs() as logs:
        async with running_relay(config, build_adapters(config)):
            # The positive signal: the relay has tried the server, and failed, twice.
            await wait_until(lambda: sum(e["event"] == "broker_unreachable" for e in logs) >= 2, timeout=60)
            with psycopg.connect(db) as conn:
                row = conn.execute(
                    "SELECT count(*) FILTER (WHERE dispatched_at IS NULL AND dead_lettered_at IS NULL),"
                    " count(*) FILTER (WHERE dead_lettered_at IS NOT NULL), max(attempts) "
                    "FROM outbox.messages"
                ).fetchone()
    assert row == (3, 0, 0), "the messages wait, spending no attempt (max_attempts is 1)"
    if secret:
        assert not [e for e in logs if secret in repr(e)]


def redis_block(secure: Secure, *, ca_file: str | None = None) -> dict[str, Any]:
    # The relay's ACL user; its password from the environment, as docs/reference/configuration.md says.
    return {
        "type": "redis",
        "url": secure.address,
        "username": REDIS_RELAY_USER,
        "password": "${REDIS_PW}",
        "tls": {"ca_file": ca_file or secure.ca_file},
        "timeout": "3s",
    }


async def test_the_relay_publishes_to_redis_over_tls_as_its_acl_user(db: str, redis_secure: Secure) -> None:
    stream = f"secure-{uuid.uuid4().hex[:8]}"  # a key the relay user may write (REDIS_RELAY_KEYS)
    config = make_config(
        db,
        brokers={"r": redis_block(redis_secure)},
        routes=[{"topic": "*", "broker": "r", "destination": stream}],
        max_attempts=1,
        env={"REDIS_PW": REDIS_RELAY_PASSWORD},
    )
    async with running_relay(config, build_adapters(config)):
        written = await write(db, "orders.created", ["o1", "o2"], 10)
        await wait_until(lambda: count(db, "dispatched_at IS NULL") == 0, timeout=60)
    received = redis_entries(redis_secure.plain, stream)
    assert {r.message_id for r in received} == set(written.committed)


@pytest.mark.parametrize("fault", ["wrong password", "untrusted certificate", "a key the ACL refuses"])
async def test_redis_refusing_the_relay_is_one_line_and_dead_letters_nothing(
    db: str, tmp_path: Path, redis_secure: Secure, fault: str
) -> None:
    secret = "not-the-password-" + uuid.uuid4().hex[:6] if fault == "wrong password" else None
    ca = stranger_ca(tmp_path) if fault == "untrusted certificate" else None
    env = {"REDIS_PW": secret or REDIS_RELAY_PASSWORD}
    # Outside the relay user's key pattern: connecting works, every XADD answers NOPERM.
    stream = f"other-{uuid.uuid4().hex[:8]}" if fault == "a key the ACL refuses" else f"secure-{uuid.uuid4().hex[:8]}"
    settings: dict[str, Any] = {
        "brokers": {"b": redis_block(redis_secure, ca_file=ca)},
        "max_attempts": 1,
        "routes": [{"topic": "*", "broker": "b", "destination": stream}],
    }
    if fault != "a key the ACL refuses":
        path = write_config(tmp_path / "relay.yaml", db, **settings)
        checked = run_cli("check", "--config", str(path), env=env, timeout=120)
        assert checked.returncode == 1, checked.stdout + checked.stderr
        line = [line for line in checked.stdout.splitlines() if line.startswith("broker")]
        assert len(line) == 1 and line[0].startswith("broker    FAIL  b (redis): "), checked.stdout
        expected = "CERTIFICATE_VERIFY_FAILED" if ca else "invalid username-password pair"
        assert expected in line[0], line[0]
        if secret:
            assert secret not in checked.stdout + checked.stderr

    config = make_config(db, env=env, **settings)
    with psycopg.connect(db) as conn:
        for i in range(3):
            enqueue(conn, "t", {"i": i}, key="k")
        conn.commit()
    # NOPERM opens the broker's circuit; each probe (PING, allowed) lets one trial through.
    refused = "broker_unreachable" if fault != "a key the ACL refuses" else "broker_circuit_trial"
    with capture_logs() as logs:
        async with running_relay(config, build_adapters(config)):
            # The positive signal: the relay has tried the server, and been refused, twice.
            await wait_until(lambda: sum(e["event"] == refused for e in logs) >= 2, timeout=60)
            with psycopg.connect(db) as conn:
                row = conn.execute(
                    "SELECT count(*) FILTER (WHERE dispatched_at IS NULL AND dead_lettered_at IS NULL),"
                    " count(*) FILTER (WHERE dead_lettered_at IS NOT NULL), max(attempts) "
                    "FROM outbox.messages"
                ).fetchone()
    assert row == (3, 0, 0), "the messages wait, spending no attempt (max_attempts is 1)"
    if secret:
        assert not [e for e in logs if secret in repr(e)]
    assert redis_entries(redis_secure.plain, stream) == []


def closed_nats_connections(server: NatsServer) -> list[dict[str, Any]]:
    """The server's closed client connections (its monitoring /connz), with the user each
    authenticated as (`authorized_user`)."""
    assert server.broker is not None
    url = f"http://127.0.0.1:{server.broker.port + 1}/connz?state=closed&auth=true&limit=1024"
    with urllib.request.urlopen(url, timeout=5) as response:
        connections: list[dict[str, Any]] = json.load(response).get("connections") or []
    return connections


async def test_nats_over_tls_sends_no_password_to_a_server_not_speaking_tls(nats_secure: NatsServer) -> None:
    # A plain server where a TLS one was configured (a man in the middle, a misconfigured
    # port): the adapter starts TLS before reading anything, so the server never gets
    # CONNECT and the password in plain text; the connect fails, naming host:port.
    assert nats_secure.broker is not None
    plain_as_tls = f"tls://127.0.0.1:{nats_secure.broker.port}"
    before = {c["cid"] for c in closed_nats_connections(nats_secure)}
    adapter = create_nats(
        "mitm",
        {
            "servers": [plain_as_tls],
            "tls": {"ca_file": nats_secure.ca_file},
            "user": NATS_USER,
            "password": NATS_PASSWORD,
            "connect_timeout": "3s",
        },
    )
    with pytest.raises(ConnectionError, match=r"127\.0\.0\.1:\d+"):
        await adapter.connect()
    # The positive signal: the server saw the attempt, and closed it.
    await wait_until(lambda: any(c["cid"] not in before for c in closed_nats_connections(nats_secure)), timeout=30)
    new = [c for c in closed_nats_connections(nats_secure) if c["cid"] not in before]
    # A connection closed before CONNECT counts as the no_auth_user ("anonymous"): what it
    # sent was a TLS ClientHello, a protocol violation to a plain server, not credentials.
    assert not [c for c in new if c.get("authorized_user") == NATS_USER or c.get("name") == "outbox-relay mitm"], new
    assert any(c.get("reason") == "Protocol Violation" for c in new), new
