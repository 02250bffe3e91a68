"""A PostgreSQL failover under load (issue 20, item 3): the primary SIGKILLed, its
streaming standby promoted, writers and the relay (a real process, against the suite's
Kafka) both given a DSN naming the two hosts with target_session_attrs=read-write, so
each reconnects to whichever accepts writes.

- synchronous standby: nothing a COMMIT returned for is lost, in the database or on the
  broker; duplicates at most the batches in flight; per-key order kept;
- asynchronous standby held behind (its walsender frozen): the last commits before the
  failover are lost, the application's rows with their outbox rows; what the relay had
  published of them stays on the broker (the documented loss mode,
  docs/explanation/guarantees.md, "PostgreSQL failover"); it publishes nothing that
  was never committed and keeps each key's order;
- the primary's host cut off the network instead (no reset, no answer): the relay's
  connections, each with a query on its way, give up within tcp_user_timeout and it
  follows the promoted standby;
- the primary hung instead (every process stopped, its host's kernel still
  acknowledging): the relay gives its connections up after database.query_timeout and
  follows the promoted standby;
- WAL source: the logical slot is not carried to the standby (PostgreSQL 15): the relay
  stops with its one SlotMissing line.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from outbox_relay import enqueue
from outbox_relay.connections import CONNECT_TIMEOUT_S
from outbox_relay.demo import local_postgres
from outbox_relay.operations import schema_manager
from tests.consumers import kafka_create_topic, kafka_read_to_end
from tests.faults.harness import Ledger, Outbox, Writers, audit, check_delivery, deliveries
from tests.support.cli import RelayProcess, run_cli
from tests.support.configs import PATIENT, write_config
from tests.support.failover import ReplicatedPair, cut_off, replicated_pair
from tests.support.outbox import count, dispatched, pending
from tests.support.waiting import wait_for
from tests.support.wal import wal_slot

# Under a loaded machine a scenario (two clusters, a relay, Kafka) outlasts the default 120 s.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

BATCH, WORKERS = 50, 2


def install(conn: psycopg.Connection[Any]) -> None:
    schema_manager.install(conn, "outbox")


@pytest.fixture
def sync_pair() -> Iterator[ReplicatedPair]:
    with replicated_pair(synchronous=True, setup=install) as pair:
        yield pair


@pytest.fixture
def async_pair() -> Iterator[ReplicatedPair]:
    with replicated_pair(synchronous=False, setup=install) as pair:
        yield pair


async def kafka_topic(bootstrap: str) -> str:
    topic = f"failover-{uuid.uuid4().hex[:8]}"
    await kafka_create_topic(bootstrap, topic)
    return topic


def relay_config(tmp_path: Path, dsn: str, bootstrap: str, topic: str, **settings: Any) -> Path:
    return write_config(
        tmp_path / "relay.yaml",
        dsn,
        brokers={"kafka": {"type": "kafka", "bootstrap_servers": bootstrap}},
        routes=[{"topic": "*", "broker": "kafka", "destination": topic}],
        timing=PATIENT,
        batch_size=BATCH,
        workers=WORKERS,
        **settings,
    )


def committed_count(writers: Writers) -> int:
    with writers.ledger.lock:
        return len(writers.ledger.committed)


def wait_committed_more(writers: Writers, more: int, what: str) -> None:
    start = committed_count(writers)
    wait_for(lambda: committed_count(writers) >= start + more, 60, what)


def last_id(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT coalesce(max(id), 0) FROM outbox.messages").fetchone()
    return int(row[0]) if row else 0


def row_ids(dsn: str) -> set[str]:
    """Every message id the outbox table holds (dispatched rows are kept: retention 24 h)."""
    with psycopg.connect(dsn) as conn:
        return {str(r[0]) for r in conn.execute("SELECT message_id::text FROM outbox.messages")}


def logged(relay: RelayProcess, *events: str) -> int:
    return sum(1 for line in relay.logs() if line.get("event") in events)


def fail_over(pair: ReplicatedPair, writers: Writers, relay: RelayProcess) -> Ledger:
    """SIGKILL the primary, promote the standby, and let writers and relay go on there
    until both have done real work on it; returns the writers' ledger."""
    pair.kill_primary()
    # A failover manager takes a while to promote: meanwhile the first host refuses
    # and the second is read-only, which target_session_attrs=read-write turns down.
    wait_for(lambda: logged(relay, "database_unreachable"), 60, "the relay finding no read-write host")
    pair.promote()
    wait_committed_more(writers, 200, "writers committing on the promoted standby")
    new_primary = pair.standby.dsn
    before = dispatched(new_primary)
    wait_for(lambda: dispatched(new_primary) > before, 60, "the relay dispatching from the promoted standby")
    ledger = writers.stop()
    Outbox(pair.dsn, "table").wait_dispatched(120)
    assert relay.proc.poll() is None, "the relay kept running through the failover"
    assert logged(relay, "database_connection_lost", "listen_connection_lost"), "the relay saw its connections end"
    return ledger


