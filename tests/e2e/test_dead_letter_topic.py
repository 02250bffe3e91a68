"""Dead-letter topics (`dead_letters.publish_to`): each dead letter is published once to
its dead-letter topic on a real Kafka broker (or a real HTTP receiver), with the headers
Kafka Connect and Spring users expect, and stays in the table for requeue; a
dead-letter topic that refuses copies for a while gets every one when it is back."""

from __future__ import annotations

import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from outbox_relay import enqueue
from outbox_relay.assembly import build_adapters
from outbox_relay.engine import dead_letter_topic as dlt
from tests.consumers import Received, kafka_create_topic, kafka_read_to_end
from tests.support.cli import run_cli
from tests.support.configs import make_config, write_config
from tests.support.http import HttpReceiver, answer
from tests.support.outbox import count
from tests.support.relay import running_relay
from tests.support.waiting import wait_until


def kafka(bootstrap: str) -> dict[str, Any]:
    return {"events": {"type": "kafka", "bootstrap_servers": bootstrap}}


async def records(bootstrap: str, topic: str) -> list[Received]:
    return await kafka_read_to_end(bootstrap, topic, isolation_level="read_committed")


def published(db: str) -> int:
    return count(db, "dead_lettered_at IS NOT NULL AND dead_letter_published_at IS NOT NULL")


def row_of(db: str, message_id: str) -> tuple[Any, ...]:
    with psycopg.connect(db) as conn:
        row = conn.execute(
            "SELECT topic, key, attempts, dead_lettered_at, dead_letter_reason FROM outbox.messages"
            " WHERE message_id = %s",
            (message_id,),
        ).fetchone()
    assert row is not None
    return row


def assert_copy_of(db: str, copy: Received, *, payload: bytes) -> None:
    topic, key, attempts, at, reason = row_of(db, copy.message_id)
    assert (copy.key, copy.payload) == (key, payload)
    headers = copy.headers
    assert headers[dlt.ORIGINAL_TOPIC] == headers["__connect.errors.topic"] == topic
    assert headers["kafka_dlt-original-topic"] == topic
    assert headers[dlt.REASON] == headers["__connect.errors.exception.message"] == reason
    assert headers["kafka_dlt-exception-message"] == reason
    assert headers[dlt.ATTEMPTS] == str(attempts)
    assert datetime.fromisoformat(headers[dlt.DEAD_LETTERED_AT]) == at
    assert headers["tenant"] == "t1"  # the message's own headers travel too


