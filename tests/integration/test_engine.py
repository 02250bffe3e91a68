"""The relay engine against a real PostgreSQL, with the in-memory FakeAdapter as broker."""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest

from outbox_relay import enqueue, enqueue_async
from outbox_relay.engine.store import OutboxStore
from outbox_relay.models import OutgoingMessage, PublishResult, Record, RecordKind
from outbox_relay.operations import dead_letters
from outbox_relay.sqlfiles import Queries
from outbox_relay.testing import FakeAdapter
from tests.support.configs import make_config
from tests.support.outbox import claims_in_progress, count
from tests.support.relay import running_relay, wakeups
from tests.support.toxiproxy import MakeProxy
from tests.support.waiting import wait_until


def rows(dsn: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(query, args).fetchall()  # type: ignore[arg-type]


def enqueue_many(dsn: str, items: list[tuple[str, str | None, Any]]) -> list[str]:
    with psycopg.connect(dsn) as conn:
        ids = [str(enqueue(conn, topic, payload, key=key)) for topic, key, payload in items]
        conn.commit()
    return ids


async def test_acked_messages_are_marked_dispatched(db: str) -> None:
    ids = enqueue_many(db, [("orders.created", None, {"n": i}) for i in range(10)])
    fake = FakeAdapter()
    async with running_relay(make_config(db), {"main": fake}):
        await wait_until(lambda: count(db, "dispatched_at IS NOT NULL") == 10)
    assert sorted(fake.delivered_ids) == sorted(ids)
    assert count(db, "attempts = 1 AND dispatched_at IS NOT NULL") == 10


async def test_a_batch_is_published_in_one_call_not_one_per_message(db: str) -> None:
    enqueue_many(db, [("t", None, i) for i in range(200)])
    fake = FakeAdapter()
    async with running_relay(make_config(db, batch_size=200, workers=1), {"main": fake}):
        await wait_until(lambda: len(fake.delivered) == 200)
    assert fake.calls[0] == 200


async def test_partial_batch_success_marks_only_acked_rows(db: str) -> None:
    ids = enqueue_many(db, [("t", None, i) for i in range(6)])
    failing = set(ids[::2])

    def script(out: OutgoingMessage) -> PublishResult | None:
        return PublishResult.transient("boom") if str(out.message_id) in failing else None

    fake = FakeAdapter(script=script)
    cfg = make_config(db, workers=1, retry={"initial": "30s", "max": "60s"})
    async with running_relay(cfg, {"main": fake}):
        await wait_until(lambda: count(db, "attempts > 0") == 6)
    assert count(db, "dispatched_at IS NOT NULL") == 3
    failed = rows(
        db,
        "SELECT message_id::text, last_error, next_attempt_at > now() FROM outbox.messages WHERE dispatched_at IS NULL",
    )
    assert {r[0] for r in failed} == failing
    assert all(r[1] == "boom" and r[2] for r in failed)


async def test_transient_failures_are_retried_until_they_succeed(db: str) -> None:
    [mid] = enqueue_many(db, [("t", "k", {"x": 1})])
    answers = iter([PublishResult.transient("e1"), PublishResult.transient("e2")])
    fake = FakeAdapter(script=lambda out: next(answers, None))
    async with running_relay(make_config(db), {"main": fake}):
        await wait_until(lambda: count(db, "dispatched_at IS NOT NULL") == 1)
    assert fake.delivered_ids == [mid]
    assert rows(db, "SELECT attempts, last_error FROM outbox.messages")[0] == (3, "e2")


async def test_permanent_failure_is_dead_lettered_with_reason(db: str) -> None:
    enqueue_many(db, [("t", None, 1)])
    fake = FakeAdapter(script=lambda out: PublishResult.permanent("message too large"))
    async with running_relay(make_config(db), {"main": fake}):
        await wait_until(lambda: count(db, "dead_lettered_at IS NOT NULL") == 1)
    assert rows(db, "SELECT dead_letter_reason, attempts FROM outbox.messages")[0] == ("message too large", 1)


async def test_max_attempts_dead_letters_a_message(db: str) -> None:
    enqueue_many(db, [("t", None, 1)])
    fake = FakeAdapter(script=lambda out: PublishResult.transient("still down"))
    cfg = make_config(db, max_attempts=3, retry={"initial": "10ms", "max": "20ms"})
    async with running_relay(cfg, {"main": fake}):
        await wait_until(lambda: count(db, "dead_lettered_at IS NOT NULL") == 1)
    reason, attempts = rows(db, "SELECT dead_letter_reason, attempts FROM outbox.messages")[0]
    assert attempts == 3
    assert reason == "max attempts (3) reached; last error: still down"


async def test_unavailable_broker_spends_no_attempts(db: str) -> None:
    enqueue_many(db, [("t", None, 1)])
    down = {"yes": True}
    fake = FakeAdapter(script=lambda out: PublishResult.unavailable("refused") if down["yes"] else None)
    cfg = make_config(db, max_attempts=2, retry={"initial": "10ms", "max": "50ms"})
    async with running_relay(cfg, {"main": fake}):
        await wait_until(lambda: len(fake.calls) >= 6)
        assert count(db, "dead_lettered_at IS NOT NULL") == 0
        down["yes"] = False
        await wait_until(lambda: count(db, "dispatched_at IS NOT NULL") == 1)
    assert rows(db, "SELECT attempts FROM outbox.messages")[0][0] == 1


async def test_no_route_is_dead_lettered_not_dropped(db: str) -> None:
    enqueue_many(db, [("orders.created", None, 1), ("billing.paid", None, 2)])
    fake = FakeAdapter()
    cfg = make_config(db, routes=[{"topic": "orders.*", "broker": "main"}])
    async with running_relay(cfg, {"main": fake}):
        await wait_until(lambda: count(db, "dispatched_at IS NOT NULL OR dead_lettered_at IS NOT NULL") == 2)
    assert rows(db, "SELECT topic, dead_letter_reason FROM outbox.messages WHERE dead_lettered_at IS NOT NULL") == [
        ("billing.paid", "no route")
    ]


async def test_route_destination_reaches_the_adapter(db: str) -> None:
    enqueue_many(db, [("orders.created", None, 1), ("other", None, 2)])
    fake = FakeAdapter()
    cfg = make_config(
        db, routes=[{"topic": "orders.*", "broker": "main", "destination": "orders"}, {"topic": "*", "broker": "main"}]
    )
    async with running_relay(cfg, {"main": fake}):
        await wait_until(lambda: len(fake.delivered) == 2)
    assert {(o.message.topic, o.destination) for o in fake.delivered} == {
        ("orders.created", "orders"),
        ("other", "other"),
    }


async def test_notify_wakes_an_idle_relay_well_inside_the_poll_interval(db: str) -> None:
    fake = FakeAdapter()
    async with running_relay(make_config(db, poll_interval="30s"), {"main": fake}) as relay:
        await wait_until(lambda: relay._listener.connected)
        # The positive signal: every worker has woken for the listener's first wake-up and
        # claimed what there was (nothing); from now on each waits on its wake-up, idle.
        await wait_until(lambda: wakeups(relay, "notify") >= relay.config.relay.workers)
        started = time.monotonic()
        async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn, conn.transaction():
            await enqueue_async(conn, "t", {"hello": 1})
        await wait_until(lambda: len(fake.delivered) == 1, timeout=10)
        elapsed = time.monotonic() - started
    assert elapsed < 5.0, f"took {elapsed:.2f}s with a 30s poll interval"
    assert wakeups(relay, "notify") >= 1


async def test_poll_finds_messages_with_notify_off(db: str) -> None:
    with psycopg.connect(db) as conn:
        conn.execute("ALTER TABLE outbox.messages DISABLE TRIGGER messages_notify_relay")
        conn.commit()
    fake = FakeAdapter()
    config = make_config(db, notify=False, poll_interval="1s", workers=1)
    async with running_relay(config, {"main": fake}) as relay:
        # The positive signal: the relay is idle, woken by its poll (its first claim is
        # behind it) and waiting for the next one: no claim in progress, the count the
        # same before and after that was seen. A claim of the poll counted in `before`
        # still running would find the message without a poll after the enqueue.
        await wait_until(lambda: wakeups(relay, "poll") >= 1)

        def waiting() -> bool:
            seen = wakeups(relay, "poll")
            return not claims_in_progress(db) and wakeups(relay, "poll") == seen

        await wait_until(waiting)
        before = wakeups(relay, "poll")
        enqueue_many(db, [("t", None, 1)])
        await wait_until(lambda: len(fake.delivered) == 1, timeout=10)
    assert wakeups(relay, "notify") == 0
    assert wakeups(relay, "poll") > before  # found by a poll after the enqueue


async def test_lost_listen_connection_is_restored(db: str) -> None:
    fake = FakeAdapter()
    async with running_relay(make_config(db, poll_interval="30s"), {"main": fake}) as relay:
        await wait_until(lambda: relay._listener.connected)
        with psycopg.connect(db, autocommit=True) as conn:
            killed = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                # The listener's last statement: LISTEN, or its watch of skipped NOTIFYs.
                "AND (query ILIKE 'LISTEN%%' OR query ILIKE '%%skipped_wakeups()%%')"
            ).fetchall()
        assert killed, "no LISTEN connection found"
        await wait_until(lambda: not relay._listener.connected, timeout=5)
        # The positive signal: `connected` is set once LISTEN has run on the new connection.
        await wait_until(lambda: relay._listener.connected, timeout=10)
        enqueue_many(db, [("t", None, 1)])
        await wait_until(lambda: len(fake.delivered) == 1, timeout=5)


