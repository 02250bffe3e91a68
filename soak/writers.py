"""The soak's writers: the fault suite's Writers (tests/faults/harness.py: reconnect
after a restart, every 7th transaction rolled back, commits of unknown outcome set
apart) over every key shape at a steady rate, some payloads large."""

from __future__ import annotations

import random
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from typing import Any

import psycopg

from outbox_relay import enqueue
from tests.faults.harness import Writers

# Each message's key shape, and how often it is drawn: one hot key every writer
# contends for, a hundred aggregates, a key used once, no key at all.
SHAPES = {"hot": 0.10, "aggregate": 0.40, "unique": 0.35, "keyless": 0.15}
AGGREGATES = 100
LARGE_BYTES = 200_000  # a large payload: a claim, a Kafka request and the relay's memory feel it
LARGE_ONE_IN = 100
SMALL_BYTES = 100
MESSAGES_PER_TRANSACTION = (1, 3)


class MixedWriters(Writers):
    """`count` threads committing about `rate` messages a second in all, in transactions
    of 1-3 messages of mixed key shapes (SHAPES). The hot key and the aggregates are
    numbered by their counter rows (Writers._numbered: their writers serialized, the
    numbers in commit order); a unique key's message is its only one and a keyless
    message carries no order, so both have n = 0."""

    def __init__(
        self, dsn: str, topic: str, *, rate: float, count: int = 4, seed: int = 0, rabbitmq_topic: str | None = None
    ):
        super().__init__(dsn, topic, count=count, seed=seed)
        self.rabbitmq_topic = rabbitmq_topic
        mean = sum(MESSAGES_PER_TRANSACTION) / 2
        self._interval = count * mean / rate  # seconds between one thread's transactions
        self._clock = threading.local()
        self._sequenced = frozenset(self.sequenced_keys())

    def sequenced_keys(self) -> list[str]:
        return ["hot", *(aggregate(i) for i in range(AGGREGATES))]

    def _pace(self) -> None:
        now = time.monotonic()
        due = getattr(self._clock, "due", now) + self._interval
        if due < now - 1:
            due = now  # back from an outage: the steady rate again, no burst to catch up
        self._clock.due = due
        time.sleep(max(0.0, due - now))

    def _write(
        self, conn: psycopg.Connection[Any], writer: int, rng: random.Random, sequence: Iterator[int]
    ) -> list[tuple[str, tuple[str, int]]]:
        shapes = rng.choices(list(SHAPES), list(SHAPES.values()), k=rng.randint(*MESSAGES_PER_TRANSACTION))
        keys: list[str | None] = [key_of(shape, rng) for shape in shapes]
        # Counter rows locked in one order by every writer: no deadlock.
        keys.sort(key=lambda k: (k is None, k or ""))
        written = []
        for key in keys:
            n = self._numbered(conn, key) if key in self._sequenced else 0
            pad = LARGE_BYTES if rng.randrange(LARGE_ONE_IN) == 0 else SMALL_BYTES
            body = {"key": key, "n": n, "pad": "x" * pad}
            mid = str(enqueue(conn, self.topic_of(key, rng), body, key=key))
            written.append((mid, (key or "", n)))
        return written

    def topic_of(self, key: str | None, rng: random.Random) -> str:
        """With `rabbitmq_topic`, a quarter of the keys (each key always the same way: its
        order is one broker's) and of the keyless messages go to RabbitMQ."""
        if self.rabbitmq_topic is None:
            return self.topic
        quarter = rng.randrange(4) == 0 if key is None else zlib.crc32(key.encode()) % 4 == 0
        return self.rabbitmq_topic if quarter else self.topic


def aggregate(i: int) -> str:
    return f"agg-{i:03d}"


def key_of(shape: str, rng: random.Random) -> str | None:
    if shape == "hot":
        return "hot"
    if shape == "aggregate":
        return aggregate(rng.randrange(AGGREGATES))
    if shape == "unique":
        return f"u-{uuid.UUID(int=rng.getrandbits(128)).hex}"
    return None
