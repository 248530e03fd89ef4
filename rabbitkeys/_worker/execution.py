"""The worker's execution of one delivery: the one home of what happens between a delivery's
turn coming (the head of its key's buffer, see :mod:`.handoff`) and its ack.

A delivery carries one job (a plain message) or several jobs of its key (a batch,
:func:`~rabbitkeys._wire.envelope.jobs_of`). Each job, in order, goes through the dedup and order
check (:func:`verdict`), then its run in the job-run core (:func:`~.job_run.run_attempts`:
the body decoded as the handler declared it, the attempts, the retries the retry policy asks
for, and after the last attempt a dead-lettered copy of that job alone), through this
module's ports (:class:`_KeyPorts`: each handler call under the worker's concurrency limit,
the backoff cut short by shutdown, the copy to the broker's dead-letter queue); then the
next job. The delivery is acked once, after its last job. A batch that cannot be read is
dead-lettered whole, as received.

A job type whose policy is ``park`` (``App.handler(..., on_failure="park")``) is not
dead-lettered after its last attempt: the delivery's run ends there with a
:class:`~.job_run.Park` (the error, the attempts, which job of the delivery), the delivery
stays unacked, and the key's runner puts it back at the head of its key and lets the key go
(:mod:`.handoff`). A job the worker has no handler for is dead-lettered whatever the policy
(no route says park). While a job waits for its next attempt, its key is listed in
:attr:`Executor.failing` (the worker's heartbeats report it).

A job a redrive put back (header ``x-rabbitkeys-redrive``) runs as new: its publisher and
sequence were recorded when it failed, so the dedup check would drop it; it is not recorded
either.

A concurrency slot is held only while a handler runs. A retry waiting out its backoff holds
none, so a failing key does not keep the other keys from running; it still holds its own
key: the key's later deliveries wait behind it, in order.

A plain ``def`` handler runs in the worker's thread pool (``sync_handler_threads``), so the
event loop (heartbeats, other keys' async handlers) never waits for it. It takes a thread
before a concurrency slot: sync handlers waiting for a thread hold no slot that an async
handler could use. Middleware runs on the loop around it, in the handler's context
variables (``contextvars``), which the thread gets a copy of.

Each attempt has a time limit (:func:`time_limit`: the job type's ``timeout=``, else the
``job_timeout`` setting; 0 is none). An ``async def`` handler still running at the limit is
cancelled; a ``def`` handler's thread cannot be, so the attempt stops waiting for it and
the thread runs on, its result discarded. Either way the attempt fails with
:class:`~rabbitkeys.JobTimeoutError`, which the retry policy treats as any failure. A
thread left running (by its time limit, or by its session's end) keeps its place in the
pool until it returns, and its key's next handler call in this worker waits for it
(:class:`HandlerThreads`): a key never has two of its jobs running here at once.

The handler's call (:func:`call_handler`), its threads and time limits are shared with
``rabbitkeys.testing.InMemoryWorker``, so a test runs handlers as a worker does.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import functools
import inspect
import logging
import time
from collections.abc import Awaitable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aio_pika
from aio_pika.abc import AbstractChannel
from aiormq.abc import DeliveredMessage
from prometheus_client import Gauge

from .._broker.amqp import sleep_unless
from .._errors import HandlerNotFoundError, JobTimeoutError, RetryJob
from .._observe.metrics import WorkerMetrics
from .._settings import Settings
from .._wire.batch import BatchFormatError
from .._wire.envelope import (
    HEADER_REDRIVE,
    Envelope,
    dead_letter_headers,
    decode_envelope,
    jobs_of,
)
from .._wire.protocol import KeyAssignment, KeyFailure
from .._wire.topology import Names, key_matches_token
from .app import App, CallNext, Context, Message, Route
from .dedup import SequenceHistory, Verdict
from .job_run import (
    Decide,
    Failure,
    JobEnd,
    JobToRun,
    Park,
    chain,
    error_text,
    route_of,
    run_attempts,
)
from .retry import RetryPolicy
from .tracing import handle_span

__all__ = [
    "MIDDLEWARE_GRACE",
    "Deadlines",
    "Executor",
    "HandlerThreads",
    "Outcome",
    # a delivery's run ends with it; defined with the other steps of a job's run
    "Park",
    "call_handler",
    "time_limit",
    "verdict",
]

log = logging.getLogger("rabbitkeys.worker")

_T = TypeVar("_T")

#: seconds past the handler's time limit that the middleware around it may still run (to
#: see the handler's JobTimeoutError and report it) before the attempt as a whole is cut
MIDDLEWARE_GRACE = 1.0


class Outcome(enum.Enum):
    """How a delivery's run ended, unless its key is to be parked (:class:`Park`)."""

    #: every job handled, dropped as a copy, or dead-lettered: ack the delivery
    DONE = "done"
    #: shutdown came during a wait for a retry: the delivery must stay unacked (the drain
    #: hands it back)
    INTERRUPTED = "interrupted"


