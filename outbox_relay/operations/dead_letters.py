"""Dead letters: messages kept in the database with their reason, listed, requeued and purged."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

import psycopg
from psycopg.rows import dict_row

from outbox_relay.errors import CommandLineError
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

    @classmethod
    def of(cls, r: dict[str, Any]) -> DeadLetter:
        """From a row of dead_letters_list or dead_letters_of_message."""
        return cls(
            r["message_id"],
            r["topic"],
            r["key"],
            r["attempts"],
            r["created_at"],
            r["dead_lettered_at"],
            r["dead_letter_reason"] or "",
        )


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


# "Showing 100 of N" counts at most this many matches: past it the list says "of more
# than 10,000" (status has the exact total by topic), and a broad filter costs a
# bounded read however many dead letters there are.
COUNT_CAP = 10_000


@dataclass(frozen=True)
class Listing:
    """A page of dead letters, and how many match the filters (at most COUNT_CAP + 1)."""

    rows: list[DeadLetter]
    matched: int

    @property
    def capped(self) -> bool:
        """More matched than were counted: "of more than COUNT_CAP"."""
        return self.matched > COUNT_CAP


def list_dead(
    conn: psycopg.Connection[Any],
    schema: str,
    *,
    topic: str | None = None,
    key: str | None = None,
    since: datetime | None = None,
    limit: int = 100,
) -> Listing:
    """The oldest `limit` dead letters that match every filter given: `topic` a glob,
    `key` exact, `since` dead-lettered at or after."""
    params = {"topic_regex": glob_to_regex(topic) if topic else None, "key": key, "since": since}
    q = Queries(schema)
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(q["dead_letters_list"], {**params, "limit": limit}).fetchall()
        # The console's count, with the filters `list` has not (reason, until) left open.
        counted = cur.execute(
            q["console_dead_letters_count"], {**params, "reason": None, "until": None, "cap": COUNT_CAP + 1}
        ).fetchone()
    conn.rollback()
    found = [DeadLetter.of(r) for r in rows]
    return Listing(found, int(counted["count"]) if counted else len(found))


@dataclass
class DeadLetterDetail:
    """One dead letter as `dead-letters show` prints it: its payload only when asked
    for (None: not shown; `payload_refused`: asked for, and the role may not read it)."""

    letter: DeadLetter
    row_id: int
    published_to_topic: bool
    last_error: str | None
    content_type: str
    headers: dict[str, Any]
    payload: bytes | None = None
    payload_refused: bool = False


def show(
    conn: psycopg.Connection[Any], schema: str, message_id: UUID, *, with_payload: bool = False
) -> list[DeadLetterDetail]:
    """The dead letters of `message_id` (none: not a dead letter, or no such message)."""
    q = Queries(schema)
    found = []
    with conn.cursor(row_factory=dict_row) as cur:
        for r in cur.execute(q["dead_letters_of_message"], {"message_id": message_id}).fetchall():
            found.append(
                DeadLetterDetail(
                    DeadLetter.of(r),
                    int(r["id"]),
                    r["dead_letter_published_at"] is not None,
                    r["last_error"],
                    r["content_type"],
                    dict(r["headers"] or {}),
                )
            )
    for detail in found if with_payload else []:
        try:
            with conn.transaction():  # a savepoint: a role without the column keeps the rest
                row = conn.execute(q["console_payload"], {"id": detail.row_id}).fetchone()
            detail.payload = bytes(row[0]) if row else None
        except psycopg.errors.InsufficientPrivilege:
            detail.payload_refused = True
    conn.rollback()
    return found


@dataclass(frozen=True)
class Selection:
    """Which dead letters `requeue` and `purge` take: those that every filter given
    matches (one of `message_ids`, AND `topic`, AND dead-lettered more than
    `older_than_s` ago), or, with `everything` and no filter, all of them.

    A filter beside `everything`, or nothing at all, raises CommandLineError before any
    row is read: `--topic 'big.*' --all` must not be read as "all", nor as "big.*".
    """

    message_ids: tuple[UUID, ...] = ()
    topic: str | None = None
    older_than_s: float | None = None
    everything: bool = False
    command: Literal["requeue", "purge"] = "requeue"  # for the messages: which options it has
    # `older_than_s` as an instant, read once from the database's clock (`with_cut`), so
    # that what purge deletes is what it counted and showed.
    cut: datetime | None = None

    def __post_init__(self) -> None:
        given = self.filters()
        if self.everything and given:
            selects = f"{given[0]} selects" if len(given) == 1 else f"{' and '.join(given)} select together"
            raise CommandLineError(
                f"--all selects every dead letter and takes no filter: give it alone, or drop it to "
                f"{self.command} what {selects}"
            )
        if not (self.everything or given):
            age = ", --older-than D" if self.command == "purge" else ""
            raise CommandLineError(
                f"say which dead letters to {self.command}: --message-id ID (repeatable), --topic GLOB{age} "
                "(those that match every one given), or --all"
            )

    def filters(self) -> list[str]:
        """The filter options given, by name."""
        given = (("--message-id", bool(self.message_ids)), ("--topic", self.topic is not None))
        return [name for name, on in (*given, ("--older-than", self.older_than_s is not None)) if on]

    def params(self) -> dict[str, Any]:
        if self.older_than_s is not None and self.cut is None:
            raise ValueError("the cut of --older-than is not read yet: call with_cut() first")
        return {
            "message_ids": list(self.message_ids) or None,
            "topic_regex": glob_to_regex(self.topic) if self.topic is not None else None,
            "cut": self.cut,
        }

    def with_cut(self, conn: psycopg.Connection[Any], schema: str) -> Selection:
        """This selection with `older_than_s` read as an instant of the database's clock."""
        if self.older_than_s is None:
            return self
        row = conn.execute(Queries(schema)["dead_letters_cut"], {"older_than_s": self.older_than_s}).fetchone()
        conn.rollback()
        assert row is not None
        return replace(self, cut=row[0])


