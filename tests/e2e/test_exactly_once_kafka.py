"""Exactly once into a real Kafka broker from the WAL source (sources/wal/exactly_once.py,
adapters/kafka_transactions.py): each batch one Kafka transaction with its position in
the offsets topic, read back with read_committed by the next relay."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from outbox_relay.adapter import transactions_of
from outbox_relay.assembly import build_adapters
from outbox_relay.sources.wal.stream import WalStream
from tests.consumers import kafka_create_topic, kafka_read_to_end
from tests.support.configs import make_config
from tests.support.outbox import count, dead_letters, pending
from tests.support.waiting import wait_until
from tests.support.wal import WalSlot, confirmed_flush, wal_slot
from tests.support.wal_relay import commit_end_lsns, commit_frames, running_wal_relay, wal_relay

CLIENTS = ["aiokafka", "librdkafka"]


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


@pytest.mark.parametrize("policy", ["release", "hold"])
async def test_a_message_the_broker_refuses_is_parked_and_the_transaction_goes_on_without_it(
    outbox_wal: WalSlot, kafka_bootstrap: str, policy: str
) -> None:
    """A record over max_request_size fails inside the transaction: the transaction is
    aborted, the message parked as a dead letter (with its key's later messages under
    hold), and the rest committed in a new transaction, each once, in key order."""
    topic = f"eos-{uuid.uuid4().hex[:10]}"
    await kafka_create_topic(kafka_bootstrap, topic, partitions=3)
    before = commit_frames(outbox_wal.dsn, [(f"key-{i % 3}", b"before-%d" % i) for i in range(9)])
    large = commit_frames(outbox_wal.dsn, [("key-0", b"x" * 200_000)])
    after = commit_frames(outbox_wal.dsn, [(f"key-{i % 3}", b"after-%d" % i) for i in range(9)])
    *_, end = commit_end_lsns(outbox_wal)
    config = _config(outbox_wal, kafka_bootstrap, topic, "aiokafka", max_request_size=100_000)
    config = config.model_copy(
        update={"relay": config.relay.model_copy(update={"dead_letter_policy": policy, "max_attempts": 3})}
    )
    adapters = build_adapters(config)
    relay = wal_relay(outbox_wal, config, adapters, exactly_once=_exactly_once(adapters))
    async with running_wal_relay(relay):
        await wait_until(lambda: confirmed_flush(outbox_wal.dsn, outbox_wal.name) >= end, timeout=60)

    received = await kafka_read_to_end(kafka_bootstrap, topic, isolation_level="read_committed")
    held_after = [e for e in after if e.key == "key-0"] if policy == "hold" else []
    expected = [e for e in before + after if e not in held_after]
    assert sorted(r.message_id for r in received) == sorted(str(e.message_id) for e in expected), "each once"
    for key in ("key-0", "key-1", "key-2"):
        assert [r.payload for r in received if r.key == key] == [e.payload for e in expected if e.key == key]
    assert [row[0] for row in dead_letters(outbox_wal.dsn)] == [str(large[0].message_id)]
    assert count(outbox_wal.dsn) == 1 + len(held_after), "the refused message (and under hold its key's later ones)"


class _Crash(BaseException):
    """The relay dies here (not an Exception: nothing in the relay catches it)."""


async def test_a_crash_between_the_park_and_the_kafka_commit_parks_once_and_publishes_once(
    outbox_wal: WalSlot, kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A park commits before its Kafka transaction: the first relay parks the refused
    message and dies before committing the rest to Kafka. The second finds the park in
    the table (skips it: one dead letter, not two) and publishes the rest, which Kafka
    has no committed copy of (read_committed: each once)."""
    from outbox_relay_adapters.kafka_transactions import KafkaTransactions

    topic = f"eos-{uuid.uuid4().hex[:10]}"
    await kafka_create_topic(kafka_bootstrap, topic, partitions=3)
    before = commit_frames(outbox_wal.dsn, [(f"key-{i % 3}", b"before-%d" % i) for i in range(9)])
    large = commit_frames(outbox_wal.dsn, [("key-0", b"x" * 200_000)])
    after = commit_frames(outbox_wal.dsn, [(f"key-{i % 3}", b"after-%d" % i) for i in range(9)])
    *_, end = commit_end_lsns(outbox_wal)
    config = _config(outbox_wal, kafka_bootstrap, topic, "aiokafka", max_request_size=100_000)
    adapters = build_adapters(config)

    first = wal_relay(outbox_wal, config, adapters, exactly_once=_exactly_once(adapters))
    commit = KafkaTransactions.commit

    async def crash(self: Any, key: str, position: bytes) -> None:
        if first.parked:  # the batch of the refused message: parked, not yet committed
            raise _Crash()
        await commit(self, key, position)

    with monkeypatch.context() as patch, pytest.raises(_Crash):
        patch.setattr(KafkaTransactions, "commit", crash)
        async with running_wal_relay(first) as task:
            await task
    assert first.parked == 1 and len(dead_letters(outbox_wal.dsn)) == 1, "parked before the commit"

    second = wal_relay(outbox_wal, config, adapters, exactly_once=_exactly_once(adapters))
    async with running_wal_relay(second):
        await wait_until(lambda: confirmed_flush(outbox_wal.dsn, outbox_wal.name) >= end, timeout=60)
    assert second.parked == 0

    received = await kafka_read_to_end(kafka_bootstrap, topic, isolation_level="read_committed")
    expected = before + after
    assert sorted(r.message_id for r in received) == sorted(str(e.message_id) for e in expected), "each once"
    for key in ("key-0", "key-1", "key-2"):
        assert [r.payload for r in received if r.key == key] == [e.payload for e in expected if e.key == key]
    assert [row[0] for row in dead_letters(outbox_wal.dsn)] == [str(large[0].message_id)]
    uncommitted = await kafka_read_to_end(kafka_bootstrap, topic, isolation_level="read_uncommitted")
    assert len(uncommitted) > len(received), "the first relay's records are there, aborted"


