"""What became of each message, fed back to the application (`outbox.outcomes`): a row
per dead letter written with it, a row per delivery of the topics `outcomes.delivered`
names, a NOTIFY, `outbox.take_outcomes` for the application's role, and retention."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from outbox_relay import enqueue
from outbox_relay.errors import ConfigError
from outbox_relay.models import PublishResult
from outbox_relay.testing import FakeAdapter
from tests.support.configs import make_config
from tests.support.databases import role_with_grants
from tests.support.outbox import count
from tests.support.relay import running_relay
from tests.support.waiting import wait_until
from tests.support.wal import WalSlot, confirmed_flush, wal_slot
from tests.support.wal_relay import commit_end_lsns, commit_frames, running_wal_relay, wal_relay

COLUMNS = "message_id, topic, key, outcome, reason, attempts, payload, content_type, headers"


def outcomes(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(f"SELECT {COLUMNS} FROM outbox.outcomes ORDER BY id").fetchall()


def message_ids(dsn: str, where: str) -> list[Any]:
    with psycopg.connect(dsn) as conn:
        return [row[0] for row in conn.execute(f"SELECT message_id FROM outbox.messages WHERE {where} ORDER BY id")]


def add_outcome(
    conn: psycopg.Connection[Any], payload: bytes, *, outcome: str = "dead_lettered", age: str = "0"
) -> None:
    """An outcome row as the relay writes one (the test's own, by the owner's role),
    recorded `age` ago (an interval)."""
    conn.execute(
        "INSERT INTO outbox.outcomes (message_id, topic, outcome, attempts, payload, content_type, headers,"
        " enqueued_at, recorded_at) VALUES (gen_random_uuid(), 't', %s, 1, %s, 'text/plain', '{}', now(),"
        " now() - %s::interval)",
        (outcome, payload, age),
    )


def rejects(*payloads: bytes, answer: PublishResult) -> FakeAdapter:
    return FakeAdapter(script=lambda out: answer if out.message.payload in payloads else None)


async def test_a_dead_letter_is_fed_back_once_with_its_message_and_a_notify(db: str) -> None:
    with role_with_grants(db, "producer+outcomes", "app") as app_dsn:
        listener = await psycopg.AsyncConnection.connect(app_dsn, autocommit=True)
        async with listener:
            await listener.execute("LISTEN outbox_relay_outcomes")
            with psycopg.connect(db) as conn:
                enqueue(conn, "orders.created", {"order": 1}, key="o1", headers={"tenant": "t1"})
                enqueue(conn, "orders.created", {"order": 2}, key="o2")
                enqueue(conn, "orders.created", {"order": 3}, key="o3")
                conn.commit()
            # Order 2 is refused for good; order 3 fails twice, then goes: a retry is no
            # outcome, and a delivery of a topic not in outcomes.delivered is none either.
            tries: dict[bytes, int] = {}

            def script(out: Any) -> PublishResult | None:
                payload = out.message.payload
                tries[payload] = tries.get(payload, 0) + 1
                if payload == b'{"order":2}':
                    return PublishResult.permanent("schema registry refused it")
                if payload == b'{"order":3}' and tries[payload] <= 2:
                    return PublishResult.transient("broker busy")
                return None

            fake = FakeAdapter(script=script)
            async with running_relay(make_config(db, max_attempts=5), {"main": fake}):
                await wait_until(
                    lambda: (
                        count(db, "dispatched_at IS NOT NULL") == 2 and count(db, "dead_lettered_at IS NOT NULL") == 1
                    )
                )
                notification = await asyncio.wait_for(anext(listener.notifies()), timeout=10)
            assert (notification.channel, notification.payload) == ("outbox_relay_outcomes", "outbox")
    [dead] = message_ids(db, "dead_lettered_at IS NOT NULL")
    assert outcomes(db) == [
        (
            dead,
            "orders.created",
            "o2",
            "dead_lettered",
            "schema registry refused it",
            1,
            b'{"order":2}',
            "application/json",
            {},
        ),
    ]


async def test_a_message_dead_lettered_after_its_attempts_reports_them_and_its_headers(db: str) -> None:
    with psycopg.connect(db) as conn:
        enqueue(conn, "payments.settled", {"p": 1}, key="p1", headers={"tenant": "t1"})
        conn.commit()
    fake = FakeAdapter(script=lambda out: PublishResult.transient("timeout at the broker"))
    async with running_relay(make_config(db, max_attempts=3), {"main": fake}):
        await wait_until(lambda: count(db, "dead_lettered_at IS NOT NULL") == 1)
    [row] = outcomes(db)
    assert row[1:] == (
        "payments.settled",
        "p1",
        "dead_lettered",
        "max attempts (3) reached; last error: timeout at the broker",
        3,
        b'{"p":1}',
        "application/json",
        {"tenant": "t1"},
    )


async def test_with_dead_lettered_false_no_outcome_is_written(db: str) -> None:
    with psycopg.connect(db) as conn:
        enqueue(conn, "t", {"n": 1}, key="k")
        conn.commit()
    fake = rejects(b'{"n":1}', answer=PublishResult.permanent("no"))
    config = make_config(db, outcomes={"dead_lettered": False})
    async with running_relay(config, {"main": fake}):
        await wait_until(lambda: count(db, "dead_lettered_at IS NOT NULL") == 1)
    assert outcomes(db) == []


@pytest.mark.parametrize("retention", ["24h", "0s"])
async def test_deliveries_of_the_topics_named_are_fed_back_and_no_others(db: str, retention: str) -> None:
    with psycopg.connect(db) as conn:
        for n in range(30):
            enqueue(
                conn, "orders.created" if n % 3 == 0 else "audit.logged", {"n": n}, key=f"k{n % 4}" if n % 2 else None
            )
        conn.commit()
        expected = [
            row[0]
            for row in conn.execute("SELECT message_id FROM outbox.messages WHERE topic = 'orders.created' ORDER BY id")
        ]
    fake = FakeAdapter()
    config = make_config(db, retention=retention, outcomes={"delivered": ["orders.*"]})
    async with running_relay(config, {"main": fake}):
        await wait_until(lambda: len(fake.delivered) == 30)
        await wait_until(lambda: count(db, "dispatched_at IS NULL") == 0)
    rows = outcomes(db)
    assert sorted(r[0] for r in rows) == sorted(expected)
    assert {(r[1], r[3], r[4], r[5]) for r in rows} == {("orders.created", "delivered", None, 1)}
    assert sorted(json.loads(r[6])["n"] for r in rows) == list(range(0, 30, 3))


async def test_the_application_takes_outcomes_in_its_transaction_and_compensates(db: str) -> None:
    # docs/how-to/outcomes.md's example: an order whose `orders.created` message is dead-lettered is
    # cancelled and a refund enqueued, in one transaction of the application's role.
    with psycopg.connect(db) as conn:
        conn.execute("CREATE TABLE orders (id int PRIMARY KEY, status text NOT NULL)")
        conn.execute("INSERT INTO orders VALUES (4711, 'created'), (4712, 'created')")
        enqueue(conn, "orders.created", {"order": 4711}, key="order-4711")
        enqueue(conn, "orders.created", {"order": 4712}, key="order-4712")
        conn.commit()
    fake = rejects(b'{"order":4711}', answer=PublishResult.permanent("rejected by the broker"))
    with role_with_grants(db, "producer+outcomes", "app") as app_dsn:
        with psycopg.connect(db, autocommit=True) as admin:
            app_user = sql.Identifier(str(conninfo_to_dict(app_dsn)["user"]))
            admin.execute(sql.SQL("GRANT SELECT, UPDATE ON orders TO {}").format(app_user))
        async with running_relay(make_config(db), {"main": fake}):
            await wait_until(lambda: count(db, "dead_lettered_at IS NOT NULL") == 1 and len(fake.delivered) == 1)
            with psycopg.connect(app_dsn) as app:
                with app.transaction():
                    for (payload,) in app.execute(
                        "SELECT payload FROM outbox.take_outcomes(100, 'dead_lettered', ARRAY['orders.created'])"
                    ).fetchall():
                        order = json.loads(payload)["order"]
                        app.execute("UPDATE orders SET status = 'cancelled' WHERE id = %s", (order,))
                        enqueue(app, "payments.refund", {"refund_for": order}, key=f"order-{order}")
                # Taken: a second look finds nothing.
                assert app.execute("SELECT count(*) FROM outbox.take_outcomes()").fetchone() == (0,)
                app.commit()
            await wait_until(lambda: len(fake.delivered) == 2)
        assert fake.delivered[-1].message.topic == "payments.refund"
        assert json.loads(fake.delivered[-1].message.payload) == {"refund_for": 4711}
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT id, status FROM orders ORDER BY id").fetchall() == [
            (4711, "cancelled"),
            (4712, "created"),
        ]
    assert outcomes(db) == []


def test_take_outcomes_skips_rows_another_transaction_is_taking_and_a_rollback_gives_them_back(db: str) -> None:
    with psycopg.connect(db) as conn:
        for n in range(3):
            add_outcome(conn, str(n).encode())
        conn.commit()
    with (
        role_with_grants(db, "producer+outcomes", "app") as app_dsn,
        psycopg.connect(app_dsn) as first,
        psycopg.connect(app_dsn) as second,
    ):
        taken = first.execute("SELECT payload FROM outbox.take_outcomes(2)").fetchall()
        assert taken == [(b"0",), (b"1",)]
        assert second.execute("SELECT payload FROM outbox.take_outcomes(10)").fetchall() == [(b"2",)]
        first.rollback()
        second.commit()
        assert first.execute("SELECT payload FROM outbox.take_outcomes(10)").fetchall() == [(b"0",), (b"1",)]
        first.commit()


@pytest.mark.parametrize(
    ("call", "error"),
    [
        ("outbox.take_outcomes(0)", "max_rows must be 1 or more, got '0'"),
        ("outbox.take_outcomes(NULL)", "max_rows must be 1 or more, got NULL"),
        ("outbox.take_outcomes(10, 'lost')", "unknown outcome 'lost': use dead_lettered, delivered or NULL"),
    ],
)
def test_take_outcomes_refuses_bad_arguments_in_one_line(db: str, call: str, error: str) -> None:
    with psycopg.connect(db) as conn, pytest.raises(psycopg.errors.InvalidParameterValue, match=error):
        conn.execute(f"SELECT * FROM {call}")


@pytest.fixture
def app_role(db: str) -> Iterator[str]:
    with role_with_grants(db, "producer+outcomes", "app") as dsn:
        yield dsn


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO outbox.outcomes (message_id, topic, outcome, attempts, payload, content_type, headers,"
        " enqueued_at) VALUES (gen_random_uuid(), 't', 'delivered', 1, '', 'x', '{}', now())",
        "UPDATE outbox.outcomes SET outcome = 'delivered'",
        "TRUNCATE outbox.outcomes",
    ],
)
def test_the_application_role_cannot_forge_or_rewrite_an_outcome(app_role: str, statement: str) -> None:
    with psycopg.connect(app_role) as app, pytest.raises(psycopg.errors.InsufficientPrivilege):
        app.execute(statement)


def test_a_role_not_granted_it_cannot_take_outcomes(db: str) -> None:
    with (
        role_with_grants(db, "relay", "relayrole") as relay_dsn,
        psycopg.connect(relay_dsn) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute("SELECT * FROM outbox.take_outcomes()")


async def test_retention_deletes_outcomes_the_application_left_and_keeps_newer_ones(db: str) -> None:
    with psycopg.connect(db) as conn:
        for age in ("8 days", "1 hour"):
            add_outcome(conn, age.encode(), age=age)
        conn.commit()
    # The relay runs as its own least-privileged role: retention needs only its grants.
    with role_with_grants(db, "relay", "relayrole") as relay_dsn:
        async with running_relay(make_config(relay_dsn, outcomes={"retention": "7d"}), {"main": FakeAdapter()}):
            await wait_until(lambda: len(outcomes(db)) == 1, what="the old outcome deleted")
    assert [bytes(r[6]) for r in outcomes(db)] == [b"1 hour"]


async def test_a_relay_of_least_privilege_writes_dead_letter_and_delivered_outcomes(db: str) -> None:
    with psycopg.connect(db) as conn:
        enqueue(conn, "orders.created", {"n": 1}, key="a")
        enqueue(conn, "orders.created", {"n": 2}, key="b")
        conn.commit()
    fake = rejects(b'{"n":1}', answer=PublishResult.permanent("no"))
    with role_with_grants(db, "relay", "relayrole") as relay_dsn:
        config = make_config(relay_dsn, outcomes={"delivered": ["orders.created"]})
        async with running_relay(config, {"main": fake}):
            await wait_until(lambda: count(db, "dispatched_at IS NULL AND dead_lettered_at IS NULL") == 0)
    assert sorted((r[2], r[3]) for r in outcomes(db)) == [("a", "dead_lettered"), ("b", "delivered")]


async def test_the_wal_source_feeds_back_its_dead_letters_once(db: str) -> None:
    with wal_slot(db) as wal:
        await _wal_dead_letter(wal)


async def _wal_dead_letter(wal: WalSlot) -> None:
    emitted = commit_frames(wal.dsn, [("d", b"d0-rejected"), ("e", b"e0")])
    *_, end = commit_end_lsns(wal)
    fake = rejects(b"d0-rejected", answer=PublishResult.permanent("bad"))
    async with running_wal_relay(wal_relay(wal, make_config(wal.dsn), {"main": fake})):
        await wait_until(lambda: confirmed_flush(wal.dsn, wal.name) >= end)
    assert [out.message.payload for out in fake.delivered] == [b"e0"]
    assert [(r[0], r[2], r[3], r[4], bytes(r[6])) for r in outcomes(wal.dsn)] == [
        (emitted[0].message_id, "d", "dead_lettered", "bad", b"d0-rejected")
    ]


async def test_the_wal_source_feeds_back_deliveries_of_the_topics_asked_for(db: str) -> None:
    with wal_slot(db) as wal:
        emitted = commit_frames(wal.dsn, [("a", b"a0"), (None, b"n0"), ("a", b"a1")])
        emitted += commit_frames(wal.dsn, [("p", b"p0")], topic="payments.settled")
        *_, end = commit_end_lsns(wal)
        fake = FakeAdapter()
        config = make_config(wal.dsn, outcomes={"delivered": ["orders.*"]})
        async with running_wal_relay(
            wal_relay(wal, config, {"main": fake}, feeds_delivered=config.outcomes.feeds_delivered)
        ):
            await wait_until(lambda: confirmed_flush(wal.dsn, wal.name) >= end)
    assert len(fake.delivered) == 4  # every message went; only orders.* are fed back
    rows = outcomes(wal.dsn)
    assert [(r[0], r[1], r[2], r[3], r[5], bytes(r[6])) for r in rows] == [
        (e.message_id, "orders.created", e.key, "delivered", 1, e.payload) for e in emitted[:3]
    ]


async def test_retries_without_a_dead_letter_write_no_outcome_and_notify_nobody(db: str) -> None:
    with role_with_grants(db, "producer+outcomes", "app") as app_dsn:
        listener = await psycopg.AsyncConnection.connect(app_dsn, autocommit=True)
        async with listener:
            await listener.execute("LISTEN outbox_relay_outcomes")
            with psycopg.connect(db) as conn:
                enqueue(conn, "t", {"n": 1}, key="k")
                conn.commit()
            fake = FakeAdapter(script=lambda out: PublishResult.transient("busy"))
            async with running_relay(make_config(db, max_attempts=100), {"main": fake}):
                await wait_until(lambda: count(db, "attempts >= 3") == 1)
            # Notifications reach the listener with its next exchange with the server.
            await listener.execute("SELECT 1")
            assert [n async for n in listener.notifies(timeout=0.5)] == []
    assert outcomes(db) == []


def test_a_role_that_only_enqueues_can_neither_read_nor_take_outcomes(db: str) -> None:
    # Outcomes hold copies of every application's messages: taking them is granted apart
    # (schema sql --outcomes-role), not with enqueueing.
    with role_with_grants(db, "producer", "app") as app_dsn, psycopg.connect(app_dsn) as app:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            app.execute("SELECT count(*) FROM outbox.outcomes")
        app.rollback()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            app.execute("SELECT * FROM outbox.take_outcomes()")


async def test_retention_skips_an_expired_outcome_the_application_is_taking(db: str) -> None:
    with psycopg.connect(db) as conn:
        for label in ("taken", "left"):
            add_outcome(conn, label.encode(), outcome="delivered", age="8 days")
        conn.commit()
    with role_with_grants(db, "outcomes", "app") as app_dsn, psycopg.connect(app_dsn) as app:
        assert app.execute("SELECT payload FROM outbox.take_outcomes(1)").fetchall() == [(b"taken",)]
        # Held by this open transaction: retention neither waits for it nor deletes it.
        async with running_relay(make_config(db), {"main": FakeAdapter()}):
            await wait_until(lambda: len(outcomes(db)) == 1, what="'left' deleted")
        app.rollback()
    assert [bytes(r[6]) for r in outcomes(db)] == [b"taken"]


@pytest.fixture
def relay_without_outcomes(db: str) -> Iterator[str]:
    """The relay's role as granted before schema version 10: nothing on outbox.outcomes."""
    with role_with_grants(db, "relay", "relayrole") as relay_dsn:
        role = sql.Identifier(str(conninfo_to_dict(relay_dsn)["user"]))
        with psycopg.connect(db, autocommit=True) as admin:
            admin.execute(sql.SQL("REVOKE ALL ON outbox.outcomes FROM {}").format(role))
        yield relay_dsn


