"""The WAL source keeps what it writes of acked messages (receipts, delivered outcomes)
before the position a restart skips to: a batch whose acks span a paused round writes
them once every message is settled, before mark_done or the park; a relay stopped in the
pause writes neither, so the restart sends the batch again and writes them then.

The relay's batch handling with a scripted dispatcher and a parking that logs its calls
(fakes of the engine's parts; the whole relay against PostgreSQL and Kafka is
tests/e2e/test_wal_receipts.py)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from outbox_relay.models import Message, Record, RecordKind
from outbox_relay.sources.wal import framing, pgoutput
from outbox_relay.sources.wal.relay import WalRelay
from outbox_relay.sources.wal.transactions import TransactionPart

Round = Callable[[Sequence[Message]], list[Record]]


class LoggedParking:
    """What the relay asks of the table, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    async def held_keys(self, keys: set[str]) -> set[str]:
        return set()

    async def record_acked(self, receipts: Sequence[tuple[Message, str]], delivered: Sequence[Any]) -> None:
        self.calls.append(("record_acked", [(m.topic, m.key, receipt) for m, receipt in receipts]))

    async def mark_done(self, through: tuple[int, int]) -> None:
        self.calls.append(("mark_done", through))

    async def park(self, parked: Sequence[tuple[Message, Record | None]], *, through: Any, streamer: Any) -> None:
        self.calls.append(("park", [(m.key, r.kind if r else None) for m, r in parked]))

    def note_held(self, held: set[str]) -> None:
        pass


class ScriptedDispatcher:
    def __init__(self, *rounds: Round) -> None:
        self.rounds = list(rounds)

    async def dispatch(self, messages: Sequence[Message]) -> list[Record]:
        return self.rounds.pop(0)(messages)


def acked(message: Message) -> Record:
    return Record(message.id, RecordKind.ACKED, receipt=f'{{"offset": {message.id}}}')


def part(*keys: str, last: bool) -> TransactionPart:
    messages = [
        pgoutput.Message(
            True, 100 + n, "outbox", framing.encode(uuid.uuid4(), "t", key, "application/json", "{}", b"{}")
        )
        for n, key in enumerate(keys)
    ]
    return TransactionPart(xid=7, commit_lsn=50, commit_time=0, messages=messages, end_lsn=200 if last else None)


def relay(dispatcher: ScriptedDispatcher) -> WalRelay:
    return WalRelay(
        "postgresql://unused",
        schema="outbox",
        slot_name="s",
        dispatcher=dispatcher,  # type: ignore[arg-type]
        hold_dead_letters=False,
        receipts=True,
    )


async def test_acks_of_a_round_before_a_pause_are_kept_with_the_rest_before_the_position() -> None:
    def first(messages: Sequence[Message]) -> list[Record]:
        a, b = messages
        return [acked(a), Record(b.id, RecordKind.WAIT, delay=0.01)]

    def second(messages: Sequence[Message]) -> list[Record]:
        return [acked(m) for m in messages]

    parking = LoggedParking()
    assert await relay(ScriptedDispatcher(first, second))._handle([part("a", "b", last=False)], parking)  # type: ignore[arg-type]
    (name, receipts), done = parking.calls
    assert name == "record_acked" and [(k, r) for _, k, r in receipts] == [
        ("a", '{"offset": 1}'),
        ("b", '{"offset": 2}'),
    ]
    assert done == ("mark_done", (50, 101))


async def test_acks_are_kept_before_the_park_of_the_rest() -> None:
    def only(messages: Sequence[Message]) -> list[Record]:
        a, b = messages
        return [acked(a), Record(b.id, RecordKind.RETRY, error="refused", delay=60)]

    parking = LoggedParking()
    assert await relay(ScriptedDispatcher(only))._handle([part("a", "b", last=True)], parking)  # type: ignore[arg-type]
    assert [name for name, _ in parking.calls] == ["record_acked", "park"]
    assert [k for _, k, _ in parking.calls[0][1]] == ["a"] and parking.calls[1][1] == [("b", RecordKind.RETRY)]


async def test_a_relay_stopped_in_a_pause_keeps_nothing_and_moves_no_position() -> None:
    paused = asyncio.Event()

    def first(messages: Sequence[Message]) -> list[Record]:
        a, b = messages
        paused.set()
        return [acked(a), Record(b.id, RecordKind.WAIT, delay=30)]

    parking = LoggedParking()
    wal = relay(ScriptedDispatcher(first))
    handling = asyncio.create_task(wal._handle([part("a", "b", last=False)], parking))  # type: ignore[arg-type]
    await paused.wait()
    wal.stop()
    assert await asyncio.wait_for(handling, 5) is False
    assert parking.calls == []
