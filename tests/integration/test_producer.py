"""Enqueueing from Python and from SQL, inside the application's own transaction."""

from __future__ import annotations

import asyncio
import json
import random

import psycopg
import pytest
from psycopg.rows import dict_row

from outbox_relay import enqueue, enqueue_async
from outbox_relay.engine.store import OutboxStore
from outbox_relay.sqlfiles import Queries
from outbox_relay.testing import FakeAdapter
from outbox_relay.validation import check_key
from tests.support.configs import make_config
from tests.support.outbox import count
from tests.support.relay import running_relay
from tests.support.waiting import wait_until


def test_enqueue_joins_the_callers_transaction_and_never_commits(db: str) -> None:
    with psycopg.connect(db) as conn, psycopg.connect(db) as other:
        mid = enqueue(conn, "orders.created", {"total": 10}, key="order-42")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        assert other.execute("SELECT count(*) FROM outbox.messages").fetchone() == (0,)
        conn.commit()
        row = other.execute("SELECT message_id, topic, key, payload, content_type FROM outbox.messages").fetchone()
    assert row == (mid, "orders.created", "order-42", b'{"total":10}', "application/json")


def test_rollback_leaves_no_message(db: str) -> None:
    with psycopg.connect(db) as conn:
        enqueue(conn, "t", {"a": 1})
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM outbox.messages").fetchone() == (0,)


async def test_async_enqueue_joins_the_transaction(db: str) -> None:
    async with await psycopg.AsyncConnection.connect(db) as conn:
        async with conn.transaction():
            mid = await enqueue_async(conn, "t", [1, 2], headers={"trace": "abc"})
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        cur = await conn.execute("SELECT message_id, headers FROM outbox.messages")
        assert await cur.fetchone() == (mid, {"trace": "abc"})
        await conn.rollback()
        with pytest.raises(ZeroDivisionError):
            async with conn.transaction():
                await enqueue_async(conn, "t", "rolled back")
                _ = 1 / 0
        cur = await conn.execute("SELECT count(*) FROM outbox.messages")
        assert await cur.fetchone() == (1,)


@pytest.mark.parametrize(
    ("payload", "stored", "content_type"),
    [
        ({"a": "é"}, '{"a":"é"}'.encode(), "application/json"),
        ([1, None], b"[1,null]", "application/json"),
        ("plain text", b"plain text", "text/plain; charset=utf-8"),
        (b"\x00\xff", b"\x00\xff", "application/octet-stream"),
    ],
)
def test_payload_kinds(db: str, payload: object, stored: bytes, content_type: str) -> None:
    with psycopg.connect(db) as conn:
        enqueue(conn, "t", payload)
        assert conn.execute("SELECT payload, content_type FROM outbox.messages").fetchone() == (stored, content_type)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"topic": ""},
        {"topic": "has space"},
        {"topic": "orders.*"},
        {"topic": 42},
        {"headers": {"a": 1}},
        {"headers": {"message-id": "x"}},
        {"headers": ["a"]},
        {"key": ""},
        {"payload": object()},
        # A lone surrogate has no UTF-8: it would abort the caller's transaction in SQL.
        {"headers": {"h": "\ud800"}},
        {"headers": {"\udc80": "v"}},
        {"key": "k\ud800"},
    ],
)
def test_invalid_arguments_raise_value_error_before_any_sql(db: str, kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"topic": "t", "payload": {"a": 1}, **kwargs}
    conn = psycopg.connect(db)
    conn.close()  # any SQL would fail with OperationalError: ValueError proves none ran
    with pytest.raises(ValueError):
        enqueue(conn, args.pop("topic"), args.pop("payload"), **args)  # type: ignore[arg-type]


def test_works_with_the_callers_row_factory(db: str) -> None:
    with psycopg.connect(db, row_factory=dict_row) as conn:
        mid = enqueue(conn, "t", {"a": 1})
        assert conn.execute("SELECT message_id FROM outbox.messages").fetchone() == {"message_id": mid}


def test_sql_enqueue_returns_the_message_id(db: str) -> None:
    with psycopg.connect(db) as conn:
        row = conn.execute(
            "SELECT outbox.enqueue('orders.created', 'order-42', '{\"total\": 10}', '{\"h\": \"v\"}')"
        ).fetchone()
        assert row is not None
        stored = conn.execute("SELECT message_id, payload, headers, content_type FROM outbox.messages").fetchone()
    assert stored is not None
    assert stored[0] == row[0]
    assert json.loads(stored[1]) == {"total": 10}
    assert stored[2:] == ({"h": "v"}, "application/json")


