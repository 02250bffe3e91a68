"""`python -m benchmarks`: runs every measurement, prints one table, writes JSON.

scripts/bench                      # the full run (100,000 messages)
scripts/bench --messages 20000     # a quicker run
scripts/bench --wal-only           # only the WAL source's part (benchmarks/wal.py)
scripts/bench --wal-only --messages 10000 --large 100000   # a quick one
scripts/bench --exactly-once-only  # only exactly once vs at least once (benchmarks/wal_exactly_once.py)
scripts/bench --cpu-only           # only CPU per message and the relay's profile (benchmarks/cpu_cost.py)
scripts/bench --brokers-only       # only Redis, NATS and SQS against their raw clients, per key shape
scripts/bench --console-only       # only the operator console's pages on a large outbox (benchmarks/console_pages.py)

Results are merged into the JSON file: the parts this run measured replace theirs, the
others stay; a WAL part measured before is kept under "wal_previous_runs". An
exactly-once-only run replaces only "wal" -> "exactly_once"; a brokers-only run only
"brokers"; a console-only run only "console".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import (
    console_pages,
    cpu_cost,
    env,
    kafka_bench,
    latency,
    matrix,
    nats_bench,
    rabbit_bench,
    redis_bench,
    replay_cost,
    sql_floor,
    sqs_bench,
    wal,
    wal_exactly_once,
    write_path,
)
from benchmarks.common import Keys, ratio_rows
from outbox_relay.observability.logging_setup import configure
from outbox_relay.process import tune_gc

TARGETS = {
    "kafka relay / raw producer": (">=", 0.8),
    "kafka relay / naive relay": (">=", 30.0),
    "rabbitmq relay / raw pika": (">=", 0.8),
    "commit-to-ack p99 ms, NOTIFY on, 1000/s": ("<=", 25.0),
    "write p50 with outbox / plain": ("<=", 1.10),
    "write p50: outbox.enqueue / bare-table insert of the same bytes": ("<=", 1.15),
    "16-writer tps with outbox (NOTIFY on) / plain": (">=", 0.90),
}


def _step(name: str) -> None:
    print(f"[bench] {time.strftime('%H:%M:%S')} {name}", flush=True)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "machine": env.machine(),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "messages": args.messages,
    }
    if args.console_only:  # PostgreSQL alone: no broker is asked
        _step("console: pages on a large outbox")
        part = await asyncio.to_thread(
            console_pages.with_cluster, lambda dsn: console_pages.run(dsn, runs=args.runs, requests=args.requests)
        )
        _step(f"console: {console_pages.write(part, args.out.parent)}")
        # The plans' text stays in the results file; the JSON keeps what each took.
        plans = {name: {k: v for k, v in plan.items() if k != "plan"} for name, plan in part["plans"].items()}
        results[CONSOLE] = {**part, "plans": plans}
        return results
    with env.provisioned() as svc:
        if args.exactly_once_only:
            results[EXACTLY_ONCE] = await _exactly_once(svc, args)
            return results
        if args.cpu_only:
            results[CPU_ONLY] = await _cpu(svc, args)
            return results
        if args.brokers_only:
            results[BROKERS] = await _brokers(svc, args)
            return results
        if not args.skip_cpu:
            results["cpu"] = await _cpu(svc, args)
        if args.wal_only or not args.skip_wal:
            results["wal"] = await _wal(svc, args)
        if args.wal_only:
            return results
        if args.replay_only:
            _step("replay: copy cost")
            results["replay"] = await asyncio.to_thread(replay_cost.measure, svc.dsn, rows=args.replay_rows)
            return results
        if args.matrix_only or not args.skip_matrix:
            results["matrix"] = await matrix.run(
                svc.dsn,
                svc.kafka,
                svc.amqp,
                small=args.small,
                large=args.large,
                held_back=args.held_back,
                runs=args.runs,
                sqs=svc.sqs,
            )
        if args.matrix_only:
            return results
        _step("kafka: raw producer")
        kafka_raw = await kafka_bench.raw_rate(svc.kafka, args.messages)
        _step("kafka: relay")
        kafka_relay = await kafka_bench.relay_rate(svc.dsn, svc.kafka, args.messages)
        _step("kafka: naive relay")
        kafka_naive = await kafka_bench.naive_rate(svc.dsn, svc.kafka, args.naive)
        _step("rabbitmq: raw pika")
        rabbit_raw = await rabbit_bench.raw_rate(svc.amqp, args.messages)
        _step("rabbitmq: relay")
        rabbit_relay = await rabbit_bench.relay_rate(svc.dsn, svc.amqp, args.messages)
        _step("rabbitmq: naive relay")
        rabbit_naive = await asyncio.to_thread(rabbit_bench.naive_rate, svc.dsn, svc.amqp, args.naive)
        _step("redis: raw redis-py, 100 keys")
        redis_raw = await redis_bench.raw_rate(svc.redis, args.messages)
        _step("redis: relay, 100 keys")
        redis_relay = await redis_bench.relay_rate(svc.dsn, svc.redis, args.messages)
        _step("nats: raw nats-py (100 keys)")
        nats_raw = await nats_bench.raw_rate(svc.nats, args.messages)
        _step("nats: relay (100 keys)")
        nats_relay = await nats_bench.relay_rate(svc.dsn, svc.nats, args.messages)
        _step("latency: NOTIFY on")
        lat_on = await latency.commit_to_ack(svc.dsn, svc.kafka, rate=1000, seconds=args.seconds, notify=True)
        _step("latency: NOTIFY off")
        lat_off = await latency.commit_to_ack(svc.dsn, svc.kafka, rate=1000, seconds=args.seconds, notify=False)
        _step("write path")
        writes = await asyncio.to_thread(write_path.measure, svc.dsn, seconds=args.write_seconds, rounds=args.rounds)
    results["throughput_msgs_per_s"] = {
        "kafka_relay": round(kafka_relay),
        "kafka_raw_producer": round(kafka_raw),
        "kafka_naive_relay": round(kafka_naive),
        "rabbitmq_relay": round(rabbit_relay),
        "rabbitmq_raw_pika": round(rabbit_raw),
        "rabbitmq_naive_relay": round(rabbit_naive),
        "redis_relay_100_keys": round(redis_relay),
        "redis_raw_redis_py_100_keys": round(redis_raw),
        "nats_relay_100_keys": round(nats_relay),
        "nats_raw_nats_py_100_keys": round(nats_raw),
    }
    results["commit_to_ack"] = {"notify_on": lat_on, "notify_off_poll_1s": lat_off}
    results["write_path"] = writes
    results["ratios"] = {
        "kafka relay / raw producer": round(kafka_relay / kafka_raw, 2),
        "kafka relay / naive relay": round(kafka_relay / kafka_naive, 1),
        "rabbitmq relay / raw pika": round(rabbit_relay / rabbit_raw, 2),
        "rabbitmq relay / naive relay": round(rabbit_relay / rabbit_naive, 1),
        "redis relay / raw redis-py (100 keys)": round(redis_relay / redis_raw, 2),
        "nats relay / raw nats-py, 100 keys": round(nats_relay / nats_raw, 2),
        "commit-to-ack p99 ms, NOTIFY on, 1000/s": lat_on["p99_ms"],
        "write p50 with outbox / plain": round(writes["outbox_notify_on_p50_ms"] / writes["plain_p50_ms"], 3),
        "write p50: outbox.enqueue / bare-table insert of the same bytes": round(
            writes["outbox_notify_on_p50_ms"] / writes["floor_bare_table_p50_ms"], 3
        ),
        "write p50: direct INSERT into the outbox / bare-table insert": round(
            writes["outbox_direct_insert_notify_on_p50_ms"] / writes["floor_bare_table_p50_ms"], 3
        ),
        "write p50 with outbox, NOTIFY off / plain": round(
            writes["outbox_notify_off_p50_ms"] / writes["plain_p50_ms"], 3
        ),
        "16-writer tps with outbox (NOTIFY on) / plain": round(
            writes["outbox_notify_on_tps_16w"] / writes["plain_tps_16w"], 3
        ),
        "16-writer tps with outbox (NOTIFY off) / plain": round(
            writes["outbox_notify_off_tps_16w"] / writes["plain_tps_16w"], 3
        ),
        "write p50 with outbox in the same statement / plain": round(
            writes["outbox_one_statement_notify_on_p50_ms"] / writes["plain_p50_ms"], 3
        ),
        "16-writer tps with outbox in the same statement / plain": round(
            writes["outbox_one_statement_notify_on_tps_16w"] / writes["plain_tps_16w"], 3
        ),
    }
    return results


WAL_ONLY_KEYS = {"machine", "started", "messages", "wal"}


async def _wal(svc: env.Services, args: argparse.Namespace) -> dict[str, Any]:
    started = datetime.now(UTC).isoformat(timespec="seconds")
    part = await wal.run(
        svc,
        messages=args.messages,
        large=args.large,
        seconds=args.seconds,
        write_seconds=args.write_seconds,
        rounds=args.rounds,
        runs=args.runs,
        profile_to=args.out.parent / "wal_profile.md" if args.wal_profile else None,
    )
    return {"started": started, "machine": env.machine(), **part}


EXACTLY_ONCE = "wal_exactly_once"  # an exactly-once-only run's part, merged into "wal"
BROKERS = "brokers"  # a brokers-only run's part: Redis, NATS, SQS against their raw clients, per shape
# The part before the shapes (100 keys only, no machine or start of its own): still shown
# by table(); dropped by merged() once a "brokers" part replaces it.
BROKERS_100_KEYS = "brokers_100_keys"

# The shapes of the brokers-only part: (name in the JSON, label, keys, large backlog).
# Keys as benchmarks.common.Keys: None keyless, "unique" a key per message.
BROKER_SHAPES: list[tuple[str, str, Keys, bool]] = [
    ("keyless", "keyless", None, False),
    ("1_key", "1 key", 1, False),
    ("100_keys", "100 keys", 100, False),
    ("key_per_message", "a key per message", "unique", False),
    ("100_keys_large", "100 keys, large backlog", 100, True),
]
# ElasticMQ drains ~1,000 msg/s: SQS's large shape is at most --small x 2 messages (not
# --brokers-large), so that the whole brokers-only run stays under ~25 minutes.
SQS_LARGE_FACTOR = 2
SQS_LARGE_NOTE = (
    "SQS on ElasticMQ drains ~1,000 msg/s: its large backlog is at most --small x 2 messages,"
    " not --brokers-large, to keep a brokers-only run under ~25 minutes"
)

BROKER_NAMES = ("redis", "nats", "sqs")
WARM_UP = 1000  # messages of each broker's unmeasured first drain
Rate = Callable[[int, Keys], Awaitable[float]]


async def _brokers(svc: env.Services, args: argparse.Namespace) -> dict[str, Any]:
    """Redis Streams, NATS JetStream and SQS (ElasticMQ): the relay draining a backlog
    against the raw client with the same acknowledgement, for each shape of BROKER_SHAPES
    (keyless, 1 key, 100 keys, a key per message: `--small` messages; 100 keys:
    `--brokers-large`, SQS at most `--small` x 2). Per shape, raw and relay alternated
    `--runs` times so that the machine's drift hits both alike; medians, msg/s. Each
    broker starts with an unmeasured warm-up of both."""
    started = datetime.now(UTC).isoformat(timespec="seconds")
    brokers: dict[str, tuple[Rate, Rate, int]] = {
        "redis": (
            lambda n, keys: redis_bench.raw_rate(svc.redis, n, keys=keys),
            lambda n, keys: redis_bench.relay_rate(svc.dsn, svc.redis, n, keys=keys),
            args.brokers_large,
        ),
        "nats": (
            lambda n, keys: nats_bench.raw_rate(svc.nats, n, keys=keys),
            lambda n, keys: nats_bench.relay_rate(svc.dsn, svc.nats, n, keys=keys),
            args.brokers_large,
        ),
    }
    if svc.sqs is not None:
        sqs = svc.sqs
        brokers["sqs"] = (
            lambda n, keys: sqs_bench.raw_rate(sqs, n, keys=keys),
            lambda n, keys: sqs_bench.relay_rate(svc.dsn, sqs, n, keys=keys),
            min(args.brokers_large, SQS_LARGE_FACTOR * args.small),
        )
    out: dict[str, Any] = {
        "started": started,
        "machine": env.machine(),
        "commit": wal.code_commit(),
        "small": args.small,
        "large": args.brokers_large,
        "runs": args.runs,
    }
    if "sqs" in brokers:
        out["sqs_large"] = brokers["sqs"][2]
        out["sqs_large_note"] = SQS_LARGE_NOTE
    for name, (raw, relay, large) in brokers.items():
        if args.broker and name not in args.broker:
            continue
        # Not measured: each broker's first drain pays for set-up (connections, the
        # server's warm-up: the smoke run's first SQS raw send ran at ~150 msg/s, the
        # next ones at ~1,000), which would fall on its first shape's raw client.
        warm_up = min(args.small, WARM_UP)
        _step(f"{name}: warm-up ({warm_up} messages, raw client and relay, not measured)")
        await raw(warm_up, 100)
        await relay(warm_up, 100)
        shapes: dict[str, Any] = {}
        for shape, label, keys, is_large in BROKER_SHAPES:
            count = large if is_large else args.small
            raws, relays = [], []
            for n in range(args.runs):
                _step(f"{name}, {label} ({count} messages): raw client, run {n + 1}")
                raws.append(await raw(count, keys))
                _step(f"{name}, {label} ({count} messages): relay, run {n + 1}")
                relays.append(await relay(count, keys))
            entry: dict[str, Any] = {
                "keys": keys,
                "messages": count,
                "raw": round(statistics.median(raws)),
                "relay": round(statistics.median(relays)),
                "ratio": round(statistics.median(relays) / statistics.median(raws), 2),
                "raw_runs": [round(r) for r in raws],
                "relay_runs": [round(r) for r in relays],
            }
            if is_large and count < args.brokers_large:
                entry["note"] = SQS_LARGE_NOTE
            shapes[shape] = entry
            _step(f"{name}, {label}: {entry}")
        out[name] = shapes
    return out


def brokers_table(part: dict[str, Any]) -> list[str]:
    """The brokers-only part as a markdown table, one row per broker and shape; each
    broker's worst ratio in bold, marked "worst"."""
    labels = {shape: label for shape, label, _, _ in BROKER_SHAPES}
    lines = [
        f"| broker (median of {part['runs']} runs) | shape | messages | relay msg/s | raw client msg/s | relay / raw |",
        "|---|---|---|---|---|---|",
    ]
    notes: list[str] = []
    for name in BROKER_NAMES:
        shapes: dict[str, dict[str, Any]] = part.get(name, {})
        worst = min((entry["ratio"] for entry in shapes.values()), default=None)
        for shape, entry in shapes.items():
            ratio = f"**{entry['ratio']}** (worst)" if entry["ratio"] == worst else str(entry["ratio"])
            mark = ""
            if "note" in entry:
                notes.append(f"{name}: {entry['note']}")
                mark = f" ({len(notes)})"
            lines.append(
                f"| {name} | {labels.get(shape, shape)} | {entry['messages']:,}{mark} | {entry['relay']:,} "
                f"| {entry['raw']:,} | {ratio} |"
            )
    for n, note in enumerate(notes, 1):
        lines += ["", f"({n}) {note}"]
    lines += [
        "",
        f"Run {part['started']} on {part['commit']}; --small {part['small']}, --brokers-large {part['large']}.",
    ]
    return lines


