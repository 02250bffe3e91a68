"""How both Kafka clients keep a key's order: a call's records go out in rounds.

The rule (outbox_relay.adapter.Adapter, ``keeps_key_order``): once message *i* of a key
is not acked, no later message of that key in the call is acked, nor written. A Kafka
producer does not give it by itself. The broker writes or refuses a partition's record
batch as a whole, but it judges each batch on its own: after it refused one (too large
for the topic), it writes the partition's next batch, and a producer's sequence numbers
do not stop it (a broker with no state for a producer id on a partition, as for every
fresh producer, accepts any first sequence). So a key's run spread over two batches can
lose its first half and deliver its second, and an innocent record sharing a refused
batch with another key's oversized one can be overtaken by the next record of its key.

So the records of a call go out in rounds, and each round sends at most one batch per
partition, built by the adapter (``Round.add`` says when it is full): all of a key's
records in a round are in one batch (same key, same partition) and share its fate.
The next round starts once every batch of this one is answered, and leaves out the
keys that failed (``not_sent``). A batch refused as too large for the topic may be a
neighbour's fault: its records go again one per batch, in order, and only what is too
large alone is dead-lettered. One round is the usual case (a round holds up to
``max_batch_size`` bytes per partition); the price of the rule is one round trip per
further batch of a partition within a call, where the producer alone would have sent
it right after the first.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

from outbox_relay.adapter import KeyStops
from outbox_relay.models import OutgoingMessage, PublishResult


def record_headers(out: OutgoingMessage) -> list[tuple[str, bytes]]:
    """A message's Kafka record headers: its own, then message-id and content-type."""
    message = out.message
    headers = [(name, value.encode("utf-8")) for name, value in message.headers.items()]
    headers.append(("message-id", str(message.message_id).encode("ascii")))
    headers.append(("content-type", message.content_type.encode("utf-8")))
    return headers


@dataclass
class Entry:
    index: int  # position in the call
    out: OutgoingMessage
    early: PublishResult | None = None  # decided before sending (invalid topic, no metadata)
    alone: bool = False  # goes in a batch of its own (its batch was refused as too large)
    # The record's key and headers as bytes, made once: a record's size is estimated
    # before it is appended, and it may be appended again (a batch refused as too large).
    key: bytes | None = field(init=False)
    headers: list[tuple[str, bytes]] = field(init=False)
    size: int = field(init=False, default=0)  # the record's estimated size, where the adapter needs it

    def __post_init__(self) -> None:
        key = self.out.message.key
        self.key = None if key is None else key.encode("utf-8")
        self.headers = record_headers(self.out)


@dataclass
class Batch:
    """One batch of a round: the records of one group (a partition, or for librdkafka
    the whole round), in call order."""

    group: Hashable
    entries: list[Entry]
    builder: object  # the client's batch (aiokafka's BatchBuilder) or None


class Rounds:
    """The bookkeeping of one call: queues per group, key stops, results.

    `group_of(out)` names the batch a record goes in (its partition); `open_batch(group)`
    starts an empty batch and `add(builder, entry)` appends to it, False when it is full
    (a batch always takes its first record, however large).
    """

    def __init__(self, batch: Sequence[OutgoingMessage]) -> None:
        self.batch = batch
        self.results: list[PublishResult | None] = [None] * len(batch)
        self.stops = KeyStops()
        self._queues: dict[Hashable, deque[Entry]] = {}

    def queue(self, group: Hashable, entry: Entry) -> None:
        self._queues.setdefault(group, deque()).append(entry)

    def __bool__(self) -> bool:
        return bool(self._queues)

    def next_round(self, open_batch: Callable[[Hashable], object], add: Callable[[object, Entry], bool]) -> list[Batch]:
        """The batches of the next round: per group, records from the head of its queue
        while they fit; keys that failed are answered ``not_sent`` on the way."""
        batches: list[Batch] = []
        for group in list(self._queues):
            queue = self._queues[group]
            builder = open_batch(group)
            taken: list[Entry] = []
            while queue:
                entry = queue[0]
                held = self.stops.held(entry.out)
                if held is None and entry.early is not None and _has_key_of(taken, entry):
                    # Refused before sending, after a record of its key that is not
                    # answered yet: it waits at the head for the next round, so that
                    # record's own answer is not turned into "not_sent" by this refusal.
                    break
                if held is not None or entry.early is not None:
                    queue.popleft()
                    self.results[entry.index] = self.stops.note(entry.out, held or entry.early)  # type: ignore[arg-type]
                    continue
                if taken and (entry.alone or taken[-1].alone):
                    break
                if not add(builder, entry):
                    if not taken:  # cannot happen: a batch takes its first record
                        raise RuntimeError("an empty batch refused a record")
                    break
                taken.append(queue.popleft())
            if not queue:
                del self._queues[group]
            if taken:
                batches.append(Batch(group, taken, builder))
        return batches

    def settle(self, entry: Entry, result: PublishResult) -> None:
        self.results[entry.index] = self.stops.settle_one(entry.out, result)

    def again_alone(self, batch: Batch) -> None:
        """Send the batch's records again, each in a batch of its own, before the rest of
        their group (the batch was refused as too large: maybe only one record is)."""
        queue = self._queues.setdefault(batch.group, deque())
        for entry in reversed(batch.entries):
            entry.alone = True
            queue.appendleft(entry)

    def answer_the_rest(self, result: PublishResult) -> None:
        """Nothing more can be sent in this call: everything still queued gets `result`
        (or ``not_sent`` after its key's failure)."""
        for queue in self._queues.values():
            for entry in queue:
                self.results[entry.index] = self.stops.settle_one(entry.out, entry.early or result)
        self._queues.clear()

    def final(self) -> list[PublishResult]:
        return [r if r is not None else PublishResult.transient("not answered") for r in self.results]


def _has_key_of(taken: Sequence[Entry], entry: Entry) -> bool:
    key = entry.out.message.key
    return key is not None and any(t.out.message.key == key for t in taken)
