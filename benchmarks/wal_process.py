"""The WAL source with the relay as its own process (`outbox-relay run`), as deployed:
its memory while it drains one transaction of a million messages, how fast a standby
replica takes the slot over when the streaming one is SIGKILLed, and a profile of a
drain (py-spy, when it is installed).

Kafka is the clock's other end here: the topic's end offsets (acks=all, one broker: a
message is counted once acked).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg
import yaml
from aiokafka import AIOKafkaConsumer, TopicPartition

from benchmarks.wal_source import commit_backlog, commit_one_by_one, drop_slot, install
from outbox_relay.sources.wal import slot
from tests.consumers import kafka_create_topic

PARTITIONS = 3


class RelayProcess:
    """`outbox-relay run` in a process of its own, its JSON log in a file."""

    def __init__(self, config: Path, log: Path):
        exe = str(Path(sys.executable).parent / "outbox-relay")
        self.log = log
        self.proc = subprocess.Popen(
            [exe, "run", "--config", str(config)], stdout=subprocess.DEVNULL, stderr=log.open("w")
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def logged(self, event: str) -> bool:
        return self.log.exists() and f'"{event}"' in self.log.read_text()

    def memory_kib(self, field: str) -> int:
        """VmRSS (now) or VmHWM (the peak so far) from /proc/<pid>/status, in KiB."""
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        return 0

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self) -> str:
        return self.log.read_text()[-400:] if self.log.exists() else ""


def _config(path: Path, dsn: str, bootstrap: str, schema: str, topic: str) -> Path:
    tree = {
        "database": {"dsn": dsn, "schema": schema},
        "http": {"enabled": False},
        "brokers": {"kafka": {"type": "kafka", "bootstrap_servers": bootstrap}},
        "routes": [{"topic": "*", "broker": "kafka", "destination": topic}],
    }
    path.write_text(yaml.safe_dump(tree))
    return path


@contextlib.asynccontextmanager
async def kafka_count(bootstrap: str, topic: str) -> AsyncIterator[Callable[[], Awaitable[int]]]:
    """A function that returns how many records the topic holds (acked ones)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]

    async def count() -> int:
        return sum((await consumer.end_offsets(partitions)).values())

    try:
        yield count
    finally:
        await consumer.stop()


async def _wait(condition: Callable[[], bool], timeout: float, what: str, *procs: RelayProcess) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        dead = [p for p in procs if p.proc.poll() is not None]
        if dead or time.monotonic() > deadline:
            raise RuntimeError(f"waiting for {what}: " + " | ".join(p.tail() for p in procs))
        await asyncio.sleep(0.01)


async def _until_count(count: Callable[[], Awaitable[int]], at_least: int, timeout: float) -> float:
    """perf_counter once the topic holds `at_least` records."""
    deadline = time.monotonic() + timeout
    while (n := await count()) < at_least:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {n} of {at_least} records in Kafka after {timeout} s")
        await asyncio.sleep(0.05)
    return time.perf_counter()


async def rss_while_draining(dsn: str, bootstrap: str, count: int, *, keys: int = 100) -> dict[str, Any]:
    """The relay process's memory while it drains one committed transaction of `count`
    messages (larger than logical_decoding_work_mem: PostgreSQL spills it; the relay
    reads it in parts of at most 1,000 messages / 1 MiB)."""
    schema, topic = "bench_wal_rss", f"bench-rss-{uuid.uuid4().hex[:8]}"
    await kafka_create_topic(bootstrap, topic, partitions=PARTITIONS)
    await asyncio.to_thread(install, dsn, schema, "wal")
    peak = 0
    sampling = threading.Event()
    with tempfile.TemporaryDirectory() as tmp:
        relay = RelayProcess(_config(Path(tmp) / "relay.yaml", dsn, bootstrap, schema, topic), Path(tmp) / "relay.log")

        def sample() -> None:
            nonlocal peak
            while not sampling.is_set():
                peak = max(peak, relay.memory_kib("VmRSS"))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        try:
            await _wait(lambda: relay.logged("wal_relay_started"), 60, "the relay streams", relay)
            idle = relay.memory_kib("VmRSS")
            sampler.start()
            async with kafka_count(bootstrap, topic) as counted:
                with psycopg.connect(dsn) as producer:
                    started = time.perf_counter()
                    committed = await asyncio.to_thread(commit_backlog, producer, schema, "bench.rss", count, keys=keys)
                done = await _until_count(counted, count, timeout=1800)
            hwm = relay.memory_kib("VmHWM")
        finally:
            sampling.set()
            relay.stop()
    await asyncio.to_thread(drop_slot, dsn, schema)
    return {
        "messages": count,
        "rss_idle_mib": round(idle / 1024, 1),
        "rss_peak_mib": round(peak / 1024, 1),
        "vmhwm_mib": round(hwm / 1024, 1),
        "enqueue_s": round(committed - started, 1),
        "drain_msgs_per_s": round(count / (done - committed)),
    }


