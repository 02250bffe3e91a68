"""`outbox-relay replay`: publish again messages that were already dispatched.

A replay copies the selected rows to the tail of the outbox: same message id (consumers
deduplicate, or reprocess, as they choose), same topic, key, payload and headers, plus
the header ``outbox-replay-id``. The relay then publishes the copies like any message:
routing, retries, dead letters, and per-key order by id, so a copy goes after every
message of its key enqueued before it was made and before every one enqueued after.

In WAL mode (docs/how-to/wal-source.md) a message published straight from the
WAL never was a row: only those parked in the table (after a failed publish) can be
copied. A plan says so (``Plan.wal``) when its selection reaches into the time the
outbox's enqueue wrote into the WAL, and a replay that would find nothing there is
refused (``NotInTable``) rather than reported as done with nothing to do.

Why copies rather than marking the original rows pending again: an original row keeps
its old id, so it would jump ahead of its key's newer pending messages; and retention
or a second replay would see one row with two histories.

The copy runs chunk by chunk, each chunk its own short transaction that also moves the
replay's cursor (a row in ``replays``): no long transaction holds back vacuum, and a
replay killed mid-way resumes where its last chunk committed, copying nothing twice.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import psycopg
from psycopg.types.json import Jsonb

from outbox_relay.durations import parse_duration
from outbox_relay.errors import ConfigError, DatabaseError, NotFound, OutboxRelayError
from outbox_relay.operations.copying import only_copier, requester
from outbox_relay.operations.dead_letters import glob_to_regex
from outbox_relay.sqlfiles import Queries
from outbox_relay.validation import MAX_KEY_BYTES

REPLAY_HEADER = "outbox-replay-id"
DEFAULT_CHUNK = 1000


@dataclass(frozen=True)
class TimeBound:
    """--since or --until: the instant it resolves to, and the form it was given in
    ("21600s ago" for a duration, the UTC time for an instant). Two replays have the same
    filter when the forms are equal (`--since 6h` and `--since 360m`); whether they
    share messages is decided by the instants (a duration recorded as the instant it
    stood for when its replay counted)."""

    at: datetime
    given: str

    @property
    def relative(self) -> bool:
        return self.given.endswith(" ago")


@dataclass(frozen=True)
class Selection:
    """Which dispatched messages a replay copies; a filter left None matches all."""

    topic: str | None = None
    key: str | None = None
    since: TimeBound | None = None
    until: TimeBound | None = None
    message_ids: tuple[UUID, ...] = ()

    def __post_init__(self) -> None:
        # Repeated or reordered ids are one selection.
        object.__setattr__(self, "message_ids", tuple(sorted(set(self.message_ids), key=str)))

    @property
    def empty(self) -> bool:
        return (self.topic, self.key, self.since, self.until) == (None, None, None, None) and not self.message_ids

    def as_json(self) -> dict[str, Any]:
        """The selection as recorded: the filters as given, and in `resolved` the
        instants the time bounds stood for when the replay counted."""
        return {
            "topic": self.topic,
            "key": self.key,
            "since": self.since.given if self.since else None,
            "until": self.until.given if self.until else None,
            "message_ids": [str(m) for m in self.message_ids],
            "resolved": {
                "since": self.since.at.isoformat() if self.since else None,
                "until": self.until.at.isoformat() if self.until else None,
            },
        }

    def params(self) -> dict[str, Any]:
        return {
            # Rows with a longer key (written before schema version 6) are not copied.
            "max_key_bytes": MAX_KEY_BYTES,
            "topic_regex": glob_to_regex(self.topic) if self.topic else None,
            "key": self.key,
            "since": self.since.at if self.since else None,
            "until": self.until.at if self.until else None,
            "message_ids": list(self.message_ids) or None,
        }


def parse_time(text: str, option: str, now: datetime | None = None) -> TimeBound:
    """An ISO 8601 time (with an offset, or UTC if none) or a duration ago ("2h")."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        try:
            ago = parse_duration(text)
        except ValueError:
            raise ConfigError(
                f"{option} {text!r}: give an ISO 8601 time (2026-11-22T08:00:00+00:00) or a duration ago (2h)"
            ) from None
        return TimeBound((now or datetime.now(UTC)) - timedelta(seconds=ago), f"{ago:g}s ago")
    at = (value if value.tzinfo is not None else value.replace(tzinfo=UTC)).astimezone(UTC)
    return TimeBound(at, at.isoformat())


class NotInTable(OutboxRelayError):
    """Nothing the replay selects is in the outbox table, and the messages it asks for
    went out while enqueue wrote into the WAL: published straight from there, they never
    were rows, so there is nothing to copy (the broker still has them, or the producer
    can enqueue them again). Exit 1, as any selection that takes nothing."""


