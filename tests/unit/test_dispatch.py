"""engine.dispatch.Dispatcher with FakeAdapter: outcomes, per-key order, concurrency. No DB."""

from __future__ import annotations

import asyncio
import gc
import inspect
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from outbox_relay.adapter import Adapter
from outbox_relay.config import RouteConfig
from outbox_relay.engine.dispatch import NO_ROUTE, Dispatcher
from outbox_relay.engine.retry import Backoff
from outbox_relay.engine.routing import Router
from outbox_relay.models import OutgoingMessage, PublishResult, Record
from outbox_relay.testing import FakeAdapter
from tests.support.factories import message
from tests.support.waiting import wait_until

INITIAL = 0.1
MAXIMUM = 5.0


def dispatcher(
    adapters: dict[str, Adapter],
    routes: list[tuple[str, str]] | None = None,
    *,
    max_attempts: int = 3,
    publish_timeout: float = 5.0,
) -> Dispatcher:
    configs = [RouteConfig(topic=t, broker=b) for t, b in routes or [("*", "main")]]
    return Dispatcher(
        adapters,
        Router(configs),
        Backoff(INITIAL, MAXIMUM),
        max_attempts=max_attempts,
        publish_timeout=publish_timeout,
    )


def by_id(records: Sequence[Record]) -> dict[int, Record]:
    result = {r.id: r for r in records}
    assert len(result) == len(records), "two records for one message"
    return result


def script_for(answers: dict[int, PublishResult]) -> FakeAdapter:
    return FakeAdapter(script=lambda out: answers.get(out.message.id))


# --- outcomes ------------------------------------------------------------------------


async def test_acked() -> None:
    fake = FakeAdapter()
    records = await dispatcher({"main": fake}).dispatch([message(1), message(2)])
    assert records == [Record(1, "acked"), Record(2, "acked")]
    assert [out.message.id for out in fake.delivered] == [1, 2]


async def test_destination_is_resolved_into_outgoing_message() -> None:
    fake = FakeAdapter()
    d = Dispatcher(
        {"main": fake},
        Router([RouteConfig(topic="orders.*", broker="main", destination="orders-v1")]),
        Backoff(INITIAL, MAXIMUM),
        max_attempts=3,
        publish_timeout=5.0,
    )
    await d.dispatch([message(1, topic="orders.created")])
    assert [out.destination for out in fake.delivered] == ["orders-v1"]


async def test_permanent_is_dead_with_reason() -> None:
    fake = script_for({1: PublishResult.permanent("HTTP 422 Unprocessable")})
    records = await dispatcher({"main": fake}).dispatch([message(1), message(2)])
    assert records == [Record(1, "dead", "HTTP 422 Unprocessable"), Record(2, "acked")]


async def test_transient_is_retry_with_delay_and_reason() -> None:
    fake = script_for({1: PublishResult.transient("broker said later")})
    records = by_id(await dispatcher({"main": fake}, max_attempts=5).dispatch([message(1, attempts=2)]))
    record = records[1]
    assert record.kind == "retry"
    assert record.error == "broker said later"
    # The 3rd failed attempt: initial * 2**2 plus jitter of at most `initial`.
    assert INITIAL * 4 - 1e-9 <= record.delay <= INITIAL * 5 + 1e-9


async def test_first_transient_failure_delay() -> None:
    fake = script_for({1: PublishResult.transient("x")})
    record = (await dispatcher({"main": fake}, max_attempts=5).dispatch([message(1)]))[0]
    assert INITIAL - 1e-9 <= record.delay <= 2 * INITIAL + 1e-9


@pytest.mark.parametrize(("attempts", "max_attempts"), [(2, 3), (0, 1), (9, 10), (12, 10)])
async def test_transient_on_last_attempt_is_dead(attempts: int, max_attempts: int) -> None:
    fake = script_for({1: PublishResult.transient("connection reset")})
    records = await dispatcher({"main": fake}, max_attempts=max_attempts).dispatch([message(1, attempts=attempts)])
    assert records == [Record(1, "dead", f"max attempts ({max_attempts}) reached; last error: connection reset")]


