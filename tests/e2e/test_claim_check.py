"""The claim check against real servers: a 5 MB payload goes to an S3-compatible store
(SeaweedFS, over HTTP and TLS) or a filesystem path, Kafka and RabbitMQ get a small
envelope, and `fetch` gets the payload back by its SHA-256; a store stopped mid-run
holds messages without spending an attempt; an upload is reused; `enqueue_large` and
`claim-check sweep` remove only orphans."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import psycopg
import pytest
from aiokafka.structs import ConsumerRecord

from outbox_relay import claim_check, enqueue, inbox
from outbox_relay.assembly import build_adapters
from outbox_relay.claim_check import envelope
from outbox_relay.claim_check.stores import FileStore, S3Store
from outbox_relay.config import S3StoreConfig
from outbox_relay.operations import claim_check_sweep
from tests import services
from tests.consumers import RabbitQueue, kafka_scan_to_end, rabbit_read
from tests.inbox.helpers import balances, create_accounts
from tests.inbox.helpers import credit as credit_account
from tests.support.cli import RelayProcess, run_cli
from tests.support.configs import make_config, write_config
from tests.support.databases import role_with_grants
from tests.support.http import HttpReceiver, answer
from tests.support.outbox import count, pending
from tests.support.relay import running_relay
from tests.support.waiting import wait_for, wait_until
from tests.support.wal import outbox_in_wal_mode

FIVE_MB = 5 * 1024 * 1024


def big_payload(seed: int = 0) -> bytes:
    """5 MB that no compression or deduplication makes small, different per seed."""
    block = hashlib.sha256(f"seed-{seed}".encode()).digest()
    out = bytearray()
    while len(out) < FIVE_MB:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:FIVE_MB])


@pytest.fixture
def s3(s3_store: services.S3Store, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """A fresh bucket; the store's credentials in the environment only (as the relay and
    consumers take them); the claim_check block for it."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_store.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_store.secret_key)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_store.endpoint_url)  # for fetch() without a store
    bucket = f"claims-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_store.endpoint_url, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    yield {"type": "s3", "bucket": bucket, "prefix": "relay/", "endpoint_url": s3_store.endpoint_url}


def s3_client_store(block: dict[str, Any]) -> S3Store:
    return S3Store(S3StoreConfig(**block))


async def kafka_records(bootstrap: str, topic: str) -> list[ConsumerRecord]:
    records: list[ConsumerRecord] = []
    await kafka_scan_to_end(bootstrap, topic, records.append, isolation_level="read_committed")
    return records


def headers_of(record: ConsumerRecord) -> dict[str, str]:
    return {k: v.decode() for k, v in record.headers}


async def test_a_5_mb_payload_goes_to_kafka_through_s3_and_is_fetched_back_by_its_hash(
    db: str, kafka_bootstrap: str, s3: dict[str, Any]
) -> None:
    topic = f"claims-{uuid.uuid4().hex[:10]}"
    payload = big_payload()
    with psycopg.connect(db) as conn:
        large = enqueue(conn, "docs.scanned", payload, key="d1", headers={"tenant": "t1"})
        small = enqueue(conn, "docs.scanned", {"page": 1}, key="d1")
        conn.commit()
    config = make_config(
        db,
        brokers={"events": {"type": "kafka", "bootstrap_servers": kafka_bootstrap}},
        routes=[{"topic": "docs.*", "broker": "events", "destination": topic}],
        claim_check={"over": "256KiB", "store": s3},
    )
    async with running_relay(config, build_adapters(config)):
        await wait_until(lambda: pending(db) == 0, timeout=60)
    first, second = await kafka_records(kafka_bootstrap, topic)  # one key: one partition, in order
    headers = headers_of(first)
    assert headers["message-id"] == str(large) and headers["tenant"] == "t1"
    assert headers[envelope.URL] == f"s3://{s3['bucket']}/relay/{large}"
    assert headers[envelope.SIZE] == str(FIVE_MB)
    assert headers[envelope.SHA256] == hashlib.sha256(payload).hexdigest()
    assert headers[envelope.PAYLOAD_CONTENT_TYPE] == "application/octet-stream"
    assert len(first.value) < 1000  # the envelope, not the payload
    assert claim_check.fetch(first) == payload  # from the environment's credentials
    # A small message is published as it is; fetch hands back its own payload.
    assert headers_of(second)["message-id"] == str(small) and envelope.URL not in headers_of(second)
    assert claim_check.fetch(second) == b'{"page":1}'
    # The object holds what the envelope says; tampered with, fetch refuses it.
    store = s3_client_store(s3)
    store._client.put_object(Bucket=s3["bucket"], Key=f"relay/{large}", Body=payload[:-1] + b"!")
    with pytest.raises(claim_check.ClaimCheckError, match="does not match the envelope's SHA-256"):
        claim_check.fetch(first)


