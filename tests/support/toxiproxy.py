"""A small client for toxiproxy's HTTP API (scripts/services/toxiproxy.sh runs the
server; tests/services.py's `toxiproxy()` starts one for a test session or a script).

A `Proxy` listens on a loopback port and forwards to its upstream; faults ("toxics") are
added to it and removed again while connections are open:

    api = Toxiproxy("http://127.0.0.1:8474")
    pg = api.proxy("pg", "127.0.0.1:5432")        # connect to 127.0.0.1:{pg.port} instead
    with pg.toxic("latency", latency=500, jitter=100):
        ...                                        # every answer 400-600 ms late
    with pg.disabled():
        ...                                        # connections dropped, new ones refused

A toxic acts on one direction: ``downstream`` (upstream to client: answers) or
``upstream`` (client to upstream: requests). What the server does, from its source:
- latency: each chunk held `latency` ms +/- `jitter` (in order: chunks are not reordered);
- bandwidth: at most `rate` KB/s;
- timeout: a black hole, data dropped without a reset; with `timeout` > 0 the connection
  is closed after that many ms, with 0 never. Removing it closes the connections it held
  (their streams have lost bytes);
- reset_peer: at the first data after `timeout` ms, the connection is reset (TCP RST);
- slicer: chunks cut into pieces of `average_size` +/- `size_variation` bytes, `delay`
  microseconds apart;
- limit_data: each connection closed once `bytes` more have passed;
- `Proxy.stall` / `heal`: a partition that heals (bytes held, delivered at its end);
- disabling the proxy closes every connection and its listener (connections refused)
  until it is enabled again, on the same port.

Blocking (httpx), thread-safe, no pytest: a script (the soak) uses it as well.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx

STREAMS = ("downstream", "upstream")
STALL_MS = 3_600_000  # Proxy.stalled's latency: longer than any test
_names = itertools.count(1)


class ToxiproxyError(RuntimeError):
    """The API refused a request (its status and message in one line)."""


class Toxiproxy:
    """The API of one server, at `url` (http://127.0.0.1:PORT)."""

    def __init__(self, url: str, *, timeout: float = 10.0):
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout)

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = self._http.request(method, path, json=body)
        if response.status_code >= 300:
            raise ToxiproxyError(f"toxiproxy {method} {path}: HTTP {response.status_code} {response.text.strip()}")
        return response.json() if response.content else None

    def version(self) -> str:
        return str(self.request("GET", "/version")["version"])

    def proxy(self, name: str, upstream: str, *, listen: str = "127.0.0.1:0") -> Proxy:
        """A new proxy to `upstream` (host:port); `listen` port 0: a free one, chosen by
        the server and kept across disable/enable. A proxy of that name is replaced."""
        with contextlib.suppress(ToxiproxyError):
            self.request("DELETE", f"/proxies/{name}")
        made = self.request("POST", "/proxies", {"name": name, "listen": listen, "upstream": upstream})
        return Proxy(self, name, upstream, str(made["listen"]))

    def reset(self) -> None:
        """Every proxy enabled again and every toxic removed."""
        self.request("POST", "/reset")

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Toxiproxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Proxy:
    api: Toxiproxy
    name: str
    upstream: str
    listen: str  # host:port the server listens on

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])

    @property
    def address(self) -> str:
        return self.listen

    def add(
        self,
        kind: str,
        *,
        stream: str = "downstream",
        toxicity: float = 1.0,
        name: str | None = None,
        **attributes: Any,
    ) -> str:
        """Add a toxic of type `kind` (latency, bandwidth, timeout, reset_peer, slicer,
        limit_data, slow_close) with its `attributes`; returns its name, for `remove`."""
        if stream not in STREAMS:
            raise ValueError(f"stream must be one of {STREAMS}, got {stream!r}")
        name = name or f"{kind}_{stream}_{next(_names)}"
        body = {"name": name, "type": kind, "stream": stream, "toxicity": toxicity, "attributes": attributes}
        self.api.request("POST", f"/proxies/{self.name}/toxics", body)
        return name

    def remove(self, *toxics: str) -> None:
        for toxic in toxics:
            self.api.request("DELETE", f"/proxies/{self.name}/toxics/{toxic}")

    def toxics(self) -> list[str]:
        return [str(t["name"]) for t in self.api.request("GET", f"/proxies/{self.name}/toxics")]

    @contextlib.contextmanager
    def toxic(self, kind: str, *, stream: str = "downstream", **attributes: Any) -> Iterator[str]:
        """The toxic for the with block; removed at its end, even when the block raises."""
        name = self.add(kind, stream=stream, **attributes)
        try:
            yield name
        finally:
            self.remove(name)

    def stall(self) -> None:
        """A partition, both ways, until `heal`: bytes are held, not dropped, and
        connections stay open (no reset, no FIN). (A latency of an hour: a latency toxic
        removed hands on what it holds.)"""
        for stream in STREAMS:
            self.add("latency", stream=stream, latency=STALL_MS, name=f"stall_{stream}")

    def heal(self) -> None:
        """The partition ends: what was held is delivered on the same connections, as TCP
        does once a partition ends."""
        for stream in STREAMS:
            self.remove(f"stall_{stream}")

    @contextlib.contextmanager
    def stalled(self) -> Iterator[None]:
        """`stall` for the with block, then `heal`."""
        self.stall()
        try:
            yield
        finally:
            self.heal()

    def black_hole(self, *streams: str) -> list[str]:
        """Bytes of `streams` (default: both) dropped: no reset, no data, connections kept
        open (timeout toxics of 0). Removing them closes the connections they held. The
        toxics' names, for `remove`."""
        return [self.add("timeout", stream=stream, timeout=0) for stream in streams or STREAMS]

    @contextlib.contextmanager
    def black_holed(self, *streams: str) -> Iterator[None]:
        """`black_hole` for the with block."""
        names = self.black_hole(*streams)
        try:
            yield
        finally:
            self.remove(*names)

    def disable(self) -> None:
        """Drop every connection; new ones are refused until `enable`. Not while stalled:
        toxiproxy (2.12) deadlocks when a latency toxic holding several chunks of a closed
        connection is removed; a partition followed by a cut is `black_hole` then this
        (what a stall held is lost with the connection either way)."""
        if any(name.startswith("stall_") for name in self.toxics()):
            raise ToxiproxyError(f"proxy {self.name} is stalled: heal it before disabling (or use black_hole)")
        self.api.request("POST", f"/proxies/{self.name}", {"enabled": False})

    def enable(self) -> None:
        self.api.request("POST", f"/proxies/{self.name}", {"enabled": True})

    @property
    def enabled(self) -> bool:
        return bool(self.api.request("GET", f"/proxies/{self.name}")["enabled"])

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        self.disable()
        try:
            yield
        finally:
            self.enable()

    def delete(self) -> None:
        """Remove the proxy (its connections closed), healed first (see `disable`)."""
        with contextlib.suppress(ToxiproxyError):
            self.remove(*(name for name in self.toxics() if name.startswith("stall_")))
            self.api.request("DELETE", f"/proxies/{self.name}")


# The conftest's `proxy` fixture: upstream (host:port) -> a new proxy, deleted after the test.
MakeProxy = Callable[[str], Proxy]
