"""first_time / process_once and their async twins, in the consumer's transaction,
on a real PostgreSQL: duplicates, rollbacks, consumer groups, racing consumers."""

from __future__ import annotations

import random
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from outbox_relay import inbox
from outbox_relay.errors import SchemaError
from tests.inbox.helpers import CREDIT, balances, processed_ids
from tests.support.waiting import wait_for


def credit(conn: psycopg.Connection[Any], account: int, amount: int) -> None:
    conn.execute(CREDIT, (account, amount))


def test_the_readme_example(consumer_db: str) -> None:
    mid = uuid.uuid4()
    with psycopg.connect(consumer_db) as conn:
        for _ in range(3):  # delivered three times
            with conn.transaction():
                if inbox.first_time(conn, mid):
                    credit(conn, 42, 10)
    assert balances(consumer_db) == {42: 10}


def test_a_rolled_back_first_time_leaves_no_record(consumer_db: str) -> None:
    mid = str(uuid.uuid4())
    with psycopg.connect(consumer_db) as conn:
        with pytest.raises(RuntimeError), conn.transaction():
            assert inbox.first_time(conn, mid)
            credit(conn, 1, 5)
            raise RuntimeError("the handler failed")
        with conn.transaction():
            assert inbox.first_time(conn, mid), "the redelivery is the first time"
            credit(conn, 1, 5)
        with conn.transaction():
            assert not inbox.first_time(conn, mid.upper()), "the same UUID, spelled differently"
    assert balances(consumer_db) == {1: 5}


def test_each_consumer_group_processes_a_message_once(consumer_db: str) -> None:
    mid = uuid.uuid4()
    with psycopg.connect(consumer_db) as conn:
        assert inbox.first_time(conn, mid, consumer="billing")
        assert inbox.first_time(conn, mid, consumer="emails")
        assert not inbox.first_time(conn, mid, consumer="billing")
        assert not inbox.first_time(conn, mid, consumer="emails")
        assert inbox.first_time(conn, mid)  # the default consumer, "default"
        conn.commit()
    assert processed_ids(consumer_db, "billing") == [mid] == processed_ids(consumer_db, "default")


def test_autocommit_outside_a_transaction_is_refused_before_any_sql(consumer_db: str) -> None:
    with psycopg.connect(consumer_db, autocommit=True) as conn:
        with pytest.raises(inbox.InboxUsageError) as info:
            inbox.first_time(conn, uuid.uuid4())
        assert str(info.value).startswith(
            "first_time on an autocommit connection outside a transaction would "
            "record the message apart from its business effect"
        )
        assert isinstance(info.value, ValueError)
        with conn.transaction():
            assert inbox.first_time(conn, uuid.uuid4())
    assert len(processed_ids(consumer_db)) == 1


def test_bad_arguments_are_refused_before_any_sql(consumer_db: str) -> None:
    with psycopg.connect(consumer_db) as conn:
        with pytest.raises(inbox.MessageIdError, match=r"^invalid message id 'not-a-uuid': not a UUID$"):
            inbox.first_time(conn, "not-a-uuid")
        with pytest.raises(inbox.InboxUsageError, match=r"^invalid consumer name '': give a str of 1 to 200"):
            inbox.first_time(conn, uuid.uuid4(), consumer="")
        with pytest.raises(inbox.InboxUsageError, match=r"^invalid consumer name"):
            inbox.process_once(conn, uuid.uuid4(), lambda c: None, consumer="x" * 201)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE, "nothing was sent"


def test_a_missing_inbox_says_how_to_install_it(empty_db: str) -> None:
    with psycopg.connect(empty_db) as conn:
        with pytest.raises(SchemaError) as info:
            inbox.first_time(conn, uuid.uuid4())
        assert str(info.value) == (
            "inbox schema 'inbox' is not installed in this database: "
            "run `outbox-relay inbox schema install --schema inbox`"
        )
        assert isinstance(info.value.__cause__, psycopg.errors.InvalidSchemaName)


def test_works_with_any_row_factory(consumer_db: str) -> None:
    with psycopg.connect(consumer_db, row_factory=dict_row) as conn:
        assert inbox.first_time(conn, uuid.uuid4()) is True


def test_the_sql_function_for_other_languages(consumer_db: str) -> None:
    mid = uuid.uuid4()
    with psycopg.connect(consumer_db) as conn:
        assert conn.execute("SELECT inbox.first_time(%s, 'billing')", (mid,)).fetchone() == (True,)
        assert conn.execute("SELECT inbox.first_time(message_id => %s, consumer => 'billing')", (mid,)).fetchone() == (
            False,
        )
        assert conn.execute("SELECT inbox.first_time(%s)", (mid,)).fetchone() == (True,)
        conn.commit()
        with pytest.raises(psycopg.errors.InvalidParameterValue, match=r"^inbox: message_id is null"):
            conn.execute("SELECT inbox.first_time(NULL)")
        conn.rollback()
        with pytest.raises(psycopg.errors.InvalidParameterValue, match=r"^inbox: consumer must be 1 to 200"):
            conn.execute("SELECT inbox.first_time(gen_random_uuid(), '')")


