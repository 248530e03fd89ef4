"""A TCP proxy in front of the broker that a test controls: outages without touching the
shared broker (as aio-pika's own tests do).

    with TcpProxy("localhost", 5672) as proxy:
        url = proxy.url("amqp://guest:guest@localhost:5672/")   # same URL, the proxy's port
        proxy.stall()     # connections stay open, no byte passes (a hung broker or network)
        proxy.resume()    # bytes flow again; what was held back is delivered
        proxy.cut()       # every connection is dropped (RST), as when the broker dies
        proxy.refuse()    # new connections are refused too (the broker is away) ...
        proxy.accept()    # ... until this

The proxy runs its own event loop on a thread, so it serves any test (sync or async, any
event loop) and processes the test starts; every method is safe to call from any thread
and returns once the proxy has done it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import threading
import urllib.parse
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Self, TypeVar

__all__ = ["TcpProxy"]

T = TypeVar("T")

_CHUNK = 64 * 1024


class _Pipe:
    """One client connection and its connection to the target."""

    def __init__(
        self,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        target: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.client = client
        self.target = target
        self.tasks: list[asyncio.Task[None]] = []

    def abort(self) -> None:
        for _, writer in (self.client, self.target):
            transport = writer.transport
            sock = transport.get_extra_info("socket")
            if sock is not None:
                # SO_LINGER 0: close with a RST, as a dead host's kernel would answer
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        for task in self.tasks:
            task.cancel()


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target_host:target_port``.

    ``server_ssl``: terminate TLS on the listening side (clients speak TLS to the proxy, the
    proxy speaks plain TCP to the target), for TLS tests against a plain local broker.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        server_ssl: ssl.SSLContext | None = None,
    ) -> None:
        self.target = (target_host, target_port)
        self._server_ssl = server_ssl
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._pipes: set[_Pipe] = set()
        self._flowing = asyncio.Event()
        self._refusing = False
        self.port = 0
        #: connections accepted so far (a reconnect shows up here)
        self.connections = 0

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> Self:
        self._thread.start()
        self._call(self._start)
        return self

    def close(self) -> None:
        if self._thread.is_alive():
            self._call(self._close)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def url(self, broker_url: str) -> str:
        """``broker_url`` pointed at the proxy (scheme ``amqps`` when it terminates TLS)."""
        parts = urllib.parse.urlsplit(broker_url)
        auth = parts.netloc.rpartition("@")[0]
        netloc = f"{auth}@127.0.0.1:{self.port}" if auth else f"127.0.0.1:{self.port}"
        scheme = "amqps" if self._server_ssl is not None else parts.scheme
        return urllib.parse.urlunsplit(parts._replace(scheme=scheme, netloc=netloc))

    # --- faults --------------------------------------------------------------------------

    def stall(self) -> None:
        """Hold every byte in both directions; connections stay open."""
        self._call(self._async(self._flowing.clear))

    def resume(self) -> None:
        """Let bytes flow again (after :meth:`stall`)."""
        self._call(self._async(self._flowing.set))

    def cut(self) -> None:
        """Drop every open connection at once (new ones are still accepted)."""
        self._call(self._async(self._cut))

    def refuse(self) -> None:
        """Refuse new connections (accepted, then reset at once) until :meth:`accept`."""
        self._call(self._async(lambda: setattr(self, "_refusing", True)))

    def accept(self) -> None:
        self._call(self._async(lambda: setattr(self, "_refusing", False)))

    def outage(self) -> None:
        """The broker is away: drop every connection and refuse new ones."""
        self.refuse()
        self.cut()

    # --- inside the proxy's loop ---------------------------------------------------------

    def _call(self, factory: Callable[[], Awaitable[T]]) -> T:
        async def run() -> T:
            return await factory()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    @staticmethod
    def _async(function: Callable[[], Any]) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            function()

        return run

    async def _start(self) -> None:
        self._flowing.set()
        self._server = await asyncio.start_server(
            self._on_client, "127.0.0.1", 0, ssl=self._server_ssl
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        self._cut()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    def _cut(self) -> None:
        for pipe in list(self._pipes):
            pipe.abort()
        self._pipes.clear()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self._refusing:
            _Pipe((reader, writer), (reader, writer)).abort()
            return
        try:
            target = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        pipe = _Pipe((reader, writer), target)
        self._pipes.add(pipe)
        pipe.tasks = [
            asyncio.ensure_future(self._forward(reader, target[1])),
            asyncio.ensure_future(self._forward(target[0], writer)),
        ]
        await asyncio.gather(*pipe.tasks, return_exceptions=True)
        pipe.abort()
        self._pipes.discard(pipe)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError, ssl.SSLError):
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    return
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
