"""The frame built by SQL alone (tests/support/wal.py FRAME_FUNCTION: uuid_send,
int2send, int4send, convert_to) is byte for byte the frame framing.encode builds, on a
real PostgreSQL: the expression the schema's enqueue will use in WAL mode is proven
before it is installed."""

from __future__ import annotations

import json
import os
import random
import uuid
from typing import Any

import psycopg
import pytest

from outbox_relay.sources.wal import framing
from tests.support.wal import FRAME_FUNCTION

FRAME_SQL = "SELECT pg_temp.outbox_frame(%s, %s, %s, %s, %s::jsonb, %s), %s::jsonb::text"

# Text with 1- to 4-byte UTF-8 characters, quotes and backslashes (which a cast to bytea
# would take as escapes), but no NUL, which PostgreSQL's text cannot hold.
ALPHABET = "aZ09._:/- \"'\\\t\né€ж日本🙂𝄞"


def sql_and_python_frames(
    conn: psycopg.Connection[Any],
    message_id: uuid.UUID,
    topic: str,
    key: str | None,
    content_type: str,
    headers: dict[str, str],
    payload: bytes,
) -> tuple[bytes, bytes]:
    header_json = json.dumps(headers)
    row = conn.execute(FRAME_SQL, (message_id, topic, key, content_type, header_json, payload, header_json)).fetchone()
    assert row is not None
    by_sql, header_text = bytes(row[0]), row[1]
    # The frame carries the headers as jsonb prints them (its own key order and spacing).
    return by_sql, framing.encode(message_id, topic, key, content_type, header_text, payload)


@pytest.fixture
def conn(empty_db: str) -> Any:
    with psycopg.connect(empty_db, autocommit=True) as connection:
        connection.execute(FRAME_FUNCTION)
        yield connection


@pytest.mark.parametrize(
    ("topic", "key", "content_type", "headers", "payload"),
    [
        ("orders.created", "order-42", "application/json", {}, b'{"total":10}'),
        ("orders.created", None, "application/octet-stream", {}, b""),
        ("t", "", "", {}, b"\x00\xff" * 3),
        ("tenant:1/files", "日本🙂", "text/plain; charset=utf-8", {"traceparent": "00-ab-cd-01", "é": 'ж\\"'}, b"x"),
        ("big", "k" * 2048, "application/octet-stream", {"a": "b" * 10_000}, os.urandom(1 << 20)),
    ],
)
def test_sql_builds_the_same_bytes_as_python(
    conn: Any, topic: str, key: str | None, content_type: str, headers: dict[str, str], payload: bytes
) -> None:
    message_id = uuid.uuid4()

    by_sql, by_python = sql_and_python_frames(conn, message_id, topic, key, content_type, headers, payload)

    assert by_sql == by_python
    decoded = framing.decode(by_sql)
    assert (decoded.message_id, decoded.topic, decoded.key, decoded.payload) == (message_id, topic, key, payload)
    assert decoded.header_map() == headers


def test_sql_builds_the_same_bytes_as_python_for_random_fields(conn: Any) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)

    def text(most: int) -> str:
        return "".join(rng.choice(ALPHABET) for _ in range(rng.randrange(most)))

    for case in range(300):
        fields = (
            uuid.UUID(int=rng.getrandbits(128)),
            text(60),
            None if rng.random() < 0.3 else text(60),
            text(40),
            {text(10): text(30) for _ in range(rng.randrange(4))},
            rng.randbytes(rng.randrange(500)),
        )
        by_sql, by_python = sql_and_python_frames(conn, *fields)
        assert by_sql == by_python, f"case {case} of seed {seed}: {fields!r}"


def test_sql_refuses_a_topic_its_int16_length_cannot_hold(conn: Any) -> None:
    with pytest.raises(psycopg.errors.NumericValueOutOfRange):
        conn.execute(FRAME_SQL, (uuid.uuid4(), "t" * 32768, None, "c", "{}", b"", "{}"))
