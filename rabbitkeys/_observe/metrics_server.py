"""The HTTP endpoint of a registry or worker process: ``/metrics``, ``/livez``, ``/readyz``.

Served from the process's own event loop (not a thread), so an answer to ``/livez`` also
says the loop is not stuck: a handler that blocks the loop fails the liveness probe.
``/readyz`` answers 200 while the process is connected and doing its job (a worker has
joined, a registry is connected, leading or standing by), else 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

__all__ = ["MetricsServer"]

log = logging.getLogger("rabbitkeys.metrics")

_REQUEST_TIMEOUT = 10.0


class MetricsServer:
    def __init__(
        self,
        *,
        host: str,
        port: int,
        ready: Callable[[], bool],
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self._ready = ready
        self._registry = REGISTRY if registry is None else registry
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics and health on http://%s:%d/metrics", self.host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_REQUEST_TIMEOUT):
                request_line = await reader.readline()
                while (await reader.readline()).strip():
                    pass  # headers: nothing we need
                status, content_type, body = self._answer(request_line)
                head = (
                    f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                )
                writer.write(head.encode() + body)
                await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _answer(self, request_line: bytes) -> tuple[str, str, bytes]:
        parts = request_line.decode("latin-1").split()
        if len(parts) < 2 or parts[0] != "GET":
            return "405 Method Not Allowed", "text/plain", b"GET only\n"
        path = parts[1].split("?", 1)[0]
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest(self._registry)
        if path == "/livez":
            return "200 OK", "text/plain", b"ok\n"
        if path == "/readyz":
            if self._ready():
                return "200 OK", "text/plain", b"ready\n"
            return "503 Service Unavailable", "text/plain", b"not ready\n"
        return "404 Not Found", "text/plain", b"not found: try /metrics, /livez, /readyz\n"
