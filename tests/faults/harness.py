"""What every fault scenario shares: the outbox in either source (table or WAL: a
scenario takes the source as a parameter), writers that keep committing (and sometimes
roll back), relays as real processes, and the checks on what the broker received.

The checks, for every scenario:
- nothing lost: every committed message arrives at least once;
- nothing phantom: nothing from a rolled-back transaction arrives;
- per-key order of first deliveries is the key's commit order (the writers number each
  key's messages so: see Writers);
- duplicates only around injected crashes, and no more than what was in flight;
  with ``exactly_once: true`` on the Kafka broker (check_exactly_once), none at all for a
  ``read_committed`` consumer.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import json
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
from aiokafka import AIOKafkaConsumer, TopicPartition
from psycopg.conninfo import make_conninfo

from outbox_relay import enqueue
from outbox_relay.sources.wal import pgoutput
from tests.consumers import Received
from tests.services import LOGICAL_DECODING
from tests.support.cli import RelayProcess, run_cli
from tests.support.outbox import count, pending
from tests.support.waiting import wait_for
from tests.support.wal import confirmed_flush, drop_slot, require_logical_wal


@dataclass
class Ledger:
    committed: dict[str, tuple[str, int]] = field(default_factory=dict)  # message id -> (key, n)
    rolled_back: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


SOURCES = ("table", "wal")
# The settings of the own_pg fixture's cluster, to start it again with after a stop:
# logical decoding for the WAL source (a server with a logical slot refuses to start
# without it).
OWN_PG_SETTINGS = {"max_connections": "100", **LOGICAL_DECODING}
# What a relay in WAL mode may have in flight when it dies: the batch in hand (the
# transactions that had arrived, dispatched together) and what the broker acked before
# the server got the confirm, CONFIRM_REPORT_S (50 ms) plus the ack's and the update's
# way: all of it appended by the broker in the WAL_REPORT_WINDOW_S before the kill, or
# in the WAL_LATE_APPEND_S after it for records already on their way (less than a
# standby needs to take over and publish). Counted from the broker's side (its append
# times: topics created with APPEND_TIME), so the bound follows the relay's pace on
# the machine at hand (a drain goes several times faster than the writers); a confirm
# sent only at the status interval (1 s) exceeds it.
WAL_REPORT_WINDOW_S = 0.25
WAL_LATE_APPEND_S = 0.03
APPEND_TIME = {"message.timestamp.type": "LogAppendTime"}  # a record's timestamp: the broker's


@dataclass(frozen=True)
class Outbox:
    """A scenario's outbox in its source: `table`, or `wal` with a slot of its own
    (slots are the cluster's), switched to by the real CLI (`outbox_in`)."""

    dsn: str
    source: str
    slot: str | None = None

    def settings(self, **wal: str) -> dict[str, Any]:
        """write_config's keywords for this source: relay.wal in wal mode (quick status
        updates: an idle stream's position moves within a second)."""
        if self.slot is None:
            return {}
        return {"wal": {"slot": self.slot, "status_interval": "1s", **wal}}

    def position(self) -> int:
        """The WAL's end now: every transaction committed so far ends at or before it."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        assert row is not None
        return pgoutput.parse_lsn(str(row[0]))

    def dispatched(self, position: int) -> bool:
        """Whether everything committed before `position` is done: no row pending and,
        in wal mode, the slot confirmed that far (each message acked or parked)."""
        if pending(self.dsn):
            return False
        return self.slot is None or confirmed_flush(self.dsn, self.slot) >= position

    def wait_dispatched(self, timeout: float) -> None:
        position = self.position()
        wait_for(lambda: self.dispatched(position), timeout, f"every message dispatched ({self.source} source)")

    def wait_streaming(self, timeout: float = 60) -> None:
        """Until a relay streams the slot and has confirmed something since this call:
        a kill after it falls mid-stream, not into a relay's start (on a loaded machine a
        relay killed every second might never stream at all)."""
        assert self.slot is not None
        slot = self.slot
        before = confirmed_flush(self.dsn, slot)
        wait_for(
            lambda: streaming(self) is not None and confirmed_flush(self.dsn, slot) > before,
            timeout,
            "a relay streaming the slot and confirming",
        )

    def parked(self) -> int:
        """Messages the WAL source parked into the table (its rows, in wal mode)."""
        return 0 if self.slot is None else count(self.dsn)


@contextlib.contextmanager
def outbox_in(dsn: str, source: str) -> Iterator[Outbox]:
    """The outbox of `dsn` in `source`; in wal mode its slot is dropped afterwards (a
    slot keeps its database from being dropped, and WAL from being recycled)."""
    if source == "table":
        yield Outbox(dsn, source)
        return
    require_logical_wal(dsn)
    name = f"f_{uuid.uuid4().hex[:16]}"
    switched = run_cli("schema", "source", "wal", "--slot", name, env={"DATABASE_URL": dsn})
    assert switched.returncode == 0, switched.stderr
    try:
        yield Outbox(dsn, source, name)
    finally:
        drop_slot(dsn, name)


def streaming(outbox: Outbox) -> str | None:
    """The application_name of the connection streaming the outbox's slot (the relays'
    DSNs name them: `relay_dsn`), None while no one streams it."""
    with psycopg.connect(outbox.dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT a.application_name FROM pg_replication_slots AS s JOIN pg_stat_activity AS a "
            "ON a.pid = s.active_pid WHERE s.slot_name = %s",
            (outbox.slot,),
        ).fetchone()
    return None if row is None else str(row[0])


def relay_dsn(dsn: str, name: str) -> str:
    """`dsn` with an application_name: the walsender of a relay's stream shows it."""
    return make_conninfo(dsn, application_name=name)


