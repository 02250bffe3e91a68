"""Shared pieces: the backlog, the relay under test, timing and percentiles."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
import yaml
from psycopg import sql

from benchmarks.cpu import Window
from outbox_relay.assembly import build_adapters
from outbox_relay.config import Config, parse
from outbox_relay.engine.relay import Relay
from outbox_relay.models import Message, Record, RecordKind

PAYLOAD_BYTES = 256
KEYS = 10_000


# How many distinct keys: a number; None: keyless; "unique": one per message; any
# other string: that one key for every message.
Keys = int | str | None


def _key_sql(keys: Keys) -> sql.Composable:
    if keys is None:
        return sql.SQL("NULL")
    if keys == "unique":
        return sql.SQL("'key-' || g")
    if isinstance(keys, str):
        return sql.Literal(keys)
    return sql.SQL("'key-' || mod(g, {})").format(sql.Literal(int(keys)))


def fill_backlog(
    dsn: str,
    schema: str,
    topic: str,
    count: int,
    *,
    keys: Keys = KEYS,
    payload_bytes: int = PAYLOAD_BYTES,
    start: int = 1,
    next_attempt: str | None = None,
    vacuum: bool = True,
) -> None:
    """`count` pending messages of `payload_bytes` bytes over `keys` keys, in one statement.
    `next_attempt` (an interval, e.g. '1 hour') makes them wait, as rows behind a failing
    head or a broker in outage do."""
    query = sql.SQL(
        "INSERT INTO {}.messages (topic, key, payload, content_type, next_attempt_at) "
        "SELECT %s, {}, convert_to(lpad(g::text, %s, 'x'), 'UTF8'), "
        "'application/octet-stream', now() + %s::interval FROM generate_series(%s::bigint, %s::bigint) AS g"
    ).format(sql.Identifier(schema), _key_sql(keys))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(query, (topic, payload_bytes, next_attempt, start, start + count - 1))
        if vacuum:
            conn.execute(sql.SQL("VACUUM ANALYZE {}.messages").format(sql.Identifier(schema)))


def messages_for_raw_clients(
    count: int, *, keys: Keys = KEYS, payload_bytes: int = PAYLOAD_BYTES
) -> list[tuple[bytes | None, bytes]]:
    """(key, value) pairs identical to the backlog's rows."""

    def key(g: int) -> bytes | None:
        if keys is None:
            return None
        if isinstance(keys, str):
            return f"key-{g}".encode() if keys == "unique" else keys.encode()
        return f"key-{g % keys}".encode()

    return [(key(g), str(g).rjust(payload_bytes, "x").encode()) for g in range(1, count + 1)]


def relay_config(dsn: str, schema: str, brokers: dict[str, Any], routes: list[dict[str, Any]], **relay: Any) -> Config:
    tree = {
        "database": {"dsn": dsn, "schema": schema},
        "relay": relay,
        "http": {"enabled": False},
        "brokers": brokers,
        "routes": routes,
    }
    return parse(yaml.safe_dump(tree), source="bench", env={})


def pending(dsn: str, schema: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            sql.SQL(  # through the two claim indexes, not the whole table
                "SELECT (SELECT count(*) FROM {0}.messages WHERE key IS NOT NULL AND dispatched_at IS NULL "
                "AND dead_lettered_at IS NULL) + (SELECT count(*) FROM {0}.messages WHERE key IS NULL "
                "AND dispatched_at IS NULL AND dead_lettered_at IS NULL)"
            ).format(sql.Identifier(schema))
        ).fetchone()
    return int(row[0]) if row else 0


class AckClock:
    """RelayObserver that notes when each message's outcome was committed."""

    def __init__(self) -> None:
        self.acked_at: dict[str, float] = {}
        self.failed = 0

    def batch_recorded(self, messages: Sequence[Message], records: Sequence[Record]) -> None:
        now = time.time()
        by_id = {m.id: m for m in messages}
        for record in records:
            if record.kind is RecordKind.ACKED:
                self.acked_at.setdefault(str(by_id[record.id].message_id), now)
            else:
                self.failed += 1


class AckCounter:
    """RelayObserver that only counts: the drain measures the relay, not the observer."""

    def __init__(self) -> None:
        self.acked = 0
        self.failed = 0

    def batch_recorded(self, messages: Sequence[Message], records: Sequence[Record]) -> None:
        for record in records:
            if record.kind is RecordKind.ACKED:
                self.acked += 1
            else:
                self.failed += 1


async def drain(config: Config, count: int, meter: Window | None = None) -> float:
    """Seconds the relay takes to publish a backlog of `count` messages; `meter` (CPU
    per message) is open over the same span."""
    clock = AckCounter()
    relay = Relay(config, build_adapters(config), observer=clock)
    task = asyncio.create_task(relay.run())
    await relay.started.wait()
    if meter is not None:
        meter.start()
    started = time.perf_counter()
    while clock.acked < count:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - started
    if meter is not None:
        meter.stop()
    relay.stop()
    await task
    if clock.failed:
        raise RuntimeError(f"{clock.failed} publish failures during the drain")
    return elapsed


Target = tuple[str, float]  # (">=" or "<=", bound)


def ratio_rows(title: str, ratios: dict[str, float], target_of: Callable[[str], Target | None]) -> list[str]:
    """A markdown table of ratios with their targets and whether each is met."""
    lines = [f"| {title} | value | target | met |", "|---|---|---|---|"]
    for name, value in ratios.items():
        target = target_of(name)
        if target:
            op, bound = target
            met = value >= bound if op == ">=" else value <= bound
            lines.append(f"| {name} | {value} | {op} {bound} | {'yes' if met else '**no**'} |")
        else:
            lines.append(f"| {name} | {value} | | |")
    return lines


def percentile(values: Sequence[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]
