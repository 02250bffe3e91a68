"""Record a message id in the consumer's own transaction: the consumer's path.

Like the producer's :func:`outbox_relay.enqueue`, these functions take the caller's
psycopg 3 connection, join its current transaction and never commit. The record and
the business effect commit together or not at all, so an effect happens once per
message however often the broker delivers it.

Concurrency: two transactions recording the same (consumer, message id) serialize on
the primary key. The second waits until the first ends, then gets False if the first
committed and True if it rolled back. Any number of threads, processes or hosts may
call these at once, each on its own connection; a connection is used by one caller
at a time (psycopg's rule).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from outbox_relay.inbox import errors
from outbox_relay.sqlfiles import DEFAULT_INBOX_SCHEMA, inbox_query, validate_inbox_schema_name

DEFAULT_CONSUMER = "default"
MessageId = str | UUID


def parse_message_id(value: object) -> UUID:
    """The UUID in `value` (a UUID, or a str in any form :class:`uuid.UUID` reads), or
    MessageIdError in one line."""
    if isinstance(value, UUID):
        return value
    if isinstance(value, str):
        try:
            return UUID(value)
        except ValueError:
            raise errors.invalid_message_id(value) from None
    raise errors.invalid_message_id(value)


def _check_consumer(consumer: object) -> str:
    if not isinstance(consumer, str) or not 1 <= len(consumer) <= errors.MAX_CONSUMER_NAME:
        raise errors.invalid_consumer(consumer)
    return consumer


def _checked(message_id: object, consumer: str, schema: str) -> UUID:
    # Everything is validated before SQL is built, so a bad call never reaches the database.
    mid = parse_message_id(message_id)
    _check_consumer(consumer)
    validate_inbox_schema_name(schema)
    return mid


def _statement(message_id: object, consumer: str, schema: str) -> tuple[sql.Composed, dict[str, object]]:
    mid = _checked(message_id, consumer, schema)
    return inbox_query("first_time", schema), {"message_id": mid, "consumer": consumer}


def _outside_a_transaction(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    # The producer's rule (outbox_relay/producer.py): in autocommit mode, a statement
    # outside `conn.transaction()` commits at once, alone.
    return conn.autocommit and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


_NOT_INSTALLED = (psycopg.errors.UndefinedFunction, psycopg.errors.InvalidSchemaName)


def first_time(
    conn: psycopg.Connection[Any],
    message_id: MessageId,
    *,
    consumer: str = DEFAULT_CONSUMER,
    schema: str = DEFAULT_INBOX_SCHEMA,
) -> bool:
    """Record `message_id` for `consumer` in `conn`'s current transaction; return True
    the first time, False when a committed transaction recorded it before.

    Call it before the business effect, in the same transaction::

        with conn.transaction():
            if first_time(conn, message_id_of(record), consumer="billing"):
                credit_account(conn, ...)

    A rolled-back transaction leaves no record: the next delivery is a first time.
    `consumer` names the consumer group: groups sharing one database each process a
    message once. Raises MessageIdError for a missing or invalid message id and
    InboxUsageError for an autocommit connection outside a transaction, before any SQL
    runs; SchemaError when the inbox is not installed. Other database errors (a
    serialization failure under REPEATABLE READ, a lost connection) propagate
    unchanged for the caller's retry logic.
    """
    query, params = _statement(message_id, consumer, schema)
    if _outside_a_transaction(conn):
        raise errors.InboxUsageError(errors.AUTOCOMMIT_ERROR)
    try:
        with conn.cursor(row_factory=tuple_row) as cur:
            cur.execute(query, params)
            row = cur.fetchone()
    except _NOT_INSTALLED as exc:
        raise errors.not_installed(schema) from exc
    assert row is not None
    return bool(row[0])


async def first_time_async(
    conn: psycopg.AsyncConnection[Any],
    message_id: MessageId,
    *,
    consumer: str = DEFAULT_CONSUMER,
    schema: str = DEFAULT_INBOX_SCHEMA,
) -> bool:
    """The async twin of :func:`first_time`."""
    query, params = _statement(message_id, consumer, schema)
    if _outside_a_transaction(conn):
        raise errors.InboxUsageError(errors.AUTOCOMMIT_ERROR)
    try:
        async with conn.cursor(row_factory=tuple_row) as cur:
            await cur.execute(query, params)
            row = await cur.fetchone()
    except _NOT_INSTALLED as exc:
        raise errors.not_installed(schema) from exc
    assert row is not None
    return bool(row[0])


def process_once(
    conn: psycopg.Connection[Any],
    message_id: MessageId,
    handler: Callable[[psycopg.Connection[Any]], object],
    *,
    consumer: str = DEFAULT_CONSUMER,
    schema: str = DEFAULT_INBOX_SCHEMA,
) -> bool:
    """Run ``handler(conn)`` in a transaction with the record of `message_id`, unless a
    committed transaction already recorded it; return whether the handler ran.

    Opens ``conn.transaction()``: a new transaction, committed when the handler
    returns, or a savepoint inside the caller's. An exception from the handler rolls
    back its effects and the record alike, and propagates: the message stays
    unprocessed, ready for its redelivery. Acknowledge the message to the broker after
    the commit, never before: after this returns when it opened the transaction, after
    your own commit when you had one open (its savepoint commits nothing).
    """
    mid = _checked(message_id, consumer, schema)  # a bad call is refused before the transaction
    with conn.transaction():
        if not first_time(conn, mid, consumer=consumer, schema=schema):
            return False
        handler(conn)
    return True


async def process_once_async(
    conn: psycopg.AsyncConnection[Any],
    message_id: MessageId,
    handler: Callable[[psycopg.AsyncConnection[Any]], Awaitable[object]],
    *,
    consumer: str = DEFAULT_CONSUMER,
    schema: str = DEFAULT_INBOX_SCHEMA,
) -> bool:
    """The async twin of :func:`process_once`; `handler` is a coroutine function."""
    mid = _checked(message_id, consumer, schema)  # a bad call is refused before the transaction
    async with conn.transaction():
        if not await first_time_async(conn, mid, consumer=consumer, schema=schema):
            return False
        await handler(conn)
    return True
