"""SQS (ElasticMQ): the relay draining a backlog (100 keys by default) into a FIFO queue, and raw
boto3 sending the same records with the same acknowledgement (SendMessageBatch of 10,
each entry's answer awaited) from the same number of threads: the ceiling.

The raw client sends every batch at once, in no order; the relay keeps each key's order
(one message of a key per round, adapters/sqs.py), which is what it pays for."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import boto3
from botocore.config import Config as BotoConfig

from adapters.sqs_entries import group_id
from benchmarks.common import Keys, drain, fill_backlog, messages_for_raw_clients, relay_config
from benchmarks.env import fresh_schema
from tests.services import SqsServer

SCHEMA = "bench_sqs"
THREADS = 16  # the adapter's default max_concurrency


def _queue(server: SqsServer) -> tuple[Any, str, str]:
    # As many pooled connections as threads, as the adapter has (max_pool_connections =
    # max_concurrency): botocore's default of 10 would make 16 threads open and discard
    # connections ("Connection pool is full") and slow the raw client down.
    client = boto3.session.Session().client(
        "sqs",
        endpoint_url=server.endpoint_url,
        region_name=server.region,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        config=BotoConfig(max_pool_connections=THREADS),
    )
    name = f"bench-{uuid.uuid4().hex[:8]}.fifo"
    url = client.create_queue(QueueName=name, Attributes={"FifoQueue": "true"})["QueueUrl"]
    return client, name, url


async def relay_rate(dsn: str, server: SqsServer, count: int, *, keys: Keys = 100) -> float:
    """Messages/s draining a backlog of `count` with the adapter's defaults, batches of 1000."""
    for name, value in server.env.items():
        os.environ.setdefault(name, value)  # boto3's chain: the relay's identity
    client, name, url = _queue(server)
    try:
        fresh_schema(dsn, SCHEMA)
        fill_backlog(dsn, SCHEMA, "bench.sqs", count, keys=keys)
        config = relay_config(
            dsn,
            SCHEMA,
            {"sqs": {"type": "sqs", "endpoint_url": server.endpoint_url}},
            [{"topic": "*", "broker": "sqs", "destination": name}],
            notify=False,
            batch_size=1000,
            workers=2,
        )
        return count / await drain(config, count)
    finally:
        client.delete_queue(QueueUrl=url)


async def raw_rate(server: SqsServer, count: int, *, keys: Keys = 100) -> float:
    """boto3, SendMessageBatch of 10 with every answer checked, THREADS requests at once."""
    client, _, url = _queue(server)
    records = messages_for_raw_clients(count, keys=keys)
    batches = [records[i : i + 10] for i in range(0, len(records), 10)]

    def send(batch: list[tuple[bytes | None, bytes]]) -> None:
        entries = []
        for i, (key, value) in enumerate(batch):
            message_id = str(uuid.uuid4())
            # The relay's entry (adapters/sqs_entries.py entry_for): the message-id and
            # content-type attributes; the key as MessageGroupId, a keyless message's group
            # its own message id (as the adapter does: keyless messages share no group).
            entries.append(
                {
                    "Id": str(i),
                    "MessageBody": value.decode(),
                    "MessageAttributes": {
                        "message-id": {"DataType": "String", "StringValue": message_id},
                        "content-type": {"DataType": "String", "StringValue": "application/octet-stream"},
                    },
                    "MessageGroupId": group_id(key.decode()) if key is not None else message_id,
                    "MessageDeduplicationId": message_id,
                }
            )
        answer = client.send_message_batch(QueueUrl=url, Entries=entries)
        if answer.get("Failed"):
            raise RuntimeError(f"raw SQS send failed: {answer['Failed'][:1]}")

    loop = asyncio.get_running_loop()
    try:
        with ThreadPoolExecutor(THREADS) as pool:
            started = time.perf_counter()
            await asyncio.gather(*(loop.run_in_executor(pool, send, batch) for batch in batches))
            return count / (time.perf_counter() - started)
    finally:
        client.delete_queue(QueueUrl=url)
