"""Running a Celery app's tasks as rabbitkeys jobs: :func:`worker_app` makes a
:class:`~rabbitkeys.App` with one handler for the Celery job type, which runs each job's
task in the worker's thread pool through Celery's own tracer (``celery.app.trace``): the
request context (``self.request``), the signals (``task_prerun``, ``task_success``...),
``on_success`` / ``on_failure`` / ``after_return``, and the result backend's states, as a
Celery worker gives them. The worker starts as a Celery worker does: Celery's worker setup
(``setup_worker_optimizations``: the app current in every thread), the ``worker_init`` and
``worker_process_init`` signals (Django's fixup closes stale database connections on them).

What Celery does by publishing again, the bridge does in place, so that nothing overtakes:

- ``self.retry(countdown=...)`` (and ``autoretry_for``, ``retry_backoff``): the task's
  retry is caught before it reaches Celery's broker, and the job is tried again after the
  countdown (:class:`~rabbitkeys.RetryJob`) while its key waits; ``max_retries`` is
  Celery's, counted from ``self.request.retries``. A delivery is held at most
  :data:`RETRY_WINDOW` through its retries (RabbitMQ's ``consumer_timeout`` is 30
  minutes): a retry that would hold it longer fails the task.
- a task that fails (its last retry, or an error it does not retry) ends its job at once
  (:class:`~rabbitkeys.FailJob`): dead-lettered or its key parked, per ``on_failure``.
- time limits (:mod:`._time_limits`): ``SoftTimeLimitExceeded`` at ``soft_time_limit``
  and ``TimeLimitExceeded`` at ``time_limit`` raised inside the task; a task past its hard
  limit fails, whatever it did with the exception (no retry), as in Celery. The worker's
  own deadline for the job is the hard limit plus :data:`GRACE` (the task's outcome comes
  first), or ``RABBITKEYS_JOB_TIMEOUT`` for a task with no limit, at which the task gets
  ``TimeLimitExceeded`` too.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import socket
import threading
import time
from typing import Any

from celery import Celery, Task, signals
from celery.app.task import Context
from celery.app.trace import build_tracer, reset_worker_optimizations, setup_worker_optimizations
from celery.exceptions import NotRegistered, Reject, Retry, TimeLimitExceeded
from celery.states import FAILURE, REJECTED, RETRY, REVOKED, SUCCESS

from .._errors import ConfigError, FailJob, JobTimeoutError, RetryJob
from .._worker.app import App, CallNext, Message, OnFailure
from ._metrics import UNREGISTERED, TaskMetrics
from ._protocol import CeleryJob, read_job
from ._publishing import JOB_TYPE
from ._time_limits import TaskRun, current_run, in_body

__all__ = [
    "GRACE",
    "RETRY_WINDOW",
    "RetryWindowExceededError",
    "WorkerTimeLimitExceeded",
    "worker_app",
]

log = logging.getLogger("rabbitkeys.celery")

#: seconds past a task's hard ``time_limit`` before the worker gives up on the job itself:
#: the exception raised in the task at the limit decides first
GRACE = 5.0

#: the longest a delivery is held through in-place retries: under RabbitMQ's default
#: ``consumer_timeout`` (30 minutes), past which a broker before 4.3 closes the channel of
#: the worker that holds it (and every key of that worker starts over)
RETRY_WINDOW = 25 * 60.0


class RetryWindowExceededError(Exception):
    """A task's retry would have held its job past ``RETRY_WINDOW`` (25 minutes of retries,
    under RabbitMQ's 30-minute ``consumer_timeout``): the task failed."""


class WorkerTimeLimitExceeded(TimeLimitExceeded):
    """The worker's deadline for a job passed: its task ran past its ``time_limit`` and
    ``GRACE`` (5 s), or, without one, past ``RABBITKEYS_JOB_TIMEOUT``. What the dead letter
    records (billiard's ``TimeLimitExceeded`` prints its arguments as a tuple)."""

    __str__ = Exception.__str__


def worker_app(
    celery_app: Celery, *, job_type: str = JOB_TYPE, on_failure: OnFailure = "dead_letter"
) -> App:
    """A rabbitkeys :class:`~rabbitkeys.App` that runs ``celery_app``'s registered tasks,
    one job at a time per key, in publish order: ``rabbitkeys worker --celery
    proj.celery:app`` runs it. ``on_failure``: what follows a task's last failed attempt,
    ``"dead_letter"`` or ``"park"`` (the key waits for ``rabbitkeys resume`` / ``skip``)."""
    if not isinstance(celery_app, Celery):
        raise ConfigError(f"worker_app() takes a Celery app, not {celery_app!r}")
    runner = _TaskRunner(celery_app, parks=on_failure == "park")
    app = App()
    app.add_handler(job_type, runner.run, on_failure=on_failure, timeout=runner.time_limit)
    app.on_startup(runner.start)
    app.on_shutdown(runner.stop)
    app.middleware(runner.past_the_deadline)
    return app


