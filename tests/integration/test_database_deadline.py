"""A database that stops answering without closing anything: a hung server, or a network
that swallows data (a toxiproxy black hole: no reset, no data, the proxy's kernel still
acknowledging, so neither keepalives nor tcp_user_timeout end the connection). The
relay gives such a connection up after `database.query_timeout` and connects again, to
whichever host of its DSN answers (connections.py, AnswerDeadline)."""

from __future__ import annotations

import json

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from structlog.testing import capture_logs

from outbox_relay import enqueue
from outbox_relay.config import Config
from outbox_relay.demo import local_postgres
from outbox_relay.operations import schema_manager
from outbox_relay.testing import FakeAdapter
from tests.support.configs import make_config
from tests.support.relay import running_relay
from tests.support.toxiproxy import MakeProxy
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow


def enqueue_numbered(dsn: str, first: int, count: int) -> set[str]:
    with psycopg.connect(dsn) as conn:
        return {str(enqueue(conn, "t", {"n": n}, key="k")) for n in range(first, first + count)}


def with_query_timeout(config: Config, seconds: float) -> Config:
    return config.model_copy(update={"database": config.database.model_copy(update={"query_timeout": seconds})})


async def test_a_black_holed_database_connection_is_given_up_and_the_next_host_used(db: str, proxy: MakeProxy) -> None:
    server = conninfo_to_dict(db)
    through = proxy(f"127.0.0.1:{server.get('port', 5432)}")
    # First host: the proxy; second: the same server directly (as a failover's new
    # primary would be). libpq keeps the first host that answers.
    dsn = make_conninfo(db, host="127.0.0.1,127.0.0.1", port=f"{through.port},{server.get('port', 5432)}")
    fake = FakeAdapter()
    config = with_query_timeout(make_config(dsn, workers=2, batch_size=10), 2.0)
    async with running_relay(config, {"main": fake}):
        before = enqueue_numbered(db, 0, 20)
        await wait_until(lambda: before <= set(fake.delivered_ids), timeout=30)
        with through.black_holed():
            # Every connection the relay holds goes through the proxy and now waits for
            # an answer that never comes; only giving them up reaches the second host.
            after = enqueue_numbered(db, 20, 20)
            await wait_until(lambda: after <= set(fake.delivered_ids), timeout=90)
    firsts: list[int] = []
    for out in fake.delivered:
        n = json.loads(out.message.payload)["n"]
        if n not in firsts:
            firsts.append(n)
    assert firsts == list(range(40)), "the key's messages first delivered in order across the reconnect"


def relay_backends(dsn: str) -> list[tuple[int, str | None]]:
    """(pid, wait_event_type) of the relay's server sessions, the LISTEN one aside."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid, wait_event_type FROM pg_stat_activity"
            " WHERE application_name = 'outbox-relay' AND query NOT LIKE 'LISTEN%%'"
            " AND query NOT LIKE '%%skipped%%'"
        ).fetchall()
    return [(int(pid), wait) for pid, wait in rows]


@pytest.mark.timeout(300)
async def test_a_slow_server_ends_the_statement_itself_so_no_waiting_backend_is_left_behind(db: str) -> None:
    # A healthy server that is slow to answer (a lock held by a migration) must not be
    # given up client-side only: the backend would go on waiting, one more each query_timeout, until
    # max_connections ran out. The batch's statement_timeout ends it server-side first.
    fake = FakeAdapter()
    config = with_query_timeout(make_config(db, workers=2, batch_size=10), 2.0)
    async with running_relay(config, {"main": fake}):
        first = enqueue_numbered(db, 0, 1)
        await wait_until(lambda: first <= set(fake.delivered_ids), timeout=30)
        seen: set[int] = set()
        # An async connection: the lock waits for a batch the relay has open, and the
        # relay can only end it if this test does not block the event loop meanwhile.
        async with await psycopg.AsyncConnection.connect(db) as locker:
            await locker.execute("LOCK TABLE outbox.messages IN ACCESS EXCLUSIVE MODE")

            def reconnected_several_times() -> bool:
                seen.update(pid for pid, _ in relay_backends(db))
                return len(seen) >= 10  # 2 workers, each given up four times or more

            await wait_until(reconnected_several_times, timeout=180)
            waiting = [pid for pid, wait in relay_backends(db) if wait == "Lock"]
            # The workers' current sessions, and one more of the relay's that reads the
            # table and simply waits (the pending gauge's count); each session given up
            # and left waiting would add one (8 or more here before the fix).
            assert len(waiting) <= 3, f"backends left waiting on the lock: {len(waiting)} (workers: 2)"
            await locker.rollback()
        after = enqueue_numbered(db, 1, 5)
        await wait_until(lambda: after <= set(fake.delivered_ids), timeout=60)


def sync_rep_waiters(dsn: str, query: str | None = None) -> list[int]:
    """Server sessions whose commit waits for a synchronous standby (running `query`:
    a batch's COMMIT, not the heartbeat's autocommit INSERT)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE wait_event = 'SyncRep' AND (%s::text IS NULL OR query = %s)",
            (query, query),
        ).fetchall()
    return [int(pid) for (pid,) in rows]


