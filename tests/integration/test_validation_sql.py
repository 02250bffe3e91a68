"""The SQL enqueue functions and CHECK constraints agree with outbox_relay.validation."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from outbox_relay import enqueue
from outbox_relay.validation import check_headers, check_key, check_topic

# PostgreSQL text cannot hold NUL at all (psycopg refuses it client-side with DataError,
# jsonb with UntranslatableCharacter): a different failure that has its own test below.
_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
_topic_chars = "abcXYZ019._:/-"

_valid_topics = st.text(_topic_chars, min_size=1, max_size=12)
topics = st.one_of(
    _valid_topics,
    _valid_topics,
    st.text(_topic_chars, min_size=248, max_size=251),
    st.text(_chars, max_size=12),
    st.builds(
        lambda a, b, c: a + b + c,
        st.text(_topic_chars, max_size=4),
        st.sampled_from([" ", "*", "é", "\t", ",", "#", "\n", "😀"]),
        st.text(_topic_chars, max_size=4),
    ),
)
keys = st.one_of(
    st.none(),
    st.text(_chars, min_size=1, max_size=10),
    st.text(_chars, max_size=10),
    # Around the limit of 2,048 bytes, in characters of 1, 3 and 4 bytes.
    st.integers(min_value=2046, max_value=2050).map(lambda n: "k" * n),
    st.integers(min_value=681, max_value=684).map(lambda n: "界" * n),
    st.integers(min_value=511, max_value=513).map(lambda n: "😀" * n),
)
header_names = st.one_of(
    st.text(_chars, max_size=8),
    st.sampled_from(["message-id", "Message-ID", "MESSAGE-ID", "message-id2", "x-message-id"]),
    st.integers(min_value=254, max_value=257).map(lambda n: "h" * n),
)
header_values = st.one_of(
    st.text(_chars, max_size=8),
    st.integers(),
    st.none(),
    st.booleans(),
    st.lists(st.text(max_size=2), max_size=2),
    st.floats(allow_nan=False, allow_infinity=False),
)
headers = st.one_of(
    st.dictionaries(st.text(_chars, min_size=1, max_size=8), st.text(_chars, max_size=8), max_size=3),
    st.dictionaries(header_names, header_values, max_size=3),
)


@pytest.fixture
def conn(db: str) -> Iterator[psycopg.Connection[Any]]:
    """One connection, one outer transaction; each example runs in a savepoint."""
    with psycopg.connect(db) as connection, connection.transaction(force_rollback=True):
        yield connection


def python_accepts(topic: str, key: str | None, header_map: dict[str, Any]) -> bool:
    try:
        check_topic(topic)
        check_key(key)
        check_headers(header_map)
    except ValueError:
        return False
    return True


def sql_accepts(conn: psycopg.Connection[Any], query: str, params: tuple[Any, ...]) -> bool:
    try:
        with conn.transaction():  # a savepoint: an error rolls back to it, not further
            conn.execute(query, params)
    except psycopg.errors.InvalidParameterValue:
        return False
    except psycopg.errors.UntranslatableCharacter:
        # Headers whose JSON holds a NUL (\u0000, in a value Python refuses as not a str)
        # cannot become jsonb at all: PostgreSQL refuses them before enqueue runs.
        return False
    return True


BINARY = "SELECT outbox.enqueue_binary(%s, %s, %s, %s::jsonb, %s)"
JSONB = "SELECT outbox.enqueue(%s, %s, %s::jsonb, %s::jsonb)"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(topic=topics, key=keys, header_map=headers)
def test_python_and_sql_validation_agree(
    conn: psycopg.Connection[Any], topic: str, key: str | None, header_map: dict[str, Any]
) -> None:
    expected = python_accepts(topic, key, header_map)
    event(f"valid: {expected}")
    encoded = json.dumps(header_map)
    assert sql_accepts(conn, BINARY, (topic, key, b"payload", encoded, "text/plain")) is expected, (
        f"enqueue_binary disagrees with Python (Python accepts: {expected})"
    )
    assert sql_accepts(conn, JSONB, (topic, key, '{"a": 1}', encoded)) is expected, (
        f"enqueue disagrees with Python (Python accepts: {expected})"
    )


@pytest.mark.parametrize(
    ("topic", "key", "header_map", "accepted"),
    [
        ("orders.created", None, {}, True),
        ("x" * 249, "k" * 1024, {"h" * 255: "v"}, True),
        ("x" * 250, None, {}, False),
        ("", None, {}, False),
        ("orders created", None, {}, False),
        ("t", "", {}, False),
        ("t", "k" * 2048, {}, True),
        ("t", "k" * 2049, {}, False),
        ("t", "界" * 682 + "kk", {}, True),
        ("t", "界" * 683, {}, False),
        ("t", "😀" * 512, {}, True),
        ("t", "😀" * 512 + "k", {}, False),
        ("t", None, {"": "v"}, False),
        ("t", None, {"h" * 256: "v"}, False),
        ("t", None, {"Message-Id": "v"}, False),
        ("t", None, {"a": 1}, False),
        ("t", None, {"a": None}, False),
        ("t", None, {"a": ["\x00"]}, False),  # no jsonb can hold it (hypothesis found it)
    ],
)
def test_boundaries_agree(
    conn: psycopg.Connection[Any],
    topic: str,
    key: str | None,
    header_map: dict[str, Any],
    accepted: bool,
) -> None:
    assert python_accepts(topic, key, header_map) is accepted
    params = (topic, key, b"p", json.dumps(header_map), "application/octet-stream")
    assert sql_accepts(conn, BINARY, params) is accepted


def test_sql_rejects_headers_that_are_not_an_object(conn: psycopg.Connection[Any]) -> None:
    for value in ["[1]", '"s"', "null", "1"]:
        assert not sql_accepts(conn, BINARY, ("t", None, b"p", value, "text/plain"))
    # Python says the same for what is not a mapping.
    for py_value in [[1], "s", 1]:
        with pytest.raises(ValueError):
            check_headers(py_value)


def test_sql_rejects_null_payload(conn: psycopg.Connection[Any]) -> None:
    assert not sql_accepts(conn, BINARY, ("t", None, None, "{}", "text/plain"))


def test_sql_null_headers_and_content_type_take_defaults(conn: psycopg.Connection[Any]) -> None:
    row = conn.execute(
        "SELECT message_id FROM outbox.enqueue_binary('t', NULL, 'x'::bytea, NULL, NULL) AS message_id"
    ).fetchone()
    assert row is not None
    stored = conn.execute(
        "SELECT headers, content_type FROM outbox.messages WHERE message_id = %s", (row[0],)
    ).fetchone()
    assert stored == ({}, "application/octet-stream")


def test_trailing_newline_topic_agrees(conn: psycopg.Connection[Any]) -> None:
    topic = "orders\n"
    assert not sql_accepts(conn, BINARY, (topic, None, b"p", "{}", "text/plain"))
    assert not python_accepts(topic, None, {})


@pytest.mark.parametrize(("key", "header_map"), [("k\x00", {}), (None, {"a": "b\x00"}), (None, {"a\x00": "b"})])
def test_nul_characters_rejected_before_sql(
    conn: psycopg.Connection[Any], key: str | None, header_map: dict[str, str]
) -> None:
    with pytest.raises(ValueError):
        enqueue(conn, "t", {"a": 1}, key=key, headers=header_map)


# --- an error aborts the caller's transaction --------------------------------------------


def test_sql_error_aborts_callers_transaction(db: str) -> None:
    with psycopg.connect(db) as conn:
        conn.execute("CREATE TABLE orders (id int)")
        conn.execute("INSERT INTO orders VALUES (1)")
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="outbox: invalid topic"):
            conn.execute("SELECT outbox.enqueue('bad topic', NULL, '{}'::jsonb)")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        # Nothing of the transaction survived: neither the table nor a message.
        assert conn.execute("SELECT to_regclass('orders')").fetchone() == (None,)
        assert conn.execute("SELECT count(*) FROM outbox.messages").fetchone() == (0,)


def test_sql_error_from_enqueue_binary_aborts_transaction(db: str) -> None:
    with psycopg.connect(db) as conn:
        conn.execute("SELECT outbox.enqueue('ok', NULL, '{}'::jsonb)")
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="outbox: invalid headers"):
            conn.execute(
                "SELECT outbox.enqueue_binary('t', NULL, 'x'::bytea, %s::jsonb)",
                (json.dumps({"message-id": "forged"}),),
            )
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT count(*) FROM outbox.messages")
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM outbox.messages").fetchone() == (0,)


def test_python_validation_error_runs_no_sql(db: str) -> None:
    with psycopg.connect(db) as conn:
        enqueue(conn, "ok", {"n": 1})
        with pytest.raises(ValueError, match="invalid topic"):
            enqueue(conn, "bad topic", {"n": 2})
        # The transaction is still usable: the bad call never reached the database.
        enqueue(conn, "ok", {"n": 3})
        conn.commit()
        assert conn.execute("SELECT count(*) FROM outbox.messages").fetchone() == (2,)


# --- CHECK constraints on direct INSERTs ----------------------------------------------------


@pytest.mark.parametrize(
    ("columns", "values", "constraint"),
    [
        ("topic, payload", ("bad topic", b"x"), "messages_topic_valid"),
        ("topic, payload", ("", b"x"), "messages_topic_valid"),
        ("topic, payload", ("x" * 250, b"x"), "messages_topic_valid"),
        ("topic, payload", ("orders\n", b"x"), "messages_topic_valid"),
        ("topic, key, payload", ("t", "", b"x"), "messages_key_valid"),
        ("topic, key, payload", ("t", "k" * 2049, b"x"), "messages_key_valid"),
        ("topic, key, payload", ("t", "界" * 683, b"x"), "messages_key_valid"),
        ("topic, payload, headers", ("t", b"x", '{"a": 1}'), "messages_headers_valid"),
        ("topic, payload, headers", ("t", b"x", '{"a": null}'), "messages_headers_valid"),
        ("topic, payload, headers", ("t", b"x", '{"a": ["b"]}'), "messages_headers_valid"),
        ("topic, payload, headers", ("t", b"x", '{"MESSAGE-ID": "b"}'), "messages_headers_valid"),
        ("topic, payload, headers", ("t", b"x", '{"": "b"}'), "messages_headers_valid"),
        ("topic, payload, headers", ("t", b"x", '["a"]'), "messages_headers_valid"),
    ],
)
def test_check_constraints_reject_direct_insert(
    conn: psycopg.Connection[Any], columns: str, values: tuple[Any, ...], constraint: str
) -> None:
    placeholders = ", ".join("%s::jsonb" if name.strip() == "headers" else "%s" for name in columns.split(","))
    with pytest.raises(psycopg.errors.CheckViolation) as info, conn.transaction():
        conn.execute(f"INSERT INTO outbox.messages ({columns}) VALUES ({placeholders})", values)
    assert info.value.diag.constraint_name == constraint


def test_check_constraints_accept_valid_direct_insert(conn: psycopg.Connection[Any]) -> None:
    conn.execute(
        "INSERT INTO outbox.messages (topic, key, payload, headers) VALUES (%s, %s, %s, %s::jsonb)",
        ("orders.created", "k", b"x", '{"trace": "abc"}'),
    )
    assert conn.execute("SELECT count(*) FROM outbox.messages").fetchone() == (1,)
