"""Receipts of the messages the WAL source streams (relay.wal.receipts), against a real
Kafka broker: each message's receipt names the partition and offset where an
independent consumer finds it; `outbox.receipt()` and `status --message-id` show it;
without the setting none is kept; retention deletes them."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import psycopg.conninfo
import psycopg.sql
import pytest
from aiokafka.structs import ConsumerRecord

from outbox_relay.assembly import build_adapters
from outbox_relay.errors import ConfigError
from outbox_relay.sqlfiles import Queries
from tests.consumers import kafka_create_topic, kafka_scan_to_end
from tests.support.cli import run_cli
from tests.support.configs import make_config, write_config
from tests.support.waiting import wait_until
from tests.support.wal import WalSlot, confirmed_flush, wal_slot
from tests.support.wal_relay import commit_end_lsns, commit_frames, running_wal_relay, wal_relay


@pytest.fixture
def outbox_wal(db: str) -> Iterator[WalSlot]:
    with wal_slot(db) as found:
        yield found


def receipt_of(dsn: str, message_id: uuid.UUID) -> Any:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT outbox.receipt(%s)", (message_id,)).fetchone()
    return row[0] if row else None


async def stream(outbox_wal: WalSlot, bootstrap: str, topic: str, *, receipts: bool) -> list[Any]:
    committed = commit_frames(outbox_wal.dsn, [(f"key-{i % 4}", b"m%d" % i) for i in range(30)])
    *_, end = commit_end_lsns(outbox_wal)
    config = make_config(
        outbox_wal.dsn,
        brokers={"events": {"type": "kafka", "bootstrap_servers": bootstrap}},
        routes=[{"topic": "orders.*", "broker": "events", "destination": topic}],
    )
    adapters = build_adapters(config)
    for adapter in adapters.values():
        await adapter.connect()
    try:
        async with running_wal_relay(wal_relay(outbox_wal, config, adapters, receipts=receipts)):
            await wait_until(lambda: confirmed_flush(outbox_wal.dsn, outbox_wal.name) >= end, timeout=60)
    finally:
        for adapter in adapters.values():
            await adapter.close()
    return committed


async def test_each_streamed_message_keeps_where_kafka_put_it(
    outbox_wal: WalSlot, kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = f"wal-receipts-{uuid.uuid4().hex[:10]}"
    await kafka_create_topic(kafka_bootstrap, topic, partitions=3)
    committed = await stream(outbox_wal, kafka_bootstrap, topic, receipts=True)
    records: list[ConsumerRecord] = []
    await kafka_scan_to_end(kafka_bootstrap, topic, records.append, isolation_level="read_committed")
    where = {dict(r.headers)["message-id"].decode(): (r.partition, r.offset) for r in records}
    assert len(where) == len(committed) == 30
    for entry in committed:
        receipt = receipt_of(outbox_wal.dsn, entry.message_id)
        assert receipt is not None, entry
        assert (receipt["broker"], receipt["destination"], receipt["source"]) == ("events", topic, "wal")
        assert (receipt["partition"], receipt["offset"]) == where[str(entry.message_id)]
    # status --message-id shows it as a message streamed from the WAL, with its receipt.
    config = write_config(tmp_path / "relay.yaml", outbox_wal.dsn)
    first = committed[0].message_id
    shown = run_cli("status", "--config", str(config), "--message-id", str(first))
    assert shown.returncode == 0, shown.stderr
    assert "streamed from the WAL: dispatched, topic orders.created" in shown.stdout
    assert f'"offset": {where[str(first)][1]}' in shown.stdout
    # Retention deletes them as it deletes dispatched rows.
    with psycopg.connect(outbox_wal.dsn) as conn:
        deleted = conn.execute(
            Queries("outbox")["delete_expired_wal_receipts"], {"retention_s": 0, "limit": 1000}
        ).rowcount
    assert deleted == 30 and receipt_of(outbox_wal.dsn, first) is None


async def test_without_the_setting_no_receipt_is_kept(outbox_wal: WalSlot, kafka_bootstrap: str) -> None:
    topic = f"wal-receipts-off-{uuid.uuid4().hex[:10]}"
    committed = await stream(outbox_wal, kafka_bootstrap, topic, receipts=False)
    records: list[ConsumerRecord] = []
    await kafka_scan_to_end(kafka_bootstrap, topic, records.append, isolation_level="read_committed")
    assert len(records) == 30  # delivered (the positive signal), and:
    with psycopg.connect(outbox_wal.dsn) as conn:
        assert conn.execute("SELECT count(*) FROM outbox.wal_receipts").fetchone() == (0,)
    assert receipt_of(outbox_wal.dsn, committed[0].message_id) is None


@pytest.mark.parametrize("relay", [{"retention": "0s"}, {"receipts": False}])
def test_wal_receipts_need_receipts_kept(db: str, relay: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=r"relay\.wal\.receipts: needs relay\.receipts on and relay\.retention"):
        make_config(db, wal={"receipts": True}, **relay)


@pytest.mark.parametrize("receipts", [True, False])
async def test_the_whole_relay_keeps_them_and_feeds_deliveries_back_with_its_own_role(
    db: str, kafka_bootstrap: str, receipts: bool
) -> None:
    """Through `outbox-relay run`'s assembly (the WAL source's start checks, its
    dispatcher with receipts), as the relay's role of least privilege; delivered
    outcome rows carry their receipt with relay.wal.receipts on or off."""
    from outbox_relay import enqueue
    from outbox_relay.sources.wal.runner import WalSource
    from tests.support.databases import role_with_grants
    from tests.support.relay import running_relay
    from tests.support.wal import outbox_in_wal_mode

    topic = f"wal-receipts-run-{uuid.uuid4().hex[:10]}"
    await kafka_create_topic(kafka_bootstrap, topic, partitions=2)
    with outbox_in_wal_mode(db) as slot_name, role_with_grants(db, "relay", "walrcpt") as relay_dsn:
        role = str(psycopg.conninfo.conninfo_to_dict(relay_dsn)["user"])
        with psycopg.connect(db, autocommit=True) as conn:  # streaming a slot needs it
            conn.execute(psycopg.sql.SQL("ALTER ROLE {} REPLICATION").format(psycopg.sql.Identifier(role)))
        with psycopg.connect(db) as conn:
            ids = [enqueue(conn, "orders.created", {"n": n}, key=f"k{n % 3}") for n in range(12)]
            conn.commit()
        config = make_config(
            relay_dsn,
            brokers={"events": {"type": "kafka", "bootstrap_servers": kafka_bootstrap}},
            routes=[{"topic": "orders.*", "broker": "events", "destination": topic}],
            wal={"slot": slot_name, "receipts": receipts},
            outcomes={"delivered": ["orders.*"]},
        )
        async with running_relay(config, build_adapters(config), sources=[WalSource(config)]):
            await wait_until(lambda: len(delivered_outcomes(db)) == len(ids), timeout=60)
    delivered = delivered_outcomes(db)
    assert sorted(str(m) for m, _ in delivered) == sorted(map(str, ids))
    assert {d for _, d in delivered} == {topic}  # each with its receipt
    if receipts:
        assert {receipt_of(db, i)["source"] for i in ids} == {"wal"}
    else:
        assert all(receipt_of(db, i) is None for i in ids)


def delivered_outcomes(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT message_id, receipt ->> 'destination' FROM outbox.outcomes WHERE outcome = 'delivered'"
        ).fetchall()
