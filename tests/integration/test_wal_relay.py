"""The WAL source's relay against a real PostgreSQL (wal_level = logical), with the
engine's FakeAdapter as broker: delivery in commit order, positions confirmed only after
acks, failures parked into the outbox table (and their keys behind them) for the table
engine, broker outages, restarts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from outbox_relay.models import OutgoingMessage, PublishResult
from outbox_relay.observability.metrics import RelayMetrics
from outbox_relay.sources.wal import pgoutput
from outbox_relay.testing import FakeAdapter
from tests.support.configs import make_config
from tests.support.outbox import count
from tests.support.relay import running_relay
from tests.support.waiting import wait_until
from tests.support.wal import WalSlot, confirmed_flush, wal_slot
from tests.support.wal_relay import (
    commit_end_lsns,
    commit_frames,
    commit_frames_in,
    running_wal_relay,
    wal_relay,
)

QUICK_RETRY = {"initial": "50ms", "max": "200ms"}


@pytest.fixture
def outbox_wal(db: str) -> Iterator[WalSlot]:
    """A slot in a database with the outbox schema installed (the table for parking)."""
    with wal_slot(db) as found:
        yield found


def wal_end(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
    assert row is not None
    return pgoutput.parse_lsn(row[0])


def payloads_by_key(delivered: list[OutgoingMessage]) -> dict[str | None, list[bytes]]:
    by_key: dict[str | None, list[bytes]] = {}
    for out in delivered:
        by_key.setdefault(out.message.key, []).append(out.message.payload)
    return by_key


def table_rows(dsn: str) -> list[tuple[Any, ...]]:
    """The outbox table in id order: message id, key, payload, attempts, a retry time
    set, dispatched, dead letter reason, last error."""
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT message_id, key, payload, attempts, next_attempt_at IS NOT NULL, dispatched_at IS NOT NULL, "
            "dead_letter_reason, last_error FROM outbox.messages ORDER BY id"
        ).fetchall()


def fails(*payloads: bytes, answer: PublishResult) -> FakeAdapter:
    """An ordered fake broker that answers `answer` for `payloads` and acks the rest."""
    return FakeAdapter(script=lambda out: answer if out.message.payload in payloads else None, keeps_key_order=True)


async def test_committed_messages_go_out_in_commit_order_and_each_commit_is_confirmed_after_its_acks(
    outbox_wal: WalSlot,
) -> None:
    emitted = commit_frames(outbox_wal.dsn, [(f"k{i % 3}", b"a%d" % i) for i in range(9)])
    emitted += commit_frames(outbox_wal.dsn, [(f"k{i % 3}", b"b%d" % i) for i in range(6)] + [(None, b"b-keyless")])
    end_first, end_second = commit_end_lsns(outbox_wal)
    gate, gated = asyncio.Event(), asyncio.Event()

    class Gated(FakeAdapter):
        async def publish(self, batch: Any) -> Any:
            if any(out.message.payload == b"c-gated" for out in batch):
                gated.set()
                await gate.wait()
            return await super().publish(batch)

    fake = Gated(keeps_key_order=True)
    config = make_config(outbox_wal.dsn)
    async with running_wal_relay(wal_relay(outbox_wal, config, {"main": fake})):
        await wait_until(lambda: len(fake.delivered) == 16, what="the first two transactions delivered")
        await wait_until(lambda: confirmed_flush(outbox_wal.dsn, outbox_wal.name) == end_second)
        # A third transaction, read once the first two are done (a transaction that has
        # already arrived goes in the same dispatch as those before it).
        emitted += commit_frames(outbox_wal.dsn, [("k0", b"c-gated")])
        await wait_until(gated.is_set, what="the third transaction in flight")
        end_third = await asyncio.to_thread(wal_end, outbox_wal.dsn)
        # It is in flight, not acked: its commit is not confirmed.
        assert confirmed_flush(outbox_wal.dsn, outbox_wal.name) == end_second < end_third
        gate.set()
        await wait_until(lambda: confirmed_flush(outbox_wal.dsn, outbox_wal.name) >= end_third)

    assert end_first < end_second < end_third
    expected: dict[str | None, list[tuple[Any, bytes]]] = {}
    for e in emitted:
        expected.setdefault(e.key, []).append((e.message_id, e.payload))
    got: dict[str | None, list[tuple[Any, bytes]]] = {}
    for out in fake.delivered:
        got.setdefault(out.message.key, []).append((out.message_id, out.message.payload))
    assert got == expected
    assert count(outbox_wal.dsn) == 0, "nothing parked"


async def test_a_rolled_back_transaction_delivers_nothing(outbox_wal: WalSlot) -> None:
    commit_frames(outbox_wal.dsn, [("k", b"rolled-back"), (None, b"rolled-back-keyless")], rollback=True)
    commit_frames(outbox_wal.dsn, [("k", b"after")])
    fake = FakeAdapter()
    async with running_wal_relay(wal_relay(outbox_wal, make_config(outbox_wal.dsn), {"main": fake})):
        await wait_until(lambda: len(fake.delivered) == 1)
    assert [out.message.payload for out in fake.delivered] == [b"after"]


async def test_a_failed_message_is_parked_with_its_state_and_its_key_follows_it_into_the_table(
    outbox_wal: WalSlot,
) -> None:
    dsn = outbox_wal.dsn
    items = [("k", b"k0"), ("j", b"j0"), ("k", b"k1-fails"), ("k", b"k2"), ("j", b"j1"), ("k", b"k3")]
    first = commit_frames(dsn, [*items, ("d", b"d0-rejected"), ("d", b"d1")])
    second = commit_frames(dsn, [("k", b"k4"), ("j", b"j2")])
    *_, end_second = commit_end_lsns(outbox_wal)
    answers = {b"k1-fails": PublishResult.transient("broker said no"), b"d0-rejected": PublishResult.permanent("bad")}
    fake = FakeAdapter(script=lambda out: answers.get(out.message.payload), keeps_key_order=True)
    config = make_config(dsn, retry=QUICK_RETRY)  # dead_letter_policy release (the default)
    async with running_wal_relay(wal_relay(outbox_wal, config, {"main": fake})):
        await wait_until(lambda: confirmed_flush(dsn, outbox_wal.name) >= end_second, what="both commits confirmed")

    assert payloads_by_key(fake.delivered) == {"k": [b"k0"], "j": [b"j0", b"j1", b"j2"], "d": [b"d1"]}
    ids = {e.payload: e.message_id for e in first + second}
    rows = table_rows(dsn)
    # In stream order, with their message ids: k1 spent an attempt and waits for its
    # retry; k2, k3 (same transaction, never attempted) and k4 (a later one) wait behind
    # it, untouched; d0 is a dead letter, and under `release` d1 went on directly.
    assert [(r[0], r[1], bytes(r[2]), r[3], r[4], r[5]) for r in rows] == [
        (ids[b"k1-fails"], "k", b"k1-fails", 1, True, False),
        (ids[b"k2"], "k", b"k2", 0, False, False),
        (ids[b"k3"], "k", b"k3", 0, False, False),
        (ids[b"d0-rejected"], "d", b"d0-rejected", 1, False, False),
        (ids[b"k4"], "k", b"k4", 0, False, False),
    ]
    assert rows[0][7] == "broker said no"
    assert rows[3][6] == "bad"

    # The table engine, its broker now taking everything, publishes the parked key in order.
    table_fake = FakeAdapter(keeps_key_order=True)
    async with running_relay(config, {"main": table_fake}):
        await wait_until(lambda: count(dsn, "dispatched_at IS NULL AND dead_lettered_at IS NULL") == 0)
    assert [out.message.payload for out in table_fake.delivered] == [b"k1-fails", b"k2", b"k3", b"k4"]

    # With nothing of k pending in the table any more, k's next message goes out directly.
    commit_frames(dsn, [("k", b"k5")])
    *_, end_third = commit_end_lsns(outbox_wal)
    fake.script = None
    async with running_wal_relay(wal_relay(outbox_wal, config, {"main": fake})):
        await wait_until(lambda: confirmed_flush(dsn, outbox_wal.name) >= end_third)
    assert fake.delivered[-1].message.payload == b"k5"
    assert count(dsn) == 5, "k5 was not parked"


@pytest.mark.parametrize("snapshot_limit", [10_000, 0], ids=["snapshot", "per-part"])
async def test_a_key_held_in_the_table_is_parked_whole_from_the_start(outbox_wal: WalSlot, snapshot_limit: int) -> None:
    # A pending row of key h in the table (parked by an earlier run, or a switch from
    # the table source): h's messages from the WAL go behind it, none around it. Held
    # keys read as a snapshot, or per part once the table holds more than the limit.
    with psycopg.connect(outbox_wal.dsn) as conn:
        conn.execute("INSERT INTO outbox.messages (topic, key, payload) VALUES ('orders.created', 'h', 'h0')")
    commit_frames(outbox_wal.dsn, [("h", b"h1"), ("o", b"o1"), ("h", b"h2")])
    [end] = commit_end_lsns(outbox_wal)
    fake = FakeAdapter(keeps_key_order=True)
    relay = wal_relay(outbox_wal, make_config(outbox_wal.dsn), {"main": fake}, held_keys_snapshot_limit=snapshot_limit)
    async with running_wal_relay(relay):
        await wait_until(lambda: confirmed_flush(outbox_wal.dsn, outbox_wal.name) >= end)
    assert [out.message.payload for out in fake.delivered] == [b"o1"]
    assert [(r[1], bytes(r[2]), r[3]) for r in table_rows(outbox_wal.dsn)] == [
        ("h", b"h0", 0),
        ("h", b"h1", 0),
        ("h", b"h2", 0),
    ]


async def test_under_hold_a_dead_letter_holds_its_key(outbox_wal: WalSlot) -> None:
    commit_frames(outbox_wal.dsn, [("d", b"d0-rejected"), ("d", b"d1")])
    commit_frames(outbox_wal.dsn, [("d", b"d2"), ("e", b"e0")])
    *_, end = commit_end_lsns(outbox_wal)
    fake = fails(b"d0-rejected", answer=PublishResult.permanent("bad"))
    config = make_config(outbox_wal.dsn, dead_letter_policy="hold")
    async with running_wal_relay(wal_relay(outbox_wal, config, {"main": fake})):
        await wait_until(lambda: confirmed_flush(outbox_wal.dsn, outbox_wal.name) >= end)
    assert [out.message.payload for out in fake.delivered] == [b"e0"]
    assert [(bytes(r[2]), r[6]) for r in table_rows(outbox_wal.dsn)] == [
        (b"d0-rejected", "bad"),
        (b"d1", None),
        (b"d2", None),
    ]


async def test_a_broker_outage_pauses_the_stream_and_parks_nothing_before_park_after(outbox_wal: WalSlot) -> None:
    commit_frames(outbox_wal.dsn, [("k", b"k0"), (None, b"n0")])
    commit_frames(outbox_wal.dsn, [("k", b"k1")])
    end_first, end_second = commit_end_lsns(outbox_wal)
    start = confirmed_flush(outbox_wal.dsn, outbox_wal.name)
    down = True
    fake = FakeAdapter(script=lambda out: PublishResult.unavailable("broker away") if down else None)
    await fake.connect()  # its ready() answers the circuit's probes
    config = make_config(outbox_wal.dsn, retry=QUICK_RETRY)
    relay = wal_relay(outbox_wal, config, {"main": fake}, park_after=60.0)
    async with running_wal_relay(relay):
        # Tried again and again (the positive signal), nothing parked, nothing confirmed.
        await wait_until(lambda: len(fake.calls) >= 3, what="the part tried again")
        assert count(outbox_wal.dsn) == 0
        assert confirmed_flush(outbox_wal.dsn, outbox_wal.name) == start < end_first
        down = False
        await wait_until(lambda: confirmed_flush(outbox_wal.dsn, outbox_wal.name) >= end_second)
    # Per key in commit order (the two transactions went in one dispatch once the broker
    # answered: the order between keys is the dispatcher's).
    assert payloads_by_key(fake.delivered) == {"k": [b"k0", b"k1"], None: [b"n0"]}
    assert len(fake.delivered) == 3
    assert count(outbox_wal.dsn) == 0
    assert relay.parked == 0


async def test_an_outage_longer_than_park_after_parks_what_waits_without_spending_attempts(
    outbox_wal: WalSlot,
) -> None:
    commit_frames(outbox_wal.dsn, [("k", b"k0"), (None, b"n0"), ("k", b"k1")])
    commit_frames(outbox_wal.dsn, [("k", b"k2"), ("m", b"m0")])
    *_, end = commit_end_lsns(outbox_wal)
    fake = FakeAdapter(script=lambda out: PublishResult.unavailable("broker away"))
    await fake.connect()
    config = make_config(outbox_wal.dsn, retry=QUICK_RETRY)
    relay = wal_relay(outbox_wal, config, {"main": fake}, park_after=0.5)
    began = time.monotonic()
    async with running_wal_relay(relay):
        await wait_until(lambda: confirmed_flush(outbox_wal.dsn, outbox_wal.name) >= end)
    assert time.monotonic() - began >= 0.5
    assert fake.delivered == []
    # Every message in the table in stream order; none spent an attempt. Those that
    # waited for the broker have a retry time; those parked behind them (k1, k2) are due
    # as soon as their key's head is published.
    assert [(r[1], bytes(r[2]), r[3], r[4], r[5], r[6]) for r in table_rows(outbox_wal.dsn)] == [
        ("k", b"k0", 0, True, False, None),
        (None, b"n0", 0, True, False, None),
        ("k", b"k1", 0, False, False, None),
        ("k", b"k2", 0, False, False, None),
        ("m", b"m0", 0, True, False, None),
    ]


async def test_a_restart_delivers_what_was_not_confirmed_and_not_what_was(outbox_wal: WalSlot) -> None:
    confirmed = commit_frames(outbox_wal.dsn, [(f"k{i}", b"c%d" % i) for i in range(5)])
    [end_first] = commit_end_lsns(outbox_wal)
    in_flight: list[Any] = []
    stuck = asyncio.Event()

    class Stuck(FakeAdapter):
        async def publish(self, batch: Any) -> Any:
            if any(out.message.payload.startswith(b"f") for out in batch):
                stuck.set()
                await asyncio.Event().wait()  # never answers: the relay dies mid-call
            return await super().publish(batch)

    first = Stuck(keeps_key_order=True)
    config = make_config(outbox_wal.dsn)
    async with running_wal_relay(wal_relay(outbox_wal, config, {"main": first})) as task:
        # At or past the first transaction's end: an idle relay also confirms the WAL
        # other databases of the cluster wrote since (the CI's cluster is shared), which
        # is still before the second transaction, committed only now.
        await wait_until(lambda: confirmed_flush(outbox_wal.dsn, outbox_wal.name) >= end_first, timeout=60)
        # Read after the first is done (one that has arrived goes in the same dispatch).
        in_flight += commit_frames(outbox_wal.dsn, [(f"k{i}", b"f%d" % i) for i in range(5)])
        await wait_until(stuck.is_set)
        task.cancel()  # killed in flight: the second transaction is never confirmed
    assert [out.message_id for out in first.delivered] == [e.message_id for e in confirmed]

    second = FakeAdapter(keeps_key_order=True)
    async with running_wal_relay(wal_relay(outbox_wal, config, {"main": second})):
        await wait_until(lambda: len(second.delivered) == 5)
        # Reading on to a later transaction is the signal nothing else comes before it.
        commit_frames(outbox_wal.dsn, [("k0", b"later")])
        await wait_until(lambda: len(second.delivered) == 6)
    assert [out.message_id for out in second.delivered[:5]] == [e.message_id for e in in_flight]
    assert count(outbox_wal.dsn) == 0


async def test_drain_of_100000_messages_timed(outbox_wal: WalSlot) -> None:
    """Information, not a target: 100,000 messages over 100 keys in one transaction,
    to the FakeAdapter (ordered), from start to the commit confirmed."""
    n = 100_000
    commit_frames(outbox_wal.dsn, [(f"key-{i % 100}", b"x" * 256) for i in range(n)])
    [end] = commit_end_lsns(outbox_wal)
    fake = FakeAdapter(keeps_key_order=True)
    relay = wal_relay(outbox_wal, make_config(outbox_wal.dsn), {"main": fake})
    began = time.perf_counter()
    cpu = time.process_time()
    async with running_wal_relay(relay):
        await wait_until(lambda: relay.confirmed_lsn >= end, timeout=120, interval=0.01)
        elapsed = time.perf_counter() - began
        used = time.process_time() - cpu
    assert len(fake.delivered) == n
    assert relay.parked == 0
    print(
        f"\nWAL relay drain: {n} messages in {elapsed:.2f} s = {n / elapsed:,.0f} msg/s; "
        f"{used / n * 1e6:.1f} us of CPU per message (test process); {len(fake.calls)} adapter calls"
    )


async def test_the_relays_observers_count_what_the_wal_source_published_and_dead_lettered(outbox_wal: WalSlot) -> None:
    # The metrics (outbox_relay_messages_published_total, the ack latency, dead letters)
    # and the demo learn of deliveries through the relay's observers: a message published
    # straight from the WAL counts as one the table's workers published.
    commit_frames(outbox_wal.dsn, [("d", b"d0-rejected"), ("d", b"d1"), ("e", b"e0"), (None, b"n0")])
    *_, end = commit_end_lsns(outbox_wal)
    metrics = RelayMetrics()
    fake = fails(b"d0-rejected", answer=PublishResult.permanent("bad"))
    relay = wal_relay(outbox_wal, make_config(outbox_wal.dsn), {"main": fake}, observer=metrics)
    async with running_wal_relay(relay):
        await wait_until(lambda: confirmed_flush(outbox_wal.dsn, outbox_wal.name) >= end)
    assert metrics.published_total() == 3
    assert metrics.registry.get_sample_value("outbox_relay_messages_dead_lettered_total", {"broker": "main"}) == 1
    assert [bytes(r[2]) for r in table_rows(outbox_wal.dsn)] == [b"d0-rejected"]


async def test_small_transactions_that_have_arrived_go_out_in_one_dispatch_and_the_last_commit_is_confirmed(
    outbox_wal: WalSlot,
) -> None:
    # 300 one-message transactions in the slot: a dispatch each would bound the relay by
    # the broker's round trip (about 2,000 transactions a second measured with Kafka).
    emitted = []
    with psycopg.connect(outbox_wal.dsn) as conn:
        for n in range(300):
            emitted.append(commit_frames_in(conn, f"k{n % 5}", b"%d" % n))
    *_, end = commit_end_lsns(outbox_wal)
    fake = FakeAdapter(keeps_key_order=True)
    async with running_wal_relay(wal_relay(outbox_wal, make_config(outbox_wal.dsn), {"main": fake})):
        await wait_until(lambda: confirmed_flush(outbox_wal.dsn, outbox_wal.name) >= end, what="the last commit")
    assert [out.message.payload for out in fake.delivered if out.message.key == "k0"] == [
        b"%d" % n for n in range(0, 300, 5)
    ]
    assert len(fake.delivered) == 300
    assert len(fake.calls) <= 30, f"{len(fake.calls)} dispatches for 300 transactions"


async def test_a_relay_killed_inside_a_large_transaction_sends_again_only_the_batch_in_flight(
    outbox_wal: WalSlot,
) -> None:
    # 5,000 messages in one transaction: batches of 1,000 (the part's bound). The slot is
    # told only at the commit, so a SIGKILL after two batches would send all 5,000 again
    # but for done_through, which each batch that ends inside a transaction records.
    emitted = commit_frames(outbox_wal.dsn, [(f"k{i % 7}", b"%d" % i) for i in range(5000)])
    stuck = asyncio.Event()

    class StuckThird(FakeAdapter):
        async def publish(self, batch: Any) -> Any:
            if len(self.calls) >= 2:
                stuck.set()
                await asyncio.Event().wait()  # never answers: killed in flight
            return await super().publish(batch)

    first = StuckThird(keeps_key_order=True)
    config = make_config(outbox_wal.dsn)
    async with running_wal_relay(wal_relay(outbox_wal, config, {"main": first})) as task:
        await wait_until(stuck.is_set)
        task.cancel()
    acked = len(first.delivered)
    assert acked >= 1000

    second = FakeAdapter(keeps_key_order=True)
    async with running_wal_relay(wal_relay(outbox_wal, config, {"main": second})):
        commit_frames(outbox_wal.dsn, [("k0", b"later")])  # read on: nothing else comes before it
        await wait_until(lambda: any(o.message.payload == b"later" for o in second.delivered))
    again = [o.message_id for o in second.delivered if o.message.payload != b"later"]
    skipped = len(emitted) - len(again)
    assert again == [e.message_id for e in emitted[skipped:]], "the rest of the transaction, in order"
    # What comes again is at most the batch in flight (a batch: at most 1,000 messages).
    assert skipped >= acked - 1000 and skipped >= 1000, (acked, skipped)


async def test_after_a_long_outage_that_parked_everything_the_next_one_pauses_before_it_parks(
    outbox_wal: WalSlot,
) -> None:
    # The first outage outlasts park_after: a is parked. Nothing is dispatched after it
    # (no message comes), so no round without a WAIT stops its clock. A later message of
    # another key meets the broker still away: a new outage, paused first, tried again.
    commit_frames(outbox_wal.dsn, [("a", b"a0")])
    tries: list[bytes] = []

    def away(out: Any) -> PublishResult:
        tries.append(out.message.payload)
        return PublishResult.unavailable("broker away")

    fake = FakeAdapter(script=away)
    await fake.connect()
    config = make_config(outbox_wal.dsn, retry=QUICK_RETRY)
    relay = wal_relay(outbox_wal, config, {"main": fake}, park_after=0.5)
    async with running_wal_relay(relay):
        await wait_until(lambda: count(outbox_wal.dsn) == 1, what="a parked after park_after")
        await asyncio.sleep(0.6)  # a gap longer than park_after with nothing to dispatch: the condition itself
        commit_frames(outbox_wal.dsn, [("b", b"b0")])
        await wait_until(lambda: count(outbox_wal.dsn) == 2, what="b parked")
    assert tries.count(b"b0") >= 2, "b was parked at its first WAIT: the old outage's clock was still running"
