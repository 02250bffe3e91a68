"""The health and metrics port: ``/livez``, ``/readyz``, ``/metrics``.

A minimal HTTP/1.1 server on asyncio (GET only, one request per connection): probes
and scrapers need nothing more, and it keeps a web framework out of the relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

log = structlog.get_logger("outbox_relay.http")

Readiness = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class HealthServer:
    def __init__(
        self, host: str, port: int, *, live: Callable[[], bool], ready: Readiness, metrics: Callable[[], bytes]
    ):
        self._host = host
        self._port = port
        self._live = live
        self._ready = ready
        self._metrics = metrics
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, self._host, self._port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("http_listening", host=self._host, port=self.port)
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            method, path, *_ = request.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            status, content_type, body = await self._route(method, path.split("?", 1)[0])
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(head.encode("latin-1") + (b"" if method == "HEAD" else body))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    async def _route(self, method: str, path: str) -> tuple[str, str, bytes]:
        if method not in {"GET", "HEAD"}:
            return "405 Method Not Allowed", "text/plain", b"GET only\n"
        if path == "/livez":
            ok = self._live()
            return ("200 OK" if ok else "503 Service Unavailable"), "text/plain", (b"ok\n" if ok else b"stalled\n")
        if path == "/readyz":
            ok, details = await self._ready()
            body = json.dumps({"ready": ok, **details}).encode() + b"\n"
            return ("200 OK" if ok else "503 Service Unavailable"), "application/json", body
        if path == "/metrics":
            return "200 OK", METRICS_TYPE, self._metrics()
        return "404 Not Found", "text/plain", b"try /livez, /readyz or /metrics\n"
