"""The dead-letter topic's publisher without a database: each key's copies in order (a
key stops at its first copy not acked), a copy refused for good sent again without its
payload, and a take bounded in bytes."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

from outbox_relay.config import DeadLetterTopicConfig
from outbox_relay.engine import dead_letter_topic as dlt
from outbox_relay.engine.retry import Backoff
from outbox_relay.models import Message, OutgoingMessage, PublishResult
from outbox_relay.observability.metrics import RelayMetrics
from outbox_relay.sqlfiles import Queries


def copy(row_id: int, key: str | None, payload: bytes = b"p", topic: str = "t") -> tuple[int, OutgoingMessage]:
    message = Message(row_id, uuid.uuid4(), topic, key, payload, "application/json", {}, 1, datetime.now(UTC))
    return row_id, OutgoingMessage(message, f"{topic}.DLT", True)


def publisher(
    answer: dict[int, list[PublishResult]], *, ordered: bool, publish_timeout: float = 5.0, takes: float = 0.0
) -> tuple[dlt.DeadLetterTopic, list[list[int]]]:
    calls: list[list[int]] = []

    async def publish(broker: str, batch: list[OutgoingMessage]) -> Sequence[PublishResult]:
        """As an adapter that keeps a key's order would: a key's copies after its first
        failure in the call are not sent. Each call takes `takes` seconds."""
        calls.append([out.message.id for out in batch])
        await asyncio.sleep(takes)
        failed: set[str | None] = set()
        answers = []
        for out in batch:
            if out.message.key is not None and out.message.key in failed:
                answers.append(PublishResult.not_sent("after its key's failure"))
                continue
            scripted = answer.get(out.message.id)
            result = scripted.pop(0) if scripted else PublishResult.acked()
            if result.outcome.value != "acked":
                failed.add(out.message.key)
            answers.append(result)
        return answers

    topic = dlt.DeadLetterTopic(
        "postgresql://unused",
        Queries("outbox"),
        DeadLetterTopicConfig(broker="b"),
        publish,
        lambda broker: ordered,
        schema="outbox",
        backoff=Backoff(0.05, 1.0),
        poll_interval=1.0,
        publish_timeout=publish_timeout,
        max_payload_bytes=None,
        max_batch_bytes=1000,
        retry_max=1.0,
        metrics=RelayMetrics(),
    )
    return topic, calls


async def test_a_key_stops_at_its_first_copy_not_acked() -> None:
    for ordered in (True, False):
        topic, calls = publisher({1: [PublishResult.unavailable("away")]}, ordered=ordered)
        done = await topic._publish_in_order([copy(1, "a"), copy(2, "a"), copy(3, "b"), copy(4, None)])
        assert sorted(done) == [3, 4], ordered
        if not ordered:  # one call per copy of a key: the later one is never handed over
            assert 2 not in [i for call in calls for i in call], "a later copy of key a went after its failure"


async def test_a_copy_refused_for_good_goes_again_without_its_payload_then_is_given_up() -> None:
    refusal = PublishResult.permanent("record too large")
    topic, calls = publisher({1: [refusal]}, ordered=True)
    assert await topic._publish_in_order([copy(1, "a", b"x" * 100), copy(2, "b")]) == [2, 1]
    assert calls[-1] == [1]  # sent again alone, without its payload
    topic, calls = publisher({1: [refusal, PublishResult.permanent("invalid topic")]}, ordered=True)
    # Refused with and without its payload while the broker takes other copies: given up;
    # the key's next copy waited behind it (not sent in that call), and goes next.
    assert await topic._publish_in_order([copy(2, "b"), copy(1, "a"), copy(5, "a")]) == [2, 1]
    assert await topic._publish_in_order([copy(5, "a")]) == [5]


async def test_while_the_broker_has_taken_no_copy_a_refusal_gives_nothing_up() -> None:
    # Every copy refused (the relay not authorized for the topic): the configuration's
    # problem, fixed later; nothing is marked meanwhile.
    never = {n: [PublishResult.permanent("not authorized")] * 2 for n in (1, 2)}
    topic, _ = publisher(never, ordered=True)
    assert await topic._publish_in_order([copy(1, "a"), copy(2, "b")]) == []
    assert await topic._publish_in_order([copy(1, "a"), copy(2, "b")]) == [1, 2]  # fixed: both go


def test_a_take_is_bounded_in_bytes_but_always_takes_one() -> None:
    assert dlt._within([(1, 600), (2, 300), (3, 200)], 1000) == [1, 2]
    assert dlt._within([(1, 5000), (2, 1)], 1000) == [1]


async def test_a_destination_that_refuses_after_taking_copies_loses_at_most_one_then_rests() -> None:
    refusal = PublishResult.permanent("topic authorization failed")
    # Copy 1 acked; then the relay's rights on the destination are revoked: 2 and 3 are
    # refused, with and without their payloads.
    script = {2: [refusal, refusal], 3: [refusal, refusal]}
    topic, _ = publisher(script, ordered=True)
    assert await topic._publish_in_order([copy(1, "a")]) == [1]
    assert await topic._publish_in_order([copy(2, "b")]) == [2]  # taken for this copy's problem
    assert await topic._publish_in_order([copy(3, "c")]) == []  # the destination's: it waits
    assert topic._resting, "its topic rests, left out of the next takes"
    assert await topic._publish_in_order([copy(3, "c")]) == [3]  # rights back: it goes
    assert not topic._resting


async def test_what_one_destination_takes_says_nothing_for_another() -> None:
    refusal = PublishResult.permanent("topic authorization failed")
    # t.DLT takes copies; u.DLT refuses every one: the relay lacks rights on it. Its
    # refusal is its own (nothing given up, its topic rests), whatever t.DLT took.
    topic, _ = publisher({2: [refusal, refusal]}, ordered=True)
    assert await topic._publish_in_order([copy(1, "a"), copy(2, "b", topic="u"), copy(3, "c")]) == [1, 3]
    assert list(topic._resting) == ["u"]
    # A key's copies to two destinations go in separate calls (no order between
    # topics), in the key's order.
    topic, calls = publisher({}, ordered=True)
    assert await topic._publish_in_order([copy(1, "a"), copy(2, "a", topic="u"), copy(3, "a")]) == [1, 2, 3]
    assert calls == [[1], [2], [3]]


async def test_a_take_cut_by_its_deadline_leaves_the_rest_for_the_next_take_without_a_failure() -> None:
    # Unordered: one call per copy of a key; each call takes 0.2 s of a 0.3 s deadline.
    topic, calls = publisher({}, ordered=False, publish_timeout=0.3, takes=0.2)
    done = await topic._publish_in_order([copy(1, "a"), copy(2, "a"), copy(3, "a")])
    assert done == [1, 2] and calls == [[1], [2]]
    assert topic._cut, "the next take starts at once, not after a backoff"
    topic._publish_timeout = 5.0
    assert await topic._publish_in_order([copy(3, "a")]) == [3] and not topic._cut


async def test_a_resting_topic_backs_off_longer_each_time_and_an_ack_resets_it() -> None:
    refusal = PublishResult.permanent("topic authorization failed")
    topic, _ = publisher({1: [refusal] * 4}, ordered=True)
    assert await topic._publish_in_order([copy(1, "a")]) == []
    assert topic._rests == {"t": 1}
    assert await topic._publish_in_order([copy(1, "a")]) == []
    assert topic._rests == {"t": 2}
    assert await topic._publish_in_order([copy(1, "a")]) == [1]  # rights back
    assert topic._rests == {} and topic._resting == {}


async def test_a_take_with_failures_cut_by_its_deadline_is_no_clean_take() -> None:
    # Wave 1: a's copy fails, b's is acked, after 0.35 s; wave 2 (b's next copy) finds
    # the 0.3 s deadline passed: cut, but the failure counts (the run loop backs off).
    topic, _ = publisher({1: [PublishResult.transient("leader moved")]}, ordered=False, publish_timeout=0.3, takes=0.35)
    assert await topic._publish_in_order([copy(1, "a"), copy(3, "b"), copy(4, "b")]) == [3]
    assert topic._cut and topic._take_failures == 1
    # Nothing left to send after the failure (a's next copy waits behind it): no cut.
    topic, _ = publisher({1: [PublishResult.transient("leader moved")]}, ordered=False)
    assert await topic._publish_in_order([copy(1, "a"), copy(2, "a")]) == []
    assert not topic._cut and topic._take_failures == 1


async def test_a_destination_refusing_a_whole_take_gets_one_bare_resend_and_one_rest() -> None:
    refusal = PublishResult.permanent("topic authorization failed")
    topic, calls = publisher({n: [refusal, refusal] for n in range(1, 11)}, ordered=True)
    assert await topic._publish_in_order([copy(n, None) for n in range(1, 11)]) == []
    assert calls == [list(range(1, 11)), [1]]  # the take's call, then one copy sent bare
    assert topic._rests == {"t": 1} and list(topic._resting) == ["t"]


async def test_after_a_start_a_refused_copy_rests_until_its_destination_takes_another() -> None:
    # A fresh relay (no ack seen yet): the only copy of a take is refused for its own
    # reason, bare too. No proof either way: its topic rests. The next take after the
    # rest holds another key's copy, which the destination takes: the refused one is
    # then given up, and the key's later copy goes.
    refusal = PublishResult.permanent("header too large")
    topic, _ = publisher({1: [refusal] * 4}, ordered=True)
    assert await topic._publish_in_order([copy(1, "a")]) == []
    assert list(topic._resting) == ["t"]
    assert await topic._publish_in_order([copy(1, "a"), copy(2, "a"), copy(3, "b")]) == [3, 1]
    assert await topic._publish_in_order([copy(2, "a")]) == [2]
    assert topic._resting == {}
