"""A receiver slower than a batch needs: each call starts requests for the webhook's
`timeout` only and leaves the rest waiting (no attempt spent), so no call runs past
`relay.publish_timeout`, no ack is thrown away, and the backlog drains, each message once."""

from __future__ import annotations

import asyncio
import collections

import psycopg

from outbox_relay import enqueue
from outbox_relay.assembly import build_adapters
from outbox_relay.config import RouteConfig
from outbox_relay.engine.dispatch import Dispatcher
from outbox_relay.engine.retry import Backoff
from outbox_relay.engine.routing import Router
from outbox_relay.models import RecordKind
from tests.support.configs import make_config
from tests.support.factories import message
from tests.support.http import HttpReceiver, answer
from tests.support.relay import running_relay
from tests.support.waiting import wait_until

MESSAGES = 200


def attempts_and_pending(dsn: str) -> tuple[int, int, int]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT coalesce(max(attempts), 0), count(*) FILTER (WHERE dispatched_at IS NULL),"
            " count(*) FILTER (WHERE dead_lettered_at IS NOT NULL) FROM outbox.messages"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


async def test_a_backlog_to_a_slow_receiver_drains_once_each_without_spending_attempts(db: str) -> None:
    # 200 keyless messages, 4 at a time, 0.3 s each: 15 s of requests against a
    # publish_timeout of 5 s. Before, every call timed out: its acks thrown away, its
    # messages sent again, the backlog never drained.
    endpoint = HttpReceiver(answer(200, delay=0.3))
    hook = {"type": "webhook", "url": endpoint.url + "/hooks", "max_concurrency": 4, "timeout": "1s"}
    config = make_config(db, brokers={"hook": hook}, publish_timeout="5s")
    try:
        with psycopg.connect(db) as conn:
            for i in range(MESSAGES):
                enqueue(conn, "orders.created", {"i": i})
            conn.commit()
        async with running_relay(config, build_adapters(config)):
            await wait_until(lambda: attempts_and_pending(db)[1] == 0, timeout=120)
        sent = collections.Counter(r.json["payload"]["i"] for r in endpoint.accepted())
        assert sorted(sent) == list(range(MESSAGES))
        assert [i for i, n in sent.items() if n > 1] == [], "acked messages sent again"
        # One attempt each, the one that was acked (the mark counts it); none dead-lettered.
        assert attempts_and_pending(db) == (1, 0, 0)
        assert endpoint.max_active <= 4
    finally:
        endpoint.close()


async def test_calls_of_several_workers_sharing_the_receiver_each_get_answers_and_no_outage() -> None:
    # Four workers' calls share max_concurrency: the calls queued behind the first must
    # not come back only "not sent", which the engine takes for an outage (the circuit
    # opens and the receiver is no longer called).
    endpoint = HttpReceiver(answer(200, delay=0.3))
    hook = {"type": "webhook", "url": endpoint.url + "/hooks", "max_concurrency": 4, "timeout": "1s"}
    config = make_config("postgresql://unused", brokers={"hook": hook})
    adapters = build_adapters(config)
    await adapters["hook"].connect()
    dispatcher = Dispatcher(
        adapters, Router([RouteConfig(topic="*", broker="hook")]), Backoff(0.05, 0.5), max_attempts=5, publish_timeout=5
    )
    try:
        calls = [dispatcher.dispatch([message(w * 100 + i) for i in range(20)]) for w in range(4)]
        for records in await asyncio.gather(*calls):
            kinds = collections.Counter(r.kind for r in records)
            assert kinds[RecordKind.ACKED] >= 1, kinds
            assert set(kinds) <= {RecordKind.ACKED, RecordKind.WAIT}, kinds
        assert not dispatcher.circuits["hook"].open, "the circuit opened on a slow receiver"
    finally:
        dispatcher.close()
        await adapters["hook"].close()
        endpoint.close()


async def test_with_requests_nearly_as_long_as_the_timeout_no_call_outlasts_publish_timeout() -> None:
    # Each call's first request goes before other calls' later ones (adapters/webhook.py,
    # _Slots): queued behind them instead, the later calls' first requests started after
    # up to one timeout and a request more, and ran past publish_timeout (about 4.8 s
    # here, against about 3.2 s now), so the engine threw their acks away.
    endpoint = HttpReceiver(answer(200, delay=1.6))
    hook = {"type": "webhook", "url": endpoint.url + "/hooks", "max_concurrency": 4, "timeout": "2s"}
    config = make_config("postgresql://unused", brokers={"hook": hook})
    adapters = build_adapters(config)
    await adapters["hook"].connect()
    dispatcher = Dispatcher(
        adapters,
        Router([RouteConfig(topic="*", broker="hook")]),
        Backoff(0.05, 0.5),
        max_attempts=5,
        publish_timeout=4.5,
    )
    try:
        calls = [dispatcher.dispatch([message(w * 100 + i) for i in range(12)]) for w in range(4)]
        for records in await asyncio.gather(*calls):
            kinds = collections.Counter(r.kind for r in records)
            assert kinds[RecordKind.ACKED] >= 1, kinds
            assert not [r.error for r in records if r.error and "publish_timeout" in r.error]
        assert not dispatcher.circuits["hook"].open, "a call ran past publish_timeout"
    finally:
        dispatcher.close()
        await adapters["hook"].close()
        endpoint.close()