CPU_ONLY = "cpu_only"  # a cpu-only run's part, merged as "cpu"
CONSOLE = "console"  # a console-only run's part: the console's pages on a large outbox


async def _cpu(svc: env.Services, args: argparse.Namespace) -> dict[str, Any]:
    started = datetime.now(UTC).isoformat(timespec="seconds")
    part = await cpu_cost.run(svc, messages=args.messages, runs=args.runs)
    # The claim and the mark alone beside the least SQL that can do them (issue 21's
    # PostgreSQL target against this machine's floor).
    part["sql_floor"] = await sql_floor.run(svc.dsn, messages=args.messages, runs=args.runs)
    part["profile"] = await cpu_cost.profile(svc, messages=args.messages, to=args.out.parent / "relay_profile.md")
    return {"started": started, "machine": env.machine(), "commit": wal.code_commit(), **part}


async def _exactly_once(svc: env.Services, args: argparse.Namespace) -> dict[str, Any]:
    started = datetime.now(UTC).isoformat(timespec="seconds")
    part = await wal_exactly_once.run(svc, messages=args.messages, seconds=args.seconds, runs=args.runs)
    return {"started": started, "machine": env.machine(), "commit": wal.code_commit(), **part}


def merged(previous: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    """`results` over `previous`: what this run measured replaces its part, the rest stays.
    A WAL-only run touches only "wal" (which carries its own machine and start); an
    earlier WAL part moves to "wal_previous_runs" (newest first). An exactly-once-only
    run replaces only "wal" -> "exactly_once" (with its own machine, start and commit); a
    cpu-only run only "cpu" (the same); a brokers-only run only "brokers" (the same), and
    drops the "brokers_100_keys" of older files (its figures are the "100_keys" shape's); a
    console-only run only "console"."""
    if CPU_ONLY in results:
        return {**previous, "cpu": results[CPU_ONLY]}
    if CONSOLE in results:
        return {**previous, CONSOLE: results[CONSOLE]}
    if BROKERS in results:  # replaces the 100-keys-only part of older files, too
        kept = {name: part for name, part in previous.items() if name != BROKERS_100_KEYS}
        return {**kept, BROKERS: results[BROKERS]}
    if EXACTLY_ONCE in results:
        return {**previous, "wal": {**previous.get("wal", {}), "exactly_once": results[EXACTLY_ONCE]}}
    out = {**previous, "wal": results["wal"]} if set(results) == WAL_ONLY_KEYS else {**previous, **results}
    if "wal" in results and "wal" in previous:
        out["wal_previous_runs"] = [previous["wal"], *previous.get("wal_previous_runs", [])]
    return out


def table(results: dict[str, Any]) -> str:
    lines = [wal.table(results["wal"]), ""] if "wal" in results else []
    lines += [wal_exactly_once.table(results[EXACTLY_ONCE]), ""] if EXACTLY_ONCE in results else []
    cpu = results.get("cpu") or results.get(CPU_ONLY)
    lines += [cpu_cost.table(cpu), ""] if cpu else []
    lines += [sql_floor.table(cpu["sql_floor"]), ""] if cpu and "sql_floor" in cpu else []
    lines += [matrix.table(results["matrix"]), ""] if "matrix" in results else []
    if BROKERS in results:
        lines += [*brokers_table(results[BROKERS]), ""]
    if BROKERS_100_KEYS in results:  # files written before the shapes
        b = results[BROKERS_100_KEYS]
        lines += [
            f"| {b['messages']} messages, 100 keys, median of {b['runs']} | relay msg/s | raw client msg/s | ratio |"
        ]
        lines += ["|---|---|---|---|"]
        lines += [
            f"| {name} | {r['relay']} | {r['raw']} | {r['ratio']} |" for name, r in b.items() if isinstance(r, dict)
        ]
        lines += [""]
    if "replay" in results:
        lines += [replay_cost.table(results["replay"]), ""]
    if CONSOLE in results:
        lines += [console_pages.table(results[CONSOLE]), ""]
    if "ratios" not in results:
        return "\n".join(lines)
    lines += ratio_rows("measure", results["ratios"], TARGETS.get)
    t = results["throughput_msgs_per_s"]
    lines += [
        "",
        "| throughput (messages/s) | relay | ceiling (raw client) | naive relay |",
        "|---|---|---|---|",
        f"| Kafka | {t['kafka_relay']} | {t['kafka_raw_producer']} | {t['kafka_naive_relay']} |",
        f"| RabbitMQ | {t['rabbitmq_relay']} | {t['rabbitmq_raw_pika']} | {t['rabbitmq_naive_relay']} |",
    ]
    if "nats_relay_100_keys" in t:  # results of runs before NATS have no row
        lines.append(f"| NATS JetStream, 100 keys | {t['nats_relay_100_keys']} | {t['nats_raw_nats_py_100_keys']} | |")
    lines += ["", "| commit-to-ack at 1000 msg/s | p50 ms | p95 ms | p99 ms |", "|---|---|---|---|"]
    for name, lat in results["commit_to_ack"].items():
        lines.append(f"| {name} | {lat['p50_ms']} | {lat['p95_ms']} | {lat['p99_ms']} |")
    w = results["write_path"]
    lines += [
        "",
        "| write path (pgbench) | plain | + bare-table insert (floor) | + direct outbox INSERT "
        "| + enqueue, NOTIFY on | + enqueue, NOTIFY off | + enqueue in the same statement |",
        "|---|---|---|---|---|---|---|",
        f"| p50 ms, 1 client | {w['plain_p50_ms']} | {w['floor_bare_table_p50_ms']} | "
        f"{w['outbox_direct_insert_notify_on_p50_ms']} | {w['outbox_notify_on_p50_ms']} | "
        f"{w['outbox_notify_off_p50_ms']} | {w['outbox_one_statement_notify_on_p50_ms']} |",
        f"| transactions/s, 16 clients | {w['plain_tps_16w']} | {w['floor_bare_table_tps_16w']} | "
        f"{w['outbox_direct_insert_notify_on_tps_16w']} | {w['outbox_notify_on_tps_16w']} | "
        f"{w['outbox_notify_off_tps_16w']} | {w['outbox_one_statement_notify_on_tps_16w']} |",
    ]
    m = results["machine"]
    lines += [
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory']}; {m['os']}; Python {m['python']}; "
        f"{m['java']}. Run {results['started']}, {results['messages']} messages.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--naive", type=int, default=2000, help="messages for the naive relays (they are slow)")
    parser.add_argument("--seconds", type=float, default=15.0, help="duration of each latency run")
    parser.add_argument("--write-seconds", type=float, default=5.0, help="duration of each pgbench run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the write-path runs")
    parser.add_argument("--small", type=int, default=10_000, help="the matrix's small backlog")
    parser.add_argument(
        "--large",
        type=int,
        default=1_000_000,
        help="the matrix's large backlog (100 keys), and the WAL part's one transaction for the relay's memory",
    )
    parser.add_argument("--held-back", type=int, default=100_000, help="rows behind the held-back key's head")
    parser.add_argument("--runs", type=int, default=3, help="the matrix takes the median of this many runs")
    parser.add_argument(
        "--brokers-only",
        action="store_true",
        help="only Redis, NATS and SQS against their raw clients, per shape: keyless, 1 key, 100 keys and a key"
        " per message (--small messages each), and 100 keys with --brokers-large messages (SQS: at most --small x 2)",
    )
    parser.add_argument(
        "--brokers-large",
        type=int,
        default=100_000,
        help="the brokers-only part's large backlog (100 keys); SQS on ElasticMQ (~1,000 msg/s) takes at most"
        " --small x 2",
    )
    parser.add_argument(
        "--broker",
        action="append",
        choices=BROKER_NAMES,
        help="with --brokers-only: only this broker (repeatable; default: all three)",
    )
    parser.add_argument(
        "--console-only",
        action="store_true",
        help="only the operator console's pages on an outbox of 1,000,000 pending and 100,000 dead-lettered rows"
        " (benchmarks/console_pages.py): --runs runs of --requests requests per page; PostgreSQL alone",
    )
    parser.add_argument("--requests", type=int, default=20, help="with --console-only: requests per page and run")
    parser.add_argument("--skip-matrix", action="store_true")
    parser.add_argument("--matrix-only", action="store_true")
    parser.add_argument("--replay-only", action="store_true", help="only the replay's cost (benchmarks/replay_cost.py)")
    parser.add_argument("--replay-rows", type=int, default=1_000_000)
    parser.add_argument("--wal-only", action="store_true", help="only the WAL source's part (benchmarks/wal.py)")
    parser.add_argument("--skip-wal", action="store_true")
    parser.add_argument(
        "--cpu-only", action="store_true", help="only CPU per message and the profile (benchmarks/cpu_cost.py)"
    )
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument(
        "--exactly-once-only",
        action="store_true",
        help="only exactly once vs at least once from the WAL source (benchmarks/wal_exactly_once.py)",
    )
    parser.add_argument(
        "--wal-profile", action="store_true", help="also profile the relay in WAL mode with py-spy (dev extra)"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/latest.json"))
    args = parser.parse_args()
    configure("warning")
    # The relays measured here run in this process: with the collector settings of
    # `outbox-relay run` (outbox_relay/process.py), which the raw producers get too.
    tune_gc()
    results = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    args.out.write_text(json.dumps(merged(previous, results), indent=2, ensure_ascii=False) + "\n")
    print(table(results))
    print(f"\n(JSON: {args.out})")


if __name__ == "__main__":
    main()
