"""Bad input and hostile conditions: one clear line, no data touched, no secret shown."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from structlog.testing import capture_logs

from outbox_relay import enqueue, enqueue_async
from outbox_relay.demo import local_postgres
from outbox_relay.errors import SchemaError
from outbox_relay.models import PublishResult
from outbox_relay.operations import schema_manager
from outbox_relay.testing import FakeAdapter
from tests.support.cli import RelayProcess, read_jsonl, run_cli
from tests.support.configs import make_config, write_config
from tests.support.relay import running_relay
from tests.support.waiting import wait_for, wait_until


def test_python_payload_over_the_maximum_raises_before_sql(db: str) -> None:
    conn = psycopg.connect(db)
    conn.close()  # any SQL would raise OperationalError
    with pytest.raises(ValueError, match=r"payload of 11 bytes exceeds max_payload_bytes \(10\)"):
        enqueue(conn, "t", b"x" * 11, max_payload_bytes=10)


async def test_async_payload_over_the_maximum_raises_before_sql(db: str) -> None:
    conn = await psycopg.AsyncConnection.connect(db)
    await conn.close()
    with pytest.raises(ValueError, match="exceeds max_payload_bytes"):
        await enqueue_async(conn, "t", {"a": "x" * 100}, max_payload_bytes=50)


def test_sql_payload_over_the_configured_maximum_aborts_the_transaction(db: str) -> None:
    with psycopg.connect(db) as conn:
        conn.execute("SET outbox_relay.max_payload_bytes = '16'")
        conn.execute("SELECT outbox.enqueue_binary('t', NULL, '0123456789'::bytea)")
        with pytest.raises(psycopg.errors.ProgramLimitExceeded, match=r"exceeds outbox_relay\.max_payload_bytes"):
            conn.execute("SELECT outbox.enqueue('t', NULL, '{\"pad\": \"0123456789abcdef\"}')")
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM outbox.messages").fetchone() == (0,)


async def test_relay_dead_letters_payloads_over_its_maximum(db: str) -> None:
    with psycopg.connect(db) as conn:
        enqueue(conn, "t", b"small")
        big = enqueue(conn, "t", b"x" * 2000)
        conn.commit()
    fake = FakeAdapter()

    def dead() -> int:
        with psycopg.connect(db) as conn:
            row = conn.execute("SELECT count(*) FROM outbox.messages WHERE dead_lettered_at IS NOT NULL").fetchone()
        return row[0] if row else 0

    async with running_relay(make_config(db, max_payload_bytes=1000), {"main": fake}):
        await wait_until(lambda: len(fake.delivered) == 1 and dead() == 1)
    assert [out.message.payload for out in fake.delivered] == [b"small"]
    with psycopg.connect(db) as conn:
        row = conn.execute(
            "SELECT message_id, dead_letter_reason FROM outbox.messages WHERE dead_lettered_at IS NOT NULL"
        ).fetchone()
    assert row == (big, "payload too large: 2000 bytes > relay.max_payload_bytes (1000)")


async def test_broker_unreachable_at_start_is_retried_and_said(db: str) -> None:
    fake = FakeAdapter(fail_connect=3)
    with psycopg.connect(db) as conn:
        enqueue(conn, "t", {"a": 1})
        conn.commit()
    with capture_logs() as logs:
        async with running_relay(make_config(db, retry={"initial": "50ms", "max": "100ms"}), {"main": fake}):
            await wait_until(lambda: len(fake.delivered) == 1, timeout=15)
    waits = [e for e in logs if e["event"] == "broker_unreachable"]
    assert len(waits) == 3 and waits[0]["broker"] == "main" and "refused" in waits[0]["error"]


async def test_older_schema_tells_the_user_to_run_install(db: str) -> None:
    with psycopg.connect(db) as conn:
        conn.execute("UPDATE outbox.schema_version SET version = 0")
        conn.commit()
    with pytest.raises(SchemaError, match=r"older than this outbox-relay needs .* run `outbox-relay schema install"):
        async with running_relay(make_config(db), {"main": FakeAdapter()}):
            pass


def test_broker_credentials_never_reach_check_output_or_logs(db: str, tmp_path: Path) -> None:
    secrets = ["amqp-s3cret-Pw", "kafka-s3cret-Pw", "hook-t0ken-Pw"]
    config = tmp_path / "relay.yaml"
    config.write_text(f"""
database: {{dsn: "{db}"}}
http: {{host: 127.0.0.1, port: 0}}
brokers:
  mq: {{type: rabbitmq, url: "amqp://relay:${{AMQP_PW}}@127.0.0.1:1/%2F", connect_timeout: 1s}}
  kafka:
    type: kafka
    bootstrap_servers: 127.0.0.1:1
    request_timeout: 2s
    sasl: {{mechanism: SCRAM-SHA-512, username: relay, password: "${{KAFKA_PW}}"}}
  hook: {{type: webhook, url: "http://127.0.0.1:1/", headers: {{authorization: "Bearer ${{HOOK_TOKEN}}"}}}}
