"""The outbox table as the tests see it: writers that enqueue, counts of pending and
dispatched rows, dead letters (and one made by hand), and the per-key order of what a
broker received."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from outbox_relay import enqueue, enqueue_async


def count(dsn: str, where: str = "true") -> int:
    """Rows of outbox.messages matching `where` (an SQL condition)."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(f"SELECT count(*) FROM outbox.messages WHERE {where}").fetchone()
    return int(row[0]) if row else 0


def pending(dsn: str) -> int:
    """Messages neither dispatched nor dead-lettered."""
    return count(dsn, "dispatched_at IS NULL AND dead_lettered_at IS NULL")


def dispatched(dsn: str) -> int:
    return count(dsn, "dispatched_at IS NOT NULL")


def table_stats(dsn: str, *, connect_timeout: int = 10) -> tuple[int, int, int]:
    """(rows, dead tuples, total bytes) of the outbox table."""
    with psycopg.connect(dsn, connect_timeout=connect_timeout) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM outbox.messages), n_dead_tup, pg_total_relation_size('outbox.messages') "
            "FROM pg_stat_user_tables WHERE schemaname = 'outbox' AND relname = 'messages'"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


def lag(dsn: str, *, connect_timeout: int = 5) -> tuple[int, float]:
    """(pending messages, seconds since the oldest of them was enqueued; 0 when none)."""
    with psycopg.connect(dsn, connect_timeout=connect_timeout) as conn:
        row = conn.execute(
            "SELECT count(*), coalesce(extract(epoch FROM clock_timestamp() - min(created_at)), 0) "
            "FROM outbox.messages WHERE dispatched_at IS NULL AND dead_lettered_at IS NULL"
        ).fetchone()
    assert row is not None
    return int(row[0]), float(row[1])


def lock_waits(dsn: str) -> int:
    """Sessions of this database waiting for a lock (a row another transaction holds):
    the positive signal that a claim is blocked."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
        ).fetchone()
    return int(row[0]) if row else 0


def claims_in_progress(dsn: str) -> bool:
    """Whether another session of this database is in a transaction (a relay's claim, or
    anything else): the relay is idle only when none is."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid() AND state IN ('active', 'idle in transaction')"
        ).fetchone()
    return bool(row and row[0])


def dead_letters(dsn: str) -> list[tuple[str, str, str]]:
    """(message id, key, reason) of every dead letter, in enqueue order."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT message_id::text, key, dead_letter_reason FROM outbox.messages "
            "WHERE dead_lettered_at IS NOT NULL ORDER BY id"
        ).fetchall()
    return [(r[0], r[1], r[2]) for r in rows]


def make_dead_letter(
    dsn: str,
    topic: str,
    payload: object,
    *,
    key: str | None = None,
    reason: str = "refused",
    headers: dict[str, str] | None = None,
    age: str = "0s",
    schema: str = "outbox",
) -> str:
    """Enqueue one message and leave it as the relay leaves a dead letter (3 attempts,
    `reason`), dead-lettered `age` ago; its message id."""
    with psycopg.connect(dsn) as conn:
        message_id = enqueue(conn, topic, payload, key=key, headers=headers, schema=schema)
        conn.execute(
            sql.SQL(
                "UPDATE {}.messages SET dead_lettered_at = clock_timestamp() - %s::interval, "
                "dead_letter_reason = %s, attempts = 3 WHERE message_id = %s"
            ).format(sql.Identifier(schema)),
            (age, reason, message_id),
        )
        conn.commit()
    return str(message_id)


@dataclass
class Written:
    committed: dict[str, tuple[str, int]] = field(default_factory=dict)  # id -> (key, n)
    rolled_back: set[str] = field(default_factory=set)


async def write(
    dsn: str,
    topic: str,
    keys: list[str],
    per_key: int,
    *,
    rollback_every: int = 0,
    written: Written | None = None,
    size: int = 0,
) -> Written:
    """One writer task per key (writes to one key serialized, the documented precondition);
    every `rollback_every`-th transaction is rolled back."""
    written = written or Written()

    async def writer(key: str) -> None:
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            for n in range(per_key):
                body = {"key": key, "n": n, "pad": "x" * size}
                mid = str(await enqueue_async(conn, topic, body, key=key))
                if rollback_every and n % rollback_every == rollback_every - 1:
                    await conn.rollback()
                    written.rolled_back.add(mid)
                else:
                    await conn.commit()
                    written.committed[mid] = (key, n)

    await asyncio.gather(*(writer(k) for k in keys))
    return written


def sequence_by_key(payloads: list[bytes]) -> dict[str, list[int]]:
    """First-delivery order of `n` per key, from JSON payloads in delivery order."""
    out: dict[str, list[int]] = {}
    seen: set[tuple[str, int]] = set()
    for raw in payloads:
        body = json.loads(raw)
        marker = (body["key"], body["n"])
        if marker in seen:
            continue
        seen.add(marker)
        out.setdefault(body["key"], []).append(body["n"])
    return out
