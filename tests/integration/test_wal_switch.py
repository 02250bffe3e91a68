"""A switch of source keeps each key's order, and a park is never made twice (issue 18,
point 1; migrations/0009_switch_order.sql): against a real PostgreSQL with logical
decoding, the engine's FakeAdapter as broker.

- wal -> table: the claim takes no keyed row enqueued after the switch until the slot is
  drained, and what the drain parks goes between its key's older and newer rows;
- a relay restarted after a park committed but before the slot took its position parks
  nothing twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from outbox_relay import enqueue
from outbox_relay.errors import SchemaError
from outbox_relay.models import PublishResult
from outbox_relay.operations import schema_manager
from outbox_relay.sources.wal.runner import WalSource
from outbox_relay.sources.wal.stream import WalStream
from outbox_relay.testing import FakeAdapter
from tests.support.configs import make_config
from tests.support.relay import running_relay
from tests.support.waiting import wait_until
from tests.support.wal import WalSlot, confirmed_flush, wal_slot
from tests.support.wal_relay import commit_end_lsns, running_wal_relay, wal_relay

QUICK_RETRY = {"initial": "50ms", "max": "200ms"}


@pytest.fixture
def outbox_wal(db: str) -> Iterator[WalSlot]:
    with wal_slot(db) as found:
        yield found


def set_source(wal: WalSlot, source: str) -> None:
    with psycopg.connect(wal.dsn) as conn:
        schema_manager.set_source(conn, "outbox", source, slot_name=wal.name)


def enqueue_each(dsn: str, key: str | None, payloads: list[str]) -> list[str]:
    """One transaction per message, through the installed enqueue (table or WAL body)."""
    ids = []
    with psycopg.connect(dsn) as conn:
        for payload in payloads:
            ids.append(str(enqueue(conn, "orders.created", {"p": payload}, key=key)))
            conn.commit()
    return ids


def rows_in_id_order(dsn: str, key: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT message_id::text FROM outbox.messages WHERE key = %s ORDER BY id", (key,))
        return [r[0] for r in rows.fetchall()]


def first_fails(message_id: str) -> FakeAdapter:
    """An ordered fake broker that answers a transient failure for `message_id` only."""

    def script(out: Any) -> PublishResult | None:
        return PublishResult.transient("not now") if str(out.message_id) == message_id else None

    return FakeAdapter(script=script, keeps_key_order=True)


async def test_a_message_parked_while_the_slot_drains_goes_between_its_keys_older_and_newer_rows(
    outbox_wal: WalSlot,
) -> None:
    dsn = outbox_wal.dsn
    set_source(outbox_wal, "wal")
    older = enqueue_each(dsn, "k", ["older"])
    config = make_config(dsn, retry={"initial": "1h", "max": "1h"})
    # `older` fails and is parked, its retry an hour away: k is held by the table.
    async with running_wal_relay(wal_relay(outbox_wal, config, {"main": first_fails(older[0])})):
        await wait_until(lambda: rows_in_id_order(dsn, "k") == older, what="the first message parked")
    in_slot = enqueue_each(dsn, "k", ["in the slot"])  # no relay runs: it stays in the slot
    end = commit_end_lsns(outbox_wal)[-1]
    set_source(outbox_wal, "table")
    newer = enqueue_each(dsn, "k", ["newer"])  # a row, enqueued after the switch

    # The drain parks `in the slot` behind `older`: between the two rows, by id.
    async with running_wal_relay(wal_relay(outbox_wal, config, {"main": FakeAdapter(keeps_key_order=True)})):
        await wait_until(lambda: confirmed_flush(dsn, outbox_wal.name) >= end, what="the drain confirmed")
    assert rows_in_id_order(dsn, "k") == [older[0], in_slot[0], newer[0]]


async def test_the_claim_takes_no_keyed_row_enqueued_after_a_switch_from_wal_until_the_slot_is_drained(
    outbox_wal: WalSlot,
) -> None:
    dsn = outbox_wal.dsn
    set_source(outbox_wal, "wal")
    in_slot = enqueue_each(dsn, "k", ["w0", "w1"])
    set_source(outbox_wal, "table")
    newer = enqueue_each(dsn, "k", ["t0"])
    keyless = enqueue_each(dsn, None, ["n0"])
    config = make_config(dsn)
    broker = FakeAdapter(keeps_key_order=True)  # one broker for both sources: one order
    delivered = lambda: [str(o.message_id) for o in broker.delivered]  # noqa: E731
    async with running_relay(config, {"main": broker}):
        # The keyless row goes (no order to keep): the positive signal that the engine claims.
        await wait_until(lambda: delivered() == keyless)
        # The drain: k's messages in the slot go first (here parked behind k's newer row
        # into the gap below the gate, and claimed from there), then the newer row, but
        # only once the slot is drained and dropped.
        async with running_wal_relay(wal_relay(outbox_wal, config, {"main": broker})):
            await wait_until(lambda: len(delivered()) == 3, what="the slot's messages delivered")
        assert delivered() == keyless + in_slot, "k's newer row waits for the slot"
        # The drain ends with the slot: WalSource._drop_now closes the gate with it.
        assert await WalSource(make_config(dsn, wal={"slot": outbox_wal.name}))._drop() is True
        await wait_until(lambda: len(delivered()) == 4, what="k's newer row goes once the slot is drained")
    assert delivered() == keyless + in_slot + newer


async def test_a_relay_restarted_after_a_park_but_before_its_confirm_parks_nothing_twice(
    outbox_wal: WalSlot, monkeypatch: pytest.MonkeyPatch
) -> None:
    dsn = outbox_wal.dsn
    set_source(outbox_wal, "wal")
    failing = enqueue_each(dsn, "k", ["fails", "behind it"])
    ends = commit_end_lsns(outbox_wal)
    config = make_config(dsn, retry={"initial": "1h", "max": "1h"})
    # As if the relay died between the park's commit and the status update: the slot is
    # never told.
    real_confirm = WalStream.confirm
    monkeypatch.setattr(WalStream, "confirm", lambda self, lsn: None)
    async with running_wal_relay(wal_relay(outbox_wal, config, {"main": first_fails(failing[0])})):
        await wait_until(lambda: len(rows_in_id_order(dsn, "k")) == 2, what="both parked")
    assert confirmed_flush(dsn, outbox_wal.name) < ends[0]
    monkeypatch.setattr(WalStream, "confirm", real_confirm)

    again = FakeAdapter(keeps_key_order=True)
    async with running_wal_relay(wal_relay(outbox_wal, config, {"main": again})):
        await wait_until(lambda: confirmed_flush(dsn, outbox_wal.name) >= ends[-1], what="read again and confirmed")
    assert rows_in_id_order(dsn, "k") == failing, "each parked once"
    assert again.delivered == [], "a parked message is the table's: not published from the WAL again"


@pytest.mark.parametrize("first, then", [("wal", "table"), ("table", "wal")])
async def test_a_transaction_that_enqueued_before_a_switch_cannot_enqueue_with_the_old_body_after_it(
    outbox_wal: WalSlot, first: str, then: str
) -> None:
    """The case that reordered a key: T enqueues (caching the old body), the source
    switches, N enqueues k and commits, T enqueues k with the old body and commits. The
    switch now waits for T: refused while T stays open, changing nothing."""
    dsn = outbox_wal.dsn
    if first == "wal":
        set_source(outbox_wal, "wal")
    with psycopg.connect(dsn) as t:
        enqueue(t, "orders.created", {"n": "T, another key"}, key="other")
        with psycopg.connect(dsn) as conn, pytest.raises(SchemaError, match=r"stayed open for 0\.5s"):
            schema_manager.set_source(conn, "outbox", then, slot_name=outbox_wal.name, wait=0.5)
        with psycopg.connect(dsn) as conn:
            assert schema_manager.read_source(conn, "outbox").source == first, "nothing changed"
        t.commit()
    # Once T has ended, the switch goes through at once.
    with psycopg.connect(dsn) as conn:
        assert schema_manager.set_source(conn, "outbox", then, slot_name=outbox_wal.name, wait=5) is True