def time_limit(route: Route, job_timeout: float, message: Message[Any]) -> float | None:
    """Seconds one attempt of the route's handler on ``message`` may run, None for no
    limit: the job type's own ``timeout=`` if it set one (a function of the message: that
    job's), else the ``job_timeout`` setting; 0 is none."""
    own = route.timeout(message) if callable(route.timeout) else route.timeout
    limit = job_timeout if own is None else own
    return limit if limit > 0 else None


@dataclass(eq=False, slots=True)
class _Deadline:
    """When one attempt's call must have ended, and the task it runs in."""

    at: float
    task: asyncio.Task[Any]
    #: the task's pending cancellations when the call began (as ``asyncio.timeout`` keeps)
    cancelling: int
    expired: bool = False


class Deadlines:
    """The time limits of the calls running now, enforced as ``asyncio.timeout`` would (the
    task cancelled at the limit; the cancellation, if it is ours alone, becomes a
    :class:`~rabbitkeys.JobTimeoutError`), with one timer for all of them, armed at the
    earliest deadline: a timer per attempt (``asyncio.timeout``) cost 13-25 µs each on the
    shared 2-core machine, a tenth of a plain job's whole cost and half a batched one's."""

    def __init__(self) -> None:
        self._running: set[_Deadline] = set()
        #: armed at the earliest deadline (or one that has gone since: it arms the next)
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def within(
        self, limit: float | None, call: Awaitable[_T], route: Route, job_type: str
    ) -> _T:
        """Await ``call``, cancelled after ``limit`` seconds (None: no limit), which is then
        a :class:`~rabbitkeys.JobTimeoutError` (chained to where the call was cancelled). A
        ``TimeoutError`` the call raises itself passes as it is."""
        if limit is None:
            return await call
        task = asyncio.current_task()
        assert task is not None
        loop = task.get_loop()
        deadline = _Deadline(loop.time() + limit, task, task.cancelling())
        self._running.add(deadline)
        timer = self._timer
        if timer is None or deadline.at < timer.when() or loop is not self._loop:
            if timer is not None:
                timer.cancel()
            self._timer, self._loop = loop.call_at(deadline.at, self._expire), loop
        try:
            result = await call
        except asyncio.CancelledError as exc:
            if deadline.expired and task.uncancel() <= deadline.cancelling:
                raise JobTimeoutError(route.name, job_type, limit, sync=not route.is_async) from exc
            raise
        finally:
            self._running.discard(deadline)
        if deadline.expired:  # it ended as the limit came: the cancellation is withdrawn
            task.uncancel()
        return result

    def _expire(self) -> None:
        """Cancel the calls past their deadline; arm the timer for the next one."""
        self._timer = None
        earliest: _Deadline | None = None
        for deadline in self._running:
            if deadline.expired:
                continue
            if deadline.at <= deadline.task.get_loop().time():
                deadline.expired = True
                deadline.task.cancel()
            elif earliest is None or deadline.at < earliest.at:
                earliest = deadline
        if earliest is not None:
            self._timer = earliest.task.get_loop().call_at(earliest.at, self._expire)


@dataclass(eq=False)
class _Thread:
    """A thread of the pool, taken for one attempt of a sync handler of a key."""

    key: tuple[str, str]
    #: what runs in it, once submitted
    future: Future[Any] | None = None


@dataclass(eq=False)
class _Overdue:
    """A key's sync handler that still runs in its thread after its attempt ended."""

    future: Future[Any]
    since: float
    handler: str
    returned: asyncio.Event = field(default_factory=asyncio.Event)