@dataclass(frozen=True)
class WalPeriod:
    """When the outbox's enqueue wrote into the WAL (queries.sql, replay_wal_period):
    from `start` (None: settings do not keep it) until `end` (None: it still does)."""

    start: datetime | None
    end: datetime | None

    def overlaps(self, selection: Selection) -> bool:
        """Whether `selection` may select messages enqueued in this period (by their time
        bounds; message ids, topics and keys say nothing of when)."""
        since, until = selection.since, selection.until
        after_start = self.start is None or until is None or until.at > self.start
        before_end = self.end is None or since is None or since.at < self.end
        return after_start and before_end

    def note(self) -> str:
        """What a replay reaching into this period must be told, in one line."""
        when = (
            f"is in WAL mode since {self.start:%Y-%m-%d %H:%M:%S %Z}"
            if self.end is None and self.start is not None
            else f"was in WAL mode until {self.end:%Y-%m-%d %H:%M:%S %Z}"
        )
        return (
            f"the outbox {when}: a message published straight from the WAL never was a row, so a replay finds only "
            "those parked in the table after a failed publish; replay the others from the broker, or enqueue them "
            "again"
        )


def wal_period(conn: psycopg.Connection[Any], schema: str) -> WalPeriod | None:
    """When enqueue wrote into the WAL, or None if it never did (as settings tell)."""
    row = conn.execute(Queries(schema)["replay_wal_period"]).fetchone()
    if row is None:
        return None
    source, changed_at, switched = str(row[0]), row[1], bool(row[2])
    if source == "wal":
        return WalPeriod(changed_at, None)
    return WalPeriod(None, changed_at) if switched else None


@dataclass(frozen=True)
class Earlier:
    """The latest replay of the same filters that selected some of the messages a
    selection matches now: `shared` of them."""

    replay_id: int
    requested_at: datetime
    finished: bool
    shared: int
    resolved: dict[str, Any]  # the instants its --since and --until stood for (ISO 8601, or None)


@dataclass
class Plan:
    """What a replay of a selection would copy, counted before anything is written."""

    selection: Selection
    max_source_id: int
    as_of: datetime
    by_topic: dict[str, int] = field(default_factory=dict)
    previous: Earlier | None = None
    # Of the total, rows whose key is over MAX_KEY_BYTES (written before schema version
    # 6): no new message may have such a key, so the copy skips them and counts them.
    unfit: int = 0
    # When enqueue wrote into the WAL, if the selection reaches into that time: what it
    # selects of it are only the messages parked in the table.
    wal: WalPeriod | None = None
    # Transactions open when it counted that were still open after `settle_s` (plan):
    # a message they dispatched before as_of is copied too, beyond the count.
    unsettled: int = 0

    @property
    def total(self) -> int:
        return sum(self.by_topic.values())

    @property
    def to_copy(self) -> int:
        return self.total - self.unfit


@dataclass(frozen=True)
class Replay:
    replay_id: int
    requested_by: str
    requested_at: datetime
    selection: dict[str, Any]
    total: int
    copied: int
    finished: bool
    created_by: str | None  # the role that recorded it (None: before schema version 7)
    own: bool  # recorded by the role that reads it
    skipped: int  # selected, not copied: a key over MAX_KEY_BYTES


def plan(conn: psycopg.Connection[Any], schema: str, selection: Selection, *, settle_s: float = 10.0) -> Plan:
    """Count what `selection` matches now; nothing is written.

    A relay batch marks its rows (dispatched_at: the statement's clock) a moment before
    it commits. One that marked before as_of and commits after the count would be
    copied (its rows match) without having been counted: the count waits, up to
    `settle_s`, for the transactions open at as_of to end, so that what it counts is
    what the replay copies (an unrelated transaction open longer is not waited for
    beyond that: Plan.unsettled)."""
    q = Queries(schema)
    row = conn.execute(q["replay_max_source_id"]).fetchone()
    assert row is not None
    max_id, as_of = int(row[0]), row[1]
    unsettled = _settle(conn, q, settle_s)
    params = {**selection.params(), "cursor": 0, "max_id": max_id, "as_of": as_of}
    counts = conn.execute(q["replay_count"], params).fetchall()
    same = conn.execute(q["replay_same_selection"], {**params, "selection": Jsonb(selection.as_json())}).fetchone()
    period = wal_period(conn, schema)
    conn.rollback()
    previous = Earlier(int(same[0]), same[1], same[2] is not None, int(same[3]), same[4] or {}) if same else None
    by_topic = {str(topic): int(n) for topic, n, _ in counts}
    return Plan(
        selection,
        max_id,
        as_of,
        by_topic,
        previous,
        unfit=sum(int(n) for _, _, n in counts),
        wal=period if period is not None and period.overlaps(selection) else None,
        unsettled=unsettled,
    )


def _settle(conn: psycopg.Connection[Any], q: Queries, settle_s: float) -> int:
    """Wait until the transactions open now have ended, at most `settle_s`; how many
    are still open then. Relay batches end within milliseconds of their marks."""
    snapshot = conn.execute(q["replay_open_transactions"]).fetchone()
    assert snapshot is not None
    deadline = time.monotonic() + settle_s
    pause = 0.005
    while True:
        still = conn.execute(q["replay_still_open"], {"snapshot": snapshot[0]}).fetchone()
        open_now = int(still[0]) if still else 0
        if open_now == 0 or time.monotonic() >= deadline:
            return open_now
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


