"""PostgreSQL's CPU per message for the claim and the mark alone, and its floor (issue 21,
point 3).

No broker and no dispatcher: one connection claims a batch, says every message of it
was acked and marks it, in one transaction per batch, until the backlog is drained.
The relay's own statements (`OutboxStore.claim` and `OutboxStore.record`, as a table
worker runs them: receipts kept, the default; without receipts; `relay.retention: 0s`,
which deletes) are measured beside the least SQL that can claim and mark the same rows
of the same table with the same indexes: one `SELECT ... FOR UPDATE SKIP LOCKED` of the
columns a publish needs, in the keyless index's order, then one `UPDATE ... SET
dispatched_at` (or one `DELETE`) of the ids. That floor is what a row-locking claim
and a marking update cost on this machine, whatever the relay's Python does.

The server's CPU is read from /proc for all its processes (benchmarks/cpu.py), so the
WAL writer's and checkpointer's share is counted. A CHECKPOINT before each drain gives
every variant the same full-page writes. Keyless backlogs (the floor's statements walk
the keyless index); the relay's statements also with 100 keys.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from psycopg import sql

from benchmarks.common import Keys, fill_backlog
from benchmarks.cpu import PgCpu, micros_per_message
from benchmarks.env import fresh_schema
from outbox_relay.demo import local_postgres
from outbox_relay.engine.store import OutboxStore
from outbox_relay.models import Record, RecordKind
from outbox_relay.sqlfiles import Queries

SCHEMA = "bench_sql_floor"
BATCH = 1000

# The least claim: the columns the relay publishes, locked, in the keyless index's order
# (messages_keyless_pending_idx), skipping rows another worker holds.
FLOOR_CLAIM = sql.SQL(
    "SELECT id, message_id, topic, key, payload, content_type, headers, attempts, created_at "
    "FROM {}.messages WHERE key IS NULL AND dispatched_at IS NULL AND dead_lettered_at IS NULL "
    "ORDER BY coalesce(next_attempt_at, created_at), id LIMIT %s FOR UPDATE SKIP LOCKED"
)
FLOOR_MARK = {
    "update": sql.SQL("UPDATE {}.messages SET dispatched_at = now() WHERE id = ANY(%s)"),
    "delete": sql.SQL("DELETE FROM {}.messages WHERE id = ANY(%s)"),
    # A design the schema does not have, measured for what it would save: the acked rows
    # moved out of the queue into a history table that keeps what replay and receipts
    # read (the whole message, when, the receipt), indexed for them.
    "move": sql.SQL(
        "WITH gone AS (DELETE FROM {0}.messages WHERE id = ANY(%s) RETURNING *) "
        "INSERT INTO {0}.history SELECT id, message_id, topic, key, payload, content_type, headers, "
        "created_at, now(), NULL FROM gone"
    ),
}
HISTORY = sql.SQL(
    "CREATE TABLE {0}.history (id bigint PRIMARY KEY, message_id uuid NOT NULL, topic text NOT NULL, key text, "
    "payload bytea NOT NULL, content_type text NOT NULL, headers jsonb, created_at timestamptz NOT NULL, "
    "dispatched_at timestamptz NOT NULL, receipt jsonb); "
    "CREATE INDEX ON {0}.history (dispatched_at); CREATE INDEX ON {0}.history (message_id)"
)


def _step(name: str) -> None:
    print(f"[bench] {time.strftime('%H:%M:%S')} sql floor: {name}", flush=True)


async def _relay_sql(conn: psycopg.AsyncConnection[Any], *, receipts: bool, keep: bool) -> int:
    """Drain with the relay's own claim and mark statements; the messages marked."""
    store = OutboxStore(Queries(SCHEMA), hold_dead_letters=False, workers=1, keep_dispatched=keep)
    done = 0
    while True:
        async with conn.transaction():
            claim = await store.claim(conn, BATCH)
            if not claim.messages:
                return done
            records = [
                Record(m.id, RecordKind.ACKED, receipt=f'{{"partition":0,"offset":{m.id}}}' if receipts else None)
                for m in claim.messages
            ]
            await store.record(conn, records)
        done += len(records)


async def _floor_sql(conn: psycopg.AsyncConnection[Any], *, mark: str) -> int:
    claim_sql = FLOOR_CLAIM.format(sql.Identifier(SCHEMA))
    mark_sql = FLOOR_MARK[mark].format(sql.Identifier(SCHEMA))
    done = 0
    while True:
        async with conn.transaction():
            cur = await conn.execute(claim_sql, (BATCH,), binary=True)
            ids = [row[0] for row in await cur.fetchall()]
            if not ids:
                return done
            await conn.execute(mark_sql, (ids,), binary=True)
        done += len(ids)


