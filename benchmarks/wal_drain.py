"""Draining a backlog to Kafka from either source, the relay in this process: the relay
starts and idles (in wal its walsender streams the slot, in table its LISTEN connection
is up), one transaction enqueues the backlog through ``enqueue_binary`` and commits,
and the clock runs from the commit's return to the last ack. The same path for both
sources: only the outbox's source differs.

PostgreSQL's CPU is read from /proc over the same window, from before the backlog's
statement (the walsender decodes a transaction's WAL as it is written, before its
commit) to the last ack, less the producer's own backend: what the server spends to
hand the messages to the relay and take its answers (in wal: the walsender's decoding;
in table: the claims and the outcome statements).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from typing import Any

import psycopg

from benchmarks.common import PAYLOAD_BYTES, Keys, relay_config
from benchmarks.cpu import PgCpu, micros_per_message
from benchmarks.wal_source import (
    commit_backlog,
    commit_one_by_one,
    drop_slot,
    install,
    relay_for,
    until_idle,
)
from outbox_relay.models import Message, Record, RecordKind
from tests.consumers import kafka_create_topic

SCHEMA = "bench_source"


class _Until:
    """Counts acks and notes the moment the `target`-th arrives."""

    def __init__(self, target: int):
        self.target = target
        self.acked = 0
        self.failed = 0
        self.done_at: float | None = None
        self.reached = asyncio.Event()

    def batch_recorded(self, messages: Sequence[Message], records: Sequence[Record]) -> None:
        for record in records:
            if record.kind is RecordKind.ACKED:
                self.acked += 1
            else:
                self.failed += 1
        if self.done_at is None and self.acked >= self.target:
            self.done_at = time.perf_counter()
            self.reached.set()


async def drain(
    dsn: str,
    bootstrap: str,
    count: int,
    *,
    source: str,
    keys: Keys,
    client: str = "aiokafka",
    payload_bytes: int = PAYLOAD_BYTES,
    one_by_one: bool = False,
    broker: dict[str, Any] | None = None,
    topic: str | None = None,
    relay: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """{"rate": msg/s, "pg_cpu_us": PostgreSQL's CPU per message, "relay_cpu_us": this
    process's (the relay's) CPU per message}. `one_by_one`: each message is a transaction
    of its own, all committed before the relay starts; the clock runs from its start.
    `broker`: more settings of the Kafka broker block (exactly_once, offsets_topic);
    `topic`: the destination (made here), to read it back after; `relay`: more relay
    settings (benchmarks/ab.py's wal-receipts: {"wal": {"receipts": True}})."""
    topic = topic or f"bench-src-{uuid.uuid4().hex[:8]}"
    await kafka_create_topic(bootstrap, topic, partitions=3)
    await asyncio.to_thread(install, dsn, SCHEMA, source)
    config = relay_config(
        dsn,
        SCHEMA,
        {"kafka": {"type": "kafka", "client": client, "bootstrap_servers": bootstrap, **(broker or {})}},
        [{"topic": "*", "broker": "kafka", "destination": topic}],
        **{"batch_size": 500, "workers": 2, **(relay or {})},
    )
    if one_by_one:
        await asyncio.to_thread(commit_one_by_one, dsn, SCHEMA, "bench.source", count, keys=keys)
    until = _Until(count)
    relay = relay_for(config, until)
    cpu = PgCpu(dsn)
    pg_before, relay_before, started = cpu.total(), time.process_time(), time.perf_counter()
    task = asyncio.create_task(relay.run())
    try:
        if not one_by_one:
            await until_idle(dsn, relay, source, SCHEMA)
            with psycopg.connect(dsn) as producer:
                backend = producer.info.backend_pid
                pg_before, producer_before = cpu.total(), cpu.of(backend)
                started = await asyncio.to_thread(
                    commit_backlog, producer, SCHEMA, "bench.source", count, keys=keys, payload_bytes=payload_bytes
                )
                relay_before = time.process_time()
                await _until_reached(until, task)
                relay_cpu = time.process_time() - relay_before
                # Read while the producer's backend lives (once it exits, its time is
                # nowhere until the postmaster reaps it): its own CPU is not the drain's.
                pg_cpu = (cpu.total() - pg_before) - (cpu.of(backend) - producer_before)
        else:
            await _until_reached(until, task)
            relay_cpu = time.process_time() - relay_before
            pg_cpu = cpu.total() - pg_before
    finally:
        relay.stop()
        await task
    if source == "wal":
        await asyncio.to_thread(drop_slot, dsn, SCHEMA)
    if until.failed:
        raise RuntimeError(f"{until.failed} publish failures during the drain")
    assert until.done_at is not None
    return {
        "rate": count / (until.done_at - started),
        "pg_cpu_us": micros_per_message(pg_cpu, count),
        "relay_cpu_us": micros_per_message(relay_cpu, count),
    }


async def _until_reached(until: _Until, task: asyncio.Task[None], timeout: float = 600) -> None:
    waiter = asyncio.create_task(until.reached.wait())
    await asyncio.wait({waiter, task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if task.done():
        task.result()
        raise RuntimeError("the relay stopped before the drain ended")
    if until.done_at is None:
        raise RuntimeError(f"only {until.acked} of {until.target} messages acked in {timeout} s")
