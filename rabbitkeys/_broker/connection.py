"""Opening AMQP connections: named after their role, with errors that never show a password."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import aio_pika
from aio_pika.abc import AbstractConnection

from .._errors import BrokerUnavailableError
from .._settings import Settings, mask_url
from .._tls import client_context, failure_hint
from .amqp import sleep_unless

__all__ = ["NODE_CONNECT_TIMEOUT", "connect", "connected_node", "keep_connected", "nodes_in_order"]

_log = logging.getLogger("rabbitkeys")
_guest_warned = False


def _warn_if_guest(settings: Settings) -> None:
    """Once per process: guest is an administrator, so every party could do anything."""
    global _guest_warned
    if settings.amqp_user == "guest" and not _guest_warned:
        _guest_warned = True
        _log.warning(
            "connected as 'guest', an administrator: any process with this login can do "
            "anything to the namespace; fine for trying rabbitkeys, not for production "
            "(docs/operate/users.md: rabbitkeys users create)"
        )


async def connect(settings: Settings, role: str) -> AbstractConnection:
    """A plain (not robust) connection: rabbitkeys decides itself what to redeclare after a
    reconnect, because aio-pika's robust channel would redeclare every key queue at once.

    With several URLs (a cluster's nodes), the nodes are tried in list order from a random
    one, so that processes and reconnects spread over the cluster; each gets
    :data:`NODE_CONNECT_TIMEOUT` seconds, so that a node that is gone without refusing
    (its address blackholed) does not hold up the move to the next. Raises
    :class:`BrokerUnavailableError` naming every node tried when none could be reached.

    ``amqps://`` uses the context of the ``tls_*`` settings (:func:`client_context`); a
    certificate file that cannot be loaded (mid-rotation) fails this connect like an
    unreachable broker, and the next attempt reads it again.
    """
    urls = settings.amqp_urls
    return await _connect_in_order(
        settings, role, nodes_in_order(urls, random.randrange(len(urls)))
    )


def nodes_in_order(urls: list[str], start: int) -> list[str]:
    """``urls`` from ``start`` on, then from the beginning: the order one attempt tries."""
    return urls[start:] + urls[:start]


def connected_node(connection: AbstractConnection) -> str:
    """``host:port`` of the node ``connection`` reached (no login: safe for logs)."""
    url = getattr(connection, "url", None)
    if url is None or url.host is None:
        return "an unknown node"
    host = f"[{url.host}]" if ":" in url.host else url.host
    return f"{host}:{url.port}" if url.port is not None else host


#: seconds one node of several gets to accept the connection and finish the AMQP handshake
NODE_CONNECT_TIMEOUT = 5.0
#: the same for a lone broker
LONE_CONNECT_TIMEOUT = 30.0


async def _connect_in_order(settings: Settings, role: str, urls: list[str]) -> AbstractConnection:
    _warn_if_guest(settings)
    failures = []
    for url in urls:
        try:
            connection = await _connect_one(settings, role, url)
        except BrokerUnavailableError as exc:
            failures.append(str(exc))
            continue
        if len(settings.amqp_urls) > 1:
            _log.info("%s connected to node %s", role, connected_node(connection))
        return connection
    if len(failures) == 1:
        raise BrokerUnavailableError(f"cannot connect to {failures[0]}")
    raise BrokerUnavailableError(
        f"cannot connect to any of the {len(failures)} nodes: {'; '.join(failures)}"
    )


async def _connect_one(settings: Settings, role: str, url: str) -> AbstractConnection:
    """One node; raises :class:`BrokerUnavailableError` with its masked URL and the reason."""
    # one broker: no other node to move to, so a slow handshake (a broker busy recovering
    # 100,000 queues) is waited for longer
    timeout = NODE_CONNECT_TIMEOUT if len(settings.amqp_urls) > 1 else LONE_CONNECT_TIMEOUT
    made = _Made()
    try:
        tls = (
            client_context(settings.tls_ca_file, settings.tls_cert_file, settings.tls_key_file)
            if url.lower().startswith("amqps:")
            else None
        )
        return await aio_pika.connect(
            url,
            ssl_context=tls,
            timeout=timeout,
            client_properties={"connection_name": f"rabbitkeys {settings.namespace} {role}"},
            connection_class=cast(type[AbstractConnection], made.append_new),
        )
    except Exception as exc:
        # A connection that failed half-way is closed here: left to the garbage collector,
        # aio-pika's __del__ schedules its close() on a loop that may be gone by then.
        await made.close_all()
        # The original exception is not chained: some carry the URL, password included.
        if isinstance(exc, TimeoutError):  # asyncio's says nothing
            reason = f"no connection within {timeout:g}s"
        else:
            reason = f"{type(exc).__name__}: {exc}"
        password = urlsplit(url).password
        for secret in {password, unquote(password or "")} - {None, ""}:
            reason = reason.replace(str(secret), "***")
        if url.lower().startswith("amqps:"):
            reason += failure_hint(
                reason, ca_file=settings.tls_ca_file, cert_file=settings.tls_cert_file
            )
        raise BrokerUnavailableError(f"{mask_url(url)}: {reason}") from None


class _Made:
    """The connections aio-pika made for one connect call (its ``connection_class``)."""

    def __init__(self) -> None:
        self.connections: list[aio_pika.Connection] = []

    def append_new(self, *args: Any, **kwargs: Any) -> aio_pika.Connection:
        connection = aio_pika.Connection(*args, **kwargs)
        self.connections.append(connection)
        return connection

    async def close_all(self) -> None:
        for connection in self.connections:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), 5)


async def keep_connected(
    settings: Settings,
    role: str,
    session: Callable[[AbstractConnection], Awaitable[None]],
    stopping: asyncio.Event,
    log: logging.Logger,
    hurry: asyncio.Event | None = None,
) -> None:
    """Run ``session`` on a fresh connection until it returns; when the broker goes away,
    reconnect with jittered exponential backoff (0.1 s doubling to 5 s) and run it again.

    ``hurry`` is set while work waits for the connection (a publish): the backoff is then
    capped at :data:`HURRIED_BACKOFF` seconds, and a longer pause already under way ends
    at once, so a waiting caller is not made to sit out a backoff grown during a long outage.

    Each component rebuilds its own state in a new session (the registry drives recovery:
    there is no library-level redeclare of every key queue on reconnect).
    """
    failures = 0
    while not stopping.is_set():
        try:
            connection = await connect(settings, role)
        except BrokerUnavailableError as exc:
            failures += 1
            delay = _backoff(failures)
            log.warning("%s; retrying in %.1fs", exc, delay)
            await _pause(stopping, delay, hurry)
            continue
        try:
            await session(connection)
            return
        except Exception as exc:
            if stopping.is_set() and connection.is_closed:
                return
            failures = 1
            log.warning("%s lost the broker (%r); reconnecting", role, exc)
        finally:
            try:
                await asyncio.wait_for(connection.close(), 5)
            except Exception:  # closing a dead connection: nothing more to do
                pass
        await _pause(stopping, _backoff(failures), hurry)


#: the longest pause between connection attempts while work waits for the connection
HURRIED_BACKOFF = 0.25


def _backoff(failures: int) -> float:
    return float(min(5.0, 0.1 * 2 ** (failures - 1)) * random.uniform(0.5, 1.0))


async def _pause(stopping: asyncio.Event, delay: float, hurry: asyncio.Event | None) -> None:
    """Sleep ``delay`` seconds, less if work waits (``hurry``); no time if ``stopping``."""
    if hurry is None:
        await sleep_unless(stopping, delay)
        return
    if hurry.is_set():
        await sleep_unless(stopping, min(delay, HURRIED_BACKOFF * random.uniform(0.5, 1.0)))
        return
    waits = [asyncio.ensure_future(stopping.wait()), asyncio.ensure_future(hurry.wait())]
    try:
        await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
