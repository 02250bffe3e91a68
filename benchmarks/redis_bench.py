"""Redis Streams: the relay draining a backlog (100 keys by default) against redis-py itself, each
call one pipeline of XADDs answered by the server (the same acknowledgement: the
server's answer, with its AOF fsync policy; scripts/services/redis.sh: appendfsync always)."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

import redis.asyncio as aioredis

from benchmarks.common import Keys, drain, fill_backlog, messages_for_raw_clients, relay_config
from benchmarks.env import fresh_schema

SCHEMA = "bench_redis"
KEYS_100 = 100
BATCH = 1000


async def _drop(url: str, stream: str) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        await client.delete(stream)
    finally:
        await client.aclose()


async def relay_rate(dsn: str, url: str, count: int, *, keys: Keys = KEYS_100) -> float:
    """Messages/s draining a backlog of `count` over `keys` keys, batches of 1000."""
    stream = f"bench-{uuid.uuid4().hex[:8]}"
    try:
        fresh_schema(dsn, SCHEMA)
        fill_backlog(dsn, SCHEMA, "bench.redis", count, keys=keys)
        config = relay_config(
            dsn,
            SCHEMA,
            {"r": {"type": "redis", "url": url}},
            [{"topic": "*", "broker": "r", "destination": stream}],
            notify=False,
            batch_size=BATCH,
            workers=2,
        )
        return count / await drain(config, count)
    finally:
        await _drop(url, stream)


async def raw_rate(url: str, count: int, *, keys: Keys = KEYS_100) -> float:
    """redis-py asyncio: pipelines of BATCH XADDs (the relay's fields), one at a time."""
    stream = f"bench-{uuid.uuid4().hex[:8]}"
    client = aioredis.Redis.from_url(url)
    records = messages_for_raw_clients(count, keys=keys)
    try:
        started = time.perf_counter()
        for at in range(0, count, BATCH):
            pipe = client.pipeline(transaction=False)
            for key, value in records[at : at + BATCH]:
                # The relay's entry (adapters/redis_streams.py entry_fields): the same fields
                # in the same order, "key" only when the message has one.
                fields: dict[str | bytes, str | bytes] = {"message_id": str(uuid.uuid4()), "topic": "bench.redis"}
                if key is not None:
                    fields["key"] = key
                fields["content_type"] = "application/octet-stream"
                fields["created_at"] = datetime.now(UTC).isoformat()
                fields["headers"] = "{}"
                fields["payload"] = value
                pipe.xadd(stream, fields)
            await pipe.execute()
        return count / (time.perf_counter() - started)
    finally:
        await client.delete(stream)
        await client.aclose()
