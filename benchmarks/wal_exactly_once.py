"""Exactly once into Kafka (issue 19) against its targets: the WAL source with
``exactly_once: true`` on its Kafka broker against the same source at least once, both
measured in this run, alternating (these machines are shared and noisy: a ratio of
two figures taken minutes apart measures the neighbours).

- the drain of a backlog over 100 keys, committed in one transaction while the relay
  idles, clock from the commit to the last ack (wal_drain.py); exactly once, the relay
  hears of an ack only once its batch's transaction committed, so the clock stops at
  the last commit;
- commit-to-ack at 1,000 msg/s, 8 writers, a transaction per message (latency.py).

Each try gets a destination topic and an offsets topic of its own. After an
exactly-once try the offsets topic is read back ``read_committed``: one position per
Kafka transaction, each saying how many messages its batch held, which gives the
transactions per second and their size; the drain's topic is read back too, and a
missing or twice-seen message fails the run (what is measured must be exactly once).

With aiokafka, each exactly-once try also says what a transaction costs (RoundTrips):
the relay's time publishing (begin to the last ack) and committing (the position
written, EndTxn), and the requests aiokafka's sender made per transaction, with their
round trip: AddPartitionsToTxn (and how many were refused and tried again, e.g.
CONCURRENT_TRANSACTIONS right after a commit, when aiokafka waits 20 ms), produce and
EndTxn. It wraps those calls in this process, where the relay runs; librdkafka's
requests are made in C and are not seen.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from aiokafka.producer import sender
from outbox_relay_adapters.kafka_transactions import KafkaTransactions

from benchmarks import latency, wal_drain
from benchmarks.common import Target, ratio_rows
from benchmarks.env import Services
from outbox_relay.errors import first_line
from tests.consumers import kafka_read_to_end

KEYS = 100
MODES = ("at_least_once", "exactly_once")
PROBE_MESSAGES = 1_000  # the tiny run that says whether a client can do exactly once
PROBE_TIMEOUT_S = 120.0

DRAIN = "drain to Kafka, 100 keys: exactly-once / at-least-once rate"
LATENCY = "commit-to-ack p99 at 1,000 msg/s: exactly-once / at-least-once"
TARGETS: dict[str, Target] = {DRAIN: (">=", 0.9), LATENCY: ("<=", 2.0)}


def _step(name: str) -> None:
    print(f"[bench] {time.strftime('%H:%M:%S')} wal exactly-once: {name}", flush=True)


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _broker(client: str, mode: str) -> tuple[dict[str, Any], str | None]:
    """The broker block's settings for `mode`, and the offsets topic (exactly once)."""
    if mode == "at_least_once":
        return {"client": client}, None
    offsets = f"bench-offsets-{uuid.uuid4().hex[:8]}"
    return {"client": client, "exactly_once": True, "offsets_topic": offsets}, offsets


async def _positions(bootstrap: str, offsets_topic: str) -> list[int]:
    """How many messages each committed transaction held (the positions it wrote)."""
    try:
        records = await kafka_read_to_end(bootstrap, offsets_topic, isolation_level="read_committed")
    except AssertionError as exc:  # the topic has no partitions: it was never made
        raise RuntimeError(
            f"no offsets topic {offsets_topic!r} after the relay ran: it did not publish exactly once"
        ) from exc
    return [int(json.loads(r.payload)["messages"]) for r in records]


def _transactions(sizes: list[int], seconds: float) -> dict[str, Any]:
    return {
        "transactions": len(sizes),
        "transactions_per_s": round(len(sizes) / seconds, 1),
        "messages_per_transaction": round(statistics.mean(sizes), 1) if sizes else None,
        "largest_transaction": max(sizes, default=0),
    }


async def _read_once(bootstrap: str, topic: str, count: int) -> None:
    """Every message in `topic` once, read_committed; raises otherwise."""
    received = await kafka_read_to_end(bootstrap, topic, isolation_level="read_committed", timeout=300)
    ids = {r.message_id for r in received}
    if len(received) != count or len(ids) != count:
        raise RuntimeError(f"exactly once: {len(received)} records, {len(ids)} distinct, of {count} messages")