def _per_key_order_holds(delivered: list[OutgoingMessage]) -> dict[str, list[int]]:
    """First-delivery sequence per key, as payload numbers."""
    first: dict[str, list[int]] = defaultdict(list)
    seen: set[str] = set()
    for out in delivered:
        mid = str(out.message_id)
        if mid in seen or out.message.key is None:
            continue
        seen.add(mid)
        first[out.message.key].append(int(out.message.payload))
    return first


@pytest.mark.parametrize("keeps_key_order", [False, True], ids=["waves", "pipelined runs"])
async def test_per_key_order_with_concurrent_writers_and_injected_failures(db: str, keeps_key_order: bool) -> None:
    rng = random.Random(7)
    failures = {"n": 0}

    def flaky(out: OutgoingMessage) -> PublishResult | None:
        if rng.random() < 0.2:
            failures["n"] += 1
            return PublishResult.transient("injected")
        return None

    fake = FakeAdapter(script=flaky, keeps_key_order=keeps_key_order)
    keys = [f"k{i}" for i in range(8)]
    per_writer = 60
    cfg = make_config(db, batch_size=50, workers=3, max_attempts=1000, retry={"initial": "5ms", "max": "20ms"})

    async def writer(key: str) -> None:
        # One writer per key: writes to one key are serialized, the documented precondition.
        async with await psycopg.AsyncConnection.connect(db) as conn:
            for n in range(per_writer):
                await enqueue_async(conn, "t", str(n).encode(), key=key)
                await conn.commit()
                if n % 10 == 0:
                    await asyncio.sleep(0.01)  # pacing: the relay claims while the writers write

    async with running_relay(cfg, {"main": fake}):
        await asyncio.gather(*(writer(k) for k in keys))
        await wait_until(lambda: count(db, "dispatched_at IS NOT NULL") == len(keys) * per_writer, timeout=60)
    first = _per_key_order_holds(fake.delivered)
    assert failures["n"] > 10
    assert set(first) == set(keys)
    for key in keys:
        assert first[key] == list(range(per_writer)), f"order broken for {key}"


