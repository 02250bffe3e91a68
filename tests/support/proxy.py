"""A small TCP proxy for tests: sits between the relay and a broker, and can cut or
stall the connection on demand. Loopback only."""

from __future__ import annotations

import asyncio
import contextlib


class TcpProxy:
    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._open = asyncio.Event()
        self._open.set()
        self.refusing = False

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self, *, refuse: bool = True) -> None:
        """Drop every connection; with `refuse`, new ones are closed at once too."""
        self.refusing = refuse
        for a, b in list(self._links):
            a.close()
            b.close()
        self._links.clear()

    def restore(self) -> None:
        self.refusing = False
        self._open.set()

    def stall(self) -> None:
        """Keep connections open but stop moving bytes (a network partition)."""
        self._open.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        link = (writer, up_writer)
        self._links.add(link)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True)
        self._links.discard(link)
        for w in link:
            w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                await self._open.wait()
                writer.write(data)
                await writer.drain()
        writer.close()


class ThreadedProxy:
    """A TcpProxy on its own thread and event loop, for tests that block their own loop
    (subprocess relays, blocking waits)."""

    def __init__(self, target_host: str, target_port: int):
        import threading

        self._loop = asyncio.new_event_loop()
        self._proxy = TcpProxy(target_host, target_port)
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._proxy.start(), self._loop).result(10)
        self.port = self._proxy.port

    def _call(self, name: str) -> None:
        done = asyncio.run_coroutine_threadsafe(self._run(name), self._loop)
        done.result(10)

    async def _run(self, name: str) -> None:
        getattr(self._proxy, name)()

    def stall(self) -> None:
        self._call("stall")

    def cut(self) -> None:
        self._call("cut")

    def restore(self) -> None:
        self._call("restore")

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._proxy.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
