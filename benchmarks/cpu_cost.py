"""What a message costs in CPU, and whether the drain uses the machine (issue 21).

For each Kafka client (aiokafka, librdkafka) and each shape (keyless, 100 keys), in one
run: the raw producer sending the backlog's records with the same acknowledgement
settings (no database), then the relay draining the same backlog from the outbox
table with its default settings (`client:` the only broker option). Each is read from
/proc over the same span (benchmarks/cpu.py): CPU µs per message of the process under
test (the relay, or the raw producer), of PostgreSQL (every backend; the raw runs do
not touch it) and of the Kafka broker's JVM, msg/s, and the cores in use (all three
over the wall time). The median run of `runs` (by msg/s) gives each row.

The ratios are the issue's targets, each taken over the worse shape: a figure is only
as good as the workload it is worst at.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from benchmarks import kafka_bench, rabbit_bench, wal_process, wal_profile
from benchmarks.common import Keys, ratio_rows
from benchmarks.cpu import PgCpu, Window
from benchmarks.env import Services

SHAPES: list[tuple[str, Keys]] = [("keyless", None), ("100 keys", 100)]
CLIENTS = ("aiokafka", "librdkafka")

# Debezium Server 3.6.1 (tuned) draining 100,000 messages of 100 keys from PostgreSQL
# into Kafka on this machine (docs/explanation/performance-wal.md): not rerun here (it
# needs its own distribution), so a constant beside the figures of the same run.
DEBEZIUM_MSGS_PER_S = 29_700

TARGETS: dict[str, tuple[str, float]] = {
    "relay process CPU per message / raw producer's, aiokafka": ("<=", 1.3),
    "relay process CPU per message / raw producer's, librdkafka": ("<=", 2.0),
    "PostgreSQL CPU per message, claim + mark (µs)": ("<=", 7.5),
    "broker CPU per message, relay / raw producer, aiokafka": ("<=", 1.3),
    "broker CPU per message, relay / raw producer, librdkafka": ("<=", 1.3),
    "drain, relay / raw producer, aiokafka": (">=", 0.6),
    "drain, relay / raw producer, librdkafka": (">=", 0.6),
    "cores in use during the relay's drain (relay + PostgreSQL + broker)": (">=", 1.7),
    "drain, defaults, 100 keys / Debezium Server's best (29.7k msg/s)": (">=", 1.0),
    "RabbitMQ, 100 keys, defaults / raw pika with a confirm window": (">=", 0.8),
}


def _step(name: str) -> None:
    print(f"[bench] {time.strftime('%H:%M:%S')} cpu: {name}", flush=True)


async def _median_run(
    runs: int, measure: Callable[[Window], Awaitable[float]], window: Callable[[], Window], count: int
) -> dict[str, Any]:
    """The run with the median msg/s of `runs`, all its figures from that one run."""
    results: list[dict[str, Any]] = []
    for _ in range(runs):
        meter = window()
        await measure(meter)
        results.append(meter.per_message(count))
    results.sort(key=lambda r: float(r["msgs_per_s"] or 0))
    return results[len(results) // 2]


async def run(svc: Services, *, messages: int, runs: int) -> dict[str, Any]:
    pg = PgCpu(svc.dsn)
    broker_pid = svc.kafka_pid

    def with_database() -> Window:
        return Window(pg, broker_pid)

    def without_database() -> Window:
        return Window(None, broker_pid)

    rows: dict[str, dict[str, Any]] = {}
    for shape, keys in SHAPES:
        row = rows.setdefault(shape, {})
        for client in CLIENTS:

            async def raw(meter: Window, client: str = client, keys: Keys = keys) -> float:
                send = kafka_bench.raw_rate if client == "aiokafka" else kafka_bench.raw_rate_librdkafka
                return await send(svc.kafka, messages, keys=keys, meter=meter)

            async def relay(meter: Window, client: str = client, keys: Keys = keys) -> float:
                return await kafka_bench.relay_rate(svc.dsn, svc.kafka, messages, keys=keys, client=client, meter=meter)

            _step(f"raw {client}, {shape}, {messages:,}")
            row[f"raw {client}"] = await _median_run(runs, raw, without_database, messages)
            _step(f"relay, {client}, {shape}, {messages:,}")
            row[f"relay {client}"] = await _median_run(runs, relay, with_database, messages)
    _step(f"RabbitMQ: raw pika and the relay with its defaults, 100 keys, {messages:,}")
    rabbit = {
        "raw pika": statistics.median([await rabbit_bench.raw_rate(svc.amqp, messages, keys=100) for _ in range(runs)]),
        "relay, defaults": statistics.median(
            [await rabbit_bench.relay_rate(svc.dsn, svc.amqp, messages, keys=100, defaults=True) for _ in range(runs)]
        ),
    }
    return {
        "messages": messages,
        "runs": runs,
        "kafka": rows,
        "rabbitmq_msgs_per_s": {name: round(rate) for name, rate in rabbit.items()},
        "ratios": ratios(rows, rabbit),
    }


def _worst(values: list[float | None], op: str) -> float | None:
    known = [v for v in values if v is not None]
    if not known:
        return None
    return max(known) if op == "<=" else min(known)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else round(a / b, 2)


def ratios(rows: dict[str, dict[str, Any]], rabbit: dict[str, float]) -> dict[str, float | None]:
    shapes = list(rows.values())
    out: dict[str, float | None] = {}
    for client in CLIENTS:
        relay = [s[f"relay {client}"] for s in shapes]
        raw = [s[f"raw {client}"] for s in shapes]
        out[f"relay process CPU per message / raw producer's, {client}"] = _worst(
            [_ratio(r["process_cpu_us"], w["process_cpu_us"]) for r, w in zip(relay, raw, strict=True)], "<="
        )
        out[f"broker CPU per message, relay / raw producer, {client}"] = _worst(
            [_ratio(r["broker_cpu_us"], w["broker_cpu_us"]) for r, w in zip(relay, raw, strict=True)], "<="
        )
        out[f"drain, relay / raw producer, {client}"] = _worst(
            [_ratio(r["msgs_per_s"], w["msgs_per_s"]) for r, w in zip(relay, raw, strict=True)], ">="
        )
    relays = [s[f"relay {client}"] for s in shapes for client in CLIENTS]
    out["PostgreSQL CPU per message, claim + mark (µs)"] = _worst([r["pg_cpu_us"] for r in relays], "<=")
    out["cores in use during the relay's drain (relay + PostgreSQL + broker)"] = _worst(
        [r["cores_in_use"] for r in relays], ">="
    )
    out["drain, defaults, 100 keys / Debezium Server's best (29.7k msg/s)"] = _ratio(
        rows["100 keys"]["relay aiokafka"]["msgs_per_s"], DEBEZIUM_MSGS_PER_S
    )
    out["RabbitMQ, 100 keys, defaults / raw pika with a confirm window"] = _ratio(
        rabbit["relay, defaults"], rabbit["raw pika"]
    )
    return out


def table(part: dict[str, Any]) -> str:
    lines = ratio_rows("CPU and the machine (worse shape)", part["ratios"], TARGETS.get)
    lines += [
        "",
        f"| {part['messages']:,} messages, median of {part['runs']} | msg/s | process CPU µs/msg "
        "| PostgreSQL µs/msg | broker µs/msg | cores in use |",
        "|---|---|---|---|---|---|",
    ]
    for shape, row in part["kafka"].items():
        for name, r in row.items():
            lines.append(
                f"| {name}, {shape} | {r['msgs_per_s']:,} | {r['process_cpu_us']} | {r['pg_cpu_us'] or '—'} "
                f"| {r['broker_cpu_us']} | {r['cores_in_use']} |"
            )
    return "\n".join(lines)


async def profile(svc: Services, *, messages: int, to: Path) -> dict[str, Any]:
    """Where the relay process's CPU goes in a table-source drain (100 keys, defaults,
    aiokafka): py-spy's summary by part of the path (wal_profile.py) in `to` (.md), and
    a flame graph of a second, identical drain beside it (.svg)."""
    collapsed = to.with_suffix(".collapsed")
    _step(f"profile (py-spy) of the relay process, table source, {messages:,}")
    run = await wal_process.profile_drain(svc.dsn, svc.kafka, messages, collapsed, source="table")
    _step(f"flame graph (py-spy) of the relay process, table source, {messages:,}")
    await wal_process.profile_drain(svc.dsn, svc.kafka, messages, to.with_suffix(".svg"), source="table")
    await asyncio.to_thread(_write_profile, to, collapsed, run)
    return run


def _write_profile(to: Path, collapsed: Path, run: dict[str, Any]) -> None:
    svg = to.with_suffix(".svg").name
    to.write_text(
        "# Where the relay process's CPU goes, table source (py-spy)\n\n"
        "Written by `scripts/bench --cpu-only` (benchmarks/cpu_cost.py); the flame graph of the "
        f"same drain: [{svg}]({svg}).\n\n" + wal_profile.summary(collapsed, run)
    )
    collapsed.unlink(missing_ok=True)  # large, and summed up in `to`
