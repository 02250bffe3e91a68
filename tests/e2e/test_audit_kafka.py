"""`outbox-relay audit` against a real Kafka broker: messages the relay delivered are read
back at the partitions and offsets their receipts name; records deleted from the topic,
a copy delivered twice and a message without a receipt are each reported."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete
from aiokafka.errors import KafkaError

from outbox_relay import enqueue
from outbox_relay.assembly import build_adapters
from tests.consumers import kafka_create_topic, kafka_read_to_end
from tests.support.cli import run_cli
from tests.support.configs import make_config, write_config
from tests.support.outbox import pending
from tests.support.relay import running_relay
from tests.support.waiting import wait_until


def brokers(bootstrap: str, client: str = "aiokafka") -> dict[str, Any]:
    return {"events": {"type": "kafka", "bootstrap_servers": bootstrap, "client": client}}


def routes(topic: str) -> list[dict[str, Any]]:
    return [{"topic": "orders.*", "broker": "events", "destination": topic}]


async def new_topic_delivered(
    db: str, bootstrap: str, topic: str, count: int, client: str = "aiokafka", *, partitions: int = 1
) -> list[str]:
    """`topic` made with `partitions`, then `deliver`ed to."""
    await kafka_create_topic(bootstrap, topic, partitions=partitions)
    return await deliver(db, bootstrap, topic, count, client)


async def deliver(db: str, bootstrap: str, topic: str, count: int, client: str = "aiokafka") -> list[str]:
    """`count` messages enqueued and delivered by a relay; their ids, in enqueue order."""
    with psycopg.connect(db) as conn:
        ids = [str(enqueue(conn, "orders.created", {"n": n}, key=f"k{n % 5}")) for n in range(count)]
        conn.commit()
    config = make_config(db, brokers=brokers(bootstrap, client), routes=routes(topic))
    async with running_relay(config, build_adapters(config)):
        await wait_until(lambda: pending(db) == 0, timeout=60)
    return ids


def audit(tmp_path: Path, db: str, bootstrap: str, topic: str, *args: str) -> tuple[int, dict[str, Any]]:
    config = write_config(tmp_path / "relay.yaml", db, brokers=brokers(bootstrap), routes=routes(topic))
    done = run_cli("audit", "--config", str(config), "--json", *args)
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


@pytest.mark.parametrize("client", ["aiokafka", "librdkafka"])
async def test_a_clean_run_matches_every_receipt(db: str, kafka_bootstrap: str, tmp_path: Path, client: str) -> None:
    topic = f"audit-{uuid.uuid4().hex[:10]}"
    await new_topic_delivered(db, kafka_bootstrap, topic, 60, client, partitions=3)
    code, report = audit(tmp_path, db, kafka_bootstrap, topic)
    assert code == 0 and report["ok"], report
    assert (report["checked"], report["matched"], report["missing"], report["without_receipt"]) == (60, 60, 0, 0)
    assert report["delivered_twice"] == 0


async def test_records_deleted_from_the_topic_are_reported_missing(
    db: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = f"audit-del-{uuid.uuid4().hex[:10]}"
    await new_topic_delivered(db, kafka_bootstrap, topic, 20)
    # Which messages the first 8 records are, read independently (the workers' calls
    # interleave keys, so it is not enqueue order).
    before = await kafka_read_to_end(kafka_bootstrap, topic, isolation_level="read_committed")
    first_eight = {r.message_id for r in before[:8]}
    # As retention, compaction or a recreated topic would: the first 8 records are gone.
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.delete_records({TopicPartition(topic, 0): RecordsToDelete(before_offset=8)})
    finally:
        await admin.close()
    code, report = audit(tmp_path, db, kafka_bootstrap, topic)
    assert code == 1 and not report["ok"]
    assert (report["checked"], report["matched"], report["missing"]) == (20, 12, 8)
    assert {e["message_id"] for e in report["examples"]["missing"]} <= first_eight
    assert all("no record there" in e["where"] for e in report["examples"]["missing"])


async def test_a_recreated_topic_holding_other_messages_is_reported_with_what_is_there(
    db: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = f"audit-new-{uuid.uuid4().hex[:10]}"
    await new_topic_delivered(db, kafka_bootstrap, topic, 5)
    # The topic deleted and created again; another producer writes 5 records, which
    # take the offsets the receipts name.
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([topic])

        async def gone() -> bool:
            return topic not in await admin.list_topics()

        await wait_until(gone, timeout=60, interval=0.2, what="the topic deleted")
    finally:
        await admin.close()

    async def recreated() -> bool:
        try:
            await kafka_create_topic(kafka_bootstrap, topic, partitions=1)
        except KafkaError:  # still being deleted
            return False
        return True

    await wait_until(recreated, timeout=60, interval=0.5, what="the topic created again")
    strangers = [str(uuid.uuid4()) for _ in range(5)]
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        for stranger in strangers:
            await producer.send_and_wait(topic, b"{}", partition=0, headers=[("message-id", stranger.encode())])
    finally:
        await producer.stop()
    code, report = audit(tmp_path, db, kafka_bootstrap, topic)
    assert code == 1 and not report["ok"]
    assert (report["checked"], report["matched"], report["missing"]) == (5, 0, 5)
    shown = [e["where"] for e in report["examples"]["missing"]]
    assert all("the record there is message " in where for where in shown), shown
    assert {where.rsplit(" ", 1)[1] for where in shown} <= set(strangers)


async def test_a_copy_delivered_twice_is_reported_and_is_no_failure(
    db: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = f"audit-dup-{uuid.uuid4().hex[:10]}"
    first = await new_topic_delivered(db, kafka_bootstrap, topic, 10)
    # What a relay killed between the broker's ack and its mark leaves: a second record
    # of a message, here between the first delivery and the next ones.
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b'{"copy":true}', headers=[("message-id", first[3].encode())])
    finally:
        await producer.stop()
    await deliver(db, kafka_bootstrap, topic, 10)
    code, report = audit(tmp_path, db, kafka_bootstrap, topic)
    assert code == 0 and report["ok"], report
    assert (report["checked"], report["matched"], report["delivered_twice"]) == (20, 20, 1)
    assert [e["message_id"] for e in report["examples"]["delivered_twice"]] == [first[3]]


async def test_a_message_without_a_receipt_fails_the_audit_and_the_topic_filter_and_sample_bound_it(
    db: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = f"audit-none-{uuid.uuid4().hex[:10]}"
    await new_topic_delivered(db, kafka_bootstrap, topic, 10)
    with psycopg.connect(db) as conn:
        # The first dispatched (the latest ones are what --sample takes, below).
        row = conn.execute(
            "UPDATE outbox.messages SET receipt = NULL WHERE id = (SELECT id FROM outbox.messages"
            " ORDER BY dispatched_at, id LIMIT 1) RETURNING message_id"
        ).fetchone()
        conn.commit()
    assert row is not None
    code, report = audit(tmp_path, db, kafka_bootstrap, topic, "--topic", "orders.*")
    assert code == 1 and report["without_receipt"] == 1 and report["checked"] == 9
    assert [e["message_id"] for e in report["examples"]["without_receipt"]] == [str(row[0])]
    # Another topic's messages only: nothing checked, nothing missing.
    code, report = audit(tmp_path, db, kafka_bootstrap, topic, "--topic", "payments.*")
    assert code == 0 and report["checked"] == 0
    # The latest 3 only: the broker is read at 3 places.
    code, report = audit(tmp_path, db, kafka_bootstrap, topic, "--sample", "3")
    assert code == 0 and report["checked"] == 3


async def test_the_audit_reads_what_it_checks_not_the_topic(db: str, kafka_bootstrap: str, tmp_path: Path) -> None:
    topic = f"audit-cost-{uuid.uuid4().hex[:10]}"
    await new_topic_delivered(db, kafka_bootstrap, topic, 1500)
    code, report = audit(tmp_path, db, kafka_bootstrap, topic)
    assert code == 0 and report["checked"] == 1500 and report["records_read"] == 1500
    # The latest 10: a few records near the partition's end, not its 1,500.
    code, report = audit(tmp_path, db, kafka_bootstrap, topic, "--sample", "10")
    assert code == 0 and report["checked"] == 10
    assert 10 <= report["records_read"] <= 200, report


def test_a_bad_window_is_refused_in_one_line(db: str, kafka_bootstrap: str, tmp_path: Path) -> None:
    config = write_config(tmp_path / "relay.yaml", db, brokers=brokers(kafka_bootstrap), routes=routes("t"))
    done = run_cli("audit", "--config", str(config), "--since", "soon")
    assert done.returncode == 2 and "invalid time or duration 'soon'" in done.stderr, done.stderr


def test_a_broker_it_cannot_read_is_one_line_and_exit_1(db: str, tmp_path: Path) -> None:
    with psycopg.connect(db) as conn:
        conn.execute(
            "INSERT INTO outbox.messages (topic, payload, dispatched_at, receipt) VALUES ('orders.created', '\\x00',"
            """ now(), '{"broker": "events", "destination": "t", "partition": 0, "offset": 0}')"""
        )
        conn.commit()
    # Nothing listens there: connections are refused.
    config = write_config(tmp_path / "relay.yaml", db, brokers=brokers("127.0.0.1:1"), routes=routes("t"))
    done = run_cli("audit", "--config", str(config))
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: broker events: cannot read back: KafkaConnectionError: Unable"
    ), done.stderr


async def test_records_behind_an_open_transaction_are_undecided_not_missing(
    db: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = f"audit-open-{uuid.uuid4().hex[:10]}"
    await kafka_create_topic(kafka_bootstrap, topic, partitions=1)
    # Another producer's transaction, left open: a read-committed reader sees nothing
    # after its first record until it ends.
    other = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, transactional_id=f"audit-{uuid.uuid4().hex[:8]}")
    await other.start()
    try:
        await other.begin_transaction()
        await other.send_and_wait(topic, b"open")
        await deliver(db, kafka_bootstrap, topic, 5)
        code, report = audit(tmp_path, db, kafka_bootstrap, topic)
        assert code == 0 and report["ok"], report
        assert (report["undecided"], report["checked"], report["missing"]) == (5, 0, 0)
        await other.commit_transaction()
    finally:
        await other.stop()
    code, report = audit(tmp_path, db, kafka_bootstrap, topic)
    assert code == 0 and (report["undecided"], report["checked"], report["matched"]) == (0, 5, 5), report
