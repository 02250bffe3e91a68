"""(a) the relay draining a backlog to Kafka, (b) the raw aiokafka ceiling, (c) the naive relay."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import psycopg
from aiokafka import AIOKafkaProducer
from outbox_relay_adapters.kafka import KafkaOptions, producer_settings
from psycopg import sql

from benchmarks.common import KEYS, PAYLOAD_BYTES, Keys, drain, fill_backlog, messages_for_raw_clients, relay_config
from benchmarks.cpu import Window
from benchmarks.env import fresh_schema
from outbox_relay.config import RelayConfig
from tests.consumers import kafka_create_topic

SCHEMA = "bench_kafka"
DEFAULTS = RelayConfig()  # what a relay.yaml without a relay block runs


def options(bootstrap: str) -> dict[str, object]:
    return {"bootstrap_servers": bootstrap}


async def relay_rate(
    dsn: str,
    bootstrap: str,
    count: int,
    *,
    batch_size: int = DEFAULTS.batch_size,
    workers: int = DEFAULTS.workers,
    keys: Keys = KEYS,
    payload_bytes: int = PAYLOAD_BYTES,
    held_back: int = 0,
    client: str = "aiokafka",
    meter: Window | None = None,
    receipts: bool = DEFAULTS.receipts,
) -> float:
    """Messages/s draining a backlog of `count`. `held_back` more rows wait behind one
    key's head that is not due (a failing message): they must not slow the others."""
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    await kafka_create_topic(bootstrap, topic, partitions=3)
    fresh_schema(dsn, SCHEMA)
    if held_back:
        fill_backlog(dsn, SCHEMA, "bench.kafka", 1, keys="held", next_attempt="1 day")
        fill_backlog(dsn, SCHEMA, "bench.kafka", held_back, keys="held")
    fill_backlog(dsn, SCHEMA, "bench.kafka", count, keys=keys, payload_bytes=payload_bytes)
    config = relay_config(
        dsn,
        SCHEMA,
        {"kafka": {"type": "kafka", "client": client, **options(bootstrap)}},
        [{"topic": "*", "broker": "kafka", "destination": topic}],
        batch_size=batch_size,
        workers=workers,
        notify=False,
        receipts=receipts,
    )
    return count / await drain(config, count, meter)


async def raw_rate(
    bootstrap: str,
    count: int,
    *,
    keys: Keys = KEYS,
    payload_bytes: int = PAYLOAD_BYTES,
    meter: Window | None = None,
) -> float:
    """The ceiling: the same records and producer settings, no database. `meter` (CPU
    per message) is open from the first send to the last ack."""
    topic = f"bench-raw-{uuid.uuid4().hex[:8]}"
    await kafka_create_topic(bootstrap, topic, partitions=3)
    producer = AIOKafkaProducer(**producer_settings(KafkaOptions.model_validate(options(bootstrap))))
    await producer.start()
    try:
        records = messages_for_raw_clients(count, keys=keys, payload_bytes=payload_bytes)
        if meter is not None:
            meter.start()
        started = time.perf_counter()
        futures = []
        for key, value in records:
            headers = [("message-id", uuid.uuid4().bytes), ("content-type", b"application/octet-stream")]
            futures.append(await producer.send(topic, value=value, key=key, headers=headers))
        await asyncio.gather(*futures)
        elapsed = time.perf_counter() - started
        if meter is not None:
            meter.stop()
        return count / elapsed
    finally:
        await producer.stop()


async def raw_rate_librdkafka(
    bootstrap: str,
    count: int,
    *,
    keys: Keys = KEYS,
    payload_bytes: int = PAYLOAD_BYTES,
    meter: Window | None = None,
) -> float:
    """The same records through confluent-kafka (librdkafka, C) with the same guarantees
    (idempotent, acks=all): the fastest raw Python producer on this machine, when it is."""
    from confluent_kafka import Producer  # optional: only the benchmark needs it

    topic = f"bench-rdk-{uuid.uuid4().hex[:8]}"
    await kafka_create_topic(bootstrap, topic, partitions=3)
    return await asyncio.to_thread(
        _librdkafka_send_all,
        Producer,
        bootstrap,
        topic,
        messages_for_raw_clients(count, keys=keys, payload_bytes=payload_bytes),
        meter,
    )


def _librdkafka_send_all(
    producer_class: Any,
    bootstrap: str,
    topic: str,
    records: list[tuple[bytes | None, bytes]],
    meter: Window | None = None,
) -> float:
    producer = producer_class(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "queue.buffering.max.messages": 1_000_000,
        }
    )
    producer.list_topics(topic, timeout=10)  # connected and metadata fetched, as the aiokafka ceiling is
    failed: list[object] = []

    def delivered(err: object, _msg: object) -> None:
        if err is not None:
            failed.append(err)

    if meter is not None:
        meter.start()
    started = time.perf_counter()
    for key, value in records:
        headers = [("message-id", uuid.uuid4().bytes), ("content-type", b"application/octet-stream")]
        while True:
            try:
                producer.produce(topic, value=value, key=key, headers=headers, on_delivery=delivered)
                break
            except BufferError:
                producer.poll(0.01)
        producer.poll(0)
    producer.flush(60)
    elapsed = time.perf_counter() - started
    if meter is not None:
        meter.stop()
    if failed:
        raise RuntimeError(f"{len(failed)} librdkafka deliveries failed: {failed[0]}")
    return len(records) / elapsed


async def naive_rate(dsn: str, bootstrap: str, count: int) -> float:
    """What people hand-write: claim one row, send_and_wait, mark it, commit, repeat."""
    topic = f"bench-naive-{uuid.uuid4().hex[:8]}"
    await kafka_create_topic(bootstrap, topic, partitions=3)
    fresh_schema(dsn, SCHEMA)
    fill_backlog(dsn, SCHEMA, "bench.kafka", count)
    producer = AIOKafkaProducer(**producer_settings(KafkaOptions.model_validate(options(bootstrap))))
    await producer.start()
    claim = sql.SQL(
        "SELECT id, message_id, key, payload FROM {}.messages WHERE dispatched_at IS NULL "
        "ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED"
    ).format(sql.Identifier(SCHEMA))
    mark = sql.SQL("UPDATE {}.messages SET dispatched_at = now() WHERE id = %s").format(sql.Identifier(SCHEMA))
    try:
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            started = time.perf_counter()
            for _ in range(count):
                cur = await conn.execute(claim)
                row = await cur.fetchone()
                assert row is not None
                await producer.send_and_wait(
                    topic, value=bytes(row[3]), key=row[2].encode(), headers=[("message-id", str(row[1]).encode())]
                )
                await conn.execute(mark, (row[0],))
                await conn.commit()
            return count / (time.perf_counter() - started)
    finally:
        await producer.stop()
