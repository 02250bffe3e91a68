"""Exactly once into a real Kafka broker from the WAL source (sources/wal/exactly_once.py,
adapters/kafka_transactions.py): each batch one Kafka transaction with its position in
the offsets topic, read back with read_committed by the next relay."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from outbox_relay.adapter import transactions_of
from outbox_relay.assembly import build_adapters
from outbox_relay.sources.wal.stream import WalStream
from tests.consumers import kafka_create_topic, kafka_read_to_end
from tests.support.configs import make_config
from tests.support.outbox import count
from tests.support.waiting import wait_until
from tests.support.wal import WalSlot, confirmed_flush, wal_slot
from tests.support.wal_relay import commit_end_lsns, commit_frames, running_wal_relay, wal_relay

CLIENTS = ["aiokafka"]


@pytest.fixture
def outbox_wal(db: str) -> Iterator[WalSlot]:
    with wal_slot(db) as found:
        yield found


def _config(wal: WalSlot, bootstrap: str, topic: str, client: str, **broker: Any) -> Any:
    return make_config(
        wal.dsn,
        brokers={
            "events": {
                "type": "kafka",
                "bootstrap_servers": bootstrap,
                "client": client,
                "exactly_once": True,
                "offsets_topic": f"offsets-{topic}",
                **broker,
            }
        },
        routes=[{"topic": "orders.*", "broker": "events", "destination": topic}],
    )


def _exactly_once(adapters: dict[str, Any]) -> tuple[str, Any]:
    factory = transactions_of(adapters["events"])
    assert factory is not None
    return "events", factory


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_restart_before_the_slot_is_told_publishes_nothing_twice(
    outbox_wal: WalSlot, kafka_bootstrap: str, client: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first relay commits every transaction to Kafka but its confirmed positions
    never reach the slot (the fault injected: as a relay killed right after its commits
    would leave it): the second relay gets every transaction again from the slot and
    skips them all, by the position read back from the offsets topic. A read_committed
    consumer sees each message once."""
    topic = f"eos-{uuid.uuid4().hex[:10]}"
    await kafka_create_topic(kafka_bootstrap, topic, partitions=3)
    committed = []
    for t in range(5):
        committed += commit_frames(outbox_wal.dsn, [(f"key-{i % 7}", b"%d:%d" % (t, i)) for i in range(30)])
    *_, end = commit_end_lsns(outbox_wal)
    config = _config(outbox_wal, kafka_bootstrap, topic, client)
    adapters = build_adapters(config)
    relay = wal_relay(outbox_wal, config, adapters, exactly_once=_exactly_once(adapters))
    with monkeypatch.context() as patch:
        patch.setattr(WalStream, "confirm", lambda self, lsn: None)
        async with running_wal_relay(relay):
            await wait_until(lambda: relay.confirmed_lsn >= end, timeout=60)
    assert confirmed_flush(outbox_wal.dsn, outbox_wal.name) < end, "the slot was told nothing"
    assert relay.published == len(committed)

    more = commit_frames(outbox_wal.dsn, [("key-1", b"after")])
    second = wal_relay(outbox_wal, config, adapters, exactly_once=_exactly_once(adapters))
    async with running_wal_relay(second):
        await wait_until(lambda: confirmed_flush(outbox_wal.dsn, outbox_wal.name) > end, timeout=60)
    assert second.published == 1, "everything before the restart was skipped"

    expected = committed + more
    received = await kafka_read_to_end(kafka_bootstrap, topic, isolation_level="read_committed")
    assert [r.message_id for r in received if r.key == "key-1"] == [
        str(e.message_id) for e in expected if e.key == "key-1"
    ]
    assert sorted(r.message_id for r in received) == sorted(str(e.message_id) for e in expected)
    assert count(outbox_wal.dsn) == 0, "nothing parked"