class HandlerThreads:
    """The threads ``def`` handlers run in, as the worker counts them: ``size`` permits (the
    pool's size), one held per thread running a handler. A thread cannot be stopped, so an
    attempt that ends while its thread still runs (its time limit, its session's end)
    leaves it *overdue*: it keeps its permit until it returns (the pool really is a thread
    short), its result is discarded, and the key's next call waits for it (:meth:`take`),
    so a key never runs two jobs (or two attempts of one) at once in this worker.

    Used by the :class:`Executor` and by ``rabbitkeys.testing.InMemoryWorker``."""

    def __init__(self, size: int, overdue_gauge: Gauge | None = None) -> None:
        #: the worker's pool while it runs (None: not running)
        self.pool: ThreadPoolExecutor | None = None
        self._free = asyncio.Semaphore(size)
        self._overdue: dict[tuple[str, str], _Overdue] = {}
        self._gauge = overdue_gauge

    @property
    def overdue(self) -> int:
        """Threads still running a handler whose attempt ended."""
        return len(self._overdue)

    async def take(self, job_type: str, key: str) -> _Thread:
        """A thread for the key's handler: once the key's overdue thread returned, if it has
        one (outside any concurrency slot), and a permit is free."""
        ref = (job_type, key)
        overdue = self._overdue.get(ref)
        if overdue is not None:
            log.warning(
                "key %r of %s waits for its handler %s's thread, left running %.0f s ago, "
                "before running its next attempt or job",
                key,
                job_type,
                overdue.handler,
                time.monotonic() - overdue.since,
            )
            await overdue.returned.wait()
        await self._free.acquire()
        return _Thread(ref)

    async def run(self, thread: _Thread, route: Route, message: Message[Any]) -> Any:
        """Call the handler in a pool thread, in a copy of this task's context variables
        (what middleware set for tracing), as ``asyncio.to_thread`` would."""
        if self.pool is None:
            raise RuntimeError("the worker's thread pool is not running")
        thread.future = self.pool.submit(contextvars.copy_context().run, route.function, message)
        # Cancelled (time limit, session's end): a queued call is withdrawn, a running one
        # runs on (give_back sees it)
        result = await asyncio.wrap_future(thread.future)
        if inspect.isawaitable(result):  # an async callable that did not look like one
            if inspect.iscoroutine(result):
                result.close()
            raise TypeError(
                f"handler {route.name} returned an awaitable from a thread; make it an "
                "`async def` so the worker awaits it"
            )
        return result

    def give_back(self, thread: _Thread, handler: str) -> None:
        """The attempt ended: its permit is free now, or, if its thread still runs, when that
        thread returns (and the key is overdue until then)."""
        future = thread.future
        if future is None or future.done():
            self._free.release()
            return
        job_type, key = thread.key
        log.error(
            "key %r of %s: handler %s's attempt ended while its thread still runs (a thread "
            "cannot be stopped): it runs on and keeps its place in the pool, its result will "
            "be discarded, and the key's next attempt or job waits for it",
            key,
            job_type,
            handler,
        )
        overdue = _Overdue(future, time.monotonic(), handler)
        self._overdue[thread.key] = overdue
        if self._gauge is not None:
            self._gauge.inc()
        loop = asyncio.get_running_loop()

        def returned(_: Future[Any]) -> None:  # in the thread
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(self._returned, thread.key, overdue)

        future.add_done_callback(returned)

    def _returned(self, ref: tuple[str, str], overdue: _Overdue) -> None:
        self._free.release()
        if self._overdue.get(ref) is overdue:
            del self._overdue[ref]
        if self._gauge is not None:
            self._gauge.dec()
        error = None if overdue.future.cancelled() else overdue.future.exception()
        log.warning(
            "key %r of %s: handler %s's thread left running returned, %.1f s after its "
            "attempt ended (%s; discarded); the key goes on",
            ref[1],
            ref[0],
            overdue.handler,
            time.monotonic() - overdue.since,
            "it raised " + error_text(error) if error is not None else "its result",
        )
        overdue.returned.set()