class Writers:
    """`count` threads committing messages at a steady pace until stopped, every 7th
    transaction rolled back, `per_transaction` messages a transaction.

    Each message carries its key's sequence number `n`, which rises in commit order, the
    order every source must keep per key (the table's enqueue order is commit order
    here too: a key's messages are enqueued while its transaction holds the key):
    - by default each thread owns its keys (the ordering precondition of the table
      source) and numbers them itself;
    - with `shared_keys` (a number of keys) every thread writes every key, and `n` is
      taken inside the transaction from a per-key counter row, locked until it commits
      (keys locked in sorted order: no deadlock): concurrent transactions on one key,
      in the order of their commits, which is the WAL's.
    A lost database connection (a restart) is retried; a commit whose outcome is
    unknown is left out of both sets and checked separately."""

    def __init__(
        self,
        dsn: str,
        topic: str,
        *,
        count: int = 4,
        keys_each: int = 5,
        pause: float = 0.005,
        per_transaction: int = 1,
        shared_keys: int = 0,
        seed: int = 0,
    ):
        self.dsn, self.topic, self.pause, self.seed = dsn, topic, pause, seed
        self.per_transaction, self.shared_keys, self.keys_each = per_transaction, shared_keys, keys_each
        self.ledger = Ledger()
        self.uncertain: set[str] = set()
        # Messages whose COMMIT is on its way (under ledger.lock): one may have committed
        # before a fault that came in between, yet enter the ledger only after it.
        self.committing: set[str] = set()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(w,), daemon=True) for w in range(count)]
        self.errors: list[BaseException] = []

    def sequenced_keys(self) -> list[str]:
        """The keys every thread writes, numbered by a counter row (`_numbered`)."""
        return [f"s{i}" for i in range(self.shared_keys)]

    def start(self) -> Writers:
        if keys := self.sequenced_keys():
            with psycopg.connect(self.dsn) as conn:
                conn.execute("CREATE TABLE IF NOT EXISTS fault_sequences (key text PRIMARY KEY, n int NOT NULL)")
                conn.execute(
                    "INSERT INTO fault_sequences SELECT k, -1 FROM unnest(%s::text[]) AS k ON CONFLICT DO NOTHING",
                    (keys,),
                )
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> Ledger:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        assert not self.errors, self.errors
        return self.ledger

    def _run(self, writer: int) -> None:
        rng = random.Random(writer + 1000 * self.seed)
        sequence = itertools.count()  # the writer's own keys' numbers (gaps are fine)
        transaction = 0
        conn: psycopg.Connection[Any] | None = None
        try:
            while not self._stop.is_set():
                transaction += 1
                try:
                    if conn is None or conn.closed:
                        conn = psycopg.connect(self.dsn, connect_timeout=3)
                    written = self._write(conn, writer, rng, sequence)
                    if transaction % 7 == 0:
                        conn.rollback()
                        with self.ledger.lock:
                            self.ledger.rolled_back.update(mid for mid, _ in written)
                        continue  # its numbers are gaps (own keys) or taken again (shared)
                    ids = {mid for mid, _ in written}
                    with self.ledger.lock:
                        self.committing |= ids
                    try:
                        conn.commit()
                    except psycopg.OperationalError:
                        # The server may or may not have committed.
                        with self.ledger.lock:
                            self.committing -= ids
                            self.uncertain.update(ids)
                        raise
                    with self.ledger.lock:
                        self.committing -= ids
                        self.ledger.committed.update(written)
                except psycopg.OperationalError:
                    if conn is not None:
                        conn.close()
                    conn = None
                    time.sleep(0.2)  # then connect again
                    continue
                self._pace()
        except BaseException as exc:  # surfaced by stop()
            self.errors.append(exc)
        finally:
            if conn is not None:
                conn.close()

    def _pace(self) -> None:
        time.sleep(self.pause)  # the writers' steady pace

    @staticmethod
    def _numbered(conn: psycopg.Connection[Any], key: str) -> int:
        """The key's next number, from its counter row in fault_sequences, which stays
        locked until the transaction ends: the key's writers are serialized, and its
        numbers rise in commit order (a rolled-back one is taken again)."""
        row = conn.execute("UPDATE fault_sequences SET n = n + 1 WHERE key = %s RETURNING n", (key,)).fetchone()
        assert row is not None, f"no counter row for key {key!r}"
        return int(row[0])

    def _write(
        self, conn: psycopg.Connection[Any], writer: int, rng: random.Random, sequence: Iterator[int]
    ) -> list[tuple[str, tuple[str, int]]]:
        """One transaction's messages, enqueued, not committed: [(message id, (key, n))]."""
        if self.shared_keys:
            keys = sorted(f"s{rng.randrange(self.shared_keys)}" for _ in range(self.per_transaction))
        else:
            numbers = [next(sequence) for _ in range(self.per_transaction)]
            keys = [f"w{writer}-k{n % self.keys_each}" for n in numbers]
        written = []
        for i, key in enumerate(keys):
            n = self._numbered(conn, key) if self.shared_keys else numbers[i]
            mid = str(enqueue(conn, self.topic, {"key": key, "n": n, "pad": "x" * 100}, key=key))
            written.append((mid, (key, n)))
        return written


