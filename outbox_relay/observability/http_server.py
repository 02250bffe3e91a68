"""The health and metrics port: ``/livez``, ``/readyz``, ``/metrics``.

A minimal HTTP/1.1 server on asyncio (GET only, one request per connection): probes
and scrapers need nothing more, and it keeps a web framework out of the relay. Paths
under a mounted app's prefix go to it (`mounted`: the operator console with
`console.enabled`, console/bridge.py), the only requests that may POST.
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
# (method, target, headers, body, client, server) -> (status, headers, body)
Mounted = Callable[..., Awaitable[tuple[int, list[tuple[bytes, bytes]], bytes]]]
MAX_BODY_BYTES = 1 << 20
MAX_MOUNTED_AT_ONCE = 8  # requests to the mounted app (the console) answered at once: the rest wait
_REASONS = {
    200: "OK",
    303: "See Other",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    413: "Content Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
}
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class HealthServer:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        live: Callable[[], bool],
        ready: Readiness,
        metrics: Callable[[], bytes],
        mounted: tuple[str, Mounted] | None = None,
    ):
        """`mounted`: (prefix, handler), the handler answering the paths under prefix."""
        self._host = host
        self._port = port
        self._live = live
        self._ready = ready
        self._metrics = metrics
        self._mount_prefix = mounted[0] if mounted is not None else ""
        self._mounted: Mounted | None = mounted[1] if mounted is not None else None
        self._mounted_slots = asyncio.Semaphore(MAX_MOUNTED_AT_ONCE)
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
            route = path.split("?", 1)[0]
            prefix = self._mount_prefix
            if self._mounted is not None and (route == prefix or route.startswith(prefix + "/")):
                await self._serve_mounted(method, path, request, reader, writer)
                return
            status, content_type, body = await self._route(method, route)
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

    async def _serve_mounted(
        self, method: str, target: str, request: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        assert self._mounted is not None
        headers = []
        for line in request.split(b"\r\n")[1:]:
            name, sep, value = line.partition(b":")
            if sep:
                headers.append((name.strip().lower(), value.strip()))
        named = dict(headers)
        length = int(named.get(b"content-length", b"0") or 0)
        if b"transfer-encoding" in named:
            # Browsers send a form with its length; a chunked body is not read here.
            status, out_headers, body = 501, [(b"content-type", b"text/plain")], b"send a Content-Length\n"
        elif not 0 <= length <= MAX_BODY_BYTES:
            status, out_headers, body = 413, [(b"content-type", b"text/plain")], b"request body too large\n"
        else:
            payload = await asyncio.wait_for(reader.readexactly(length), 10) if length else b""
            peer = writer.get_extra_info("peername")
            local = writer.get_extra_info("sockname")
            async with self._mounted_slots:
                status, out_headers, body = await self._mounted(
                    method=method,
                    target=target,
                    headers=headers,
                    body=payload,
                    client=(peer[0], peer[1]) if peer else None,
                    server=(local[0], local[1]) if local else None,
                )
        skip = {b"content-length", b"connection"}
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}".encode("latin-1")]
        head += [name + b": " + value for name, value in out_headers if name.lower() not in skip]
        head += [f"Content-Length: {len(body)}".encode(), b"Connection: close", b"", b""]
        writer.write(b"\r\n".join(head) + (b"" if method == "HEAD" else body))
        await writer.drain()

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
