"""The WAL source through the real command line: `schema install --source wal`,
`schema source`, `run` (streaming, standing by, taking over, parking), `status` and
`check`, against the real PostgreSQL with logical decoding."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from outbox_relay import enqueue
from outbox_relay.sources.wal import slot
from tests.support.cli import RelayProcess, read_jsonl, run_cli
from tests.support.configs import write_config
from tests.support.databases import role_with_grants
from tests.support.http import HttpReceiver, answer
from tests.support.outbox import count
from tests.support.waiting import wait_for
from tests.support.wal import confirmed_flush, drop_slot, require_logical_wal


@pytest.fixture
def wal_db(db: str) -> Iterator[tuple[str, str]]:
    """A fresh outbox and a slot name of its own (slots are the cluster's), the slot
    dropped afterwards whoever created it."""
    require_logical_wal(db)
    name = f"t_{uuid.uuid4().hex[:16]}"
    try:
        yield db, name
    finally:
        drop_slot(db, name)


def wal_settings(name: str, **more: Any) -> dict[str, Any]:
    return {"slot": name, "status_interval": "1s", **more}


def logged(relay: RelayProcess, event: str) -> bool:
    return any(line.get("event") == event for line in relay.logs())


def switch_to_wal(db: str, name: str) -> None:
    done = run_cli("schema", "install", "--source", "wal", "--slot", name, env={"DATABASE_URL": db})
    assert done.returncode == 0, done.stderr
    assert f"created replication slot and publication {name!r}" in done.stdout
    assert "outbox schema 'outbox' is now in wal mode" in done.stdout


def test_install_with_the_wal_source_then_run_delivers_committed_messages_in_commit_order(
    wal_db: tuple[str, str], tmp_path: Path
) -> None:
    db, name = wal_db
    switch_to_wal(db, name)
    sink = tmp_path / "out.jsonl"
    config = write_config(tmp_path / "relay.yaml", db, sink=sink, wal=wal_settings(name))
    relay = RelayProcess(config)
    order: list[tuple[str, str]] = []  # (key, message id) in commit order
    try:
        relay.wait_started()
        wait_for(lambda: logged(relay, "wal_relay_started"), 30, "the WAL relay streams")
        rolled_back: list[str] = []
        with psycopg.connect(db) as conn, psycopg.connect(db) as other:
            for n in range(20):
                ids = [(f"k{k}", str(enqueue(conn, "orders.created", {"n": n}, key=f"k{k}"))) for k in range(3)]
                if n % 5 == 4:
                    rolled_back.append(str(enqueue(conn, "orders.created", {"n": "never"}, key="k0")))
                    conn.rollback()
                    continue
                conn.commit()
                order += ids
            # Two transactions on one key committed in the other order than they enqueued:
            # the WAL source delivers commit order.
            first = str(enqueue(conn, "orders.created", {"n": "enqueued first"}, key="k0"))
            second = str(enqueue(other, "orders.created", {"n": "enqueued second"}, key="k0"))
            other.commit()
            conn.commit()
            order += [("k0", second), ("k0", first)]
            row = conn.execute("SELECT outbox.enqueue('orders.created', 'k1', '{\"sql\": true}')").fetchone()
            conn.commit()
            assert row is not None
            order.append(("k1", str(row[0])))
        wait_for(lambda: len(read_jsonl(sink)) >= len(order), 30, "every committed message delivered")

        shown = run_cli("status", "--config", str(config))
        assert shown.returncode == 0, shown.stderr
        assert f"source         wal (slot {name!r} streamed, lag " in shown.stdout
        checked = run_cli("check", "--config", str(config))
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert f"source    ok  wal (slot {name!r} streamed" in checked.stdout
        with psycopg.connect(db) as conn:
            unlimited = conn.execute("SHOW max_slot_wal_keep_size").fetchone() == ("-1",)
        assert ("source    WARN  max_slot_wal_keep_size is -1" in checked.stdout) == unlimited
        assert relay.terminate() == 0
    finally:
        relay.close()
    records = read_jsonl(sink)
    assert [r["message_id"] for r in records] == [mid for _, mid in order]
    assert not set(rolled_back) & {r["message_id"] for r in records}
    assert count(db) == 0, "nothing went through the table"


def test_a_relay_killed_mid_drain_loses_nothing_and_repeats_only_what_was_in_flight(
    wal_db: tuple[str, str], tmp_path: Path
) -> None:
    db, name = wal_db
    switch_to_wal(db, name)
    committed: list[str] = []
    with psycopg.connect(db) as conn:
        for t in range(600):  # a backlog of 6,000 messages in 600 transactions
            committed += [str(enqueue(conn, "orders.created", {"n": t}, key=f"k{i}")) for i in range(10)]
            conn.commit()
    sinks = [tmp_path / "first.jsonl", tmp_path / "second.jsonl"]
    configs = [
        # Quick status updates: the server learns a confirmed position well before the drain ends.
        write_config(tmp_path / f"r{i}.yaml", db, sink=sink, wal=wal_settings(name, status_interval="200ms"))
        for i, sink in enumerate(sinks)
    ]
    start = confirmed_flush(db, name)
    first = RelayProcess(configs[0])
    try:
        # Killed once it has confirmed a part of what it delivered: only the rest comes again.
        wait_for(lambda: confirmed_flush(db, name) > start, 60, "the first relay confirms", interval=0.02)
        first.kill()
    finally:
        first.close()
    before = [r["message_id"] for r in read_jsonl(sinks[0])]
    assert len(before) < len(committed), "killed after the drain ended: nothing was in flight"
    assert len(before) > 0
    second = RelayProcess(configs[1])
    try:
        wait_for(
            lambda: set(before) | {r["message_id"] for r in read_jsonl(sinks[1])} >= set(committed),
            60,
            "the second relay delivers the rest",
        )
        assert second.terminate() == 0
    finally:
        second.close()
    after = [r["message_id"] for r in read_jsonl(sinks[1])]
    assert set(before) | set(after) == set(committed), "nothing lost"
    repeated = set(before) & set(after)
    # At least once from the last confirmed commit: what the first relay delivered after
    # it is delivered again, first of all, and nothing earlier.
    assert set(before[len(before) - len(repeated) :]) == repeated
    assert after[: len(repeated)] == before[len(before) - len(repeated) :]
    assert Counter(after).most_common(1)[0][1] == 1
    assert len(repeated) < len(before), "what was confirmed is not delivered again"
    print(f"killed after {len(before)} of {len(committed)} delivered; {len(repeated)} delivered again")


def writer(dsn: str, total: int, committed: list[str], stop: threading.Event) -> None:
    """One message per transaction over 10 keys with a sequence number per key."""
    with psycopg.connect(dsn) as conn:
        for n in range(total):
            committed.append(str(enqueue(conn, "orders.created", {"n": n // 10}, key=f"k{n % 10}")))
            conn.commit()
            if stop.is_set():
                return
            time.sleep(0.002)


def test_a_standby_relay_takes_the_slot_over_when_the_streaming_one_is_killed(
    wal_db: tuple[str, str], tmp_path: Path
) -> None:
    db, name = wal_db
    switch_to_wal(db, name)
    sink = tmp_path / "shared.jsonl"  # both append to it: its order is the order of delivery
    # The standby's retry interval as configured by default (relay.wal.standby_interval).
    configs = [write_config(tmp_path / f"r{i}.yaml", db, sink=sink, wal=wal_settings(name)) for i in range(2)]
    streaming = RelayProcess(configs[0])
    standby: RelayProcess | None = None
    committed: list[str] = []
    stop = threading.Event()
    thread = threading.Thread(target=writer, args=(db, 3000, committed, stop))
    try:
        wait_for(lambda: logged(streaming, "wal_relay_started"), 30, "the first relay streams")
        standby = RelayProcess(configs[1])
        wait_for(lambda: logged(standby, "wal_slot_in_use"), 30, "the second relay stands by")
        thread.start()
        wait_for(lambda: len(read_jsonl(sink)) >= 500, 60, "the first relay delivers")
        assert not logged(standby, "wal_relay_started"), "one relay streams the slot at a time"
        streaming.kill()
        killed = time.monotonic()
        wait_for(lambda: logged(standby, "wal_relay_started"), 60, "the standby takes over", interval=0.02)
        takeover = time.monotonic() - killed
        thread.join(120)
        wait_for(lambda: {r["message_id"] for r in read_jsonl(sink)} >= set(committed), 60, "all delivered")
        assert standby.terminate() == 0
    finally:
        stop.set()
        streaming.close()
        if standby is not None:
            standby.close()
    records = read_jsonl(sink)
    counts = Counter(r["message_id"] for r in records)
    assert set(counts) == set(committed)
    first: dict[str, list[int]] = {}
    for r in records:
        if counts[r["message_id"]] > 0:
            counts[r["message_id"]] = 0
            first.setdefault(r["key"], []).append(r["payload"]["n"])
    for key, sequence in first.items():
        assert sequence == list(range(len(sequence))), f"first deliveries of {key} out of order"
    duplicates = len(records) - len(set(r["message_id"] for r in records))
    print(f"takeover {takeover:.2f} s after SIGKILL; {duplicates} delivered twice")
    assert takeover < 30


def test_a_message_its_broker_refuses_is_parked_and_the_table_engine_delivers_it_in_key_order(
    wal_db: tuple[str, str], tmp_path: Path
) -> None:
    db, name = wal_db
    switch_to_wal(db, name)
    receiver = HttpReceiver(answer(500))
    config = write_config(
        tmp_path / "relay.yaml",
        db,
        brokers={"hook": {"type": "webhook", "url": f"{receiver.url}/"}},
        wal=wal_settings(name),
    )
    relay = RelayProcess(config)
    try:
        wait_for(lambda: logged(relay, "wal_relay_started"), 30, "the WAL relay streams")
        with psycopg.connect(db) as conn:
            refused = str(enqueue(conn, "orders.created", {"n": 0}, key="k"))
            conn.commit()
            wait_for(lambda: count(db, f"message_id = '{refused}'") == 1, 30, "the refused message parked")
            later = str(enqueue(conn, "orders.created", {"n": 1}, key="k"))
            conn.commit()
            # Its key is held by the table: parked behind it, never published around it.
            wait_for(lambda: count(db, f"message_id = '{later}'") == 1, 30, "the later message parked")
        receiver.respond = answer(200)
        wait_for(lambda: count(db, "dispatched_at IS NOT NULL") == 2, 30, "the table engine delivers both")
        assert relay.terminate() == 0
    finally:
        relay.close()
        receiver.close()
    assert [r.headers["message-id"] for r in receiver.accepted()] == [refused, later]
    assert receiver.refused >= 1


def test_switching_back_to_the_table_loses_nothing_and_the_relay_drops_the_drained_slot(
    wal_db: tuple[str, str], tmp_path: Path
) -> None:
    db, name = wal_db
    switch_to_wal(db, name)
    with psycopg.connect(db) as conn:
        in_wal = [str(enqueue(conn, "orders.created", {"n": n}, key="k")) for n in range(50)]
        conn.commit()
    switched = run_cli("schema", "source", "table", "--slot", name, env={"DATABASE_URL": db})
    assert switched.returncode == 0, switched.stderr
    assert "is now in table mode" in switched.stdout and f"the replication slot {name!r} stays" in switched.stdout
    with psycopg.connect(db) as conn:
        in_table = [str(enqueue(conn, "orders.created", {"n": n}, key="other")) for n in range(50)]
        conn.commit()
    assert count(db) == 50
    sink = tmp_path / "out.jsonl"
    config = write_config(tmp_path / "relay.yaml", db, sink=sink, wal=wal_settings(name))
    shown = run_cli("status", "--config", str(config))
    assert f"source         table (slot {name!r} not streamed" in shown.stdout, shown.stdout + shown.stderr
    assert "kept until a relay has drained it; keyed rows enqueued since the switch wait for it)" in shown.stdout
    relay = RelayProcess(config)
    try:
        wait_for(lambda: logged(relay, "wal_slot_dropped"), 60, "the relay drains the slot and drops it")
        wait_for(lambda: len(read_jsonl(sink)) >= 100, 30, "every message delivered")
        assert relay.terminate() == 0
    finally:
        relay.close()
    delivered = [r["message_id"] for r in read_jsonl(sink)]
    assert sorted(delivered) == sorted(in_wal + in_table)
    assert [m for m in delivered if m in set(in_wal)] == in_wal
    with psycopg.connect(db, autocommit=True) as conn:
        assert slot.read_state(conn, name) is None
    shown = run_cli("status", "--config", str(config))
    assert "source         table\n" in shown.stdout


def test_schema_source_wal_says_when_the_role_lacks_replication(wal_db: tuple[str, str]) -> None:
    db, name = wal_db
    with role_with_grants(db, "relay", "norepl") as dsn:
        role = str(psycopg.conninfo.conninfo_to_dict(dsn)["user"])
        with psycopg.connect(db, autocommit=True) as conn:
            # CREATE for the publication: what is missing is REPLICATION alone.
            conn.execute(
                sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
                    sql.Identifier(conn.info.dbname), sql.Identifier(role)
                )
            )
        refused = run_cli("schema", "source", "wal", "--slot", name, env={"DATABASE_URL": dsn})
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute(
                sql.SQL("REVOKE CREATE ON DATABASE {} FROM {}").format(
                    sql.Identifier(conn.info.dbname), sql.Identifier(role)
                )
            )
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1, refused.stderr
    assert f"the role needs the REPLICATION attribute, which {role!r} lacks" in refused.stderr
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT source FROM outbox.settings").fetchone() == ("table",)
        assert conn.execute("SELECT count(*) FROM pg_publication").fetchone() == (0,), "nothing created"


def test_a_relay_in_wal_mode_whose_slot_is_gone_stops_in_one_line_and_check_fails(
    wal_db: tuple[str, str], tmp_path: Path
) -> None:
    db, name = wal_db
    switch_to_wal(db, name)
    drop_slot(db, name)  # as a failover to a standby without it would leave the outbox
    config = write_config(tmp_path / "relay.yaml", db, wal=wal_settings(name))
    checked = run_cli("check", "--config", str(config))
    assert checked.returncode == 1
    assert f"source    FAIL  wal, but its slot {name!r} does not exist: create it with" in checked.stdout
    relay = RelayProcess(config)
    try:
        code = relay.proc.wait(60)
    finally:
        relay.close()
    assert code == 1
    last = relay.log_path.read_text().splitlines()[-1]
    assert last.startswith(
        f"error: the outbox 'outbox' is in WAL mode but its replication slot {name!r} does not exist"
    )
    with psycopg.connect(db, autocommit=True) as conn:
        assert slot.read_state(conn, name) is None, "never recreated by the relay"


def test_check_warns_while_public_can_emit_logical_messages_and_schema_source_wal_revokes_it(
    wal_db: tuple[str, str], tmp_path: Path
) -> None:
    db, name = wal_db
    switch_to_wal(db, name)
    config = write_config(tmp_path / "relay.yaml", db, wal=wal_settings(name))
    warning = "source    WARN  PUBLIC can execute pg_logical_emit_message"
    checked = run_cli("check", "--config", str(config))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert warning not in checked.stdout, "the switch revoked it"
    # PostgreSQL's default, as in a database switched before the revoke existed.
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) TO PUBLIC")
    checked = run_cli("check", "--config", str(config))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert warning in checked.stdout
    switched = run_cli("schema", "source", "wal", "--slot", name, env={"DATABASE_URL": db})
    assert switched.returncode == 0, switched.stderr
    assert "warning" not in switched.stdout, "a superuser revokes, it does not warn"
    checked = run_cli("check", "--config", str(config))
    assert warning not in checked.stdout