class RoundTrips:
    """Times the calls named in the module docstring while `watching()`, per kind; a
    call that returns False (aiokafka's handlers: refused, tried again) counts apart."""

    CALLS: tuple[tuple[Any, str, str], ...] = (
        (KafkaTransactions, "publish", "publish"),
        (KafkaTransactions, "commit", "commit"),
        (sender.AddPartitionsToTxnHandler, "do", "add_partitions"),
        (sender.SendProduceReqHandler, "do", "produce"),
        (sender.EndTxnHandler, "do", "end_txn"),
    )

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = collections.defaultdict(list)

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        originals = [(owner, name, getattr(owner, name)) for owner, name, _ in self.CALLS]
        for (owner, name, label), (_, _, original) in zip(self.CALLS, originals, strict=True):
            setattr(owner, name, self._timed(original, label))
        try:
            yield
        finally:
            for owner, name, original in originals:
                setattr(owner, name, original)

    def _timed(self, original: Callable[..., Awaitable[Any]], label: str) -> Callable[..., Awaitable[Any]]:
        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            result = await original(*args, **kwargs)
            self.seconds[label if result is not False else f"{label}_refused"].append(time.perf_counter() - started)
            return result

        return timed

    def per_transaction(self) -> dict[str, float]:
        """Per committed transaction: how many of each call, and each call's mean ms
        (publish: the sum of a transaction's publish calls, one per wave)."""
        transactions = len(self.seconds.get("commit", [])) or 1
        out: dict[str, float] = {}
        for label, spent in sorted(self.seconds.items()):
            out[f"{label}_calls"] = round(len(spent) / transactions, 2)
            out[f"{label}_ms"] = round(1000 * statistics.mean(spent), 2)
        out["publish_ms"] = round(1000 * sum(self.seconds.get("publish", [])) / transactions, 2)
        return out


async def _drain(svc: Services, count: int, client: str, mode: str) -> dict[str, Any]:
    broker, offsets = _broker(client, mode)
    topic = f"bench-eos-{uuid.uuid4().hex[:8]}"
    trips = RoundTrips()
    with trips.watching() if offsets is not None and client == "aiokafka" else contextlib.nullcontext():
        measured = await wal_drain.drain(
            svc.dsn, svc.kafka, count, source="wal", keys=KEYS, client=client, broker=broker, topic=topic
        )
    measured["rate"] = round(measured["rate"])
    if trips.seconds:
        measured["per_transaction"] = trips.per_transaction()
    if offsets is not None:
        measured.update(_transactions(await _positions(svc.kafka, offsets), count / measured["rate"]))
        await _read_once(svc.kafka, topic, count)
    return measured


async def _latency(svc: Services, seconds: float, client: str, mode: str) -> dict[str, Any]:
    broker, offsets = _broker(client, mode)
    trips = RoundTrips()
    with trips.watching() if offsets is not None and client == "aiokafka" else contextlib.nullcontext():
        measured: dict[str, Any] = dict(
            await latency.commit_to_ack(
                svc.dsn, svc.kafka, rate=1000, seconds=seconds, notify=True, source="wal", broker=broker
            )
        )
    if trips.seconds:
        measured["per_transaction"] = trips.per_transaction()
    if offsets is not None:
        measured.update(_transactions(await _positions(svc.kafka, offsets), seconds))
    return measured


async def _alternating(
    runs: int, what: str, measure: Callable[[str], Awaitable[dict[str, Any]]]
) -> dict[str, list[dict[str, Any]]]:
    """`runs` tries of each mode, alternating, the first mode swapped every run (so
    neither always follows the other)."""
    tries: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    for run in range(runs):
        for mode in MODES if run % 2 == 0 else reversed(MODES):
            _step(f"{what}, {mode.replace('_', '-')} (run {run + 1} of {runs})")
            tries[mode].append(await measure(mode))
    return tries


