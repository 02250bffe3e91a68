"""A/B comparisons of one setting of the relay, on and off, in one run.

`python -m benchmarks.ab NAME [RUNS]`: the relay drains 100,000 messages (keyless, then
100 keys) with the setting on and off, alternated RUNS times (3 by default) so that the
machine's drift hits both alike; the median of each by msg/s and CPU per message
(benchmarks/cpu.py). The measurements behind decisions of issue 21, kept so they can be
repeated on another machine:

- `gc`: the garbage collector's thresholds of `outbox-relay run` (outbox_relay/process.py)
  against CPython's defaults, each client;
- `librdkafka-producers`: one librdkafka producer per broker (the adapter) against one
  per concurrent call (several rounds in flight, each on its own connections);
- `librdkafka-in-flight`: librdkafka with up to 5 requests in flight per connection
  (its idempotent producer keeps a partition's order across them) against 1 (the
  adapter's setting), so that the workers' concurrent rounds go out together;
- `more-in-flight`: the defaults (4 workers of 1,000 messages per batch) against those
  before them (2 of 500), each Kafka client and RabbitMQ (its defaults; msg/s only);
- `receipts` (issue 22): delivery receipts kept by the mark (relay.receipts, the
  default) against none, each Kafka client;
- `wal-receipts` (issue 22): the WAL source keeping its receipts (relay.wal.receipts,
  one INSERT per dispatched batch) against none, a 100,000-message backlog drained to
  Kafka (aiokafka) by the WAL source (benchmarks/wal_drain.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import structlog

from benchmarks import env, kafka_bench, rabbit_bench, wal_drain
from benchmarks.cpu import PgCpu, Window
from outbox_relay.models import OutgoingMessage, PublishResult
from outbox_relay.process import GC_THRESHOLDS, tune_gc

MESSAGES = 100_000
# A setting on or off, for the span of one drain; what it yields goes to relay_rate.
Toggle = Callable[[bool], contextlib.AbstractContextManager[dict[str, Any]]]


@contextlib.contextmanager
def collector(on: bool) -> Iterator[dict[str, Any]]:
    defaults = gc.get_threshold()
    if on:
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
    try:
        yield {}
    finally:
        gc.unfreeze()
        gc.set_threshold(*defaults)


class _ProducerPerCall:
    """librdkafka adapters, one per concurrent call: each call goes to an idle one."""

    keeps_key_order = True
    exactly_once = False

    def __init__(self, adapters: Sequence[Any]) -> None:
        self._adapters = list(adapters)
        self._busy = [0] * len(self._adapters)

    async def connect(self) -> None:
        await asyncio.gather(*(a.connect() for a in self._adapters))

    async def close(self) -> None:
        await asyncio.gather(*(a.close() for a in self._adapters))

    async def ready(self) -> bool:
        return all(await asyncio.gather(*(a.ready() for a in self._adapters)))

    async def publish(self, batch: Sequence[OutgoingMessage]) -> Sequence[PublishResult]:
        index = min(range(len(self._adapters)), key=self._busy.__getitem__)
        self._busy[index] += 1
        try:
            return await self._adapters[index].publish(batch)
        finally:
            self._busy[index] -= 1


@contextlib.contextmanager
def librdkafka_producers(on: bool) -> Iterator[dict[str, Any]]:
    from outbox_relay_adapters import kafka
    from outbox_relay_adapters.kafka_librdkafka import LibrdkafkaAdapter

    real = kafka.create

    def create(name: str, options: Any) -> Any:
        adapter = real(name, options)
        return _ProducerPerCall([LibrdkafkaAdapter(name, adapter.options) for _ in range(2)]) if on else adapter

    kafka.create = create  # the entry point resolves it when a relay starts
    try:
        yield {}
    finally:
        kafka.create = real


@contextlib.contextmanager
def librdkafka_in_flight(on: bool) -> Iterator[dict[str, Any]]:
    from outbox_relay_adapters import kafka_librdkafka

    real = kafka_librdkafka.producer_config

    def config(options: Any) -> dict[str, Any]:
        return {**real(options), "max.in.flight.requests.per.connection": 5 if on else 1}

    kafka_librdkafka.producer_config = config  # looked up when the adapter connects
    try:
        yield {}
    finally:
        kafka_librdkafka.producer_config = real


@contextlib.contextmanager
def more_in_flight(on: bool) -> Iterator[dict[str, Any]]:
    yield {} if on else {"workers": 2, "batch_size": 500}


@contextlib.contextmanager
def receipts(on: bool) -> Iterator[dict[str, Any]]:
    yield {} if on else {"receipts": False}


@contextlib.contextmanager
def wal_receipts(on: bool) -> Iterator[dict[str, Any]]:
    yield {"wal": {"receipts": on}}


EXPERIMENTS: dict[str, tuple[Toggle, tuple[str, ...]]] = {
    "gc": (collector, ("aiokafka", "librdkafka")),
    "librdkafka-producers": (librdkafka_producers, ("librdkafka",)),
    "librdkafka-in-flight": (librdkafka_in_flight, ("librdkafka",)),
    "more-in-flight": (more_in_flight, ("aiokafka", "librdkafka", "rabbitmq")),
    "receipts": (receipts, ("aiokafka", "librdkafka")),
    "wal-receipts": (wal_receipts, ("wal",)),
}


async def compare(svc: env.Services, toggle: Toggle, client: str, keys: int | None, runs: int) -> None:
    pg = PgCpu(svc.dsn)
    results: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
    for _ in range(runs):
        for on in (True, False):
            if client == "rabbitmq":  # the relay's defaults, the adapter's too; no CPU meter
                with toggle(on) as settings:
                    rate = await rabbit_bench.relay_rate(svc.dsn, svc.amqp, MESSAGES, keys=keys, relay=settings)
                results[on].append(
                    {
                        "msgs_per_s": round(rate),
                        "process_cpu_us": "-",
                        "pg_cpu_us": "-",
                        "broker_cpu_us": "-",
                        "cores_in_use": "-",
                    }
                )
                continue
            if client == "wal":  # the WAL source's drain; its own CPU meter
                with toggle(on) as settings:
                    drained = await wal_drain.drain(
                        svc.dsn, svc.kafka, MESSAGES, source="wal", keys=keys, relay=settings
                    )
                results[on].append(
                    {
                        "msgs_per_s": round(drained["rate"]),
                        "process_cpu_us": drained["relay_cpu_us"],
                        "pg_cpu_us": drained["pg_cpu_us"],
                        "broker_cpu_us": "-",
                        "cores_in_use": "-",
                    }
                )
                continue
            meter = Window(pg, svc.kafka_pid)
            with toggle(on) as settings:
                await kafka_bench.relay_rate(
                    svc.dsn, svc.kafka, MESSAGES, keys=keys, client=client, meter=meter, **settings
                )
            results[on].append(meter.per_message(MESSAGES))
    for on in (True, False):
        middle = sorted(results[on], key=lambda r: r["msgs_per_s"])[len(results[on]) // 2]
        each = ", ".join(f"{r['msgs_per_s']:,}" for r in results[on])
        print(
            f"{client:10} {'keyless' if keys is None else f'{keys} keys':8} {'on ' if on else 'off'}: "
            f"{middle['msgs_per_s']:>7,} msg/s, relay {middle['process_cpu_us']} µs/msg, "
            f"PostgreSQL {middle['pg_cpu_us']} µs/msg, broker {middle['broker_cpu_us']} µs/msg, "
            f"cores {middle['cores_in_use']} (msg/s of each run: {each})",
            flush=True,
        )


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in EXPERIMENTS:
        sys.exit(f"usage: python -m benchmarks.ab {{{'|'.join(EXPERIMENTS)}}} [RUNS]")
    toggle, clients = EXPERIMENTS[sys.argv[1]]
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if sys.argv[1] != "gc":
        tune_gc()  # as `outbox-relay run` does
    print(f"{sys.argv[1]}: median of {runs} runs by msg/s, {MESSAGES:,} messages; {env.machine()}")
    with env.provisioned() as svc:
        for client in clients:
            for keys in (None, 100):
                asyncio.run(compare(svc, toggle, client, keys, runs))


if __name__ == "__main__":
    main()