async def test_the_inbox_applies_a_claim_checked_message_once(
    db: str, kafka_bootstrap: str, s3: dict[str, Any]
) -> None:
    # The consumer's inbox keys on the message-id header, which the envelope keeps: a
    # claim-checked message is applied once, its payload fetched and checked by hash.
    topic = f"claims-{uuid.uuid4().hex[:10]}"
    credit = {"account": 7, "amount": 5, "scan": "x" * (300 * 1024)}  # over 256KiB
    with psycopg.connect(db) as conn:
        inbox.install(conn)
        create_accounts(conn)
        message_id = enqueue(conn, "credits.posted", credit, key="a7")
        conn.commit()
    config = make_config(
        db,
        brokers={"events": {"type": "kafka", "bootstrap_servers": kafka_bootstrap}},
        routes=[{"topic": "credits.*", "broker": "events", "destination": topic}],
        claim_check={"over": "256KiB", "store": s3},
    )
    async with running_relay(config, build_adapters(config)):
        await wait_until(lambda: pending(db) == 0, timeout=60)
    (record,) = await kafka_records(kafka_bootstrap, topic)
    assert envelope.URL in headers_of(record) and len(record.value) < 1000
    ran = []
    for _ in range(2):  # the second is a redelivery: skipped by the inbox
        with psycopg.connect(db) as conn:
            ran.append(inbox.process_message(conn, record, lambda c: credit_account(c, claim_check.fetch(record))))
    assert ran == [True, False]
    assert balances(db) == {7: 5}
    with psycopg.connect(db) as conn:
        (seen,) = conn.execute("SELECT message_id FROM inbox.processed").fetchone() or (None,)
    assert seen == message_id