class _TaskRunner:
    """Runs the jobs of one Celery app (a handler of its job type, on pool threads)."""

    def __init__(self, celery_app: Celery, *, parks: bool = False) -> None:
        self.celery = celery_app
        self.metrics = TaskMetrics()
        #: a failed job parks its key (it may run later) rather than being dead-lettered
        self.parks = parks
        self.hostname = f"rabbitkeys@{socket.gethostname()}"
        self._tracers: dict[str, Any] = {}
        self._lock = threading.Lock()
        #: the sender of ``worker_init`` / ``worker_shutdown``, in Celery its worker
        self._as_worker = _WorkerSender(celery_app, self.hostname)
        #: the runs going on, by task id: what the worker's deadline stops
        self._runs: dict[str, TaskRun] = {}
        #: a retry's arguments (``self.retry(args=...)``) and when the delivery's first
        #: attempt began, by task id, until the job ends (a redelivery starts afresh)
        self._retrying: dict[str, tuple[float, Any, Any]] = {}

    # --- the worker's life ---------------------------------------------------------------

    def start(self, context: Any) -> None:
        """Start as a Celery worker does: its setup, the app's tasks loaded (``imports``,
        ``include``, ``autodiscover_tasks()``), ``worker_init`` and
        ``worker_process_init``."""
        setup_worker_optimizations(self.celery, self.hostname)
        self.celery.loader.init_worker()
        self.celery.finalize(auto=True)
        for task in self.celery.tasks.values():
            _instrument(task)
        signals.worker_init.send(sender=self._as_worker)
        signals.worker_process_init.send(sender=None)

    def stop(self, context: Any) -> None:
        signals.worker_process_shutdown.send(sender=None, pid=os.getpid(), exitcode=0)
        signals.worker_shutdown.send(sender=self._as_worker)
        reset_worker_optimizations(self.celery)

    # --- limits --------------------------------------------------------------------------

    def time_limit(self, message: Message[Any]) -> float | None:
        """The worker's deadline for the job: the task's hard limit plus :data:`GRACE`,
        None (``RABBITKEYS_JOB_TIMEOUT``) for a task with none."""
        task = self.celery.tasks.get(str(message.headers.get("task")))
        hard = self._limit(task, message, 0)
        return hard + GRACE if hard is not None else None

    def _limit(self, task: Task | None, message: Message[Any], which: int) -> float | None:
        """The task's hard (``which`` 0) or soft (1) time limit in seconds, None if none:
        the message's, else the task's, else the app's ``task_time_limit`` /
        ``task_soft_time_limit``."""
        limits = message.headers.get("timelimit") or (None, None)
        limit = limits[which]
        if limit is None and task is not None:
            limit = task.time_limit if which == 0 else task.soft_time_limit
        if limit is None:
            conf = self.celery.conf
            limit = conf.task_time_limit if which == 0 else conf.task_soft_time_limit
        # AMQP carries a float in 32 bits: 0.3 comes back as 0.30000001192...
        return round(float(limit), 3) if limit else None

    async def past_the_deadline(self, message: Message[Any], call_next: CallNext) -> Any:
        """Middleware: at the worker's deadline the task gets ``TimeLimitExceeded`` (its
        thread runs on until it returns to Python code) and its job fails, not retried,
        ``FAILURE`` in the result backend, as a task past Celery's hard limit."""
        try:
            return await call_next(message)
        except JobTimeoutError as exc:
            task_id = str(message.headers.get("id"))
            run = self._runs.get(task_id)
            if run is not None:
                run.exceed(TimeLimitExceeded)
            name = str(message.headers.get("task"))
            task = self.celery.tasks.get(name)
            if task is not None:
                error = TimeLimitExceeded(exc.limit)
                request = Context({**message.headers, "correlation_id": task_id})
                await asyncio.to_thread(
                    task.backend.mark_as_failure, task_id, error, request=request
                )
            # what the dead letter (or the park) and the log say: which task, which limit
            if self._limit(task, message, 0) is None:
                why = (
                    f"task {name} ran past {exc.limit:g} s, the worker's limit for a task "
                    "without time_limit (RABBITKEYS_JOB_TIMEOUT): give it a time_limit"
                )
            else:
                why = f"task {name} ran past its time_limit and {GRACE:g} s more"
            raise FailJob(why) from WorkerTimeLimitExceeded(why)

    # --- running -------------------------------------------------------------------------

    def run(self, message: Message) -> None:
        """The handler: run the job's task; raise what tells rabbitkeys what follows."""
        job = read_job(message, self.celery.conf.accept_content)
        task = self.celery.tasks.get(job.name)
        if task is None:
            self.metrics.ran(UNREGISTERED, FAILURE)
            if not self.parks:  # as a Celery worker does: FAILURE, so that get() returns
                self.celery.backend.mark_as_failure(
                    job.task_id, NotRegistered(job.name), request=Context(job.request)
                )
            raise FailJob(f"unknown task {job.name}") from NotRegistered(
                f"{job.name} (not a task of this worker's Celery app)"
            )
        _instrument(task)
        started, args, kwargs = self._retrying.pop(job.task_id, (None, job.args, job.kwargs))
        if message.attempt == 1 or started is None:  # a new delivery: its own arguments
            started, args, kwargs = time.monotonic(), job.args, job.kwargs
        if job.expired():
            log.info("task %s[%s] expired at %s: revoked", job.name, job.task_id, job.expires)
            task.backend.mark_as_revoked(job.task_id, "expired", request=Context(job.request))
            self.metrics.ran(job.name, REVOKED)
            return
        request = {
            **job.request,
            # a retry's count goes on from the message's
            "retries": job.retries + message.attempt - 1,
            "args": list(args),
            "kwargs": dict(kwargs),
            "hostname": self.hostname,
        }
        run = TaskRun(job.task_id, self._limit(task, message, 1), self._limit(task, message, 0))
        self._runs[job.task_id] = run
        began = time.perf_counter()
        try:
            with run:
                traced = self._tracer(task)(job.task_id, list(args), dict(kwargs), request)
        finally:
            self._runs.pop(job.task_id, None)
        info = traced.info
        state = FAILURE if run.timed_out else info.state if info is not None else SUCCESS
        self.metrics.ran(job.name, state, time.perf_counter() - began)
        if run.timed_out:  # past the hard limit: failed, whatever the task made of it
            error = TimeLimitExceeded(self._limit(task, message, 0))
            task.backend.mark_as_failure(job.task_id, error, request=Context(request))
            raise FailJob(f"task {job.name} ran past its time limit") from error
        if info is None or info.state not in (RETRY, FAILURE, REJECTED):
            return  # done (or ignored: ``raise Ignore()``)
        if info.state == RETRY:
            self._retry(task, job, info.retval, started, request)
        if info.state == REJECTED and isinstance(info.retval, Reject) and info.retval.requeue:
            # Celery puts it back in its queue: here it stays at its key's head, retried
            # with the worker's backoff (RABBITKEYS_MAX_RETRIES)
            raise RuntimeError(f"task {job.name} rejected, to be requeued: {info.retval}")
        raise FailJob(f"task {job.name} failed") from info.retval

    def _retry(
        self, task: Task, job: CeleryJob, reason: Retry, started: float, request: dict[str, Any]
    ) -> None:
        """Raise the :class:`~rabbitkeys.RetryJob` of a task's ``Retry``; or fail the task
        if the retry would hold its job past :data:`RETRY_WINDOW`."""
        delay = _seconds_until(reason.when)
        held = time.monotonic() - started
        if held + delay > RETRY_WINDOW:
            error = RetryWindowExceededError(
                f"a retry in {delay:g} s would hold the job {held + delay:.0f} s through its "
                f"retries, past {RETRY_WINDOW:.0f} s (RabbitMQ's consumer_timeout is 30 min)"
            )
            task.backend.mark_as_failure(job.task_id, error, request=Context(request))
            raise FailJob(f"task {job.name} failed") from error
        args, kwargs = job.args, job.kwargs
        if reason.sig is not None:  # self.retry(args=..., kwargs=...): the next attempt's
            args, kwargs = tuple(reason.sig.args), dict(reason.sig.kwargs)
        self._retrying[job.task_id] = (started, args, kwargs)
        raise RetryJob(delay, f"task {job.name} retry: {reason}")

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


