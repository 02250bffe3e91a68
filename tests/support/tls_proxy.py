"""A TLS-terminating TCP proxy on loopback: TLS (certificates from
scripts/services/certs.sh) in front of a server that speaks none itself, as a load
balancer would be in front of it. ElasticMQ has no TLS listener; this lets a test
check that an adapter verifies an endpoint's certificate (and refuses one its CA did
not sign) while the requests still reach the real server behind it."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

from tests.services import SCRIPTS


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


@contextlib.contextmanager
def tls_proxy(upstream_port: int, directory: Path) -> Iterator[tuple[int, str]]:
    """Yield (port, CA file): TLS on 127.0.0.1:port, forwarded to 127.0.0.1:upstream_port."""
    subprocess.run([str(SCRIPTS / "certs.sh"), str(directory)], check=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(directory / "server.crt", directory / "server.key")
    loop = asyncio.new_event_loop()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    # The proxy's own loop, in a thread: the test's loop runs the relay meanwhile.
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    started = asyncio.run_coroutine_threadsafe(asyncio.start_server(handle, "127.0.0.1", 0, ssl=context), loop)
    server = started.result(10)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port, str(directory / "ca.pem")
    finally:

        async def shut() -> None:
            server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()
            await server.wait_closed()

        asyncio.run_coroutine_threadsafe(shut(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
