"""Both Kafka clients' transactional producers against the real broker
(adapters/kafka_transactions.py for aiokafka, adapters/kafka_librdkafka_transactions.py
for librdkafka): what exactly once relies on, shown with independent consumers."""

from __future__ import annotations

import asyncio
import gc
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from outbox_relay import adapter as registry
from outbox_relay.adapter import Fenced, PositionsTopicError, Transactions, transactions_of
from outbox_relay.models import Outcome, OutgoingMessage
from tests.consumers import kafka_create_topic, kafka_read_to_end
from tests.support.factories import outgoing

CLIENTS = ["aiokafka", "librdkafka"]
KEY = "system/slot"


def _transactions(
    bootstrap: str, client: str, offsets_topic: str, transactional_id: str, **options: Any
) -> Transactions:
    adapter = registry.create(
        "kafka",
        "events",
        {
            "bootstrap_servers": bootstrap,
            "client": client,
            "exactly_once": True,
            "offsets_topic": offsets_topic,
            **options,
        },
    )
    factory = transactions_of(adapter)
    assert factory is not None, f"{client}: no transactions"
    return factory(transactional_id)


@asynccontextmanager
async def _started(bootstrap: str, client: str, offsets_topic: str, transactional_id: str) -> AsyncIterator[Any]:
    transactions = _transactions(bootstrap, client, offsets_topic, transactional_id)
    await transactions.start()
    try:
        yield transactions
    finally:
        await transactions.close()


def _batch(topic: str, name: str, count: int = 6) -> list[OutgoingMessage]:
    return [outgoing(i, b"%s-%d" % (name.encode(), i), destination=topic, key=f"k{i % 3}") for i in range(count)]


async def _publish(transactions: Transactions, batch: Sequence[OutgoingMessage]) -> None:
    results = await transactions.publish(batch)
    assert [r.outcome for r in results] == [Outcome.ACKED] * len(batch), [r.reason for r in results]


def _ids(batch: Sequence[OutgoingMessage]) -> list[str]:
    return sorted(str(out.message_id) for out in batch)


@pytest.fixture
def names() -> tuple[str, str, str]:
    """A topic, an offsets topic and a transactional id of the test's own."""
    tag = uuid.uuid4().hex[:10]
    return f"eos-{tag}", f"offsets-{tag}", f"outbox-relay-test-{tag}"


@pytest.mark.parametrize("client", CLIENTS)
async def test_aborted_records_are_seen_by_read_uncommitted_consumers_only(
    kafka_bootstrap: str, client: str, names: tuple[str, str, str]
) -> None:
    topic, offsets, transactional_id = names
    await kafka_create_topic(kafka_bootstrap, topic, partitions=3)
    aborted, committed = _batch(topic, "aborted"), _batch(topic, "committed")
    async with _started(kafka_bootstrap, client, offsets, transactional_id) as transactions:
        await transactions.begin()
        await _publish(transactions, aborted)
        await transactions.abort()
        await transactions.start()
        await transactions.begin()
        await _publish(transactions, committed)
        await transactions.commit(KEY, b"1")

    read_committed = await kafka_read_to_end(kafka_bootstrap, topic, isolation_level="read_committed")
    assert sorted(r.message_id for r in read_committed) == _ids(committed)
    read_uncommitted = await kafka_read_to_end(kafka_bootstrap, topic, isolation_level="read_uncommitted")
    assert sorted(r.message_id for r in read_uncommitted) == sorted(_ids(aborted) + _ids(committed))


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_newer_producer_with_the_same_id_fences_the_older_one(
    kafka_bootstrap: str, client: str, names: tuple[str, str, str], caplog: pytest.LogCaptureFixture
) -> None:
    topic, offsets, transactional_id = names
    await kafka_create_topic(kafka_bootstrap, topic, partitions=3)
    first, second = _batch(topic, "first"), _batch(topic, "second")
    async with _started(kafka_bootstrap, client, offsets, transactional_id) as older:
        await older.begin()
        await _publish(older, first)
        async with _started(kafka_bootstrap, client, offsets, transactional_id) as newer:
            with pytest.raises(Fenced):
                await older.commit(KEY, b"older")
            assert older.fenced
            assert not newer.fenced
            await newer.begin()
            await _publish(newer, second)
            await newer.commit(KEY, b"newer")
            assert await newer.position(KEY) == b"newer"

    read_committed = await kafka_read_to_end(kafka_bootstrap, topic, isolation_level="read_committed")
    assert sorted(r.message_id for r in read_committed) == _ids(second)
    # The fenced producer left no error unread (asyncio logs each when collected).
    gc.collect()
    assert not [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()]