@pytest.mark.timeout(300)
async def test_a_commit_waiting_for_a_synchronous_standby_that_is_down_leaves_no_backend_behind() -> None:
    # A server of its own whose synchronous_standby_names names a standby that never
    # connects: every COMMIT that wrote waits for it, as when a pair's synchronous
    # standby is down. statement_timeout does not end that wait (PostgreSQL turns it
    # off before it commits), so a connection given up client-side only left its
    # backend waiting, and the batch's rows locked, for good; the cancel the relay
    # sends when it gives a connection up ends it (connections.py, AnswerDeadline).
    # The test's own sessions commit with synchronous_commit=local: they do not wait.
    local = "-c synchronous_commit=local"
    with local_postgres.running({"synchronous_standby_names": "nobody"}) as cluster:
        with psycopg.connect(cluster.dsn, options=local) as conn:
            schema_manager.install(conn, "outbox")
        published = enqueue_numbered(make_conninfo(cluster.dsn, options=local), 0, 5)
        fake = FakeAdapter()
        config = with_query_timeout(make_config(cluster.dsn, workers=2, batch_size=10), 2.0)
        async with running_relay(config, {"main": fake}):
            await wait_until(lambda: published <= set(fake.delivered_ids), timeout=30)
            # The batch's marks are written; its COMMIT waits for the standby.
            await wait_until(lambda: bool(sync_rep_waiters(cluster.dsn, "COMMIT")), timeout=30, interval=0.2)
            # Given up after query_timeout (2 s) and cancelled: the backend commits
            # locally, finds its client gone and ends. Without the cancel it waited on.
            await wait_until(lambda: not sync_rep_waiters(cluster.dsn), timeout=60, interval=0.2)
        # Stopped (its last write, the heartbeat row's removal, waits too, and is
        # cancelled before the process would exit): nothing of the relay left waiting.
        await wait_until(lambda: not sync_rep_waiters(cluster.dsn), timeout=30, interval=0.2)
        assert len(fake.delivered) == 5, "published once: the cancelled COMMIT was not rolled back and redone"
        with psycopg.connect(cluster.dsn, options=local) as conn:
            row = conn.execute("SELECT count(*) FROM outbox.messages WHERE dispatched_at IS NOT NULL").fetchone()
        assert row is not None and row[0] == 5, "the cancelled COMMIT committed locally: its acked rows are marked"


@pytest.mark.timeout(120)
async def test_a_pending_count_slower_than_the_deadline_is_skipped_and_the_maintenance_connection_kept(
    db: str,
) -> None:
    # The pending gauge counts the backlog, which on a very large one can take longer
    # than query_timeout. The server ends the count (at half query_timeout) and the gauge
    # is skipped that once; the connection stays, so the heartbeat, the watchdog and
    # retention after it go on. Given up client-side instead, the maintenance
    # connection was lost every cycle, before retention's turn. A lock stands in for
    # the slow count (with a day's retention, its next turn is a minute away: the lock
    # does not reach it).
    config = with_query_timeout(make_config(db, workers=1, retention="24h"), 2.0)
    with capture_logs() as logs:
        async with running_relay(config, {"main": FakeAdapter()}, heartbeat_every=0.2):
            # The first round (heartbeat, gauge, then retention's first turn) is over
            # once the heartbeat comes round again.
            beats: set[object] = set()

            def second_heartbeat() -> bool:
                with psycopg.connect(db) as conn:
                    beats.update(row[0] for row in conn.execute("SELECT heartbeat_at FROM outbox.relays"))
                return len(beats) >= 2

            await wait_until(second_heartbeat, timeout=30, interval=0.1)
            # Async: the lock may wait for a worker's (empty) claim, which needs the loop.
            async with await psycopg.AsyncConnection.connect(db) as locker:
                await locker.execute("LOCK TABLE outbox.messages IN ACCESS EXCLUSIVE MODE")
                await wait_until(
                    lambda: sum(e["event"] == "pending_gauge_skipped" for e in logs) >= 2, timeout=60, interval=0.2
                )
                await locker.rollback()
    lost = [e for e in logs if e["event"] == "maintenance_connection_lost"]
    assert not lost, f"the maintenance connection was given up: {lost[:1]}"
