"""``type: file``: appends JSON lines to a file and fsyncs before it acks.

A batch is written and fsynced once, then acked as a whole: an ack means the
lines are on disk. A crash between the write and the ack leaves lines that will be
written again (at-least-once); readers deduplicate by ``message_id``.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import field_validator

from outbox_relay.json_lines import json_line
from outbox_relay.models import OutgoingMessage, PublishResult

from ._options import Options, parse_options


class FileOptions(Options):
    # The file the JSON lines are appended to (relative: to the relay's working
    # directory); it and its parent directories are created at connect.
    path: str
    # fsync each batch before it is acked. false: acked once written to the OS, so a
    # machine (not process) crash can lose lines whose rows are already marked.
    fsync: bool = True

    @field_validator("path")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value


class FileAdapter:
    # One write and one fsync of the whole call, in order, all or nothing.
    keeps_key_order = True

    def __init__(self, name: str, options: FileOptions):
        self.name = name
        self.path = Path(options.path)
        self._fsync = options.fsync
        self._fd: int | None = None
        self._lock = asyncio.Lock()
        self._receipt_path = json.dumps(str(self.path.absolute()))

    async def connect(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    async def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    async def ready(self) -> bool:
        return self._fd is not None

    def _write(self, data: bytes) -> int:
        """Append `data` (and fsync): the byte offset it starts at."""
        assert self._fd is not None
        start = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            if self._fsync:
                os.fsync(self._fd)
        except OSError:
            # Never leave half a line (disk full): it would merge with the next record.
            os.ftruncate(self._fd, start)
            raise
        # Where the data went, read after the write: with O_APPEND each write lands at
        # the end of the file as it is then, so another process appending to the same
        # file between the seek above and the write would have moved it.
        return os.lseek(self._fd, 0, os.SEEK_CUR) - len(data)

    async def publish(self, batch: Sequence[OutgoingMessage]) -> Sequence[PublishResult]:
        if self._fd is None:
            return [PublishResult.unavailable("file not open")] * len(batch)
        lines = [json_line(out).encode("utf-8") for out in batch]
        data = b"".join(lines)
        try:
            async with self._lock:  # one batch at a time: lines never interleave
                writing = asyncio.ensure_future(asyncio.to_thread(self._write, data))
                try:
                    offset = await asyncio.shield(writing)
                except asyncio.CancelledError:
                    # The thread cannot be stopped: hold the lock until it is done, so
                    # the next batch never writes over it.
                    await asyncio.wait({writing})
                    raise
        except OSError as exc:
            return [PublishResult.transient(f"write to {self.path} failed: {exc.strerror}")] * len(batch)
        # Each line's receipt: the file and the byte offset the line starts at (exact
        # whoever else appends; a line number would need the whole file read).
        results = []
        for line in lines:
            results.append(PublishResult.acked(f'{{"path":{self._receipt_path},"offset":{offset}}}'))
            offset += len(line)
        return results


def create(name: str, options: Mapping[str, Any]) -> FileAdapter:
    return FileAdapter(name, parse_options(FileOptions, options))
