"""`outbox-relay status --message-id`: what became of one message, and where it landed.

A message id names every row that carries it: the enqueued message, and the copies a
replay made (each delivered again under the same id). Each row says its state, its
attempts and, once dispatched, its receipt (messages.receipt: the broker, the
destination and the broker's own words, such as a Kafka partition and offset). A
message the WAL source streamed has no row: its receipt is shown when one was kept
(relay.wal.receipts), as a row without an id.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg

from outbox_relay.operations.status import printable, utc
from outbox_relay.sqlfiles import Queries


@dataclass
class MessageRow:
    id: int | None  # None: streamed by the WAL source, no row (its receipt only)
    state: str  # pending, dispatched or dead_lettered
    topic: str
    key: str | None
    created_at: datetime | None
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    dispatched_at: datetime | None
    dead_lettered_at: datetime | None
    dead_letter_reason: str | None
    receipt: dict[str, Any] | None
    # The W3C trace id of the producer's span, from the message's traceparent header
    # (None: none was carried, or streamed from the WAL).
    trace_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def lookup(
    conn: psycopg.Connection[Any], schema: str, message_id: UUID, *, settled: bool = True, pending: bool = True
) -> list[MessageRow]:
    """Every row of `message_id`, in enqueue order, then its WAL receipts (none: never
    enqueued here, or deleted by retention or a purge). `settled`: the dispatched rows,
    dead letters and WAL receipts, a probe of an index each; `pending`: the pending rows,
    which read the backlog unless the optional index exists (queries.sql). The console
    asks the two apart, so its page answers before the backlog is read."""
    with conn.transaction():
        # Every part of the query on its partial index (queries.sql, message_by_id_*): a
        # sequential scan would read every row retention keeps.
        conn.execute("SET LOCAL enable_seqscan = off")
        # With sequential scans off the plan is costed past jit_*_above_cost: ~200 ms of
        # compiling for a lookup (benchmarks/console_pages.py).
        conn.execute("SET LOCAL jit = off")
        queries = Queries(schema)
        # Pending first, then the rows that left the backlog: each statement sees its own
        # moment, and a row the relay marks or dead-letters in between is then found by
        # the second (a row is read twice at most: the later reading is kept). The other
        # order would miss it in both.
        by_id: dict[int, Any] = {}
        if pending:
            by_id.update(
                (row[0], row) for row in conn.execute(queries["message_by_id_pending"], {"message_id": message_id})
            )
        if settled:
            by_id.update(
                (row[0], row) for row in conn.execute(queries["message_by_id_settled"], {"message_id": message_id})
            )
        rows = [by_id[row_id] for row_id in sorted(by_id)]
        if settled:
            try:
                with conn.transaction():  # a savepoint: a role without the grant still gets the rows
                    rows += conn.execute(queries["wal_receipts_by_id"], {"message_id": message_id}).fetchall()
            except psycopg.errors.InsufficientPrivilege:
                pass
    return [
        MessageRow(
            id=row[0],
            state="dispatched" if row[7] is not None else "dead_lettered" if row[8] is not None else "pending",
            topic=row[1],
            key=row[2],
            created_at=row[3],
            attempts=row[4],
            next_attempt_at=row[5],
            last_error=row[6],
            dispatched_at=row[7],
            dead_lettered_at=row[8],
            dead_letter_reason=row[9],
            receipt=row[10],
            trace_id=trace_id_of(row[11]),
        )
        for row in rows
    ]


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id of a W3C traceparent (version-traceid-spanid-flags), if well formed."""
    parts = (traceparent or "").split("-")
    if len(parts) == 4 and len(parts[1]) == 32 and all(c in "0123456789abcdef" for c in parts[1]):
        return parts[1]
    return None


def render(message_id: UUID, rows: list[MessageRow]) -> str:
    """One block per row: its state, attempts, errors and receipt, one line each."""
    lines = [f"message {message_id}"]
    for row in rows:
        where = "streamed from the WAL" if row.id is None else f"row {row.id}"
        lines.append(f"  {where}: {row.state}, topic {printable(row.topic)}, key {printable(row.key)}")
        if row.created_at is not None:
            lines.append(f"    enqueued       {utc(row.created_at)}")
        lines.append(f"    attempts       {row.attempts}")
        if row.trace_id is not None:
            lines.append(f"    trace id       {row.trace_id}")
        if row.next_attempt_at is not None and row.state == "pending":
            lines.append(f"    next attempt   {utc(row.next_attempt_at)}")
        if row.last_error is not None and row.state != "dispatched":
            lines.append(f"    last error     {printable(row.last_error)}")
        if row.dead_lettered_at is not None:
            lines.append(f"    dead-lettered  {utc(row.dead_lettered_at)}: {printable(row.dead_letter_reason)}")
        if row.dispatched_at is not None:
            lines.append(f"    dispatched     {utc(row.dispatched_at)}")
            receipt = "none kept (relay.receipts off)" if row.receipt is None else json.dumps(row.receipt)
            lines.append(f"    receipt        {printable(receipt)}")
    return "\n".join(lines)


def as_json(message_id: UUID, rows: list[MessageRow]) -> str:
    return json.dumps({"message_id": str(message_id), "rows": [row.as_dict() for row in rows]}, indent=2, default=str)
