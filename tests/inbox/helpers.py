"""What the inbox tests share: the accounts a consumer credits, the credits a producer
enqueues, consumer processes to SIGKILL, and the duplicate copies a test publishes.

The end-to-end tests run the whole chain: producer (enqueue) -> relay (the real
`outbox-relay run`) -> broker -> consumer processes (tests/inbox/consumer_process.py)
that credit `accounts` through the inbox, in the consumer's own database.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import pika
import psycopg
from aiokafka import AIOKafkaProducer

from outbox_relay import enqueue
from tests.support.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]
TOPIC = "credits.posted"

# The business effect of every test: one row per account, credited by each message.
CREATE_ACCOUNTS = "CREATE TABLE accounts (id integer PRIMARY KEY, balance bigint NOT NULL)"
CREDIT = (
    "INSERT INTO accounts AS a (id, balance) VALUES (%s, %s) "
    "ON CONFLICT (id) DO UPDATE SET balance = a.balance + EXCLUDED.balance"
)


def create_accounts(conn: psycopg.Connection[Any]) -> None:
    conn.execute(CREATE_ACCOUNTS)


def credit(conn: psycopg.Connection[Any], body: bytes) -> None:
    message = json.loads(body)
    conn.execute(CREDIT, (message["account"], message["amount"]))


def balances(dsn: str) -> dict[int, int]:
    with psycopg.connect(dsn) as conn:
        return {int(r[0]): int(r[1]) for r in conn.execute("SELECT id, balance FROM accounts").fetchall()}


def processed_ids(dsn: str, consumer: str = "default") -> list[UUID]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT message_id FROM inbox.processed WHERE consumer = %s", (consumer,)).fetchall()
    return [r[0] for r in rows]


def processed_count(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM inbox.processed").fetchone()
    return int(row[0]) if row else 0


# -- the producer's side ------------------------------------------------------------------


@dataclass(frozen=True)
class Credit:
    account: int
    amount: int

    @property
    def key(self) -> str:
        return f"account-{self.account}"

    @property
    def body(self) -> bytes:
        # The bytes the relay publishes for this payload (compact JSON).
        return json.dumps({"account": self.account, "amount": self.amount}, separators=(",", ":")).encode()


def enqueue_credits(
    dsn: str, count: int, *, accounts: int, rng: random.Random, per_transaction: int = 5, rollback_every: int = 7
) -> dict[UUID, Credit]:
    """Enqueue credits in transactions of `per_transaction`; every `rollback_every`-th
    transaction is rolled back. Returns the committed ones by message id."""
    committed: dict[UUID, Credit] = {}
    with psycopg.connect(dsn) as conn:
        for txn in range(0, count, per_transaction):
            batch: dict[UUID, Credit] = {}
            for _ in range(min(per_transaction, count - txn)):
                c = Credit(rng.randrange(accounts), rng.randint(1, 1000))
                batch[enqueue(conn, TOPIC, {"account": c.account, "amount": c.amount}, key=c.key)] = c
            if (txn // per_transaction) % rollback_every == rollback_every - 1:
                conn.rollback()
            else:
                conn.commit()
                committed.update(batch)
    return committed


def expected_balances(credits: dict[UUID, Credit]) -> dict[int, int]:
    out: Counter[int] = Counter()
    for c in credits.values():
        out[c.account] += c.amount
    return dict(out)


def pending(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM outbox.messages WHERE dispatched_at IS NULL").fetchone()
    return int(row[0]) if row else 0


# -- duplicates, published by the test beside the relay's own delivery ---------------------------


async def publish_kafka_copies(bootstrap: str, topic: str, credits: dict[UUID, Credit]) -> None:
    """A second record of every message, as the relay sends it (same key, payload and
    message-id header), acknowledged by the broker before this returns."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for mid, c in credits.items():
            await producer.send_and_wait(
                topic,
                c.body,
                key=c.key.encode(),
                headers=[("message-id", str(mid).encode()), ("content-type", b"application/json")],
            )
    finally:
        await producer.stop()