async def test_transient_one_before_last_attempt_is_retry() -> None:
    fake = script_for({1: PublishResult.transient("x")})
    records = await dispatcher({"main": fake}, max_attempts=3).dispatch([message(1, attempts=1)])
    assert records[0].kind == "retry"


async def test_unavailable_is_wait_and_spends_no_attempt() -> None:
    fake = FakeAdapter(script=lambda out: PublishResult.unavailable("connection refused"))
    # On its last attempt: a transient failure would dead-letter it; unavailable must not.
    records = await dispatcher({"main": fake}, max_attempts=3).dispatch([message(1, attempts=2)])
    assert len(records) == 1
    record = records[0]
    assert record.kind == "wait"
    assert record.error == "connection refused"
    assert INITIAL - 1e-9 <= record.delay <= MAXIMUM


async def test_unavailable_delay_grows_with_the_outage_not_the_message() -> None:
    fake = FakeAdapter(script=lambda out: PublishResult.unavailable("down"))
    d = dispatcher({"main": fake}, max_attempts=3)
    delays = [(await d.dispatch([message(i)]))[0].delay for i in range(1, 6)]
    # Outage n: initial * 2**(n-1) + jitter <= initial.
    assert INITIAL * 16 - 1e-9 <= delays[4] <= INITIAL * 17 + 1e-9
    assert delays[0] <= 2 * INITIAL + 1e-9


async def test_outage_resets_after_an_ack() -> None:
    down = True
    fake = FakeAdapter(script=lambda out: PublishResult.unavailable("down") if down else None)
    await fake.connect()
    d = dispatcher({"main": fake})
    for i in range(5):
        await d.dispatch([message(i)])
    down = False
    await circuit_closed(d, "main")
    assert (await d.dispatch([message(10)]))[0].kind == "acked"
    down = True
    assert (await d.dispatch([message(11)]))[0].delay <= 2 * INITIAL + 1e-9


async def circuit_closed(d: Dispatcher, broker: str, timeout: float = 10.0) -> None:
    """Wait until the broker may be called again (its background probe found it ready;
    the circuit is then half-open: the next call carries one trial message)."""
    # blocked() starts a probe when one is due.
    await wait_until(
        lambda: d.circuits[broker].blocked() is None,
        timeout=timeout,
        interval=0.01,
        what=f"circuit of {broker!r} closed",
    )


async def test_no_route_is_dead() -> None:
    fake = FakeAdapter()
    records = await dispatcher({"main": fake}, [("orders.*", "main")]).dispatch(
        [message(1, topic="users.created"), message(2, topic="orders.created")]
    )
    assert records == [Record(1, "dead", NO_ROUTE), Record(2, "acked")]
    assert NO_ROUTE == "no route"
    assert [out.message.id for out in fake.delivered] == [2]


async def test_no_route_for_any_message_calls_no_adapter() -> None:
    fake = FakeAdapter()
    records = await dispatcher({"main": fake}, [("orders.*", "main")]).dispatch(
        [message(1, topic="a"), message(2, topic="b")]
    )
    assert [r.kind for r in records] == ["dead", "dead"]
    assert fake.calls == []


# --- misbehaving adapters ---------------------------------------------------------------


@dataclass
class RaisingAdapter:
    name: str = "raising"
    calls: int = 0

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def ready(self) -> bool:
        return True

    async def publish(self, batch: Sequence[OutgoingMessage]) -> Sequence[PublishResult]:
        self.calls += 1
        raise RuntimeError("boom")


@dataclass
class ShortAdapter:
    name: str = "short"

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def ready(self) -> bool:
        return True

    async def publish(self, batch: Sequence[OutgoingMessage]) -> Sequence[PublishResult]:
        return [PublishResult.acked()] * (len(batch) - 1)


