"""Helpers for tests: settings with short intervals, in-process registry and workers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import urllib.parse
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from rabbitkeys import App, Registry, Settings, Worker

IN_CI = os.environ.get("CI") == "true"


def skip_or_fail(message: str) -> None:
    """Skip locally; under ``CI=true`` a missing prerequisite is a failure, never a skip."""
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def make_settings(amqp_url: str, namespace: str, **overrides: Any) -> Settings:
    """Settings for tests: short intervals so membership and idleness play out in seconds."""
    values: dict[str, Any] = {
        "amqp_url": amqp_url,
        "namespace": namespace,
        "heartbeat_interval": 0.2,
        "worker_timeout": 1.5,
        "idle_period": 30.0,
        "retire_grace": 0.2,
        "retry_backoff": 0.02,
        "key_queue_expires": 120.0,
        "ensure_timeout": 10.0,
    }
    # a broker whose management API is not on port 15672 of its host (testcontainers)
    management_url = os.environ.get("RABBITKEYS_TEST_MANAGEMENT_URL")
    if management_url:
        values["management_url"] = management_url
    values.update(overrides)
    return Settings(**values)


def url_at(url: str, host: str, port: int | None = None) -> str:
    """``url`` with another host (and port)."""
    parts = urllib.parse.urlsplit(url)
    login = parts.netloc.rpartition("@")[0]
    port = port or parts.port or 5672
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{login}@{host}:{port}"))


def two_names_of_the_broker(url: str) -> list[str]:
    """``url`` under two host names of the same broker: two live "nodes" of a cluster."""
    host = urllib.parse.urlsplit(url).hostname or "localhost"
    other = {"localhost": "127.0.0.1", "127.0.0.1": "localhost"}.get(host)
    return [url_at(url, host), url_at(url, other or socket.gethostbyname(host))]


@contextlib.asynccontextmanager
async def running_registry(settings: Settings, **options: Any) -> AsyncIterator[Registry]:
    registry = Registry(settings, **options)
    await registry.start()
    try:
        await asyncio.wait_for(registry.wait_leading(), 10)
        yield registry
    finally:
        await asyncio.wait_for(registry.close(), 10)


@contextlib.asynccontextmanager
async def running_worker(
    settings: Settings, app: App, worker_id: str | None = None, **options: Any
) -> AsyncIterator[Worker]:
    worker = Worker(app, settings, worker_id=worker_id, **options)
    await worker.start()
    try:
        yield worker
    finally:
        await asyncio.wait_for(worker.close(), 30)


async def eventually(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> None:
    """Wait until ``predicate()`` is true; fail the test after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        await asyncio.sleep(interval)


class Handlings:
    """What in-process handlers did, per key: the values in handling order and when each
    handling started and finished (one monotonic clock: in-process workers share it)."""

    def __init__(self) -> None:
        self.values: dict[str, list[int]] = defaultdict(list)
        self.intervals: dict[str, list[tuple[float, float]]] = defaultdict(list)

    @contextlib.contextmanager
    def handling(self, key: str, value: int) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.values[key].append(value)
            self.intervals[key].append((started, time.monotonic()))

    def total(self) -> int:
        return sum(map(len, self.values.values()))

    def overlaps(self) -> list[tuple[str, float, float]]:
        """(key, start of a handling, end of the one before it that was still running)."""
        return overlapping(self.intervals)


def overlapping(
    intervals: dict[str, list[tuple[float, float]]],
) -> list[tuple[str, float, float]]:
    found = []
    for key, spans in intervals.items():
        busy_until = float("-inf")
        for started, finished in sorted(spans):
            if started < busy_until:
                found.append((key, started, busy_until))
            busy_until = max(busy_until, finished)
    return found
