"""Pipelined keys: a key's run goes to an order-keeping adapter in one call, and a
failure in the middle of the run never lets a later message of the key be marked
dispatched ahead of it. Engine only, with FakeAdapter; the same against real brokers
is in tests/e2e/test_pipelined_runs.py."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from outbox_relay.config import RouteConfig
from outbox_relay.engine.dispatch import Dispatcher, waves
from outbox_relay.engine.retry import Backoff
from outbox_relay.engine.routing import Router
from outbox_relay.models import Message, PublishResult, Record
from outbox_relay.testing import FakeAdapter
from tests.support.factories import message

FAILURES = {
    "transient": PublishResult.transient("leader moved"),
    "unavailable": PublishResult.unavailable("broker away"),
    "permanent": PublishResult.permanent("too large"),
}


def dispatcher(
    adapters: dict[str, FakeAdapter], routes: list[tuple[str, str]] | None = None, *, hold: bool = False
) -> Dispatcher:
    configs = [RouteConfig(topic=t, broker=b) for t, b in routes or [("*", "main")]]
    return Dispatcher(
        adapters,
        Router(configs),
        Backoff(0.1, 5.0),  # type: ignore[arg-type]
        max_attempts=5,
        publish_timeout=5.0,
        hold_dead_letters=hold,
    )


def run(key: str, n: int, start: int = 1, topic: str = "orders.created") -> list[Message]:
    return [message(i, topic=topic, key=key) for i in range(start, start + n)]


def kinds(records: Sequence[Record]) -> dict[int, str]:
    return {r.id: r.kind for r in records}


async def test_a_hot_key_goes_out_in_one_call() -> None:
    fake = FakeAdapter(keeps_key_order=True)
    records = await dispatcher({"main": fake}).dispatch(run("k", 200))
    assert fake.calls == [200]
    assert [out.message.id for out in fake.delivered] == list(range(1, 201)), "in enqueue order"
    assert set(kinds(records).values()) == {"acked"} and len(records) == 200


async def test_without_the_capability_a_key_is_one_message_per_call() -> None:
    fake = FakeAdapter(keeps_key_order=False)
    await dispatcher({"main": fake}).dispatch(run("k", 5) + run("j", 5, start=6))
    assert fake.calls == [2, 2, 2, 2, 2]
    assert all(max(per_key.values()) == 1 for per_key in fake.keys_per_call)


async def test_many_keys_share_one_call() -> None:
    fake = FakeAdapter(keeps_key_order=True)
    batch = sorted((m for k in range(10) for m in run(f"k{k}", 5, start=100 * k)), key=lambda m: m.id)
    await dispatcher({"main": fake}).dispatch(batch)
    assert fake.calls == [50]


@pytest.mark.parametrize("failure", sorted(FAILURES))
async def test_failure_mid_run_marks_only_what_came_before(failure: str) -> None:
    fake = FakeAdapter(keeps_key_order=True, script=lambda out: FAILURES[failure] if out.message.id == 10 else None)
    records = await dispatcher({"main": fake}).dispatch(run("k", 20))
    outcome = kinds(records)
    assert [i for i, k in outcome.items() if k == "acked"] == list(range(1, 10))
    assert outcome[10] == {"transient": "retry", "unavailable": "wait", "permanent": "dead"}[failure]
    assert not set(outcome) & set(range(11, 21)), "later messages left pending, no attempt spent"
    assert [out.message.id for out in fake.delivered] == list(range(1, 10)), "the adapter sent nothing after it"


def acks_after_failure(fail: dict[int, PublishResult], hold: bool = False) -> tuple[FakeAdapter, Dispatcher]:
    """A broker that acks later messages of a key after an earlier one failed, as
    RabbitMQ does when it returns an unroutable message after routing the next ones.
    The dispatcher sees an order-keeping adapter; the fake then stops applying the
    contract's stops."""
    fake = FakeAdapter(keeps_key_order=True, script=lambda out: fail.get(out.message.id))
    engine = dispatcher({"main": fake}, hold=hold)
    fake.keeps_key_order = False
    return fake, engine


