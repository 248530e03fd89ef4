"""What the broker knows, read through the management plugin's HTTP API.

A registry that starts leading (after a failover or a broker restart) learns the keys
workers consume from the workers themselves; keys nobody consumes (a handoff cut short, no
worker for the job type, every worker restarting) only the broker knows. Without this they
would wait unconsumed until ``x-expires`` deleted them with their messages.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from .._errors import BrokerUnavailableError
from .._settings import Settings
from .._tls import client_context, failure_hint

__all__ = [
    "Binding",
    "BrokerQueue",
    "endpoint",
    "endpoints",
    "list_bindings",
    "list_source_bindings",
    "list_queues",
    "request",
    "routing_keys",
]


@dataclass(frozen=True, slots=True)
class BrokerQueue:
    name: str
    messages: int
    #: None while the broker's statistics are not collected yet (just after a restart)
    consumers: int | None
    #: the AMQP ``timestamp`` (Unix seconds) of the message at its head: only in a listing
    #: with statistics, and only once the broker collected them; None if empty or unknown
    head_timestamp: int | None = None


@dataclass(frozen=True, slots=True)
class Binding:
    """A binding from an exchange, with its arguments."""

    destination: str
    #: ``queue`` or ``exchange``
    destination_type: str
    routing_key: str
    arguments: dict[str, Any]


def endpoints(settings: Settings) -> list[tuple[str, str, str, str]]:
    """Base URL, user, password and vhost of each management endpoint (one per node of a
    cluster), in the order ``settings.management_urls`` lists them."""
    amqp = urllib.parse.urlsplit(settings.amqp_urls[0])
    unquote = urllib.parse.unquote
    # every AMQP URL has the same user (Settings checks it), and a cluster shares its users
    user, password = unquote(amqp.username or "guest"), unquote(amqp.password or "guest")
    found = []
    for url in settings.management_urls:
        given = urllib.parse.urlsplit(url)
        netloc = given.hostname or "localhost"
        netloc = f"[{netloc}]" if ":" in netloc else netloc
        if given.port:
            netloc += f":{given.port}"
        base = urllib.parse.urlunsplit((given.scheme, netloc, given.path.rstrip("/"), "", ""))
        login = unquote(given.username or user), unquote(given.password or password)
        found.append((base, *login, settings.vhost))
    return found


def endpoint(settings: Settings) -> tuple[str, str, str, str]:
    """Base URL, user, password and vhost of the management endpoint :func:`request` tries
    first: the one that last answered, else the first listed."""
    return _in_order(endpoints(settings))[0]


#: the base URL that last answered, per list of endpoints: a node that went down costs one
#: failed attempt, not one per request. Shared by the threads requests run in; a stale
#: entry only changes which endpoint is tried first.
_answered: dict[tuple[str, ...], str] = {}

#: seconds to open a connection to an endpoint: a node that is down (its address
#: blackholed) must not hold a request for the whole :data:`_ANSWER_TIMEOUT` before the
#: next node is tried
_CONNECT_TIMEOUT = 5.0
#: seconds to wait for an answer once connected: an unpaged listing of 100,000 queues takes
#: the broker a while
_ANSWER_TIMEOUT = 60.0


def _in_order(found: list[tuple[str, str, str, str]]) -> list[tuple[str, str, str, str]]:
    bases = [base for base, *_ in found]
    last = _answered.get(tuple(bases))
    start = bases.index(last) if last in bases else 0
    return found[start:] + found[:start]


def request(settings: Settings, path: str, *, method: str = "GET", body: Any = None) -> Any:
    """One management API call: its JSON answer (None if empty). Tries each endpoint in
    turn, starting with the one that last answered: one that cannot be reached, times out
    or answers 5xx (a node going down) hands the call to the next. A 4xx is the API's
    answer: ``urllib.error.HTTPError`` goes through for the caller to read its status.
    Raises :class:`BrokerUnavailableError` naming every endpoint (passwords masked) when
    none answered."""
    found = endpoints(settings)
    key = tuple(base for base, *_ in found)
    failures = []
    for base, user, password, _ in _in_order(found):
        try:
            answer = _call(settings, base, user, password, path, method, body)
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                _answered[key] = base
                raise
            exc.close()
            failures.append(f"{base}: HTTP {exc.code} {exc.reason}")
            continue
        # HTTPException: the node went away mid-answer; ConfigError (a ValueError): a
        # certificate file mid-rotation
        except (OSError, ValueError, http.client.HTTPException) as exc:
            reason = str(exc)
            for secret in {password, urllib.parse.quote(password, safe="")} - {""}:
                reason = reason.replace(secret, "***")
            if base.lower().startswith("https:"):
                reason += failure_hint(
                    reason, ca_file=settings.tls_ca_file, cert_file=settings.tls_cert_file
                )
            failures.append(f"{base}: {reason}")
            continue
        _answered[key] = base
        return answer
    raise BrokerUnavailableError(f"management API {'; '.join(failures)}")


def _call(
    settings: Settings, base: str, user: str, password: str, path: str, method: str, body: Any
) -> Any:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    data = None if body is None else json.dumps(body).encode()
    call = urllib.request.Request(f"{base}/api/{path}", data=data, method=method)
    call.add_header("Authorization", f"Basic {token}")
    call.add_header("Content-Type", "application/json")
    tls = (
        client_context(settings.tls_ca_file, settings.tls_cert_file, settings.tls_key_file)
        if base.lower().startswith("https:")
        else None
    )
    opener = urllib.request.build_opener(_HTTPHandler(), _HTTPSHandler(context=tls))
    with opener.open(call, timeout=_ANSWER_TIMEOUT) as response:
        answer = response.read()
    return json.loads(answer) if answer else None


class _QuickConnectMixin:
    """Opens its socket within :data:`_CONNECT_TIMEOUT` (a TLS handshake too), then waits
    up to its own timeout for each answer."""

    timeout: float | None
    sock: socket.socket

    def connect(self) -> None:
        answer_timeout, self.timeout = self.timeout, _CONNECT_TIMEOUT
        try:
            super().connect()  # type: ignore[misc]
        finally:
            self.timeout = answer_timeout
        self.sock.settimeout(answer_timeout)


class _QuickConnect(_QuickConnectMixin, http.client.HTTPConnection):
    pass


class _QuickConnectTLS(_QuickConnectMixin, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_QuickConnect, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, context: ssl.SSLContext | None) -> None:
        super().__init__(context=context)
        self._tls = context

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_QuickConnectTLS, req, context=self._tls)


def _get(settings: Settings, path: str) -> Any:
    try:
        return request(settings, path)
    except urllib.error.HTTPError as exc:  # a refusal: the API is not there for us
        raise BrokerUnavailableError(f"management API {endpoint(settings)[0]}: {exc}") from None


def _vhost(settings: Settings) -> str:
    return urllib.parse.quote(endpoint(settings)[3], safe="")


def _list_queues(settings: Settings, prefix: str, statistics: bool) -> list[BrokerQueue]:
    # One unpaged listing, filtered here: with paging, the broker sorts and filters every
    # queue of the vhost for each page of 500, which costs O(queues^2 / 500) at 100,000 keys.
    # Without statistics the broker answers from its queue records and each queue's own
    # message count (disable_stats, enable_queue_totals: RabbitMQ 3.8+), not from the
    # management database's per-queue statistics, which are the costly part at that scale.
    # head_message_timestamp comes with statistics only (measured on 3.10.8: a listing with
    # disable_stats=true leaves it out, whatever the columns asked for).
    query = (
        "columns=name,messages,consumers,head_message_timestamp"
        if statistics
        else "disable_stats=true&enable_queue_totals=true&columns=name,messages"
    )
    body = _get(settings, f"queues/{_vhost(settings)}?{query}")
    return [
        BrokerQueue(
            item["name"],
            int(item.get("messages") or 0),
            item.get("consumers"),
            _timestamp(item.get("head_message_timestamp")),
        )
        for item in body
        if item["name"].startswith(prefix)
    ]


def _timestamp(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _list_bindings(settings: Settings, exchange: str) -> list[tuple[str, str]]:
    name = urllib.parse.quote(exchange, safe="")
    body = _get(settings, f"exchanges/{_vhost(settings)}/{name}/bindings/source")
    return [(b["destination"], b["routing_key"]) for b in body if b["destination_type"] == "queue"]


def _source_bindings(settings: Settings, exchange: str) -> list[Binding]:
    name = urllib.parse.quote(exchange, safe="")
    body = _get(settings, f"exchanges/{_vhost(settings)}/{name}/bindings/source")
    return [
        Binding(
            str(b["destination"]),
            str(b["destination_type"]),
            str(b["routing_key"]),
            dict(b.get("arguments") or {}),
        )
        for b in body
    ]


def _routing_keys(settings: Settings, exchange: str, queue: str) -> list[str]:
    quote = urllib.parse.quote
    path = f"bindings/{_vhost(settings)}/e/{quote(exchange, safe='')}/q/{quote(queue, safe='')}"
    return [str(binding["routing_key"]) for binding in _get(settings, path)]


async def routing_keys(settings: Settings, exchange: str, queue: str) -> list[str]:
    """The routing keys ``queue`` is bound to ``exchange`` with. Raises
    :class:`BrokerUnavailableError`."""
    return await asyncio.to_thread(_routing_keys, settings, exchange, queue)


async def list_queues(
    settings: Settings, prefix: str, *, statistics: bool = True
) -> list[BrokerQueue]:
    """Queues whose name starts with ``prefix``. Without ``statistics``, a cheaper listing
    whose ``consumers`` are all None. Raises :class:`BrokerUnavailableError`."""
    return await asyncio.to_thread(_list_queues, settings, prefix, statistics)


async def list_bindings(settings: Settings, exchange: str) -> list[tuple[str, str]]:
    """(queue, routing key) of every binding from ``exchange``."""
    return await asyncio.to_thread(_list_bindings, settings, exchange)


async def list_source_bindings(settings: Settings, exchange: str) -> list[Binding]:
    """Every binding from ``exchange`` (to queues and exchanges), with its arguments.
    Raises :class:`BrokerUnavailableError`."""
    return await asyncio.to_thread(_source_bindings, settings, exchange)
