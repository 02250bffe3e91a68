"""The WAL source's test helpers: a slot per test, frames written by SQL, and reading a
stream until a known transaction arrives."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg

from outbox_relay.sources.wal import framing, slot
from outbox_relay.sources.wal.stream import WalStream
from tests.support.cli import run_cli
from tests.support.waiting import wait_for

PREFIX = framing.PREFIX_FOR("outbox")

# The frame (outbox_relay/sources/wal/framing.py) built by SQL alone, for the schema's
# future enqueue in WAL mode: tests/integration/test_wal_framing_sql.py proves it yields
# the same bytes as framing.encode. A temporary function: nothing is installed.
# convert_to, not ::bytea: a text cast to bytea takes backslashes as escapes and keeps
# the database's encoding; the frame is UTF-8 whatever the database's encoding.
FRAME_FUNCTION = r"""
CREATE FUNCTION pg_temp.outbox_frame(
    message_id uuid, topic text, key text, content_type text, headers jsonb, payload bytea
) RETURNS bytea LANGUAGE sql IMMUTABLE AS $$
    SELECT '\x10'::bytea
        || uuid_send(message_id)
        || int2send(octet_length(t)::int2) || t
        || coalesce(int2send(octet_length(k)::int2) || k, int2send(-1::int2))
        || int4send(octet_length(c)) || c
        || int4send(octet_length(h)) || h
        || int4send(octet_length(payload)) || payload
    FROM (
        SELECT convert_to(topic, 'UTF8') AS t,
               convert_to(key, 'UTF8') AS k,
               convert_to(content_type, 'UTF8') AS c,
               convert_to(headers::text, 'UTF8') AS h
    ) AS utf8
$$
"""


@dataclass(frozen=True)
class WalSlot:
    dsn: str
    name: str  # of the slot and of the publication

    def stream(self, dsn: str | None = None, **options: Any) -> WalStream:
        """A stream of this slot, over `dsn` if given (a proxy, other settings)."""
        return WalStream(dsn or self.dsn, slot_name=self.name, publication=self.name, prefix=PREFIX, **options)


def require_logical_wal(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT current_setting('wal_level')").fetchone()
    assert row == ("logical",), (
        f"the WAL source's tests need wal_level = logical, the server has {row}: tests/services.py starts its "
        "local cluster so; set it on the server OUTBOX_RELAY_TEST_DSN names"
    )


@contextlib.contextmanager
def wal_slot(dsn: str) -> Iterator[WalSlot]:
    """A new slot and publication in the database of `dsn`, dropped afterwards (a slot
    keeps its database from being dropped, and WAL from being recycled)."""
    require_logical_wal(dsn)
    name = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        slot.create(conn, name, name)
    try:
        yield WalSlot(dsn, name)
    finally:
        drop_slot(dsn, name)


@contextlib.contextmanager
def outbox_in_wal_mode(dsn: str) -> Iterator[str]:
    """The outbox of `dsn` switched to wal by the real CLI (`schema install --source wal`)
    with a slot of its own (slot names are the cluster's); yields the slot's name, and
    drops the slot and its publication afterwards, whoever streams them then."""
    require_logical_wal(dsn)
    name = f"t_{uuid.uuid4().hex[:16]}"
    try:
        done = run_cli("schema", "install", "--source", "wal", "--slot", name, env={"DATABASE_URL": dsn})
        assert done.returncode == 0 and "is now in wal mode" in done.stdout, done.stdout + done.stderr
        yield name
    finally:
        drop_slot(dsn, name)


def drop_slot(dsn: str, name: str) -> None:
    """Drop the slot and publication `name` if they exist (a slot keeps its database from
    being dropped), ending whatever streams it first."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        # A stream a failed test left open would keep the slot active.
        conn.execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = %s",
            (name,),
        )
    wait_until_inactive(dsn, name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        slot.drop(conn, name, name)


def wait_until_inactive(dsn: str, name: str) -> None:
    """A closed stream's walsender lets go of the slot a moment after the client left."""

    def inactive() -> bool:
        with psycopg.connect(dsn, autocommit=True) as conn:
            state = slot.read_state(conn, name)
        return state is None or not state.active

    wait_for(inactive, 20, f"slot {name} released")


def confirmed_flush(dsn: str, name: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        state = slot.read_state(conn, name)
    assert state is not None and state.confirmed_flush_lsn is not None
    return state.confirmed_flush_lsn


def frame(payload: bytes, *, topic: str = "orders.created", key: str | None = None) -> bytes:
    return framing.encode(uuid.uuid4(), topic, key, "application/octet-stream", "{}", payload)


def emit(conn: psycopg.Connection[Any], *payloads: bytes, prefix: str = PREFIX, transactional: bool = True) -> None:
    """One logical message per payload, framed, in `conn`'s current transaction."""
    for payload in payloads:
        conn.execute("SELECT pg_logical_emit_message(%s, %s, %s::bytea)", (transactional, prefix, frame(payload)))


def commit_messages(dsn: str, *payloads: bytes) -> int:
    """One committed transaction of `payloads`; its xid."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()
        emit(conn, *payloads)
    assert row is not None
    return int(row[0])


@dataclass
class Delivered:
    """One transaction as the stream delivered it."""

    xid: int
    commit_lsn: int
    end_lsn: int
    payloads: list[bytes]
    parts: int


async def read_until(stream: WalStream, last_payload: bytes, *, timeout: float = 30.0) -> list[Delivered]:
    """Every transaction the stream delivers, up to the one that holds `last_payload`.
    Arriving at it is the positive signal after which a test may say what did not come:
    the stream delivers in commit order."""
    delivered: list[Delivered] = []
    current: Delivered | None = None
    async with asyncio.timeout(timeout):
        async for part in stream:
            if current is None:
                current = Delivered(part.xid, part.commit_lsn, 0, [], 0)
            assert (part.xid, part.commit_lsn) == (current.xid, current.commit_lsn), "parts of two transactions mixed"
            current.payloads.extend(framing.decode(message.content).payload for message in part.messages)
            current.parts += 1
            if part.end_lsn is not None:
                current.end_lsn = part.end_lsn
                delivered.append(current)
                if last_payload in current.payloads:
                    return delivered
                current = None
    raise AssertionError("the stream ended")


async def committed_frames(
    stream: WalStream, last_message_id: uuid.UUID, *, timeout: float = 30.0
) -> list[list[bytes]]:
    """The frames of every transaction the stream delivers, one list per transaction, up
    to the one that holds the message `last_message_id` (the positive signal, as in
    read_until)."""
    delivered: list[list[bytes]] = []
    current: list[bytes] = []
    async with asyncio.timeout(timeout):
        async for part in stream:
            current.extend(message.content for message in part.messages)
            if part.end_lsn is not None:
                delivered.append(current)
                if any(framing.decode(content).message_id == last_message_id for content in current):
                    return delivered
                current = []
    raise AssertionError("the stream ended")