routes: [{{topic: "*", broker: mq}}]
""")
    env = {"AMQP_PW": secrets[0], "KAFKA_PW": secrets[1], "HOOK_TOKEN": secrets[2]}
    checked = run_cli("check", "--config", str(config), env=env)
    assert checked.returncode == 1 and "broker    FAIL  mq (rabbitmq)" in checked.stdout
    relay = RelayProcess(config, env=env)
    try:
        relay.wait_started()
        # The positive signal: the relay has tried the broker (and logged it) a few times.
        wait_for(lambda: relay.log_path.read_text().count("broker_unreachable") >= 2, 30, "two broker_unreachable")
        assert relay.terminate() == 0
        logs = relay.log_path.read_text()
    finally:
        relay.close()
    assert "broker_unreachable" in logs
    for out in (checked.stdout, checked.stderr, logs):
        for secret in secrets:
            assert secret not in out


def _make_certs(directory: Path) -> None:
    """A CA and a server certificate for 127.0.0.1, with openssl."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    )
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr")
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.crt",
    )


async def test_relay_over_tls_to_postgresql(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    _make_certs(certs)
    cluster = local_postgres.create({"fsync": "off"})
    try:
        # The server reads its key as the cluster's owner, with no access for others.
        for name in ("server.crt", "server.key"):
            shutil.copy(certs / name, cluster.datadir / name)
            if cluster.run_as:
                entry = pwd.getpwnam(cluster.run_as)
                os.chown(cluster.datadir / name, entry.pw_uid, entry.pw_gid)
            os.chmod(cluster.datadir / name, 0o600)
        cluster.restart(
            settings={
                "ssl": "on",
                "ssl_cert_file": str(cluster.datadir / "server.crt"),
                "ssl_key_file": str(cluster.datadir / "server.key"),
            }
        )
        dsn = make_conninfo(cluster.dsn, sslmode="verify-full", sslrootcert=str(certs / "ca.crt"))
        with psycopg.connect(dsn) as conn:
            schema_manager.install(conn, "outbox")
            assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)
            enqueue(conn, "t", {"over": "tls"})
            conn.commit()
        fake = FakeAdapter()
        async with running_relay(make_config(dsn), {"main": fake}):
            await wait_until(lambda: len(fake.delivered) == 1)
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(
                make_conninfo(cluster.dsn, sslmode="verify-full", sslrootcert=str(certs / "server.crt")),
                connect_timeout=3,
            )
    finally:
        local_postgres.destroy(cluster)


async def test_a_reason_with_nul_a_lone_surrogate_and_any_length_is_recorded_not_fatal(db: str) -> None:
    # PostgreSQL text refuses NUL (recording the batch failed, the relay died and came
    # back to the same batch); a lone surrogate has no UTF-8 (the log line failed).
    ugly = "broker said \x00 and \ud800 " + "x" * 5000
    fake = FakeAdapter(script=lambda out: PublishResult.transient(ugly) if out.message.key == "bad" else None)
    with psycopg.connect(db) as conn:
        enqueue(conn, "t", {"n": 1}, key="bad")
        enqueue(conn, "t", {"n": 2}, key="good")
        conn.commit()

    def dead() -> int:
        with psycopg.connect(db) as conn:
            row = conn.execute("SELECT count(*) FROM outbox.messages WHERE dead_lettered_at IS NOT NULL").fetchone()
        return row[0] if row else 0

    # running_relay raises if the relay's run ended with an error.
    async with running_relay(make_config(db, max_attempts=1), {"main": fake}):
        await wait_until(lambda: dead() == 1 and len(fake.delivered) == 1, timeout=10)
    with psycopg.connect(db) as conn:
        row = conn.execute("SELECT dead_letter_reason FROM outbox.messages WHERE key = 'bad'").fetchone()
    assert row is not None
    reason = row[0]
    assert "broker said \\0 and \\ud800 " in reason and len(reason) <= 2000, reason[:80]
    assert [out.message.key for out in fake.delivered] == ["good"]


