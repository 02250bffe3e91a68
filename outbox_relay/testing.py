"""Fakes for unit-testing code around the engine (ours and yours).

:class:`FakeAdapter` is an in-memory broker: it records what it acks and answers
with whatever a script says, so tests can inject transient, permanent and
"unavailable" failures per message. It is for engine tests only: adapters are
tested against real brokers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from outbox_relay.adapter import KeyStops
from outbox_relay.models import OutgoingMessage, PublishResult

Script = Callable[[OutgoingMessage], PublishResult | None]


@dataclass
class FakeAdapter:
    name: str = "fake"
    script: Script | None = None  # return None to ack
    delay: float = 0.0
    delivered: list[OutgoingMessage] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)  # batch sizes, one per publish call
    connected: bool = False
    fail_connect: int = 0  # how many connect() calls fail before one succeeds
    # True: may be handed several messages of one key per call, and keeps the
    # contract of such adapters (after a key's first failure, the rest is not sent).
    keeps_key_order: bool = False
    keys_per_call: list[dict[str | None, int]] = field(default_factory=list)

    async def connect(self) -> None:
        if self.fail_connect > 0:
            self.fail_connect -= 1
            raise ConnectionError("fake broker refused the connection")
        self.connected = True

    async def close(self) -> None:
        self.connected = False

    async def ready(self) -> bool:
        return self.connected

    async def publish(self, batch: Sequence[OutgoingMessage]) -> Sequence[PublishResult]:
        self.calls.append(len(batch))
        if self.delay:
            await asyncio.sleep(self.delay)
        per_key: dict[str | None, int] = {}
        stops = KeyStops()
        results = []
        for out in batch:
            per_key[out.message.key] = per_key.get(out.message.key, 0) + 1
            held = stops.held(out) if self.keeps_key_order else None
            answer = held or (self.script(out) if self.script else None)
            if answer is None:
                self.delivered.append(out)
                answer = PublishResult.acked()
            results.append(stops.note(out, answer))
        self.keys_per_call.append(per_key)
        return results

    @property
    def delivered_ids(self) -> list[str]:
        return [str(out.message_id) for out in self.delivered]
