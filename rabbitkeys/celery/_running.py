"""Running a Celery app's tasks as rabbitkeys jobs: :func:`worker_app` makes a
:class:`~rabbitkeys.App` with one handler for the Celery job type, which runs each job's
task in the worker's thread pool through Celery's own tracer (``celery.app.trace``): the
request context (``self.request``), the signals (``task_prerun``, ``task_success``...),
``on_success`` / ``on_failure`` / ``after_return``, and the result backend's states, as a
Celery worker gives them.

What Celery does by publishing again, the bridge does in place, so that nothing overtakes:

- ``self.retry(countdown=...)`` (and ``autoretry_for``, ``retry_backoff``): the task's
  retry is caught before it reaches Celery's broker, and the job is tried again after the
  countdown (:class:`~rabbitkeys.RetryJob`) while its key waits; ``max_retries`` is
  Celery's, counted from ``self.request.retries``.
- a task that fails (its last retry, or an error it does not retry) ends its job at once
  (:class:`~rabbitkeys.FailJob`): dead-lettered or its key parked, per ``on_failure``.
- ``time_limit``: the job's rabbitkeys time limit (``RABBITKEYS_JOB_TIMEOUT`` when the task
  sets none), past which the job fails at once, as a Celery task past its hard limit does
  (no retry); at Celery's ``time_limit`` ``TimeLimitExceeded`` is raised inside the task,
  and at ``soft_time_limit`` ``SoftTimeLimitExceeded``, as Celery does, when Python next
  runs the task's own code (a thread cannot be killed: one blocked in C runs on until it
  returns, and its key waits for it).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import logging
import socket
import threading
from collections.abc import Iterator
from typing import Any

from celery import Celery, Task
from celery.app.task import Context
from celery.app.trace import build_tracer
from celery.exceptions import (
    NotRegistered,
    Reject,
    Retry,
    SoftTimeLimitExceeded,
    TimeLimitExceeded,
)
from celery.states import FAILURE, REJECTED, RETRY

from .._errors import ConfigError, FailJob, JobTimeoutError, RetryJob
from .._worker.app import App, CallNext, Message, OnFailure
from ._protocol import read_job
from ._publishing import JOB_TYPE

__all__ = ["worker_app"]

log = logging.getLogger("rabbitkeys.celery")


def worker_app(
    celery_app: Celery, *, job_type: str = JOB_TYPE, on_failure: OnFailure = "dead_letter"
) -> App:
    """A rabbitkeys :class:`~rabbitkeys.App` that runs ``celery_app``'s registered tasks,
    one job at a time per key, in publish order: ``rabbitkeys worker --celery
    proj.celery:app`` runs it. ``on_failure``: what follows a task's last failed attempt,
    ``"dead_letter"`` or ``"park"`` (the key waits for ``rabbitkeys resume`` / ``skip``)."""
    if not isinstance(celery_app, Celery):
        raise ConfigError(f"worker_app() takes a Celery app, not {celery_app!r}")
    runner = _TaskRunner(celery_app)
    app = App()
    app.add_handler(job_type, runner.run, on_failure=on_failure, timeout=runner.time_limit)
    app.on_startup(runner.start)
    app.middleware(_time_limit_fails_the_task)
    return app


async def _time_limit_fails_the_task(message: Message[Any], call_next: CallNext) -> Any:
    """A task past its time limit fails, as in Celery: no retry."""
    try:
        return await call_next(message)
    except JobTimeoutError as exc:
        raise FailJob(f"task {message.headers.get('task')} ran past its time limit") from exc


class _TaskRunner:
    """Runs the jobs of one Celery app (a handler of its job type, on pool threads)."""

    def __init__(self, celery_app: Celery) -> None:
        self.celery = celery_app
        self.hostname = f"rabbitkeys@{socket.gethostname()}"
        self._tracers: dict[str, Any] = {}
        self._lock = threading.Lock()
        #: a retry's arguments (``self.retry(args=...)``) by (task id, attempt), until that
        #: attempt takes them (a redelivery starts from the message's own)
        self._pending_retries: dict[tuple[str, int], tuple[Any, Any]] = {}

    def start(self, context: Any) -> None:
        """Load the app's tasks as a Celery worker would (``imports``, ``include``,
        ``autodiscover_tasks()``) and make each task's retry come back here."""
        self.celery.loader.init_worker()
        self.celery.finalize(auto=True)
        for task in self.celery.tasks.values():
            self._catch_retries(task)

    # --- limits ------------------------------------------------------------------------

    def time_limit(self, message: Message[Any]) -> float | None:
        """The job's rabbitkeys time limit: the task's hard ``time_limit`` (the message's,
        else the task's, else ``task_time_limit``); None (``RABBITKEYS_JOB_TIMEOUT``) when
        Celery sets none."""
        task = self.celery.tasks.get(str(message.headers.get("task")))
        return self._limit(task, message, 0)

    def _limit(self, task: Task | None, message: Message[Any], which: int) -> float | None:
        """The task's hard (``which`` 0) or soft (1) time limit in seconds, None if none."""
        limit = _limits(message)[which]
        if limit is None and task is not None:
            limit = task.time_limit if which == 0 else task.soft_time_limit
        if limit is None:
            conf = self.celery.conf
            limit = conf.task_time_limit if which == 0 else conf.task_soft_time_limit
        return float(limit) if limit else None

    # --- running -----------------------------------------------------------------------

    def run(self, message: Message) -> None:
        """The handler: run the job's task; raise what tells rabbitkeys what follows."""
        job = read_job(message, self.celery.conf.accept_content)
        task = self.celery.tasks.get(job.name)
        if task is None:
            raise FailJob(f"unknown task {job.name}") from NotRegistered(
                f"{job.name} (not a task of this worker's Celery app)"
            )
        if job.expired():
            log.info("task %s[%s] expired at %s: revoked", job.name, job.task_id, job.expires)
            task.backend.mark_as_revoked(job.task_id, "expired", request=_request(job.request))
            return
        request = dict(job.request)
        # a retry's count goes on from the message's; its arguments are its call's
        request["retries"] = job.retries + message.attempt - 1
        args, kwargs = self._pending_retries.pop(
            (job.task_id, message.attempt), (job.args, job.kwargs)
        )
        request["args"], request["kwargs"] = list(args), dict(kwargs)
        _running.job = job.task_id
        traced = None
        try:
            with (
                _raise_after(self._limit(task, message, 1), SoftTimeLimitExceeded),
                _raise_after(self._limit(task, message, 0), TimeLimitExceeded),
            ):
                traced = self._tracer(task)(job.task_id, list(args), dict(kwargs), request)
        except (SoftTimeLimitExceeded, TimeLimitExceeded):
            if traced is None:
                raise
            # it came as the task ended, outside it: the task's outcome stands
        except Reject as exc:
            if exc.requeue:
                raise RuntimeError(f"task {job.name} rejected, to be requeued: {exc}") from exc
            raise FailJob(f"task {job.name} rejected") from exc
        finally:
            _running.job = None
        info = traced.info
        if info is None or info.state not in (RETRY, FAILURE, REJECTED):
            return  # done (or ignored: ``raise Ignore()``)
        if info.state == RETRY:
            reason: Retry = info.retval
            if reason.sig is not None:
                self._pending_retries[(job.task_id, message.attempt + 1)] = (
                    tuple(reason.sig.args),
                    dict(reason.sig.kwargs),
                )
            raise RetryJob(_seconds_until(reason.when), f"task {job.name} retry: {reason}")
        raise FailJob(f"task {job.name} failed") from info.retval

    def _tracer(self, task: Task) -> Any:
        tracer = self._tracers.get(task.name)
        if tracer is None:
            with self._lock:
                tracer = self._tracers.get(task.name)
                if tracer is None:
                    tracer = build_tracer(
                        task.name, task, app=self.celery, hostname=self.hostname, eager=False
                    )
                    self._tracers[task.name] = tracer
        return tracer

    # --- retries -----------------------------------------------------------------------

    def _catch_retries(self, task: Task) -> None:
        """``self.retry()`` publishes the task again (``S.apply_async()``) before raising
        ``Retry``: for the job this thread runs, that send is dropped, and the job runs again
        in place (:meth:`run`). Every other send (a task that calls another) goes to Celery.
        Once per task, whichever runner comes first: the job a thread runs is one for all."""
        if "_rabbitkeys_send" in task.__dict__:
            return
        send = task._rabbitkeys_send = task.apply_async

        def apply_async(
            args: Any = None, kwargs: Any = None, task_id: Any = None, **options: Any
        ) -> Any:
            if task_id is not None and task_id == getattr(_running, "job", None):
                if "retries" in options:
                    return task.AsyncResult(task_id)
            return send(args, kwargs, task_id, **options)

        task.apply_async = apply_async


