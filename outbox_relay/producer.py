"""Enqueue a message inside the caller's own transaction.

These functions take the application's psycopg 3 connection and run one statement
on it. They never commit or roll back: the message becomes visible to the relay
exactly when, and only if, the caller's transaction commits.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from outbox_relay.sqlfiles import DEFAULT_SCHEMA, validate_schema_name
from outbox_relay.tracing import with_trace_context
from outbox_relay.validation import check_headers, check_key, check_topic

Payload = Any  # dict | list | str | bytes | any JSON-serialisable value

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
BINARY = "application/octet-stream"


def encode_payload(payload: Payload) -> tuple[bytes, str]:
    """(bytes, content type) for a payload: bytes as-is, str as UTF-8 text, else JSON."""
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload), BINARY
    if isinstance(payload, str):
        return payload.encode("utf-8"), TEXT
    try:
        encoded = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"invalid payload: not JSON-serialisable ({exc})") from exc
    return encoded.encode("utf-8"), JSON


def _outside_a_transaction(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    return conn.autocommit and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


AUTOCOMMIT_ERROR = (
    "enqueue on an autocommit connection outside a transaction would commit the message alone, "
    "apart from your business rows: call it inside `with conn.transaction():` (or turn autocommit off)"
)


def _statement(
    topic: str,
    payload: Payload,
    key: str | None,
    headers: Mapping[str, str] | None,
    schema: str,
    max_payload_bytes: int | None,
) -> tuple[sql.Composed, tuple[object, ...]]:
    # Validate everything before building SQL, so a bad call never reaches the database.
    check_topic(topic)
    check_key(key)
    # The current span's trace context travels with the message (tracing.py); without
    # OpenTelemetry installed this is one cached check.
    checked_headers = check_headers(with_trace_context(headers))
    body, content_type = encode_payload(payload)
    if max_payload_bytes is not None and len(body) > max_payload_bytes:
        raise ValueError(f"payload of {len(body)} bytes exceeds max_payload_bytes ({max_payload_bytes})")
    query = sql.SQL("SELECT {}.enqueue_binary(%s, %s, %s, %s::jsonb, %s)").format(
        sql.Identifier(validate_schema_name(schema))
    )
    return query, (topic, key, body, json.dumps(checked_headers), content_type)


def enqueue(
    conn: psycopg.Connection[Any],
    topic: str,
    payload: Payload,
    *,
    key: str | None = None,
    headers: Mapping[str, str] | None = None,
    schema: str = DEFAULT_SCHEMA,
    max_payload_bytes: int | None = None,
) -> UUID:
    """Add a message to the outbox in `conn`'s current transaction; return its message id.

    Raises ValueError for an invalid topic, key, headers or payload, a payload larger
    than `max_payload_bytes`, or an autocommit connection outside a transaction (the
    message would commit alone), before any SQL runs.
    """
    query, params = _statement(topic, payload, key, headers, schema, max_payload_bytes)
    if _outside_a_transaction(conn):
        raise ValueError(AUTOCOMMIT_ERROR)
    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(query, params)
        row = cur.fetchone()
    assert row is not None
    return UUID(str(row[0]))


async def enqueue_async(
    conn: psycopg.AsyncConnection[Any],
    topic: str,
    payload: Payload,
    *,
    key: str | None = None,
    headers: Mapping[str, str] | None = None,
    schema: str = DEFAULT_SCHEMA,
    max_payload_bytes: int | None = None,
) -> UUID:
    """The async twin of :func:`enqueue`."""
    query, params = _statement(topic, payload, key, headers, schema, max_payload_bytes)
    if _outside_a_transaction(conn):
        raise ValueError(AUTOCOMMIT_ERROR)
    async with conn.cursor(row_factory=tuple_row) as cur:
        await cur.execute(query, params)
        row = await cur.fetchone()
    assert row is not None
    return UUID(str(row[0]))
