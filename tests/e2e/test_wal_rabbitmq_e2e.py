"""The WAL source publishing to a real RabbitMQ broker (the same suite as the table's,
tests/e2e/test_rabbitmq_e2e.py, over the other source), read back with pika: what
committed arrives in commit order per key with its message id, what rolled back never
does; a message the broker returns as unroutable is parked as a dead letter in the
table, its key's later messages go on (dead_letter_policy release)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from outbox_relay import enqueue
from outbox_relay.assembly import build_adapters
from outbox_relay.operations import schema_manager
from tests.consumers import RabbitQueue, rabbit_read
from tests.support.configs import make_config
from tests.support.outbox import dead_letters
from tests.support.waiting import wait_until
from tests.support.wal import WalSlot, confirmed_flush, wal_slot
from tests.support.wal_relay import commit_end_lsns, running_wal_relay, wal_relay


@pytest.fixture
def outbox_wal(db: str) -> Iterator[WalSlot]:
    """The outbox in wal mode, on a slot of its own."""
    with wal_slot(db) as found:
        with psycopg.connect(db) as conn:
            schema_manager.set_source(conn, "outbox", "wal", slot_name=found.name)
        yield found


async def relay_until_confirmed(wal: WalSlot, exchange: str, amqp_url: str) -> None:
    *_, end = commit_end_lsns(wal)
    config = make_config(
        wal.dsn,
        brokers={"mq": {"type": "rabbitmq", "url": amqp_url, "exchange": exchange}},
        routes=[{"topic": "*", "broker": "mq"}],
    )
    adapters = build_adapters(config)
    for adapter in adapters.values():
        await adapter.connect()
    try:
        async with running_wal_relay(wal_relay(wal, config, adapters)):
            await wait_until(lambda: confirmed_flush(wal.dsn, wal.name) >= end, timeout=60)
    finally:
        for adapter in adapters.values():
            await adapter.close()


async def test_committed_wal_messages_arrive_in_commit_order_per_key_and_rolled_back_never(
    outbox_wal: WalSlot, amqp_url: str
) -> None:
    exchange = f"wal-e2e-{uuid.uuid4().hex[:10]}"
    queue = RabbitQueue(amqp_url, exchange, exchange + ".all", binding="emails.#")
    committed: dict[str, tuple[str, int]] = {}
    rolled_back: set[str] = set()
    try:
        with psycopg.connect(outbox_wal.dsn) as conn:
            for t in range(30):
                ids = {str(enqueue(conn, "emails.sent", {"t": t}, key=f"user-{t % 7}")): (f"user-{t % 7}", t)}
                if t % 6 == 5:
                    rolled_back |= set(ids)
                    conn.rollback()
                    continue
                conn.commit()
                committed |= ids
        await relay_until_confirmed(outbox_wal, exchange, amqp_url)
        received = await rabbit_read(queue, len(committed))
    finally:
        queue.close()
    assert sorted(r.message_id for r in received) == sorted(committed)
    by_key: dict[str, list[int]] = {}
    for r in received:
        key, t = committed[r.message_id]
        by_key.setdefault(key, []).append(t)
    assert all(ts == sorted(ts) for ts in by_key.values()), f"each key in commit order: {by_key}"
    assert not {r.message_id for r in received} & rolled_back
    assert received[0].properties["routing_key"] == "emails.sent"
    with psycopg.connect(outbox_wal.dsn) as conn:
        assert conn.execute("SELECT count(*) FROM outbox.messages").fetchone() == (0,), "no row: nothing parked"


async def test_an_unroutable_message_is_parked_as_a_dead_letter_while_its_key_goes_on(
    outbox_wal: WalSlot, amqp_url: str
) -> None:
    exchange = f"wal-e2e-{uuid.uuid4().hex[:10]}"
    queue = RabbitQueue(amqp_url, exchange, exchange + ".sent", binding="emails.sent")
    try:
        with psycopg.connect(outbox_wal.dsn) as conn:
            enqueue(conn, "emails.sent", {"key": "u", "n": 0}, key="u")
            lost = enqueue(conn, "emails.bounced", {"key": "u", "n": 1}, key="u")  # no binding
            enqueue(conn, "emails.sent", {"key": "u", "n": 2}, key="u")
            conn.commit()
        await relay_until_confirmed(outbox_wal, exchange, amqp_url)
        received = await rabbit_read(queue, 2)
    finally:
        queue.close()
    [(mid, _, reason)] = dead_letters(outbox_wal.dsn)
    assert mid == str(lost)
    assert reason.startswith("unroutable")
    assert [json.loads(r.payload)["n"] for r in received] == [0, 2]
