"""Several relay processes on one outbox (replicas of a Deployment): the backlog is
committed in one transaction while they idle, and the clock runs until every message
is dispatched. Their total rate is compared with one process's, in the same run.

The keys are shared through row locks alone (a key's head lock): no coordinator,
no partition assignment, and a worker that finds every claimable key held by another
replica sleeps until its next wake-up instead of spinning.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
import yaml
from psycopg import sql

from benchmarks.common import Keys, fill_backlog, pending
from benchmarks.env import fresh_schema
from tests.consumers import kafka_create_topic

SCHEMA = "bench_replicas"


def _config(path: Path, dsn: str, bootstrap: str, topic: str) -> Path:
    tree = {
        "database": {"dsn": dsn, "schema": SCHEMA},
        "relay": {"batch_size": 500, "workers": 2, "poll_interval": "1s"},
        "http": {"enabled": False},
        "brokers": {"kafka": {"type": "kafka", "bootstrap_servers": bootstrap}},
        "routes": [{"topic": "*", "broker": "kafka", "destination": topic}],
    }
    path.write_text(yaml.safe_dump(tree))
    return path


def _started(log: Path) -> bool:
    return log.exists() and '"relay_started"' in log.read_text()


async def drain_rate(dsn: str, bootstrap: str, count: int, *, replicas: int, keys: Keys = 100) -> float:
    topic = f"bench-replicas-{uuid.uuid4().hex[:8]}"
    await kafka_create_topic(bootstrap, topic, partitions=3)
    return await asyncio.to_thread(_drain, dsn, bootstrap, topic, count, replicas, keys)


def _drain(dsn: str, bootstrap: str, topic: str, count: int, replicas: int, keys: Keys) -> float:
    fresh_schema(dsn, SCHEMA)
    with tempfile.TemporaryDirectory() as tmp:
        config = _config(Path(tmp) / "relay.yaml", dsn, bootstrap, topic)
        exe = str(Path(sys.executable).parent / "outbox-relay")
        logs = [Path(tmp) / f"relay-{i}.log" for i in range(replicas)]
        procs = [
            subprocess.Popen([exe, "run", "--config", str(config)], stdout=subprocess.DEVNULL, stderr=log.open("w"))
            for log in logs
        ]
        try:
            deadline = time.monotonic() + 60
            while not all(_started(log) for log in logs):
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    raise RuntimeError("a relay did not start: " + " | ".join(log.read_text()[-300:] for log in logs))
                time.sleep(0.05)
            fill_backlog(dsn, SCHEMA, "bench.replicas", count, keys=keys, vacuum=False)  # one transaction
            started = time.perf_counter()  # the relays wake on its commit
            while pending(dsn, SCHEMA):
                time.sleep(0.02)
            elapsed = time.perf_counter() - started
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(60)
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            sql.SQL("SELECT count(*) FROM {}.messages WHERE dead_lettered_at IS NOT NULL").format(
                sql.Identifier(SCHEMA)
            )
        ).fetchone()
    if row and row[0]:
        raise RuntimeError(f"{row[0]} messages dead-lettered during the replica drain")
    return count / elapsed