def verdict(history: SequenceHistory, origin: tuple[str, int] | None) -> Verdict:
    """What a delivery is for its key: new, a copy of one handled already, or out of order.
    A delivery without an origin (not sent by a Publisher, or dedup turned off) is new."""
    return Verdict.NEW if origin is None else history.check(*origin)


def _key_of(assignment: KeyAssignment, envelope: Envelope) -> str:
    """A message's key comes from the queue it was delivered from (its assignment), never
    from what the message says. The header only gives the original text of a key the
    registry adopted from the broker, which knows a hashed key by its token alone, and
    only when that text hashes to the queue's token."""
    claimed = envelope.key
    if claimed is None or claimed == assignment.key:
        return assignment.key
    token = assignment.key_id.partition("/")[2]
    adopted = assignment.key == token
    return claimed if adopted and key_matches_token(claimed, token) else assignment.key


async def call_handler(
    app: App,
    route: Route,
    message: Message[Any],
    limit: float | None,
    deadlines: Deadlines,
    threads: HandlerThreads,
    thread: _Thread | None,
) -> Any:
    """One attempt's call of the handler on ``message``, through the app's middleware (the
    first registered outermost, :func:`~.job_run.chain`), within its time ``limit``; in
    ``thread`` (taken from ``threads``) for a ``def`` handler. What the outermost middleware
    returned (the handler's return value, unless a middleware changes it).
    Used by the :class:`Executor` and by ``rabbitkeys.testing.InMemoryWorker``."""
    middlewares = app.middlewares
    if thread is None and not middlewares:
        # the common case, without a call between
        return await deadlines.within(limit, route.function(message), route, message.job_type)
    innermost: CallNext = functools.partial(_call, route, limit, deadlines, threads, thread)
    return await deadlines.within(
        None if limit is None else limit + MIDDLEWARE_GRACE,
        chain(middlewares, innermost)(message),
        route,
        message.job_type,
    )


async def _call(
    route: Route,
    limit: float | None,
    deadlines: Deadlines,
    threads: HandlerThreads,
    thread: _Thread | None,
    message: Message[Any],
) -> Any:
    """The handler's call itself, within its time limit: the innermost of the chain."""
    if thread is None:
        return await deadlines.within(limit, route.function(message), route, message.job_type)
    return await deadlines.within(
        limit, threads.run(thread, route, message), route, message.job_type
    )


