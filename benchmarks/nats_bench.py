"""The relay draining a backlog (100 keys by default) to NATS JetStream, and raw nats-py with the same
acknowledgement (every message's PubAck awaited, ``Nats-Msg-Id`` set, ``publish_async``
with a window of WINDOW PubAcks outstanding): the ceiling. The raw client publishes
without regard to keys (it never waits for a key's previous PubAck), as raw Kafka and
pika do in the other rows; the relay, whose NATS adapter does not keep key order, sends a
key's next message once the previous one is acked."""

from __future__ import annotations

import asyncio
import time
import uuid

import nats
from nats.js.api import StreamConfig

from benchmarks.common import Keys, drain, fill_backlog, messages_for_raw_clients, relay_config
from benchmarks.env import fresh_schema

SCHEMA = "bench_nats"
KEYS_100 = 100
WINDOW = 1000


async def _stream(url: str) -> tuple[str, str]:
    """A fresh file-backed stream (name, subject)."""
    name = f"bench-{uuid.uuid4().hex[:8]}"
    nc = await nats.connect(url, allow_reconnect=False)
    try:
        await nc.jetstream().add_stream(StreamConfig(name=name, subjects=[f"{name}.>"]))
    finally:
        await nc.close()
    return name, f"{name}.bench"


async def _delete(url: str, name: str) -> None:
    nc = await nats.connect(url, allow_reconnect=False)
    try:
        await nc.jetstream().delete_stream(name)
    finally:
        await nc.close()


async def relay_rate(dsn: str, url: str, count: int, *, keys: Keys = KEYS_100, key_rounds: bool = False) -> float:
    """Messages/s draining a backlog of `count` over `keys` keys (batches of 1000, 2 workers);
    `key_rounds`: the adapter's option (a key's run in one call, in rounds)."""
    name, subject = await _stream(url)
    try:
        fresh_schema(dsn, SCHEMA)
        fill_backlog(dsn, SCHEMA, "bench.nats", count, keys=keys)
        config = relay_config(
            dsn,
            SCHEMA,
            {"js": {"type": "nats", "servers": [url], "subject": subject, "stream": name, "key_rounds": key_rounds}},
            [{"topic": "*", "broker": "js"}],
            notify=False,
            batch_size=1000,
            workers=2,
        )
        return count / await drain(config, count)
    finally:
        await _delete(url, name)


async def raw_rate(url: str, count: int, *, keys: Keys = KEYS_100) -> float:
    """nats-py publish_async with WINDOW PubAcks outstanding, each one awaited."""
    name, subject = await _stream(url)
    nc = await nats.connect(url, allow_reconnect=False)
    try:
        js = nc.jetstream(publish_async_max_pending=WINDOW)
        records = messages_for_raw_clients(count, keys=keys)
        started = time.perf_counter()
        futures = []
        for key, value in records:
            # The relay's headers (adapters/nats.py): Outbox-Key only when the message has a key.
            headers = {"Nats-Msg-Id": str(uuid.uuid4()), "Content-Type": "application/octet-stream"}
            if key is not None:
                headers["Outbox-Key"] = key.decode()
            headers["Nats-Expected-Stream"] = name
            futures.append(await js.publish_async(subject, value, headers=headers))
        acks = await asyncio.gather(*futures)
        elapsed = time.perf_counter() - started
        assert len(acks) == count and all(ack.stream == name for ack in acks)
        return count / elapsed
    finally:
        await nc.close()
        await _delete(url, name)
