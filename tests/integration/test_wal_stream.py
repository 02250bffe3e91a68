"""The WAL source's stream against a real PostgreSQL (wal_level = logical): what is
delivered, in which order, with which positions, and what never is.

Each test says what IS delivered first (a known transaction arriving is the positive
signal), then what is not: the stream delivers in commit order, so anything that would
have come from an earlier transaction would have come before it."""

from __future__ import annotations

import time
import tracemalloc

import psycopg
import pytest

from outbox_relay.sources.wal import pgoutput
from outbox_relay.sources.wal.errors import SlotInUse, SlotMissing
from outbox_relay.sources.wal.stream import WalStream
from tests.support.databases import fresh_database
from tests.support.wal import (
    PREFIX,
    WalSlot,
    commit_messages,
    emit,
    frame,
    read_until,
    wait_until_inactive,
)


def commit_ends_by_sql(wal: WalSlot) -> list[int]:
    """The end LSN of every pending commit, as the SQL interface of logical decoding
    reports it (the row of a commit carries the commit record's end): a second opinion
    on the positions the stream hands out. Peeking consumes nothing."""
    with psycopg.connect(wal.dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT lsn::text, data FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, "
            "'proto_version', '1', 'publication_names', %s, 'messages', 'true')",
            (wal.name, wal.name),
        ).fetchall()
    return [pgoutput.parse_lsn(lsn) for lsn, data in rows if isinstance(pgoutput.decode(bytes(data)), pgoutput.Commit)]


async def test_committed_transactions_arrive_in_commit_order_with_their_commit_end_lsn(wal: WalSlot) -> None:
    first = commit_messages(wal.dsn, b"a1", b"a2", b"a3")
    second = commit_messages(wal.dsn, b"b1", b"b2")
    expected_ends = commit_ends_by_sql(wal)

    async with wal.stream() as stream:
        delivered = await read_until(stream, b"b2")

    assert [(d.xid, d.payloads) for d in delivered] == [(first, [b"a1", b"a2", b"a3"]), (second, [b"b1", b"b2"])]
    assert [d.end_lsn for d in delivered] == expected_ends
    assert all(d.commit_lsn < d.end_lsn for d in delivered)


async def test_a_rolled_back_transaction_delivers_nothing(wal: WalSlot) -> None:
    with psycopg.connect(wal.dsn) as conn:
        emit(conn, b"rolled-back-1", b"rolled-back-2")
        conn.rollback()
    commit_messages(wal.dsn, b"after")

    async with wal.stream() as stream:
        delivered = await read_until(stream, b"after")

    assert [d.payloads for d in delivered] == [[b"after"]]


async def test_rollback_to_savepoint_drops_that_subtransactions_messages_only(wal: WalSlot) -> None:
    with psycopg.connect(wal.dsn, autocommit=True) as conn:
        conn.execute("BEGIN")
        emit(conn, b"kept-1")
        conn.execute("SAVEPOINT s")
        emit(conn, b"dropped-1", b"dropped-2")
        conn.execute("ROLLBACK TO SAVEPOINT s")
        emit(conn, b"kept-2")
        conn.execute("SAVEPOINT t")
        emit(conn, b"kept-3")
        conn.execute("RELEASE SAVEPOINT t")
        conn.execute("COMMIT")

    async with wal.stream() as stream:
        delivered = await read_until(stream, b"kept-3")

    assert [d.payloads for d in delivered] == [[b"kept-1", b"kept-2", b"kept-3"]]


async def test_other_prefixes_and_non_transactional_messages_are_not_delivered(wal: WalSlot) -> None:
    with psycopg.connect(wal.dsn) as conn:
        emit(conn, b"other-schema", prefix="outbox-relay:billing")
        emit(conn, b"ours-1")
        # A prefix that starts with ours: another outbox whose schema name extends ours.
        emit(conn, b"longer-prefix", prefix=PREFIX + "2")
        emit(conn, b"ours-2")
    with psycopg.connect(wal.dsn) as conn:
        emit(conn, b"only-other", prefix="someone-else")
    with psycopg.connect(wal.dsn, autocommit=True) as conn:
        emit(conn, b"non-transactional", transactional=False)
    with psycopg.connect(wal.dsn) as conn:
        # Written to the WAL at once, so it survives its transaction's rollback.
        emit(conn, b"non-transactional-in-rollback", transactional=False)
        conn.rollback()
    commit_messages(wal.dsn, b"after")

    async with wal.stream() as stream:
        delivered = await read_until(stream, b"after")

    assert [d.payloads for d in delivered] == [[b"ours-1", b"ours-2"], [b"after"]]