@pytest.mark.parametrize("hold", [False, True])
async def test_a_broker_that_acks_after_a_dead_letter_is_marked_and_logged_unless_released(hold: bool) -> None:
    fake, engine = acks_after_failure({3: FAILURES["permanent"]}, hold)
    with capture_logs() as logs:
        records = await engine.dispatch(run("k", 5))
    assert fake.calls == [5]
    # They were delivered: marking them avoids a needless duplicate.
    assert kinds(records) == {1: "acked", 2: "acked", 3: "dead", 4: "acked", 5: "acked"}
    exceptions = [e["failed_id"] for e in logs if e["event"] == "key_order_exception"]
    assert exceptions == ([3, 3] if hold else []), "release: going on after a dead letter is the policy"


async def test_a_late_ack_after_a_transient_failure_is_an_order_exception() -> None:
    fake, engine = acks_after_failure({2: FAILURES["transient"]})
    with capture_logs() as logs:
        records = await engine.dispatch(run("k", 3))
    assert kinds(records) == {1: "acked", 2: "retry", 3: "acked"}
    logged = [e["message_id"] for e in logs if e["event"] == "key_order_exception"]
    assert logged == [str(fake.delivered[-1].message_id)]


async def test_released_dead_letter_then_a_retry_then_a_late_ack_is_an_order_exception() -> None:
    _fake, engine = acks_after_failure({2: FAILURES["permanent"], 3: FAILURES["transient"]})
    with capture_logs() as logs:
        records = await engine.dispatch(run("k", 4))
    assert kinds(records) == {1: "acked", 2: "dead", 3: "retry", 4: "acked"}
    assert [e["failed_id"] for e in logs if e["event"] == "key_order_exception"] == [3]


async def test_not_sent_out_of_turn_is_a_transient_failure_not_a_loop() -> None:
    # An adapter bug: "not sent" for a key's first message, or a keyless one. Left
    # unrecorded it would be claimed again at once, forever; it backs off instead.
    fake = FakeAdapter(keeps_key_order=True, script=lambda out: PublishResult.not_sent("?"))
    records = await dispatcher({"main": fake}).dispatch([message(1, key="k"), message(2, key="k"), message(3)])
    assert kinds(records) == {1: "retry", 3: "retry"}


async def test_a_run_cut_short_by_the_adapters_time_leaves_the_rest_due_at_once() -> None:
    # An adapter sending a key's run in rounds stops when its time is up (SQS, NATS with
    # key_rounds): the rest of a key whose earlier messages it acked comes back not_sent.
    # Nothing is written for them (pending as they were: no attempt, no delay, claimable
    # at once), the key stops for the batch, and another key's run goes on; nothing is
    # logged or counted as a failure.
    cut = {4, 5, 6}  # key k: 1-3 acked, then its time ran out
    fake = FakeAdapter(
        keeps_key_order=True,
        script=lambda out: PublishResult.not_sent("not sent: rounds took timeout") if out.message.id in cut else None,
    )
    d = dispatcher({"main": fake})
    with capture_logs() as logs:
        records = await d.dispatch(run("k", 6) + run("j", 3, start=7))
    assert kinds(records) == {1: "acked", 2: "acked", 3: "acked", 7: "acked", 8: "acked", 9: "acked"}
    assert [e["event"] for e in logs if e["log_level"] != "debug"] == []
    failures = d.metrics.publish_failures.collect()[0].samples
    assert all(sample.value == 0 for sample in failures), failures


async def test_after_a_run_cut_short_a_late_ack_is_still_an_order_exception() -> None:
    # An adapter that answers not_sent for message 2 and then acks 3 broke its promise:
    # 3 is marked (it was delivered) and logged, and 2 stays pending, as after a failure.
    _, d = acks_after_failure({2: PublishResult.not_sent("time")})
    with capture_logs() as logs:
        records = await d.dispatch(run("k", 3))
    assert kinds(records) == {1: "acked", 3: "acked"}
    assert [e["failed_id"] for e in logs if e["event"] == "key_order_exception"] == [2]


