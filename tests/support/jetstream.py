"""An independent NATS JetStream client for the tests: makes streams and reads back what
they hold, by sequence, on a connection of its own (nats-py's plain API, not the adapter)."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import nats
from nats.aio.client import Client
from nats.js.api import StreamConfig
from nats.js.errors import NotFoundError

from tests.consumers import Received


@asynccontextmanager
async def connected(url: str, ca_file: str | None = None) -> AsyncIterator[Client]:
    """A connection to `url` (a tls:// one verified with `ca_file`), as the server's
    user for clients without credentials."""
    tls = ssl.create_default_context(cafile=ca_file) if ca_file else None
    # The TLS server wants the handshake first (scripts/services/nats.sh: handshake_first).
    nc = await nats.connect(url, allow_reconnect=False, connect_timeout=5, tls=tls, tls_handshake_first=tls is not None)
    try:
        yield nc
    finally:
        await nc.close()


async def make_stream(url: str, name: str, subjects: list[str], *, ca_file: str | None = None, **config: Any) -> None:
    """A file-backed stream `name` over `subjects` (more StreamConfig fields in `config`)."""
    async with connected(url, ca_file) as nc:
        await nc.jetstream().add_stream(StreamConfig(name=name, subjects=subjects, **config))


def received_of(data: bytes, headers: dict[str, str] | None, subject: str, seq: int) -> Received:
    headers = dict(headers or {})
    return Received(
        message_id=headers.get("Nats-Msg-Id", ""),
        key=headers.get("Outbox-Key"),
        payload=data,
        headers=headers,
        properties={"subject": subject, "seq": seq},
    )


async def stream_read(
    url: str, stream: str, count: int, *, timeout: float = 20.0, ca_file: str | None = None
) -> list[Received]:
    """The stream's messages in sequence order, once it holds at least `count` (or all it
    holds after `timeout`): duplicates included, each read by its sequence."""
    async with connected(url, ca_file) as nc:
        js = nc.jetstream()
        deadline = time.monotonic() + timeout
        while True:
            info = await js.stream_info(stream)
            state = info.state
            if state.messages >= count or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        found: list[Received] = []
        for seq in range(state.first_seq, state.last_seq + 1):
            try:
                msg = await js.get_msg(stream, seq)
            except NotFoundError:
                continue  # deleted
            found.append(received_of(msg.data or b"", msg.headers, msg.subject or "", seq))
        return found


async def message_at(url: str, stream: str, seq: int, *, ca_file: str | None = None) -> str:
    """The message id (Nats-Msg-Id) of the message at `seq` of `stream`, or "nothing there"."""
    async with connected(url, ca_file) as nc:
        try:
            msg = await nc.jetstream().get_msg(stream, seq)
        except NotFoundError:
            return "nothing there"
        return (msg.headers or {}).get("Nats-Msg-Id", "no id")
