"""An exactly-once producer that cannot start tells the broker's outage on its circuit
(sources/wal/exactly_once.py, _start), with a fake transactional producer: the log
line, and the broker reported open (the gauge, /readyz, the console) until a producer
starts again. Another relay's transaction left open on the positions topic is not an
outage, and says nothing of the kind."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from structlog.testing import capture_logs

from outbox_relay.adapter import PositionUndecided
from outbox_relay.config import RouteConfig
from outbox_relay.engine.dispatch import Dispatcher
from outbox_relay.engine.retry import Backoff
from outbox_relay.engine.routing import Router
from outbox_relay.models import OutgoingMessage, PublishResult
from outbox_relay.sources.wal.exactly_once import ExactlyOnce
from outbox_relay.testing import FakeAdapter
from tests.support.waiting import wait_until


class FailingStarts:
    """A transactional producer whose first starts raise `failures`, in turn; each
    start notes whether the broker was reported open at that moment."""

    fenced = False

    def __init__(self, failures: Sequence[Exception], dispatcher: Dispatcher):
        self._failures = list(failures)
        self._dispatcher = dispatcher
        self.open_at_start: list[bool] = []

    async def start(self) -> None:
        self.open_at_start.append(self._dispatcher.circuits["kafka"].broker_open)
        if self._failures:
            raise self._failures.pop(0)

    async def position(self, key: str) -> bytes | None:
        return None

    async def begin(self) -> None: ...

    async def publish(self, batch: Sequence[OutgoingMessage]) -> Sequence[PublishResult]:
        return [PublishResult.acked() for _ in batch]

    async def commit(self, key: str, position: bytes) -> None: ...

    async def abort(self) -> None: ...

    async def close(self) -> None: ...


def kafka_dispatcher() -> Dispatcher:
    return Dispatcher(
        {"kafka": FakeAdapter()},
        Router([RouteConfig(topic="*", broker="kafka")]),
        Backoff(0.01, 0.02),
        max_attempts=3,
        publish_timeout=1.0,
    )


def exactly_once_of(dispatcher: Dispatcher, transactions: FailingStarts) -> ExactlyOnce:
    return ExactlyOnce(
        "kafka", transactions, dispatcher, Backoff(0.01, 0.02), slot="s", key="k", hold_dead_letters=False
    )


async def opened(failures: Sequence[Exception]) -> tuple[list[str], FailingStarts, Dispatcher]:
    dispatcher = kafka_dispatcher()
    transactions = FailingStarts(failures, dispatcher)
    with capture_logs() as logs:
        committed = await exactly_once_of(dispatcher, transactions).open(asyncio.Event(), 1 << 40)
    assert committed is None  # nothing committed before: the fake's position
    return [str(entry["event"]) for entry in logs], transactions, dispatcher


async def test_a_producer_that_cannot_start_opens_the_brokers_circuit_until_one_starts() -> None:
    events, transactions, dispatcher = await opened([ConnectionError("refused"), ConnectionError("refused")])
    assert transactions.open_at_start == [False, True, True], "reported open while the producer cannot start"
    assert events.count("broker_circuit_open") == 1 and events.count("wal_exactly_once_producer_unavailable") == 2
    assert "broker_circuit_closed" in events, "a producer registered: the broker answers"
    assert not dispatcher.circuits["kafka"].broker_open


async def test_another_relays_open_transaction_on_the_positions_topic_is_not_an_outage() -> None:
    events, transactions, _ = await opened([PositionUndecided("a transaction open before offset 7")])
    assert transactions.open_at_start == [False, False]
    assert "broker_circuit_open" not in events
    assert events.count("wal_exactly_once_producer_unavailable") == 1, "it is retried, and said"


async def test_a_closed_exactly_once_leaves_nothing_reported_open() -> None:
    # Stopped while the producer cannot start (a switch to table, a standby): its
    # circuit would otherwise say the broker is away, with nothing left to probe it.
    dispatcher = kafka_dispatcher()
    stop = asyncio.Event()
    exactly_once = exactly_once_of(dispatcher, FailingStarts([ConnectionError("refused")] * 1000, dispatcher))
    opening = asyncio.create_task(exactly_once.open(stop, 1 << 40))
    await wait_until(lambda: dispatcher.circuits["kafka"].broker_open, timeout=10, what="the outage told")
    stop.set()
    assert await opening is None
    assert dispatcher.circuits["kafka"].broker_open, "still open until it is closed"
    await exactly_once.close()
    assert not dispatcher.circuits["kafka"].broker_open