async def test_adapter_that_raises_makes_all_transient() -> None:
    records = await dispatcher({"main": RaisingAdapter()}, max_attempts=5).dispatch(
        [message(1), message(2), message(3, key="k")]
    )
    assert [r.kind for r in records] == ["retry", "retry", "retry"]
    assert all(r.error is not None and "boom" in r.error for r in records)
    assert all(r.delay > 0 for r in records)


async def test_adapter_that_raises_does_not_touch_other_broker() -> None:
    good = FakeAdapter()
    d = dispatcher({"bad": RaisingAdapter(), "good": good}, [("a.*", "bad"), ("*", "good")], max_attempts=5)
    records = by_id(await d.dispatch([message(1, topic="a.x"), message(2, topic="b.x")]))
    assert records[1].kind == "retry"
    assert records[2].kind == "acked"


class _Held:
    """Stands for the batch an adapter's frame holds (bytes take no weak reference)."""


@dataclass
class HoldingRaisingAdapter(RaisingAdapter):
    held: list[weakref.ref[_Held]] = field(default_factory=list)

    async def publish(self, batch: Sequence[OutgoingMessage]) -> Sequence[PublishResult]:
        in_frame = _Held()  # kept by the exception's traceback, as a batch's payloads are
        self.held.append(weakref.ref(in_frame))
        raise RuntimeError("boom")


async def test_an_adapter_that_raises_leaves_no_garbage_cycle_holding_its_batch() -> None:
    # Under a broker that raises on every call, garbage in reference cycles piles up
    # between collections, and `outbox-relay run` collects rarely (process.py): with the
    # call in wait_for's task, 200 rounds of 8 MiB held 200 MiB until gc.collect().
    adapter = HoldingRaisingAdapter()
    d = dispatcher({"main": adapter}, max_attempts=5)
    gc.collect()
    gc.disable()
    try:
        records = await d.dispatch([message(1), message(2, key="k")])
        assert [r.kind for r in records] == ["retry", "retry"] and adapter.held
        alive = [ref for ref in adapter.held if ref() is not None]
    finally:
        gc.enable()
    assert not alive, "the adapter's frame outlived the call: a reference cycle keeps it"


async def test_adapter_returning_wrong_number_of_results_makes_all_transient() -> None:
    records = await dispatcher({"main": ShortAdapter()}, max_attempts=5).dispatch([message(1), message(2), message(3)])
    assert [r.kind for r in records] == ["retry", "retry", "retry"]
    assert all(r.error == "adapter returned a wrong number of results" for r in records)


async def test_publish_timeout_means_the_broker_is_away_and_spends_no_attempt() -> None:
    slow = FakeAdapter(delay=2.0)
    started = time.monotonic()
    records = await dispatcher({"main": slow}, max_attempts=5, publish_timeout=0.1).dispatch([message(1), message(2)])
    assert time.monotonic() - started < 1.0
    assert [r.kind for r in records] == ["wait", "wait"]
    assert all(r.error == "no answer within publish_timeout (0.1s)" for r in records)


async def test_publish_timeout_on_the_last_attempt_dead_letters_nothing() -> None:
    # An outage longer than the publish timeout must not use up attempts (issue 8).
    slow = FakeAdapter(delay=2.0)
    records = await dispatcher({"main": slow}, max_attempts=1, publish_timeout=0.05).dispatch([message(1, attempts=0)])
    assert [(r.kind, r.error) for r in records] == [("wait", "no answer within publish_timeout (0.05s)")]


async def test_a_broker_that_answered_nothing_is_not_called_again_until_it_is_ready() -> None:
    slow = FakeAdapter(name="slow", delay=0.5)
    fast = FakeAdapter(name="fast")
    d = dispatcher({"fast": fast, "slow": slow}, [("a.*", "slow"), ("*", "fast")], publish_timeout=0.1)
    await d.dispatch([message(1, topic="a.x")])  # times out: the circuit opens
    assert slow.calls == [1]
    started = time.monotonic()
    records = by_id(await d.dispatch([message(2, topic="a.x"), message(3, topic="b.x")]))
    # The open circuit answers at once: the fast broker's message does not wait for it,
    # and no new copy is handed to the slow broker's client.
    assert time.monotonic() - started < 0.09
    assert (records[2].kind, records[3].kind) == ("wait", "acked")
    assert "not answering" in (records[2].error or "")
    assert slow.calls == [1]
    slow.delay = 0.0
    await slow.connect()  # ready() says True from now on
    await circuit_closed(d, "slow")
    assert (await d.dispatch([message(4, topic="a.x")]))[0].kind == "acked"
    assert slow.calls == [1, 1]


