"""The claim against a real PostgreSQL: its cost follows the batch, not the backlog;
every key gets its turn; a schema at version 1 upgrades with its pending rows intact.

Cost is counted, not timed: ``pg_stat_xact_user_tables`` counts the table rows the
claim read in the current transaction (fetched by index scans, or read by a sequential
scan), the same on every run whatever the machine is doing.
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from outbox_relay import sqlfiles
from outbox_relay.engine.store import OutboxStore, Walk
from outbox_relay.operations import schema_manager
from outbox_relay.sqlfiles import Queries
from tests.support.configs import make_config
from tests.support.outbox import lock_waits
from tests.support.relay import running_relay, wakeups
from tests.support.waiting import wait_until

BATCH = 100


STALE = "-- statistics end here"


def fill(dsn: str, statements: list[str]) -> None:
    """Run `statements`, then ANALYZE, or ANALYZE where the STALE marker is, so that the
    rows after it are unknown to the planner (as a queue's newest rows often are)."""
    with psycopg.connect(dsn) as conn:
        conn.execute("ALTER TABLE outbox.messages SET (autovacuum_enabled = false)")  # no surprise ANALYZE
        if STALE not in statements:
            statements = [*statements, STALE]
        for statement in statements:
            conn.execute("ANALYZE outbox.messages" if statement == STALE else statement)  # type: ignore[arg-type]
        conn.commit()


def keyed(n: int, key_expr: str, extra: str = "") -> str:
    return (
        f"INSERT INTO outbox.messages (topic, key, payload{', next_attempt_at' if extra else ''}) "
        f"SELECT 't', {key_expr}, '\\x00'::bytea{', ' + extra if extra else ''} FROM generate_series(1, {n}) g"
    )


async def claim_cost(dsn: str, *, hold: bool = False, limit: int = BATCH) -> tuple[int, int]:
    """(messages claimed, table rows read) for one claim, in a transaction as the relay's
    (the claim sets up its own transaction: OutboxStore.claim)."""
    store = OutboxStore(Queries("outbox"), hold_dead_letters=hold)
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        return await _one_claim(conn, store, limit)


async def _one_claim(conn: psycopg.AsyncConnection[Any], store: OutboxStore, limit: int) -> tuple[int, int]:
    async with conn.transaction():
        # Prepared as the relay's statements are after a few runs (a generic plan, which
        # knows nothing of the parameters' values).
        await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        claim = await store.claim(conn, limit)
        cur = await conn.execute(
            "SELECT coalesce(idx_tup_fetch, 0) + seq_tup_read FROM pg_stat_xact_user_tables"
            " WHERE relid = 'outbox.messages'::regclass"
        )
        row = await cur.fetchone()
        assert row is not None
        return len(claim.messages), int(row[0])


def shape_rows(shape: str, n: int) -> list[str]:
    if shape == "keyless":
        return [keyed(n, "NULL")]
    if shape == "one key":
        return [keyed(n, "'hot'")]
    if shape == "100 keys":
        return [keyed(n, "'k' || (g % 100)")]
    if shape == "1 key held back behind a head that waits":
        # The head waits for its retry; everything behind it waits with it. Other
        # keys have messages that can go.
        return [keyed(1, "'held'", "now() + interval '1 hour'"), keyed(n, "'held'"), keyed(BATCH, "'k' || g")]
    if shape == "keyless rows waiting for a broker":
        return [keyed(n, "NULL", "now() + interval '1 hour'"), keyed(BATCH, "NULL")]
    if shape == "100 keys arriving after statistics that saw only keyless rows":
        return [keyed(n, "NULL", "now() + interval '1 hour'"), STALE, keyed(n, "'k' || (g % 100)")]
    if shape == "keyless rows arriving after statistics that saw only keyed rows":
        return [keyed(n, "'w' || g", "now() + interval '1 hour'"), STALE, keyed(n, "NULL")]
    if shape == "every key waiting for a broker":
        # Keys cost one index descent each, rows behind them none; the walk visits at
        # most VISITS_PER_SLOT keys per message of the batch.
        return [keyed(n, "'w' || g", "now() + interval '1 hour'")]
    assert shape == "every message its own key"
    return [keyed(n, "'k' || g")]


@pytest.mark.parametrize(
    "shape",
    [
        "keyless",
        "one key",
        "100 keys",
        "every message its own key",
        "1 key held back behind a head that waits",
        "keyless rows waiting for a broker",
        "every key waiting for a broker",
        "100 keys arriving after statistics that saw only keyless rows",
        "keyless rows arriving after statistics that saw only keyed rows",
    ],
)
async def test_claim_cost_follows_the_batch_not_the_backlog(db: str, admin_dsn: str, shape: str) -> None:
    small, large = 2_000, 40_000
    costs = {}
    for size in (small, large):
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute("TRUNCATE outbox.messages")
        fill(db, shape_rows(shape, size))
        costs[size] = await claim_cost(db)
    (claimed_small, cost_small), (claimed_large, cost_large) = costs[small], costs[large]
    expected = 0 if shape == "every key waiting for a broker" else BATCH
    assert claimed_small == claimed_large == expected, costs
    # A claim reads about one row per message it takes (plus one per key it visits),
    # never the backlog: 20 times the rows behind, about the same work.
    bound = BATCH * (OutboxStore.VISITS_PER_SLOT + 2)
    assert cost_large <= bound, f"{shape}: {cost_large} rows fetched for a batch of {BATCH}"
    assert cost_large <= cost_small * 1.5 + 10, f"{shape}: cost grew with the backlog: {costs}"


async def test_every_key_gets_its_turn(db: str) -> None:
    # 300 keys of 3 messages, claims of 50: round-robin means the first claims cover
    # different keys instead of the same first keys again and again.
    fill(db, [keyed(900, "'k' || lpad((g % 300)::text, 3, '0')")])
    store = OutboxStore(Queries("outbox"), hold_dead_letters=False)
    seen: list[set[str]] = []
    async with await psycopg.AsyncConnection.connect(db) as conn:
        for _ in range(6):
            async with conn.transaction():
                claim = await store.claim(conn, 50)
                seen.append({m.key for m in claim.messages if m.key})
                # Roll back: nothing is dispatched, so only the cursor moves on.
                raise psycopg.Rollback()
    assert all(len(keys) == 50 for keys in seen), [len(k) for k in seen]
    assert len(set().union(*seen)) == 300, "six claims of 50 keys visited all 300 keys once"


async def test_hold_skips_a_key_with_a_dead_letter_before_its_head(db: str) -> None:
    fill(
        db,
        [
            keyed(3, "'k'"),
            keyed(2, "'other' || g"),
            "UPDATE outbox.messages SET dead_lettered_at = now(), dead_letter_reason = 'x' "
            "WHERE id = (SELECT min(id) FROM outbox.messages)",
        ],
    )
    held_claimed, _ = await claim_cost(db, hold=True)
    released_claimed, _ = await claim_cost(db, hold=False)
    assert (held_claimed, released_claimed) == (2, 4)


async def test_upgrade_from_version_1_keeps_pending_rows_claimable_in_order(empty_db: str) -> None:
    with psycopg.connect(empty_db) as conn:
        conn.execute(sqlfiles.migration("0001_initial.sql", "outbox"))
        conn.execute(sqlfiles.record_version("outbox", 1))
        conn.execute(keyed(5, "'k'"))
        conn.execute(keyed(3, "NULL"))
        conn.commit()
        result = schema_manager.install(conn, "outbox")
    assert (result.previous_version, result.version) == (1, sqlfiles.SCHEMA_VERSION)
    claimed, _ = await claim_cost(empty_db)
    assert claimed == 8
    store = OutboxStore(Queries("outbox"), hold_dead_letters=False)
    async with await psycopg.AsyncConnection.connect(empty_db) as conn, conn.transaction():
        messages = (await store.claim(conn, 10)).messages
    assert [m.id for m in messages if m.key == "k"] == [1, 2, 3, 4, 5]
    with psycopg.connect(empty_db) as conn:
        indexes = {
            r[0]
            for r in conn.execute(
                "SELECT indexname FROM pg_indexes WHERE schemaname = 'outbox' AND tablename = 'messages'"
            ).fetchall()
        }
    assert "messages_pending_idx" not in indexes and "messages_keyed_pending_idx" in indexes


# --- workers sharing one store ------------------------------------------------------------


# Keyless only; and a few keyed rows (30, less than a batch) among keyless ones.
@pytest.mark.parametrize("key_expr", ["NULL", "CASE WHEN g <= 30 THEN 'k' || (g % 3) END"])
async def test_concurrent_claims_of_one_store_each_take_a_full_batch(db: str, key_expr: str) -> None:
    """The workers of a relay share its store, whose keyed-or-keyless-first toggle another
    worker's claim flips while one awaits its statements: each claim must keep to its own
    order. Read again after an await, a keyed-first claim skipped its keyless rows (empty
    mid-drain: the worker then slept a poll interval) and a keyless-first one took keyless
    rows twice (over its limit)."""
    fill(db, [keyed(20 * BATCH, key_expr)])

    class SlowWalk(OutboxStore):
        # The key walk takes its time (a large keyspace, a busy server), so the second
        # worker's claim starts while the first one's waits for it.
        async def _walk(self, conn: psycopg.AsyncConnection[Any], limit: int, budget: int) -> Walk:
            await asyncio.sleep(0.3)
            return await super()._walk(conn, limit, budget)

    store = SlowWalk(Queries("outbox"), hold_dead_letters=False, workers=2)
    connections = [await psycopg.AsyncConnection.connect(db) for _ in range(2)]

    async def claim(conn: psycopg.AsyncConnection[Any], after: float) -> int:
        await asyncio.sleep(after)
        claimed, _ = await _one_claim(conn, store, BATCH)
        return claimed

    try:
        for round_ in range(4):
            # The toggle alternates per claim: a claim alone first makes the rounds
            # alternate which of the two concurrent claims starts keyed-first.
            assert await claim(connections[0], 0.0) == BATCH
            counts = await asyncio.gather(claim(connections[0], 0.0), claim(connections[1], 0.1))
            assert counts == [BATCH, BATCH], f"round {round_}: claims of {counts} messages, batch {BATCH}"
    finally:
        for conn in connections:
            await conn.close()


async def test_with_fewer_keys_than_a_walk_finds_each_worker_gets_its_share(db: str) -> None:
    """20 keys with deep backlogs, 2 workers: the first claim, whose walk saw every key,
    leaves the second worker half of them while its batch is out. Before, it locked all
    20 heads, and the second worker's claim came back empty: it slept a poll interval and
    one worker drained alone."""
    fill(db, [keyed(20 * 50, "'k' || (g % 20)")])
    store = OutboxStore(Queries("outbox"), hold_dead_letters=False, workers=2)
    first, second = [await psycopg.AsyncConnection.connect(db) for _ in range(2)]
    try:
        async with first.transaction(force_rollback=True):
            held = await store.claim(first, BATCH)  # its batch is out: its locks held
            async with second.transaction(force_rollback=True):
                other = await store.claim(second, BATCH)
        assert len(held.messages) == BATCH and len(other.messages) == BATCH
        keys = [{m.key for m in claim.messages} for claim in (held, other)]
        assert [len(k) for k in keys] == [10, 10] and not keys[0] & keys[1], keys
    finally:
        await first.close()
        await second.close()


# --- no spinning -------------------------------------------------------------------------


@pytest.mark.parametrize("held", ["a key's head", "every keyless row"])
async def test_no_busy_loop_when_everything_claimable_is_held_by_someone_else(db: str, held: str) -> None:
    from outbox_relay.testing import FakeAdapter

    fill(db, [keyed(50, "'k'") if held == "a key's head" else keyed(50, "NULL")])
    fake = FakeAdapter()
    # Another relay's batch, as PostgreSQL sees it: the rows locked by an open transaction.
    with psycopg.connect(db) as other:
        other.execute(
            "SELECT id FROM outbox.messages ORDER BY id LIMIT %s FOR UPDATE", (1 if held == "a key's head" else 50,)
        )
        async with running_relay(make_config(db, poll_interval="100ms", workers=2), {"main": fake}) as relay:
            # The positive signal: the workers have woken by their poll several times.
            await wait_until(lambda: wakeups(relay, "poll") >= 10, timeout=30)
            polls, again = wakeups(relay, "poll"), wakeups(relay, "backlog")
        other.rollback()
    assert fake.delivered == [], "nothing claimable: everything was held"
    # A worker that found nothing sleeps until the next wake-up; it does not claim again at once.
    assert again <= 2, f"{again} immediate re-claims over {polls} polls: a busy loop"


async def test_a_walk_over_waiting_keys_is_bounded_then_sleeps(db: str) -> None:
    from outbox_relay.testing import FakeAdapter

    keys, batch = 2_000, 10
    fill(db, [keyed(keys, "'w' || g", "now() + interval '1 hour'")])  # every key waits (a broker outage)
    async with running_relay(
        make_config(db, poll_interval="100ms", workers=1, batch_size=batch), {"main": FakeAdapter()}
    ) as relay:
        await wait_until(lambda: wakeups(relay, "poll") >= 5, timeout=60)
        polls, again = wakeups(relay, "poll"), wakeups(relay, "backlog")
        notified = wakeups(relay, "notify")  # the listener's wake-up when it (re)connects
    # Each claim visits at most batch * VISITS_PER_SLOT keys and goes on at once until the
    # walk has been all the way round (two claims more: the one that finds the end, and
    # its wrap back to where the round began); then the worker sleeps until its next
    # wake-up. Rounds: one per wake-up (poll or notify), and the one at start. A busy
    # loop would be thousands.
    per_round = -(-keys // (batch * OutboxStore.VISITS_PER_SLOT)) + 2
    assert again <= (polls + notified + 1) * per_round, (polls, notified, again)


# --- a key's head moving backwards, dead letters inside a run ---------------------------------


def dead_letter(dsn: str, ids: list[int]) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "UPDATE outbox.messages SET dead_lettered_at = now(), dead_letter_reason = 'x' WHERE id = ANY(%s)", (ids,)
        )
        conn.commit()


def requeue(dsn: str, ids: list[int]) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "UPDATE outbox.messages SET dead_lettered_at = NULL, dead_letter_reason = NULL WHERE id = ANY(%s)", (ids,)
        )
        conn.commit()