async def test_a_failing_message_holds_back_only_its_own_key(db: str) -> None:
    enqueue_many(db, [("t", "bad", b"0"), ("t", "bad", b"1"), ("t", "good", b"0"), ("t", "good", b"1")])
    fake = FakeAdapter(
        script=lambda out: (
            PublishResult.transient("down") if out.message.key == "bad" and out.message.payload == b"0" else None
        )
    )
    async with running_relay(make_config(db, max_attempts=1000), {"main": fake}):
        await wait_until(lambda: len(fake.delivered) == 2)
        # The positive signal: "bad"/0 has failed several times over, each time a chance
        # for "bad"/1 to be (wrongly) sent.
        await wait_until(lambda: count(db, "key = 'bad' AND payload = '0' AND attempts >= 3") == 1, timeout=30)
    assert [(o.message.key, o.message.payload) for o in fake.delivered] == [("good", b"0"), ("good", b"1")]
    assert count(db, "key = 'bad' AND dispatched_at IS NULL") == 2
    assert count(db, "key = 'bad' AND payload = '1' AND attempts = 0") == 1


@pytest.mark.parametrize("policy", ["release", "hold"])
async def test_dead_letter_policy_for_later_messages_of_the_key(db: str, policy: str) -> None:
    enqueue_many(db, [("t", "k", b"poison"), ("t", "k", b"next"), ("t", "other", b"x")])
    fake = FakeAdapter(
        script=lambda out: PublishResult.permanent("too large") if out.message.payload == b"poison" else None
    )
    async with running_relay(make_config(db, dead_letter_policy=policy), {"main": fake}) as relay:
        await wait_until(lambda: count(db, "dead_lettered_at IS NOT NULL") == 1)
        await wait_until(lambda: any(o.message.key == "other" for o in fake.delivered))
        if policy == "release":
            await wait_until(lambda: b"next" in [o.message.payload for o in fake.delivered])
            assert [o.message.payload for o in fake.delivered].count(b"next") == 1
        else:
            # The positive signal: workers woke and claimed several times since the dead
            # letter, each a chance to (wrongly) send "next".
            polls = wakeups(relay, "poll")
            await wait_until(lambda: wakeups(relay, "poll") >= polls + 3, timeout=30)
            assert b"next" not in [o.message.payload for o in fake.delivered]
            # Requeue the poison message with the product's own requeue: the key resumes in order.
            fake.script = None
            with psycopg.connect(db) as conn:
                assert len(dead_letters.requeue(conn, "outbox", dead_letters.Selection(everything=True))) == 1
            await wait_until(lambda: b"next" in [o.message.payload for o in fake.delivered])
            payloads = [o.message.payload for o in fake.delivered if o.message.key == "k"]
            assert payloads == [b"poison", b"next"]