def test_the_longest_consumer_name_fits_the_inbox_index(consumer_db: str) -> None:
    # The outbox's key once passed its check and failed its index (issue 17): the inbox's
    # primary key holds the consumer name, 200 characters of up to 4 bytes (800 bytes,
    # far below btree's 2,704), so the longest name of 4-byte characters is recorded.
    name = "".join(chr(0x1F300 + i * 37 % 0x300) for i in range(200))
    mid = uuid.uuid4()
    with psycopg.connect(consumer_db) as conn:
        assert inbox.first_time(conn, mid, consumer=name) is True
        assert conn.execute("SELECT inbox.first_time(%s, %s)", (mid, name)).fetchone() == (False,)
        conn.commit()


def test_process_once_runs_the_handler_once_and_not_after_a_failure(consumer_db: str) -> None:
    mid = uuid.uuid4()
    with psycopg.connect(consumer_db) as conn:

        def fail(c: psycopg.Connection[Any]) -> None:
            credit(c, 7, 100)
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match=r"boom"):
            inbox.process_once(conn, mid, fail, consumer="billing")
        assert inbox.process_once(conn, mid, lambda c: credit(c, 7, 3), consumer="billing") is True
        assert inbox.process_once(conn, mid, lambda c: credit(c, 7, 3), consumer="billing") is False
    assert balances(consumer_db) == {7: 3}


async def test_async_twins(consumer_db: str) -> None:
    mid = uuid.uuid4()

    async def handler(conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute(CREDIT, (3, 30))

    async with await psycopg.AsyncConnection.connect(consumer_db) as conn:
        async with conn.transaction():
            assert await inbox.first_time_async(conn, mid, consumer="a")
            assert not await inbox.first_time_async(conn, mid, consumer="a")
        assert await inbox.process_once_async(conn, mid, handler, consumer="b")
        assert not await inbox.process_once_async(conn, mid, handler, consumer="b")
    async with await psycopg.AsyncConnection.connect(consumer_db, autocommit=True) as conn:
        with pytest.raises(inbox.InboxUsageError, match=r"^first_time on an autocommit connection"):
            await inbox.first_time_async(conn, mid)
        with pytest.raises(inbox.MessageIdError):
            await inbox.first_time_async(conn, b"raw header bytes")  # type: ignore[arg-type]
    assert balances(consumer_db) == {3: 30}


def _waiting_on_a_lock(dsn: str, pid: int) -> bool:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    return bool(row and row[0] == "Lock")


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_a_concurrent_duplicate_waits_for_the_first_and_follows_its_outcome(consumer_db: str, outcome: str) -> None:
    mid = uuid.uuid4()
    answers: list[bool] = []
    with psycopg.connect(consumer_db) as first, psycopg.connect(consumer_db) as second:
        assert inbox.first_time(first, mid)

        def duplicate() -> None:
            with second.transaction():
                answers.append(inbox.first_time(second, mid))

        thread = threading.Thread(target=duplicate)
        thread.start()
        # Positive signal: the second transaction waits on the first one's row.
        wait_for(lambda: _waiting_on_a_lock(consumer_db, second.info.backend_pid), 30, "the duplicate waiting")
        assert not answers
        first.commit() if outcome == "commit" else first.rollback()
        thread.join(10)
    assert answers == [outcome == "rollback"]
    assert len(processed_ids(consumer_db)) == 1


def test_racing_consumers_never_both_process_a_message(consumer_db: str) -> None:
    """Four consumers, each on its own connection, get every one of 300 messages (in
    their own order): every credit is applied exactly once."""
    rng = random.Random()
    amounts = {uuid.uuid4(): (rng.randrange(5), rng.randint(1, 1000)) for _ in range(300)}
    barrier = threading.Barrier(4)

    def consume(seed: int) -> int:
        order = list(amounts)
        random.Random(seed).shuffle(order)
        ran = 0
        with psycopg.connect(consumer_db) as conn:
            barrier.wait()
            for mid in order:
                account, amount = amounts[mid]
                ran += inbox.process_once(conn, mid, lambda c, a=account, n=amount: credit(c, a, n), consumer="billing")
        return ran

    with ThreadPoolExecutor(4) as pool:
        # Two pairs with the same order: a pair collides on nearly every message.
        ran = list(pool.map(consume, [0, 0, 1, 1]))
    assert sum(ran) == len(amounts), ran
    expected: dict[int, int] = {}
    for account, amount in amounts.values():
        expected[account] = expected.get(account, 0) + amount
    assert balances(consumer_db) == expected
