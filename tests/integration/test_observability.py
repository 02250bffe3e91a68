"""/livez, /readyz and /metrics on the relay's health port, and the long-transaction watchdog."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import httpx
import psycopg
from structlog.testing import capture_logs

from outbox_relay import enqueue
from outbox_relay.models import PublishResult
from outbox_relay.testing import FakeAdapter
from tests.support.configs import make_config
from tests.support.relay import running_relay
from tests.support.waiting import wait_until


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text format, or None."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        match = re.match(r"^(\w+)(\{[^}]*\})? (\S+)$", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(3))
    return None


async def test_health_endpoints_and_metrics(db: str) -> None:
    with psycopg.connect(db) as conn:
        for i in range(5):
            enqueue(conn, "orders.created", {"i": i}, key=f"k{i}")
        enqueue(conn, "unrouted", {"x": 1})
        conn.commit()
    fake = FakeAdapter()
    config = make_config(db, routes=[{"topic": "orders.*", "broker": "main", "destination": "orders"}])
    async with running_relay(config, {"main": fake}, heartbeat_every=0.1) as relay:
        assert relay.http is not None
        base = f"http://127.0.0.1:{relay.http.port}"
        await wait_until(lambda: len(fake.delivered) == 5)
        async with httpx.AsyncClient() as client:
            live = await client.get(f"{base}/livez")
            ready = await client.get(f"{base}/readyz")
            # Counted once the batch is committed, a moment after the adapter saw it.
            await wait_until(
                lambda: (
                    relay.metrics.registry.get_sample_value(
                        "outbox_relay_messages_published_total", {"broker": "main", "destination": "orders"}
                    )
                    == 5
                )
            )
            # And a heartbeat after that has refreshed the gauges.
            await wait_until(lambda: relay.metrics.registry.get_sample_value("outbox_relay_pending_messages") == 0)
            text = (await client.get(f"{base}/metrics")).text
            missing = await client.get(f"{base}/nope")
    assert live.status_code == 200
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "database": True, "brokers": {"main": True}}
    assert missing.status_code == 404
    assert metric(text, "outbox_relay_messages_published_total", broker="main", destination="orders") == 5
    assert metric(text, "outbox_relay_messages_dead_lettered_total", broker="") == 1
    assert metric(text, "outbox_relay_publish_failures_total", kind="permanent") == 1
    assert metric(text, "outbox_relay_pending_messages") == 0
    assert metric(text, "outbox_relay_database_connected") == 1
    assert metric(text, "outbox_relay_broker_connected", broker="main") == 1
    assert metric(text, "outbox_relay_messages_in_flight") == 0
    assert (metric(text, "outbox_relay_batch_size_count") or 0) >= 1
    assert metric(text, "outbox_relay_commit_to_ack_seconds_count") == 5
    assert (metric(text, "outbox_relay_publish_duration_seconds_count", broker="main") or 0) >= 1
    assert (metric(text, "outbox_relay_wakeups_total", reason="backlog") or 0) >= 1
    assert metric(text, "outbox_relay_oldest_transaction_age_seconds") is not None


async def test_readyz_is_false_while_a_routed_broker_is_down(db: str) -> None:
    down = FakeAdapter(fail_connect=10_000)
    async with running_relay(make_config(db), {"main": down}) as relay:
        assert relay.http is not None
        async with httpx.AsyncClient() as client:
            ready = await client.get(f"http://127.0.0.1:{relay.http.port}/readyz")
            live = await client.get(f"http://127.0.0.1:{relay.http.port}/livez")
    assert ready.status_code == 503
    assert ready.json()["brokers"] == {"main": False} and ready.json()["database"] is True
    assert live.status_code == 200, "a broker outage is not a reason to restart the relay"


async def test_pending_and_lag_gauges_follow_the_backlog(db: str) -> None:
    fake = FakeAdapter(script=lambda out: PublishResult.unavailable("down"))
    with psycopg.connect(db) as conn:
        for i in range(7):
            enqueue(conn, "t", {"i": i})
        conn.commit()
    async with running_relay(make_config(db), {"main": fake}, heartbeat_every=0.1) as relay:

        def gauge(name: str) -> float:
            return relay.metrics.registry.get_sample_value(name) or 0.0

        # The positive signals: the gauges have been refreshed with the backlog seen as
        # more than a second old.
        await wait_until(
            lambda: (
                gauge("outbox_relay_pending_messages") == 7 and gauge("outbox_relay_oldest_pending_age_seconds") >= 1.0
            ),
            timeout=30,
        )
        await wait_until(
            lambda: (
                (
                    relay.metrics.registry.get_sample_value(
                        "outbox_relay_publish_failures_total", {"broker": "main", "kind": "unavailable"}
                    )
                    or 0
                )
                >= 7
            ),
            timeout=30,
        )
        text = relay.metrics.render().decode()
    assert metric(text, "outbox_relay_pending_messages") == 7
    assert (metric(text, "outbox_relay_oldest_pending_age_seconds") or 0) >= 1.0
    assert (metric(text, "outbox_relay_publish_failures_total", broker="main", kind="unavailable") or 0) >= 7


async def test_long_transaction_watchdog_names_the_pid(db: str) -> None:
    with psycopg.connect(db) as blocker:
        blocker.execute("SELECT 1")  # opens a transaction and leaves it open
        pid = blocker.info.backend_pid
        with capture_logs() as logs:
            config = make_config(db, long_transaction_warning="500ms")
            async with running_relay(config, {"main": FakeAdapter()}, heartbeat_every=0.1) as relay:
                await wait_until(lambda: any(e["event"] == "long_transaction" for e in logs), timeout=30)
                await wait_until(
                    lambda: (
                        (relay.metrics.registry.get_sample_value("outbox_relay_oldest_transaction_age_seconds") or 0)
                        >= 0.5
                    ),
                    timeout=30,
                )
                text = relay.metrics.render().decode()
        blocker.rollback()
    warnings = [e for e in logs if e["event"] == "long_transaction"]
    assert warnings and warnings[0]["pid"] == pid and warnings[0]["log_level"] == "warning"
    assert (metric(text, "outbox_relay_oldest_transaction_age_seconds") or 0) >= 0.5


async def test_a_burst_of_readyz_requests_costs_the_database_one_session(db: str) -> None:
    # 300 concurrent probes: answered from one probe at a time (cached for a second) on
    # one connection kept for it, instead of a new database session each.
    import threading

    dbname = psycopg.conninfo.conninfo_to_dict(db)["dbname"]
    most = 0
    sampling = threading.Event()

    def sample() -> None:
        nonlocal most
        with psycopg.connect(db, autocommit=True) as conn:
            while not sampling.is_set():
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND application_name = 'outbox-relay'",
                    (dbname,),
                ).fetchone()
                most = max(most, row[0] if row else 0)
                time.sleep(0.005)  # the sampling interval

    async with running_relay(make_config(db, workers=2), {"main": FakeAdapter()}) as relay:
        assert relay.http is not None
        url = f"http://127.0.0.1:{relay.http.port}/readyz"
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=300), timeout=30) as client:
            await client.get(url)  # the relay's own sessions are all up, the probe's too
            sampler = threading.Thread(target=sample)
            sampler.start()
            try:
                answers = await asyncio.gather(*(client.get(url) for _ in range(300)))
            finally:
                sampling.set()
                sampler.join()
    assert [a.status_code for a in answers] == [200] * 300
    # 2 workers, the listener, maintenance, and the readiness probe's one session.
    assert most <= 5, f"{most} relay sessions during the burst"


async def test_destination_labels_are_capped_per_broker(db: str) -> None:
    # A route without a destination publishes each topic to a destination of its name:
    # 150 topics must not make 150 label sets.
    from outbox_relay.observability.metrics import MAX_DESTINATION_LABELS, OTHER_DESTINATIONS

    with psycopg.connect(db) as conn:
        for i in range(150):
            enqueue(conn, f"tenant.{i}", {"i": i})
        conn.commit()
    fake = FakeAdapter()
    async with running_relay(make_config(db), {"main": fake}) as relay:

        def samples() -> list[Any]:
            return [
                s
                for metric in relay.metrics.registry.collect()
                for s in metric.samples
                if s.name == "outbox_relay_messages_published_total"
            ]

        # Counted once the batch is committed, a moment after the adapter saw it.
        await wait_until(lambda: sum(s.value for s in samples()) == 150, timeout=30)
        published = samples()
    destinations = {s.labels["destination"] for s in published}
    assert len(destinations) == MAX_DESTINATION_LABELS + 1 and OTHER_DESTINATIONS in destinations
