"""The console inside `outbox-relay run`: one HTTP/1.1 request that the relay's health
port read (observability/http_server.py), answered by the console's ASGI app.

The health port is a small server of its own (one request per connection, no
keep-alive), and it stays that: probes and scrapers are never behind a framework.
Only paths under /console come here, with `console.enabled`. The body is read whole,
up to MAX_BODY_BYTES (the console's forms are a few kilobytes).
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import unquote

import structlog
from starlette.types import ASGIApp, Message

from outbox_relay.errors import first_line

log = structlog.get_logger("outbox_relay.console")

MAX_BODY_BYTES = 1 << 20


async def answer(
    app: ASGIApp,
    *,
    method: str,
    target: str,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    client: tuple[str, int] | None,
    server: tuple[str, int] | None,
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and body of `app`'s answer to one request."""
    raw_path, _, query = target.partition("?")
    path = unquote(raw_path)
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": raw_path.encode("latin-1"),
        "query_string": query.encode("latin-1"),
        "root_path": "",
        "headers": headers,
        "client": client,
        "server": server,
    }
    sent = False
    status = 500
    response_headers: list[tuple[bytes, bytes]] = []
    chunks: list[bytes] = []
    finished = asyncio.Event()

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await finished.wait()  # nothing more comes: the client sent one request
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status, response_headers
        if message["type"] == "http.response.start":
            status = int(message["status"])
            response_headers = list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                finished.set()

    try:
        await app(scope, receive, send)
    except Exception as exc:
        # Starlette answers 500 and raises again; here the raise would end the health
        # port's connection without an answer (and log an unretrieved task error).
        log.error("console_request_failed", error_type=type(exc).__name__, error=first_line(exc), path=path)
        if not finished.is_set():
            return 500, [(b"content-type", b"text/plain")], b"internal error\n"
    finished.set()
    return status, response_headers, b"".join(chunks)