class RabbitExchange:
    """An exchange and a durable queue bound to it; publishes copies with confirms."""

    def __init__(self, url: str, exchange: str, queue: str):
        self.exchange, self.queue = exchange, queue
        self._connection = pika.BlockingConnection(pika.URLParameters(url))
        self._channel = self._connection.channel()
        self._channel.exchange_declare(exchange, exchange_type="topic", durable=True)
        self._channel.queue_declare(queue, durable=True)
        self._channel.queue_bind(queue, exchange, routing_key="credits.#")
        self._channel.confirm_delivery()

    def publish_copies(self, credits: dict[UUID, Credit]) -> None:
        for mid, c in credits.items():
            self._channel.basic_publish(
                self.exchange,
                TOPIC,
                c.body,
                pika.BasicProperties(message_id=str(mid), content_type="application/json", delivery_mode=2),
                mandatory=True,
            )

    def ready_messages(self) -> int:
        return int(self._channel.queue_declare(self.queue, passive=True).method.message_count)

    def close(self) -> None:
        if self._channel.is_open:
            self._channel.queue_delete(self.queue)
            self._channel.exchange_delete(self.exchange)
        if self._connection.is_open:
            self._connection.close()


# -- consumer processes ------------------------------------------------------------------------


class ConsumerProcess:
    """tests/inbox/consumer_process.py in the background; its stdout (one line per step
    of each message, written unbuffered so it survives a SIGKILL) kept in a file per run."""

    def __init__(self, name: str, directory: Path, args: list[str]):
        self.name, self.directory, self.args = name, directory, args
        self.runs: list[Path] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        log = self.directory / f"{self.name}.{len(self.runs)}.log"
        self.runs.append(log)
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.inbox.consumer_process", *self.args],
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(os.environ),
            )

    def kill(self) -> str:
        """SIGKILL this run; return its last line (what it was doing when it died)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        lines = self.runs[-1].read_text().splitlines()
        return lines[-1] if lines else ""

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def tail(self, count: int = 15) -> str:
        """The last lines of the current run, for a failure's message."""
        return f"{self.runs[-1].name}: " + " | ".join(self.runs[-1].read_text().splitlines()[-count:])

    def lines(self) -> list[str]:
        return [line for log in self.runs for line in log.read_text().splitlines()]


def kill_at_random_moments(
    consumers: list[ConsumerProcess], dsn: str, *, kills: int, total: int, rng: random.Random
) -> list[str]:
    """`kills` times: wait until the consumers have processed a random number of new
    messages (1 to 15), SIGKILL all of them at once (the database rolls back whatever
    transaction each had open), and start them again. Returns each killed run's last line."""
    last_lines = []
    for _ in range(kills):
        start = processed_count(dsn)
        target = min(total, start + rng.randint(1, 15))
        wait_for(lambda t=target: processed_count(dsn) >= t, 30, f"consumers processing up to {target}", interval=0.02)
        for consumer in rng.sample(consumers, len(consumers)):
            last_lines.append(consumer.kill())
        for consumer in consumers:
            consumer.start()
    return last_lines


def assert_each_effect_once(
    dsn: str, credits: dict[UUID, Credit], consumers: list[ConsumerProcess], consumer: str = "default"
) -> Counter[str]:
    """The balances are the sums of the committed credits, each message is recorded once,
    and no two runs ever committed the same message. Returns the count of each log verb."""
    assert balances(dsn) == expected_balances(credits), "every credit applied exactly once"
    recorded = processed_ids(dsn, consumer)
    assert len(recorded) == len(set(recorded)) == len(credits)
    assert set(recorded) == set(credits), "rolled-back messages never arrive, committed ones all do"
    lines = [line.split() for c in consumers for line in c.lines()]
    committed = Counter(parts[1] for parts in lines if parts and parts[0] == "processed")
    assert max(committed.values(), default=0) <= 1, "no message committed twice"
    return Counter(parts[0] for parts in lines if parts)
