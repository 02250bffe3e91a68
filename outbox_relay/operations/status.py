"""`outbox-relay status`: what is pending, in flight, dead-lettered, and who is relaying."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from outbox_relay.operations.replay import describe
from outbox_relay.sources.wal import slot as slots
from outbox_relay.sqlfiles import Queries

LIVE_RELAY_S = 30.0


@dataclass
class TopicStatus:
    topic: str
    pending: int
    dead_lettered: int
    oldest_pending_age_s: float | None


@dataclass
class RelayInfo:
    relay_id: str
    hostname: str
    pid: int
    in_flight: int
    heartbeat_age_s: float
    live: bool


@dataclass
class ReplayInfo:
    replay_id: int
    requested_by: str
    requested_at: str
    selection: dict[str, Any]
    total: int
    copied: int
    finished: bool


@dataclass
class BackfillInfo:
    backfill_id: int
    requested_by: str
    requested_at: str
    source: dict[str, Any]
    total: int
    copied: int
    finished: bool


@dataclass
class SourceInfo:
    """Where enqueue writes, and the WAL source's slot where there is one (in table mode
    too: a switch from wal leaves it until a relay has drained it)."""

    source: str
    slot: str
    slot_exists: bool
    slot_active: bool | None = None
    lag_bytes: int | None = None  # WAL written since the relay's last confirmed position
    retained_bytes: int | None = None  # WAL the slot keeps on disk
    wal_status: str | None = None  # reserved, extended, unreserved, lost
    draining: bool = False  # after a switch to table: keyed rows enqueued since wait for the slot

    @classmethod
    def of(cls, source: str, name: str, state: slots.SlotState | None, draining: bool = False) -> SourceInfo:
        if state is None:
            return cls(source, name, False, draining=draining)
        return cls(source, name, True, state.active, state.lag_bytes, state.retained_bytes, state.wal_status, draining)

    @classmethod
    def from_row(cls, recorded: Any, name: str, state: slots.SlotState | None) -> SourceInfo:
        """From queries.sql's outbox_source row (None: no row, table)."""
        if recorded is None:
            return cls.of("table", name, state)
        return cls.of(str(recorded[0]), name, state, bool(recorded[3]))

    def summary(self) -> str:
        """One line: the source, and the slot's state where it matters."""
        if not self.slot_exists:
            if self.draining:
                return (
                    f"table (drain pending but its slot {self.slot!r} is gone: a relay lifts the gate at start, "
                    "and messages the slot still held may be lost)"
                )
            return self.source if self.source == "table" else f"wal, but its slot {self.slot!r} does not exist"
        lag = "-" if self.lag_bytes is None else f"{self.lag_bytes} bytes"
        slot_state = (
            f"slot {self.slot!r} {'streamed' if self.slot_active else 'not streamed'}, lag {lag}, "
            f"wal_status {self.wal_status or '-'}"
        )
        if self.source == "table":
            held = "; keyed rows enqueued since the switch wait for it" if self.draining else ""
            return f"table ({slot_state}: kept until a relay has drained it{held})"
        return f"wal ({slot_state})"


@dataclass
class BehindDeadLetters:
    """Keys with a dead letter and pending messages after it. Under dead_letter_policy
    hold those messages wait for the dead letter (requeue or purge it); under release
    they go as usual. `policy`: the config's, None when status read no config."""

    keys: int
    messages: int
    policy: str | None = None

    @property
    def held(self) -> bool | None:
        return None if self.policy is None else self.policy == "hold"

    def summary(self) -> str:
        counted = f"{self.keys} key(s), {self.messages} pending message(s) after a dead letter of their key"
        if self.policy is None:
            return f"{counted} (held under dead_letter_policy: hold, published under release)"
        if self.policy == "hold":
            return f"{counted} (held: dead_letter_policy is hold; requeue or purge the dead letters to release them)"
        return f"{counted} (not held: dead_letter_policy is {self.policy})"


@dataclass
class Status:
    schema: str
    pending: int
    in_flight: int
    dead_lettered: int
    dispatched_retained: int
    oldest_pending_age_s: float | None
    topics: list[TopicStatus] = field(default_factory=list)
    relays: list[RelayInfo] = field(default_factory=list)
    replays: list[ReplayInfo] = field(default_factory=list)  # the last ten, newest first
    backfills: list[BackfillInfo] = field(default_factory=list)  # the last ten, newest first
    source: SourceInfo | None = None
    behind_dead_letters: BehindDeadLetters | None = None

    def as_dict(self) -> dict[str, Any]:
        fields = asdict(self)
        if self.behind_dead_letters is not None:
            fields["behind_dead_letters"]["held"] = self.behind_dead_letters.held
        return fields


def printable(value: object) -> str:
    """Recorded text as one printable line: no terminal control sequences from a row."""
    return "".join(c if c.isprintable() else "?" for c in str(value))


