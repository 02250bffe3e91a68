"""Kafka topics for both Kafka clients: which exist, as far as a publish call needs to
know, and which names Kafka accepts (`topic_name_problem`, for `outbox-relay check`).

A record for a topic without metadata (not created yet, auto-creation off) makes the
client wait its whole request timeout, holding up every other record of the call. So
topics not seen before are probed first: all at once, under one deadline, so that six
missing topics cost one wait, not six; and a missing topic is remembered for a few
seconds, so the calls right after do not wait for it again. A topic found is trusted
for as long as the adapter lives: probing it again would, during a broker outage,
answer its records "no metadata" (an attempt spent) instead of letting the call wait
for the broker (no attempt spent). A topic deleted while the relay runs makes its
records wait in the client until `publish_timeout`, which opens the broker's circuit
(engine/circuit.py): nothing is dead-lettered, and the log says which broker.
"""

from __future__ import annotations

import asyncio
import functools
import string
import time
from collections.abc import Awaitable, Callable, Iterable

from outbox_relay.models import PublishResult

METADATA_WAIT_S = 5.0  # at most this long per call for every unknown topic together
REMEMBER_MISSING_S = 5.0


class TopicMetadata:
    def __init__(self, wait: float, *, remember_missing: float = REMEMBER_MISSING_S):
        self._wait = wait
        self._remember = remember_missing
        self._known: set[str] = set()
        self._missing: dict[str, tuple[float, PublishResult]] = {}  # topic -> (until, answer)

    async def missing(
        self, topics: Iterable[str], probe: Callable[[str], Awaitable[object]]
    ) -> dict[str, PublishResult]:
        """The answer for each of `topics` that has no metadata; `probe(topic)` returns
        once the topic's metadata is there and raises if it never comes."""
        now = time.monotonic()
        answers: dict[str, PublishResult] = {}
        unknown: list[str] = []
        for topic in set(topics) - self._known:
            remembered = self._missing.get(topic)
            if remembered is not None and remembered[0] > now:
                answers[topic] = remembered[1]
            else:
                unknown.append(topic)
        if not unknown:
            return answers
        tasks = {topic: asyncio.ensure_future(probe(topic)) for topic in unknown}
        try:
            await asyncio.wait(tasks.values(), timeout=self._wait)
        finally:
            # Also when the caller is cancelled (publish_timeout): no probe task outlives
            # the call. (librdkafka's probe runs in a thread, which ends at its own
            # timeout, `wait`.)
            for task in tasks.values():
                task.cancel()
        for topic, task in tasks.items():
            if task.done() and not task.cancelled() and task.exception() is None:
                self._known.add(topic)
                self._missing.pop(topic, None)
                continue
            if task.done() and not task.cancelled():
                why = repr(task.exception())
            else:
                why = f"no answer within {self._wait:g}s"
            answer = PublishResult.transient(f"no metadata for topic {topic!r} (does it exist?): {why}")
            self._missing[topic] = (time.monotonic() + self._remember, answer)
            answers[topic] = answer
        return answers


# Kafka's rule for topic names (Topic.validate in the broker): 1 to 249 of these
# characters, and neither "." nor "..". Anything else the broker refuses, so a message
# routed there can only be dead-lettered (`invalid Kafka topic name`).
KAFKA_TOPIC_CHARACTERS = frozenset(string.ascii_letters + string.digits + "._-")
MAX_KAFKA_TOPIC_LENGTH = 249


def topic_name_problem(name: str, *, whole: bool = True) -> str | None:
    """Why Kafka refuses `name` as a topic, in one line, or None.

    `whole` False: `name` is only what every name to come contains (the literal
    characters of a route's topic pattern), so only a character Kafka refuses or a
    length over its maximum count, not what a longer name could make right.
    """
    refused = sorted({c for c in name if c not in KAFKA_TOPIC_CHARACTERS})
    if refused:
        return "Kafka topic names take only letters A-Z a-z, digits, '.', '_' and '-', not " + ", ".join(
            map(repr, refused)
        )
    if len(name) > MAX_KAFKA_TOPIC_LENGTH:
        length = len(name) if whole else f"at least {len(name)}"
        return f"Kafka topic names are at most {MAX_KAFKA_TOPIC_LENGTH} characters, not {length}"
    if whole and name in ("", ".", ".."):
        return f"Kafka refuses the topic name {name!r}"
    return None


@functools.lru_cache(maxsize=1024)
def valid_topic(name: str) -> bool:
    """Kafka's own rule for topic names (topic_name_problem), cached for the publish
    path: anything else the broker rejects, so such a record is refused before it is
    sent."""
    return topic_name_problem(name) is None