def begin(conn: psycopg.Connection[Any], schema: str, chosen: Plan) -> int:
    """Record the replay (nothing is copied yet); returns its id."""
    with conn.transaction():
        row = conn.execute(
            Queries(schema)["replay_begin"],
            {
                "requested_by": requester(),
                "selection": Jsonb(chosen.selection.as_json()),
                "max_id": chosen.max_source_id,
                "as_of": chosen.as_of,
                "total": chosen.total,
            },
        ).fetchone()
    assert row is not None
    return int(row[0])


def get(conn: psycopg.Connection[Any], schema: str, replay_id: int) -> Replay:
    row = conn.execute(Queries(schema)["replay_get"], {"replay_id": replay_id}).fetchone()
    conn.rollback()
    if row is None:
        raise NotFound(f"no replay #{replay_id} (see `outbox-relay status`)")
    return Replay(
        int(row[0]),
        row[1],
        row[2],
        row[3],
        int(row[5]),
        int(row[6]),
        row[8] is not None,
        row[9],
        bool(row[10]),
        int(row[11]),
    )


# Session advisory locks: (this class, replay id). Held for a whole copy, so that two
# `--resume N` never copy one replay in turns.
_LOCK_CLASS = 0x0B0F_0001
WINDOW_CHUNKS = 10  # a chunk looks at most at this many chunks' worth of ids


def copy(
    conn: psycopg.Connection[Any],
    schema: str,
    replay_id: int,
    *,
    chunk: int = DEFAULT_CHUNK,
    rate: float | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Copy the replay's selection from where it stands, chunk by chunk; returns how
    many rows it holds copied in all. `rate`: at most about this many rows per second
    (a chunk is then at most `rate` rows, and the copy sleeps between chunks)."""
    q = Queries(schema)
    recorded = conn.execute(q["replay_get"], {"replay_id": replay_id}).fetchone()
    conn.rollback()
    if recorded is None:
        raise NotFound(f"no replay #{replay_id} (see `outbox-relay status`)")
    selection = _selection_from(recorded[3])
    if rate:
        chunk = max(1, min(chunk, int(rate)))
    with only_copier(conn, _LOCK_CLASS, replay_id, "replay"):
        return _copy_locked(conn, q, replay_id, selection, chunk, rate, progress, base=int(recorded[6]))


def _copy_locked(
    conn: psycopg.Connection[Any],
    q: Queries,
    replay_id: int,
    selection: Selection,
    chunk: int,
    rate: float | None,
    progress: Callable[[int], None] | None,
    *,
    base: int,
) -> int:
    started = time.monotonic()
    while True:
        try:
            with conn.transaction():
                lock = conn.execute(q["replay_lock"], {"replay_id": replay_id}).fetchone()
                if lock is None:
                    raise NotFound(f"no replay #{replay_id}")
                cursor, max_id, as_of, finished = int(lock[0]), int(lock[1]), lock[2], bool(lock[3])
                if finished:
                    return _copied(conn, q, replay_id)
                row = conn.execute(
                    q["replay_copy_chunk"],
                    {
                        **selection.params(),
                        "replay_id": replay_id,
                        "cursor": cursor,
                        "as_of": as_of,
                        "window_end": min(max_id, cursor + WINDOW_CHUNKS * chunk),
                        "chunk": chunk,
                    },
                ).fetchone()
                if row is None:  # the cursor did not match: roll back what this chunk inserted
                    raise DatabaseError(f"replay #{replay_id} moved under this copy; nothing of this chunk was kept")
        except psycopg.errors.LockNotAvailable:
            raise DatabaseError(f"replay #{replay_id} is being copied by another process right now") from None
        total_copied, finished = int(row[0]), bool(row[2])
        if progress is not None:
            progress(total_copied)
        if finished:
            return total_copied
        if rate:
            _throttle(started, total_copied - base, rate)


def _copied(conn: psycopg.Connection[Any], q: Queries, replay_id: int) -> int:
    row = conn.execute(q["replay_get"], {"replay_id": replay_id}).fetchone()
    return int(row[6]) if row else 0


def _throttle(started: float, done: int, rate: float) -> None:
    """Sleep until `done` rows since `started` are no faster than `rate` per second."""
    ahead = done / rate - (time.monotonic() - started)
    if ahead > 0:
        time.sleep(ahead)


def _selection_from(recorded: dict[str, Any]) -> Selection:
    resolved = recorded.get("resolved") or {}

    def bound(name: str) -> TimeBound | None:
        return TimeBound(datetime.fromisoformat(resolved[name]), recorded[name]) if recorded.get(name) else None

    return Selection(
        topic=recorded.get("topic"),
        key=recorded.get("key"),
        since=bound("since"),
        until=bound("until"),
        message_ids=tuple(UUID(m) for m in recorded.get("message_ids") or ()),
    )


def describe(selection: dict[str, Any]) -> str:
    """A recorded selection in one line, for humans."""
    parts = [
        f"{name}={json.dumps(value) if not isinstance(value, str) else value}"
        for name, value in selection.items()
        if name != "resolved" and value not in (None, [], "")
    ]
    return " ".join(parts) or "everything retained"
