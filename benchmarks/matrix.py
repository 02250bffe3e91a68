"""The workload matrix: every key shape users have, small and large backlogs, small
and large payloads, each drained by the relay and compared with a raw client of the
same records in the same run (these machines are shared and noisy: only ratios of
figures taken side by side mean anything).

Shapes: keyless, 1 key, 100 keys, 10,000 keys, every message its own key; the
1,000,000-row backlog for keyless, 1 key, 100 keys and every message its own key;
100 keys next to one key whose head waits with 100,000 rows behind it; 100 keys with
16 KiB payloads; RabbitMQ with 100 keys; SQS (ElasticMQ, a FIFO queue) with 100 keys.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from benchmarks import kafka_bench, rabbit_bench, replicas, sqs_bench
from benchmarks.common import Keys, Target, ratio_rows
from tests.services import SqsServer

LARGE_PAYLOAD = 16 * 1024


def _step(name: str) -> None:
    print(f"[bench] {time.strftime('%H:%M:%S')} matrix: {name}", flush=True)


async def _best_of(runs: int, measure: Callable[[], Awaitable[float]]) -> float:
    """Median of `runs` measurements: one noisy neighbour does not decide the figure."""
    return statistics.median([await measure() for _ in range(runs)])


async def run(
    dsn: str,
    kafka: str,
    amqp: str,
    *,
    small: int,
    large: int,
    held_back: int,
    runs: int,
    sqs: SqsServer | None = None,
) -> dict[str, Any]:
    rates: dict[str, float] = {}
    shapes: list[tuple[str, Keys]] = [
        ("keyless", None),
        ("1 key", 1),
        ("100 keys", 100),
        ("10,000 keys", 10_000),
        ("every message its own key", "unique"),
    ]
    _step("raw aiokafka and raw confluent-kafka (librdkafka), keyless: the ceiling is the faster")
    rates["kafka raw aiokafka, keyless"] = await _best_of(runs, lambda: kafka_bench.raw_rate(kafka, small, keys=None))
    rates["kafka raw librdkafka, keyless"] = await _best_of(
        runs, lambda: kafka_bench.raw_rate_librdkafka(kafka, small, keys=None)
    )
    rates["kafka raw, keyless"] = max(rates["kafka raw aiokafka, keyless"], rates["kafka raw librdkafka, keyless"])
    for name, keys in shapes:
        _step(f"kafka relay, {name}, {small:,}")
        rates[f"kafka relay, {name}, {small:,}"] = await _best_of(
            runs, lambda keys=keys: kafka_bench.relay_rate(dsn, kafka, small, keys=keys)
        )  # type: ignore[misc]
    for name, keys in (("keyless", None), ("100 keys", 100), ("1 key", 1)):
        _step(f"kafka relay with client: librdkafka, {name}, {small:,}")
        rates[f"kafka relay librdkafka, {name}, {small:,}"] = await _best_of(
            runs,
            lambda keys=keys: kafka_bench.relay_rate(  # type: ignore[misc]
                dsn, kafka, small, keys=keys, client="librdkafka"
            ),
        )
    # The large backlog for every key shape, once each (a drain of a million takes a minute).
    large_shapes = [("100 keys", 100), ("keyless", None), ("1 key", 1), ("every message its own key", "unique")]
    for name, keys in large_shapes:
        _step(f"kafka relay, {name}, {large:,}")
        rates[f"kafka relay, {name}, {large:,}"] = await kafka_bench.relay_rate(dsn, kafka, large, keys=keys)
    _step(f"kafka relay, 100 keys beside 1 key held back with {held_back:,} rows")
    rates["kafka relay, 100 keys, 1 key held back"] = await _best_of(
        runs, lambda: kafka_bench.relay_rate(dsn, kafka, small, keys=100, held_back=held_back)
    )
    _step("kafka, 100 keys, 16 KiB payloads")
    rates["kafka raw, 100 keys, 16 KiB"] = await _best_of(
        runs, lambda: kafka_bench.raw_rate(kafka, small // 4, keys=100, payload_bytes=LARGE_PAYLOAD)
    )
    rates["kafka relay, 100 keys, 16 KiB"] = await _best_of(
        runs, lambda: kafka_bench.relay_rate(dsn, kafka, small // 4, keys=100, payload_bytes=LARGE_PAYLOAD)
    )
    _step("kafka, 100 keys, 1 relay process vs 3 (replicas), backlog committed while they idle")
    shared = small * 5
    rates["kafka, 100 keys, 1 relay process"] = await _best_of(
        runs, lambda: replicas.drain_rate(dsn, kafka, shared, replicas=1)
    )
    rates["kafka, 100 keys, 3 relay processes"] = await _best_of(
        runs, lambda: replicas.drain_rate(dsn, kafka, shared, replicas=3)
    )
    _step("rabbitmq, 100 keys")
    rates["rabbitmq raw pika, 100 keys"] = await _best_of(runs, lambda: rabbit_bench.raw_rate(amqp, small, keys=100))
    rates["rabbitmq relay, 100 keys"] = await _best_of(
        runs, lambda: rabbit_bench.relay_rate(dsn, amqp, small, keys=100)
    )
    rates["rabbitmq relay, 100 keys, pipeline_keys"] = await _best_of(
        runs, lambda: rabbit_bench.relay_rate(dsn, amqp, small, keys=100, pipeline_keys=True)
    )

    if sqs is not None:
        _step("sqs (ElasticMQ, FIFO), 100 keys")
        rates["sqs raw boto3, 100 keys"] = await _best_of(runs, lambda: sqs_bench.raw_rate(sqs, small, keys=100))
        rates["sqs relay, 100 keys"] = await _best_of(runs, lambda: sqs_bench.relay_rate(dsn, sqs, small, keys=100))

    def r(a: str, b: str) -> float:
        return round(rates[a] / rates[b], 2)

    keyless = f"kafka relay, keyless, {small:,}"
    ratios = {
        "kafka keyless: relay / fastest raw producer": r(keyless, "kafka raw, keyless"),
        "kafka keyless: relay / raw aiokafka": r(keyless, "kafka raw aiokafka, keyless"),
        "kafka keyless, client librdkafka: relay / fastest raw producer": r(
            f"kafka relay librdkafka, keyless, {small:,}", "kafka raw, keyless"
        ),
        "kafka 100 keys / keyless, client librdkafka": r(
            f"kafka relay librdkafka, 100 keys, {small:,}", f"kafka relay librdkafka, keyless, {small:,}"
        ),
        "kafka 1 key / keyless, client librdkafka": r(
            f"kafka relay librdkafka, 1 key, {small:,}", f"kafka relay librdkafka, keyless, {small:,}"
        ),
        "kafka keyless: relay with librdkafka / relay with aiokafka": r(
            f"kafka relay librdkafka, keyless, {small:,}", keyless
        ),
        "kafka 100 keys / keyless": r(f"kafka relay, 100 keys, {small:,}", keyless),
        "kafka 10,000 keys / keyless": r(f"kafka relay, 10,000 keys, {small:,}", keyless),
        "kafka every message its own key / keyless": r(f"kafka relay, every message its own key, {small:,}", keyless),
        "kafka 1 key / keyless": r(f"kafka relay, 1 key, {small:,}", keyless),
        **{
            f"kafka {name}, {large:,} backlog / {small:,} backlog": r(
                f"kafka relay, {name}, {large:,}", f"kafka relay, {name}, {small:,}"
            )
            for name, _ in large_shapes
        },
        f"kafka 100 keys beside 1 key held back ({held_back:,} rows) / without": r(
            "kafka relay, 100 keys, 1 key held back", f"kafka relay, 100 keys, {small:,}"
        ),
        "kafka 100 keys, 16 KiB payloads: relay / raw producer": r(
            "kafka relay, 100 keys, 16 KiB", "kafka raw, 100 keys, 16 KiB"
        ),
        "kafka 100 keys: 3 relay processes / 1": r(
            "kafka, 100 keys, 3 relay processes", "kafka, 100 keys, 1 relay process"
        ),
        "rabbitmq 100 keys: relay / raw pika": r("rabbitmq relay, 100 keys", "rabbitmq raw pika, 100 keys"),
        "rabbitmq 100 keys, pipeline_keys: relay / raw pika": r(
            "rabbitmq relay, 100 keys, pipeline_keys", "rabbitmq raw pika, 100 keys"
        ),
    }
    if sqs is not None:
        ratios["sqs 100 keys: relay / raw boto3"] = r("sqs relay, 100 keys", "sqs raw boto3, 100 keys")
    return {
        "rates_msgs_per_s": {k: round(v) for k, v in rates.items()},
        "ratios": ratios,
        "small_backlog": small,
        "large_backlog": large,
        "held_back_rows": held_back,
        "runs": runs,
    }


TARGETS = {
    "kafka keyless: relay / fastest raw producer": (">=", 0.8),
    "kafka keyless, client librdkafka: relay / fastest raw producer": (">=", 0.8),
    "kafka 100 keys / keyless, client librdkafka": (">=", 0.8),
    "kafka 1 key / keyless, client librdkafka": (">=", 0.5),
    "kafka 100 keys / keyless": (">=", 0.8),
    "kafka 1 key / keyless": (">=", 0.5),
    "rabbitmq 100 keys: relay / raw pika": (">=", 0.8),
    "kafka 100 keys: 3 relay processes / 1": (">=", 1.0),
}


def _target(name: str) -> Target | None:
    # The backlog and held-back ratios carry their sizes in their names.
    if (name.startswith("kafka 100 keys, ") and "backlog" in name) or "held back" in name:
        return (">=", 0.9)
    return TARGETS.get(name)


def table(matrix: dict[str, Any]) -> str:
    lines = ratio_rows("workload (matrix)", matrix["ratios"], _target)
    lines += ["", "| drain (messages/s) | rate |", "|---|---|"]
    lines += [f"| {name} | {rate:,} |" for name, rate in matrix["rates_msgs_per_s"].items()]
    return "\n".join(lines)
