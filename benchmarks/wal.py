"""The WAL source (issue 18) against its targets: every figure a ratio against a
baseline measured in the same run on the same services (these machines are shared and
noisy), except Debezium Server's, which is the figure the issue's author recorded on
this machine (Debezium is not installed here).

- the write path: `outbox.enqueue` in WAL mode vs an INSERT of the same bytes into a
  bare table (write_path.measure_wal: pgbench, prepared; p50 of 1 client, tps of 16);
- drains to Kafka, WAL vs table, per key shape (wal_drain.py: the backlog committed in
  one transaction while the relay idles, the clock from the commit to the last ack),
  and WAL vs the raw producer of the same client; PostgreSQL's CPU per message in both;
- commit-to-ack latency at 1,000 msg/s in WAL mode (latency.py);
- exactly once into Kafka against at least once, drain and commit-to-ack
  (wal_exactly_once.py, issue 19);
- the relay process's memory while it drains one transaction of a million messages,
  and a standby's takeover after the streaming relay is SIGKILLed (wal_process.py);
- optionally a py-spy profile of the relay process during a drain (wal_profile.py).
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from benchmarks import kafka_bench, latency, wal_drain, wal_exactly_once, wal_process, wal_profile, write_path
from benchmarks.common import Keys, Target, ratio_rows
from benchmarks.env import Services

SHAPES: list[tuple[str, Keys]] = [
    ("keyless", None),
    ("1 key", 1),
    ("100 keys", 100),
    ("10,000 keys", 10_000),
    ("every message its own key", "unique"),
]

# Debezium Server 3.6.1, tuned (batch 8192, poll 10 ms, producer batch 256 KiB), from an
# outbox table: 100,000 messages over 100 keys, 256-byte payloads, committed in one
# transaction, clock from the commit to the last ack. Measured by the author on
# this machine with the same PostgreSQL and Kafka (issue 18); its best figure (23.4k
# msg/s from logical decoding messages).
DEBEZIUM_SERVER_MSGS_PER_S = 29_700

ONE_BY_ONE = 10_000  # messages of the one-message-transactions drain, at most

DEBEZIUM = "drain, 100 keys: WAL mode / Debezium Server's best (29.7k msg/s, recorded by the issue)"
TARGETS: dict[str, Target] = {
    "write p50: enqueue in WAL mode / bare-table insert of the same bytes": ("<=", 1.0),
    "16-writer tps: enqueue in WAL mode / bare-table insert": (">=", 1.0),
    **{f"drain to Kafka, {name}: WAL / table": (">=", 1.5) for name, _ in SHAPES},
    "drain to Kafka, keyless: WAL / raw aiokafka": (">=", 0.7),
    "drain to Kafka, keyless, client librdkafka: WAL / raw librdkafka": (">=", 0.7),
    "PostgreSQL CPU per message, WAL mode, keyless drain (µs, walsender included)": ("<=", 5.0),
    "commit-to-ack p50 ms, WAL mode, 1000/s": ("<=", 5.0),
    "commit-to-ack p99 ms, WAL mode, 1000/s": ("<=", 25.0),
    "relay RSS peak (MiB), draining one transaction": ("<=", 300.0),
    "standby takes the slot over after SIGKILL (s, worst round)": ("<=", 5.0),
    DEBEZIUM: (">=", 1.5),
}


def code_commit() -> str:
    """HEAD, and whether the working tree had changes (the code measured)."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=False
    )
    return head.stdout.strip() + (" with uncommitted changes" if dirty.stdout.strip() else "")


def _step(name: str) -> None:
    print(f"[bench] {time.strftime('%H:%M:%S')} wal: {name}", flush=True)


async def _median(runs: int, measure: Callable[[], Awaitable[float]]) -> float:
    return statistics.median([await measure() for _ in range(runs)])


def _median_of(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 1) if known else None


