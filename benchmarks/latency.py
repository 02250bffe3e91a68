"""(e) commit-to-ack latency at a steady rate from concurrent writers, NOTIFY on and off,
and with the outbox in WAL mode."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import psycopg

from benchmarks.common import AckClock, percentile, relay_config
from benchmarks.wal_source import drop_slot, install, relay_for, until_idle
from outbox_relay import enqueue_async
from outbox_relay.operations import schema_manager
from tests.consumers import kafka_create_topic

SCHEMA = "bench_latency"
WRITERS = 8


async def _writer(dsn: str, writer: int, per_writer_rate: float, seconds: float, commits: dict[str, float]) -> None:
    interval = 1.0 / per_writer_rate
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        loop = asyncio.get_running_loop()
        start = loop.time()
        n = 0
        while loop.time() - start < seconds:
            mid = await enqueue_async(
                conn, "bench.latency", {"n": n, "pad": "x" * 200}, key=f"w{writer}-k{n % 100}", schema=SCHEMA
            )
            await conn.commit()
            commits[str(mid)] = time.time()
            n += 1
            # A steady schedule (not "sleep after each"), so the rate holds under load.
            await asyncio.sleep(max(0.0, start + n * interval - loop.time()))


async def commit_to_ack(
    dsn: str,
    bootstrap: str,
    *,
    rate: float,
    seconds: float,
    notify: bool,
    source: str = "table",
    broker: dict[str, Any] | None = None,
) -> dict[str, float]:
    """`source` wal: the outbox in WAL mode, streamed by the relay's WAL source (the
    clock stops when the broker's ack reaches the relay; notify does not apply; with
    exactly_once in `broker`, the ack is the transaction's commit: the observer hears
    of a batch only once it is committed)."""
    topic = f"bench-lat-{uuid.uuid4().hex[:8]}"
    await kafka_create_topic(bootstrap, topic)
    install(dsn, SCHEMA, source)
    with psycopg.connect(dsn) as conn:
        schema_manager.set_notify(conn, SCHEMA, notify)
    config = relay_config(
        dsn,
        SCHEMA,
        {"kafka": {"type": "kafka", "bootstrap_servers": bootstrap, **(broker or {})}},
        [{"topic": "*", "broker": "kafka", "destination": topic}],
        notify=notify,
    )
    clock = AckClock()
    relay = relay_for(config, clock)
    task = asyncio.create_task(relay.run())
    await relay.started.wait()
    await asyncio.sleep(1.0)  # connected, idle
    if source == "wal":
        await until_idle(dsn, relay, source, SCHEMA)
    commits: dict[str, float] = {}
    # Each writer has its own keys: writers of one key must be serialized (the ordering
    # precondition), and lockstep writers sharing keys would queue behind each other.
    await asyncio.gather(*(_writer(dsn, w, rate / WRITERS, seconds, commits) for w in range(WRITERS)))
    deadline = time.monotonic() + 30
    while len(clock.acked_at) < len(commits) and time.monotonic() < deadline:  # noqa: ASYNC110 - polls the observer
        await asyncio.sleep(0.05)
    relay.stop()
    await task
    if source == "wal":
        drop_slot(dsn, SCHEMA)
    latencies = [1000 * (clock.acked_at[m] - t) for m, t in commits.items() if m in clock.acked_at]
    if len(latencies) != len(commits):
        raise RuntimeError(f"only {len(latencies)} of {len(commits)} messages acked")
    return {
        "messages": len(commits),
        "rate_per_s": round(len(commits) / seconds, 1),
        "p50_ms": round(percentile(latencies, 50), 2),
        "p95_ms": round(percentile(latencies, 95), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
    }
