"""The Celery app of the bridge's tests: tasks as Celery users write them, recording what
they did in memory (the worker runs in the test's process)."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded

from rabbitkeys.celery import OrderedTask

#: the result backend: the machine's Redis, a database of the tests' own
RESULT_BACKEND = os.environ.get("RABBITKEYS_TEST_REDIS_URL", "redis://127.0.0.1:6379/4")

# No Celery broker: a task the bridge let through to Celery's own publishing (its retry
# leaking out, say) fails loudly instead of landing in a queue nobody reads.
celery = Celery("bridge-tests", broker="amqp://nobody:nobody@127.0.0.1:1//", backend=RESULT_BACKEND)
celery.conf.broker_connection_retry = False
celery.conf.broker_connection_max_retries = 0
celery.conf.result_expires = 600
# the workers take pickle too: a task may choose it (serializer="pickle")
celery.conf.accept_content = ["json", "pickle"]

#: (task, key, n, retries, request id) in the order the tasks ran
ran: list[tuple[str, str, int, int, str]] = []
#: (key, started, finished) of each run, for the no-overlap check
spans: list[tuple[str, float, float]] = []
_lock = threading.Lock()


def record(name: str, key: str, n: int, request: Any) -> None:
    with _lock:
        ran.append((name, key, n, request.retries, request.id))


@celery.task(bind=True)
def create_comment(self: Any, key: str, n: int, pause: float = 0.0) -> int:
    started = time.monotonic()
    record("create", key, n, self.request)
    time.sleep(pause)
    spans.append((key, started, time.monotonic()))
    return n


@celery.task(bind=True)
def delete_comment(self: Any, key: str, n: int) -> str:
    started = time.monotonic()
    record("delete", key, n, self.request)
    spans.append((key, started, time.monotonic()))
    return f"deleted {n}"


@celery.task(bind=True, max_retries=3)
def flaky(self: Any, key: str, n: int, fail_times: int) -> list[int]:
    record("flaky", key, n, self.request)
    if self.request.retries < fail_times:
        raise self.retry(countdown=0.05)
    return [n, self.request.retries]


@celery.task(bind=True, max_retries=5)
def retried_with_other_args(self: Any, key: str, n: int) -> int:
    record("other-args", key, n, self.request)
    if n < 3:
        raise self.retry(args=(key, n + 1), countdown=0)
    return n


class Flaky(Exception):
    pass


@celery.task(
    bind=True, autoretry_for=(Flaky,), retry_backoff=True, retry_backoff_max=1, retry_jitter=False
)
def autoretried(self: Any, key: str, n: int) -> int:
    record("auto", key, n, self.request)
    if self.request.retries < 2:
        raise Flaky(f"try {self.request.retries}")
    return self.request.retries


@celery.task(bind=True)
def fails(self: Any, key: str, n: int) -> None:
    record("fails", key, n, self.request)
    raise ValueError(f"comment {n} of {key} cannot be saved")


@celery.task(bind=True, serializer="pickle")
def pickled(self: Any, key: str, tags: set[str]) -> list[str]:
    """Arguments JSON cannot carry (a set), in the task's own serializer."""
    record("pickled", key, len(tags), self.request)
    return sorted(tags)


#: what ``fails_until_fixed`` waits for (a downstream service back, say)
fixed = threading.Event()


@celery.task(bind=True)
def fails_until_fixed(self: Any, key: str, n: int) -> int:
    record("until-fixed", key, n, self.request)
    if not fixed.is_set():
        raise RuntimeError("the payment service is down")
    return n


@celery.task(bind=True, soft_time_limit=0.3)
def soft_limited(self: Any, key: str, n: int) -> str:
    record("soft", key, n, self.request)
    try:
        while True:  # Python code: the limit's exception arrives here
            time.sleep(0.01)
    except SoftTimeLimitExceeded:
        return "cleaned up"


@celery.task(bind=True, time_limit=0.3)
def hard_limited(self: Any, key: str, n: int) -> str:
    record("hard", key, n, self.request)
    while True:
        time.sleep(0.01)


@celery.task(bind=True, ignore_result=True)
def no_result(self: Any, key: str, n: int) -> int:
    record("no-result", key, n, self.request)
    return n


@celery.task(bind=True, base=OrderedTask)
def based(self: Any, key: str, n: int) -> int:
    record("based", key, n, self.request)
    return n


class AppContextTask(celery.Task):  # type: ignore[name-defined,misc]
    """Flask's and Django's pattern: a base class whose ``__call__`` wraps the task in a
    context and calls ``super().__call__``."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        context.append("entered")
        return super().__call__(*args, **kwargs)


#: what AppContextTask's __call__ saw
context: list[str] = []


@celery.task(bind=True, base=AppContextTask, max_retries=2)
def in_context(self: Any, key: str, n: int) -> list[Any]:
    from celery import current_app

    record("context", key, n, self.request)
    if self.request.retries < 1:
        raise self.retry(countdown=0)
    return [self.request.id, self.request.retries, current_app.main]


@celery.task(bind=True, time_limit=0.3, autoretry_for=(Exception,), max_retries=3)
def hard_limited_autoretry(self: Any, key: str, n: int) -> str:
    record("hard-auto", key, n, self.request)
    while True:
        time.sleep(0.01)


@celery.task(bind=True)
def no_limit_sleeper(self: Any, key: str, n: int) -> str:
    record("sleeper", key, n, self.request)
    while True:
        time.sleep(0.01)


@celery.task(bind=True, max_retries=10)
def long_retries(self: Any, key: str, n: int) -> None:
    record("long", key, n, self.request)
    raise self.retry(countdown=0.2)


@celery.task(bind=True)
def rejects(self: Any, key: str, n: int) -> int:
    from celery.exceptions import Reject

    record("rejects", key, n, self.request)
    if self.request.retries == 0:
        raise Reject("not now", requeue=True)
    return n