async def test_a_requeue_under_release_never_lets_two_relays_claim_the_same_rows(db: str) -> None:
    # Key k: row 1 dead-lettered, rows 2..5 pending. Relay A claims the run 2..5 and is
    # publishing it when an operator requeues row 1: row 1 is now k's head, and relay B
    # claims from it. B must not take 2..5 while A holds them.
    fill(db, [keyed(5, "'k'")])
    dead_letter(db, [1])
    a_store = OutboxStore(Queries("outbox"), hold_dead_letters=False)
    b_store = OutboxStore(Queries("outbox"), hold_dead_letters=False)
    async with await psycopg.AsyncConnection.connect(db) as a, await psycopg.AsyncConnection.connect(db) as b:
        await a.execute("BEGIN")
        a_claim = await a_store.claim(a, 10)
        assert [m.id for m in a_claim.messages] == [2, 3, 4, 5]
        requeue(db, [1])

        async def b_claims() -> list[int]:
            async with b.transaction():
                return [m.id for m in (await b_store.claim(b, 10)).messages]

        b_task = asyncio.create_task(b_claims())
        # The positive signal: B is waiting for A's rows (a lock wait PostgreSQL reports).
        with psycopg.connect(db, autocommit=True) as watch:

            def lock_waits() -> int:
                row = watch.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND datname = current_database()"
                ).fetchone()
                return row[0] if row else 0

            await wait_until(lambda: lock_waits() > 0, timeout=5, interval=0.01, what="B waiting for A's run")
        assert not b_task.done()
        await a.execute(
            "UPDATE outbox.messages SET dispatched_at = now() WHERE id = ANY(%s)", ([m.id for m in a_claim.messages],)
        )
        await a.execute("COMMIT")
        b_ids = await asyncio.wait_for(b_task, 10)
    assert b_ids == [1], "B took the requeued row alone: A's rows were dispatched when it got their locks"


