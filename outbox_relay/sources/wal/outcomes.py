"""What becomes of each message of one dispatch round of the WAL source.

The dispatcher (engine/dispatch.py) answers with a Record per message it attempted:
ACKED, RETRY, WAIT or DEAD. It answers nothing for a message it did not attempt: a
later message of a key whose earlier one failed in the same call or an earlier wave,
or a message of a wave it did not start (``publish_timeout`` passed). From the WAL
there is no row to leave pending, so each message is either done (acked), parked into
the table (parking.py), or dispatched again in the next round.

The rules, in stream order:
- acked: done, even after a failure of its key (dispatch.py logs that exception; the
  broker has it, sending it again would only add a duplicate);
- a key the table holds back (``held``: it was held already, or a message of it was
  parked in this round) is parked whole: every later message of it goes to the table
  behind the parked one, attempted or not, with its record if it has one;
- RETRY, and DEAD under ``hold``: parked, and the key is held from then on;
- DEAD under ``release``: parked (a dead letter), and the key goes on: the table would
  not hold it back either;
- WAIT (the broker was away) while ``park_waits`` is False: kept in memory and tried
  again, with the rest of its key behind it; once it is True (past ``park_after``),
  parked like RETRY, with no attempt spent;
- not attempted, of a key not held: tried again in the next round. Each round attempts
  at least the first message of every key left, so the rounds end.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from outbox_relay.models import Message, Record, RecordKind

Parked = tuple[Message, Record | None]  # a message and its outcome (None: not attempted)


@dataclass
class Sorted:
    """One round's messages, each in one list, stream order kept in each."""

    acked: int = 0
    parked: list[Parked] = field(default_factory=list)
    again: list[Message] = field(default_factory=list)  # for the next round
    waiting: list[Record] = field(default_factory=list)  # the WAIT records kept in memory


def sort_outcomes(
    messages: Sequence[Message],
    records: Sequence[Record],
    held: set[str],
    *,
    hold_dead_letters: bool,
    park_waits: bool,
    parked_waits: Collection[int] = (),
) -> Sorted:
    """Sort one round; `held` (keys the table holds back) grows with the keys parked.
    `parked_waits`: ids of messages whose WAIT is parked whatever `park_waits` says
    (exactly once: a broker without transactions, exactly_once.py)."""
    by_id = {record.id: record for record in records}
    result = Sorted()
    again_keys: set[str] = set()
    for message in messages:
        record = by_id.get(message.id)
        key = message.key
        if record is not None and record.kind is RecordKind.ACKED:
            result.acked += 1
            continue
        if key is not None and key in held:
            result.parked.append((message, record))
            continue
        if key is not None and key in again_keys:
            # Behind an earlier message of its key that goes again: it goes again too
            # (the dispatcher never decides one after such a message, but order holds
            # whatever it answers).
            result.again.append(message)
            continue
        if record is None or (record.kind is RecordKind.WAIT and not park_waits and record.id not in parked_waits):
            result.again.append(message)
            if record is not None:
                result.waiting.append(record)
            if key is not None:
                again_keys.add(key)
            continue
        result.parked.append((message, record))
        released = record.kind is RecordKind.DEAD and not hold_dead_letters
        if key is not None and not released:
            held.add(key)
    return result
