"""A webhook endpoint that refuses the relay itself (401/403/404) or says "later"
(429/503 with Retry-After): its messages wait, spend no attempt, /readyz says false;
nothing is dead-lettered, and everything goes once the endpoint accepts again."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import psycopg
import pytest
from outbox_relay_adapters.webhook import retry_after

from outbox_relay import enqueue
from outbox_relay.assembly import build_adapters
from tests.support.configs import make_config
from tests.support.http import HttpReceiver, answer
from tests.support.relay import running_relay
from tests.support.waiting import wait_until


def pending_and_dead(dsn: str) -> tuple[int, int, int]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE dispatched_at IS NULL AND dead_lettered_at IS NULL), "
            "count(*) FILTER (WHERE dead_lettered_at IS NOT NULL), max(attempts) "
            "FROM outbox.messages"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2] or 0)


@pytest.mark.parametrize("status", [401, 403, 404])
async def test_an_endpoint_that_refuses_the_relay_holds_its_messages_without_spending_attempts(
    db: str, status: int
) -> None:
    endpoint = HttpReceiver(answer(status))  # a rotated token, a moved endpoint
    config = make_config(
        db, brokers={"hook": {"type": "webhook", "url": endpoint.url + "/hooks/orders"}}, max_attempts=1
    )  # a spent attempt would be a dead letter
    try:
        async with running_relay(config, build_adapters(config)) as relay:
            with psycopg.connect(db) as conn:
                for i in range(10):
                    enqueue(conn, "orders.created", {"i": i}, key=f"k{i % 3}")
                conn.commit()
            # The positive signal: the endpoint refused the relay several times over.
            await wait_until(lambda: endpoint.refused >= 3, timeout=30)
            assert relay.http is not None
            async with httpx.AsyncClient() as client:
                ready = await client.get(f"http://127.0.0.1:{relay.http.port}/readyz")
            assert ready.status_code == 503 and ready.json()["brokers"] == {"hook": False}, ready.text
            pending, dead, attempts = pending_and_dead(db)
            assert (pending, dead, attempts) == (10, 0, 0)
            endpoint.respond = answer(204)  # the token is fixed
            await wait_until(lambda: pending_and_dead(db)[0] == 0, timeout=30)
        assert sorted(r.json["payload"]["i"] for r in endpoint.accepted()) == list(range(10))
        assert pending_and_dead(db)[1] == 0
    finally:
        endpoint.close()


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_is_honoured_and_spends_no_attempt(db: str, status: int) -> None:
    endpoint = HttpReceiver(answer(status), headers={"Retry-After": "3"})
    config = make_config(
        db, brokers={"hook": {"type": "webhook", "url": endpoint.url + "/hooks/orders"}}, max_attempts=1
    )
    try:
        async with running_relay(config, build_adapters(config)):
            with psycopg.connect(db) as conn:
                enqueue(conn, "orders.created", {"i": 1})
                conn.commit()
            await wait_until(lambda: endpoint.refused >= 1, timeout=30)

            def waits() -> float | None:
                with psycopg.connect(db) as conn:
                    row = conn.execute(
                        "SELECT extract(epoch FROM next_attempt_at - clock_timestamp())::float8 "
                        "FROM outbox.messages WHERE next_attempt_at IS NOT NULL"
                    ).fetchone()
                return row[0] if row else None

            await wait_until(lambda: waits() is not None, timeout=10)
            left = waits()
            assert left is not None and left > 1.5, f"retried after {left}s, not after Retry-After: 3"
            assert pending_and_dead(db) == (1, 0, 0)
            endpoint.respond, endpoint.headers = answer(204), {}
            await wait_until(lambda: pending_and_dead(db)[0] == 0, timeout=30)
    finally:
        endpoint.close()


def test_retry_after_header_forms() -> None:
    assert retry_after("120") == 120.0
    assert retry_after("999999") == 3600.0
    assert retry_after(None) is None and retry_after("soon") is None
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=60), usegmt=True)
    value = retry_after(later)
    assert value is not None and 55 <= value <= 61