def utc(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _age(value: Any) -> float | None:
    return None if value is None else round(float(value), 3)


def read(
    conn: psycopg.Connection[Any], schema: str, *, wal_slot: str | None = None, dead_letter_policy: str | None = None
) -> Status:
    """The outbox's status. `wal_slot`: the WAL source's slot to report on (the config's;
    None: the one the outbox recorded, else the schema's default name).
    `dead_letter_policy`: the config's, to say whether messages behind a dead letter are
    held (None: no config, said for both policies)."""
    q = Queries(schema)
    recorded = conn.execute(q["outbox_source"]).fetchone()
    slot_name = wal_slot or (recorded[4] if recorded is not None and recorded[4] else None) or slots.name_for(schema)
    source = SourceInfo.from_row(recorded, slot_name, slots.read_state(conn, slot_name))
    with conn.cursor(row_factory=dict_row) as cur:
        totals = cur.execute(q["status_totals"]).fetchone() or {}
        topics = cur.execute(q["status_by_topic"]).fetchall()
        dispatched = cur.execute(q["status_dispatched"]).fetchone() or {}
        relays = cur.execute(q["status_relays"]).fetchall()
        replays = cur.execute(q["status_replays"], {"limit": 10}).fetchall()
        backfills = cur.execute(q["status_backfills"], {"limit": 10}).fetchall()
        behind = cur.execute(q["status_behind_dead_letters"]).fetchone() or {}
    conn.rollback()
    infos = [
        RelayInfo(
            relay_id=str(r["relay_id"]),
            hostname=r["hostname"],
            pid=r["pid"],
            in_flight=r["in_flight"],
            heartbeat_age_s=round(float(r["heartbeat_age_s"]), 1),
            live=float(r["heartbeat_age_s"]) <= LIVE_RELAY_S,
        )
        for r in relays
    ]
    return Status(
        schema=schema,
        pending=int(totals.get("pending") or 0),
        in_flight=sum(info.in_flight for info in infos if info.live),
        dead_lettered=int(totals.get("dead_lettered") or 0),
        dispatched_retained=int(dispatched.get("dispatched") or 0),
        oldest_pending_age_s=_age(totals.get("oldest_pending_age_s")),
        topics=[
            TopicStatus(t["topic"], t["pending"], t["dead_lettered"], _age(t["oldest_pending_age_s"])) for t in topics
        ],
        relays=infos,
        replays=[
            ReplayInfo(
                int(r["replay_id"]),
                r["requested_by"],
                utc(r["requested_at"]),
                r["selection"],
                int(r["total"]),
                int(r["copied"]),
                r["finished_at"] is not None,
            )
            for r in replays
        ],
        backfills=[
            BackfillInfo(
                int(r["backfill_id"]),
                r["requested_by"],
                utc(r["requested_at"]),
                r["source"],
                int(r["total"]),
                int(r["copied"]),
                r["finished_at"] is not None,
            )
            for r in backfills
        ],
        source=source,
        behind_dead_letters=BehindDeadLetters(
            int(behind.get("keys") or 0), int(behind.get("messages") or 0), dead_letter_policy
        ),
    )


# In WAL mode the table holds only what was parked there (docs/how-to/wal-source.md,
# "Operations in WAL mode"): what the slot still has to hand out is its lag, on the source line.
_TABLE_ONLY = " (rows in the table: parked messages; what waits in the WAL is the slot's lag)"


def render(status: Status) -> str:
    age = "-" if status.oldest_pending_age_s is None else f"{status.oldest_pending_age_s:.1f}s"
    lines = [
        f"schema {status.schema}",
        *([f"  source         {status.source.summary()}"] if status.source else []),
        f"  pending        {status.pending}{_TABLE_ONLY if status.source and status.source.source == 'wal' else ''}",
        f"  in flight      {status.in_flight}",
        f"  dead-lettered  {status.dead_lettered}",
        *([f"  behind them    {status.behind_dead_letters.summary()}"] if status.behind_dead_letters else []),
        f"  oldest pending {age}",
        f"  dispatched (kept for retention) {status.dispatched_retained}",
    ]
    if status.topics:
        width = max(len(t.topic) for t in status.topics)
        lines.append("")
        lines.append(f"  {'topic'.ljust(width)}  pending  dead-lettered  oldest pending")
        for t in status.topics:
            t_age = "-" if t.oldest_pending_age_s is None else f"{t.oldest_pending_age_s:.1f}s"
            lines.append(f"  {t.topic.ljust(width)}  {t.pending:>7}  {t.dead_lettered:>13}  {t_age:>14}")
    lines.append("")
    live = [r for r in status.relays if r.live]
    lines.append(f"  relays live    {len(live)}")
    for r in live:
        lines.append(
            f"    {r.relay_id} {r.hostname} pid {r.pid}: {r.in_flight} in flight, "
            f"heartbeat {r.heartbeat_age_s:.0f}s ago"
        )
    _copy_jobs(
        lines,
        "replay",
        [
            (
                p.replay_id,
                p.requested_at,
                p.requested_by,
                describe(p.selection),
                p.copied,
                p.total,
                "copied",
                p.finished,
            )
            for p in status.replays
        ],
    )
    _copy_jobs(
        lines,
        "backfill",
        [
            (
                b.backfill_id,
                b.requested_at,
                b.requested_by,
                f"{printable(b.source.get('table'))} -> {printable(b.source.get('topic'))}",
                b.copied,
                b.total,
                "enqueued",
                b.finished,
            )
            for b in status.backfills
        ],
    )
    return "\n".join(lines)


def _copy_jobs(lines: list[str], command: str, jobs: list[tuple[int, str, str, str, int, int, str, bool]]) -> None:
    """The replays or backfills, newest first, each with how to finish it if it stopped."""
    if not jobs:
        return
    lines.append("")
    lines.append(f"  {command}s (newest first)")
    for number, requested_at, requested_by, what, copied, total, verb, finished in jobs:
        state = "done" if finished else f"not finished (or still copying): {command} --resume {number}"
        lines.append(
            f"    #{number} {requested_at} by {printable(requested_by)}: {printable(what)}; "
            f"{copied} of {total} {verb}, {state}"
        )
