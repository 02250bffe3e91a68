"""Where enqueue writes: the `table` source (a row) or the `wal` source (a logical
decoding message), switched by schema_manager.set_source, against a real PostgreSQL
(wal_level = logical) and its replication stream."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any
from uuid import UUID

import psycopg
import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from outbox_relay import enqueue, enqueue_async
from outbox_relay.errors import DatabaseError, SchemaError
from outbox_relay.operations import schema_manager
from outbox_relay.sources.wal import framing
from tests.support.databases import bare_role, install_at, role_with_grants
from tests.support.wal import WalSlot, committed_frames, wal_slot

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SPAN_ID = 0x00F067AA0BA902B7

ENQUEUE_BINARY_DEFINITION = """
    SELECT pg_get_functiondef('outbox.enqueue_binary(text, text, bytea, jsonb, text)'::regprocedure)"""


@pytest.fixture
def outbox_wal(db: str) -> Iterator[WalSlot]:
    """A database with the outbox installed and a slot of the WAL source's."""
    with wal_slot(db) as found:
        yield found


def set_source(dsn: str, source: str, slot_name: str | None = None) -> bool:
    with psycopg.connect(dsn) as conn:
        return schema_manager.set_source(conn, "outbox", source, slot_name=slot_name)


def enqueue_binary_definition(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(ENQUEUE_BINARY_DEFINITION).fetchone()
    assert row is not None
    return str(row[0])


def message_count(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM outbox.messages").fetchone()
    assert row is not None
    return int(row[0])


def fields(frame: framing.Frame) -> tuple[Any, ...]:
    return (frame.message_id, frame.topic, frame.key, frame.content_type, frame.header_map(), frame.payload)


def sql_id(conn: psycopg.Connection[Any], query: str) -> UUID:
    row = conn.execute(query).fetchone()
    assert row is not None
    return UUID(str(row[0]))


async def test_in_wal_mode_every_enqueue_emits_its_frame_and_inserts_no_row(outbox_wal: WalSlot) -> None:
    db = outbox_wal.dsn
    assert set_source(db, "wal", outbox_wal.name)
    # The producer role with only grants_producer.sql's grants: the WAL body needs no more.
    with role_with_grants(db, "producer", "producer") as producer:
        with psycopg.connect(producer) as conn:
            from_python = enqueue(conn, "orders.created", {"order": 1}, key="order-1", headers={"source": "shop"})
            span = NonRecordingSpan(SpanContext(TRACE_ID, SPAN_ID, is_remote=False, trace_flags=TraceFlags(1)))
            with trace.use_span(span):
                traced = enqueue(conn, "orders.traced", b"\x00\x01", key="日本🙂")
            from_enqueue = sql_id(conn, """SELECT outbox.enqueue('orders.sql', 'k-2', '{"a": 1}', '{"h": "v"}')""")
            from_binary = sql_id(conn, r"SELECT outbox.enqueue_binary('orders.bin', NULL, '\x00ff'::bytea, NULL, NULL)")
            conn.commit()
        async with await psycopg.AsyncConnection.connect(producer) as aconn:
            from_async = await enqueue_async(aconn, "orders.async", "text é", key="k-3")
            await aconn.commit()
        with psycopg.connect(producer) as conn:
            enqueue(conn, "orders.rolled-back", {"n": 1}, key="k-3")
            conn.rollback()
        with psycopg.connect(producer) as conn:
            conn.execute("SAVEPOINT s")
            enqueue(conn, "orders.rolled-back", {"n": 2}, key="k-3")
            conn.execute("ROLLBACK TO SAVEPOINT s")
            last = enqueue(conn, "orders.last", {"n": 3})
            conn.commit()

    async with outbox_wal.stream() as stream:
        delivered = await committed_frames(stream, last)

    decoded = [[framing.decode(content) for content in transaction] for transaction in delivered]
    assert [[fields(frame) for frame in transaction] for transaction in decoded] == [
        [
            (from_python, "orders.created", "order-1", "application/json", {"source": "shop"}, b'{"order":1}'),
            (
                traced,
                "orders.traced",
                "日本🙂",
                "application/octet-stream",
                {"traceparent": f"00-{TRACE_ID:032x}-{SPAN_ID:016x}-01"},
                b"\x00\x01",
            ),
            (from_enqueue, "orders.sql", "k-2", "application/json", {"h": "v"}, b'{"a": 1}'),
            (from_binary, "orders.bin", None, "application/octet-stream", {}, b"\x00\xff"),
        ],
        [(from_async, "orders.async", "k-3", "text/plain; charset=utf-8", {}, "text é".encode())],
        [(last, "orders.last", None, "application/json", {}, b'{"n":3}')],
    ]
    # Byte for byte the frame framing.encode writes, of the version framing.decode reads.
    for transaction, frames in zip(delivered, decoded, strict=True):
        for content, frame in zip(transaction, frames, strict=True):
            assert content == framing.encode(*fields(frame)[:4], frame.headers, frame.payload)
            assert content[0] == framing.VERSION_BYTE
    assert message_count(db) == 0


def bad_sql_calls(conn: psycopg.Connection[Any]) -> list[tuple[str, tuple[Any, ...]]]:
    return [
        ("SELECT outbox.enqueue_binary(%s, NULL, 'x'::bytea)", ("bad topic",)),
        ("SELECT outbox.enqueue_binary(NULL, NULL, 'x'::bytea)", ()),
        ("SELECT outbox.enqueue_binary('t', %s, 'x'::bytea)", ("",)),
        ("SELECT outbox.enqueue_binary('t', %s, 'x'::bytea)", ("界" * 683,)),
        ("SELECT outbox.enqueue_binary('t', NULL, NULL)", ()),
        ("SELECT outbox.enqueue_binary('t', NULL, 'x'::bytea, %s::jsonb)", (json.dumps({"message-id": "m"}),)),
        ("SELECT outbox.enqueue_binary('t', NULL, 'x'::bytea, '[1]')", ()),
        ("SELECT outbox.enqueue('bad topic', NULL, '{}')", ()),
        ("SELECT outbox.enqueue('t', NULL, '{}', %s::jsonb)", (json.dumps({"a": 1}),)),
        # The optional ceiling, set for the transaction as ALTER ROLE would for a role.
        (
            "SELECT set_config('outbox_relay.max_payload_bytes', '4', true), outbox.enqueue_binary('t', NULL, %s)",
            (b"12345",),
        ),
    ]


BAD_PYTHON_CALLS: list[Callable[[psycopg.Connection[Any]], object]] = [
    lambda conn: enqueue(conn, "bad topic", {}),
    lambda conn: enqueue(conn, "t", {}, key=""),
    lambda conn: enqueue(conn, "t", {}, key="k" * 2049),
    lambda conn: enqueue(conn, "t", {}, headers={"a": 1}),  # type: ignore[dict-item]
    lambda conn: enqueue(conn, "t", {}, headers={"Message-Id": "m"}),
    lambda conn: enqueue(conn, "t", b"12345", max_payload_bytes=4),
    lambda conn: enqueue(conn, "t", float("nan")),
]


def refusals(dsn: str) -> list[tuple[str, str | None, str]]:
    """(exception class, SQLSTATE, full message) of each bad call, each in its own
    transaction; and nothing was written."""
    seen: list[tuple[str, str | None, str]] = []
    with psycopg.connect(dsn) as conn:
        calls: list[Callable[[], object]] = [
            (lambda q=query, p=params: conn.execute(q, p or None)) for query, params in bad_sql_calls(conn)
        ]
        calls += [(lambda c=call: c(conn)) for call in BAD_PYTHON_CALLS]
        for call in calls:
            with pytest.raises((psycopg.Error, ValueError)) as info:
                call()
            seen.append((type(info.value).__name__, getattr(info.value, "sqlstate", None), str(info.value)))
            conn.rollback()
    return seen


def test_validation_refuses_alike_in_both_sources(outbox_wal: WalSlot) -> None:
    db = outbox_wal.dsn
    in_table = refusals(db)
    set_source(db, "wal", outbox_wal.name)
    in_wal = refusals(db)

    assert in_wal == in_table
    assert {state for _, state, _ in in_table} == {"22023", "54000", None}
    assert message_count(db) == 0


async def test_switching_back_to_table_restores_the_installed_function_and_inserts(outbox_wal: WalSlot) -> None:
    db = outbox_wal.dsn
    installed = enqueue_binary_definition(db)
    assert set_source(db, "wal", outbox_wal.name)
    assert enqueue_binary_definition(db) != installed
    assert set_source(db, "table", outbox_wal.name)
    assert enqueue_binary_definition(db) == installed, "sources.sql's table body drifted from schema.sql's"

    with psycopg.connect(db) as conn:
        message_id = enqueue(conn, "orders.created", {"order": 1}, key="order-1")
        conn.commit()
        row = conn.execute("SELECT topic, key, payload FROM outbox.messages WHERE message_id = %s", (message_id,))
        assert row.fetchone() == ("orders.created", "order-1", b'{"order":1}')
    assert message_count(db) == 1


def test_the_source_is_recorded_with_when_and_who(outbox_wal: WalSlot) -> None:
    db = outbox_wal.dsn
    with psycopg.connect(db) as conn:
        installed = schema_manager.read_source(conn, "outbox")
        user = conn.execute("SELECT current_user").fetchone()
        now = conn.execute("SELECT now()").fetchone()
    assert installed.source == "table" and now is not None and user is not None

    assert set_source(db, "wal", outbox_wal.name)
    assert not set_source(db, "wal", outbox_wal.name), "already wal: nothing changed"
    # The relay's role reads it (status, check and the relay itself).
    with role_with_grants(db, "relay", "relay") as relay, psycopg.connect(relay) as conn:
        switched = schema_manager.read_source(conn, "outbox")
    assert switched.source == "wal"
    assert switched.changed_at > now[0] and switched.changed_by == user[0]


def test_wal_is_refused_in_one_line_on_a_server_without_logical_decoding(
    outbox_wal: WalSlot, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The shared test cluster runs wal_level = logical and cannot be restarted: the
    # setting is read through a function a test can stand in for.
    db = outbox_wal.dsn
    installed = enqueue_binary_definition(db)
    monkeypatch.setattr(schema_manager, "wal_level", lambda conn: "replica")

    with pytest.raises(SchemaError) as info:
        set_source(db, "wal", outbox_wal.name)

    assert str(info.value) == (
        "wal_level is 'replica': the WAL source needs wal_level = logical (set it in postgresql.conf or with "
        "ALTER SYSTEM, then restart PostgreSQL); the source is unchanged"
    )
    assert enqueue_binary_definition(db) == installed
    with psycopg.connect(db) as conn:
        assert schema_manager.read_source(conn, "outbox").source == "table"


def test_wal_is_refused_while_no_slot_could_stream_it(db: str) -> None:
    installed = enqueue_binary_definition(db)
    with pytest.raises(SchemaError) as info:
        set_source(db, "wal")
    assert str(info.value) == (
        "no usable replication slot 'outbox_relay_outbox' (logical, pgoutput, in this database, not lost): a "
        "message enqueued in WAL mode before the relay's slot exists would never be streamed; create it first "
        "(`outbox-relay schema source wal --schema outbox --slot outbox_relay_outbox` does); the source is unchanged"
    )
    assert enqueue_binary_definition(db) == installed


def test_wal_is_refused_while_only_another_slot_exists(outbox_wal: WalSlot) -> None:
    # Another pgoutput slot in the database (another outbox's, a CDC tool's) decodes the
    # messages, but the relay streams only its own: they would never be published.
    db = outbox_wal.dsn
    installed = enqueue_binary_definition(db)
    for expected in (None, "outbox_relay_other"):
        with pytest.raises(SchemaError) as info:
            set_source(db, "wal", expected)
        name = expected or "outbox_relay_outbox"
        assert str(info.value).startswith(f"no usable replication slot {name!r} (logical, pgoutput, ")
        assert "\n" not in str(info.value)
    assert enqueue_binary_definition(db) == installed
    with psycopg.connect(db) as conn:
        assert schema_manager.read_source(conn, "outbox").source == "table"
    assert set_source(db, "wal", outbox_wal.name), "its own slot: switched"


def test_an_upgrade_from_version_7_starts_as_table(empty_db: str) -> None:
    with psycopg.connect(empty_db) as conn:
        install_at(conn, "outbox", 7)
        conn.commit()
        schema_manager.install(conn, "outbox")
        assert schema_manager.read_source(conn, "outbox").source == "table"


def emit_as(dsn: str, content: str | bytes, prefix: str = "outbox-relay:outbox") -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute("SELECT pg_logical_emit_message(true, %s, %s)", (prefix, content))
        conn.commit()


async def test_in_wal_mode_only_enqueue_can_write_into_the_relays_stream(outbox_wal: WalSlot) -> None:
    db = outbox_wal.dsn
    with bare_role(db, "intruder") as intruder:
        # Another prefix, as the relay's stream would refuse a frame that is not one.
        emit_as(intruder, "before the switch: PUBLIC's default", prefix="another-app")
        assert set_source(db, "wal", outbox_wal.name)
        for content in ("forged", b"forged"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                emit_as(intruder, content)
    with role_with_grants(db, "producer", "producer") as producer, psycopg.connect(producer) as conn:
        message_id = enqueue(conn, "orders.created", {"order": 1}, key="order-1")
        conn.commit()

    async with outbox_wal.stream() as stream:
        delivered = await committed_frames(stream, message_id)
    assert [framing.decode(content).message_id for content in delivered[-1]] == [message_id]
    with psycopg.connect(db) as conn:
        definer = conn.execute(
            "SELECT prosecdef, proconfig FROM pg_proc WHERE oid = %s::regprocedure",
            ("outbox.enqueue_binary(text, text, bytea, jsonb, text)",),
        ).fetchone()
    assert definer == (True, ["search_path=pg_catalog, pg_temp"])


def test_a_role_that_cannot_revoke_gets_the_statements_a_superuser_must_run(outbox_wal: WalSlot) -> None:
    db = outbox_wal.dsn
    with bare_role(db, "notsuper") as plain:
        with psycopg.connect(plain) as conn:
            warning = schema_manager.lock_down_emit_message(conn, "outbox")
            conn.commit()
        assert warning is not None
        assert warning.startswith(
            "warning: every role that can connect to this database can still emit logical messages into the "
            "relay's stream (pg_logical_emit_message is executable by PUBLIC) and "
        )
        assert warning.count("\n") == 0
        for args in ("boolean, text, text", "boolean, text, bytea"):
            assert f"REVOKE EXECUTE ON FUNCTION pg_catalog.pg_logical_emit_message({args}) FROM PUBLIC;" in warning
        assert "GRANT" not in warning, "enqueue's owner is a superuser: it needs no grant"
        emit_as(plain, "PUBLIC still can: nothing was revoked", prefix="another-app")


def test_a_writer_outside_enqueue_reads_the_source_from_its_body_and_a_switch_waits_for_it(
    outbox_wal: WalSlot,
) -> None:
    # A backfill chunk writes where enqueue writes (operations/backfill.py): it reads the
    # source as the producer role, which may not read settings, and holds it for its
    # transaction, so a switch cannot land between its read and its writes.
    db = outbox_wal.dsn

    def source_as(dsn: str) -> str:
        with psycopg.connect(dsn) as conn:
            return schema_manager.hold_enqueue_source(conn, "outbox")

    with role_with_grants(db, "producer", "app") as app:
        with psycopg.connect(app) as producer, pytest.raises(psycopg.errors.InsufficientPrivilege):
            producer.execute("SELECT source FROM outbox.settings")
        with psycopg.connect(app) as holder, psycopg.connect(db) as switcher:
            assert schema_manager.hold_enqueue_source(holder, "outbox") == "table"
            switcher.execute("SET lock_timeout = '300ms'")
            with pytest.raises(DatabaseError, match="lock timeout"):
                schema_manager.set_source(switcher, "outbox", "wal", slot_name=outbox_wal.name)
            holder.rollback()  # the chunk's transaction ends: the switch goes through
            switcher.rollback()
            assert schema_manager.set_source(switcher, "outbox", "wal", slot_name=outbox_wal.name)
        assert source_as(app) == "wal"
        assert set_source(db, "table", outbox_wal.name)
        assert source_as(app) == "table"