def writers_for(outbox: Outbox, topic: str, *, slower: float = 1.0) -> Writers:
    """The writers of a scenario: for the table source each thread owns its keys, one
    message a transaction (the table's ordering precondition); in WAL mode transactions
    of three messages over keys every thread shares, numbered in commit order (about
    the same rate of messages). `slower` stretches their pauses: for a broker that
    drains and reads back slowly, fewer messages cover the same span of the fault."""
    if outbox.source == "wal":
        return Writers(outbox.dsn, topic, per_transaction=3, shared_keys=12, pause=0.015 * slower)
    return Writers(outbox.dsn, topic, pause=0.005 * slower)


# A backlog's messages, enqueued by one statement in series order (so each key's `n`
# rises in commit order), with the writers' payload: the checker reads key and n.
BACKLOG_SQL = """
SELECT outbox.enqueue_binary(
           %(topic)s, k, convert_to(json_build_object('key', k, 'n', i, 'pad', repeat('x', 100))::text, 'UTF8'),
           '{}'::jsonb, 'application/json'),
       k, i
FROM (SELECT i, 'b' || (i %% %(keys)s) AS k FROM generate_series(%(first)s::int, %(last)s::int) AS i) AS series
"""


def commit_backlog(
    outbox: Outbox, topic: str, count: int, *, start: int = 0, keys: int = 100, largest: int = 3000, seed: int = 0
) -> dict[str, tuple[str, int]]:
    """`count` messages committed at once, numbered from `start`, in transactions of 1 to
    `largest` messages (a relay splits one over 1,000 into several batches, each its own
    Kafka transaction), on keys b0.. of their own (not the writers'): message id ->
    (key, n), for the ledger."""
    rng = random.Random(seed)
    committed: dict[str, tuple[str, int]] = {}
    with psycopg.connect(outbox.dsn) as conn:
        done = 0
        while done < count:
            size = min(count - done, rng.randint(1, largest))
            first = start + done
            rows = conn.execute(
                BACKLOG_SQL, {"topic": topic, "keys": keys, "first": first, "last": first + size - 1}
            ).fetchall()
            conn.commit()
            committed.update((str(mid), (str(key), int(n))) for mid, key, n in rows)
            done += size
    return committed