@pytest.mark.parametrize("client", CLIENTS)
async def test_a_fenced_producer_says_so_when_it_publishes(
    kafka_bootstrap: str, client: str, names: tuple[str, str, str]
) -> None:
    """The relay checks `fenced` after each dispatch: a publish refused because a newer
    producer took the id over sets it, and acks nothing."""
    topic, offsets, transactional_id = names
    await kafka_create_topic(kafka_bootstrap, topic, partitions=3)
    async with _started(kafka_bootstrap, client, offsets, transactional_id) as older:
        await older.begin()
        await _publish(older, _batch(topic, "before"))
        async with _started(kafka_bootstrap, client, offsets, transactional_id):
            results = await older.publish(_batch(topic, "after"))
            assert Outcome.ACKED not in {r.outcome for r in results}
            assert older.fenced

    assert await kafka_read_to_end(kafka_bootstrap, topic, isolation_level="read_committed") == []


async def _write_aborted(bootstrap: str, topic: str, key: str, value: bytes) -> None:
    """A position record of another producer's transaction, aborted."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"aborting-{uuid.uuid4().hex}")
    await producer.start()
    try:
        await producer.begin_transaction()
        await (await producer.send(topic, value, key=key.encode(), partition=0))
        await producer.abort_transaction()
    finally:
        await producer.stop()


async def _write_other_keys(bootstrap: str, topic: str, count: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True)
    await producer.start()
    try:
        sent = [await producer.send(topic, b"other", key=b"other/%d" % i, partition=0) for i in range(count)]
        for delivery in sent:
            await delivery
    finally:
        await producer.stop()


@pytest.mark.parametrize("client", CLIENTS)
async def test_position_is_the_last_committed_value_of_its_key(
    kafka_bootstrap: str, client: str, names: tuple[str, str, str]
) -> None:
    _topic, offsets, transactional_id = names
    async with _started(kafka_bootstrap, client, offsets, transactional_id) as transactions:
        assert await transactions.position(KEY) is None, "nothing written yet"
        for value in (b"1", b"2"):
            await transactions.begin()
            await transactions.commit(KEY, value)
        await transactions.begin()
        await transactions.commit("another/slot", b"9")
        assert await transactions.position(KEY) == b"2"
        assert await transactions.position("unknown/slot") is None

        await _write_aborted(kafka_bootstrap, offsets, KEY, b"3")
        records = await kafka_read_to_end(kafka_bootstrap, offsets, isolation_level="read_uncommitted")
        assert [r.payload for r in records if r.key == KEY] == [b"1", b"2", b"3"], "the aborted one is there"
        assert await transactions.position(KEY) == b"2", "an aborted position does not count"

        # Past the first window read back from the end (_offsets.READ_WINDOW = 1000).
        await _write_other_keys(kafka_bootstrap, offsets, 2500)
        assert await transactions.position(KEY) == b"2"
        assert await transactions.position("another/slot") == b"9"


@pytest.mark.parametrize("client", CLIENTS)
async def test_position_reads_past_a_tail_of_aborted_records_at_once(
    kafka_bootstrap: str, client: str, names: tuple[str, str, str]
) -> None:
    """A window of the offsets topic that holds only an aborted transaction (a relay
    killed in its first commit, or any transaction aborted after its offsets partition
    joined it): read_committed, a fetch there returns no record while the position moves
    past it. aiokafka's getmany, asked with the request timeout, waited for that whole
    timeout before position() went on, and a restarting relay with it."""
    _topic, offsets, transactional_id = names
    transactions = _transactions(kafka_bootstrap, client, offsets, transactional_id, request_timeout="120s")
    await transactions.start()
    try:
        await _write_aborted(kafka_bootstrap, offsets, KEY, b"1")
        # Well under the 120 s a stalled read takes, well over what a read takes here.
        assert await asyncio.wait_for(transactions.position(KEY), timeout=30) is None
        await transactions.begin()
        await transactions.commit(KEY, b"2")
        await _write_aborted(kafka_bootstrap, offsets, KEY, b"3")
        assert await asyncio.wait_for(transactions.position(KEY), timeout=30) == b"2"
    finally:
        await transactions.close()


@asynccontextmanager
async def _foreign_transaction(bootstrap: str, topic: str) -> AsyncIterator[Any]:
    """Another producer's transaction (another relay's, of another slot sharing the
    offsets topic, or a client that died in it), open with a record on the offsets
    partition: read_committed, nothing after that record is visible until it ends."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, transactional_id=f"foreign-{uuid.uuid4().hex}", transaction_timeout_ms=600_000
    )
    await producer.start()
    try:
        await producer.begin_transaction()
        await (await producer.send(topic, b"foreign", key=b"another/slot", partition=0))
        yield producer
    finally:
        if producer._txn_manager.is_in_transaction():
            await producer.abort_transaction()
        await producer.stop()


