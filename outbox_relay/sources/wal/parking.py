"""The WAL source's retry path: the outbox table.

A message read from the WAL that its broker did not take is *parked*: inserted into the
outbox table with its message id, topic, key, content type, headers and payload, and
the state its outcome says (engine/store.py's RecordKind: ``retry``, an attempt spent
and a retry time; ``wait``, a retry time and no attempt spent; ``dead``, dead-lettered
with its reason; none, a pending row due at once, behind its key's earlier rows). From
there the table engine owns it: retries with backoff, dead letters, hold and release,
requeue, status, replay.

Order: the rows of one call are inserted in the order given (stream order), so their
ids, the table's enqueue order, follow it. A key the table holds back (``held_keys``: a
pending row of it, or under ``hold`` a dead letter) is parked whole from then on: its
later messages go into the table behind what is there, never around it.

Which keys are held is read from the table as a snapshot, at most once every
``snapshot_ttl`` seconds (1 s), when it holds at most ``snapshot_limit`` such keys (a
skip scan: one index probe per key), and each part is checked against it in memory; the
keys parked since are added to it at once. Past the limit (a table source's backlog
of many keys) each part's keys are looked up instead, one query per part. So a key the
table engine has drained may go on being parked for up to ``snapshot_ttl``, which only
keeps its order; and a key another hand starts holding (a requeue, a replay, a table
source's producer) is seen within ``snapshot_ttl``.

Across a switch to table (migrations/0009_switch_order.sql): while the slot drains, a
park takes its ids from the gap the switch left below the drain gate, so the drained
messages go behind their key's older rows and before every row enqueued since, which
the claim holds back until the drain ends.

Once: each park records the position of the batch's last message (done_through), as
does each batch that ends inside a transaction (mark_done); a relay that restarts before
the slot took its confirmed position skips what lies at or before it (in the table
already, or acked) instead of parking it twice or publishing a large transaction's
acked part again.

Lifecycle: one connection, opened by ``open`` (or ``async with``), used by one task.
Each call is one committed transaction; a database error raises (psycopg's), and the
caller has confirmed nothing of what it was parking, so the stream delivers it again.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Collection, Sequence
from dataclasses import replace
from types import TracebackType
from typing import Any, Self
from uuid import UUID

import psycopg
from psycopg import sql

from outbox_relay.adapter import Fenced
from outbox_relay.connections import PREPARE_THRESHOLD, connect_once
from outbox_relay.engine.store import OutboxStore
from outbox_relay.models import Message, RecordKind
from outbox_relay.sources.wal import pgoutput, slot
from outbox_relay.sources.wal.outcomes import Parked
from outbox_relay.sqlfiles import Queries

SNAPSHOT_TTL_S = 1.0
SNAPSHOT_LIMIT = 10_000


class Parking:
    """Parks messages into the outbox table of `schema`; see the module docstring."""

    def __init__(
        self,
        dsn: str,
        schema: str,
        *,
        hold_dead_letters: bool,
        prepare_threshold: int | None = PREPARE_THRESHOLD,
        snapshot_ttl: float = SNAPSHOT_TTL_S,
        snapshot_limit: int = SNAPSHOT_LIMIT,
        feed_dead_letters: bool = True,
    ):
        self._dsn = dsn
        self._hold = hold_dead_letters
        self._prepare_threshold = prepare_threshold
        self._queries = Queries(schema)
        # The table engine's statements for a batch's settings and for what an outcome
        # means in a row: one place for each, shared with the table source.
        self._store = OutboxStore(
            self._queries, hold_dead_letters=hold_dead_letters, feed_dead_letters=feed_dead_letters
        )
        name = sql.Identifier(self._queries.schema)
        self._held_keys = sql.SQL(slot.text("held_keys")).format(schema=name)
        self._held_snapshot = sql.SQL(slot.text("held_keys_snapshot")).format(schema=name)
        self._ttl = snapshot_ttl
        self._limit = snapshot_limit
        self._snapshot: set[str] | None = None  # None: too many keys, ask per part
        self._snapshot_until = float("-inf")
        self._park = sql.SQL(slot.text("park_messages")).format(schema=name)
        self._park_at = sql.SQL(slot.text("park_messages_at")).format(schema=name)
        self._park_begin = sql.SQL(slot.text("park_begin")).format(schema=name)
        self._park_end = sql.SQL(slot.text("park_end")).format(schema=name)
        self._streamed_by = sql.SQL(slot.text("slot_streamed_by"))
        self._done_through = sql.SQL(slot.text("done_through")).format(schema=name)
        self._mark_done = sql.SQL(slot.text("mark_done")).format(schema=name)
        self._parked_of = sql.SQL(slot.text("parked_of")).format(schema=name)
        self._record_receipts = sql.SQL(slot.text("record_receipts")).format(schema=name)
        self._record_delivered = sql.SQL(slot.text("record_delivered")).format(schema=name)
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def open(self) -> None:
        self._conn = await connect_once(self._dsn, prepare_threshold=self._prepare_threshold)

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed:
            raise RuntimeError("Parking is not open")
        return self._conn

    async def held_keys(self, keys: Collection[str]) -> set[str]:
        """Which of `keys` the table holds back: their messages are parked, not published."""
        if not keys:
            return set()
        now = asyncio.get_running_loop().time()
        if now >= self._snapshot_until:
            self._snapshot = await self._read_snapshot()
            self._snapshot_until = now + self._ttl
        if self._snapshot is not None:
            return self._snapshot.intersection(keys)
        return {str(row[0]) for row in await self._query(self._held_keys, {"keys": list(keys)})}

    def note_held(self, keys: Collection[str]) -> None:
        """Keys just parked behind (their park committed): held from now on."""
        if self._snapshot is not None:
            self._snapshot.update(keys)

    async def _read_snapshot(self) -> set[str] | None:
        rows = await self._query(self._held_snapshot, {"limit": self._limit})
        if sum(1 for dead, _ in rows if not dead) > self._limit or sum(1 for dead, _ in rows if dead) > self._limit:
            return None
        return {str(key) for _, key in rows}

    async def _query(self, query: sql.Composed, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        conn = self._connection()
        async with conn.transaction():
            # The claim's planner settings (queries.sql, batch_settings): these queries
            # are written for index probes whatever the table's statistics say.
            await conn.execute(self._queries["batch_settings"], {"idle_ms": None, "statement_ms": None})
            cursor = await conn.execute(query, {**params, "hold_dead_letters": self._hold})
            return await cursor.fetchall()

    async def done_through(self) -> tuple[int, int] | None:
        """The position of the last message parked (its commit's start LSN, its own LSN):
        everything up to it is in the table or was acked, since a part is parked only
        once all its messages are done. None: nothing parked yet."""
        rows = await self._query(self._done_through, {})
        commit_lsn, lsn = rows[0] if rows else (None, None)
        if commit_lsn is None or lsn is None:
            return None
        return pgoutput.parse_lsn(str(commit_lsn)), pgoutput.parse_lsn(str(lsn))

    async def parked_of(self, message_ids: Collection[UUID]) -> set[UUID]:
        """Which of `message_ids` are in the table (parked)."""
        if not message_ids:
            return set()
        return {row[0] for row in await self._query(self._parked_of, {"ids": list(message_ids)})}

    async def mark_done(self, through: tuple[int, int]) -> None:
        """Every message up to `through` (commit start LSN, message LSN) is done."""
        conn = self._connection()
        async with conn.transaction():
            await conn.execute(
                self._mark_done,
                {"commit_lsn": pgoutput.format_lsn(through[0]), "lsn": pgoutput.format_lsn(through[1])},
            )

    async def record_acked(
        self, receipts: Sequence[tuple[Message, str]], delivered: Sequence[tuple[Message, str | None]]
    ) -> None:
        """What the relay keeps of acked messages, in one committed transaction before the
        caller confirms their position: `receipts` (relay.wal.receipts) and outcome rows
        of the `delivered` (outcomes.delivered topics), each with its receipt or None."""
        if not receipts and not delivered:
            return
        conn = self._connection()
        async with conn.transaction():
            if receipts:
                await conn.execute(
                    self._record_receipts,
                    {
                        **_identities(receipts),
                        "receipts": [receipt for _, receipt in receipts],
                    },
                )
            if delivered:
                await conn.execute(
                    self._record_delivered,
                    {
                        **_identities(delivered),
                        "payloads": [m.payload for m, _ in delivered],
                        "content_types": [m.content_type for m, _ in delivered],
                        "headers": [_headers_json(m) for m, _ in delivered],
                        "enqueued_at": [m.created_at for m, _ in delivered],
                        "receipts": [receipt for _, receipt in delivered],
                    },
                )

    async def park(
        self, parked: Sequence[Parked], through: tuple[int, int], *, streamer: tuple[str, int] | None = None
    ) -> None:
        """Insert `parked` (in stream order) and write their outcomes, in one transaction,
        recording `through` (the position of the part's last message: see done_through).

        The settings row is locked first, so a switch of source is wholly before or after
        the park: while the slot drains after a switch to table, the rows take their ids
        from the drain's gap (settings.drain_next), below every row enqueued since."""
        if not parked:
            return
        if any(record is not None and record.kind is RecordKind.ACKED for _, record in parked):
            raise ValueError("an acked message is never parked")
        messages = [message for message, _ in parked]
        conn = self._connection()
        async with conn.transaction():
            cursor = await conn.execute(self._park_begin)
            row = await cursor.fetchone()
            first_id = None if row is None else row[0]
            if streamer is not None:
                # Exactly once: only while the slot is still streamed by this relay's
                # walsender (the query says why).
                slot_name, pid = streamer
                cursor = await conn.execute(self._streamed_by, {"slot": slot_name})
                active = await cursor.fetchone()
                if active is None or active[0] != pid:
                    raise Fenced(
                        f"the slot {slot_name!r} is streamed by another walsender"
                        f" ({None if active is None else active[0]}, not {pid}): another relay took it over"
                    )
            cursor = await conn.execute(
                self._park if first_id is None else self._park_at,
                {
                    "first_id": first_id,
                    "message_ids": [m.message_id for m in messages],
                    "topics": [m.topic for m in messages],
                    "keys": [m.key for m in messages],
                    "payloads": [m.payload for m in messages],
                    "content_types": [m.content_type for m in messages],
                    "headers": [_headers_json(m) for m in messages],
                },
            )
            # Identities rise in insertion order (park_messages), so the n-th smallest
            # is the n-th message's row.
            ids = sorted(int(row[0]) for row in await cursor.fetchall())
            if len(ids) != len(parked):
                raise RuntimeError(f"parked {len(parked)} messages, the table returned {len(ids)} rows")
            outcomes = [replace(record, id=row_id) for (_, record), row_id in zip(parked, ids, strict=True) if record]
            await self._store.record(conn, outcomes)
            await conn.execute(
                self._park_end,
                {
                    "count": len(parked),
                    "commit_lsn": pgoutput.format_lsn(through[0]),
                    "lsn": pgoutput.format_lsn(through[1]),
                },
            )


def _headers_json(message: Message) -> str:
    return json.dumps(dict(message.headers), ensure_ascii=False, separators=(",", ":"))


def _identities(acked: Sequence[tuple[Message, str | None]]) -> dict[str, list[Any]]:
    """The message id, topic and key arrays both of record_acked's statements take."""
    return {
        "message_ids": [m.message_id for m, _ in acked],
        "topics": [m.topic for m, _ in acked],
        "keys": [m.key for m, _ in acked],
    }
