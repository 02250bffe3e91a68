"""The pieces the WAL part of the benchmark shares: an outbox in either source, the
backlog committed in one transaction through `enqueue_binary` (the producer's path in
both sources) and the relay as `outbox-relay run` builds it (CPU from /proc: cpu.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

from benchmarks.common import PAYLOAD_BYTES, Keys, _key_sql
from benchmarks.env import fresh_schema
from outbox_relay.assembly import build_relay
from outbox_relay.config import Config
from outbox_relay.engine.relay import Relay, RelayObserver
from outbox_relay.operations import schema_manager
from outbox_relay.sources.wal import slot
from outbox_relay.sources.wal.errors import SlotInUse


def install(dsn: str, schema: str, source: str) -> None:
    """A fresh outbox `schema` whose enqueue writes to `source` (its slot made anew)."""
    drop_slot(dsn, schema)
    fresh_schema(dsn, schema)
    if source == "wal":
        name = slot.name_for(schema)
        with psycopg.connect(dsn, autocommit=True) as conn:
            slot.create(conn, name, name)  # before the switch, as `schema source wal` does
            schema_manager.set_source(conn, schema, "wal", warn=lambda _: None)


def drop_slot(dsn: str, schema: str) -> None:
    """Drop the schema's slot if there is one: an idle slot keeps WAL on disk for nothing.
    The walsender of a relay just stopped may hold it a moment longer."""
    name = slot.name_for(schema)
    deadline = time.monotonic() + 30
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            try:
                slot.drop(conn, name, name)
                return
            except SlotInUse:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def commit_backlog(
    conn: psycopg.Connection[Any],
    schema: str,
    topic: str,
    count: int,
    *,
    keys: Keys,
    payload_bytes: int = PAYLOAD_BYTES,
) -> float:
    """Enqueue `count` messages (the rows of common.fill_backlog) in one transaction and
    commit; the perf_counter when the commit returned."""
    query = sql.SQL(
        "SELECT count({}.enqueue_binary(%s, {}, convert_to(lpad(g::text, %s, 'x'), 'UTF8'))) "
        "FROM generate_series(1::bigint, %s::bigint) AS g"
    ).format(sql.Identifier(schema), _key_sql(keys))
    conn.execute(query, (topic, payload_bytes, count))
    conn.commit()
    return time.perf_counter()


def commit_one_by_one(dsn: str, schema: str, topic: str, count: int, *, keys: Keys) -> None:
    """The same messages as commit_backlog, each in a transaction of its own (what an
    application's transactions make: an order, its message), committed in the server
    (a DO loop) without waiting for each commit's flush, to be quick: only the drain
    that follows is measured."""
    loop = sql.SQL(
        "DO $$ BEGIN FOR g IN 1..{count} LOOP "
        "PERFORM {schema}.enqueue_binary({topic}, {key}, convert_to(lpad(g::text, {size}, 'x'), 'UTF8')); "
        "COMMIT; END LOOP; END $$"
    ).format(
        count=sql.Literal(count),
        schema=sql.Identifier(schema),
        topic=sql.Literal(topic),
        key=_key_sql(keys),
        size=sql.Literal(PAYLOAD_BYTES),
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET synchronous_commit = off")
        conn.execute(loop)


def relay_for(config: Config, observer: RelayObserver) -> Relay:
    """The relay `outbox-relay run` builds: table workers and the WAL source, whose acks
    the observer hears in either source."""
    return build_relay(config, observer=observer)


def _one(dsn: str, query: str, params: tuple[Any, ...] = ()) -> Any:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(query, params).fetchone()
    return None if row is None else row[0]


async def until_idle(dsn: str, relay: Relay, source: str, schema: str, *, timeout: float = 60) -> None:
    """Until the relay waits for work: in wal its walsender streams the slot, in table
    its LISTEN connection is up (so the backlog's commit wakes it, as in production)."""
    await relay.started.wait()
    name = slot.name_for(schema)
    deadline = time.monotonic() + timeout
    while True:
        if source == "wal":
            ready = await asyncio.to_thread(
                _one, dsn, "SELECT active FROM pg_replication_slots WHERE slot_name = %s", (name,)
            )
        else:
            ready = relay._listener.connected  # the one signal the engine gives of it
        if ready:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the relay did not become idle in {source} mode within {timeout} s")
        await asyncio.sleep(0.02)


async def poll(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)
