"""What a source is to the engine: the interface every source implements.

A source finds committed messages and hands them, in the order it must keep, to the
engine's dispatcher (engine/dispatch.py): ``await dispatcher.dispatch(messages)``
routes each one, sends runs of a key in one call to an adapter that keeps key order,
applies the circuits, the retry and dead-letter policy and ``publish_timeout``, and
answers one Record per message it attempted (engine/store.py, RecordKind):

- ``ACKED``: the broker has it;
- ``RETRY``: it failed, an attempt is spent, it is due again at ``record.delay``;
- ``WAIT``: its broker was away (unreachable, no answer in time, circuit open): no
  attempt spent, due again after the broker's backoff;
- ``DEAD``: given up (a rejection, or attempts exhausted): a dead letter, with a reason.

No record: not attempted (a later message of a key whose earlier one failed, or a wave
the call did not start); it must go again after what is before it. What the answers
mean is the source's to record, durably, before it takes more:

- ``table`` (sources/table.py): the batch's rows, claimed in one transaction, get their
  outcome in the same transaction (engine/store.py, record): dispatched, a retry time
  and attempt, a dead letter; a row not attempted stays pending, before its key's next.
- ``wal`` (sources/wal/): an acked message is done; any other is *parked*, inserted
  into the table with its outcome, and every later message of its key follows it there
  (the table engine owns it from then on); a commit's end LSN is confirmed to the slot
  once all its messages, and all before them, are acked or parked.

Then the source tells the relay's observer (metrics, the demo, tests) about what it is
done with: ``observer.batch_recorded(messages, records)``, from its own task.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Protocol

from outbox_relay.engine.dispatch import Dispatcher
from outbox_relay.models import Message, Record


class RelayObserver(Protocol):
    """Told about every message a source is done with (the metrics, the demo and tests)."""

    def batch_recorded(self, messages: Sequence[Message], records: Sequence[Record]) -> None: ...


class Source(Protocol):
    """A source of one relay process, run beside the others with the relay's dispatcher.

    The relay calls ``run`` once, in a task of its own, after the brokers are connected;
    it returns once `stop` is set, finishing what it has in hand (the relay waits for it
    up to ``relay.shutdown_timeout``, then cancels it: a source leaves nothing recorded
    that was not done). It retries database and broker trouble itself; raising stops the
    relay loudly (the error is the process's exit line).

    Optional: ``async def check_start(conn, brokers) -> None``, called once before any
    source runs, on the relay's start-up connection, with the broker handles by name:
    raising refuses the start (a configuration the source cannot honour), before
    anything is published."""

    name: str

    async def run(self, dispatcher: Dispatcher, stop: asyncio.Event, observer: RelayObserver) -> None: ...

    def readiness(self) -> tuple[bool, dict[str, Any]] | None:
        """Its say in /readyz, from memory (observability/health.py, ReadinessSource);
        None: nothing to add to the relay's own probes."""
        ...