async def test_over_tls_to_rabbitmq_fetched_back_and_a_wrong_key_refused_without_the_secret(
    db: str, amqp_url: str, s3_store: services.S3Store, s3: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert s3_store.tls_endpoint_url and s3_store.ca_file
    tls = {**s3, "endpoint_url": s3_store.tls_endpoint_url, "ca_file": s3_store.ca_file}
    exchange = f"claims-{uuid.uuid4().hex[:10]}"
    queue = RabbitQueue(amqp_url, exchange, exchange + ".q")
    payload = big_payload(1)
    with psycopg.connect(db) as conn:
        message_id = enqueue(conn, "docs.scanned", payload, key="d2")
        conn.commit()
    config = make_config(
        db,
        brokers={"rabbit": {"type": "rabbitmq", "url": amqp_url, "exchange": exchange}},
        routes=[{"topic": "docs.*", "broker": "rabbit", "claim_check": {"over": 1024, "store": tls}}],
    )
    try:
        async with running_relay(config, build_adapters(config)):
            await wait_until(lambda: pending(db) == 0, timeout=60)
        [received] = await rabbit_read(queue, 1)
    finally:
        queue.close()
    assert received.message_id == str(message_id)
    store = S3Store(S3StoreConfig(**tls))
    assert claim_check.fetch(received, received.payload, store=store) == payload
    # A wrong key: the store refuses, and the error does not carry the secret.
    wrong = f"wrong-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    with pytest.raises(Exception) as refused:
        S3Store(S3StoreConfig(**tls)).get(received.headers[envelope.URL])
    assert "SignatureDoesNotMatch" in str(refused.value) or "AccessDenied" in str(refused.value)
    assert wrong not in str(refused.value) and s3_store.secret_key not in str(refused.value)


async def test_a_store_stopped_mid_run_holds_messages_and_spends_no_attempt(
    db: str, s3_store: services.S3Store, s3: dict[str, Any], tmp_path: Path
) -> None:
    assert s3_store.broker is not None, "needs the local store, to stop it"
    sink = tmp_path / "out.jsonl"
    config = make_config(
        db,
        brokers={"sink": {"type": "file", "path": str(sink)}},
        claim_check={"over": 1024, "store": {**s3, "timeout": "3s"}},
        max_attempts=2,
    )
    payloads = [big_payload(10 + n)[: 64 * 1024] for n in range(6)]
    async with running_relay(config, build_adapters(config)) as relay:
        with psycopg.connect(db) as conn:
            enqueue(conn, "docs.scanned", payloads[0], key="k")
            conn.commit()
        await wait_until(lambda: pending(db) == 0, timeout=30)
        s3_store.broker.stop()
        try:
            with psycopg.connect(db) as conn:
                for payload in payloads[1:]:
                    enqueue(conn, "docs.scanned", payload, key="k")
                conn.commit()
            # The relay tried, found the store down, and said so on /readyz.
            await wait_until(lambda: count(db, "last_error LIKE 'claim-check store % unavailable%'") >= 1, timeout=60)
            ready, details = await relay.health.readiness()
            assert not ready and details["claim_check_stores"] == {f"s3://{s3['bucket']}/relay/": False}
            assert count(db, "dispatched_at IS NULL AND attempts > 0") == 0
            assert count(db, "dead_lettered_at IS NOT NULL") == 0
        finally:
            s3_store.broker.start()
        await wait_until(lambda: pending(db) == 0, timeout=90)
        ready, details = await relay.health.readiness()
        assert details["claim_check_stores"] == {f"s3://{s3['bucket']}/relay/": True}
    assert count(db, "dead_lettered_at IS NOT NULL") == 0
    lines = [json.loads(line) for line in sink.read_text().splitlines()]
    fetched = [claim_check.fetch(line) for line in lines]
    # Every payload, each key in order (duplicates at most where an upload was in flight).
    assert list(dict.fromkeys(fetched)) == payloads


async def test_an_upload_left_by_a_relay_that_never_got_the_ack_is_reused(db: str, tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    payload = big_payload(2)
    with psycopg.connect(db) as conn:
        message_id = enqueue(conn, "docs.scanned", payload, key="d3")
        conn.commit()
    claim = {"over": "1MB", "store": {"type": "file", "path": str(store_dir)}}
    with HttpReceiver(answer(503)) as receiver:
        config = make_config(db, brokers={"hook": {"type": "webhook", "url": receiver.url + "/in"}}, claim_check=claim)
        # The first relay uploads, then the endpoint refuses: no ack, the row stays pending.
        async with running_relay(config, build_adapters(config)):
            await wait_until(lambda: receiver.refused >= 1, timeout=30)
        assert pending(db) == 1
        stored = store_dir / str(message_id)
        before = stored.stat()
        receiver.respond = answer(200)
        async with running_relay(config, build_adapters(config)):
            await wait_until(lambda: pending(db) == 0, timeout=30)
    after = stored.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not written again
    [delivered] = receiver.accepted()
    assert delivered.json["message_id"] == str(message_id)
    assert claim_check.fetch(delivered.json) == payload


def test_enqueue_large_and_sweep_remove_only_orphans(db: str, tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    store = FileStore(store_dir)
    with psycopg.connect(db) as conn:
        kept = claim_check.enqueue_large(conn, "docs.scanned", big_payload(3), key="k", store=store)
        conn.commit()
        claim_check.enqueue_large(conn, "docs.scanned", b"rolled back", key="k", store=store)
        conn.rollback()
    uploads = sorted((store_dir / "uploads").iterdir())
    assert len(uploads) == 2
    # Both an hour old: older than --older-than, younger than relay.retention.
    hour_ago = (datetime.now(UTC) - timedelta(hours=1)).timestamp()
    for path in uploads:
        os.utime(path, (hour_ago, hour_ago))
    config = write_config(
        tmp_path / "relay.yaml",
        db,
        claim_check={"over": "1MB", "store": {"type": "file", "path": str(store_dir)}},
        retention="7d",
    )
    dry = run_cli("claim-check", "sweep", "--config", str(config), "--older-than", "10m", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would remove 1 orphaned object(s); kept 1 referenced" in dry.stdout
    assert len(list((store_dir / "uploads").iterdir())) == 2
    done = run_cli("claim-check", "sweep", "--config", str(config), "--older-than", "10m", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["removed"] == 1
    with psycopg.connect(db) as conn:
        [(url,)] = conn.execute("SELECT headers ->> %s FROM outbox.messages", (envelope.URL,)).fetchall()
        assert conn.execute("SELECT message_id FROM outbox.messages").fetchone() == (kept,)
    assert [p.as_uri() for p in (store_dir / "uploads").iterdir()] == [url]
    assert claim_check.fetch(
        {
            "headers": {
                envelope.URL: url,
                envelope.SIZE: str(FIVE_MB),
                envelope.SHA256: hashlib.sha256(big_payload(3)).hexdigest(),
            }
        }
    ) == big_payload(3)
    # Objects written within --older-than, or while a transaction is open, are not judged.
    young = run_cli("claim-check", "sweep", "--config", str(config), "--older-than", "2h")
    assert young.returncode == 0 and "kept 0 referenced, 1 too young" in young.stdout, young.stdout
    too_long = run_cli("claim-check", "sweep", "--config", str(config), "--older-than", "8d")
    assert too_long.returncode != 0 and "must be shorter than relay.retention" in too_long.stderr


def test_sweep_on_s3_removes_the_orphan_of_a_rolled_back_transaction(db: str, s3: dict[str, Any]) -> None:
    store = s3_client_store(s3)
    with psycopg.connect(db) as conn:
        claim_check.enqueue_large(conn, "docs.scanned", {"doc": "kept"}, store=store)
        conn.commit()
        claim_check.enqueue_large(conn, "docs.scanned", {"doc": "orphan"}, store=store)
        conn.rollback()
        # As if run an hour from now: both objects are past --older-than.
        report = claim_check_sweep.sweep(
            conn, "outbox", [store], older_than=600, retention=7 * 86400, now=datetime.now(UTC) + timedelta(hours=1)
        )
    assert (len(report.removed), report.referenced) == (1, 1)
    left = [url for url, _ in store.uploads()]
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT headers ->> %s FROM outbox.messages", (envelope.URL,)).fetchall() == [(left[0],)]
    assert len(left) == 1


def test_sweep_refuses_what_it_cannot_judge(db: str, tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    # A role that cannot see the application's open transactions (the relay's own).
    with (
        role_with_grants(db, "relay", "sweeper") as relay_dsn,
        psycopg.connect(relay_dsn) as conn,
        pytest.raises(claim_check.ClaimCheckError, match="GRANT pg_read_all_stats"),
    ):
        claim_check_sweep.sweep(conn, "outbox", [store], older_than=600, retention=86400)
    # An outbox in WAL mode: a streamed message has no row naming its object.
    with (
        outbox_in_wal_mode(db),
        psycopg.connect(db) as conn,
        pytest.raises(claim_check.ClaimCheckError, match=r"writes to the WAL, or did within relay\.retention"),
    ):
        claim_check_sweep.sweep(conn, "outbox", [store], older_than=600, retention=86400)


def test_a_file_store_writes_objects_its_consumers_may_read(tmp_path: Path) -> None:
    url = FileStore(tmp_path).put("m1", b"payload", hashlib.sha256(b"payload").hexdigest(), "text/plain")
    mode = os.stat(url.removeprefix("file://")).st_mode & 0o777
    umask = next(
        int(line.split()[1], 8)
        for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith("Umask:")
    )
    assert mode & 0o044 == 0o044 & ~umask, oct(mode)  # group and others read, as the umask allows


def test_check_says_whether_each_store_lets_the_relay_in(db: str, s3: dict[str, Any], tmp_path: Path) -> None:
    good = write_config(tmp_path / "good.yaml", db, claim_check={"store": s3})
    done = run_cli("check", "--config", str(good))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"store     ok  s3://{s3['bucket']}/relay/" in done.stdout
    missing = {**s3, "bucket": f"nowhere-{uuid.uuid4().hex[:10]}"}
    bad = write_config(tmp_path / "bad.yaml", db, claim_check={"store": missing})
    done = run_cli("check", "--config", str(bad))
    assert done.returncode == 1
    assert f"store     FAIL  s3://{missing['bucket']}/relay/" in done.stdout


def test_a_relay_killed_between_the_upload_and_the_ack_leaves_an_object_the_next_one_reuses(
    db: str, tmp_path: Path
) -> None:
    store_dir = tmp_path / "store"
    payload = big_payload(4)
    with psycopg.connect(db) as conn:
        message_id = enqueue(conn, "docs.scanned", payload, key="d4")
        conn.commit()
    answered: list[int] = []

    def respond(request: Any) -> tuple[int, float]:
        # The first POST is held (the relay is killed meanwhile); the next ones answer.
        answered.append(len(answered))
        return (200, 20.0) if len(answered) == 1 else (200, 0.0)

    with HttpReceiver(respond) as receiver:
        config = write_config(
            tmp_path / "relay.yaml",
            db,
            brokers={"hook": {"type": "webhook", "url": receiver.url + "/in"}},
            claim_check={"over": "1MB", "store": {"type": "file", "path": str(store_dir)}},
        )
        first = RelayProcess(config)
        try:
            # The envelope reached the endpoint: the upload is done, the ack is not.
            wait_for(lambda: receiver.active >= 1, 60, "the first POST in progress")
        finally:
            first.kill()
        stored = store_dir / str(message_id)
        before = stored.stat()
        assert pending(db) == 1
        second = RelayProcess(config)
        try:
            wait_for(lambda: pending(db) == 0, 60, "the message dispatched by the second relay")
        finally:
            second.terminate()
            second.close()
    after = stored.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # reused, not written again
    assert [p.name for p in store_dir.iterdir()] == [str(message_id)]  # one object
    bodies = [r.json for r in receiver.requests]
    # At least once: the killed relay's POST and the next one, the same envelope.
    assert {b["message_id"] for b in bodies} == {str(message_id)} and len(bodies) == 2
    assert {b["headers"][envelope.URL] for b in bodies} == {stored.as_uri()}
    assert claim_check.fetch(bodies[-1]) == payload


async def test_enqueue_large_async_uploads_and_a_refused_call_uploads_nothing(db: str, tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    store = FileStore(store_dir)
    payload = big_payload(5)
    async with await psycopg.AsyncConnection.connect(db) as conn:
        message_id = await claim_check.enqueue_large_async(conn, "docs.scanned", payload, key="k", store=store)
        await conn.commit()
        # Refused before any upload: a topic enqueue refuses, and a connection outside a
        # transaction (autocommit: the envelope would not share the caller's transaction).
        with pytest.raises(ValueError, match="topic"):
            await claim_check.enqueue_large_async(conn, "", payload, store=store)
        await conn.rollback()
        await conn.set_autocommit(True)
        with pytest.raises(ValueError, match="autocommit"):
            await claim_check.enqueue_large_async(conn, "docs.scanned", payload, store=store)
    [uploaded] = (store_dir / "uploads").iterdir()
    with psycopg.connect(db) as conn:
        row = conn.execute(
            "SELECT headers, content_type FROM outbox.messages WHERE message_id = %s", (message_id,)
        ).fetchone()
    assert row is not None and row[1] == envelope.CONTENT_TYPE
    assert row[0][envelope.URL] == uploaded.as_uri()
    assert claim_check.fetch({"headers": row[0]}) == payload


def test_s3_objects_are_written_with_the_server_side_encryption_asked_for(s3: dict[str, Any]) -> None:
    store = s3_client_store({**s3, "server_side_encryption": "AES256"})
    payload = big_payload(6)
    url = store.put("m-sse", payload, hashlib.sha256(payload).hexdigest(), "application/octet-stream")
    assert url == f"s3://{s3['bucket']}/relay/m-sse"
    head = store._client.head_object(Bucket=s3["bucket"], Key="relay/m-sse")
    assert head.get("ServerSideEncryption") == "AES256"