@pytest.mark.parametrize("created_at", ["infinity", "-infinity", "10000-01-01"])
@pytest.mark.parametrize("key", [None, "k"])
async def test_a_row_with_a_timestamp_python_cannot_hold_is_still_delivered(
    db: str, created_at: str, key: str | None
) -> None:
    # Written by hand (the producer role cannot set created_at): loading it failed every
    # claim that read it, so the relay restarted into the same row forever.
    with psycopg.connect(db) as conn:
        conn.execute(
            "INSERT INTO outbox.messages (topic, key, payload, created_at) VALUES ('t', %s, '\\x01', %s)",
            (key, created_at),
        )
        enqueue(conn, "t", {"after": True}, key=key)
        conn.commit()
    fake = FakeAdapter()
    # A keyless row is due at its created_at: one dated in the future waits for it (the
    # relay goes on with the others); a keyed one is its key's head and goes first.
    waits = key is None and created_at != "-infinity"
    async with running_relay(make_config(db), {"main": fake}, heartbeat_every=0.1) as relay:
        await wait_until(lambda: len(fake.delivered) == (1 if waits else 2), timeout=10)
        # The lag gauges still work (the age of an 'infinity' row cannot be computed: it
        # made every maintenance round fail, and with it retention).
        await wait_until(
            lambda: relay.metrics.registry.get_sample_value("outbox_relay_pending_messages") == (1 if waits else 0),
            timeout=10,
        )
    payloads = [out.message.payload for out in fake.delivered]
    if key is None:
        # Keyless messages carry no order: the relay's workers may claim the two rows apart.
        assert sorted(payloads) == ([b'{"after":true}'] if waits else [b"\x01", b'{"after":true}']), payloads
    else:
        assert payloads == [b"\x01", b'{"after":true}'], payloads


def test_postgres_binaries_are_copied_into_a_fresh_private_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As root, local_postgres copies the server's installation where the postgres user
    # can run it. The old fixed path (/tmp/outbox-relay-pginstall-<pid>) could be planted
    # beforehand by another user; the copy must land in a directory nobody else chose.
    import tempfile

    install = tmp_path / "site" / "pgserver" / "pginstall"
    (install / "bin").mkdir(parents=True)
    (install / "bin" / "initdb").write_text("#!/bin/sh\n")
    planted = Path(tempfile.gettempdir()) / f"outbox-relay-pginstall-{os.getpid()}"
    attacker = tmp_path / "attacker"
    attacker.mkdir()
    if not planted.exists():
        planted.symlink_to(attacker)
    real_run = subprocess.run

    def run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[bytes]:
        if args[:1] == ["runuser"]:  # "cannot execute it as that user": a copy is needed
            return subprocess.CompletedProcess(args, 1)
        return real_run(args, **kwargs)  # type: ignore[call-overload,no-any-return]

    monkeypatch.setattr(local_postgres.subprocess, "run", run)
    try:
        usable = local_postgres._usable_by("postgres", install / "bin")
    finally:
        if planted.is_symlink():
            planted.unlink()
    assert (usable / "initdb").exists()
    assert list(attacker.iterdir()) == [], "nothing copied through the planted path"
    root = usable.parents[2]
    assert root.name.startswith("outbox-relay-pginstall-") and root != planted
    assert root.stat().st_uid == os.geteuid() and root.stat().st_mode & 0o022 == 0
    shutil.rmtree(root)


def test_a_failover_to_a_read_only_database_is_survived_and_left_when_writable(db: str, tmp_path: Path) -> None:
    # After a failover to a read-only node (here: the database turned read-only and its
    # sessions ended), every statement of the relay's sessions fails. The relay must keep
    # reconnecting, not die into a crash loop, and deliver once the database takes
    # writes again.
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict

    sink = tmp_path / "out.jsonl"
    config = write_config(tmp_path / "relay.yaml", db, sink=sink)
    database = sql.Identifier(str(conninfo_to_dict(db)["dbname"]))
    relay = RelayProcess(config)
    try:
        relay.wait_started()
        with psycopg.connect(db, autocommit=True) as admin:
            admin.execute(sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on").format(database))
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        with psycopg.connect(db, options="-c default_transaction_read_only=off") as writer:
            for n in range(5):
                enqueue(writer, "orders", {"n": n}, key="k")
            writer.commit()

        def refused_for_read_only() -> bool:
            assert relay.proc.poll() is None, "the relay died on a read-only database"
            return any(
                "read-only" in str(event.get("error", ""))
                for event in relay.logs()
                if event.get("event") == "database_connection_lost"
            )

        wait_for(refused_for_read_only, 60, "a read-only refusal logged")
        assert read_jsonl(sink) == [], "nothing can be marked dispatched on a read-only node"
        assert relay.proc.poll() is None
        with psycopg.connect(db, autocommit=True, options="-c default_transaction_read_only=off") as admin:
            admin.execute(sql.SQL("ALTER DATABASE {} RESET default_transaction_read_only").format(database))
        wait_for(lambda: len(read_jsonl(sink)) >= 5, 60, "delivered once the database took writes again")
        assert [line["payload"]["n"] for line in read_jsonl(sink)] == [0, 1, 2, 3, 4]
        assert relay.terminate() == 0
    finally:
        relay.close()
