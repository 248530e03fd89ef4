"""The worker's execution of one delivery: the one home of what happens between a delivery's
turn coming (the head of its key's buffer, see :mod:`._handoff`) and its ack.

A delivery carries one job (a plain message) or several jobs of its key (a batch,
:func:`~._envelope.jobs_of`). Each job, in order, goes through the dedup and order check
(:func:`verdict`), the body decoded as the handler declared it, the handler call (through
the app's middleware) under the worker's concurrency limit, the retries the retry policy
(:mod:`._retry`) asks for, and, after the last attempt, a dead-lettered copy of that job
alone; then the next job. The delivery is acked once, after its last job. A batch that
cannot be read is dead-lettered whole, as received.

A job type whose policy is ``park`` (``App.handler(..., on_failure="park")``) is not
dead-lettered after its last attempt: the delivery's run ends there with a :class:`Park`
(the error, the attempts, which job of the delivery), the delivery stays unacked, and the
key's runner puts it back at the head of its key and lets the key go (:mod:`._handoff`).
A job the worker has no handler for is dead-lettered whatever the policy (no route says
park). While a job waits for its next attempt, its key is listed in :attr:`Executor.failing`
(the worker's heartbeats report it).

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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel
from aiormq.abc import DeliveredMessage

from ._amqp import sleep_unless
from ._app import App, CallNext, Context, Message, Middleware, Route
from ._batch import BatchFormatError
from ._dedup import SequenceHistory, Verdict
from ._envelope import HEADER_REDRIVE, Envelope, Job, dead_letter_headers, jobs_of
from ._envelope import decode as decode_envelope
from ._errors import HandlerNotFoundError, PayloadError
from ._metrics import WorkerMetrics
from ._protocol import KeyAssignment, KeyFailure
from ._retry import DeadLetter, RetryPolicy
from ._settings import Settings
from ._topology import Names, key_matches_token
from ._tracing import handle_span

__all__ = ["MAX_ERROR_TEXT", "Executor", "Outcome", "Park", "error_text", "verdict"]

log = logging.getLogger("rabbitkeys.worker")


#: what an async handler holds instead of a thread (reusable: it holds nothing)
_NO_THREAD = contextlib.nullcontext()


#: the longest error text a park or a failing key reports (``KeyParked``, ``KeyFailure``)
MAX_ERROR_TEXT = 1000


def error_text(error: BaseException) -> str:
    """``"ExceptionType: text"``, cut to :data:`MAX_ERROR_TEXT` characters."""
    return f"{type(error).__name__}: {error}"[:MAX_ERROR_TEXT]


class Outcome(enum.Enum):
    """How a delivery's run ended, unless its key is to be parked (:class:`Park`)."""

    #: every job handled, dropped as a copy, or dead-lettered: ack the delivery
    DONE = "done"
    #: shutdown came during a wait for a retry: the delivery must stay unacked (the drain
    #: hands it back)
    INTERRUPTED = "interrupted"


@dataclass(frozen=True, slots=True)
class Park:
    """Job ``job_index`` of the delivery failed its last attempt and its job type's policy is
    ``park``: the delivery must stay unacked and go back to the head of its key, and the key
    must be let go (:mod:`._handoff`). The jobs before ``job_index`` were handled (and
    recorded in the key's dedup history)."""

    #: the last attempt's error (:func:`error_text`)
    error: str
    attempts: int
    #: 0 for a plain message; in a batch, the job that failed
    job_index: int


class _Outcome(enum.Enum):
    """How one job's run ended (a park: :class:`Park`)."""

    HANDLED = "handled"
    DEAD_LETTERED = "dead_lettered"
    #: shutdown came during a wait for a retry: the delivery must stay unacked
    INTERRUPTED = "interrupted"


def verdict(history: SequenceHistory, origin: tuple[str, int] | None) -> Verdict:
    """What a delivery is for its key: new, a copy of one handled already, or out of order.
    A delivery without an origin (not sent by a Publisher, or dedup turned off) is new."""
    return Verdict.NEW if origin is None else history.check(*origin)


def route_of(app: App, job_type: str) -> Route | HandlerNotFoundError:
    """The job type's route, or the error that no attempt can get past (no handler)."""
    try:
        return app.route(job_type)
    except HandlerNotFoundError as exc:
        return exc