async def _abort_later(producer: Any, delay: float) -> None:
    await asyncio.sleep(delay)
    await producer.abort_transaction()


@pytest.mark.parametrize("client", CLIENTS)
async def test_position_waits_for_another_transaction_open_on_the_offsets_topic(
    kafka_bootstrap: str, client: str, names: tuple[str, str, str]
) -> None:
    """A position committed after another producer's transaction began on the offsets
    partition is behind its last stable offset: read_committed up to there, a restart
    found the one before and published the messages in between again (found by review;
    librdkafka returned b"1" here). position() waits for the transaction to end, and
    raises TimeoutError (which the relay retries) when it outlasts request_timeout."""
    _topic, offsets, transactional_id = names
    async with _started(kafka_bootstrap, client, offsets, transactional_id) as transactions:
        await transactions.begin()
        await transactions.commit(KEY, b"1")
        reader = _transactions(kafka_bootstrap, client, offsets, transactional_id)
        async with _foreign_transaction(kafka_bootstrap, offsets) as foreign:
            await transactions.begin()
            await transactions.commit(KEY, b"2")
            aborting = asyncio.create_task(_abort_later(foreign, 1.0))
            try:
                assert await asyncio.wait_for(reader.position(KEY), timeout=25) == b"2"
            finally:
                await aborting

        impatient = _transactions(kafka_bootstrap, client, offsets, transactional_id, request_timeout="2s")
        async with _foreign_transaction(kafka_bootstrap, offsets):
            await transactions.begin()
            await transactions.commit(KEY, b"3")
            with pytest.raises(TimeoutError) as waited:
                await asyncio.wait_for(impatient.position(KEY), timeout=25)
        message = str(waited.value)
        assert "\n" not in message and repr(offsets) in message and "transaction open" in message
        assert await reader.position(KEY) == b"3", "the foreign transaction aborted"


@pytest.mark.parametrize("client", CLIENTS)
async def test_an_offsets_topic_that_is_not_compacted_is_refused(
    kafka_bootstrap: str, client: str, names: tuple[str, str, str]
) -> None:
    _topic, offsets, transactional_id = names
    await kafka_create_topic(kafka_bootstrap, offsets, partitions=1, **{"cleanup.policy": "delete"})
    transactions = _transactions(kafka_bootstrap, client, offsets, transactional_id)
    try:
        with pytest.raises(PositionsTopicError) as refused:
            await transactions.start()
    finally:
        await transactions.close()
    message = str(refused.value)
    assert "\n" not in message
    assert repr(offsets) in message and "cleanup.policy=delete" in message

    # A missing one is created compacted: a second producer's check accepts it.
    created = f"{offsets}-new"
    async with _started(kafka_bootstrap, client, created, transactional_id):
        pass
    async with _started(kafka_bootstrap, client, created, transactional_id):
        pass