async def test_followers_let_a_busy_key_move_many_messages_per_batch(db: str) -> None:
    enqueue_many(db, [("t", "hot", str(i).encode()) for i in range(100)])
    fake = FakeAdapter()
    async with running_relay(make_config(db, batch_size=100, workers=1), {"main": fake}):
        await wait_until(lambda: len(fake.delivered) == 100)
    # One claim took all 100 (head + 99 followers); they went out as 100 one-message waves.
    assert count(db, "dispatched_at IS NOT NULL") == 100
    assert [int(o.message.payload) for o in fake.delivered] == list(range(100))
    assert len(fake.calls) == 100 and set(fake.calls) == {1}


async def test_two_relays_never_publish_the_same_message(db: str) -> None:
    enqueue_many(db, [("t", f"k{i % 20}" if i % 3 else None, i) for i in range(600)])
    a, b = FakeAdapter(delay=0.01), FakeAdapter(delay=0.01)
    cfg = make_config(db, batch_size=25, workers=2)
    async with running_relay(cfg, {"main": a}), running_relay(cfg, {"main": b}):
        await wait_until(lambda: count(db, "dispatched_at IS NOT NULL") == 600, timeout=60)
    ids = a.delivered_ids + b.delivered_ids
    assert len(ids) == 600 and len(set(ids)) == 600
    assert a.delivered and b.delivered, "both relays should have taken a share"


async def test_graceful_stop_finishes_the_in_flight_batch(db: str) -> None:
    enqueue_many(db, [("t", None, i) for i in range(5)])
    fake = FakeAdapter(delay=1.0)
    async with running_relay(make_config(db, workers=1), {"main": fake}) as relay:
        await wait_until(lambda: relay.in_flight == 5)
        relay.stop()
    assert len(fake.delivered) == 5
    assert count(db, "dispatched_at IS NOT NULL") == 5


async def test_shutdown_timeout_releases_the_in_flight_batch(db: str) -> None:
    enqueue_many(db, [("t", None, i) for i in range(5)])
    fake = FakeAdapter(delay=30.0)
    started = time.monotonic()
    async with running_relay(make_config(db, workers=1, shutdown_timeout="500ms"), {"main": fake}) as relay:
        await wait_until(lambda: relay.in_flight == 5)
        relay.stop()
    assert time.monotonic() - started < 15
    # Rolled back: nothing marked, and the rows are claimable at once by another relay.
    assert count(db, "dispatched_at IS NULL AND attempts = 0") == 5
    other = FakeAdapter()
    async with running_relay(make_config(db), {"main": other}):
        await wait_until(lambda: len(other.delivered) == 5, timeout=10)


async def test_retention_deletes_dispatched_rows_after_the_retention_period(db: str) -> None:
    enqueue_many(db, [("t", None, i) for i in range(30)])
    fake = FakeAdapter(script=lambda out: PublishResult.permanent("x") if out.message.payload == b"0" else None)
    async with running_relay(make_config(db, retention="1s"), {"main": fake}, heartbeat_every=0.2):
        await wait_until(lambda: len(fake.delivered) == 29)
        await wait_until(lambda: count(db, "true") == 1, timeout=15)
    # The dead letter is kept: retention only removes dispatched rows.
    assert count(db, "dead_lettered_at IS NOT NULL") == 1