def prepared_payload(
    route: Route | HandlerNotFoundError, body: bytes, content_type: str | None
) -> Any | Exception:
    """What the handler gets, made once per job (a body is the same for every attempt);
    or, for a job type without handler or a body that is not what the handler declared,
    the error: no attempt can succeed."""
    if isinstance(route, HandlerNotFoundError):
        return route
    try:
        return route.payload(body, content_type)
    except PayloadError as exc:
        return exc


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


class Executor:
    """Runs deliveries for a worker: one per key at a time (the key's runner calls
    :meth:`execute` in turn), up to ``concurrency`` handlers at once over all keys. Lives as
    long as the worker; :meth:`begin` gives it each session's dead-letter channel.

    Plain ``def`` handlers run in ``threads`` (the worker's pool, set while it runs; without
    one, asyncio's default executor), at most ``sync_handler_threads`` at once."""

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
        self.threads: ThreadPoolExecutor | None = None
        #: sync handlers still running in a thread after their session ended, by key
        self._abandoned: dict[tuple[str, str], Future[Any]] = {}
        self._dedup = settings.dedup
        self._dead_letter_exchange = Names(settings.namespace).dead_letter_exchange
        self._metrics = metrics
        self._stopping = stopping
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._free_threads = asyncio.Semaphore(settings.sync_handler_threads)
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
        dedup = self._dedup
        handled = 0
        try:
            for index, job in enumerate(jobs):
                origin = job.envelope.origin if dedup else None
                if origin is not None and HEADER_REDRIVE in job.envelope.headers:
                    # put back by a redrive: its origin was recorded when it failed here or
                    # elsewhere; it runs as new, and is not recorded again
                    origin = None
                match verdict(history, origin):
                    case Verdict.DUPLICATE:
                        # the same publisher's same job again (sent twice across a lost
                        # connection, or redelivered after a crash): handled already
                        self.duplicates_dropped += 1
                        self._metrics.duplicates_dropped.inc()
                        continue
                    case Verdict.OUT_OF_ORDER:
                        self.order_violations += 1
                        self._metrics.order_violations.inc()
                        log.error(
                            "key %s: message %s arrived out of order", assignment.key_id, origin
                        )
                match await self._handle(assignment, route, job, index, redelivered):
                    case _Outcome.HANDLED:
                        handled += 1
                    case _Outcome.INTERRUPTED:
                        return Outcome.INTERRUPTED
                    case Park() as park:
                        return park  # not recorded: it was not handled
                if origin is not None:
                    history.record(*origin)
        finally:
            if handled:  # once per delivery: a metric call per job is a cost per job
                self._metrics.handled.inc(handled)
        return Outcome.DONE

    async def _handle(
        self,
        assignment: KeyAssignment,
        route: Route | HandlerNotFoundError,
        job: Job,
        job_index: int,
        redelivered: bool,
    ) -> _Outcome | Park:
        """Run the handler on one job as often as the retry policy says; after the last
        attempt, dead-letter the job alone, or park its key if its route says so. While the
        job waits for its next attempt, its key is in :attr:`failing`."""
        envelope = job.envelope
        prepared = prepared_payload(route, job.body, job.content_type)
        key = _key_of(assignment, envelope)
        attempt = 0
        try:
            while True:
                attempt += 1
                if attempt > 1:
                    self._metrics.retried.inc()
                if isinstance(prepared, Exception):
                    error: Exception | None = prepared  # not retried: the policy says so
                else:
                    assert isinstance(route, Route)
                    message: Message[Any] = Message(
                        key=key,
                        job_type=assignment.job_type,
                        body=job.body,
                        # read-only: what a handler sees is what a dead letter would carry
                        headers=envelope.headers,
                        publisher_id=envelope.publisher_id,
                        sequence=envelope.sequence,
                        attempt=attempt,
                        redelivered=redelivered,
                        user_id=envelope.user_id,
                        payload=prepared,
                        content_type=job.content_type,
                        context=self.context,
                    )
                    error = await self._attempt(route, message, envelope.published_at)
                if error is None:
                    return _Outcome.HANDLED
                step = self.policy.after_failure(attempt, error)
                if isinstance(step, DeadLetter):
                    if isinstance(route, Route) and route.on_failure == "park":
                        # logged by the runner, with how to resume or skip, once let go
                        return Park(error_text(error), step.attempts, job_index)
                    if self.policy.retries(error):
                        log.error(
                            "key %s: handler failed %d times, dead-lettering: %r",
                            assignment.key_id,
                            attempt,
                            error,
                        )
                    else:
                        log.error(
                            "key %s: not retried, dead-lettering: %r", assignment.key_id, error
                        )
                    await self._dead_letter(
                        job.body, job.content_type, envelope, error, step.attempts
                    )
                    return _Outcome.DEAD_LETTERED
                log.warning(
                    "key %s: handler failed (attempt %d), retrying in %.2fs: %r",
                    assignment.key_id,
                    attempt,
                    step.delay,
                    error,
                )
                self.failing[assignment.key_id] = KeyFailure(
                    key_id=assignment.key_id, attempts=attempt, error=error_text(error)
                )
                # Outside the slot: other keys run meanwhile; this key's later jobs wait.
                if await sleep_unless(self._stopping, step.delay):
                    return _Outcome.INTERRUPTED
        finally:
            if self.failing:  # the job's end, or its session's: the key is no longer failing
                self.failing.pop(assignment.key_id, None)

    async def _attempt(
        self, route: Route, message: Message[Any], published_at: int | None
    ) -> Exception | None:
        """One handler call (through the middleware) in a concurrency slot, and for a sync
        handler a thread; what it raised, if anything."""
        metrics = self._metrics
        async with _NO_THREAD if route.is_async else self._free_threads, self._slots:
            if message.attempt == 1 and published_at is not None:
                metrics.end_to_end_latency.observe(max(0.0, time.time() - published_at / 1e6))
            self.in_flight += 1
            started = time.perf_counter()
            with handle_span(message, published_at) as span:  # a no-op without tracing
                try:
                    if route.is_async and not self.app.middlewares:
                        await route.function(message)  # the common case, without a call between
                    else:
                        await self._through_middleware(route, message)
                except Exception as exc:
                    metrics.handler_failures.inc()
                    span.failed(exc, self.policy, route)
                    return exc
                finally:
                    self.in_flight -= 1
                    metrics.handler_duration.observe(time.perf_counter() - started)
        return None

    def _through_middleware(self, route: Route, message: Message[Any]) -> Any:
        """The handler's call, wrapped in the app's middleware, the first registered
        outermost. No middleware: the handler's call itself."""
        call: CallNext = functools.partial(self._call, route)
        for middleware in reversed(self.app.middlewares):
            call = _wrap(middleware, call)
        return call(message)

    async def _call(self, route: Route, message: Message[Any]) -> Any:
        if route.is_async:
            return await route.function(message)
        if self.threads is None:
            raise RuntimeError("the worker's thread pool is not running")
        key = (message.job_type, message.key)
        earlier = self._abandoned.get(key)
        if earlier is not None:
            # This key's handler of a lost session still runs in its thread (threads cannot
            # be cancelled): the key's next message waits for it, as order wants.
            if not earlier.done():
                await asyncio.wait([asyncio.wrap_future(earlier)])
            del self._abandoned[key]
        # The thread runs in a copy of this task's context (what middleware set for
        # tracing), as asyncio.to_thread would, in the worker's pool.
        running = self.threads.submit(contextvars.copy_context().run, route.function, message)
        try:
            result = await asyncio.wrap_future(running)
        except asyncio.CancelledError:
            if not running.done():  # the session ended under it; the thread goes on
                self._abandoned = {k: f for k, f in self._abandoned.items() if not f.done()}
                self._abandoned[key] = running
            raise
        if inspect.isawaitable(result):  # an async callable that did not look like one
            if inspect.iscoroutine(result):
                result.close()
            raise TypeError(
                f"handler {route.name} returned an awaitable from a thread; make it an "
                "`async def` so the worker awaits it"
            )
        return result

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


def _wrap(middleware: Middleware, call_next: CallNext) -> CallNext:
    async def call(message: Message[Any]) -> Any:
        return await middleware(message, call_next)

    return call
