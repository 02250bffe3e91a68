"""Switching source under a running relay, through the real command line (issue 18,
point 1): the relay notices a switch either way, and each key keeps its order across it;
a switch waits for the transactions that enqueued (none goes on with the old body after
it) and is refused in one line, changing nothing, while one stays open. Real PostgreSQL
with logical decoding."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from outbox_relay import enqueue
from outbox_relay.sources.wal import slot
from tests.support.cli import RelayProcess, read_jsonl, run_cli
from tests.support.configs import write_config
from tests.support.waiting import wait_for
from tests.support.wal import drop_slot, require_logical_wal


@pytest.fixture
def wal_db(db: str) -> Iterator[tuple[str, str]]:
    """An outbox in table mode and a slot name of its own, dropped afterwards."""
    require_logical_wal(db)
    name = f"t_{uuid.uuid4().hex[:16]}"
    try:
        yield db, name
    finally:
        drop_slot(db, name)


def switch(db: str, source: str, name: str) -> None:
    done = run_cli("schema", "source", source, "--slot", name, env={"DATABASE_URL": db})
    assert done.returncode == 0, done.stderr
    assert f"is now in {source} mode" in done.stdout


def enqueue_each(db: str, key: str, count: int, label: str) -> list[str]:
    with psycopg.connect(db) as conn:
        ids = []
        for n in range(count):
            ids.append(str(enqueue(conn, "orders.created", {label: n}, key=key)))
            conn.commit()
    return ids


def logged(relay: RelayProcess, event: str) -> bool:
    return any(line.get("event") == event for line in relay.logs())


def test_a_running_relay_follows_a_switch_either_way_and_each_key_keeps_its_order(
    wal_db: tuple[str, str], tmp_path: Path
) -> None:
    db, name = wal_db
    sink = tmp_path / "out.jsonl"
    config = write_config(tmp_path / "relay.yaml", db, sink=sink, wal={"slot": name, "status_interval": "1s"})
    relay = RelayProcess(config)
    try:
        relay.wait_started()
        first = enqueue_each(db, "k", 5, "table, before")
        wait_for(lambda: len(read_jsonl(sink)) == 5, 30, "the table's rows delivered")
        switch(db, "wal", name)  # `schema source wal` creates the slot, then switches
        in_wal = enqueue_each(db, "k", 5, "wal")
        wait_for(lambda: len(read_jsonl(sink)) == 10, 30, "the running relay streams the slot after the switch")
        assert logged(relay, "wal_relay_started")
        switch(db, "table", name)
        again = enqueue_each(db, "k", 5, "table, after")
        wait_for(lambda: logged(relay, "wal_slot_dropped"), 30, "the running relay drains the slot and drops it")
        wait_for(lambda: len(read_jsonl(sink)) == 15, 30, "the rows enqueued after the switch delivered")
        assert relay.terminate() == 0
    finally:
        relay.close()
    assert [r["message_id"] for r in read_jsonl(sink)] == first + in_wal + again
    with psycopg.connect(db, autocommit=True) as conn:
        assert slot.read_state(conn, name) is None
        assert conn.execute("SELECT drain_gate FROM outbox.settings").fetchone() == (None,)


def test_a_switch_waits_for_transactions_that_enqueued_and_is_refused_in_one_line_while_one_stays_open(
    wal_db: tuple[str, str], tmp_path: Path
) -> None:
    db, name = wal_db
    # The slot first: creating one waits for every transaction with an id to end.
    with psycopg.connect(db, autocommit=True) as conn:
        slot.create(conn, name, name)
    with psycopg.connect(db) as before:
        # A transaction that enqueued a row through the table body and stays open: were
        # the switch to go through, it could go on enqueueing rows after it, and a row of
        # k could follow a WAL message of k that committed earlier.
        row = str(enqueue(before, "orders.created", {"n": "row, enqueued before the switch"}, key="k"))
        refused = run_cli("schema", "source", "wal", "--slot", name, "--wait", "1s", env={"DATABASE_URL": db})
        assert refused.returncode != 0
        [line] = refused.stderr.strip().splitlines()
        assert line.startswith("error: schema source: transactions that enqueued into 'outbox' stayed open for 1s")
        assert "Nothing changed" in line
        with psycopg.connect(db) as conn:
            assert conn.execute("SELECT source FROM outbox.settings").fetchone() == ("table",)
        before.commit()
    switch(db, "wal", name)
    message = enqueue_each(db, "k", 1, "wal")
    sink = tmp_path / "out.jsonl"
    config = write_config(tmp_path / "relay.yaml", db, sink=sink, wal={"slot": name, "status_interval": "1s"})
    relay = RelayProcess(config)
    try:
        wait_for(lambda: len(read_jsonl(sink)) == 2, 30, "both delivered")
        assert relay.terminate() == 0
    finally:
        relay.close()
    assert [r["message_id"] for r in read_jsonl(sink)] == [row, *message]