async def deleted_and_updated_in_this_transaction(conn: psycopg.AsyncConnection[Any]) -> tuple[int, int]:
    """Rows of the outbox deleted and updated by the connection's open transaction."""
    cur = await conn.execute(
        "SELECT n_tup_del, n_tup_upd FROM pg_stat_xact_user_tables WHERE relid = 'outbox.messages'::regclass"
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


async def test_zero_retention_deletes_acked_rows_in_the_statement_that_marks_them(db: str) -> None:
    # relay.retention 0s keeps nothing to replay: the mark deletes the acked rows instead
    # of writing a new version of each (about 40 % of PostgreSQL's work per message,
    # keyless). Counted in the batch's own transaction (pg_stat_xact_user_tables), so a
    # retention job deleting them later could not pass for it.
    enqueue_many(db, [("t", None, i) for i in range(30)])
    store = OutboxStore(Queries("outbox"), hold_dead_letters=False, keep_dispatched=False)
    async with await psycopg.AsyncConnection.connect(db) as conn, conn.transaction():
        messages = (await store.claim(conn, 100)).messages
        assert len(messages) == 30
        records = [
            Record(m.id, RecordKind.DEAD, "refused")
            if m.payload == b"0"
            else Record(m.id, RecordKind.RETRY, "later", 60.0)
            if m.payload == b"1"
            else Record(m.id, RecordKind.ACKED)
            for m in messages
        ]
        await store.record(conn, records)
        # The acked deleted; the dead letter and the retry updated.
        assert await deleted_and_updated_in_this_transaction(conn) == (28, 2)
    assert count(db, "true") == 2
    assert count(db, "dead_lettered_at IS NOT NULL") == 1
    assert count(db, "dispatched_at IS NULL AND dead_lettered_at IS NULL AND attempts = 1") == 1
    # The default (retention above 0) marks them: a new version of each row, none deleted.
    enqueue_many(db, [("t", None, i) for i in range(2, 12)])
    store = OutboxStore(Queries("outbox"), hold_dead_letters=False)
    async with await psycopg.AsyncConnection.connect(db) as conn, conn.transaction():
        messages = (await store.claim(conn, 100)).messages
        assert len(messages) == 10
        await store.record(conn, [Record(m.id, RecordKind.ACKED) for m in messages])
        assert await deleted_and_updated_in_this_transaction(conn) == (0, 10)
    assert count(db, "dispatched_at IS NOT NULL") == 10


async def test_a_relay_with_zero_retention_leaves_only_its_dead_letters(db: str) -> None:
    enqueue_many(db, [("t", None, i) for i in range(30)])
    fake = FakeAdapter(script=lambda out: PublishResult.permanent("x") if out.message.payload == b"0" else None)
    async with running_relay(make_config(db, retention="0s"), {"main": fake}):
        await wait_until(lambda: len(fake.delivered) == 29)
        await wait_until(lambda: count(db, "true") == 1, timeout=15)
    assert count(db, "dead_lettered_at IS NOT NULL") == 1


async def test_heartbeat_reports_the_relay_and_its_in_flight_count(db: str) -> None:
    enqueue_many(db, [("t", None, i) for i in range(3)])
    fake = FakeAdapter(delay=2.0)
    async with running_relay(make_config(db, workers=1), {"main": fake}, heartbeat_every=0.1) as relay:
        await wait_until(
            lambda: rows(db, "SELECT in_flight FROM outbox.relays WHERE relay_id = %s", relay.relay_id) == [(3,)],
            timeout=10,
        )
    assert rows(db, "SELECT count(*) FROM outbox.relays")[0][0] == 0, "a stopped relay removes its row"


async def test_relay_waits_for_a_database_that_is_down_at_start(db: str, proxy: MakeProxy) -> None:
    # The database is unreachable when the relay starts (a proxy refusing connections):
    # it keeps retrying, logging each failure, and starts and relays once it is back.
    from psycopg.conninfo import conninfo_to_dict, make_conninfo
    from structlog.testing import capture_logs

    from outbox_relay.engine.relay import Relay

    params = conninfo_to_dict(db)
    server = proxy(f"{params.get('host') or '127.0.0.1'}:{params.get('port') or 5432}")
    server.disable()
    fake = FakeAdapter()
    relay = Relay(make_config(make_conninfo(db, host="127.0.0.1", port=str(server.port))), {"main": fake})
    with capture_logs() as logs:
        task = asyncio.create_task(relay.run())
        try:
            await wait_until(lambda: sum(e["event"] == "database_unreachable" for e in logs) >= 2, timeout=30)
            assert not relay.started.is_set() and not task.done(), "the relay keeps retrying, not giving up"
            # Meanwhile the health port answers: alive (waiting for the database is no
            # reason for a restart), not ready.
            import httpx

            assert relay.http is not None
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{relay.http.port}") as client:
                assert (await client.get("/livez")).status_code == 200
                assert (await client.get("/readyz")).status_code == 503
            server.enable()
            await asyncio.wait_for(relay.started.wait(), timeout=30)
            enqueue_many(db, [("t", None, 1)])
            await wait_until(lambda: len(fake.delivered) == 1, timeout=10)
        finally:
            relay.stop()
            await asyncio.wait_for(task, timeout=30)  # ends cleanly: nothing left running


async def test_missing_schema_stops_the_relay_with_a_clear_error(empty_db: str) -> None:
    from outbox_relay.errors import SchemaError

    with pytest.raises(SchemaError, match="outbox-relay schema install"):
        async with running_relay(make_config(empty_db), {"main": FakeAdapter()}):
            pass


async def test_a_long_run_of_one_key_is_spread_over_batches(db: str) -> None:
    # Waves of one key go out one after another while the claiming transaction waits:
    # a batch stops starting waves after publish_timeout, so the session never idles in
    # its transaction long enough for Postgres to end it.
    enqueue_many(db, [("t", "hot", str(i).encode()) for i in range(40)])
    fake = FakeAdapter(delay=0.05)
    async with running_relay(
        make_config(db, batch_size=100, workers=1, publish_timeout="300ms"), {"main": fake}
    ) as relay:
        await wait_until(lambda: count(db, "dispatched_at IS NOT NULL") == 40, timeout=30)
        batches = relay.metrics.registry.get_sample_value("outbox_relay_batch_size_count")
    assert [int(o.message.payload) for o in fake.delivered] == list(range(40))
    assert batches is not None and batches >= 4, batches
    assert count(db, "attempts = 1") == 40, "waves not started were left unattempted, not failed"


@pytest.mark.parametrize("level", ["repeatable read", "serializable"])
async def test_claims_run_read_committed_whatever_the_database_default(admin_dsn: str, db: str, level: str) -> None:
    # A database whose default isolation is stricter: claims racing over the same keys
    # would fail with serialization errors and reconnect, were the relay to inherit it.
    from psycopg import sql
    from structlog.testing import capture_logs

    dbname = psycopg.conninfo.conninfo_to_dict(db)["dbname"]
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(
            sql.SQL("ALTER DATABASE {} SET default_transaction_isolation = {}").format(
                sql.Identifier(str(dbname)), sql.Literal(level)
            )
        )
    enqueue_many(db, [("t", f"k{i % 10}", {"i": i}) for i in range(300)])
    fake = FakeAdapter(keeps_key_order=True)
    cfg = make_config(db, batch_size=20, workers=3)
    with capture_logs() as logs:
        async with running_relay(cfg, {"main": fake}):
            await wait_until(lambda: count(db, "dispatched_at IS NOT NULL") == 300, timeout=60)
    assert [e for e in logs if e["event"] == "database_connection_lost"] == []
    assert len(fake.delivered) == 300, "each message once: no batch rolled back and sent again"


@pytest.mark.parametrize("holder", ["rolls back", "commits"])
async def test_a_committer_that_skipped_its_notify_is_still_claimed_within_a_second(db: str, holder: str) -> None:
    # T1 takes the notifying lock early (SET CONSTRAINTS ALL IMMEDIATE fires the deferred
    # trigger now) and holds it; T2 commits meanwhile and skips its NOTIFY, counting the
    # skip; then T1 rolls back (no notification at all) or commits. With a 30 s poll,
    # T2's message must still go out within a second.
    fake = FakeAdapter()
    async with running_relay(make_config(db, poll_interval="30s"), {"main": fake}) as relay:
        await wait_until(lambda: relay._listener.connected, timeout=10)
        with psycopg.connect(db) as t1, psycopg.connect(db) as t2:
            enqueue(t1, "t", {"from": "t1"})
            t1.execute("SET CONSTRAINTS ALL IMMEDIATE")
            before = t2.execute("SELECT outbox.skipped_wakeups()").fetchone()
            t2.commit()
            enqueue(t2, "t", {"from": "t2"})
            t2.commit()
            committed = time.monotonic()
            after = t2.execute("SELECT outbox.skipped_wakeups()").fetchone()
            t2.commit()
            assert before is not None and after is not None and after[0] == before[0] + 1, "T2 skipped its NOTIFY"
            if holder == "rolls back":
                t1.rollback()
            else:
                t1.commit()
            await wait_until(lambda: any(b'"t2"' in o.message.payload for o in fake.delivered), timeout=5)
            took = time.monotonic() - committed
    assert took < 1.0, f"T2's message waited {took:.2f}s"


async def test_prepare_threshold_null_means_no_server_side_prepared_statements(db: str) -> None:
    # Behind a pooler in transaction mode a prepared statement would be missing on the
    # next transaction's server session (InvalidSqlStatementName): the relay must be
    # able to run without any.
    enqueue_many(db, [("t", f"k{i % 3}", {"i": i}) for i in range(60)])
    fake = FakeAdapter(keeps_key_order=True)
    config = make_config(db, batch_size=10)
    config = config.model_copy(update={"database": config.database.model_copy(update={"prepare_threshold": None})})
    async with running_relay(config, {"main": fake}) as relay:
        await wait_until(lambda: count(db, "dispatched_at IS NOT NULL") == 60, timeout=30)
        conn = await relay.table._connect_worker()
        try:
            assert conn.prepare_threshold is None
            for _ in range(10):  # what the claim runs, again and again, as a worker does
                async with conn.transaction():
                    await relay.table.store.claim(conn, 10)
            cur = await conn.execute("SELECT count(*) FROM pg_prepared_statements")
            assert await cur.fetchone() == (0,)
        finally:
            await conn.close()


# What a batch sets for its transaction; read with current_setting on the worker's connection.
BATCH_SETTINGS = (
    "SELECT current_setting('enable_seqscan'), current_setting('enable_bitmapscan'), current_setting('jit'),"
    " current_setting('max_parallel_workers_per_gather'), current_setting('idle_in_transaction_session_timeout')"
)


async def read_settings(conn: psycopg.AsyncConnection[Any]) -> tuple[Any, ...]:
    row = await (await conn.execute(BATCH_SETTINGS)).fetchone()
    assert row is not None
    return tuple(row)


@dataclass
class SettingsReader(FakeAdapter):
    """Reads the worker's settings from inside its batch's transaction (publish runs
    while the batch's transaction is open on `conn`, between its statements)."""

    conn: psycopg.AsyncConnection[Any] | None = None
    seen: list[tuple[Any, ...]] = field(default_factory=list)

    async def publish(self, batch: Sequence[OutgoingMessage]) -> Sequence[PublishResult]:
        assert self.conn is not None
        self.seen.append(await read_settings(self.conn))
        return await super().publish(batch)


async def settings_around_a_batch(db: str, **settings: Any) -> tuple[tuple[Any, ...], ...]:
    """(server defaults, worker session before its batch, inside the batch, after it):
    one batch of a real worker session, claimed, published and recorded."""
    from outbox_relay.engine.relay import Relay

    async with await psycopg.AsyncConnection.connect(db) as plain:
        defaults = await read_settings(plain)
    enqueue_many(db, [("t", "k", {"n": 1})])
    reader = SettingsReader()
    relay = Relay(make_config(db, **settings), {"main": reader})
    handle = relay.brokers["main"]
    await handle.connect()
    await handle.connected.wait()
    conn = await relay.table._connect_worker()
    reader.conn = conn
    try:
        before = await read_settings(conn)
        await conn.rollback()
        assert await relay.table.batch(conn, relay._dispatcher, relay._observers)
        after = await read_settings(conn)
        await conn.rollback()
    finally:
        await conn.close()
        await handle.close()
    assert len(reader.seen) == 1 and count(db, "dispatched_at IS NOT NULL") == 1
    return defaults, before, reader.seen[0], after


async def test_a_worker_session_is_ended_by_postgres_after_the_limit_the_readme_states(db: str) -> None:
    # docs/explanation/guarantees.md, "Guarantees and failure modes": a relay that hangs
    # mid-batch has its session ended after
    # 2 x publish_timeout + 30s idle in transaction (a batch starts no wave after
    # publish_timeout and a wave lasts at most that long). Every batch carries it.
    _, _, during, _ = await settings_around_a_batch(db, publish_timeout="7s")
    assert during[4] == "44s", during  # 2 x 7 s + 30 s


async def test_during_the_publish_the_batch_is_idle_in_transaction_so_its_timeout_runs(db: str) -> None:
    # idle_in_transaction_session_timeout (above) only runs while the server reports the
    # session idle in a transaction, which it does once it has answered every statement
    # sent (ReadyForQuery). The batch in psycopg's pipeline mode left it "active" through
    # the publish, the timer off: a relay hung mid-batch held its rows for good.
    enqueue_many(db, [("t", None, 0)])
    fake = FakeAdapter(delay=5.0)
    async with running_relay(make_config(db, workers=1), {"main": fake}) as relay:
        await wait_until(lambda: relay.in_flight == 1)

        def publishing_session_idle_in_transaction() -> bool:
            # The worker's session, holding its claimed row's lock (a transaction id).
            found = rows(
                db,
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND state = 'idle in transaction' AND backend_xid IS NOT NULL",
            )
            return found[0][0] == 1

        await wait_until(publishing_session_idle_in_transaction, timeout=4, interval=0.1)
        assert relay.in_flight == 1, "seen after the publish, not during it"


async def test_a_batch_sets_its_settings_for_its_own_transaction_only(db: str) -> None:
    # Behind a pooler in transaction mode (pgbouncer) a server session serves other
    # clients between two transactions: settings made for the worker's session stayed
    # on it for them (an application without sequential scans), and the relay's next
    # transaction could land on a server session that never had them. A batch sets them
    # for its own transaction, and the session keeps the server's defaults.
    defaults, before, during, after = await settings_around_a_batch(db, publish_timeout="7s")
    assert during == ("off", "off", "off", "0", "44s"), during
    assert before == defaults, "the worker's session was set up with settings of its own"
    assert after == defaults, "the batch's settings outlived its transaction"


async def test_the_maintenance_session_keeps_no_setting_of_its_own(db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The same for the maintenance connection (heartbeat, gauges, retention): its pending
    # gauge turns JIT off for its own transaction, not for the session.
    from outbox_relay.engine import maintenance

    real = maintenance.connect_with_retry
    opened: list[psycopg.AsyncConnection[Any]] = []

    async def recorded(*args: Any, **kwargs: Any) -> psycopg.AsyncConnection[Any]:
        conn = await real(*args, **kwargs)
        opened.append(conn)
        return conn

    monkeypatch.setattr(maintenance, "connect_with_retry", recorded)
    async with await psycopg.AsyncConnection.connect(db) as plain:
        defaults = await read_settings(plain)

    def round_done() -> bool:
        # Retention's DELETE of outcomes is the round's last statement; the next round is
        # an hour away.
        with psycopg.connect(db, autocommit=True) as watch:
            row = watch.execute(
                "SELECT state = 'idle' AND query LIKE '%%DELETE FROM %%.outcomes%%'"
                " FROM pg_stat_activity WHERE pid = %s",
                (opened[0].info.backend_pid,),
            ).fetchone()
        return bool(row and row[0])

    async with running_relay(make_config(db), {"main": FakeAdapter()}, heartbeat_every=3600):
        await wait_until(lambda: bool(opened) and round_done(), what="a maintenance round done")
        assert await read_settings(opened[0]) == defaults


async def test_a_connection_lost_at_a_workers_first_statement_is_survived(
    db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A failover or pg_terminate_backend can end a worker's connection between its
    # connect and its first claim: the first statement (the batch's settings) fails, and
    # the worker must reconnect (before: an error there ended the worker, and the relay
    # with it).
    from outbox_relay.engine.store import Claim, OutboxStore

    real = OutboxStore.claim
    failed: list[bool] = []

    async def lost_once(self: OutboxStore, conn: psycopg.AsyncConnection[Any], limit: int) -> Claim:
        if not failed:
            failed.append(True)
            raise psycopg.OperationalError("consuming input failed: server closed the connection unexpectedly")
        return await real(self, conn, limit)

    monkeypatch.setattr(OutboxStore, "claim", lost_once)
    with psycopg.connect(db) as conn:
        enqueue(conn, "t", {"n": 1})
        conn.commit()
    fake = FakeAdapter()
    async with running_relay(make_config(db, workers=1), {"main": fake}) as relay:
        # The adapter sees the message before the relay records it: wait for the record.
        await wait_until(lambda: relay.metrics.published_total() == 1)
        assert failed and len(fake.delivered) == 1


async def test_the_heartbeat_does_not_write_connected_over_a_probe_that_found_the_broker_down(db: str) -> None:
    # broker_connected had two writers: readiness (the probe's answer) and the heartbeat
    # (connected once, ever): the heartbeat put 1 back within 5 s, and the alert on it
    # could not fire.
    fake = FakeAdapter()
    async with running_relay(make_config(db), {"main": fake}) as relay:
        gauge = relay.metrics.broker_connected.labels("main")
        await fake.close()  # FakeAdapter.ready() now answers False
        ready, detail = await relay.health.readiness()
        assert not ready and detail["brokers"] == {"main": False}
        assert gauge._value.get() == 0
        relay.health.refresh_broker_gauges()  # what each heartbeat does
        assert gauge._value.get() == 0, "the heartbeat wrote 1 over the probe's answer"
