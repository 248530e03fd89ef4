"""Fixtures: a real RabbitMQ, a namespace per test, and registries/workers run in-process.

The broker is ``RABBITKEYS_TEST_AMQP_URL`` if set, else the one on localhost, else one
started with testcontainers. Without any, tests skip with the reason, except under
``CI=true``, where that is a failure.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import aio_pika
import pytest

from rabbitkeys import Settings

from .support import make_settings

LOCAL_URL = "amqp://guest:guest@localhost:5672/"
MANAGEMENT_URL = os.environ.get("RABBITKEYS_TEST_MANAGEMENT_URL", "http://localhost:15672")


def _answers(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "localhost", parts.port or 5672), 2):
            pass
    except OSError:
        return False

    async def login() -> None:
        connection = await aio_pika.connect(url, timeout=5)
        await connection.close()

    try:
        asyncio.run(login())
    except Exception:
        return False
    return True


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    reasons = []
    explicit = os.environ.get("RABBITKEYS_TEST_AMQP_URL")
    if explicit:
        if _answers(explicit):
            yield explicit
            return
        reasons.append("RABBITKEYS_TEST_AMQP_URL does not answer")
    elif _answers(LOCAL_URL):
        yield LOCAL_URL
        return
    else:
        reasons.append("no RabbitMQ on localhost:5672")
        try:
            from testcontainers.rabbitmq import RabbitMqContainer

            with RabbitMqContainer("rabbitmq:3.13-management") as container:
                params = container.get_connection_params()
                yield (
                    f"amqp://guest:guest@{params.host}:{params.port}/"  # type: ignore[attr-defined]
                )
                return
        except Exception as exc:
            reasons.append(f"testcontainers could not start one ({type(exc).__name__}: {exc})")
    message = "no RabbitMQ broker: " + "; ".join(reasons)
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def namespace(request: pytest.FixtureRequest) -> Iterator[str]:
    name = f"t-{request.node.name[:30]}-{uuid.uuid4().hex[:8]}"
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)
    yield name
    _delete_namespace(name)


@pytest.fixture
def settings(amqp_url: str, namespace: str) -> Settings:
    return make_settings(amqp_url, namespace)


def _management(path: str, method: str = "GET") -> Any:
    request = urllib.request.Request(f"{MANAGEMENT_URL}/api/{path}", method=method)
    token = base64.b64encode(b"guest:guest").decode()
    request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=5) as response:
        body = response.read()
    return json.loads(body) if body else None


def _delete_namespace(namespace: str) -> None:
    """Remove what a test left on the broker, through the management API when it runs
    (key queues would otherwise linger until their x-expires)."""
    prefix = f"{namespace}."
    try:
        queues = _management("queues/%2F?columns=name")
        exchanges = _management("exchanges/%2F?columns=name")
    except (urllib.error.URLError, OSError):
        return
    for kind, items in (("queues", queues), ("exchanges", exchanges)):
        for item in items:
            if item["name"].startswith(prefix):
                quoted = urllib.parse.quote(item["name"], safe="")
                with contextlib.suppress(urllib.error.URLError, OSError):
                    _management(f"{kind}/%2F/{quoted}", method="DELETE")
