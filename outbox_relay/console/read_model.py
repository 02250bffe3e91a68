"""What the console's pages show, read from the database.

The overview counts the backlog by topic and key shape, a cost that grows with the
backlog (a million pending rows take about a second). So a page never waits for it:
`Overview` keeps the last reading and refreshes it in a thread of its own when a page
finds it older than its interval, which is at least 20 times what the last reading
took (a slow count is read rarely, so the console never keeps the database busy).
Every other page reads what it shows through an index, a page at a time.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import structlog
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from outbox_relay.connections import PREPARE_THRESHOLD, tcp_settings
from outbox_relay.errors import first_line
from outbox_relay.operations import dead_letters as dead_letter_ops
from outbox_relay.operations.dead_letters import glob_to_regex
from outbox_relay.operations.replay import describe
from outbox_relay.sources.wal import slot as slots
from outbox_relay.sqlfiles import Queries

log = structlog.get_logger("outbox_relay.console")

LIVE_RELAY_S = 30.0
MIN_REFRESH_S = 2.0
REFRESH_COST_FACTOR = 20.0
# A refresh still reading after this is given up on (a hung connection, a lock): the
# next page starts another, and the page says since when the numbers are old.
STUCK_REFRESH_S = 60.0
# How long a page waits for the overview's very first reading before it answers
# "reading" instead (its script asks again each second until the numbers are there).
FIRST_WAIT_S = 0.1
RATE_MINUTES = 5
JOBS_SHOWN = 20  # replays and backfills each, newest first
# The server ends a console query after this: a page answers with an error rather than
# holding a connection (and a snapshot that holds back vacuum) for long.
STATEMENT_TIMEOUT_MS = 30_000
CONSOLE_SETTINGS = (
    "SELECT set_config('statement_timeout', '30000', true), set_config('enable_seqscan', 'off', true),"
    " set_config('jit', 'off', true)"
)


@dataclass
class TopicRow:
    topic: str
    pending: int = 0
    keyless: int = 0
    keyed: int = 0
    keys: int = 0
    longest_key: int = 0
    dead_lettered: int = 0
    oldest: datetime | None = None

    @property
    def shape(self) -> str:
        """The key shape of the backlog, in words."""
        if not self.pending:
            return "-"
        if not self.keyed:
            return "keyless"
        kinds = []
        if self.keys == 1:
            kinds.append("one key")
        elif self.keys == self.keyed:
            kinds.append(f"a key per message ({self.keys:,})")
        else:
            kinds.append(f"{self.keys:,} keys, the longest {self.longest_key:,}")
        if self.keyless:
            kinds.append(f"{self.keyless:,} keyless")
        return "; ".join(kinds)


@dataclass
class RelayRow:
    relay_id: str
    hostname: str
    pid: int
    version: str | None
    source: str | None
    in_flight: int
    heartbeat_age_s: float
    brokers: dict[str, Any] = field(default_factory=dict)

    @property
    def live(self) -> bool:
        return self.heartbeat_age_s <= LIVE_RELAY_S


@dataclass
class Sample:
    minute: datetime
    published: int
    failed: int
    dead_lettered: int
    lag_s: float | None


@dataclass
class Snapshot:
    """One reading of the overview."""

    read_at: datetime
    took_s: float
    topics: list[TopicRow] = field(default_factory=list)
    relays: list[RelayRow] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    source: str = "table"
    slot: slots.SlotState | None = None
    slot_name: str | None = None
    error: str | None = None  # the latest reading failed: these numbers are from read_at
    error_at: datetime | None = None

    @property
    def pending(self) -> int:
        return sum(t.pending for t in self.topics)

    @property
    def dead_lettered(self) -> int:
        return sum(t.dead_lettered for t in self.topics)

    @property
    def oldest_pending_age_s(self) -> float | None:
        oldest = [t.oldest for t in self.topics if t.oldest is not None]
        return (self.read_at - min(oldest)).total_seconds() if oldest else None

    @property
    def in_flight(self) -> int:
        return sum(r.in_flight for r in self.relays if r.live)

    def rates(self) -> tuple[float, float]:
        """Published and failed per second over the last RATE_MINUTES full minutes before
        the reading; a minute no relay reported counts as nothing done (relays that died
        half an hour ago show 0/s, not their last rate)."""
        end = self.read_at.replace(second=0, microsecond=0)
        start = end - timedelta(minutes=RATE_MINUTES)
        recent = [s for s in self.samples if start <= s.minute < end]
        seconds = 60.0 * RATE_MINUTES
        return sum(s.published for s in recent) / seconds, sum(s.failed for s in recent) / seconds


class Database:
    """The console's connections: a small pool, each query in a read-only transaction
    with a statement timeout (the pages never write; actions use `acting`)."""

    def __init__(
        self,
        dsn: str,
        schema: str,
        *,
        max_size: int = 4,
        connect_timeout: float = 10.0,
        prepare_threshold: int | None = PREPARE_THRESHOLD,
    ):
        self.schema = schema
        self.queries = Queries(schema)
        self._pool = ConnectionPool(
            dsn,
            min_size=1,
            max_size=max_size,
            open=False,
            kwargs={
                "application_name": "outbox-relay-console",
                "autocommit": False,
                "connect_timeout": max(1, int(connect_timeout)),
                # database.prepare_threshold: null behind a pooler in transaction mode.
                "prepare_threshold": prepare_threshold,
                # A network that swallows packets ends the connection, not the page.
                **tcp_settings(),
            },
            timeout=10.0,
        )

    def open(self) -> None:
        self._pool.open(wait=False)

    def close(self) -> None:
        self._pool.close()

    @contextlib.contextmanager
    def reading(self) -> Iterator[psycopg.Connection[Any]]:
        with self._pool.connection() as conn:
            conn.read_only = True
            try:
                self._limits(conn)
                yield conn
            finally:
                conn.rollback()
                conn.read_only = False

    @contextlib.contextmanager
    def acting(self) -> Iterator[psycopg.Connection[Any]]:
        with self._pool.connection() as conn:
            self._limits(conn)
            conn.commit()  # the limits stay for this transaction only; each action opens its own
            yield conn

    @staticmethod
    def _limits(conn: psycopg.Connection[Any]) -> None:
        """For this transaction (SET LOCAL: behind a pooler in transaction mode the next
        transaction may be another server session's): sequential scans off, so that with
        most of a table pending the planner does not read the whole outbox (every row
        retention keeps too) to count the backlog, when the claim's indexes hold the
        backlog alone; every console query has an index whose predicate it repeats. And
        the server ends a console query after STATEMENT_TIMEOUT_MS. JIT off: with
        sequential scans off, the scan of a table that has no index for the query
        (relays, a few rows) is costed at 1e10, past every jit_*_above_cost, and
        PostgreSQL compiled it: 160-270 ms of JIT for a 3-row read
        (benchmarks/console_pages.py)."""
        conn.execute(CONSOLE_SETTINGS)

    def ping(self) -> bool:
        try:
            with self.reading() as conn:
                conn.execute("SELECT 1")
            return True
        except (psycopg.Error, Exception):  # the pool's PoolTimeout too
            return False


class Overview:
    """The overview's last reading, refreshed in the background when a page asks."""

    def __init__(self, db: Database, *, wal_slot: str):
        self._db = db
        self._slot = wal_slot
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self._refreshing_since: float | None = None
        self._next_at = 0.0
        self._first = threading.Event()  # set once the first reading (or its error) exists

    def current(self) -> Snapshot | None:
        """The latest reading, and a refresh started in the background when it is due
        (or when the one running is stuck). Before the first reading exists it waits up
        to FIRST_WAIT_S for it, then answers None (the page says it is reading: on a
        million pending rows the first count takes seconds, and no page waits that long)."""
        with self._lock:
            snapshot = self._snapshot
            now = time.monotonic()
            stuck = self._refreshing_since is not None and now - self._refreshing_since > STUCK_REFRESH_S
            due = now >= self._next_at and (self._refreshing_since is None or stuck)
            if due:
                self._refreshing_since = now
        if due:
            threading.Thread(target=self._refresh, name="console-overview", daemon=True).start()
        if snapshot is None:
            self._first.wait(FIRST_WAIT_S)
            with self._lock:
                return self._snapshot
        return snapshot

    def _refresh(self) -> Snapshot:
        started = time.monotonic()
        try:
            snapshot = read_overview(self._db, self._slot)
            snapshot.took_s = time.monotonic() - started
            wait = max(MIN_REFRESH_S, REFRESH_COST_FACTOR * snapshot.took_s)
        except Exception as exc:  # the page shows the error; a page soon tries again
            log.warning("console_overview_failed", error_type=type(exc).__name__, error=first_line(exc))
            failed_at = datetime.now(UTC)
            # The last good numbers stay, marked with the error and their time (read_at):
            # a page of zeros in an incident would say all is well.
            previous = self._snapshot or Snapshot(read_at=failed_at, took_s=0.0)
            snapshot = replace(previous, error=first_line(exc), error_at=failed_at)
            wait = MIN_REFRESH_S
        with self._lock:
            self._snapshot = snapshot
            self._refreshing_since = None
            self._next_at = time.monotonic() + wait
        self._first.set()
        return snapshot


def read_overview(db: Database, wal_slot: str) -> Snapshot:
    q = db.queries
    with db.reading() as conn, conn.cursor(row_factory=dict_row) as cur:
        read_at = cur.execute("SELECT clock_timestamp() AS now").fetchone()["now"]  # type: ignore[index]
        topics: dict[str, TopicRow] = {}

        def topic(name: str) -> TopicRow:
            return topics.setdefault(name, TopicRow(name))

        for r in cur.execute(q["console_pending_keyed"]).fetchall():
            t = topic(r["topic"])
            t.keyed, t.keys, t.longest_key = int(r["pending"]), int(r["keys"]), int(r["longest_key"])
            t.oldest = _earliest(t.oldest, r["oldest"])
        for r in cur.execute(q["console_pending_keyless"]).fetchall():
            t = topic(r["topic"])
            t.keyless = int(r["pending"])
            t.oldest = _earliest(t.oldest, r["oldest"])
        for r in cur.execute(q["console_dead_by_topic"]).fetchall():
            topic(r["topic"]).dead_lettered = int(r["dead_lettered"])
        for t in topics.values():
            t.pending = t.keyed + t.keyless
        relays = [
            RelayRow(
                str(r["relay_id"]),
                r["hostname"],
                int(r["pid"]),
                r["version"],
                r["source"],
                int(r["in_flight"]),
                round(float(r["heartbeat_age_s"]), 1),
                dict(r["brokers"] or {}),
            )
            for r in cur.execute(q["console_relays"]).fetchall()
        ]
        samples = [
            Sample(
                r["minute"],
                int(r["published"]),
                int(r["failed"]),
                int(r["dead_lettered"]),
                None if r["lag_s"] is None else float(r["lag_s"]),
            )
            for r in cur.execute(q["console_samples"]).fetchall()
        ]
        recorded = conn.execute(q["outbox_source"]).fetchone()
        source = "table" if recorded is None else str(recorded[0])
        # The slot the last switch to wal named (settings.wal_slot), else the config's.
        wal_slot = (recorded[4] if recorded is not None and recorded[4] else None) or wal_slot
        slot = slots.read_state(conn, wal_slot) if source == "wal" else None
    return Snapshot(
        read_at=read_at,
        took_s=0.0,
        topics=sorted(topics.values(), key=lambda t: t.topic),
        relays=relays,
        samples=samples,
        source=source,
        slot=slot,
        slot_name=wal_slot if source == "wal" else None,
    )


def _earliest(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else min(a, b)


@dataclass(frozen=True)
class DeadLetterFilter:
    """The dead-letter page's filters, as the query takes them (None: any)."""

    topic: str | None = None  # a glob, as in routes and `dead-letters --topic`
    key: str | None = None
    reason: str | None = None  # a substring of the reason, any case
    since: datetime | None = None
    until: datetime | None = None

    def params(self) -> dict[str, Any]:
        reason = None
        if self.reason:
            escaped = self.reason.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            reason = f"%{escaped}%"
        return {
            "topic_regex": glob_to_regex(self.topic) if self.topic else None,
            "key": self.key,
            "reason": reason,
            "since": self.since,
            "until": self.until,
        }

    def query_string(self) -> dict[str, str]:
        given = {
            "topic": self.topic,
            "key": self.key,
            "reason": self.reason,
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
        }
        return {name: value for name, value in given.items() if value}


@dataclass
class DeadLetterRow:
    id: int
    message_id: str
    topic: str
    key: str | None
    attempts: int
    created_at: datetime
    dead_lettered_at: datetime
    reason: str
    published_to_topic: bool

    @classmethod
    def of(cls, r: dict[str, Any]) -> DeadLetterRow:
        """From a row of console_dead_letters or console_dead_letter."""
        return cls(
            int(r["id"]),
            str(r["message_id"]),
            r["topic"],
            r["key"],
            int(r["attempts"]),
            r["created_at"],
            r["dead_lettered_at"],
            r["dead_letter_reason"] or "",
            r["dead_letter_published_at"] is not None,
        )


# "Showing 50 of N" counts at most COUNT_CAP matches, as `dead-letters list` does: past
# it the page says "more than 10,000" (the overview has the exact total by topic), and a
# broad filter costs a bounded read however many dead letters there are.
COUNT_CAP = dead_letter_ops.COUNT_CAP


@dataclass
class DeadLetterPage:
    rows: list[DeadLetterRow]
    total: int  # at most COUNT_CAP + 1
    next_before: int | None  # the next page's cursor (None: this is the last)

    @property
    def total_capped(self) -> bool:
        """More matched than were counted: show "more than COUNT_CAP"."""
        return self.total > COUNT_CAP


def dead_letters(db: Database, selected: DeadLetterFilter, *, before: int | None, limit: int) -> DeadLetterPage:
    params = selected.params()
    with db.reading() as conn, conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            db.queries["console_dead_letters"], {**params, "before": before, "limit": limit + 1}
        ).fetchall()
        counted = cur.execute(db.queries["console_dead_letters_count"], {**params, "cap": COUNT_CAP + 1}).fetchone()
        total = int(counted["count"])  # type: ignore[index]
    page = [DeadLetterRow.of(r) for r in rows[:limit]]
    return DeadLetterPage(page, total, page[-1].id if len(rows) > limit else None)


@dataclass
class DeadLetterDetail:
    row: DeadLetterRow
    last_error: str | None
    content_type: str
    headers: dict[str, Any]
    payload: bytes | None  # None: not shown (redacted)
    payload_refused: bool = False  # asked for, and the console's role may not read it


def dead_letter(db: Database, row_id: int, *, with_payload: bool) -> DeadLetterDetail | None:
    with db.reading() as conn, conn.cursor(row_factory=dict_row) as cur:
        r = cur.execute(db.queries["console_dead_letter"], {"id": row_id}).fetchone()
        if r is None:
            return None
        payload = None
        refused = False
        if with_payload:
            try:
                found = cur.execute(db.queries["console_payload"], {"id": row_id}).fetchone()
                payload = bytes(found["payload"]) if found else None
            except psycopg.errors.InsufficientPrivilege:
                refused = True
    return DeadLetterDetail(
        DeadLetterRow.of(r),
        r["last_error"],
        r["content_type"],
        dict(r["headers"] or {}),
        payload,
        refused,
    )


@dataclass
class Job:
    kind: str  # replay or backfill
    number: int
    requested_by: str
    requested_at: datetime
    what: str
    total: int
    copied: int
    finished: bool

    @property
    def percent(self) -> int:
        return 100 if self.total <= 0 else min(100, int(100 * self.copied / self.total))

    @property
    def command(self) -> str:
        return f"outbox-relay {self.kind} --resume {self.number}"


def jobs(db: Database) -> list[Job]:
    found: list[Job] = []
    with db.reading() as conn, conn.cursor(row_factory=dict_row) as cur:
        for r in cur.execute(db.queries["status_replays"], {"limit": JOBS_SHOWN}).fetchall():
            found.append(
                Job(
                    "replay",
                    int(r["replay_id"]),
                    r["requested_by"],
                    r["requested_at"],
                    describe(r["selection"]),
                    int(r["total"]),
                    int(r["copied"]) + int(r["skipped"]),
                    r["finished_at"] is not None,
                )
            )
        for r in cur.execute(db.queries["status_backfills"], {"limit": JOBS_SHOWN}).fetchall():
            source = r["source"] or {}
            found.append(
                Job(
                    "backfill",
                    int(r["backfill_id"]),
                    r["requested_by"],
                    r["requested_at"],
                    f"{source.get('table')} -> {source.get('topic')}",
                    int(r["total"]),
                    int(r["copied"]),
                    r["finished_at"] is not None,
                )
            )
    return sorted(found, key=lambda j: j.requested_at, reverse=True)
