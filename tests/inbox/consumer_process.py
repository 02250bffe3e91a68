"""A consumer as docs/how-to/inbox.md shows it, run as its own process by the end-to-end tests
(which SIGKILL it): it reads a Kafka topic (aiokafka, asyncio) or a RabbitMQ queue
(pika, blocking) and credits `accounts` through the inbox, one message per
transaction, acknowledging to the broker only after the commit.

    python -m tests.inbox.consumer_process kafka DSN BOOTSTRAP TOPIC PARTITIONS [--until-end]
    python -m tests.inbox.consumer_process rabbitmq DSN URL QUEUE [--until-idle]

Stdout gets one line per step, written unbuffered so that the test reads, after a
SIGKILL, what the process was doing when it died:
    handling <id>                 the effect is done, its transaction not yet committed
    processed <id>                committed: the first time for this message
    duplicate <id>                committed: seen before, no effect
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from typing import Any

import psycopg

from outbox_relay.inbox import first_time_async, message_id_of, process_once
from tests.inbox.helpers import CREDIT, credit

# Work inside the handler, with the transaction open: the moments a SIGKILL lands in.
WORK_S = 0.02
COMMIT_EVERY = 10  # Kafka offsets: commit after this many records (a crash re-reads them)


def say(line: str) -> None:
    os.write(1, (line + "\n").encode())


async def kafka(args: argparse.Namespace) -> None:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    conn = await psycopg.AsyncConnection.connect(args.dsn)
    # Manual assignment, every partition: several of these processes read the same
    # partitions at once (zombie consumers, the worst case), and a restart takes over
    # at once instead of waiting out a dead member's session in a rebalance.
    consumer = AIOKafkaConsumer(
        bootstrap_servers=args.target, group_id="billing", enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    partitions = [TopicPartition(args.source, p) for p in range(args.partitions)]
    consumer.assign(partitions)
    end = await consumer.end_offsets(partitions) if args.until_end else None
    done: dict[Any, int] = {}
    since_commit = 0
    say("ready")
    try:
        while True:
            batches = await consumer.getmany(timeout_ms=200, max_records=20)
            for tp, records in batches.items():
                for record in records:
                    mid = message_id_of(record)
                    async with conn.transaction():
                        first = await first_time_async(conn, mid)
                        if first:
                            body = json.loads(record.value)
                            await conn.execute(CREDIT, (body["account"], body["amount"]))
                            say(f"handling {mid}")
                            await asyncio.sleep(WORK_S)
                    say(f"{'processed' if first else 'duplicate'} {mid}")
                    # The offset of what is committed in the database, never the fetch
                    # position: getmany has already moved that past records not yet handled.
                    done[tp] = record.offset + 1
                    since_commit += 1
            if done and (since_commit >= COMMIT_EVERY or not batches):
                await consumer.commit(dict(done))
                since_commit = 0
            if end is not None and await caught_up(consumer, partitions, done, end):
                if done:
                    await consumer.commit(dict(done))
                say("caught-up")
                return
    finally:
        await consumer.stop()
        await conn.close()


async def caught_up(consumer: Any, partitions: list[Any], done: dict[Any, int], end: dict[Any, int]) -> bool:
    for tp in partitions:
        position = done[tp] if tp in done else await consumer.position(tp)
        if position < end[tp]:
            return False
    return True


def rabbitmq(args: argparse.Namespace) -> None:
    import pika

    conn = psycopg.connect(args.dsn)
    connection = pika.BlockingConnection(pika.URLParameters(args.target))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=10)
    say("ready")

    def effect(body: bytes, mid: object) -> Any:
        def run(c: psycopg.Connection[Any]) -> None:
            credit(c, body)
            say(f"handling {mid}")
            time.sleep(WORK_S)

        return run

    for method, properties, body in channel.consume(args.source, inactivity_timeout=1.0 if args.until_idle else None):
        if method is None:  # idle for a second: everything delivered is handled and acked
            say("idle")
            break
        mid = message_id_of(properties)
        first = process_once(conn, mid, effect(body, mid))
        say(f"{'processed' if first else 'duplicate'} {mid}")
        channel.basic_ack(method.delivery_tag)  # after the commit, never before
    channel.cancel()
    connection.close()
    conn.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("broker", choices=["kafka", "rabbitmq"])
    parser.add_argument("dsn")
    parser.add_argument("target", help="Kafka bootstrap servers or AMQP URL")
    parser.add_argument("source", help="topic or queue")
    parser.add_argument("partitions", type=int, nargs="?", default=0)
    parser.add_argument("--until-end", action="store_true", help="Kafka: exit once every partition is read")
    parser.add_argument("--until-idle", action="store_true", help="RabbitMQ: exit after a second without messages")
    args = parser.parse_args()
    if args.broker == "kafka":
        asyncio.run(kafka(args))
    else:
        rabbitmq(args)


if __name__ == "__main__":
    main()