async def test_a_claim_waiting_for_a_row_lock_does_not_stall_the_other_workers(db: str) -> None:
    # Key a: rows 1, 2; key b: row 3. Another relay holds row 2 (as after a requeue under
    # release: a's head is free, a later row of its run is in that relay's batch). Worker
    # 1 takes a's head and waits in claim_runs for row 2, for as long as that batch lasts
    # (up to 2 x publish_timeout). Worker 2 of the same process must claim b meanwhile:
    # before, it queued behind worker 1 on the walking lock.
    fill(db, [keyed(2, "'a'"), keyed(1, "'b'")])
    store = OutboxStore(Queries("outbox"), hold_dead_letters=False, workers=2)

    async def claim(conn: psycopg.AsyncConnection[Any]) -> list[tuple[str | None, int]]:
        # A batch of 2 between 2 workers: each walk looks for one key.
        async with conn.transaction():
            return [(m.key, m.id) for m in (await store.claim(conn, 2)).messages]

    with psycopg.connect(db) as other:
        other.execute("SELECT id FROM outbox.messages WHERE id = 2 FOR UPDATE")
        async with (
            await psycopg.AsyncConnection.connect(db) as worker_1,
            await psycopg.AsyncConnection.connect(db) as worker_2,
        ):
            first = asyncio.create_task(claim(worker_1))
            second: asyncio.Task[list[tuple[str | None, int]]] | None = None
            try:
                await wait_until(lambda: lock_waits(db) > 0, timeout=10, what="worker 1 waiting for row 2")
                second = asyncio.create_task(claim(worker_2))
                # The row stays locked until worker 2's claim returned or this bound passed
                # (2 s: generous for one claim of one row).
                await asyncio.wait({second}, timeout=2.0)
                second_in_time, first_waiting = second.done(), not first.done()
            finally:
                other.rollback()  # the other relay's batch ends: worker 1 gets row 2
                first_ids = await asyncio.wait_for(first, 10)
                second_ids = await asyncio.wait_for(second, 10) if second else None
            assert second_in_time, "worker 2's claim waited for worker 1's row lock"
            assert second_ids == [("b", 3)], "worker 2 claimed key b while worker 1 waited"
            assert first_waiting, "worker 1 waited for the other relay's row meanwhile"
            assert first_ids == [("a", 1), ("a", 2)]