async def test_release_dead_letter_mid_run_then_not_sent_rest_goes_next_batch() -> None:
    fake = FakeAdapter(keeps_key_order=True, script=lambda out: FAILURES["permanent"] if out.message.id == 2 else None)
    records = await dispatcher({"main": fake}).dispatch(run("k", 4))
    assert kinds(records) == {1: "acked", 2: "dead"}, "3 and 4 were not sent: pending, no attempt spent"


async def test_a_key_switching_brokers_waits_for_the_earlier_broker() -> None:
    kafka, hook = FakeAdapter(name="kafka", keeps_key_order=True), FakeAdapter(name="hook", keeps_key_order=True)
    batch = run("k", 3, topic="a.x") + run("k", 2, start=4, topic="b.x") + run("k", 3, start=6, topic="a.x")
    records = await dispatcher({"kafka": kafka, "hook": hook}, [("a.*", "kafka"), ("b.*", "hook")]).dispatch(batch)
    assert kafka.calls == [3, 3] and hook.calls == [2], "three segments, three waves"
    assert len(records) == 8


async def test_a_key_switching_destinations_on_one_broker_waits_for_the_earlier_one() -> None:
    # Two topics on one Kafka broker are two partitions: nothing orders them.
    kafka = FakeAdapter(name="kafka", keeps_key_order=True)
    batch = run("k", 2, topic="orders.created") + run("k", 2, start=3, topic="orders.paid")
    await dispatcher({"kafka": kafka}, [("orders.*", "kafka")]).dispatch(batch)
    assert kafka.calls == [2, 2]
    assert [out.destination for out in kafka.delivered] == ["orders.created"] * 2 + ["orders.paid"] * 2


async def test_a_key_switching_brokers_stops_at_a_failure_on_the_first() -> None:
    kafka = FakeAdapter(
        name="kafka", keeps_key_order=True, script=lambda out: FAILURES["transient"] if out.message.id == 2 else None
    )
    hook = FakeAdapter(name="hook", keeps_key_order=True)
    batch = run("k", 3, topic="a.x") + run("k", 2, start=4, topic="b.x")
    records = await dispatcher({"kafka": kafka, "hook": hook}, [("a.*", "kafka"), ("b.*", "hook")]).dispatch(batch)
    assert kinds(records) == {1: "acked", 2: "retry"}
    assert hook.calls == [], "the second broker's segment never started"


# --- the waves with an order-keeping broker, as a property ---------------------------------


@dataclass
class Shape:
    keys: list[str | None]
    brokers: list[str]
    ordered: set[str] = field(default_factory=set)


@st.composite
def shapes(draw: Callable[..., object]) -> Shape:
    n = draw(st.integers(min_value=0, max_value=40))
    keys = draw(st.lists(st.sampled_from([None, "a", "b", "c"]), min_size=n, max_size=n))
    brokers = draw(st.lists(st.sampled_from(["x", "y"]), min_size=n, max_size=n))
    ordered = draw(st.sets(st.sampled_from(["x", "y"])))
    return Shape(keys, brokers, ordered)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(shapes())
def test_waves_keep_each_key_in_order_whatever_the_brokers(shape: Shape) -> None:
    messages = [message(i + 1, topic=b, key=k) for i, (k, b) in enumerate(zip(shape.keys, shape.brokers, strict=True))]
    broker_of = {m.id: m.topic for m in messages}
    result = waves(messages, lambda m: m.topic if m.topic in shape.ordered else None)
    position = {m.id: i for i, wave in enumerate(result) for m in wave}
    assert sorted(position) == [m.id for m in messages]
    by_key: dict[str, list[Message]] = {}
    for m in messages:
        if m.key is not None:
            by_key.setdefault(m.key, []).append(m)
    for run_ in by_key.values():
        for earlier, later in itertools.pairwise(run_):
            same = broker_of[earlier.id] == broker_of[later.id] and broker_of[later.id] in shape.ordered
            if same:
                assert position[later.id] >= position[earlier.id]
            else:
                assert position[later.id] > position[earlier.id], "another broker, or unordered: a later wave"
        # within one wave a key's messages all go to one order-keeping broker
        for wave in result:
            mine = [m for m in wave if m.key == run_[0].key]
            if len(mine) > 1:
                assert len({broker_of[m.id] for m in mine}) == 1 and broker_of[mine[0].id] in shape.ordered