#: per thread: the task id of the job it runs, while its task may call ``self.retry()``
_running = threading.local()


def _limits(message: Message[Any]) -> tuple[float | None, float | None]:
    limits = message.headers.get("timelimit") or (None, None)
    return limits[0], limits[1]


def _request(fields: dict[str, Any]) -> Context:
    return Context(fields)


def _seconds_until(when: Any) -> float:
    """Celery's retry ``when``: seconds, or a datetime (``eta=``)."""
    if when is None:
        return 0.0
    if isinstance(when, datetime.datetime):
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.UTC)
        return max(0.0, (when - datetime.datetime.now(datetime.UTC)).total_seconds())  # type: ignore[no-any-return]
    return max(0.0, float(when))


@contextlib.contextmanager
def _raise_after(seconds: float | None, error: type[BaseException]) -> Iterator[None]:
    """Raise ``error`` in this thread after ``seconds``, as Celery's time limits do (Python
    delivers it when the thread next runs Python code: a call blocked in C, a
    ``time.sleep`` or a socket read, gets it when it returns)."""
    if not seconds:
        yield
        return
    thread_id = threading.get_ident()
    lock = threading.Lock()
    state = {"running": True}

    def expire() -> None:
        with lock:
            if state["running"]:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(thread_id), ctypes.py_object(error)
                )

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        with lock:
            state["running"] = False
            timer.cancel()
            # an exception set but not yet raised is withdrawn
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), None)
