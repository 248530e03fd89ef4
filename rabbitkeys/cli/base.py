"""What every command group shares: exit codes, the settings epilog, running a command's
coroutine, signals, and the metrics endpoint of the long-running roles."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pydantic

from .._errors import ConfigError
from .._settings import DEFAULT_METRICS_PORT, ENV_PREFIX, Settings

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2

SETTINGS_HELP = "Settings come from the environment: " + ", ".join(
    f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields
)


def run(coroutine: Coroutine[Any, Any, int]) -> int:
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:  # uvloop when installed: the client, not the broker, is the first limit
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(coroutine)


def on_signals(stop: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _stop_on, sig, stop)


def _stop_on(sig: signal.Signals, stop: Callable[[], None]) -> None:
    # said at WARNING: a stop nobody asked for (a signal sent to a whole process group, say)
    # must be told from a crash in the log of a process that exited 0
    logging.getLogger("rabbitkeys").warning("%s received: stopping", sig.name)
    stop()


@contextlib.asynccontextmanager
async def metrics_endpoint(settings: Settings, ready: Callable[[], bool]) -> AsyncIterator[None]:
    """/metrics, /livez and /readyz on ``metrics_port`` while the body runs: 0, none; unset,
    9500 or, when another process on this host has it, any free port (logged)."""
    if settings.metrics_port == 0:
        yield
        return
    from .._observe.metrics_server import MetricsServer

    explicit = settings.metrics_port is not None
    port = DEFAULT_METRICS_PORT if settings.metrics_port is None else settings.metrics_port
    server = MetricsServer(host=settings.metrics_host, port=port, ready=ready)
    try:
        await server.start()
    except OSError as exc:
        if explicit or exc.errno != errno.EADDRINUSE:
            raise ConfigError(
                f"cannot serve metrics on {settings.metrics_host}:{port} ({exc}); "
                f"set {ENV_PREFIX}METRICS_PORT to a free port, or 0 to turn the endpoint off"
            ) from None
        # A second process on this host: a registry and workers started by hand in several
        # shells must all run. Its URL is logged; Kubernetes and compose set the port.
        server.port = 0
        await server.start()
        logging.getLogger("rabbitkeys.metrics").warning(
            "port %d is taken (another rabbitkeys process on this host?): serving metrics on "
            "http://%s:%d/metrics instead; set %sMETRICS_PORT to choose the port",
            port,
            settings.metrics_host,
            server.port,
            ENV_PREFIX,
        )
    try:
        yield
    finally:
        await server.close()


def usage(message: str) -> int:
    print(f"rabbitkeys: {message}", file=sys.stderr)
    return EXIT_USAGE


def invalid(exc: pydantic.ValidationError) -> str:
    first = exc.errors(include_input=False, include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{where.replace('_', '-')}: {first['msg']}" if where else first["msg"]
