"""The relay's deadlines on database answers, without a database: PostgreSQL's own
timeouts as the relay sets them, and AnswerDeadline's bookkeeping (the behaviour
against a real server: tests/integration/test_database_deadline.py)."""

from __future__ import annotations

import re

import psycopg
import pytest

from outbox_relay.connections import AnswerDeadline
from outbox_relay.engine.store import MAX_TIMEOUT_MS, OutboxStore
from outbox_relay.sqlfiles import Queries
from tests.support.waiting import wait_until


def test_a_timeout_longer_than_postgresql_can_hold_is_capped_not_an_error_on_every_batch() -> None:
    # A query_timeout of "30d" (meant as "never") gives a batch statement_timeout past
    # PostgreSQL's int of milliseconds: set_config would refuse it on every batch.
    store = OutboxStore(
        Queries("outbox"),
        hold_dead_letters=False,
        idle_in_transaction_timeout=365 * 86400.0,
        statement_timeout=0.9 * 30 * 86400.0,
    )
    assert store._statement_ms == MAX_TIMEOUT_MS == 2**31 - 1
    assert store._idle_ms == MAX_TIMEOUT_MS
    assert OutboxStore(Queries("outbox"), hold_dead_letters=False, statement_timeout=0.0001)._statement_ms == 1


async def test_a_deadline_that_expired_before_the_pause_refuses_to_start_it() -> None:
    # The timer and the claim's answer can come in the same turn of the loop: the claim
    # returns rows on a connection just given up. Publishing them would be for nothing
    # (their marks cannot be written; they are claimed and published again), so the
    # pause (the publish) does not start.
    class GoneConnection:  # what _expire touches of a connection: its socket and cancel key
        class pgconn:
            @property
            def socket(self) -> int:
                raise psycopg.OperationalError("the connection is closed")

            def cancel_conn(self) -> None:
                raise psycopg.OperationalError("the connection is closed")

        pgconn = pgconn()  # type: ignore[assignment]

    deadline = AnswerDeadline(GoneConnection(), 0.01, purpose="worker")  # type: ignore[arg-type]
    published = False
    with deadline:
        await wait_until(lambda: deadline.expired, timeout=5)  # fired while a call was awaited
        with (
            pytest.raises(psycopg.OperationalError, match=re.escape("no answer from the database within 0.01s")),
            deadline.paused(),
        ):
            published = True
    assert not published
