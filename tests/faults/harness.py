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
from pathlib import Path
from typing import Any

import psycopg
import yaml

from outbox_relay import enqueue
from tests.acceptance.cli import RelayProcess
from tests.consumers import Received


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
                    time.sleep(0.2)
                    continue
                time.sleep(self.pause)
        except BaseException as exc:  # surfaced by stop()
            self.errors.append(exc)
        finally:
            if conn is not None:
                conn.close()


def relay_config(path: Path, dsn: str, brokers: dict[str, Any], routes: list[dict[str, Any]], **relay: Any) -> Path:
    tree = {
        "database": {"dsn": dsn},
        "relay": {"poll_interval": "500ms", "retry": {"initial": "100ms", "max": "2s"}, **relay},
        "http": {"host": "127.0.0.1", "port": 0},
        "brokers": brokers,
        "routes": routes,
    }
    path.write_text(yaml.safe_dump(tree))
    return path


def http_port(relay: RelayProcess, timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in relay.log_path.read_text().splitlines():
            if '"http_listening"' in line:
                return int(json.loads(line)["port"])
        time.sleep(0.05)
    raise AssertionError("relay did not report its HTTP port")


def settled(dsn: str) -> bool:
    """No message is pending any more (dispatched or dead-lettered)."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM outbox.messages WHERE dispatched_at IS NULL "
                           "AND dead_lettered_at IS NULL").fetchone()
    return bool(row and row[0] == 0)


def wait_for(predicate: Any, timeout: float = 90.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not met within {timeout}s"
        time.sleep(0.2)


def check_delivery(received: list[Received], ledger: Ledger, *, uncertain: set[str] | None = None,
                   max_duplicates: int = 0, dead: set[str] | None = None) -> int:
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
