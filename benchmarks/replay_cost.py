"""What a replay of a million rows costs: how fast the copy goes, how long its longest
transaction is, and what it does to the application's write path meanwhile.

The write path is measured as `outbox.enqueue` in its own transaction, one client in a
loop, first alone (the baseline), then while the replay copies: the ratio of the two
p50s and p99s is the replay's cost to producers. Publishing the copies is the relay's
ordinary work (the matrix's drain rates); this measures the copy only.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
from psycopg import sql

from benchmarks.common import percentile
from benchmarks.env import fresh_schema
from outbox_relay.operations import replay

SCHEMA = "bench_replay"


def _fill_dispatched(dsn: str, count: int) -> None:
    query = sql.SQL(
        "INSERT INTO {}.messages (topic, key, payload, content_type, dispatched_at) "
        "SELECT 'orders.created', 'key-' || mod(g, 100), convert_to(lpad(g::text, 256, 'x'), 'UTF8'), "
        "'application/octet-stream', now() FROM generate_series(1, %s::bigint) AS g"
    ).format(sql.Identifier(SCHEMA))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(query, (count,))
        conn.execute(sql.SQL("VACUUM ANALYZE {}.messages").format(sql.Identifier(SCHEMA)))


def _enqueue_latencies(dsn: str, stop: threading.Event, out: list[float]) -> None:
    statement = sql.SQL("SELECT {}.enqueue('live.orders', 'live', '{{\"n\": 1}}')").format(sql.Identifier(SCHEMA))
    with psycopg.connect(dsn) as conn:
        while not stop.is_set():
            started = time.perf_counter()
            conn.execute(statement)
            conn.commit()
            out.append((time.perf_counter() - started) * 1000)


def _write_path(dsn: str, seconds: float) -> list[float]:
    stop, latencies = threading.Event(), []  # type: ignore[var-annotated]
    worker = threading.Thread(target=_enqueue_latencies, args=(dsn, stop, latencies))
    worker.start()
    time.sleep(seconds)
    stop.set()
    worker.join()
    return latencies


def measure(dsn: str, *, rows: int = 1_000_000, chunk: int = replay.DEFAULT_CHUNK) -> dict[str, Any]:
    fresh_schema(dsn, SCHEMA)
    _fill_dispatched(dsn, rows)
    baseline = _write_path(dsn, 10.0)
    stop, during = threading.Event(), []  # type: ignore[var-annotated]
    writer = threading.Thread(target=_enqueue_latencies, args=(dsn, stop, during))
    chunk_ms: list[float] = []
    last = time.perf_counter()

    def lap(_copied: int) -> None:
        nonlocal last
        now = time.perf_counter()
        chunk_ms.append((now - last) * 1000)
        last = now

    with psycopg.connect(dsn) as conn:
        chosen = replay.plan(conn, SCHEMA, replay.Selection(topic="orders.*"))
        replay_id = replay.begin(conn, SCHEMA, chosen)
        writer.start()
        started = last = time.perf_counter()
        copied = replay.copy(conn, SCHEMA, replay_id, chunk=chunk, progress=lap)
        took = time.perf_counter() - started
    stop.set()
    writer.join()
    return {
        "rows": rows,
        "copied": copied,
        "seconds": round(took, 1),
        "rows_per_s": round(copied / took),
        "chunk_rows": chunk,
        "longest_chunk_transaction_ms": round(max(chunk_ms), 1),
        "enqueue_p50_ms_alone": round(percentile(baseline, 50), 3),
        "enqueue_p99_ms_alone": round(percentile(baseline, 99), 3),
        "enqueue_p50_ms_during_replay": round(percentile(during, 50), 3),
        "enqueue_p99_ms_during_replay": round(percentile(during, 99), 3),
        "enqueue_p50_during / alone": round(percentile(during, 50) / percentile(baseline, 50), 2),
        "enqueue_p99_during / alone": round(percentile(during, 99) / percentile(baseline, 99), 2),
    }


def table(result: dict[str, Any]) -> str:
    return "\n".join(
        [
            "| replay of 1,000,000 dispatched rows (100 keys, 256-byte payloads) | |",
            "|---|---|",
            *(f"| {name} | {value} |" for name, value in result.items()),
        ]
    )