class Executor:
    """Runs deliveries for a worker: one per key at a time (the key's runner calls
    :meth:`execute` in turn), up to ``concurrency`` handlers at once over all keys. Lives as
    long as the worker; :meth:`begin` gives it each session's dead-letter channel. Each job
    runs in the job-run core (:func:`~.job_run.run_attempts`), through the ports of its
    key (:class:`_KeyPorts`).

    Plain ``def`` handlers run in ``threads`` (the worker's pool, set while it runs: a ``def``
    handler called without one raises ``RuntimeError``), at most ``sync_handler_threads`` at
    once."""

    def __init__(
        self,
        app: App,
        settings: Settings,
        metrics: WorkerMetrics,
        stopping: asyncio.Event,
        context: Context | None = None,
    ) -> None:
        self.app = app
        self.policy = RetryPolicy.from_settings(settings)
        self.context = context if context is not None else Context()
        self.handler_threads = HandlerThreads(
            settings.sync_handler_threads, metrics.overdue_handler_threads
        )
        self._job_timeout = settings.job_timeout
        self._deadlines = Deadlines()
        self._dedup = settings.dedup
        self._dead_letter_exchange = Names(settings.namespace).dead_letter_exchange
        self._metrics = metrics
        self._stopping = stopping
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._dead_letters: AbstractChannel | None = None
        self._worker_id = ""
        self._user_id = ""
        self.dead_lettered = 0
        self.duplicates_dropped = 0
        self.order_violations = 0
        #: handlers running now
        self.in_flight = 0
        #: keys whose current job failed and waits for its next attempt, by key id: from
        #: its first failure to its end (handled, dead-lettered, parked, or interrupted)
        self.failing: dict[str, KeyFailure] = {}

    @property
    def threads(self) -> ThreadPoolExecutor | None:
        """The worker's pool for ``def`` handlers, set while it runs."""
        return self.handler_threads.pool

    @threads.setter
    def threads(self, pool: ThreadPoolExecutor | None) -> None:
        self.handler_threads.pool = pool

    def begin(self, dead_letters: AbstractChannel, worker_id: str, user_id: str) -> None:
        """A new session: dead letters go out on its channel, under its worker id and the
        connection's user."""
        self._dead_letters = dead_letters
        self._worker_id = worker_id
        self._user_id = user_id

    async def execute(
        self, assignment: KeyAssignment, history: SequenceHistory, delivery: DeliveredMessage
    ) -> Outcome | Park:
        """Run a delivery to its end, job by job in order (one job for a plain message, each
        job of a batch): each handled, dropped as a copy, or dead-lettered alone. Then
        :attr:`Outcome.DONE`: the caller acks the delivery, once for all its jobs.
        :attr:`Outcome.INTERRUPTED` if shutdown interrupted a job's retries: the delivery
        must then stay unacked (the drain hands it back, and the jobs before that one run
        again at the next owner). A :class:`Park` if a job of a ``park`` job type failed its
        last attempt: the delivery must stay unacked, the jobs after that one did not run.
        Raises if a dead-letter copy cannot be made."""
        properties = delivery.header.properties
        try:
            jobs = jobs_of(properties, delivery.body)
        except BatchFormatError as exc:
            # a batch this worker cannot read: kept whole, as received, never dropped
            log.error(
                "key %s: unreadable batch, dead-lettering it whole: %s", assignment.key_id, exc
            )
            await self._dead_letter(
                delivery.body, properties.content_type, decode_envelope(properties), exc, 1
            )
            return Outcome.DONE
        self._metrics.delivery_jobs.observe(len(jobs))
        redelivered = bool(getattr(delivery.delivery, "redelivered", False))
        route = route_of(self.app, assignment.job_type)
        ports = _KeyPorts(self, assignment)
        dedup = self._dedup
        handled = 0
        try:
            for index, job in enumerate(jobs):
                origin = job.envelope.origin if dedup else None
                if origin is not None and HEADER_REDRIVE in job.envelope.headers:
                    # put back by a redrive: its origin was recorded when it failed here or
                    # elsewhere; it runs as new, and is not recorded again
                    origin = None
                if self._dropped(assignment, verdict(history, origin), origin):
                    continue
                to_run = JobToRun(
                    job.envelope,
                    job.body,
                    job.content_type,
                    _key_of(assignment, job.envelope),
                    assignment.job_type,
                    redelivered,
                    index,
                )
                match await self._run(assignment, route, to_run, ports):
                    case JobEnd.HANDLED:
                        handled += 1
                    case JobEnd.INTERRUPTED:
                        return Outcome.INTERRUPTED
                    case Failure(step=Park() as park):
                        return park  # not recorded: it was not handled
                if origin is not None:
                    history.record(*origin)
        finally:
            if handled:  # once per delivery: a metric call per job is a cost per job
                self._metrics.handled.inc(handled)
        return Outcome.DONE

    def _dropped(
        self, assignment: KeyAssignment, seen: Verdict, origin: tuple[str, int] | None
    ) -> bool:
        """Whether a job is dropped as a copy; counted, as one out of order is."""
        match seen:
            case Verdict.DUPLICATE:
                # the same publisher's same job again (sent twice across a lost
                # connection, or redelivered after a crash): handled already
                self.duplicates_dropped += 1
                self._metrics.duplicates_dropped.inc()
                return True
            case Verdict.OUT_OF_ORDER:
                self.order_violations += 1
                self._metrics.order_violations.inc()
                log.error("key %s: message %s arrived out of order", assignment.key_id, origin)
        return False

    async def _run(
        self,
        assignment: KeyAssignment,
        route: Route | HandlerNotFoundError,
        job: JobToRun,
        ports: _KeyPorts,
    ) -> JobEnd | Failure:
        """One job's run; while it waits for its next attempt, its key is in :attr:`failing`."""
        try:
            return await run_attempts(route, job, ports)
        finally:
            if self.failing:  # the job's end, or its session's: the key is no longer failing
                self.failing.pop(assignment.key_id, None)

    async def _attempt(
        self, job: JobToRun, route: Route, message: Message[Any], decide: Decide
    ) -> Failure | None:
        """One handler call (through the middleware) in a concurrency slot, and for a sync
        handler a thread, within its time limit, in its tracing span; the failure, if it
        raised (the span is handed its step)."""
        metrics = self._metrics
        if message.attempt > 1:
            metrics.retried.inc()
        published_at = job.envelope.published_at
        limit = time_limit(route, self._job_timeout, message)
        thread = None
        if not route.is_async:
            thread = await self.handler_threads.take(message.job_type, message.key)
        try:
            async with self._slots:
                if message.attempt == 1 and published_at is not None:
                    latency = max(0.0, time.time() - published_at / 1e6)
                    metrics.end_to_end_latency.observe(latency)
                self.in_flight += 1
                started = time.perf_counter()
                with handle_span(message, published_at) as span:  # a no-op without tracing
                    try:
                        await call_handler(
                            self.app,
                            route,
                            message,
                            limit,
                            self._deadlines,
                            self.handler_threads,
                            thread,
                        )
                    except Exception as exc:
                        metrics.handler_failures.inc()
                        if isinstance(exc, JobTimeoutError):
                            metrics.job_timeouts.labels(job_type=message.job_type).inc()
                        failure = decide(exc)
                        span.failed(exc, failure.step)
                        return failure
                    finally:
                        self.in_flight -= 1
                        metrics.handler_duration.observe(time.perf_counter() - started)
        finally:
            if thread is not None:
                self.handler_threads.give_back(thread, route.name)
        return None

    async def _dead_letter(
        self,
        body: bytes,
        content_type: str | None,
        envelope: Envelope,
        error: BaseException,
        attempts: int,
    ) -> None:
        """Copy a job (or a batch that cannot be read, whole) to the namespace's
        dead-letter queue with the error recorded; the caller acks the delivery only after
        the broker confirmed the copy."""
        assert self._dead_letters is not None
        exchange = await self._dead_letters.get_exchange(self._dead_letter_exchange, ensure=False)
        await exchange.publish(
            aio_pika.Message(
                body,
                headers=dead_letter_headers(
                    envelope, error=error, attempts=attempts, worker_id=self._worker_id
                ),
                content_type=content_type,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                user_id=self._user_id,
            ),
            routing_key="",
        )
        self.dead_lettered += 1
        self._metrics.dead_lettered.inc()


