"""A producer's side: upload a large payload first, then enqueue its envelope in the
caller's transaction (the relay publishes that as it is: it is small).

The object is written before the transaction commits; a transaction that rolls back
leaves it behind, an orphan that `outbox-relay claim-check sweep` removes (it only
ever considers objects under uploads/, and never one a message in the outbox names).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import Mapping
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

from outbox_relay.claim_check.envelope import CONTENT_TYPE, Reference
from outbox_relay.claim_check.stores import UPLOADS, Store
from outbox_relay.producer import AUTOCOMMIT_ERROR, Payload, _outside_a_transaction, encode_payload
from outbox_relay.sqlfiles import DEFAULT_SCHEMA, validate_schema_name
from outbox_relay.tracing import with_trace_context
from outbox_relay.validation import check_headers, check_key, check_topic


def upload(store: Store, payload: Payload) -> Reference:
    """Put `payload` (bytes, str or a JSON value, as enqueue takes it) in `store` under
    uploads/ with a fresh name; the reference an envelope carries."""
    body, content_type = encode_payload(payload)
    digest = hashlib.sha256(body).hexdigest()
    url = store.put(f"{UPLOADS}{uuid.uuid4()}", body, digest, content_type)
    return Reference(url, len(body), digest, content_type)


def _statement(
    topic: str, reference: Reference, key: str | None, headers: Mapping[str, str] | None, schema: str
) -> tuple[sql.Composed, tuple[object, ...]]:
    check_topic(topic)
    check_key(key)
    checked = check_headers({**(with_trace_context(headers) or {}), **reference.headers()})
    query = sql.SQL("SELECT {}.enqueue_binary(%s, %s, %s, %s::jsonb, %s)").format(
        sql.Identifier(validate_schema_name(schema))
    )
    return query, (topic, key, reference.body(), json.dumps(checked), CONTENT_TYPE)


def _check_before_upload(
    conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any],
    topic: str,
    key: str | None,
    headers: Mapping[str, str] | None,
) -> None:
    """What enqueue checks before any SQL, checked before the upload too: a call that
    would be refused uploads nothing."""
    check_topic(topic)
    check_key(key)
    check_headers(headers)
    if _outside_a_transaction(conn):
        raise ValueError(AUTOCOMMIT_ERROR)


def enqueue_large(
    conn: psycopg.Connection[Any],
    topic: str,
    payload: Payload,
    *,
    store: Store,
    key: str | None = None,
    headers: Mapping[str, str] | None = None,
    schema: str = DEFAULT_SCHEMA,
) -> UUID:
    """Upload `payload` to `store`, then enqueue its envelope in `conn`'s current
    transaction; the message id. Checks the topic, key and headers before uploading."""
    _check_before_upload(conn, topic, key, headers)
    query, params = _statement(topic, upload(store, payload), key, headers, schema)
    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(query, params)
        row = cur.fetchone()
    assert row is not None
    return UUID(str(row[0]))


async def enqueue_large_async(
    conn: psycopg.AsyncConnection[Any],
    topic: str,
    payload: Payload,
    *,
    store: Store,
    key: str | None = None,
    headers: Mapping[str, str] | None = None,
    schema: str = DEFAULT_SCHEMA,
) -> UUID:
    """enqueue_large for an asyncio connection (the upload runs in a thread)."""
    _check_before_upload(conn, topic, key, headers)
    reference = await asyncio.to_thread(upload, store, payload)
    query, params = _statement(topic, reference, key, headers, schema)
    async with conn.cursor(row_factory=tuple_row) as cur:
        await cur.execute(query, params)
        row = await cur.fetchone()
    assert row is not None
    return UUID(str(row[0]))