async def test_synchronous_standby_promoted_under_load_loses_nothing_committed(
    sync_pair: ReplicatedPair, kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = await kafka_topic(kafka_bootstrap)
    relay = RelayProcess(relay_config(tmp_path, sync_pair.dsn, kafka_bootstrap, topic))
    writers = Writers(sync_pair.dsn, topic).start()
    try:
        wait_for(lambda: dispatched(sync_pair.primary.dsn) >= 200, 60, "traffic flowing before the failover")
        ledger = fail_over(sync_pair, writers, relay)
        assert relay.terminate() == 0
    finally:
        writers.stop()
        relay.close()
    # In the database: every COMMIT that returned, on the new primary.
    kept = row_ids(sync_pair.standby.dsn)
    missing = set(ledger.committed) - kept
    assert not missing, f"{len(missing)} committed messages missing on the promoted standby"
    # On the broker: all of them, nothing rolled back, order kept; copies at most the
    # batches the relay had claimed when the primary died.
    received = await kafka_read_to_end(kafka_bootstrap, topic, isolation_level="read_uncommitted")
    duplicates = check_delivery(received, ledger, uncertain=writers.uncertain, max_duplicates=BATCH * WORKERS)
    print(f"committed={len(ledger.committed)} uncertain={len(writers.uncertain)} duplicates={duplicates}")


async def test_asynchronous_standby_loses_the_last_commits_and_the_relay_invents_nothing(
    async_pair: ReplicatedPair, kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = await kafka_topic(kafka_bootstrap)
    relay = RelayProcess(relay_config(tmp_path, async_pair.dsn, kafka_bootstrap, topic))
    writers = Writers(async_pair.dsn, topic).start()
    old_primary = async_pair.primary.dsn
    try:
        wait_for(lambda: dispatched(old_primary) >= 200, 60, "traffic flowing before the failover")
        # The standby falls behind: what is committed (and published) from here on
        # never reaches it.
        with async_pair.hold_replication():
            # Rows past this id were written after the walsender froze: never replicated.
            held_from = last_id(old_primary)
            wait_committed_more(writers, 200, "writers committing while the standby is behind")
            wait_for(
                lambda: count(old_primary, f"dispatched_at IS NOT NULL AND id > {held_from:d}") >= 50,
                60,
                "the relay publishing commits the standby does not have",
            )
            async_pair.kill_primary()
        with writers.ledger.lock:
            # A commit on its way when the primary died may have committed there and
            # enter the ledger only now: it too was made before the failover.
            before_failover = set(writers.ledger.committed) | writers.uncertain | writers.committing
        ledger = fail_over(async_pair, writers, relay)
        assert relay.terminate() == 0
    finally:
        writers.stop()
        relay.close()
    kept = row_ids(async_pair.standby.dsn)
    lost = set(ledger.committed) - kept
    assert lost, "the held standby lost the last commits"
    assert lost <= before_failover, "only commits made before the failover are lost"
    assert_lost_are_each_writers_last(ledger, lost, before_failover)

    received = await kafka_read_to_end(kafka_bootstrap, topic, isolation_level="read_uncommitted")
    found = audit(deliveries(received), ledger, uncertain=writers.uncertain)
    assert not found.phantom, "a rolled-back message was published"
    assert not found.unknown, "a message nobody committed was published"
    assert not found.lost - lost, "a message the promoted standby holds was never published"
    assert not found.out_of_order, f"first deliveries out of order: {sorted(found.out_of_order)[:5]}"
    # Published from the old primary, then lost with its row: the documented loss mode.
    orphans = {r.message_id for r in received} - kept
    assert orphans, "the relay had published some of the commits the failover lost"
    assert orphans <= lost | writers.uncertain, "every message without a row is one of the commits the failover lost"
    # Copies: messages the relay had marked dispatched on the old primary after the
    # standby fell behind come again from the new one, and only those.
    copies = _copied(received)
    assert copies <= before_failover, "nothing committed after the failover is published twice"
    print(
        f"committed={len(ledger.committed)} lost_by_failover={len(lost)} published_then_lost={len(orphans)} "
        f"duplicates={found.duplicates}"
    )


def _copied(received: list[Any]) -> set[str]:
    seen: set[str] = set()
    twice: set[str] = set()
    for r in received:
        (twice if r.message_id in seen else seen).add(r.message_id)
    return twice


def assert_lost_are_each_writers_last(ledger: Ledger, lost: set[str], before_failover: set[str]) -> None:
    """Each writer thread commits its messages one after another, numbered in commit
    order (its keys are w<thread>-k<i>): the failover loses a tail of each thread's
    commits before it, never one in the middle."""
    kept_last: dict[str, int] = {}
    lost_first: dict[str, int] = {}
    for mid, (key, n) in ledger.committed.items():
        if mid not in before_failover:
            continue
        writer = key.split("-")[0]
        if mid in lost:
            lost_first[writer] = min(lost_first.get(writer, n), n)
        else:
            kept_last[writer] = max(kept_last.get(writer, n), n)
    for writer, first in lost_first.items():
        assert kept_last.get(writer, -1) < first, f"writer {writer} lost a commit older than one kept"


async def test_wal_source_stops_in_one_line_when_the_promoted_standby_has_no_slot(
    sync_pair: ReplicatedPair, kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = await kafka_topic(kafka_bootstrap)
    slot = f"f_{uuid.uuid4().hex[:16]}"
    switched = run_cli("schema", "source", "wal", "--slot", slot, env={"DATABASE_URL": sync_pair.dsn})
    assert switched.returncode == 0, switched.stderr
    config = relay_config(tmp_path, sync_pair.dsn, kafka_bootstrap, topic, wal={"slot": slot, "status_interval": "1s"})
    relay = RelayProcess(config)
    writers = Writers(sync_pair.dsn, topic).start()
    try:
        wait_for(lambda: "wal_relay_started" in relay.log_path.read_text(), 60, "the relay streaming the slot")
        wait_committed_more(writers, 100, "writers committing before the failover")
        sync_pair.kill_primary()
        sync_pair.promote()
        code = relay.proc.wait(120)
    finally:
        writers.stop()
        relay.close()
    last = relay.log_path.read_text().splitlines()[-1]
    assert code == 1, last
    assert last.startswith(
        f"error: the outbox 'outbox' is in WAL mode but its replication slot {slot!r} does not exist"
    )
    assert "not carried to a promoted standby" in last
    with psycopg.connect(sync_pair.standby.dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
    assert row == (0,), "the relay never creates a slot itself"


def enqueue_numbered(dsn: str, topic: str, first: int, count: int) -> dict[str, tuple[str, int]]:
    """`count` messages on one key, numbered from `first`, in one transaction: the ledger's entries."""
    committed = {}
    with psycopg.connect(dsn) as conn:
        for n in range(first, first + count):
            mid = enqueue(conn, topic, {"key": "cut", "n": n}, key="cut")
            committed[str(mid)] = ("cut", n)
    return committed


async def test_a_primary_cut_off_the_network_is_left_for_the_promoted_standby(
    async_pair: ReplicatedPair, kafka_bootstrap: str, tmp_path: Path
) -> None:
    # A failover's old primary usually vanishes with its host (a crash, a partition)
    # rather than its processes dying: nothing resets the relay's connections, and each
    # has a query on its way (the workers claim every poll, the LISTEN connection checks
    # every few seconds), which keepalives do not cover.
    topic = await kafka_topic(kafka_bootstrap)
    relay = RelayProcess(relay_config(tmp_path, async_pair.dsn, kafka_bootstrap, topic))
    ledger = Ledger()
    try:
        ledger.committed.update(enqueue_numbered(async_pair.primary.dsn, topic, 0, 100))
        wait_for(lambda: not pending(async_pair.primary.dsn), 60, "the first messages dispatched")
        wait_for(async_pair.caught_up, 30, "the standby holding all of it")
        with async_pair.cut_off_primary():
            async_pair.promote()
            # Straight to the new primary: the application is not what is tested here.
            ledger.committed.update(enqueue_numbered(async_pair.standby.dsn, topic, 100, 100))
            wait_for(
                lambda: not pending(async_pair.standby.dsn), 120, "the relay dispatching from the promoted standby"
            )
            assert logged(relay, "database_connection_lost"), "the relay gave up on the vanished primary"
            assert relay.terminate() == 0
    finally:
        relay.close()
    received = await kafka_read_to_end(kafka_bootstrap, topic, isolation_level="read_uncommitted")
    check_delivery(received, ledger, max_duplicates=BATCH * WORKERS)


async def test_the_wal_stream_connects_past_a_vanished_first_host(empty_db: str) -> None:
    # The WAL source's replication connection, after a failover whose old primary
    # vanished (PostgreSQL 17 can carry the slot over): the first host answers nothing,
    # and the stream must reach the second within a connect timeout.
    with wal_slot(empty_db) as wal:
        server = conninfo_to_dict(wal.dsn)
        vanished = local_postgres.free_port()
        dsn = make_conninfo(
            wal.dsn, host=f"127.0.0.1,{server.get('host', '127.0.0.1')}", port=f"{vanished},{server.get('port', 5432)}"
        )
        with cut_off(vanished):
            started = time.monotonic()
            async with wal.stream(dsn) as stream:
                took = time.monotonic() - started
                assert stream.system_id, "streaming from the second host"
    assert took < CONNECT_TIMEOUT_S + 15, f"the stream took {took:.0f} s to get past the vanished host"


async def test_a_hung_primary_is_left_for_the_promoted_standby_after_the_query_timeout(
    async_pair: ReplicatedPair, kafka_bootstrap: str, tmp_path: Path
) -> None:
    # A primary that hangs with its host up (stopped processes, a stuck storage): the
    # kernel acknowledges every byte, so neither keepalives nor tcp_user_timeout end
    # the relay's connections; only the relay's own deadline on answers does.
    topic = await kafka_topic(kafka_bootstrap)
    config = relay_config(tmp_path, async_pair.dsn, kafka_bootstrap, topic)
    tree = yaml.safe_load(config.read_text())
    tree["database"]["query_timeout"] = "5s"
    config.write_text(yaml.safe_dump(tree))
    relay = RelayProcess(config)
    ledger = Ledger()
    try:
        ledger.committed.update(enqueue_numbered(async_pair.primary.dsn, topic, 0, 100))
        wait_for(lambda: not pending(async_pair.primary.dsn), 60, "the first messages dispatched")
        wait_for(async_pair.caught_up, 30, "the standby holding all of it")
        async_pair.freeze_primary()
        try:
            async_pair.promote()
            ledger.committed.update(enqueue_numbered(async_pair.standby.dsn, topic, 100, 100))
            wait_for(
                lambda: not pending(async_pair.standby.dsn), 120, "the relay dispatching from the promoted standby"
            )
            assert logged(relay, "database_no_answer"), "the relay gave its connections to the hung primary up"
            assert relay.terminate() == 0
        finally:
            async_pair.kill_primary()
    finally:
        relay.close()
    received = await kafka_read_to_end(kafka_bootstrap, topic, isolation_level="read_uncommitted")
    check_delivery(received, ledger, max_duplicates=BATCH * WORKERS)