async def test_the_inbox_and_the_trace_headers_work_on_a_transactional_topic(db: str, kafka_bootstrap: str) -> None:
    """The whole way in one process: `enqueue` in WAL mode (the CLI switched it), the
    relay with its WAL source and an exactly-once broker, a read_committed aiokafka
    consumer, and the inbox on its real records: each message handled once, its trace
    headers as enqueued, its message id the outbox's."""
    from aiokafka import AIOKafkaConsumer

    from outbox_relay import enqueue, inbox
    from outbox_relay.sources.wal.runner import WalSource
    from tests.support.relay import running_relay
    from tests.support.wal import outbox_in_wal_mode

    topic = f"eos-{uuid.uuid4().hex[:10]}"
    await kafka_create_topic(kafka_bootstrap, topic, partitions=2)
    trace_headers = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "tracestate": "shop=1"}
    with outbox_in_wal_mode(db) as slot_name:
        with psycopg.connect(db) as conn:
            ids = [
                enqueue(conn, "orders.created", {"n": i}, key=f"order-{i % 2}", headers=trace_headers) for i in range(4)
            ]
            conn.commit()
        config = make_config(
            db,
            brokers={
                "events": {
                    "type": "kafka",
                    "bootstrap_servers": kafka_bootstrap,
                    "exactly_once": True,
                    "offsets_topic": f"offsets-{topic}",
                }
            },
            routes=[{"topic": "orders.*", "broker": "events", "destination": topic}],
            wal={"slot": slot_name},
        )
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=kafka_bootstrap,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            group_id=None,
        )
        records: list[Any] = []
        async with running_relay(config, build_adapters(config), sources=[WalSource(config)]) as relay:
            await consumer.start()
            try:

                async def read() -> bool:
                    for batch in (await consumer.getmany(timeout_ms=500)).values():
                        records.extend(batch)
                    return len(records) >= len(ids)

                await wait_until(read, timeout=60, what="every message read_committed")
            finally:
                await consumer.stop()
            committed = relay.metrics.registry.get_sample_value(
                "outbox_relay_kafka_transactions_total", {"outcome": "committed"}
            )
            assert committed is not None and committed >= 1, "the transactions metric counts commits"

    assert sorted(str(inbox.message_id_of(r)) for r in records) == sorted(str(i) for i in ids)
    for record in records:
        headers = {k: v.decode() for k, v in record.headers}
        assert {k: headers[k] for k in trace_headers} == trace_headers
    handled: list[str] = []
    with psycopg.connect(db) as conn:
        inbox.install(conn)
        for record in [*records, *records]:  # each delivered twice: handled once
            inbox.process_message(conn, record, lambda c, r=record: handled.append(str(inbox.message_id_of(r))))
    assert sorted(handled) == sorted(str(i) for i in ids)