class _KeyPorts:
    """The executor's ports (:class:`~.job_run.Ports`) for the jobs of one delivery of a
    key: the executor's attempts, the stop that cuts a backoff, the key's failing entry, the
    broker's dead-letter queue."""

    __slots__ = ("_assignment", "_executor", "attempt", "context", "policy")

    def __init__(self, executor: Executor, assignment: KeyAssignment) -> None:
        self._executor = executor
        self._assignment = assignment
        self.policy = executor.policy
        self.context = executor.context
        self.attempt = executor._attempt  # bound once: no call between, per attempt

    def on_retry(self, job: JobToRun, attempt: int, error: Exception, delay: float) -> None:
        key_id = self._assignment.key_id
        if isinstance(error, RetryJob):  # asked for, not a failure (a Celery self.retry())
            log.info("key %s: attempt %d asks a retry in %.2fs: %s", key_id, attempt, delay, error)
        else:
            log.warning(
                "key %s: handler failed (attempt %d), retrying in %.2fs: %r",
                key_id,
                attempt,
                delay,
                error,
            )
        self._executor.failing[key_id] = KeyFailure(
            key_id=key_id, attempts=attempt, error=error_text(error)
        )

    async def wait(self, delay: float) -> bool:
        # outside the slot: other keys run meanwhile; this key's later jobs wait
        return await sleep_unless(self._executor._stopping, delay)

    async def dead_letter(self, job: JobToRun, error: Exception, attempts: int) -> None:
        key_id = self._assignment.key_id
        if self.policy.retries(error):
            log.error(
                "key %s: handler failed %d times, dead-lettering: %r", key_id, attempts, error
            )
        else:
            log.error("key %s: not retried, dead-lettering: %r", key_id, error)
        await self._executor._dead_letter(job.body, job.content_type, job.envelope, error, attempts)