async def test_under_hold_a_run_stops_before_the_next_dead_letter(db: str) -> None:
    # k: 1 dead, 2 pending, 3 dead, 4 pending (dead letters made under release, then the
    # policy became hold). Requeue 1: the run from 1 must stop before 3.
    fill(db, [keyed(4, "'k'")])
    dead_letter(db, [1, 3])
    requeue(db, [1])
    store = OutboxStore(Queries("outbox"), hold_dead_letters=True)
    async with await psycopg.AsyncConnection.connect(db) as conn, conn.transaction():
        claimed = [m.id for m in (await store.claim(conn, 10)).messages]
    assert claimed == [1, 2]


async def test_claim_cost_under_hold_does_not_read_held_rows(db: str) -> None:
    costs = {}
    for size in (2_000, 40_000):
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute("TRUNCATE outbox.messages")
        # One key held by a dead letter with `size` rows behind it, and 100 free keys.
        fill(db, [keyed(1, "'held'"), keyed(size, "'held'"), keyed(BATCH, "'k' || g")])
        dead_letter(db, [1])
        costs[size] = await claim_cost(db, hold=True)
    assert costs[2_000][0] == costs[40_000][0] == BATCH
    assert costs[40_000][1] <= costs[2_000][1] * 1.5 + 10, costs