async def _drains(svc: Services, messages: int, runs: int) -> dict[str, dict[str, Any]]:
    """Per shape and source: the median rate and CPU of `runs` drains, table and WAL
    alternating so both see the same neighbours."""
    cases: list[tuple[str, Keys, str, int, bool]] = [(name, keys, "aiokafka", messages, False) for name, keys in SHAPES]
    cases.append(("keyless, client librdkafka", None, "librdkafka", messages, False))
    # Not a target: the shape of the latency run, where each transaction is one message.
    small = min(messages // 10, ONE_BY_ONE)
    cases.append((f"100 keys, {small:,} one-message transactions", 100, "aiokafka", small, True))
    drains: dict[str, dict[str, Any]] = {}
    for name, keys, client, count, one_by_one in cases:
        measured: dict[str, list[dict[str, Any]]] = {"table": [], "wal": []}
        for run in range(runs):
            for source in ("table", "wal"):
                _step(f"drain {count:,}, {name}, {source} (run {run + 1} of {runs})")
                measured[source].append(
                    await wal_drain.drain(
                        svc.dsn, svc.kafka, count, source=source, keys=keys, client=client, one_by_one=one_by_one
                    )
                )
        drains[name] = {
            source: {
                "msgs_per_s": round(statistics.median(m["rate"] for m in runs_of)),
                "pg_cpu_us": _median_of([m["pg_cpu_us"] for m in runs_of]),
                "relay_cpu_us": _median_of([m["relay_cpu_us"] for m in runs_of]),
            }
            for source, runs_of in measured.items()
        }
    return drains


async def run(
    svc: Services,
    *,
    messages: int,
    large: int,
    seconds: float,
    write_seconds: float,
    rounds: int,
    runs: int,
    profile_to: Path | None,
) -> dict[str, Any]:
    _step("write path (pgbench): bare table, table enqueue, WAL enqueue")
    writes = await asyncio.to_thread(write_path.measure_wal, svc.dsn, seconds=write_seconds, rounds=rounds)
    _step("raw producers, keyless")
    raw = {
        "aiokafka": round(await _median(runs, lambda: kafka_bench.raw_rate(svc.kafka, messages, keys=None))),
        "librdkafka": round(
            await _median(runs, lambda: kafka_bench.raw_rate_librdkafka(svc.kafka, messages, keys=None))
        ),
    }
    drains = await _drains(svc, messages, runs)
    _step("commit-to-ack at 1,000 msg/s: table (NOTIFY on), then WAL")
    lat_table = await latency.commit_to_ack(svc.dsn, svc.kafka, rate=1000, seconds=seconds, notify=True)
    lat_wal = await latency.commit_to_ack(svc.dsn, svc.kafka, rate=1000, seconds=seconds, notify=True, source="wal")
    exactly_once = await wal_exactly_once.run(svc, messages=messages, seconds=seconds, runs=runs)
    _step(f"relay process memory, one transaction of {large:,}")
    rss = await wal_process.rss_while_draining(svc.dsn, svc.kafka, large)
    _step("standby takeover after SIGKILL, 3 replicas")
    takeover = await wal_process.takeover(svc.dsn, svc.kafka, backlog=max(messages // 2, 5_000))
    results: dict[str, Any] = {
        "commit": code_commit(),
        "messages": messages,
        "runs": runs,
        "write_path": writes,
        "raw_producer_msgs_per_s": raw,
        "drains": drains,
        "commit_to_ack": {"table_notify_on": lat_table, "wal": lat_wal},
        "rss": rss,
        "takeover": takeover,
        "exactly_once": exactly_once,
        "debezium_server_msgs_per_s_recorded": DEBEZIUM_SERVER_MSGS_PER_S,
    }
    if profile_to is not None:
        results["profile"] = await _profile(svc, messages, profile_to)
    results["ratios"] = ratios(results)
    return results


async def _profile(svc: Services, messages: int, to: Path) -> dict[str, Any]:
    """py-spy profiles of the relay process, summed up in `to` (their collapsed stacks
    beside it): in WAL mode one transaction of `messages`, and one-message transactions
    (the shape of the latency run); the first from the table, to compare."""
    runs = {}
    sections = [
        "# Where the relay's CPU goes in WAL mode, and in table mode for comparison (py-spy)",
        "",
        "Written by `scripts/bench --wal-only --wal-profile` (benchmarks/wal_profile.py says how it is summed).",
    ]
    for name, count, one_by_one, source in (
        ("one_transaction", messages, False, "wal"),
        ("one_message_transactions", min(messages // 10, 5_000), True, "wal"),
        ("table_one_transaction", messages, False, "table"),  # the same drain from the table, to compare
    ):
        _step(f"profile (py-spy) of the relay process: {name}, {count:,}")
        collapsed = to.with_name(f"{to.stem}.{name}.collapsed")
        runs[name] = await wal_process.profile_drain(
            svc.dsn, svc.kafka, count, collapsed, one_by_one=one_by_one, source=source
        )
        sections += ["", wal_profile.summary(collapsed, runs[name])]
    await asyncio.to_thread(to.write_text, "\n".join(sections))
    return {"summary": str(to), **runs}


def ratios(r: dict[str, Any]) -> dict[str, float | None]:
    w, d, raw = r["write_path"], r["drains"], r["raw_producer_msgs_per_s"]

    def drain_ratio(name: str) -> float:
        wal: float = d[name]["wal"]["msgs_per_s"]
        table: float = d[name]["table"]["msgs_per_s"]
        return round(wal / table, 2)

    return {
        "write p50: enqueue in WAL mode / bare-table insert of the same bytes": round(
            w["outbox_wal_p50_ms"] / w["floor_bare_table_p50_ms"], 3
        ),
        "write p50: enqueue in table mode / bare-table insert (same run)": round(
            w["outbox_notify_on_p50_ms"] / w["floor_bare_table_p50_ms"], 3
        ),
        "16-writer tps: enqueue in WAL mode / bare-table insert": round(
            w["outbox_wal_tps_16w"] / w["floor_bare_table_tps_16w"], 3
        ),
        "16-writer tps: enqueue in table mode / bare-table insert (same run)": round(
            w["outbox_notify_on_tps_16w"] / w["floor_bare_table_tps_16w"], 3
        ),
        **{f"drain to Kafka, {name}: WAL / table": drain_ratio(name) for name, _ in SHAPES},
        "drain to Kafka, keyless, client librdkafka: WAL / table": drain_ratio("keyless, client librdkafka"),
        "drain to Kafka, 100 keys, one-message transactions: WAL / table": drain_ratio(
            next(name for name in d if "one-message" in name)
        ),
        "drain to Kafka, keyless: WAL / raw aiokafka": round(d["keyless"]["wal"]["msgs_per_s"] / raw["aiokafka"], 2),
        "drain to Kafka, keyless, client librdkafka: WAL / raw librdkafka": round(
            d["keyless, client librdkafka"]["wal"]["msgs_per_s"] / raw["librdkafka"], 2
        ),
        "PostgreSQL CPU per message, WAL mode, keyless drain (µs, walsender included)": d["keyless"]["wal"][
            "pg_cpu_us"
        ],
        "PostgreSQL CPU per message, table mode, keyless drain (µs, same run)": d["keyless"]["table"]["pg_cpu_us"],
        "commit-to-ack p50 ms, WAL mode, 1000/s": r["commit_to_ack"]["wal"]["p50_ms"],
        "commit-to-ack p99 ms, WAL mode, 1000/s": r["commit_to_ack"]["wal"]["p99_ms"],
        "relay RSS peak (MiB), draining one transaction": r["rss"]["rss_peak_mib"],
        "standby takes the slot over after SIGKILL (s, worst round)": r["takeover"]["slot_taken_over_s_max"],
        DEBEZIUM: round(d["100 keys"]["wal"]["msgs_per_s"] / DEBEZIUM_SERVER_MSGS_PER_S, 2),
    }


def table(r: dict[str, Any]) -> str:
    lines = ratio_rows("WAL source (issue 18)", r["ratios"], TARGETS.get)
    lines += [
        "",
        f"| drain to Kafka, {r['messages']:,} backlog in one transaction unless said (msg/s; PostgreSQL / relay "
        "CPU µs per message) "
        "| table | WAL | WAL / table |",
        "|---|---|---|---|",
    ]
    for name, sources in r["drains"].items():
        t, w = sources["table"], sources["wal"]
        lines.append(
            f"| {name} | {t['msgs_per_s']:,} ({t['pg_cpu_us']} / {t['relay_cpu_us']}) "
            f"| {w['msgs_per_s']:,} ({w['pg_cpu_us']} / {w['relay_cpu_us']}) "
            f"| {w['msgs_per_s'] / t['msgs_per_s']:.2f} |"
        )
    raw = r["raw_producer_msgs_per_s"]
    lines.append(f"| raw producer, keyless: aiokafka / librdkafka | {raw['aiokafka']:,} / {raw['librdkafka']:,} | | |")
    w = r["write_path"]
    lines += [
        "",
        "| write path (pgbench, prepared) | plain | + bare-table insert (floor) | + enqueue, table | + enqueue, WAL |",
        "|---|---|---|---|---|",
        f"| p50 ms, 1 client | {w['plain_p50_ms']} | {w['floor_bare_table_p50_ms']} | "
        f"{w['outbox_notify_on_p50_ms']} | {w['outbox_wal_p50_ms']} |",
        f"| transactions/s, 16 clients | {w['plain_tps_16w']} | {w['floor_bare_table_tps_16w']} | "
        f"{w['outbox_notify_on_tps_16w']} | {w['outbox_wal_tps_16w']} |",
        "",
        "| commit-to-ack at 1,000 msg/s | p50 ms | p95 ms | p99 ms |",
        "|---|---|---|---|",
    ]
    for name, lat in r["commit_to_ack"].items():
        lines.append(f"| {name} | {lat['p50_ms']} | {lat['p95_ms']} | {lat['p99_ms']} |")
    rss, take = r["rss"], r["takeover"]
    lines += [
        "",
        f"Relay process, one transaction of {rss['messages']:,}: RSS idle {rss['rss_idle_mib']} MiB, peak "
        f"{rss['rss_peak_mib']} MiB (VmHWM {rss['vmhwm_mib']}), enqueue {rss['enqueue_s']} s, drain "
        f"{rss['drain_msgs_per_s']:,} msg/s.",
        f"Takeover, {take['replicas']} replicas: "
        + "; ".join(
            f"slot {t['slot_taken_over_s']} s, deliveries resumed {t['deliveries_resumed_s']} s, "
            f"{t['delivered_twice']} delivered twice"
            for t in take["rounds"]
        )
        + ".",
    ]
    if "profile" in r:
        lines.append(f"Profile: {r['profile']['summary']}")
    if "exactly_once" in r:
        lines += ["", wal_exactly_once.table(r["exactly_once"])]
    return "\n".join(lines)