async def test_a_broker_answering_only_unavailable_is_probed_before_it_is_called_again() -> None:
    fake = FakeAdapter(script=lambda out: PublishResult.unavailable("connection refused"))
    d = dispatcher({"main": fake})
    await d.dispatch([message(1), message(2)])
    for i in range(3, 6):
        assert (await d.dispatch([message(i)]))[0].kind == "wait"
    assert fake.calls == [2], "while the circuit is open, the adapter is not called"
    assert d.circuits["main"].open
    fake.script = None
    await fake.connect()
    await circuit_closed(d, "main")
    assert (await d.dispatch([message(9)]))[0].kind == "acked"
    d.close()


async def test_a_broker_that_is_ready_but_acks_nothing_gets_one_trial_message_per_probe() -> None:
    # ready() answers (a Kafka broker serving metadata) while no write is acked: each
    # probe cycle may hand the client one message, not a batch per worker (copies that
    # would all be delivered once the broker acks again).
    fake = FakeAdapter(delay=0.5)
    await fake.connect()
    d = dispatcher({"main": fake}, publish_timeout=0.1)
    first = [message(i, key=f"k{i}") for i in range(5)]
    assert {r.kind for r in await d.dispatch(first)} == {"wait"}
    assert fake.calls == [5]
    for cycle in range(2):
        await circuit_closed(d, "main")  # half-open: the probe answered
        records = await d.dispatch(first)
        assert [r.kind for r in records] == ["wait"] * 5, "nothing acked, nothing spent"
        assert fake.calls == [5] + [1] * (cycle + 1), "one trial message per probe cycle"
        assert d.circuits["main"].open, "the unanswered trial opens the circuit again"
    fake.delay = 0.0
    await circuit_closed(d, "main")
    records = await d.dispatch(first)
    assert [r.kind for r in records] == ["acked"] + ["wait"] * 4
    assert not d.circuits["main"].open, "an acked trial closes the circuit"
    assert [r.kind for r in await d.dispatch(first[1:])] == ["acked"] * 4
    assert fake.calls[-2:] == [1, 4]
    d.close()


async def test_only_one_call_carries_the_trial_when_workers_publish_concurrently() -> None:
    fake = FakeAdapter(delay=0.5)
    await fake.connect()
    d = dispatcher({"main": fake}, publish_timeout=0.1)
    await d.dispatch([message(1)])
    fake.delay = 0.05
    await circuit_closed(d, "main")
    results = await asyncio.gather(
        *(d.dispatch([message(10 * w + i, key=f"w{w}.{i}") for i in range(3)]) for w in range(4))
    )
    assert fake.calls == [1, 1], "one worker's call tries the broker, the others wait for it"
    kinds = sorted(r.kind for records in results for r in records)
    assert kinds == ["acked"] + ["wait"] * 11
    assert not d.circuits["main"].open
    d.close()


async def test_a_trial_answered_with_a_rejection_closes_the_circuit() -> None:
    fake = FakeAdapter(delay=0.5)
    await fake.connect()
    d = dispatcher({"main": fake}, publish_timeout=0.1)
    await d.dispatch([message(1)])
    fake.delay = 0.0
    fake.script = lambda out: PublishResult.permanent("record too large")
    await circuit_closed(d, "main")
    assert [r.kind for r in await d.dispatch([message(2), message(3)])] == ["dead", "wait"]
    assert not d.circuits["main"].open, "the broker answered: it is back"
    d.close()