class _WorkerSender:
    """What a receiver of ``worker_init`` / ``worker_shutdown`` reads of Celery's worker
    (the signal's sender): the app, the host name and the pool (Django's fixup reads
    ``pool_cls`` before each task, to know whether it runs in a forked child)."""

    __slots__ = ("app", "hostname")

    #: tasks run on threads, as in Celery's ``threads`` pool (``--pool threads``)
    pool_cls = "threads"

    def __init__(self, app: Celery, hostname: str) -> None:
        self.app = app
        self.hostname = hostname


def _instrument(task: Task) -> None:
    """Once per task, before its tracer is built (it binds ``task.run``): mark its body for
    the time limits (:func:`~._time_limits.in_body`), and catch its retries.

    ``self.retry()`` publishes the task again (``S.apply_async()``) before raising
    ``Retry``: for the job this thread runs, that send is dropped, and the job runs again in
    place (:meth:`_TaskRunner.run`). Every other send (a task that calls another) goes on to
    Celery. A task registered after the worker started is instrumented at its first job."""
    with _instrumenting:
        if "_rabbitkeys_send" in task.__dict__:
            return
        send = task.apply_async

        def apply_async(
            args: Any = None, kwargs: Any = None, task_id: Any = None, **options: Any
        ) -> Any:
            run = current_run()
            if run is not None and task_id == run.task_id and "retries" in options:
                return task.AsyncResult(task_id)
            return send(args, kwargs, task_id, **options)

        task.run = in_body(task.run)
        task.apply_async = apply_async
        task._rabbitkeys_send = send


#: one thread instruments a task (the first jobs of a task may come on two threads at once)
_instrumenting = threading.Lock()


def _seconds_until(when: Any) -> float:
    """Celery's retry ``when``: seconds, or a datetime (``eta=``)."""
    if when is None:
        return 0.0
    if isinstance(when, datetime.datetime):
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.UTC)
        seconds = (when - datetime.datetime.now(datetime.UTC)).total_seconds()
        return max(0.0, float(seconds))
    return max(0.0, float(when))
