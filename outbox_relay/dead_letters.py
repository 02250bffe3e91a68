"""Dead letters: messages kept in the database with their reason, listed and requeued."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg.rows import dict_row

from outbox_relay.sqlfiles import Queries


@dataclass
class DeadLetter:
    message_id: UUID
    topic: str
    key: str | None
    attempts: int
    created_at: datetime
    dead_lettered_at: datetime
    reason: str


def glob_to_like(pattern: str) -> str:
    """A topic glob (``*`` and ``?``) as a LIKE pattern, with LIKE's own wildcards escaped."""
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def list_dead(
    conn: psycopg.Connection[Any], schema: str, *, topic: str | None = None, limit: int = 100
) -> list[DeadLetter]:
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            Queries(schema)["dead_letters_list"],
            {"topic_like": glob_to_like(topic) if topic else None, "limit": limit},
        ).fetchall()
    conn.rollback()
    return [
        DeadLetter(
            r["message_id"], r["topic"], r["key"], r["attempts"], r["created_at"],
            r["dead_lettered_at"], r["dead_letter_reason"],
        )
        for r in rows
    ]


def requeue(
    conn: psycopg.Connection[Any],
    schema: str,
    *,
    message_ids: list[UUID] | None = None,
    topic: str | None = None,
    everything: bool = False,
) -> list[UUID]:
    """Put dead letters back to pending; returns the ids requeued."""
    with conn.transaction(), conn.cursor() as cur:
        rows = cur.execute(
            Queries(schema)["dead_letters_requeue"],
            {
                "all": everything,
                "message_ids": message_ids or [],
                "topic_like": glob_to_like(topic) if topic else None,
            },
        ).fetchall()
    return [row[0] for row in rows]