def _slot_pid(dsn: str, name: str) -> int | None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (name,)).fetchone()
    return None if row is None or row[0] is None else int(row[0])


async def takeover(
    dsn: str, bootstrap: str, *, replicas: int = 3, rounds: int = 3, backlog: int = 50_000
) -> dict[str, Any]:
    """`replicas` relays on one WAL outbox; in each round a backlog of `backlog` (100 keys)
    is committed in one transaction, the streaming relay is SIGKILLed once a fifth of it
    is in Kafka, and the clock runs until a standby streams the slot (its walsender holds
    it, and it logged wal_relay_started) and until Kafka grows again. A new replica
    replaces the killed one for the next round."""
    schema, topic = "bench_wal_replicas", f"bench-takeover-{uuid.uuid4().hex[:8]}"
    name = slot.name_for(schema)
    await kafka_create_topic(bootstrap, topic, partitions=PARTITIONS)
    await asyncio.to_thread(install, dsn, schema, "wal")
    results: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        config = _config(Path(tmp) / "relay.yaml", dsn, bootstrap, schema, topic)
        spawned = 0

        def spawn() -> RelayProcess:
            nonlocal spawned
            spawned += 1
            return RelayProcess(config, Path(tmp) / f"relay-{spawned}.log")

        alive = [spawn()]
        try:
            await _wait(lambda: alive[0].logged("wal_relay_started"), 60, "the first relay streams", *alive)
            alive += [spawn() for _ in range(replicas - 1)]
            await _wait(lambda: all(p.logged("wal_slot_in_use") for p in alive[1:]), 60, "standbys", *alive)
            async with kafka_count(bootstrap, topic) as counted:
                for _ in range(rounds):
                    results.append(await _one_takeover(dsn, name, schema, alive, counted, backlog))
                    alive.append(spawn())
                    await _wait(lambda: alive[-1].logged("wal_slot_in_use"), 60, "the new standby", *alive)
        finally:
            for proc in alive:
                proc.stop()
    await asyncio.to_thread(drop_slot, dsn, schema)
    return {
        "replicas": replicas,
        "rounds": results,
        "slot_taken_over_s_max": max(r["slot_taken_over_s"] for r in results),
        "deliveries_resumed_s_max": max(r["deliveries_resumed_s"] for r in results),
    }