def test_sql_enqueue_binary(db: str) -> None:
    with psycopg.connect(db) as conn:
        conn.execute("SELECT outbox.enqueue_binary('t', NULL, '\\x0001'::bytea)")
        conn.execute("SELECT outbox.enqueue_binary('t', 'k', 'hi'::bytea, '{}', 'text/plain')")
        got = conn.execute("SELECT payload, content_type FROM outbox.messages ORDER BY id").fetchall()
    assert got == [(b"\x00\x01", "application/octet-stream"), (b"hi", "text/plain")]


@pytest.mark.parametrize(
    "call",
    [
        "SELECT outbox.enqueue('bad topic', NULL, '{}')",
        "SELECT outbox.enqueue(NULL, NULL, '{}')",
        "SELECT outbox.enqueue('t', NULL, '{}', '{\"a\": 1}')",
        "SELECT outbox.enqueue('t', NULL, '{}', '[]')",
        "SELECT outbox.enqueue('t', '', '{}')",
        "SELECT outbox.enqueue('t', NULL, NULL)",
    ],
)
def test_sql_enqueue_errors_abort_the_callers_transaction(db: str, call: str) -> None:
    with psycopg.connect(db) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS public.orders (id int)")
        conn.execute("INSERT INTO public.orders VALUES (1)")
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="outbox:"):
            conn.execute(call)  # type: ignore[arg-type]
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM outbox.messages").fetchone() == (0,)


async def test_classic_case_rollback_is_never_published(db: str) -> None:
    """Credit an account and record the message in one transaction
    (docs/tutorials/existing-database.md, "From Python")."""
    with psycopg.connect(db) as conn:
        conn.execute("CREATE TABLE accounts (id int PRIMARY KEY, balance numeric NOT NULL)")
        conn.execute("INSERT INTO accounts VALUES (42, 0)")
        conn.commit()

        def credit(amount: int, *, fail: bool) -> None:
            with conn.transaction():
                conn.execute("UPDATE accounts SET balance = balance + %s WHERE id = 42", (amount,))
                enqueue(conn, "accounts.credited", {"account": 42, "amount": amount}, key="account-42")
                if fail:
                    raise RuntimeError("payment provider said no")

        credit(10, fail=False)
        with pytest.raises(RuntimeError):
            credit(99, fail=True)
        balance = conn.execute("SELECT balance FROM accounts").fetchone()
    fake = FakeAdapter()
    async with running_relay(make_config(db), {"main": fake}):
        # The positive signal: the relay recorded the one committed message as dispatched,
        # and it is the only row there is: nothing else can be delivered.
        await wait_until(lambda: count(db, "dispatched_at IS NOT NULL") == count(db) == 1)
    assert balance == (10,)
    assert [json.loads(o.message.payload)["amount"] for o in fake.delivered] == [10]


def test_enqueue_on_an_autocommit_connection_outside_a_transaction_is_refused(db: str) -> None:
    # It would commit the message alone, apart from the business rows it belongs with.
    with psycopg.connect(db, autocommit=True) as conn:
        with pytest.raises(ValueError, match="autocommit connection outside a transaction"):
            enqueue(conn, "t", {"a": 1})
        assert conn.execute("SELECT count(*) FROM outbox.messages").fetchone() == (0,)
        with conn.transaction():  # the right way on such a connection
            enqueue(conn, "t", {"a": 2})
        assert conn.execute("SELECT count(*) FROM outbox.messages").fetchone() == (1,)


async def test_async_enqueue_on_an_autocommit_connection_outside_a_transaction_is_refused(db: str) -> None:
    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
        with pytest.raises(ValueError, match="autocommit connection outside a transaction"):
            await enqueue_async(conn, "t", {"a": 1})
        async with conn.transaction():
            await enqueue_async(conn, "t", {"a": 2})
        cur = await conn.execute("SELECT count(*) FROM outbox.messages")
        assert await cur.fetchone() == (1,)


# --- the longest key -------------------------------------------------------------------------

# Code points of each UTF-8 width. Drawn at random, so that PostgreSQL cannot compress
# the key in its index entry: 1,024 copies of one character shrink to a few bytes, but
# 1,024 distinct CJK characters made an entry of 3,096 bytes, over btree's 2,704.
WIDTHS = {1: (0x21, 0x7E), 2: (0x0400, 0x04FF), 3: (0x4E00, 0x9FFF), 4: (0x1F300, 0x1F5FF)}