async def test_each_dead_letter_lands_once_on_its_topic_with_its_headers_and_stays_for_requeue(
    db: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    run = uuid.uuid4().hex[:10]
    routes = [{"topic": "orders.*", "broker": "events", "destination": f"orders-{run}"}]
    settings: dict[str, Any] = {
        "brokers": kafka(kafka_bootstrap),
        "routes": routes,
        "dead_letters": {"publish_to": {"broker": "events", "destination": f"dlt-{run}-{{topic}}"}},
        "max_payload_bytes": 1000,
    }
    big = b'{"blob":"' + b"x" * 2000 + b'"}'
    with psycopg.connect(db) as conn:
        good = [enqueue(conn, "orders.created", {"n": n}, key="o1") for n in range(5)]
        unrouted = enqueue(conn, "refunds.issued", {"r": 1}, key="r1", headers={"tenant": "t1"})
        conn.execute(
            "SELECT outbox.enqueue_binary('orders.created', 'o2', %s, '{\"tenant\": \"t1\"}', 'application/json')",
            (big,),
        )
        conn.commit()
    config = make_config(db, **settings)
    async with running_relay(config, build_adapters(config)):
        await wait_until(lambda: published(db) == 2, timeout=60)
        refunds = await records(kafka_bootstrap, f"dlt-{run}-refunds.issued")
        orders = await records(kafka_bootstrap, f"dlt-{run}-orders.created")
        assert [c.message_id for c in refunds] == [str(unrouted)]
        assert_copy_of(db, refunds[0], payload=b'{"r":1}')
        assert refunds[0].headers[dlt.REASON] == "no route"
        [too_big] = orders
        # Its payload stayed in the database (over relay.max_payload_bytes): its size travels.
        assert_copy_of(db, too_big, payload=b"")
        assert too_big.headers[dlt.PAYLOAD_OMITTED] == f"{len(big)} bytes, over relay.max_payload_bytes"
        delivered = await records(kafka_bootstrap, f"orders-{run}")
        assert sorted(c.message_id for c in delivered) == sorted(map(str, good))
        # The dead letters stay for requeue, and the application got one outcome each.
        assert count(db, "dead_lettered_at IS NOT NULL") == 2
        with psycopg.connect(db) as conn:
            big_id = conn.execute("SELECT message_id FROM outbox.messages WHERE key = 'o2'").fetchone()
            per_message = dict(
                conn.execute("SELECT message_id, count(*) FROM outbox.outcomes GROUP BY message_id").fetchall()
            )
        assert big_id is not None and per_message == {unrouted: 1, big_id[0]: 1}

        # Requeued (still unroutable), it is dead-lettered again and published again.
        path = write_config(tmp_path / "relay.yaml", db, **settings)
        done = run_cli("dead-letters", "requeue", "--config", str(path), "--id", str(unrouted))
        assert done.returncode == 0, done.stderr
        await wait_until(lambda: published(db) == 2, timeout=60)
        again = await records(kafka_bootstrap, f"dlt-{run}-refunds.issued")
        assert [c.message_id for c in again] == [str(unrouted)] * 2
    with psycopg.connect(db) as conn:
        # One more for the second dead-lettering; the application takes each once.
        taken = conn.execute("SELECT message_id, outcome FROM outbox.take_outcomes(100)").fetchall()
        assert sorted(taken) == sorted([(unrouted, "dead_lettered")] * 2 + [(big_id[0], "dead_lettered")])
        assert conn.execute("SELECT count(*) FROM outbox.take_outcomes(100)").fetchone() == (0,)


async def test_a_dead_letter_topic_that_refuses_copies_gets_every_one_when_it_is_back(db: str) -> None:
    with HttpReceiver(answer(503)) as receiver:
        brokers = {
            "main": {"type": "stdout"},
            "dlt": {"type": "webhook", "url": f"http://127.0.0.1:{receiver.port}/dead-letters"},
        }
        config = make_config(
            db,
            brokers=brokers,
            routes=[{"topic": "orders.*", "broker": "main"}],
            dead_letters={"publish_to": {"broker": "dlt", "batch_size": 3}},
        )
        with psycopg.connect(db) as conn:
            ids = [str(enqueue(conn, f"unrouted.{n % 2}", {"n": n}, key=f"k{n % 3}")) for n in range(10)]
            conn.commit()
        async with running_relay(config, build_adapters(config)) as relay:
            await wait_until(lambda: count(db, "dead_lettered_at IS NOT NULL") == 10, timeout=30)
            # The receiver refused copies more than once (the relay kept trying, through
            # the broker's circuit), the relay counted the refusals, and none was
            # counted as published. (The receiver counts a refusal as it answers; the
            # relay once the answer arrived, or while the circuit holds copies back.)
            registry = relay.metrics.registry
            await wait_until(
                lambda: (
                    receiver.refused >= 2
                    and (registry.get_sample_value("outbox_relay_dead_letter_publish_failures_total") or 0) >= 3
                ),
                timeout=30,
            )
            assert published(db) == 0
            receiver.respond = answer(200)
            await wait_until(lambda: published(db) == 10, timeout=30)
            assert registry.get_sample_value("outbox_relay_dead_letters_published_total") == 10
    bodies = [request.json for request in receiver.accepted()]
    # Every dead letter, each once (a call's requests go out concurrently: no order).
    assert sorted(body["message_id"] for body in bodies) == sorted(ids)
    assert {body["destination"] for body in bodies} == {"unrouted.0.DLT", "unrouted.1.DLT"}
    assert all(body["headers"][dlt.REASON] == "no route" for body in bodies)


async def test_a_destination_that_refuses_every_copy_gives_none_up_and_stalls_no_others(
    db: str, kafka_bootstrap: str
) -> None:
    run = uuid.uuid4().hex[:10]
    config = make_config(
        db,
        brokers=kafka(kafka_bootstrap),
        routes=[{"topic": "orders.*", "broker": "events", "destination": f"orders-{run}"}],
        dead_letters={"publish_to": {"broker": "events", "destination": f"dlt-{run}-{{topic}}"}},
    )
    # Made first: a topic the broker creates on the first send answers that send "no
    # metadata" (a failure counted), which this test does not count on.
    await kafka_create_topic(kafka_bootstrap, f"dlt-{run}-refunds.issued", partitions=1)
    with psycopg.connect(db) as conn:
        # No route for either: both dead-lettered. The first one's copy goes to a topic
        # Kafka refuses by name ("tenant:acme" holds a colon): the destination's fault,
        # not the dead letter's, so it is not given up; it must not hold the other back.
        poisoned = enqueue(conn, "tenant:acme", {"t": 1}, key="t1")
        fine = enqueue(conn, "refunds.issued", {"r": 1}, key="r1", headers={"tenant": "t1"})
        conn.commit()
    async with running_relay(config, build_adapters(config)) as relay:
        registry = relay.metrics.registry
        # The refused copy was tried (with and without its payload: the second refusal
        # counted) and the other one published.
        await wait_until(
            lambda: (
                published(db) == 1
                and (registry.get_sample_value("outbox_relay_dead_letter_publish_failures_total") or 0) >= 1
            ),
            timeout=60,
        )
        assert registry.get_sample_value("outbox_relay_dead_letters_published_total") == 1
        assert count(db, "topic = 'tenant:acme' AND dead_letter_published_at IS NULL") == 1
    [copy] = await records(kafka_bootstrap, f"dlt-{run}-refunds.issued")
    assert copy.message_id == str(fine)
    assert count(db, "dead_lettered_at IS NOT NULL") == 2  # both stay for requeue
    assert row_of(db, str(poisoned))[0] == "tenant:acme"


@pytest.mark.parametrize(
    ("block", "error"),
    [
        ({"publish_to": {"broker": "nowhere"}}, "dead_letters.publish_to.broker: unknown broker 'nowhere'"),
        ({"publish_to": {"broker": "main", "destination": "{key}"}}, "may hold {topic} and nothing else"),
        ({"publish_to": {"brokr": "main"}}, "unknown key 'brokr' (did you mean 'broker'?)"),
    ],
)
def test_a_wrong_dead_letter_block_is_one_line_naming_the_key(tmp_path: Path, block: Any, error: str) -> None:
    path = write_config(tmp_path / "relay.yaml", "postgresql://nowhere/x", dead_letters=block)
    done = run_cli("check", "--config", str(path))
    assert done.returncode != 0
    assert error in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