async def test_a_relay_role_not_granted_outcomes_still_dead_letters_and_says_how_to_grant(
    db: str, relay_without_outcomes: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with psycopg.connect(db) as conn:
        enqueue(conn, "t", {"n": 1}, key="a")
        enqueue(conn, "t", {"n": 2}, key="b")
        conn.commit()
    fake = rejects(b'{"n":1}', answer=PublishResult.permanent("no"))
    logged: list[str] = []

    def said(event: str) -> bool:
        logged.append(capsys.readouterr().out)
        return event in "".join(logged)

    async with running_relay(make_config(relay_without_outcomes), {"main": fake}, heartbeat_every=0.1):
        await wait_until(lambda: count(db, "dead_lettered_at IS NOT NULL") == 1 and len(fake.delivered) == 1)
        # Retention of outcomes is refused too: warned about, and the heartbeat goes on.
        await wait_until(lambda: said("outcomes_retention_not_granted"), what="the retention warning")
    assert said("outcomes_not_granted") and "schema sql --grants-only --relay-role" in "".join(logged)
    assert outcomes(db) == []


async def test_outcomes_delivered_without_the_grant_refuses_to_start_in_one_line(relay_without_outcomes: str) -> None:
    config = make_config(relay_without_outcomes, outcomes={"delivered": ["orders.*"]})
    with pytest.raises(ConfigError, match=r"^outcomes.delivered: the relay's role may not write outbox.outcomes; run"):
        async with running_relay(config, {"main": FakeAdapter()}):
            pass