def gauge(d: Dispatcher, broker: str) -> float:
    """outbox_relay_broker_circuit_open{broker} as the dispatcher's metrics hold it."""
    return float(d._metrics.broker_circuit_open.labels(broker)._value.get())


async def test_another_connections_circuit_gates_its_own_calls_and_is_reported_with_the_brokers() -> None:
    # An exactly-once relay's transactional producer is another connection to the same
    # broker (Dispatcher.replacing): its outage must not hold the table path's messages,
    # nor its recovery close the table path's circuit, yet /readyz, the console and the
    # gauge must say the broker is away while either connection finds it so.
    main, other = FakeAdapter(), FakeAdapter(delay=0.5)
    await main.connect()
    await other.connect()
    d = dispatcher({"main": main}, publish_timeout=0.1)
    transactional = d.replacing("main", other)
    assert [r.kind for r in await transactional.dispatch([message(1)])] == ["wait"]
    assert transactional.circuits["main"].open and not d.circuits["main"].open
    assert d.circuits["main"].broker_open and gauge(d, "main") == 1, "reported with the broker's"
    assert [r.kind for r in await d.dispatch([message(2)])] == ["acked"], "the other connection goes on"
    assert main.calls == [1]
    d.circuits["main"].close()  # the table path's answer closes nothing of the other's
    assert transactional.circuits["main"].open and gauge(d, "main") == 1
    transactional.circuits["main"].leave()  # that connection is done (ExactlyOnce.close)
    assert not d.circuits["main"].broker_open and gauge(d, "main") == 0, "nothing left open once it left"
    d.close()


async def test_a_probe_cancelled_before_it_ran_does_not_stop_the_next_one() -> None:
    # cancel() (a stream's end, a shutdown) can land in the same loop iteration that
    # created the probe: its task never runs its finally, and blocked() used to wait on
    # it forever, leaving the circuit open with nothing probing it.
    fake = FakeAdapter(delay=0.5)
    await fake.connect()
    d = dispatcher({"main": fake}, publish_timeout=0.1)
    await d.dispatch([message(1)])
    circuit = d.circuits["main"]
    assert circuit.open
    fake.delay = 0.0
    await wait_until(lambda: circuit._probe is None and time.monotonic() >= circuit._next_probe, timeout=10)
    assert circuit.blocked() is not None  # starts the probe...
    circuit.cancel()  # ...cancelled before its first step
    await circuit_closed(d, "main")  # a new probe runs and finds the broker
    assert [r.kind for r in await d.dispatch([message(2)])] == ["acked"]
    assert not circuit.open
    d.close()


# --- per-key order -------------------------------------------------------------------


@dataclass
class BatchRecorder:
    """Records the keys of each publish call; fails the messages listed in `fail`."""

    name: str = "recorder"
    fail: dict[int, PublishResult] = field(default_factory=dict)
    batches: list[list[int]] = field(default_factory=list)
    keys: list[list[str | None]] = field(default_factory=list)

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def ready(self) -> bool:
        return True

    async def publish(self, batch: Sequence[OutgoingMessage]) -> Sequence[PublishResult]:
        self.batches.append([out.message.id for out in batch])
        self.keys.append([out.message.key for out in batch])
        return [self.fail.get(out.message.id, PublishResult.acked()) for out in batch]


@pytest.mark.parametrize(
    "failure",
    [PublishResult.transient("t"), PublishResult.permanent("p"), PublishResult.unavailable("u")],
)
async def test_failed_key_sends_no_later_messages_in_batch(failure: PublishResult) -> None:
    recorder = BatchRecorder(fail={2: failure})
    messages = [
        message(1, key="a"),
        message(2, key="b"),
        message(3, key="a"),
        message(4, key="b"),
        message(5, key="b"),
        message(6, key="a"),
        message(7),
    ]
    records = by_id(await dispatcher({"main": recorder}, max_attempts=5).dispatch(messages))
    sent = [i for batch in recorder.batches for i in batch]
    assert 4 not in sent and 5 not in sent  # later messages of key b: not sent
    assert 4 not in records and 5 not in records  # and no Record at all: stay pending
    assert records[2].kind != "acked"
    assert [records[i].kind for i in (1, 3, 6, 7)] == ["acked"] * 4  # key a and keyless go on
    assert sent.index(1) < sent.index(3) < sent.index(6)


