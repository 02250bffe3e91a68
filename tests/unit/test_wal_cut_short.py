"""Exactly once from the WAL source beside another broker whose adapter cut a key's run
short (its rounds ran out of time: not_sent after an ack, no record): the key's first
unrecorded message gets a WAIT, so that it is parked at once with the rest of its key
behind it, instead of the Kafka transaction staying open while the other broker's
rounds go on (review of 5fd5128)."""

from __future__ import annotations

from outbox_relay.models import Record, RecordKind
from outbox_relay.sources.wal.exactly_once import ExactlyOnce
from tests.support.factories import message


def test_the_first_unrecorded_message_of_a_key_another_broker_acked_is_parked() -> None:
    todo = [message(1, key="k"), message(2, key="k"), message(3, key="k"), message(4, key="j"), message(5)]
    records = [
        Record(1, RecordKind.ACKED, broker="sqs"),  # k: acked, then 2 and 3 cut short
        Record(4, RecordKind.ACKED, broker="kafka"),
        Record(5, RecordKind.ACKED, broker="sqs"),
    ]
    cut = ExactlyOnce._cut_short(todo, records, ours={4})
    assert [(r.id, r.kind) for r in cut] == [(2, RecordKind.WAIT)]


def test_a_key_acked_by_our_own_broker_or_failed_is_not_cut() -> None:
    todo = [message(1, key="k"), message(2, key="k"), message(3, key="j"), message(4, key="j")]
    records = [
        Record(1, RecordKind.ACKED, broker="kafka"),  # ours: 2 goes again in this transaction
        Record(3, RecordKind.WAIT, broker="sqs"),  # failed: parked as a wait already
    ]
    assert ExactlyOnce._cut_short(todo, records, ours={1}) == []