@pytest.mark.parametrize("committed", [True, False], ids=["committed", "not-committed"])
async def test_a_commit_without_an_answer_is_settled_by_the_position_read_back(
    outbox_wal: WalSlot, kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch, committed: bool
) -> None:
    """The first commit's answer is lost (the fault injected: TransactionFailed after the
    real commit, or instead of it). The relay starts a new producer and reads the
    position back: committed, the batch is done (not sent again); not committed, it goes
    again. Either way read_committed sees each message once."""
    from outbox_relay_adapters.kafka_transactions import KafkaTransactions

    from outbox_relay.adapter import TransactionFailed

    topic = f"eos-{uuid.uuid4().hex[:10]}"
    await kafka_create_topic(kafka_bootstrap, topic, partitions=3)
    emitted = commit_frames(outbox_wal.dsn, [(f"key-{i % 4}", b"%d" % i) for i in range(40)])
    *_, end = commit_end_lsns(outbox_wal)
    config = _config(outbox_wal, kafka_bootstrap, topic, "aiokafka")
    adapters = build_adapters(config)
    commit = KafkaTransactions.commit
    lost: list[bytes] = []

    async def answer_lost(self: Any, key: str, position: bytes) -> None:
        if lost:
            await commit(self, key, position)
            return
        lost.append(position)
        if committed:
            await commit(self, key, position)
        raise TransactionFailed("commit failed: KafkaConnectionError: the answer was lost")

    monkeypatch.setattr(KafkaTransactions, "commit", answer_lost)
    relay = wal_relay(outbox_wal, config, adapters, exactly_once=_exactly_once(adapters))
    async with running_wal_relay(relay):
        await wait_until(lambda: confirmed_flush(outbox_wal.dsn, outbox_wal.name) >= end, timeout=60)
    assert lost, "the fault was injected"

    received = await kafka_read_to_end(kafka_bootstrap, topic, isolation_level="read_committed")
    assert sorted(r.message_id for r in received) == sorted(str(e.message_id) for e in emitted), "each once"
    for key in {e.key for e in emitted}:
        assert [r.payload for r in received if r.key == key] == [e.payload for e in emitted if e.key == key]


def _committed_transactions(relay: Any, n: int) -> bool:
    return relay._exactly_once is not None and relay._exactly_once.transactions >= n


