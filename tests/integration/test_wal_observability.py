"""What a relay in wal mode shows of its WAL source (issue 18, point 7): the slot's lag
in bytes and seconds, its state and the messages it parked on /metrics, and its state
on /readyz. The real Relay with its WalSource, over HTTP, against the real PostgreSQL
streaming the outbox's slot; FakeAdapter brokers that go away and come back."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from outbox_relay import enqueue
from outbox_relay.adapter import Adapter
from outbox_relay.config import Config
from outbox_relay.engine.relay import Relay
from outbox_relay.models import OutgoingMessage, PublishResult
from outbox_relay.operations import schema_manager
from outbox_relay.sources.wal.runner import WalSource
from outbox_relay.testing import FakeAdapter
from tests.support.configs import make_config
from tests.support.databases import role_with_grants
from tests.support.relay import running_relay
from tests.support.waiting import wait_until
from tests.support.wal import wal_slot

LAG_POLL_S = 0.1  # the slot read this often (5 s in a relay)


@pytest.fixture
def wal_outbox(db: str) -> Iterator[tuple[str, str]]:
    """The outbox in wal mode, streaming a slot of its own (dropped afterwards)."""
    with wal_slot(db) as found:
        with psycopg.connect(db) as conn:
            schema_manager.set_source(conn, "outbox", "wal", slot_name=found.name)
        yield db, found.name


def wal_config(dsn: str, slot: str, **wal: str) -> Config:
    return make_config(dsn, wal={"slot": slot, "status_interval": "200ms", "standby_interval": "200ms", **wal})


class Scraper:
    """/metrics and /readyz of one running relay."""

    def __init__(self, relay: Relay, client: httpx.AsyncClient):
        assert relay.http is not None
        self._base = f"http://127.0.0.1:{relay.http.port}"
        self._client = client

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = (await self._client.get(f"{self._base}/metrics")).text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    async def value(self, name: str, **labels: str) -> float:
        found = (await self.metrics()).get((name, tuple(sorted(labels.items()))))
        assert found is not None, f"{name}{labels} not on /metrics"
        return found

    async def state(self) -> str:
        states = [
            dict(labels)["state"]
            for (name, labels), value in (await self.metrics()).items()
            if name == "outbox_relay_wal_source_state" and value == 1
        ]
        assert len(states) == 1, states
        return states[0]

    async def ready(self) -> tuple[int, dict[str, Any]]:
        answer = await self._client.get(f"{self._base}/readyz")
        return answer.status_code, answer.json()


@contextlib.asynccontextmanager
async def wal_mode_relay(config: Config, adapters: dict[str, Adapter]) -> AsyncIterator[Scraper]:
    """The relay `outbox-relay run` builds (table workers and the WAL source), running
    in this event loop, with its scraper."""
    async with (
        running_relay(config, adapters, sources=[WalSource(config, lag_interval=LAG_POLL_S)]) as relay,
        httpx.AsyncClient() as client,
    ):
        yield Scraper(relay, client)


def _sampled_lag(dsn: str) -> float:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT max(oldest_pending_age_s) FROM outbox.relay_samples").fetchone()
    return float(row[0]) if row and row[0] is not None else -1.0


def commit(dsn: str, messages: list[tuple[str, str, bytes]]) -> None:
    """One transaction enqueueing (topic, key, payload) each."""
    with psycopg.connect(dsn) as conn:
        for topic, key, payload in messages:
            enqueue(conn, topic, payload, key=key)


async def test_slot_lag_grows_while_a_broker_is_away_and_falls_back_once_drained(
    wal_outbox: tuple[str, str],
) -> None:
    db, name = wal_outbox
    down = True
    fake = FakeAdapter(script=lambda out: PublishResult.unavailable("broker away") if down else None)
    # park_after: an hour, so the outage pauses the stream and parks nothing.
    async with wal_mode_relay(wal_config(db, name, park_after="1h"), {"main": fake}) as relay:
        await wait_until(lambda: _is(relay.state(), "streaming"), what="the WAL source streams")
        # 64 messages of 4 KiB: 256 KiB of WAL the slot must keep until they are published.
        commit(db, [("orders.created", f"k{i % 4}", bytes([i]) * 4096) for i in range(64)])
        await wait_until(lambda: _is(relay.state(), "paused"), what="the stream paused for the broker")
        await wait_until(
            lambda: _at_least(relay.value("outbox_relay_wal_slot_lag_bytes"), 256 * 1024),
            what="the slot's lag in bytes counts the unpublished messages",
        )
        scraped = await relay.metrics()
        lag = scraped[("outbox_relay_wal_slot_lag_bytes", ())]
        assert scraped[("outbox_relay_wal_slot_retained_bytes", ())] >= lag
        first = await relay.value("outbox_relay_wal_slot_lag_seconds")
        assert first > 0
        await wait_until(
            lambda: _at_least(relay.value("outbox_relay_wal_slot_lag_seconds"), first + 1.0),
            what="the lag in seconds grows while paused",
        )
        # The heartbeat's sample (the console's chart) carries the stream's lag: the
        # table holds nothing pending in WAL mode, so its age alone would say no lag.
        await wait_until(lambda: _sampled_lag(db) >= 1.0, what="a sample with the WAL source's lag")
        status, body = await relay.ready()
        assert body["wal"] == {
            "state": "paused",
            "slot": name,
            "reason": "a broker is away: the part in hand waits, the slot keeps the WAL",
        }
        assert status == 503 and body["brokers"] == {"main": False}, "the broker away, not the source, is unready"
        assert fake.delivered == []

        down = False
        await wait_until(lambda: len(fake.delivered) == 64, what="every message published once the broker is back")
        await wait_until(
            lambda: _equal(relay.value("outbox_relay_wal_slot_lag_seconds"), 0.0),
            what="no lag in seconds once everything read is confirmed",
        )
        await wait_until(
            lambda: _below(relay.value("outbox_relay_wal_slot_lag_bytes"), 64 * 1024),
            what="the slot's lag in bytes falls back once the relay confirmed",
        )
        assert await relay.state() == "streaming"
        for reason in ("transient", "unavailable", "permanent", "held"):
            assert await relay.value("outbox_relay_wal_messages_parked_total", reason=reason) == 0


async def test_parked_messages_are_counted_by_reason(wal_outbox: tuple[str, str]) -> None:
    db, name = wal_outbox
    tried: set[bytes] = set()

    def main_broker(out: OutgoingMessage) -> PublishResult | None:
        payload = out.message.payload
        if payload == b"refuse":
            return PublishResult.permanent("too large")
        if payload == b"fail once" and payload not in tried:
            tried.add(payload)
            return PublishResult.transient("try again")
        return None

    main = FakeAdapter(script=main_broker, keeps_key_order=True)
    away = FakeAdapter(script=lambda out: PublishResult.unavailable("broker away"))
    config = make_config(
        db,
        brokers={"main": {"type": "stdout"}, "away": {"type": "stdout"}},
        routes=[{"topic": "away.*", "broker": "away"}, {"topic": "*", "broker": "main"}],
        wal={"slot": name, "status_interval": "200ms", "park_after": "300ms"},
    )
    async with wal_mode_relay(config, {"main": main, "away": away}) as relay:
        await wait_until(lambda: _is(relay.state(), "streaming"), what="the WAL source streams")
        # In one call to the ordered broker: the failure parks its key's next message
        # unattempted (held); the refusal is a dead letter in the table (permanent).
        commit(
            db,
            [
                ("orders.created", "k", b"fail once"),
                ("orders.created", "k", b"after"),
                ("orders.created", "j", b"refuse"),
            ],
        )
        # A message for a broker away past park_after is parked with no attempt spent.
        commit(db, [("away.created", "a", b"waits")])

        async def parked() -> dict[str, float]:
            return {
                reason: await relay.value("outbox_relay_wal_messages_parked_total", reason=reason)
                for reason in ("transient", "unavailable", "permanent", "held")
            }

        await wait_until(lambda: _total(parked(), 4), what="four messages parked")
        assert await parked() == {"transient": 1, "unavailable": 1, "permanent": 1, "held": 1}
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM outbox.messages").fetchone() == (4,)


async def test_readyz_shows_the_streaming_relay_and_the_standby_which_takes_over(
    wal_outbox: tuple[str, str],
) -> None:
    db, name = wal_outbox
    config = wal_config(db, name)
    first_stack = contextlib.AsyncExitStack()
    try:
        first = await first_stack.enter_async_context(wal_mode_relay(config, {"main": FakeAdapter()}))
        await wait_until(lambda: _is(first.state(), "streaming"), what="the first relay streams")
        async with wal_mode_relay(config, {"main": FakeAdapter()}) as second:
            await wait_until(lambda: _is(second.state(), "standby"), what="the second relay stands by")
            assert await first.ready() == (
                200,
                {
                    "ready": True,
                    "database": True,
                    "brokers": {"main": True},
                    "wal": {"state": "streaming", "slot": name},
                },
            )
            # Standing by is healthy: ready, with what it waits for.
            assert await second.ready() == (
                200,
                {
                    "ready": True,
                    "database": True,
                    "brokers": {"main": True},
                    "wal": {"state": "standby", "slot": name, "reason": f"another relay streams the slot {name!r}"},
                },
            )
            await first_stack.aclose()
            await wait_until(lambda: _is(second.state(), "streaming"), what="the standby takes over")
            status, body = await second.ready()
            assert status == 200 and body["wal"] == {"state": "streaming", "slot": name}
    finally:
        await first_stack.aclose()


async def test_readyz_is_false_with_the_reason_while_the_source_cannot_stream(wal_outbox: tuple[str, str]) -> None:
    db, name = wal_outbox
    # The relay's GRANTs but not the REPLICATION attribute: every stream is refused.
    with role_with_grants(db, "relay", "norepl") as dsn:
        async with wal_mode_relay(wal_config(dsn, name), {"main": FakeAdapter()}) as relay:
            await wait_until(lambda: _is(relay.state(), "restarting"), what="the WAL source restarts")
            status, body = await relay.ready()
    assert status == 503
    assert body["database"] is True and body["brokers"] == {"main": True}
    assert body["wal"]["state"] == "restarting"
    assert "replication" in body["wal"]["reason"], body


async def _is(value: Any, expected: str) -> bool:
    return bool(await value == expected)


async def _equal(value: Any, expected: float) -> bool:
    return bool(await value == expected)


async def _at_least(value: Any, least: float) -> bool:
    return bool(await value >= least)


async def _below(value: Any, limit: float) -> bool:
    return bool(await value < limit)


async def _total(values: Any, total: float) -> bool:
    return sum((await values).values()) >= total
