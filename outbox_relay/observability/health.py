"""Is the relay alive, is it ready: the probes behind ``/livez`` and ``/readyz``, and
the start-up of the port that serves them (with ``/metrics``, and what is mounted
beside them: the operator console, handed in from above as a Mount).

Alive: no worker is stuck in one batch far past every timeout. Ready: the database
and every broker that a route uses answer, and a side source (the WAL source) is not
restarting or stopped. The probes also set the connected gauges.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import psycopg

from outbox_relay.config import Config
from outbox_relay.connections import connect_once
from outbox_relay.errors import ConfigError
from outbox_relay.observability.http_server import HealthServer, Mounted
from outbox_relay.observability.metrics import RelayMetrics

if TYPE_CHECKING:
    from outbox_relay.engine.brokers import BrokerHandle
    from outbox_relay.engine.circuit import Circuit

READY_TIMEOUT_S = 2.0
READY_CACHE_S = 1.0  # /readyz answers from a probe at most this old
BROKER_PROBE_TRUST_S = 30.0  # a readiness probe's 'not answering' holds the gauge at 0 this long


class ReadinessSource(Protocol):
    """A source that has a say in readiness (the WAL source: sources/wal/lag.py)."""

    def readiness(self) -> tuple[bool, dict[str, Any]] | None:
        """Whether it lets the relay be ready, and its entries in /readyz's JSON; None:
        nothing to say. Called on every probe: it must answer from memory."""
        ...


class Mount(Protocol):
    """An app the health port serves beside its probes: the operator console with
    console.enabled (console/mount.py), handed in by `outbox-relay run` from above, so
    that this module imports nothing of it.

    `open` is called once, on the event loop, as the port starts: it returns the path
    prefix the app answers under and the handler of each request there (http_server's
    Mounted; up to MAX_MOUNTED_AT_ONCE at once), or raises ConfigError, which stops the
    relay's start. `close` is called once, in a worker thread (it may block), after the
    port has stopped, and only if `open` returned."""

    def open(self) -> tuple[str, Mounted]: ...

    def close(self) -> None: ...


class Health:
    """One relay's liveness and readiness, and its health port."""

    def __init__(
        self,
        config: Config,
        *,
        metrics: RelayMetrics,
        brokers: Mapping[str, BrokerHandle],
        circuits: Mapping[str, Circuit],
        routed: Collection[str],
        started: asyncio.Event,
        batches_started: Callable[[], Iterable[float]],
        sources: Collection[ReadinessSource] = (),
        mount: Mount | None = None,
    ):
        """`routed`: the brokers that a route uses; `started`: set once the relay claims;
        `batches_started`: when each worker's current batch began (loop time); `sources`:
        the side sources, whose state /readyz reports; `mount`: an app the port serves
        too (the console)."""
        self._config = config
        self._dsn = config.database.dsn.get_secret_value()
        self._metrics = metrics
        self._brokers = brokers
        self._circuits = circuits
        self._routed = sorted(routed)
        self._started = started
        self._batches_started = batches_started
        self._sources = sources
        self.server: HealthServer | None = None
        self._mount = mount
        self._mount_open = False
        self._ready_lock = asyncio.Lock()
        self._ready_cache: tuple[float, tuple[bool, dict[str, Any]]] | None = None
        self._ready_conn: psycopg.AsyncConnection[Any] | None = None
        self._broker_probed: dict[str, tuple[float, bool]] = {}  # broker -> (when, answered)

    async def start(self) -> None:
        """Listen on the health port, unless http.enabled is off."""
        settings = self._config.http
        if settings.enabled:
            mounted = self._open_mount()
            server = HealthServer(
                settings.host,
                settings.port,
                live=self.is_live,
                ready=self.readiness,
                metrics=self._metrics.render,
                mounted=mounted,
            )
            try:
                await server.start()
            except OSError as exc:
                raise ConfigError(
                    f"cannot listen on {settings.host}:{settings.port} ({exc.strerror or exc}); another relay on "
                    "this host? Set http.port to a free port, or 0 to pick one",
                    path="http.port",
                ) from None
            self.server = server

    async def close(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            await server.close()
        if self._mount is not None and self._mount_open:
            self._mount_open = False
            await asyncio.to_thread(self._mount.close)
        await self._close_ready_conn()

    def _open_mount(self) -> tuple[str, Mounted] | None:
        if self._mount is None:
            return None
        mounted = self._mount.open()
        self._mount_open = True
        return mounted

    def is_live(self) -> bool:
        """False when a worker has been stuck in one batch far past every timeout.

        Waiting for the database or a broker is not a liveness failure: a restart would
        not bring them back. A batch that never ends is (a hung await, a deadlock)."""
        relay = self._config.relay
        limit = relay.publish_timeout * 3 + relay.poll_interval * 2 + 60.0
        now = asyncio.get_running_loop().time()
        return all(now - started < limit for started in self._batches_started())

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready when the database and every broker that a route uses answer, and no side
        source says it cannot work (the WAL source: restarting or stopped).

        Probed at most once per READY_CACHE_S, by one caller at a time (the others wait
        for its answer), on one connection kept for it: a burst of /readyz requests
        (a misconfigured probe, a scan) costs the database one session, not one each.
        The sources answer from memory, so theirs is always the current state.
        """
        if not self._started.is_set():  # still connecting: brokers are not to be probed yet
            return False, {"database": False, "brokers": {}, "starting": True}
        async with self._ready_lock:
            now = asyncio.get_running_loop().time()
            if self._ready_cache is None or now - self._ready_cache[0] >= READY_CACHE_S:
                answer = await self._probe_readiness()
                self._ready_cache = (asyncio.get_running_loop().time(), answer)
            ready, probed = self._ready_cache[1]
        details = dict(probed)
        for source in self._sources:
            if (said := source.readiness()) is not None:
                ready = ready and said[0]
                details.update(said[1])
        return ready, details

    async def _probe_readiness(self) -> tuple[bool, dict[str, Any]]:
        database = await self._database_answers()
        brokers: dict[str, bool] = {}
        for name in self._routed:
            if self._circuits[name].broker_open:  # it answered nothing, or refuses the relay
                brokers[name] = False
                continue
            try:
                brokers[name] = await asyncio.wait_for(self._brokers[name].ready(), READY_TIMEOUT_S)
            except Exception:
                brokers[name] = False
        self._metrics.database_connected.set(1 if database else 0)
        now = asyncio.get_running_loop().time()
        for name, ok in brokers.items():
            self._broker_probed[name] = (now, ok)
            self._metrics.broker_connected.labels(name).set(1 if ok else 0)
        return database and all(brokers.values()), {"database": database, "brokers": brokers}

    async def _database_answers(self) -> bool:
        try:

            async def probe() -> None:
                if self._ready_conn is None or self._ready_conn.closed:
                    self._ready_conn = await connect_once(
                        self._dsn,
                        autocommit=True,
                        timeout=READY_TIMEOUT_S,
                        prepare_threshold=self._config.database.prepare_threshold,
                    )
                await self._ready_conn.execute("SELECT 1")

            await asyncio.wait_for(probe(), READY_TIMEOUT_S)
        except Exception:
            await self._close_ready_conn()  # reconnect on the next probe
            return False
        return True

    async def _close_ready_conn(self) -> None:
        conn, self._ready_conn = self._ready_conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    def broker_states(self) -> dict[str, dict[str, bool]]:
        """Each broker's state as the gauges last said it, for the heartbeat row (the
        console shows it): connected, and whether its circuit is open."""
        now = asyncio.get_running_loop().time()
        return {
            name: {"connected": self._broker_up(name, now), "circuit_open": self._circuits[name].broker_open}
            for name in self._brokers
        }

    def refresh_broker_gauges(self) -> None:
        """broker_connected for every broker (each heartbeat).

        Connected = the adapter connected once, its circuit is closed (no publish went
        unanswered since), and the last readiness probe, if a recent one ran, found it
        answering: the heartbeat must not write 1 over what a probe just found."""
        now = asyncio.get_running_loop().time()
        for name in self._brokers:
            self._metrics.broker_connected.labels(name).set(1 if self._broker_up(name, now) else 0)

    def _broker_up(self, name: str, now: float) -> bool:
        recent = self._broker_probed.get(name)
        probed_down = recent is not None and now - recent[0] < BROKER_PROBE_TRUST_S and not recent[1]
        return self._brokers[name].connected.is_set() and not self._circuits[name].broker_open and not probed_down
