"""What the broker knows, read through the management plugin's HTTP API.

A registry that starts leading (after a failover or a broker restart) learns the keys
workers consume from the workers themselves; keys nobody consumes (a handoff cut short, no
worker for the job type, every worker restarting) only the broker knows. Without this they
would wait unconsumed until ``x-expires`` deleted them with their messages.
"""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from ._errors import BrokerUnavailableError
from ._settings import Settings
from ._tls import client_context, failure_hint

__all__ = ["BrokerQueue", "endpoint", "list_bindings", "list_queues", "request", "routing_keys"]


@dataclass(frozen=True, slots=True)
class BrokerQueue:
    name: str
    messages: int
    #: None while the broker's statistics are not collected yet (just after a restart)
    consumers: int | None


def endpoint(settings: Settings) -> tuple[str, str, str, str]:
    """Base URL, user, password and vhost for the management API."""
    amqp = urllib.parse.urlsplit(settings.amqp_url.get_secret_value())
    vhost = settings.vhost
    unquote = urllib.parse.unquote
    user, password = unquote(amqp.username or "guest"), unquote(amqp.password or "guest")
    if settings.management_url is None:
        # RabbitMQ's customary ports: 15672 plain, 15671 behind TLS
        https = amqp.scheme.lower() == "amqps"
        host = amqp.hostname or "localhost"
        host = f"[{host}]" if ":" in host else host
        base = f"https://{host}:15671" if https else f"http://{host}:15672"
        return base, user, password, vhost
    given = urllib.parse.urlsplit(settings.management_url.get_secret_value())
    netloc = given.hostname or "localhost"
    netloc = f"[{netloc}]" if ":" in netloc else netloc
    if given.port:
        netloc += f":{given.port}"
    base = urllib.parse.urlunsplit((given.scheme, netloc, given.path.rstrip("/"), "", ""))
    return base, unquote(given.username or user), unquote(given.password or password), vhost


def request(settings: Settings, path: str, *, method: str = "GET", body: Any = None) -> Any:
    """One management API call: its JSON answer (None if empty). Raises
    :class:`BrokerUnavailableError` when the API cannot be reached (the password masked),
    and lets ``urllib.error.HTTPError`` through for the caller to read its status."""
    base, user, password, _ = endpoint(settings)
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    data = None if body is None else json.dumps(body).encode()
    call = urllib.request.Request(f"{base}/api/{path}", data=data, method=method)
    call.add_header("Authorization", f"Basic {token}")
    call.add_header("Content-Type", "application/json")
    try:
        tls = (
            client_context(settings.tls_ca_file, settings.tls_cert_file, settings.tls_key_file)
            if base.lower().startswith("https:")
            else None
        )
        with urllib.request.urlopen(call, timeout=60, context=tls) as response:
            answer = response.read()
        return json.loads(answer) if answer else None
    except urllib.error.HTTPError:
        raise
    except (OSError, ValueError) as exc:  # ConfigError: a certificate file mid-rotation
        reason = str(exc)
        for secret in {password, urllib.parse.quote(password, safe="")} - {""}:
            reason = reason.replace(secret, "***")
        if base.lower().startswith("https:"):
            reason += failure_hint(
                reason, ca_file=settings.tls_ca_file, cert_file=settings.tls_cert_file
            )
        raise BrokerUnavailableError(f"management API {base}: {reason}") from None


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
    query = (
        "columns=name,messages,consumers"
        if statistics
        else "disable_stats=true&enable_queue_totals=true&columns=name,messages"
    )
    body = _get(settings, f"queues/{_vhost(settings)}?{query}")
    return [
        BrokerQueue(item["name"], int(item.get("messages") or 0), item.get("consumers"))
        for item in body
        if item["name"].startswith(prefix)
    ]


def _list_bindings(settings: Settings, exchange: str) -> list[tuple[str, str]]:
    name = urllib.parse.quote(exchange, safe="")
    body = _get(settings, f"exchanges/{_vhost(settings)}/{name}/bindings/source")
    return [(b["destination"], b["routing_key"]) for b in body if b["destination_type"] == "queue"]


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