# --- the byte budget ---------------------------------------------------------------------


async def claim_with(
    dsn: str, *, max_batch_bytes: int, max_payload_bytes: int | None, limit: int = BATCH
) -> list[tuple[int, str | None, int, int]]:
    """[(id, key, len(payload), size)] of one claim."""
    store = OutboxStore(
        Queries("outbox"), hold_dead_letters=False, max_batch_bytes=max_batch_bytes, max_payload_bytes=max_payload_bytes
    )
    async with await psycopg.AsyncConnection.connect(dsn) as conn, conn.transaction():
        messages = (await store.claim(conn, limit)).messages
    return [(m.id, m.key, len(m.payload), m.size) for m in messages]


def sized(n: int, key_expr: str, size: int) -> str:
    return (
        f"INSERT INTO outbox.messages (topic, key, payload) "
        f"SELECT 't', {key_expr}, convert_to(repeat('x', {size}), 'UTF8') FROM generate_series(1, {n}) g"
    )


@pytest.mark.parametrize("key_expr", ["NULL", "'k'", "'k' || (g % 3)"])
async def test_a_claim_carries_at_most_its_byte_budget(db: str, key_expr: str) -> None:
    mib = 1024 * 1024
    fill(db, [sized(10, key_expr, mib)])
    claimed = await claim_with(db, max_batch_bytes=3 * mib + 1, max_payload_bytes=None)
    # Rows are taken while the bytes before them are under the budget: 1+1+1 MiB < 3 MiB + 1.
    assert [(size, full) for _, _, size, full in claimed] == [(mib, mib)] * 4
    assert [i for i, *_ in claimed] == [1, 2, 3, 4], "in id order: each key's share is a prefix of its run"