def exactly_once_route(bootstrap: str, topic: str, **broker: Any) -> dict[str, Any]:
    """write_config's brokers and routes: every topic to `topic` through one Kafka broker
    with exactly_once on (aiokafka unless `client` is given in `broker`), its positions
    in an offsets topic of its own."""
    block = {
        "type": "kafka",
        "bootstrap_servers": bootstrap,
        "exactly_once": True,
        "offsets_topic": f"{topic}-offsets",
        **broker,
    }
    return {"brokers": {"kafka": block}, "routes": [{"topic": "*", "broker": "kafka", "destination": topic}]}


class OpenTransactions:
    """Whether a Kafka transaction with records in `topic` is open now: some partition's
    high watermark (read_uncommitted's end) is past its last stable offset (read_committed's
    end), which only records of an undecided transaction hold back. A fault aimed with it
    lands inside a transaction that has written records."""

    def __init__(self, bootstrap: str, topic: str):
        self._consumers = {
            level: AIOKafkaConsumer(
                bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None, isolation_level=level
            )
            for level in ("read_uncommitted", "read_committed")
        }
        self._topic = topic
        self._partitions: list[TopicPartition] = []

    async def __aenter__(self) -> OpenTransactions:
        for consumer in self._consumers.values():
            await consumer.start()
        cluster = await self._consumers["read_committed"]._client.fetch_all_metadata()
        self._partitions = [
            TopicPartition(self._topic, p) for p in sorted(cluster.partitions_for_topic(self._topic) or [])
        ]
        assert self._partitions, f"topic {self._topic!r} has no partitions"
        return self

    async def __aexit__(self, *exc: object) -> None:
        for consumer in self._consumers.values():
            await consumer.stop()

    async def any(self) -> bool:
        high = await self._consumers["read_uncommitted"].end_offsets(self._partitions)
        stable = await self._consumers["read_committed"].end_offsets(self._partitions)
        return any(high[tp] > stable[tp] for tp in self._partitions)


def http_port(relay: RelayProcess, timeout: float = 20) -> int:
    def reported() -> int | None:
        for line in relay.log_path.read_text().splitlines():
            if '"http_listening"' in line:
                return int(json.loads(line)["port"])
        return None

    wait_for(lambda: reported() is not None, timeout, "the relay reporting its HTTP port")
    port = reported()
    assert port is not None
    return port


def wal_in_flight(received: list[Received], moments: list[float]) -> int:
    """How many messages a WAL relay killed (or frozen, then killed) at each of `moments`
    (time.time()) may deliver twice: those the broker first appended (a topic with
    APPEND_TIME) from WAL_REPORT_WINDOW_S before one of them to WAL_LATE_APPEND_S after."""
    first: dict[str, float] = {}
    for r in received:
        first.setdefault(r.message_id, r.properties["timestamp"] / 1000)
    return appended_around(sorted(first.values()), moments)


def appended_around(appended: list[float], moments: list[float]) -> int:
    """wal_in_flight's count from the sorted first append times (seconds) themselves."""
    before, after = WAL_REPORT_WINDOW_S, WAL_LATE_APPEND_S
    return sum(bisect.bisect_right(appended, t + after) - bisect.bisect_left(appended, t - before) for t in moments)


@dataclass(frozen=True)
class Delivery:
    """One record a broker holds, as the checks see it: the message id, and the key and
    sequence number `n` its payload carries (the writers' and commit_backlog's)."""

    message_id: str
    key: str | None
    n: int