def requeue(conn: psycopg.Connection[Any], schema: str, selection: Selection) -> list[UUID]:
    """Put the selected dead letters back to pending; returns the ids requeued."""
    params = selection.with_cut(conn, schema).params()
    with conn.transaction():
        return _through_function(conn, schema, "requeue_dead_letters", "dead_letters_requeue", params)


def _through_function(
    conn: psycopg.Connection[Any], schema: str, function: str, statement: str, params: dict[str, Any]
) -> list[UUID]:
    """Call the action's SQL function (schema.sql); a role granted before schema version
    14 may not execute it but holds the table privileges its statement needs, so that
    role runs the statement itself (the same rows: the function's body is the statement)."""
    q = Queries(schema)
    try:
        with conn.transaction():  # a savepoint: the fallback runs in the same transaction
            return [row[0] for row in conn.execute(q[function], params).fetchall()]
    except psycopg.errors.InsufficientPrivilege:
        return [row[0] for row in conn.execute(q[statement], params).fetchall()]


@dataclass(frozen=True)
class Selected:
    """What a purge would delete: how many, and which of the ids asked for (when
    `--id` is a filter; then there are at most that many)."""

    count: int
    message_ids: frozenset[UUID]


def count(conn: psycopg.Connection[Any], schema: str, selection: Selection) -> Selected:
    """How many dead letters `selection` (its cut read) takes, and which of its ids."""
    row = conn.execute(Queries(schema)["dead_letters_count_selected"], selection.params()).fetchone()
    conn.rollback()
    return Selected(int(row[0]), frozenset(row[1] or ())) if row else Selected(0, frozenset())


def held_behind(conn: psycopg.Connection[Any], schema: str, selection: Selection) -> int:
    """Pending messages queued behind the dead letters that `purge` would delete: under
    `dead_letter_policy: hold`, deleting a key's dead letter releases them."""
    row = conn.execute(Queries(schema)["dead_letters_held_behind_selected"], selection.params()).fetchone()
    conn.rollback()
    return int(row[0]) if row else 0


PURGE_CHUNK = 1000


def purge(conn: psycopg.Connection[Any], schema: str, selection: Selection) -> list[UUID]:
    """Delete the selected dead letters (its cut read), PURGE_CHUNK per transaction;
    returns the ids deleted (for the console's log of who deleted what)."""
    params = {**selection.params(), "max_rows": PURGE_CHUNK}
    deleted: list[UUID] = []
    while True:
        with conn.transaction():
            batch = _through_function(conn, schema, "purge_dead_letters", "dead_letters_purge", params)
        deleted += batch
        # Until a chunk takes nothing: a chunk short of PURGE_CHUNK may only mean that a
        # concurrent requeue took some of its rows, not that none is left.
        if not batch:
            return deleted
