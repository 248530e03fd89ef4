"""The Celery bridge's tests share their Celery app (tests/celery/tasks.py)."""

from __future__ import annotations

import socket
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest

from ..support import skip_or_fail
from . import tasks


@pytest.fixture
def celery_app() -> Iterator[Any]:
    """The tests' Celery app, its records cleared; its results removed from Redis after."""
    parts = urllib.parse.urlsplit(tasks.RESULT_BACKEND)
    try:
        socket.create_connection((parts.hostname, parts.port or 6379), timeout=2).close()
    except OSError as exc:
        skip_or_fail(f"no Redis for the result backend at {tasks.RESULT_BACKEND}: {exc}")
    tasks.ran.clear()
    tasks.spans.clear()
    tasks.fixed.clear()
    yield tasks.celery
    ids = {task_id for *_, task_id in tasks.ran}
    for task_id in ids:
        tasks.celery.backend.forget(task_id)
