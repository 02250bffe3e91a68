"""``type: stdout``: one JSON line per message on standard output (see outbox_relay.json_lines)."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from outbox_relay.json_lines import json_line
from outbox_relay.models import OutgoingMessage, PublishResult

from ._options import Options, parse_options


class StdoutOptions(Options):
    pass


class StdoutAdapter:
    # One write of the whole call, in order, all or nothing.
    keeps_key_order = True

    def __init__(self, name: str, stream: TextIO | None = None):
        self.name = name
        self._stream = stream

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stdout

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        self.stream.flush()

    async def ready(self) -> bool:
        return not self.stream.closed

    async def publish(self, batch: Sequence[OutgoingMessage]) -> Sequence[PublishResult]:
        try:
            self.stream.write("".join(json_line(out) for out in batch))
            self.stream.flush()
        except (OSError, ValueError) as exc:
            return [PublishResult.transient(f"stdout write failed: {exc}")] * len(batch)
        return [PublishResult.acked()] * len(batch)


def create(name: str, options: Mapping[str, Any]) -> StdoutAdapter:
    parse_options(StdoutOptions, options)
    return StdoutAdapter(name)