async def _foreign_open_transaction(bootstrap: str, offsets_topic: str) -> Any:
    """Another relay sharing the offsets topic (another slot), its position written and
    its commit not done yet (frozen, its answer lost, killed): its transaction open."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        transactional_id=f"outbox-relay-other-{uuid.uuid4().hex[:8]}",
        enable_idempotence=True,
        transaction_timeout_ms=300_000,
    )
    await producer.start()
    await producer.begin_transaction()
    await (await producer.send(offsets_topic, b'{"commit_lsn":"0/1","lsn":"0/1"}', key=b"other/slot", partition=0))
    return producer


async def _end_later(producer: Any, seconds: float) -> None:
    await asyncio.sleep(seconds)
    await producer.abort_transaction()
    await producer.stop()


@pytest.mark.parametrize("policy", ["release", "hold"])
async def test_a_restart_that_first_skips_a_committed_batch_still_finds_the_park(
    outbox_wal: WalSlot, kafka_bootstrap: str, policy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by review: batch 1 is committed to Kafka (the slot not told), batch 2 parks
    its refused message and dies before its Kafka commit. The restart's first batch is
    batch 1, all skipped; it must not end the park's window, or batch 2's refused message
    (and under hold its key's later ones) is parked a second time."""
    from outbox_relay_adapters.kafka_transactions import KafkaTransactions

    topic = f"eos-{uuid.uuid4().hex[:10]}"
    await kafka_create_topic(kafka_bootstrap, topic, partitions=3)
    config = _config(outbox_wal, kafka_bootstrap, topic, "aiokafka", max_request_size=100_000)
    config = config.model_copy(update={"relay": config.relay.model_copy(update={"dead_letter_policy": policy})})
    adapters = build_adapters(config)
    first = wal_relay(outbox_wal, config, adapters, exactly_once=_exactly_once(adapters), max_part_messages=9)
    commit = KafkaTransactions.commit

    async def crash(self: Any, key: str, position: bytes) -> None:
        if first.parked:
            raise _Crash()
        await commit(self, key, position)

    before = commit_frames(outbox_wal.dsn, [(f"key-{i % 3}", b"before-%d" % i) for i in range(9)])
    with monkeypatch.context() as patch, pytest.raises(_Crash):
        patch.setattr(KafkaTransactions, "commit", crash)
        patch.setattr(WalStream, "confirm", lambda self, lsn: None)  # killed before the slot is told
        async with running_wal_relay(first) as task:
            await wait_until(lambda: _committed_transactions(first, 1), timeout=60)
            large = commit_frames(outbox_wal.dsn, [("key-0", b"x" * 200_000)])
            after = commit_frames(outbox_wal.dsn, [(f"key-{i % 3}", b"after-%d" % i) for i in range(9)])
            await task
    *_, end = commit_end_lsns(outbox_wal)

    second = wal_relay(outbox_wal, config, adapters, exactly_once=_exactly_once(adapters), max_part_messages=9)
    async with running_wal_relay(second):
        await wait_until(lambda: confirmed_flush(outbox_wal.dsn, outbox_wal.name) >= end, timeout=60)
    held = {e.message_id for e in after if e.key == "key-0"} if policy == "hold" else set()
    # Under hold, key-0's later messages go behind the dead letter (parked by the first
    # relay when they came in its last batch, else by the second); nothing twice.
    assert first.parked + second.parked == 1 + len(held) == count(outbox_wal.dsn), "parked a second time"
    assert [r[0] for r in dead_letters(outbox_wal.dsn)] == [str(large[0].message_id)]
    received = await kafka_read_to_end(kafka_bootstrap, topic, isolation_level="read_committed")
    expected = [e for e in before + after if e.message_id not in held]
    assert sorted(r.message_id for r in received) == sorted(str(e.message_id) for e in expected), "each once"