async def test_one_row_over_the_budget_still_goes_alone(db: str) -> None:
    fill(db, [sized(3, "'k'", 200_000)])
    claimed = await claim_with(db, max_batch_bytes=1024, max_payload_bytes=None)
    assert [(i, size) for i, _, size, _ in claimed] == [(1, 200_000)]


@pytest.mark.parametrize("key_expr", ["NULL", "'k'"])
async def test_a_payload_over_the_limit_comes_without_its_bytes(db: str, key_expr: str) -> None:
    big = 5 * 1024 * 1024
    with psycopg.connect(db, autocommit=True) as conn:
        # The counters below must count the claim's reads only: autovacuum of the TOAST
        # table (its ~2,600 new chunks pass the insert threshold) reads those blocks too.
        conn.execute("ALTER TABLE outbox.messages SET (toast.autovacuum_enabled = false)")
    fill(db, [sized(1, key_expr, 10), sized(1, key_expr, big), sized(2, key_expr, 10)])
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_reset()")  # TOAST block counters from zero
    store = OutboxStore(Queries("outbox"), hold_dead_letters=False, max_payload_bytes=1024 * 1024)
    async with await psycopg.AsyncConnection.connect(db) as conn, conn.transaction():
        claimer = conn.info.backend_pid
        messages = (await store.claim(conn, 10)).messages
    assert [(len(m.payload), m.size) for m in messages] == [(10, 10), (0, big), (10, 10), (10, 10)]
    # The 5 MiB row lives in ~640 TOAST pages: the claim read (almost) none of them.
    with psycopg.connect(db, autocommit=True) as watch:

        def blocks() -> tuple[int, int]:
            """(heap, TOAST) blocks of outbox.messages read since the reset, as reported so far."""
            row = watch.execute(
                "SELECT coalesce(heap_blks_read, 0) + coalesce(heap_blks_hit, 0), "
                "coalesce(toast_blks_read, 0) + coalesce(toast_blks_hit, 0) "
                "FROM pg_statio_user_tables WHERE relid = 'outbox.messages'::regclass"
            ).fetchone()
            assert row is not None
            return int(row[0]), int(row[1])

        def claim_reported() -> bool:
            # A session reports its statistics by the time it has ended (to the collector of
            # PostgreSQL < 15, which shows them a moment later): the claim's heap reads show.
            ended = watch.execute(
                "SELECT NOT EXISTS (SELECT FROM pg_stat_activity WHERE pid = %s)", (claimer,)
            ).fetchone()
            return bool(ended and ended[0]) and blocks()[0] > 0

        # The positive signal: the claim's statistics are in.
        await wait_until(claim_reported, timeout=10, what="the claim's statistics")
        toast = blocks()[1]
    assert toast < 20, f"{toast} TOAST blocks read: the payload was fetched"
