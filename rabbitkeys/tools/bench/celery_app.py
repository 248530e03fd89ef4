"""The Celery app of ``rabbitkeys bench --celery``: one task, run by plain Celery workers
(``celery -A rabbitkeys.tools.bench.celery_app worker``) and by the bridge's
(``rabbitkeys worker --celery rabbitkeys.tools.bench.celery_app:app``) alike.

The task sleeps the handler time and appends ``key seq pid started finished`` (wall-clock
seconds) to a Redis list, which the bench reads back: one record per run of a job, in the
order the runs finished. Where to, from the environment the bench gives its workers:
``RK_CELERY_BENCH_REDIS`` (a Redis URL) and ``RK_CELERY_BENCH_LIST`` (the list's name);
the plain Celery workers also read their broker (``RK_CELERY_BENCH_BROKER``), queue
(``RK_CELERY_BENCH_QUEUE``) and acks (``RK_CELERY_BENCH_ACKS_LATE``, ``1`` or ``0``).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from celery import Celery

__all__ = ["TASK_NAME", "app", "configure", "record"]

TASK_NAME = "rabbitkeys_bench.record"

app = Celery("rabbitkeys_bench")


def configure(celery_app: Celery, env: dict[str, str] | os._Environ[str]) -> None:
    """The app's configuration from ``env``: the workers', and the publishing side's."""
    acks_late = env.get("RK_CELERY_BENCH_ACKS_LATE", "1") == "1"
    celery_app.conf.update(
        broker_url=env.get("RK_CELERY_BENCH_BROKER", "amqp://guest:guest@127.0.0.1:5672//"),
        broker_connection_retry_on_startup=True,
        task_default_queue=env.get("RK_CELERY_BENCH_QUEUE", "rabbitkeys-bench-celery"),
        task_ignore_result=True,
        task_acks_late=acks_late,
        # what acks_late is for: a task that dies unacked is redelivered, not lost
        task_reject_on_worker_lost=acks_late,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        accept_content=["json"],
    )


configure(app, os.environ)

_local = threading.local()


def _redis() -> Any:
    client = getattr(_local, "redis", None)
    if client is None:
        import redis

        client = redis.Redis.from_url(
            os.environ.get("RK_CELERY_BENCH_REDIS", "redis://127.0.0.1:6379/7")
        )
        _local.redis = client
    return client


def _record(key: str, seq: int, work_ms: float) -> None:
    """Sleep ``work_ms`` (an I/O-bound job), then record the run."""
    started = time.time()
    if work_ms > 0:
        time.sleep(work_ms / 1000)
    finished = time.time()
    _redis().rpush(
        os.environ.get("RK_CELERY_BENCH_LIST", "rabbitkeys-bench-celery"),
        f"{key} {seq} {os.getpid()} {started:.6f} {finished:.6f}",
    )


#: the task (``app.task`` as a call: Celery is untyped)
record: Any = app.task(name=TASK_NAME)(_record)
