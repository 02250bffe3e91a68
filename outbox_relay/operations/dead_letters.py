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


_REGEX_SPECIAL = set(".^$*+?()[]{}|\\")


def glob_to_regex(pattern: str) -> str:
    """A topic glob as an anchored PostgreSQL regular expression, with the same meaning
    as in routes (fnmatch: ``*``, ``?``, ``[seq]``, ``[!seq]``; an unclosed ``[`` is a
    literal), so ``dead-letters --topic`` selects what a route with that glob would."""
    out = ["^"]
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            j = i + 1 if i < n and pattern[i] == "!" else i
            j = j + 1 if j < n and pattern[j] == "]" else j
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:
                out.append("\\[")
                continue
            members, i = pattern[i:j], j + 1
            negate = members.startswith("!")
            members = members[1:] if negate else members
            members = members.replace("\\", "\\\\").replace("[", "\\[")
            if not negate and members.startswith("^"):
                members = "\\" + members
            out.append("[" + ("^" if negate else "") + members + "]")
        else:
            out.append("\\" + c if c in _REGEX_SPECIAL else c)
    out.append("$")
    return "".join(out)


def list_dead(
    conn: psycopg.Connection[Any], schema: str, *, topic: str | None = None, limit: int = 100
) -> list[DeadLetter]:
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            Queries(schema)["dead_letters_list"],
            {"topic_regex": glob_to_regex(topic) if topic else None, "limit": limit},
        ).fetchall()
    conn.rollback()
    return [
        DeadLetter(
            r["message_id"],
            r["topic"],
            r["key"],
            r["attempts"],
            r["created_at"],
            r["dead_lettered_at"],
            r["dead_letter_reason"],
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
                "topic_regex": glob_to_regex(topic) if topic else None,
            },
        ).fetchall()
    return [row[0] for row in rows]


def cut_for(conn: psycopg.Connection[Any], schema: str, older_than_s: float) -> datetime:
    """The instant `--older-than` stands for, read once from the database's clock."""
    row = conn.execute(Queries(schema)["dead_letters_cut"], {"older_than_s": older_than_s}).fetchone()
    conn.rollback()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def count_older(conn: psycopg.Connection[Any], schema: str, *, cut: datetime, topic: str | None = None) -> int:
    """How many dead letters were dead-lettered before `cut`."""
    params = {"cut": cut, "topic_regex": glob_to_regex(topic) if topic else None}
    row = conn.execute(Queries(schema)["dead_letters_count_older"], params).fetchone()
    conn.rollback()
    return int(row[0]) if row else 0


def held_behind_older(conn: psycopg.Connection[Any], schema: str, *, cut: datetime, topic: str | None = None) -> int:
    """Pending messages queued behind the dead letters that `purge` would delete: under
    `dead_letter_policy: hold`, deleting a key's dead letter releases them."""
    params = {"cut": cut, "topic_regex": glob_to_regex(topic) if topic else None}
    row = conn.execute(Queries(schema)["dead_letters_held_behind_older"], params).fetchone()
    conn.rollback()
    return int(row[0]) if row else 0


def purge(conn: psycopg.Connection[Any], schema: str, *, cut: datetime, topic: str | None = None) -> int:
    """Delete dead letters dead-lettered before `cut`, 1000 per transaction; returns how many."""
    params = {"cut": cut, "topic_regex": glob_to_regex(topic) if topic else None}
    deleted = 0
    while True:
        with conn.transaction():
            batch = conn.execute(Queries(schema)["dead_letters_purge"], params).rowcount
        deleted += batch
        if batch < 1000:
            return deleted