@pytest.mark.parametrize("when", ["at-start", "after-an-abort"])
async def test_another_relays_open_transaction_on_the_offsets_topic_hides_no_position(
    outbox_wal: WalSlot, kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """Found by review: read_committed stops at the first open transaction of the shared
    offsets topic, so this relay's positions written after another relay's open
    transaction were invisible: a restarted relay sent committed messages again
    (at-start), and a relay restarting its producer after a refused record took the
    stale position for another relay's and stopped (after-an-abort). The position is now
    read once every transaction before the end is decided (the other one ends after 3 s)."""
    topic = f"eos-{uuid.uuid4().hex[:10]}"
    offsets = f"offsets-{topic}"
    await kafka_create_topic(kafka_bootstrap, topic, partitions=3)
    config = _config(outbox_wal, kafka_bootstrap, topic, "aiokafka", max_request_size=100_000)
    adapters = build_adapters(config)
    first = wal_relay(outbox_wal, config, adapters, exactly_once=_exactly_once(adapters))
    t0 = commit_frames(outbox_wal.dsn, [(f"key-{i % 3}", b"t0-%d" % i) for i in range(3)])
    with monkeypatch.context() as patch:
        patch.setattr(WalStream, "confirm", lambda self, lsn: None)  # a SIGKILL before the status update
        async with running_wal_relay(first) as task:
            await wait_until(lambda: _committed_transactions(first, 1), timeout=60)
            foreign = await _foreign_open_transaction(kafka_bootstrap, offsets)
            t1 = commit_frames(outbox_wal.dsn, [(f"key-{i % 3}", b"t1-%d" % i) for i in range(5)])
            await wait_until(lambda: _committed_transactions(first, 2), timeout=60)  # its position hidden
            if when == "after-an-abort":
                ending = asyncio.create_task(_end_later(foreign, 3.0))
                commit_frames(outbox_wal.dsn, [("key-9", b"x" * 200_000)])  # refused: an abort, a restart
                t2 = commit_frames(outbox_wal.dsn, [("key-1", b"t2")])
                await wait_until(lambda: first.published == len(t0 + t1 + t2) or task.done(), timeout=60)
                assert not task.done(), f"the only relay of its slot stopped: {task.exception()!r}"
                await ending
                return
    *_, end = commit_end_lsns(outbox_wal)
    ending = asyncio.create_task(_end_later(foreign, 3.0))
    second = wal_relay(outbox_wal, config, adapters, exactly_once=_exactly_once(adapters))
    async with running_wal_relay(second):
        await wait_until(lambda: confirmed_flush(outbox_wal.dsn, outbox_wal.name) >= end, timeout=60)
    await ending
    assert second.published == 0, "everything was committed before the restart"
    received = await kafka_read_to_end(kafka_bootstrap, topic, isolation_level="read_committed")
    assert sorted(r.message_id for r in received) == sorted(str(e.message_id) for e in t0 + t1), "each once"


async def test_an_offsets_topic_unreadable_for_a_moment_is_read_again(
    outbox_wal: WalSlot, kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by review (fault injected): reading the position back failed once, right
    after a new producer started (the broker away again, the partition's leader moving):
    the relay process ended. It is retried with the backoff now."""
    from aiokafka.errors import KafkaConnectionError
    from outbox_relay_adapters.kafka_transactions import KafkaTransactions

    topic = f"eos-{uuid.uuid4().hex[:10]}"
    await kafka_create_topic(kafka_bootstrap, topic, partitions=3)
    config = _config(outbox_wal, kafka_bootstrap, topic, "aiokafka", max_request_size=100_000)
    adapters = build_adapters(config)
    relay = wal_relay(outbox_wal, config, adapters, exactly_once=_exactly_once(adapters))
    position = KafkaTransactions.position
    calls: list[str] = []

    async def flaky(self: Any, key: str) -> Any:
        calls.append(key)
        if len(calls) == 2:
            raise KafkaConnectionError("Unable to bootstrap from [('kafka-1', 9092)]")
        return await position(self, key)

    monkeypatch.setattr(KafkaTransactions, "position", flaky)
    async with running_wal_relay(relay) as task:
        commit_frames(outbox_wal.dsn, [("key-0", b"x" * 200_000)])  # refused: an abort, a restart
        after = commit_frames(outbox_wal.dsn, [("key-1", b"after")])
        await wait_until(lambda: relay.published == 1 or task.done(), timeout=60)
        assert not task.done(), task.exception() if task.done() else None
    assert len(calls) >= 3, "the failed read was tried again"
    received = await kafka_read_to_end(kafka_bootstrap, topic, isolation_level="read_committed")
    assert [r.message_id for r in received] == [str(after[0].message_id)]


async def test_an_outage_of_a_broker_without_transactions_does_not_stop_the_kafka_stream(
    outbox_wal: WalSlot, kafka_bootstrap: str
) -> None:
    """Found by review: a route to a RabbitMQ that cannot be reached held every batch
    (each try a new producer and a position read) for as long as the outage lasted. Its
    messages are parked at once (the table retries them, at least once, as that broker
    always is) and Kafka's go on."""
    topic = f"eos-{uuid.uuid4().hex[:10]}"
    await kafka_create_topic(kafka_bootstrap, topic, partitions=1)
    config = make_config(
        outbox_wal.dsn,
        brokers={
            "events": {
                "type": "kafka",
                "bootstrap_servers": kafka_bootstrap,
                "exactly_once": True,
                "offsets_topic": f"offsets-{topic}",
            },
            "mq": {"type": "rabbitmq", "url": "amqp://guest:guest@127.0.0.1:9/%2F", "exchange": "x"},
        },
        routes=[{"topic": "orders.*", "broker": "events", "destination": topic}, {"topic": "emails.*", "broker": "mq"}],
    )
    adapters = build_adapters(config)
    relay = wal_relay(outbox_wal, config, adapters, exactly_once=_exactly_once(adapters))
    mail = commit_frames(outbox_wal.dsn, [("e-1", b"mail")], topic="emails.sent")
    orders = commit_frames(outbox_wal.dsn, [("o-1", b"order")], topic="orders.created")
    *_, end = commit_end_lsns(outbox_wal)
    async with running_wal_relay(relay):
        await wait_until(lambda: confirmed_flush(outbox_wal.dsn, outbox_wal.name) >= end, timeout=60)
    received = await kafka_read_to_end(kafka_bootstrap, topic, isolation_level="read_committed")
    assert [r.message_id for r in received] == [str(orders[0].message_id)]
    assert relay.parked == 1 and pending(outbox_wal.dsn) == 1, "the mail waits in the table for RabbitMQ"
    with psycopg.connect(outbox_wal.dsn) as conn:
        row = conn.execute("SELECT message_id FROM outbox.messages").fetchone()
    assert row is not None and row[0] == mail[0].message_id


async def test_a_park_by_a_relay_whose_walsender_lost_the_slot_is_refused(outbox_wal: WalSlot) -> None:
    """Found by review: a relay frozen between its transaction and its park, while another
    relay took the slot and parked the same batch, parked it again on waking (its Kafka
    commit would be fenced, its PostgreSQL write was not). An exactly-once park checks,
    inside its transaction, that the slot is still streamed by this relay's walsender:
    here by a stream's own, then by a pid that is not the slot's."""
    import datetime

    from outbox_relay.adapter import Fenced
    from outbox_relay.models import Message, Record, RecordKind
    from outbox_relay.sources.wal import framing
    from outbox_relay.sources.wal.parking import Parking

    def message(n: int) -> Message:
        return Message(
            n,
            uuid.uuid4(),
            "orders.created",
            "k",
            b"x",
            "application/octet-stream",
            {},
            0,
            datetime.datetime.now(datetime.UTC),
        )

    dead = Record(0, RecordKind.DEAD, "refused")
    stream = WalStream(
        outbox_wal.dsn, slot_name=outbox_wal.name, publication=outbox_wal.name, prefix=framing.PREFIX_FOR("outbox")
    )
    async with Parking(outbox_wal.dsn, "outbox", hold_dead_letters=False) as parking, stream:
        await parking.park([(message(1), dead)], through=(1, 1), streamer=(outbox_wal.name, stream.walsender_pid))
        assert count(outbox_wal.dsn) == 1, "parked while this stream holds the slot"
        with pytest.raises(Fenced, match="streamed by another walsender"):
            await parking.park(
                [(message(2), dead)], through=(2, 2), streamer=(outbox_wal.name, stream.walsender_pid + 1)
            )
    assert count(outbox_wal.dsn) == 1, "nothing parked by a relay that lost the slot"
