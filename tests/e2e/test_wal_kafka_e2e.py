"""The WAL source's relay publishing to a real Kafka broker, read back with an
independent consumer: what committed arrives once, in commit order per key, with its
message id; what rolled back never does."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from outbox_relay.assembly import build_adapters
from tests.consumers import kafka_create_topic, kafka_read
from tests.support.configs import make_config
from tests.support.outbox import count
from tests.support.waiting import wait_until
from tests.support.wal import WalSlot, confirmed_flush, wal_slot
from tests.support.wal_relay import commit_end_lsns, commit_frames, running_wal_relay, wal_relay


@pytest.fixture
def outbox_wal(db: str) -> Iterator[WalSlot]:
    with wal_slot(db) as found:
        yield found


@pytest.mark.parametrize("client", ["aiokafka", "librdkafka"])
async def test_committed_wal_messages_arrive_in_commit_order_per_key(
    outbox_wal: WalSlot, kafka_bootstrap: str, client: str
) -> None:
    topic = f"wal-e2e-{uuid.uuid4().hex[:10]}"
    await kafka_create_topic(kafka_bootstrap, topic, partitions=3)
    committed, rolled_back = [], []
    for t in range(3):
        committed += commit_frames(outbox_wal.dsn, [(f"key-{i % 10}", b"%d:%d" % (t, i)) for i in range(40)])
        rolled_back += commit_frames(outbox_wal.dsn, [("key-0", b"rolled-back-%d" % t)], rollback=True)
    *_, end = commit_end_lsns(outbox_wal)
    config = make_config(
        outbox_wal.dsn,
        brokers={"events": {"type": "kafka", "bootstrap_servers": kafka_bootstrap, "client": client}},
        routes=[{"topic": "orders.*", "broker": "events", "destination": topic}],
    )
    adapters = build_adapters(config)
    for adapter in adapters.values():
        await adapter.connect()
    try:
        async with running_wal_relay(wal_relay(outbox_wal, config, adapters)):
            await wait_until(lambda: confirmed_flush(outbox_wal.dsn, outbox_wal.name) >= end, timeout=60)
    finally:
        for adapter in adapters.values():
            await adapter.close()

    received = await kafka_read(kafka_bootstrap, topic, len(committed))
    assert sorted(r.message_id for r in received) == sorted(str(e.message_id) for e in committed)
    assert not {str(e.message_id) for e in rolled_back} & {r.message_id for r in received}
    by_key: dict[str | None, list[bytes]] = {}
    for r in received:
        by_key.setdefault(r.key, []).append(r.payload)
    expected: dict[str | None, list[bytes]] = {}
    for e in committed:
        expected.setdefault(e.key, []).append(e.payload)
    assert by_key == expected, "each key in commit order"
    assert count(outbox_wal.dsn) == 0, "nothing parked"