async def _drain_cpu(
    dsn: str, count: int, keys: Keys, drain: Callable[[psycopg.AsyncConnection[Any]], Awaitable[int]]
) -> dict[str, float | None]:
    """A fresh backlog of `count`, drained by `drain` on one connection: PostgreSQL's CPU
    µs per message (all its processes) and msg/s."""
    fresh_schema(dsn, SCHEMA)
    fill_backlog(dsn, SCHEMA, "bench.floor", count, keys=keys)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(HISTORY.format(sql.Identifier(SCHEMA)))
        conn.execute("CHECKPOINT")
    pg = PgCpu(dsn)
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        before, started = pg.total(), time.perf_counter()
        drained = await drain(conn)
        spent, wall = pg.total() - before, time.perf_counter() - started
    if drained != count:
        raise RuntimeError(f"drained {drained} of {count}")
    return {"pg_cpu_us": micros_per_message(spent, count), "msgs_per_s": round(count / wall)}


def _median(results: list[dict[str, float | None]]) -> dict[str, float | None]:
    by_cpu = sorted(results, key=lambda r: float(r["pg_cpu_us"] or 0))
    return by_cpu[len(by_cpu) // 2]


async def run(dsn: str, *, messages: int, runs: int) -> dict[str, Any]:
    """Each variant's median run (by PostgreSQL CPU per message), variants alternated
    run by run so that the machine's drift hits all alike."""
    variants: dict[str, tuple[Keys, Callable[[psycopg.AsyncConnection[Any]], Awaitable[int]]]] = {
        "relay SQL, receipts (the default), keyless": (None, lambda c: _relay_sql(c, receipts=True, keep=True)),
        "relay SQL, receipts (the default), 100 keys": (100, lambda c: _relay_sql(c, receipts=True, keep=True)),
        "relay SQL, relay.receipts false, keyless": (None, lambda c: _relay_sql(c, receipts=False, keep=True)),
        "relay SQL, relay.retention 0s (deletes), keyless": (None, lambda c: _relay_sql(c, receipts=True, keep=False)),
        "floor: lock + update dispatched_at, keyless": (None, lambda c: _floor_sql(c, mark="update")),
        "floor: lock + delete, keyless": (None, lambda c: _floor_sql(c, mark="delete")),
        "not built: lock + move to a history table, keyless": (None, lambda c: _floor_sql(c, mark="move")),
    }
    measured: dict[str, list[dict[str, float | None]]] = {name: [] for name in variants}
    for n in range(runs):
        for name, (keys, drain) in variants.items():
            _step(f"{name}, {messages:,}, run {n + 1}")
            measured[name].append(await _drain_cpu(dsn, messages, keys, drain))
    rows = {name: _median(results) for name, results in measured.items()}
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(SCHEMA)))
    floor = rows["floor: lock + update dispatched_at, keyless"]["pg_cpu_us"]
    relay = rows["relay SQL, receipts (the default), keyless"]["pg_cpu_us"]
    return {
        "messages": messages,
        "runs": runs,
        "batch": BATCH,
        "variants": rows,
        "pg_cpu_us_runs": {name: [r["pg_cpu_us"] for r in results] for name, results in measured.items()},
        "relay / floor (update), keyless": None if not floor or relay is None else round(relay / floor, 2),
    }


def table(part: dict[str, Any]) -> str:
    lines = [
        f"| claim + mark alone, {part['messages']:,} messages, batches of {part['batch']}, "
        f"median of {part['runs']} | PostgreSQL CPU µs/msg | its runs, lowest to highest | msg/s |",
        "|---|---|---|---|",
    ]
    for name, row in part["variants"].items():
        each = sorted(part["pg_cpu_us_runs"][name])
        lines.append(f"| {name} | {row['pg_cpu_us']} | {each[0]} to {each[-1]} | {row['msgs_per_s']} |")
    lines.append(f"\nrelay / floor (update), keyless: {part['relay / floor (update), keyless']}")
    return "\n".join(lines)


def main() -> None:
    """`python -m benchmarks.sql_floor [RUNS] [MESSAGES]`: this part alone, on its own
    PostgreSQL (the benchmark's settings) or the one OUTBOX_RELAY_BENCH_DSN names."""
    from tests import services  # the benchmark's server settings (logical decoding)

    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    messages = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
    dsn = os.environ.get("OUTBOX_RELAY_BENCH_DSN")
    if dsn:
        print(table(asyncio.run(run(dsn, messages=messages, runs=runs))))
        return
    with local_postgres.running({"max_connections": "200", **services.LOGICAL_DECODING}) as cluster:
        print(table(asyncio.run(run(cluster.dsn, messages=messages, runs=runs))))


if __name__ == "__main__":
    main()
