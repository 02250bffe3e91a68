"""A local HTTP receiver for the webhook tests: records every POST and answers as told."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Request:
    path: str
    headers: dict[str, str]  # lower-cased names; the last value of a repeated header
    body: bytes
    raw_headers: list[tuple[str, str]] = field(default_factory=list)
    status: int = 0  # what the receiver answered

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.raw_headers if k.lower() == name]

    @property
    def json(self) -> Any:
        return json.loads(self.body)


Respond = Callable[[Request], tuple[int, float]]  # request -> (status, seconds to wait before answering)


def respond_by_path(request: Request) -> tuple[int, float]:
    """`/status/<code>` answers <code>; `/sleep/<seconds>` waits, then 200; else 200."""
    parts = request.path.strip("/").split("/")
    if len(parts) == 2 and parts[0] == "status":
        return int(parts[1]), 0.0
    if len(parts) == 2 and parts[0] == "sleep":
        return 200, float(parts[1])
    return 200, 0.0


def answer(status: int, delay: float = 0.0) -> Respond:
    """Answer every POST with `status`, `delay` seconds after it arrived."""
    return lambda request: (status, delay)


class HttpReceiver:
    """Serves on a free loopback port from a thread of its own until closed (or the end of
    its with block). `respond` and `headers` (sent with every answer) may change any time."""

    def __init__(self, respond: Respond = respond_by_path, *, headers: Mapping[str, str] | None = None):
        self.respond = respond
        self.headers: dict[str, str] = dict(headers or {})
        self.requests: list[Request] = []
        self.active = 0  # requests being answered now
        self.max_active = 0
        self.lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _handler(self))
        self.port = int(self._server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def accepted(self) -> list[Request]:
        """The requests answered with a 2xx."""
        return [r for r in self.requests if 200 <= r.status < 300]

    @property
    def refused(self) -> int:
        """How many requests were answered with anything but a 2xx."""
        return sum(1 for r in self.requests if not 200 <= r.status < 300)

    def close(self) -> None:
        self._server.shutdown()
        self._thread.join(timeout=5)
        self._server.server_close()

    def __enter__(self) -> HttpReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default listen backlog of 5 resets bursts of connections

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that timed out and hung up is expected in these tests


def _handler(receiver: HttpReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_HEAD(self) -> None:
            self.send_response(200)
            self.end_headers()

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", "0"))
            body = self.rfile.read(length)
            if len(body) < length:
                # The client's side of the connection closed inside the body (a network
                # cut): as any HTTP server, take nothing and answer nothing.
                self.close_connection = True
                return
            request = Request(
                self.path, {k.lower(): v for k, v in self.headers.items()}, body, list(self.headers.items())
            )
            status, delay = receiver.respond(request)
            request.status = status
            with receiver.lock:
                receiver.requests.append(request)
                receiver.active += 1
                receiver.max_active = max(receiver.max_active, receiver.active)
            try:
                if delay:
                    time.sleep(delay)  # a slow endpoint: the delay its `respond` asked for
            finally:
                with receiver.lock:
                    receiver.active -= 1
            self.send_response(status)
            for name, value in dict(receiver.headers).items():
                self.send_header(name, value)
            self.send_header("content-length", "0")
            self.end_headers()

    return Handler