def delivery(message_id: str, payload: bytes) -> Delivery:
    body = json.loads(payload)
    return Delivery(message_id, body["key"], body["n"])


def deliveries(received: list[Received]) -> list[Delivery]:
    return [delivery(r.message_id, r.payload) for r in received]


@dataclass
class Audit:
    """What `audit` found: the counts, and a few examples of each kind of defect."""

    committed: int
    delivered: int  # records, copies included
    lost: set[str]  # committed (not dead-lettered), never delivered
    phantom: set[str]  # rolled back, yet delivered
    unknown: set[str]  # delivered, but nobody committed it (nor rolled it back, nor was unsure)
    duplicates: int  # copies beyond each message's first delivery
    out_of_order: dict[str, int]  # key -> first deliveries with an `n` below an earlier one

    @property
    def order_violations(self) -> int:
        return sum(self.out_of_order.values())

    def summary(self, examples: int = 5) -> dict[str, Any]:
        return {
            "committed": self.committed,
            "delivered": self.delivered,
            "lost": len(self.lost),
            "phantom": len(self.phantom),
            "unknown": len(self.unknown),
            "duplicates": self.duplicates,
            "order_violations": self.order_violations,
            "examples": {
                "lost": sorted(self.lost)[:examples],
                "phantom": sorted(self.phantom)[:examples],
                "unknown": sorted(self.unknown)[:examples],
                "out_of_order_keys": sorted(self.out_of_order)[:examples],
            },
        }


def audit(
    delivered: list[Delivery], ledger: Ledger, *, uncertain: set[str] | None = None, dead: set[str] | None = None
) -> Audit:
    """Count, without asserting, how `delivered` (in each broker's order: per partition
    or queue) breaks the four properties. Messages without a key carry no order."""
    counts = Counter(d.message_id for d in delivered)
    ids = set(counts)
    phantom = ids & ledger.rolled_back
    unknown = ids - set(ledger.committed) - ledger.rolled_back - (uncertain or set())
    highest: dict[str, int] = {}
    out_of_order: Counter[str] = Counter()
    seen = phantom | unknown  # counted as such, not again as out of order
    for d in delivered:
        if d.message_id in seen:
            continue
        seen.add(d.message_id)
        if d.key is None:
            continue
        if d.n < highest.get(d.key, d.n):
            out_of_order[d.key] += 1
        highest[d.key] = max(highest.get(d.key, d.n), d.n)
    return Audit(
        committed=len(ledger.committed),
        delivered=len(delivered),
        lost=set(ledger.committed) - (dead or set()) - ids,
        phantom=phantom,
        unknown=unknown,
        duplicates=sum(c - 1 for c in counts.values()),
        out_of_order=dict(out_of_order),
    )


def check_delivery(
    received: list[Received],
    ledger: Ledger,
    *,
    uncertain: set[str] | None = None,
    max_duplicates: int = 0,
    dead: set[str] | None = None,
) -> int:
    """Assert the four properties; return how many duplicate deliveries there were."""
    found = audit(deliveries(received), ledger, uncertain=uncertain, dead=dead)
    assert not found.lost, f"{len(found.lost)} committed messages never arrived"
    assert not found.phantom, "a rolled-back message was published"
    assert not found.unknown, f"{len(found.unknown)} messages arrived that nobody committed"
    for key in found.out_of_order:
        raise AssertionError(f"first deliveries of {key} out of order")
    duplicates = found.duplicates
    assert duplicates <= max_duplicates, f"{duplicates} duplicates, at most {max_duplicates} expected"
    return duplicates


def check_exactly_once(received: list[Received], ledger: Ledger, *, uncertain: set[str] | None = None) -> None:
    """What a read_committed consumer of an exactly-once relay must see (`received` read
    to the end: tests.consumers.kafka_read_to_end): every committed message once, none
    rolled back, each key in commit order, and no message id twice."""
    counts = Counter(r.message_id for r in received)
    twice = sorted(mid for mid, c in counts.items() if c > 1)
    copies = sum(counts[mid] - 1 for mid in twice)
    assert not twice, (
        f"exactly once broken: {len(twice)} messages committed more than once ({copies} copies), e.g. {twice[:3]}"
    )
    check_delivery(received, ledger, uncertain=uncertain)