async def test_another_databases_messages_are_not_delivered(wal: WalSlot, admin_dsn: str) -> None:
    with fresh_database(admin_dsn, None) as elsewhere:
        commit_messages(elsewhere, b"elsewhere")
        commit_messages(wal.dsn, b"here")

        async with wal.stream() as stream:
            delivered = await read_until(stream, b"here")

    assert [d.payloads for d in delivered] == [[b"here"]]


async def test_a_prepared_transaction_is_delivered_at_commit_prepared_only(wal: WalSlot) -> None:
    def prepare(gid: str, payload: bytes) -> None:
        with psycopg.connect(wal.dsn, autocommit=True) as conn:
            conn.execute("BEGIN")
            emit(conn, payload)
            conn.execute(psycopg.sql.SQL("PREPARE TRANSACTION {}").format(psycopg.sql.Literal(gid)))

    def finish(command: str, gid: str) -> None:
        with psycopg.connect(wal.dsn, autocommit=True) as conn:
            conn.execute(psycopg.sql.SQL(command + " {}").format(psycopg.sql.Literal(gid)))

    prepare("to-commit", b"prepared")
    prepare("to-roll-back", b"prepared-then-rolled-back")
    commit_messages(wal.dsn, b"while-prepared")
    async with wal.stream() as stream:
        assert [d.payloads for d in await read_until(stream, b"while-prepared")] == [[b"while-prepared"]]

        finish("COMMIT PREPARED", "to-commit")
        assert [d.payloads for d in await read_until(stream, b"prepared")] == [[b"prepared"]]

        finish("ROLLBACK PREPARED", "to-roll-back")
        commit_messages(wal.dsn, b"after")
        assert [d.payloads for d in await read_until(stream, b"after")] == [[b"after"]]


async def test_a_large_transaction_streams_in_parts_with_bounded_memory(wal: WalSlot) -> None:
    count = 200_000
    body = frame(b"x" * 200)  # a 250-byte frame; the sequence number follows it
    with psycopg.connect(wal.dsn) as conn:
        conn.execute(
            "SELECT pg_logical_emit_message(true, %s, %s::bytea || int4send(g)) FROM generate_series(1, %s) AS g",
            (PREFIX, body, count),
        )
    content_size = len(body) + 4

    # Twice over the same transaction, never confirmed: first under tracemalloc for the
    # memory, then without it (it slows Python several times) for the speed.
    tracemalloc.start()
    try:
        async with wal.stream() as stream:
            seen, parts, largest = await _drain(stream, count)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == count
    assert largest <= 1000  # max_part_messages, the default
    held_whole = count * content_size
    print(
        f"\n{count} messages in {parts} parts; reader's peak Python memory {peak / 2**20:.1f} MiB "
        f"(the contents alone: {held_whole / 2**20:.1f} MiB)"
    )
    assert peak < 16 * 2**20, f"peak {peak} bytes"
    assert peak < held_whole / 3

    wait_until_inactive(wal.dsn, wal.name)  # the first stream's walsender lets go of the slot
    async with wal.stream() as stream:
        wall, cpu = time.perf_counter(), time.process_time()
        seen, parts, _ = await _drain(stream, count)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert seen == count
    print(f"reader: {count / wall:,.0f} messages/s, {cpu / count * 1e6:.2f} µs of Python CPU per message")


async def _drain(stream: WalStream, count: int) -> tuple[int, int, int]:
    """Read one transaction of `count` numbered messages, checking their order; (messages
    seen, parts, the largest part). Holds nothing but counters."""
    seen = parts = largest = 0
    async for part in stream:
        parts += 1
        largest = max(largest, len(part.messages))
        for message in part.messages:
            seen += 1
            assert int.from_bytes(message.content[-4:], "big") == seen
        if part.last:
            return seen, parts, largest
    raise AssertionError("the stream ended")


async def test_a_missing_slot_and_a_busy_slot_are_refused(wal: WalSlot) -> None:
    with pytest.raises(SlotMissing, match="does not exist"):
        await WalStream(wal.dsn, slot_name="t_no_such_slot", publication=wal.name, prefix=PREFIX).open()
    async with wal.stream():
        with pytest.raises(SlotInUse, match="is active for PID"):
            await wal.stream().open()