def _medians(tries: list[dict[str, Any]], fields: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in fields:
        known = [t[field] for t in tries if t.get(field) is not None]
        if known:
            out[field] = round(statistics.median(known), 2)
    breakdowns = [t["per_transaction"] for t in tries if "per_transaction" in t]
    if breakdowns:
        out["per_transaction"] = _medians(breakdowns, tuple(sorted({k for b in breakdowns for k in b})))
    return out


DRAIN_FIELDS = ("rate", "pg_cpu_us", "relay_cpu_us", "transactions_per_s", "messages_per_transaction")
LATENCY_FIELDS = ("p50_ms", "p95_ms", "p99_ms", "transactions_per_s", "messages_per_transaction")


async def _client(svc: Services, client: str, *, messages: int, seconds: float, runs: int) -> dict[str, Any]:
    drains = await _alternating(
        runs, f"{client}, drain {messages:,}, 100 keys", lambda mode: _drain(svc, messages, client, mode)
    )
    lats = await _alternating(
        runs, f"{client}, commit-to-ack at 1,000 msg/s", lambda mode: _latency(svc, seconds, client, mode)
    )
    return {
        "drain": {mode: {**_medians(t, DRAIN_FIELDS), "tries": t} for mode, t in drains.items()},
        "commit_to_ack": {mode: {**_medians(t, LATENCY_FIELDS), "tries": t} for mode, t in lats.items()},
    }


async def _can_do_exactly_once(svc: Services, client: str) -> str | None:
    """None if a tiny exactly-once drain with `client` works, else why not."""
    _step(f"{client}: a tiny exactly-once drain ({PROBE_MESSAGES:,}), to see whether it works")
    try:
        await asyncio.wait_for(_drain(svc, PROBE_MESSAGES, client, "exactly_once"), PROBE_TIMEOUT_S)
    except Exception as exc:  # any failure: this client is left out, with its reason
        return f"{type(exc).__name__}: {first_line(exc)}"
    return None


async def run(
    svc: Services, *, messages: int, seconds: float, runs: int, clients: tuple[str, ...] = ("aiokafka", "librdkafka")
) -> dict[str, Any]:
    load_before = _load()
    results: dict[str, Any] = {"messages": messages, "seconds": seconds, "runs": runs, "clients": {}, "left_out": {}}
    for client in clients:
        reason = None if client == "aiokafka" else await _can_do_exactly_once(svc, client)
        if reason is not None:
            results["left_out"][client] = reason
            continue
        results["clients"][client] = await _client(svc, client, messages=messages, seconds=seconds, runs=runs)
    results["load_average"] = {"before": load_before, "after": _load()}
    results["ratios"] = ratios(results)
    return results


def ratios(r: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for client, c in r["clients"].items():
        suffix = "" if client == "aiokafka" else f", client {client}"
        drain, lat = c["drain"], c["commit_to_ack"]
        out[DRAIN + suffix] = round(drain["exactly_once"]["rate"] / drain["at_least_once"]["rate"], 2)
        out[LATENCY + suffix] = round(lat["exactly_once"]["p99_ms"] / lat["at_least_once"]["p99_ms"], 2)
        out[f"commit-to-ack p50 at 1,000 msg/s: exactly-once / at-least-once{suffix}"] = round(
            lat["exactly_once"]["p50_ms"] / lat["at_least_once"]["p50_ms"], 2
        )
    return out


def _target(name: str) -> Target | None:
    return next((t for base, t in TARGETS.items() if name.startswith(base)), None)


def _breakdown(b: dict[str, float]) -> str:
    calls = ", ".join(
        f"{label} {b[label + '_calls']} x {b[label + '_ms']} ms"
        for label in ("add_partitions", "add_partitions_refused", "produce", "end_txn")
        if label + "_calls" in b
    )
    return f"publishing {b.get('publish_ms')} ms, commit {b.get('commit_ms')} ms; requests: {calls}"


def table(r: dict[str, Any]) -> str:
    lines = ratio_rows("exactly once (issue 19)", r["ratios"], _target)
    lines += [
        "",
        f"| {r['messages']:,} backlog, 100 keys (medians of {r['runs']}) | msg/s | relay CPU µs/msg "
        "| transactions/s | messages/transaction |",
        "|---|---|---|---|---|",
    ]
    for client, c in r["clients"].items():
        for mode, d in c["drain"].items():
            lines.append(
                f"| {client}, {mode.replace('_', '-')} | {d['rate']:,.0f} | {d.get('relay_cpu_us')} "
                f"| {d.get('transactions_per_s', '')} | {d.get('messages_per_transaction', '')} |"
            )
    lines += [
        "",
        f"| commit-to-ack at 1,000 msg/s, {r['seconds']:g} s (medians of {r['runs']}) | p50 ms | p95 ms | p99 ms "
        "| transactions/s | messages/transaction |",
        "|---|---|---|---|---|---|",
    ]
    for client, c in r["clients"].items():
        for mode, d in c["commit_to_ack"].items():
            lines.append(
                f"| {client}, {mode.replace('_', '-')} | {d['p50_ms']} | {d['p95_ms']} | {d['p99_ms']} "
                f"| {d.get('transactions_per_s', '')} | {d.get('messages_per_transaction', '')} |"
            )
    for client, c in r["clients"].items():
        for what in ("drain", "commit_to_ack"):
            if "per_transaction" in c[what]["exactly_once"]:
                lines.append(
                    f"\n{client}, exactly-once {what.replace('_', '-')}, per transaction: "
                    + _breakdown(c[what]["exactly_once"]["per_transaction"])
                )
    for client, reason in r["left_out"].items():
        lines.append(f"\n{client} left out: {reason}")
    load = r["load_average"]
    lines.append(f"\nLoad average (1, 5, 15 min): {load['before']} before, {load['after']} after.")
    return "\n".join(lines)