def random_text(width: int | None, n: int) -> str:
    """`n` random characters of one UTF-8 width (None: of every width, mixed)."""
    rng = random.Random(width or 0)
    return "".join(chr(rng.randint(*WIDTHS[width or rng.randint(1, 4)])) for _ in range(n))


def longest_key(width: int | None) -> str:
    """The longest key the producer accepts: characters of `width` while they fit, then
    ASCII up to the last byte (or character) of the limit."""
    text = random_text(width, 5_000)
    fits, too_long = 0, len(text) + 1
    while too_long - fits > 1:  # bisect: check_key accepts every prefix up to the longest
        middle = (fits + too_long) // 2
        fits, too_long = (middle, too_long) if accepted(text[:middle]) else (fits, middle)
    key = text[:fits]
    padding = random_text(1, 5_000)
    while accepted(key + padding[0]):
        key, padding = key + padding[0], padding[1:]
    return key


def accepted(key: str) -> bool:
    try:
        check_key(key)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("width", [1, 2, 3, 4, None], ids=["1-byte", "2-byte", "3-byte", "4-byte", "mixed"])
def test_the_longest_key_is_enqueued_claimed_and_dead_lettered(db: str, width: int | None) -> None:
    # A key the producer accepts fits every index its row enters (the claim's, and the
    # dead letters'): before, 1,024 CJK characters passed the check and then failed the
    # index, aborting the application's transaction with its own rows.
    key = longest_key(width)
    with psycopg.connect(db) as conn:
        conn.execute("CREATE TABLE orders (id int)")
        conn.execute("INSERT INTO orders VALUES (1)")
        enqueue(conn, "t", {"via": "python"}, key=key)
        conn.execute("SELECT outbox.enqueue('t', %s, '{\"via\": \"sql\"}'::jsonb)", (key,))
        conn.commit()
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (1,)
        assert conn.execute("SELECT key FROM outbox.messages ORDER BY id").fetchall() == [(key,), (key,)]
    claimed = asyncio.run(claim_all(db))
    assert claimed == [key, key], "the key walk found it in the keyed pending index"
    with psycopg.connect(db) as conn:
        dead = conn.execute("UPDATE outbox.messages SET dead_lettered_at = now(), dead_letter_reason = 'x'")
        assert dead.rowcount == 2


async def claim_all(dsn: str) -> list[str | None]:
    store = OutboxStore(Queries("outbox"), hold_dead_letters=False)
    async with await psycopg.AsyncConnection.connect(dsn) as conn, conn.transaction():
        return [m.key for m in (await store.claim(conn, 10)).messages]


@pytest.mark.parametrize("width", [1, 2, 3, 4, None], ids=["1-byte", "2-byte", "3-byte", "4-byte", "mixed"])
def test_a_key_one_byte_over_is_refused_in_one_line_and_touches_nothing(db: str, width: int | None) -> None:
    key = longest_key(width) + "x"
    with psycopg.connect(db) as conn:
        conn.execute("CREATE TABLE orders (id int)")
        conn.commit()
        # Python: refused before any SQL; the application's transaction goes on.
        conn.execute("INSERT INTO orders VALUES (1)")
        with pytest.raises(ValueError) as python_error:
            enqueue(conn, "t", {"n": 1}, key=key)
        conn.commit()
        # SQL: refused by enqueue, which aborts the transaction as any SQL error does.
        conn.execute("INSERT INTO orders VALUES (2)")
        with pytest.raises(psycopg.errors.InvalidParameterValue) as sql_error:
            conn.execute("SELECT outbox.enqueue('t', %s, '{}'::jsonb)", (key,))
        conn.rollback()
        # A direct INSERT: refused by the key's domain.
        with pytest.raises(psycopg.errors.CheckViolation) as insert_error:
            conn.execute("INSERT INTO outbox.messages (topic, key, payload) VALUES ('t', %s, 'x')", (key,))
        conn.rollback()
        assert conn.execute("SELECT id FROM orders").fetchall() == [(1,)]
        assert conn.execute("SELECT count(*) FROM outbox.messages").fetchone() == (0,)
    assert insert_error.value.diag.constraint_name == "messages_key_valid"
    for message in (str(python_error.value), sql_error.value.diag.message_primary or ""):
        assert "invalid key" in message and "bytes" in message, message
        assert "\n" not in message and len(message) < 200, f"not one short line: {message[:300]}..."