async def _one_takeover(
    dsn: str,
    name: str,
    schema: str,
    alive: list[RelayProcess],
    counted: Callable[[], Awaitable[int]],
    backlog: int,
) -> dict[str, float]:
    before = await counted()
    with psycopg.connect(dsn) as producer:
        await asyncio.to_thread(commit_backlog, producer, schema, "bench.takeover", backlog, keys=100)
    await _until_count(counted, before + backlog // 5, timeout=120)
    streaming = [p for p in alive if p.logged("wal_relay_started")]
    if len(streaming) != 1:
        raise RuntimeError(f"{len(streaming)} relays stream the slot, not 1")
    old_walsender = await asyncio.to_thread(_slot_pid, dsn, name)
    streaming[0].kill()
    killed = time.perf_counter()
    alive.remove(streaming[0])
    at_kill = await counted()
    slot_at = started_at = None
    while slot_at is None or started_at is None:
        pid = await asyncio.to_thread(_slot_pid, dsn, name)
        now = time.perf_counter()
        if slot_at is None and pid is not None and pid != old_walsender:
            slot_at = now
        if started_at is None and any(p.logged("wal_relay_started") for p in alive):
            started_at = now
        if now - killed > 120:
            raise RuntimeError("no standby took the slot over within 120 s")
        await asyncio.sleep(0.01)
    resumed = await _until_count(counted, at_kill + 1, timeout=120)
    # Drained: every message in (duplicates make it more), then no growth for a second.
    last, stable_since = await counted(), time.monotonic()
    while last < before + backlog or time.monotonic() - stable_since < 1.0:
        await asyncio.sleep(0.1)
        now_count = await counted()
        if now_count != last:
            last, stable_since = now_count, time.monotonic()
    return {
        "slot_taken_over_s": round(max(slot_at, started_at) - killed, 3),
        "deliveries_resumed_s": round(resumed - killed, 3),
        "delivered_twice": last - before - backlog,
    }


def _record(spy: str, pid: int, output: Path, log: Path) -> subprocess.Popen[bytes]:
    """py-spy recording `pid` until it gets SIGINT: collapsed stacks, or a flame graph
    when `output` ends in .svg."""
    form = "flamegraph" if output.suffix == ".svg" else "raw"
    command = [spy, "record", "--pid", str(pid), "--rate", "200", "--format", form, "--output", str(output)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log.open("w"))


def py_spy() -> str | None:
    """py-spy: OUTBOX_RELAY_PY_SPY naming it, the one beside this Python (the dev extra
    installs it), or PATH's; None if absent."""
    beside = Path(sys.executable).parent / "py-spy"
    return os.environ.get("OUTBOX_RELAY_PY_SPY") or (str(beside) if beside.exists() else shutil.which("py-spy"))


async def profile_drain(
    dsn: str,
    bootstrap: str,
    count: int,
    collapsed: Path,
    *,
    keys: int = 100,
    one_by_one: bool = False,
    source: str = "wal",
) -> dict[str, Any]:
    """py-spy samples the relay process (its Python threads, on CPU) while it drains
    `count` messages committed in one transaction (the clock from the commit), or each
    in its own, all before the relay starts (`one_by_one`: the clock from its start);
    the collapsed stacks go to `collapsed` (a flame graph instead if it ends in .svg).
    `source` table: the same drain from the outbox table, for comparison."""
    # The moment the relay is ready for the backlog: streaming the slot, or listening.
    ready = "wal_relay_started" if source == "wal" else "listening"
    spy = py_spy()
    if spy is None:
        raise RuntimeError("py-spy not found: pip install py-spy, or set OUTBOX_RELAY_PY_SPY")
    schema, topic = "bench_wal_profile", f"bench-profile-{uuid.uuid4().hex[:8]}"
    await kafka_create_topic(bootstrap, topic, partitions=PARTITIONS)
    await asyncio.to_thread(install, dsn, schema, source)
    if one_by_one:
        await asyncio.to_thread(commit_one_by_one, dsn, schema, "bench.profile", count, keys=keys)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        relay = RelayProcess(_config(Path(tmp) / "relay.yaml", dsn, bootstrap, schema, topic), Path(tmp) / "relay.log")
        recorder: subprocess.Popen[bytes] | None = None
        try:
            if one_by_one:
                # From the stream's start: the imports and connections before it are not the drain.
                await _wait(lambda: relay.logged(ready), 60, ready, relay)
                recorder = _record(spy, relay.pid, collapsed, Path(tmp) / "py-spy.log")
            else:
                await _wait(lambda: relay.logged(ready), 60, ready, relay)
                # Started before the backlog's statement: the relay idles meanwhile
                # (pgoutput sends a transaction at its commit), and py-spy keeps only
                # samples of threads on CPU.
                recorder = _record(spy, relay.pid, collapsed, Path(tmp) / "py-spy.log")
                with psycopg.connect(dsn) as producer:
                    started = await asyncio.to_thread(
                        commit_backlog, producer, schema, "bench.profile", count, keys=keys
                    )
            async with kafka_count(bootstrap, topic) as counted:
                done = await _until_count(counted, count, timeout=900)
        finally:
            if recorder is not None:
                recorder.send_signal(signal.SIGINT)
                recorder.wait(60)
            relay.stop()
    await asyncio.to_thread(drop_slot, dsn, schema)
    workload = f"{source} mode: " + (
        f"{count:,} messages over {keys} keys, each in a transaction of its own, committed before the relay "
        "started (clock from its start)"
        if one_by_one
        else f"{count:,} messages over {keys} keys committed in one transaction (clock from the commit)"
    )
    return {
        "workload": workload,
        "messages": count,
        "drain_s": round(done - started, 2),
        "msgs_per_s": round(count / (done - started)),
    }
