"""What every fault scenario shares: writers that keep committing (and sometimes roll
back), relays as real processes, and the checks on what the broker received.

The checks, for every scenario:
- nothing lost: every committed message arrives at least once;
- nothing phantom: nothing from a rolled-back transaction arrives;
- per-key order of first deliveries is the enqueue order;
- duplicates only around injected crashes, and no more than the in-flight batches.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import psycopg

from outbox_relay import enqueue
from tests.consumers import Received
from tests.support.cli import RelayProcess
from tests.support.waiting import wait_for


@dataclass
class Ledger:
    committed: dict[str, tuple[str, int]] = field(default_factory=dict)  # message id -> (key, n)
    rolled_back: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Writers:
    """`count` threads, each owning its keys (the ordering precondition), committing
    messages at a steady pace until stopped; every 7th transaction rolls back.
    A lost database connection (a restart) is retried; a commit whose outcome is
    unknown is left out of both sets and checked separately."""

    def __init__(self, dsn: str, topic: str, *, count: int = 4, keys_each: int = 5, pause: float = 0.005):
        self.dsn, self.topic, self.pause = dsn, topic, pause
        self.ledger = Ledger()
        self.uncertain: set[str] = set()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(w, keys_each), daemon=True) for w in range(count)]
        self.errors: list[BaseException] = []

    def start(self) -> Writers:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> Ledger:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        assert not self.errors, self.errors
        return self.ledger

    def _run(self, writer: int, keys_each: int) -> None:
        n = 0
        conn: psycopg.Connection[Any] | None = None
        try:
            while not self._stop.is_set():
                try:
                    if conn is None or conn.closed:
                        conn = psycopg.connect(self.dsn, connect_timeout=3)
                    key = f"w{writer}-k{n % keys_each}"
                    mid = str(enqueue(conn, self.topic, {"key": key, "n": n, "pad": "x" * 100}, key=key))
                    if n % 7 == 6:
                        conn.rollback()
                        with self.ledger.lock:
                            self.ledger.rolled_back.add(mid)
                        n += 1  # the sequence keeps its gap: consumers must not see it
                        continue
                    try:
                        conn.commit()
                    except psycopg.OperationalError:
                        self.uncertain.add(mid)  # the server may or may not have committed
                        raise
                    with self.ledger.lock:
                        self.ledger.committed[mid] = (key, n)
                    n += 1
                except psycopg.OperationalError:
                    if conn is not None:
                        conn.close()
                    conn = None
                    n += 1  # whatever happened to that message, the next one is later
                    time.sleep(0.2)  # then connect again
                    continue
                time.sleep(self.pause)  # the writers' steady pace
        except BaseException as exc:  # surfaced by stop()
            self.errors.append(exc)
        finally:
            if conn is not None:
                conn.close()


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


def check_delivery(
    received: list[Received],
    ledger: Ledger,
    *,
    uncertain: set[str] | None = None,
    max_duplicates: int = 0,
    dead: set[str] | None = None,
) -> int:
    """Assert the four properties; return how many duplicate deliveries there were."""
    dead = dead or set()
    counts = Counter(r.message_id for r in received)
    ids = set(counts)
    missing = set(ledger.committed) - dead - ids
    assert not missing, f"{len(missing)} committed messages never arrived"
    assert not ids & ledger.rolled_back, "a rolled-back message was published"
    unknown = ids - set(ledger.committed) - (uncertain or set())
    assert not unknown, f"{len(unknown)} messages arrived that nobody committed"
    first: dict[str, list[int]] = {}
    seen: set[str] = set()
    for r in received:
        if r.message_id in seen:
            continue
        seen.add(r.message_id)
        body = json.loads(r.payload)
        first.setdefault(body["key"], []).append(body["n"])
    for key, sequence in first.items():
        assert sequence == sorted(sequence), f"first deliveries of {key} out of order"
    duplicates = sum(c - 1 for c in counts.values())
    assert duplicates <= max_duplicates, f"{duplicates} duplicates, at most {max_duplicates} expected"
    return duplicates
