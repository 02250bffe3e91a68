"""(d) the relay draining a backlog to RabbitMQ, raw pika with a confirm window (the
ceiling), and the naive relay (one row, one publish, wait for its confirm, commit)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pika
import psycopg
from pika.adapters.asyncio_connection import AsyncioConnection
from psycopg import sql

from benchmarks.common import KEYS, Keys, drain, fill_backlog, messages_for_raw_clients, relay_config
from benchmarks.env import fresh_schema

SCHEMA = "bench_rabbit"
WINDOW = 1000


def _bound_queue(url: str) -> tuple[str, str]:
    """A fresh exchange with one durable queue bound to everything (so nothing is unroutable)."""
    exchange = f"bench-{uuid.uuid4().hex[:8]}"
    with pika.BlockingConnection(pika.URLParameters(url)) as conn:
        channel = conn.channel()
        channel.exchange_declare(exchange, exchange_type="topic", durable=True)
        channel.queue_declare(exchange + ".q", durable=True)
        channel.queue_bind(exchange + ".q", exchange, "#")
    return exchange, exchange + ".q"


def _delete(url: str, exchange: str, queue: str) -> None:
    with pika.BlockingConnection(pika.URLParameters(url)) as conn:
        channel = conn.channel()
        channel.queue_delete(queue)
        channel.exchange_delete(exchange)


async def relay_rate(
    dsn: str,
    url: str,
    count: int,
    *,
    keys: Keys = KEYS,
    pipeline_keys: bool = False,
    defaults: bool = False,
    relay: dict[str, Any] | None = None,
) -> float:
    """Messages/s draining a backlog of `count`: batches of 1000 (the confirm window), or
    with `defaults` the relay's and the adapter's default settings; `relay`: settings of
    the relay over the defaults (the adapter's stay)."""
    exchange, queue = _bound_queue(url)
    if relay is not None:
        defaults = True
    tuned: dict[str, Any] = dict(relay or {}) if defaults else {"batch_size": 1000, "workers": 2}
    try:
        fresh_schema(dsn, SCHEMA)
        fill_backlog(dsn, SCHEMA, "bench.rabbit", count, keys=keys)
        config = relay_config(
            dsn,
            SCHEMA,
            {
                "mq": {
                    "type": "rabbitmq",
                    "url": url,
                    "exchange": exchange,
                    "pipeline_keys": pipeline_keys,
                    **({} if defaults else {"confirm_window": WINDOW}),
                }
            },
            [{"topic": "*", "broker": "mq"}],
            notify=False,
            **tuned,
        )
        return count / await drain(config, count)
    finally:
        _delete(url, exchange, queue)


async def raw_rate(url: str, count: int, *, keys: Keys = KEYS) -> float:
    """pika on asyncio with publisher confirms and a window of WINDOW outstanding messages."""
    exchange, queue = _bound_queue(url)
    loop = asyncio.get_running_loop()
    opened: asyncio.Future[AsyncioConnection] = loop.create_future()
    conn = AsyncioConnection(pika.URLParameters(url), on_open_callback=opened.set_result, custom_ioloop=loop)
    await opened
    channel_ready: asyncio.Future[object] = loop.create_future()
    conn.channel(on_open_callback=channel_ready.set_result)
    channel = await channel_ready
    window = asyncio.Semaphore(WINDOW)
    confirmed = 0
    done = loop.create_future()
    outstanding: list[int] = []

    def on_confirm(frame: object) -> None:
        nonlocal confirmed
        method = frame.method  # type: ignore[attr-defined]
        settled = [t for t in outstanding if t <= method.delivery_tag] if method.multiple else [method.delivery_tag]
        for tag in settled:
            outstanding.remove(tag)
            window.release()
        confirmed += len(settled)
        if confirmed >= count and not done.done():
            done.set_result(None)

    ready: asyncio.Future[object] = loop.create_future()
    channel.confirm_delivery(on_confirm, callback=ready.set_result)  # type: ignore[attr-defined]
    await ready
    try:
        records = messages_for_raw_clients(count, keys=keys)
        started = time.perf_counter()
        for tag, (key, value) in enumerate(records, start=1):
            await window.acquire()
            outstanding.append(tag)
            props = pika.BasicProperties(
                message_id=str(uuid.uuid4()),
                content_type="application/octet-stream",
                delivery_mode=2,
                timestamp=int(time.time()),
                headers={"key": key.decode()} if key else {},
            )
            channel.basic_publish(exchange, "bench.rabbit", value, props, mandatory=True)  # type: ignore[attr-defined]
        await done
        return count / (time.perf_counter() - started)
    finally:
        conn.close()
        _delete(url, exchange, queue)


def naive_rate(dsn: str, url: str, count: int) -> float:
    """Claim one row, publish it, block until its confirm, mark it, commit, repeat."""
    exchange, queue = _bound_queue(url)
    fresh_schema(dsn, SCHEMA)
    fill_backlog(dsn, SCHEMA, "bench.rabbit", count)
    claim = sql.SQL(
        "SELECT id, message_id, payload FROM {}.messages WHERE dispatched_at IS NULL "
        "ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED"
    ).format(sql.Identifier(SCHEMA))
    mark = sql.SQL("UPDATE {}.messages SET dispatched_at = now() WHERE id = %s").format(sql.Identifier(SCHEMA))
    try:
        with pika.BlockingConnection(pika.URLParameters(url)) as mq, psycopg.connect(dsn) as conn:
            channel = mq.channel()
            channel.confirm_delivery()  # basic_publish now blocks until the broker confirms
            started = time.perf_counter()
            for _ in range(count):
                row = conn.execute(claim).fetchone()
                assert row is not None
                channel.basic_publish(
                    exchange,
                    "bench.rabbit",
                    bytes(row[2]),
                    pika.BasicProperties(message_id=str(row[1]), delivery_mode=2),
                    mandatory=True,
                )
                conn.execute(mark, (row[0],))
                conn.commit()
            return count / (time.perf_counter() - started)
    finally:
        _delete(url, exchange, queue)