async def test_dead_message_on_no_route_blocks_later_messages_of_key() -> None:
    recorder = BatchRecorder()
    d = dispatcher({"main": recorder}, [("orders.*", "main")])
    records = by_id(await d.dispatch([message(1, topic="nope", key="k"), message(2, key="k"), message(3, key="j")]))
    assert records[1] == Record(1, "dead", NO_ROUTE)
    assert 2 not in records
    assert records[3].kind == "acked"


async def test_publish_call_never_holds_two_messages_of_one_key() -> None:
    recorder = BatchRecorder()
    keys = ["a", "a", "b", None, "a", "c", "b", None, "c", "a"]
    messages = [message(i + 1, key=k) for i, k in enumerate(keys)]
    records = await dispatcher({"main": recorder}).dispatch(messages)
    assert all(r.kind == "acked" for r in records)
    assert len(records) == len(messages)
    for batch_keys in recorder.keys:
        named = [k for k in batch_keys if k is not None]
        assert len(named) == len(set(named))
    sent = [i for batch in recorder.batches for i in batch]
    for key in "abc":
        key_ids = [m.id for m in messages if m.key == key]
        assert [i for i in sent if i in key_ids] == key_ids
    assert len(recorder.batches) == 4  # key a has 4 messages: 4 waves


async def test_records_come_in_send_order() -> None:
    recorder = BatchRecorder()
    messages = [message(1, key="a"), message(2, key="a"), message(3, key="b")]
    records = await dispatcher({"main": recorder}).dispatch(messages)
    assert [r.id for r in records] == [1, 3, 2]


# --- concurrency across brokers ----------------------------------------------------------


async def test_two_brokers_are_called_concurrently() -> None:
    one = FakeAdapter(name="one", delay=0.5)
    two = FakeAdapter(name="two", delay=0.5)
    d = dispatcher({"one": one, "two": two}, [("a.*", "one"), ("*", "two")])
    started = time.monotonic()
    records = await d.dispatch([message(1, topic="a.x"), message(2, topic="b.x"), message(3, topic="a.y")])
    elapsed = time.monotonic() - started
    assert [r.kind for r in records] == ["acked"] * 3
    assert one.calls == [2] and two.calls == [1]  # each broker: its share in one call
    # One after the other would take 1.0s; concurrently about 0.5s.
    assert elapsed < 0.85, f"brokers were called one after the other ({elapsed:.2f}s)"


async def test_slow_broker_does_not_block_results_of_fast_one() -> None:
    fast = FakeAdapter(name="fast")
    slow = FakeAdapter(name="slow", delay=5.0)
    d = dispatcher({"fast": fast, "slow": slow}, [("a.*", "slow"), ("*", "fast")], max_attempts=5, publish_timeout=0.2)
    records = by_id(await d.dispatch([message(1, topic="a.x"), message(2, topic="b.x")]))
    assert records[1].kind == "wait"
    assert records[2].kind == "acked"


async def test_adapter_is_called_concurrently_by_wave_not_per_message() -> None:
    fake = FakeAdapter()
    await dispatcher({"main": fake}).dispatch([message(i) for i in range(1, 51)])
    assert fake.calls == [50]


async def test_dispatch_with_empty_batch() -> None:
    fake = FakeAdapter()
    assert await dispatcher({"main": fake}).dispatch([]) == []
    assert fake.calls == []


def test_fake_adapter_satisfies_protocol() -> None:
    assert isinstance(FakeAdapter(), Adapter)
    assert isinstance(BatchRecorder(), Adapter)
    assert inspect.iscoroutinefunction(FakeAdapter().publish)
