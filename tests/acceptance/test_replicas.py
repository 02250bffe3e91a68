"""Several `outbox-relay run` processes on one database, one of them killed with SIGKILL."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import psycopg

from outbox_relay import enqueue
from tests.support.cli import RelayProcess, read_jsonl
from tests.support.configs import write_config
from tests.support.outbox import dispatched
from tests.support.waiting import wait_for


def writer(dsn: str, keys: int, per_key: int, stop: threading.Event, committed: list[str]) -> None:
    """Commits messages with per-key sequence numbers, one transaction each, while relays run."""
    with psycopg.connect(dsn) as conn:
        for n in range(per_key):
            for k in range(keys):
                mid = enqueue(conn, "orders.created", {"n": n}, key=f"k{k}")
                conn.commit()
                committed.append(str(mid))
            if stop.is_set():
                return
            time.sleep(0.002)  # pacing: the relays claim while the writer writes


def test_two_relays_publish_each_message_once(db: str, tmp_path: Path) -> None:
    relays = [
        RelayProcess(write_config(tmp_path / f"r{i}.yaml", db, sink=tmp_path / f"r{i}.jsonl", batch_size=20))
        for i in range(2)
    ]
    committed: list[str] = []
    try:
        for relay in relays:
            relay.wait_started()
        writer(db, keys=10, per_key=60, stop=threading.Event(), committed=committed)
        wait_for(lambda: dispatched(db) == len(committed))
        for relay in relays:
            assert relay.terminate() == 0
    finally:
        for relay in relays:
            relay.close()
    published = [r["message_id"] for i in range(2) for r in read_jsonl(tmp_path / f"r{i}.jsonl")]
    assert Counter(published).most_common(1)[0][1] == 1, "a message was published twice"
    assert sorted(published) == sorted(committed)
    assert all(read_jsonl(tmp_path / f"r{i}.jsonl") for i in range(2)), "both relays should take a share"


def test_a_relay_killed_mid_stream_strands_nothing(db: str, tmp_path: Path) -> None:
    batch_size, workers = 20, 2
    # Both relays append to one file (O_APPEND, one write per batch), so its line order is
    # the order of delivery across both processes.
    sink = tmp_path / "shared.jsonl"
    configs = [
        write_config(tmp_path / f"r{i}.yaml", db, sink=sink, batch_size=batch_size, workers=workers) for i in range(2)
    ]
    survivor = RelayProcess(configs[1])
    victim = RelayProcess(configs[0])
    committed: list[str] = []
    stop = threading.Event()
    thread = threading.Thread(target=writer, args=(db, 10, 150, stop, committed))
    try:
        survivor.wait_started()
        victim.wait_started()
        thread.start()
        wait_for(lambda: len(read_jsonl(sink)) > 300)
        victim.kill()  # SIGKILL: no cleanup, its connections just drop
        thread.join(120)
        wait_for(lambda: dispatched(db) == len(committed), timeout=90)
        assert survivor.terminate() == 0
    finally:
        stop.set()
        victim.close()
        survivor.close()
    records = read_jsonl(sink)
    counts = Counter(r["message_id"] for r in records)
    assert set(counts) == set(committed), "every committed message is published"
    duplicates = sum(c - 1 for c in counts.values())
    # Only the batches the victim had in flight when it died may be published again.
    assert duplicates <= batch_size * workers
    first: dict[str, list[int]] = {}
    seen: set[str] = set()
    for r in records:
        if r["message_id"] not in seen:
            seen.add(r["message_id"])
            first.setdefault(r["key"], []).append(r["payload"]["n"])
    for key, sequence in first.items():
        assert sequence == list(range(len(sequence))), f"first deliveries of {key} out of order"
