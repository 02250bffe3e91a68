"""The WAL source's positions against a real PostgreSQL: what the stream confirms to the
slot, when, and what a new stream resumes from."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from outbox_relay.sources.wal import slot
from outbox_relay.sources.wal.errors import ReplicationError
from outbox_relay.sources.wal.stream import WalStream
from outbox_relay.sources.wal.transactions import TransactionPart
from tests.support.databases import fresh_database
from tests.support.toxiproxy import MakeProxy
from tests.support.waiting import wait_until
from tests.support.wal import (
    WalSlot,
    commit_messages,
    confirmed_flush,
    read_until,
    wait_until_inactive,
)


async def slot_confirmed(wal: WalSlot) -> int:
    async with await psycopg.AsyncConnection.connect(wal.dsn, autocommit=True) as conn:
        state = await slot.read_state_async(conn, wal.name)
    assert state is not None and state.confirmed_flush_lsn is not None
    return state.confirmed_flush_lsn


@contextlib.asynccontextmanager
async def reading_in_background(stream: WalStream) -> AsyncIterator[list[TransactionPart]]:
    """Iterate `stream` in a task (it reads the keepalives too); yield what it got."""
    parts: list[TransactionPart] = []

    async def read() -> None:
        async for part in stream:
            parts.append(part)

    task = asyncio.create_task(read())
    try:
        yield parts
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def commits(parts: list[TransactionPart]) -> list[int]:
    """The end LSNs of the transactions whose last part arrived."""
    return [part.end_lsn for part in parts if part.end_lsn is not None]


async def walsender_replies(wal: WalSlot, count: int) -> None:
    """Until the slot's walsender has had `count` more status updates from its client,
    on one and the same connection (pg_stat_replication.reply_time)."""
    seen: set[object] = set()
    pids: set[object] = set()

    async def more() -> bool:
        async with await psycopg.AsyncConnection.connect(wal.dsn, autocommit=True) as conn:
            cursor = await conn.execute(
                "SELECT r.pid, r.reply_time FROM pg_stat_replication r "
                "JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = %s",
                (wal.name,),
            )
            row = await cursor.fetchone()
        if row is not None:
            pids.add(row[0])
            seen.add(row[1])
        return len(seen) > count

    await wait_until(more, timeout=20, interval=0.1, what=f"{count} status updates")
    assert len(pids) == 1, f"the walsender changed: {pids}"


async def test_a_new_stream_resumes_after_the_confirmed_transaction(wal: WalSlot) -> None:
    commit_messages(wal.dsn, b"a")
    commit_messages(wal.dsn, b"b")
    commit_messages(wal.dsn, *(b"c%d" % i for i in range(2500)))

    async with wal.stream(max_part_messages=1000) as stream:
        first = await read_until(stream, b"b")
        assert [d.payloads for d in first] == [[b"a"], [b"b"]]
        stream.confirm(first[1].end_lsn)
        # The first part of c (parts go out as the network delivers them), never
        # confirmed: c must come again, whole.
        partial = await anext(stream)
        assert partial.messages and not partial.last
    # Leaving the stream returns once the server took the confirmed position.
    assert confirmed_flush(wal.dsn, wal.name) == first[1].end_lsn
    wait_until_inactive(wal.dsn, wal.name)
    commit_messages(wal.dsn, b"d")

    async with wal.stream(max_part_messages=1000) as stream:
        again = await read_until(stream, b"d")

    assert [d.payloads for d in again] == [[b"c%d" % i for i in range(2500)], [b"d"]]
    assert again[0].parts >= 3  # at most 1000 messages a part


async def test_confirm_refuses_a_position_beyond_what_was_delivered(wal: WalSlot) -> None:
    commit_messages(wal.dsn, b"a")
    async with wal.stream() as stream:
        (delivered,) = await read_until(stream, b"a")
        with pytest.raises(ValueError, match="beyond the last transaction delivered"):
            stream.confirm(delivered.end_lsn + 1)
        stream.confirm(delivered.end_lsn)


async def test_keepalives_are_answered_and_carry_the_confirmed_position(wal: WalSlot) -> None:
    # No periodic update for an hour: only answers to the server's keepalives can keep the
    # connection past its 1 s timeout and move the slot.
    dsn = make_conninfo(wal.dsn, options="-c wal_sender_timeout=1s")
    commit_messages(wal.dsn, b"a")
    stream = wal.stream(dsn, status_interval=3600)
    async with stream, reading_in_background(stream) as parts:
        await wait_until(lambda: commits(parts), what="transaction a")
        (end,) = commits(parts)
        assert end > await slot_confirmed(wal)
        stream.confirm(end)

        await wait_until(lambda: _at_least(wal, end), what="the slot at a's commit end")
        await walsender_replies(wal, 4)  # 2 s: twice the server's timeout
        commit_messages(wal.dsn, b"b")
        await wait_until(lambda: len(commits(parts)) == 2, what="transaction b on the same connection")


async def _at_least(wal: WalSlot, lsn: int) -> bool:
    return await slot_confirmed(wal) >= lsn


async def test_a_confirmed_position_reaches_the_slot_at_once(wal: WalSlot) -> None:
    # No periodic update for an hour, and the server's keepalives come every 30 s (half its
    # default 60 s timeout): within 2 s, only the report a confirm triggers moves the slot.
    # Reported at the next interval instead, a relay killed meanwhile would send again
    # everything acked in that interval.
    commit_messages(wal.dsn, b"a")
    stream = wal.stream(status_interval=3600)
    async with stream, reading_in_background(stream) as parts:
        await wait_until(lambda: commits(parts), what="transaction a")
        (end,) = commits(parts)
        assert end > await slot_confirmed(wal)
        stream.confirm(end)
        await wait_until(lambda: _at_least(wal, end), timeout=2, what="the slot at a's commit end")


async def test_status_updates_go_out_while_the_caller_does_not_read(wal: WalSlot) -> None:
    dsn = make_conninfo(wal.dsn, options="-c wal_sender_timeout=1s")
    commit_messages(wal.dsn, b"a")
    stream = wal.stream(dsn, status_interval=0.2)
    async with stream:
        (delivered,) = await read_until(stream, b"a")
        stream.confirm(delivered.end_lsn)
        # Not reading (a caller held up by its broker): the slot still moves, and the
        # connection outlives the server's timeout.
        await wait_until(lambda: _at_least(wal, delivered.end_lsn), what="the slot at a's commit end")
        await walsender_replies(wal, 8)
        commit_messages(wal.dsn, b"b")
        assert [d.payloads for d in await read_until(stream, b"b")] == [[b"b"]]


async def test_an_idle_outbox_lets_the_slot_advance_past_other_wal(wal: WalSlot, admin_dsn: str) -> None:
    commit_messages(wal.dsn, b"a")
    async with wal.stream(status_interval=0.2) as stream, reading_in_background(stream) as parts:
        await wait_until(lambda: commits(parts), what="transaction a")
        (end,) = commits(parts)
        stream.confirm(end)
        with fresh_database(admin_dsn, None) as elsewhere, psycopg.connect(elsewhere, autocommit=True) as conn:
            conn.execute("CREATE TABLE busy AS SELECT generate_series(1, 10000) AS n")
            row = conn.execute("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint").fetchone()
        assert row is not None
        beyond = int(row[0])
        assert beyond > end

        await wait_until(lambda: _at_least(wal, beyond), what="the slot past the other database's WAL")
        assert commits(parts) == [end]  # nothing of that WAL was handed out
        assert sum(len(part.messages) for part in parts) == 1


async def test_a_silent_server_is_taken_for_a_lost_connection(wal: WalSlot, proxy: MakeProxy) -> None:
    params = conninfo_to_dict(wal.dsn)
    server = proxy(f"{params.get('host') or '127.0.0.1'}:{params.get('port') or 5432}")
    dsn = make_conninfo(wal.dsn, host="127.0.0.1", port=str(server.port))
    commit_messages(wal.dsn, b"a")
    stream = wal.stream(dsn, status_interval=0.2)
    async with stream:
        assert [d.payloads for d in await read_until(stream, b"a")] == [[b"a"]]
        with server.stalled(), pytest.raises(ReplicationError, match="no word from the server"):
            async with asyncio.timeout(20):
                await anext(stream)


async def test_a_terminated_walsender_ends_the_iteration_with_the_servers_reason(wal: WalSlot) -> None:
    commit_messages(wal.dsn, b"a")
    async with wal.stream() as stream:
        assert [d.payloads for d in await read_until(stream, b"a")] == [[b"a"]]
        with psycopg.connect(wal.dsn, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = %s", (wal.name,)
            )
        with pytest.raises(ReplicationError, match="terminating connection due to administrator command"):
            async with asyncio.timeout(20):
                await anext(stream)
