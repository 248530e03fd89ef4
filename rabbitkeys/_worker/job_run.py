"""One job's run, from its first attempt to its end: the worker's core, the one home of what
follows a handler's failure. Pure: it decides, and the shell around it does the I/O through
ports (:class:`Ports`): the real worker's (:mod:`.execution`: concurrency slots, threads,
time limits, tracing, the broker's dead-letter queue) and the in-memory test worker's
(``rabbitkeys.testing``: the same slots, threads and time limits, dead letters kept in a
list), as httpx runs one client over a real or a mock transport.

:func:`run_attempts` runs a job: the body decoded once as its handler declared it
(:func:`prepared_payload`), the handler's :class:`~rabbitkeys.Message` built once (each
retry a copy with its attempt number), each attempt through the ``attempt`` port, and after
each failure the step :func:`next_step` decides: retry (``on_retry``, then ``wait`` out the
backoff: the core never sleeps), dead-letter (``dead_letter``), or park (returned: the
caller stops the key). The middleware chain each attempt runs through is :func:`chain`.
A job no attempt can get past (a body that does not fit what its handler declared, a job
type without handler) calls no ``attempt``: it goes straight to ``dead_letter`` (or to its
park, for a parking job type whose body does not fit).

:func:`next_step` is the decision itself: the retry policy (:mod:`.retry`) says retry or give
up; a job type whose ``on_failure`` is ``park`` gives up by parking its key instead of
dead-lettering the job. A job type without a handler is dead-lettered whatever the policy
(no route says park). The tracing span of an attempt is handed the step decided here
(:mod:`.tracing`), so no one asks the policy twice.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from .._errors import HandlerNotFoundError, PayloadError, failure_text
from .._wire.envelope import Envelope
from .app import App, CallNext, Context, Message, Middleware, Route
from .retry import DeadLetter, Retry, RetryPolicy

__all__ = [
    "MAX_ERROR_TEXT",
    "Decide",
    "Failure",
    "JobEnd",
    "JobToRun",
    "Park",
    "Ports",
    "Step",
    "chain",
    "error_text",
    "first_message",
    "next_step",
    "prepared_payload",
    "route_of",
    "run_attempts",
]

#: the longest error text a park or a failing key reports (``KeyParked``, ``KeyFailure``)
MAX_ERROR_TEXT = 1000


def error_text(error: BaseException) -> str:
    """``"ExceptionType: text"`` (:func:`~rabbitkeys._errors.failure_text`), cut to
    :data:`MAX_ERROR_TEXT` characters."""
    return failure_text(error)[:MAX_ERROR_TEXT]


@dataclass(frozen=True, slots=True)
class Park:
    """Job ``job_index`` of the delivery failed its last attempt and its job type's policy is
    ``park``: the delivery must stay unacked and go back to the head of its key, and the key
    must be let go (:mod:`.handoff`). The jobs before ``job_index`` were handled (and
    recorded in the key's dedup history)."""

    #: the last attempt's error (:func:`error_text`)
    error: str
    attempts: int
    #: 0 for a plain message; in a batch, the job that failed
    job_index: int


#: what follows a failed attempt
Step = Retry | DeadLetter | Park


def next_step(
    policy: RetryPolicy,
    route: Route | HandlerNotFoundError,
    attempt: int,
    error: BaseException,
    *,
    job_index: int = 0,
) -> Step:
    """What follows failed attempt ``attempt`` (1 for the first) of a job of ``route`` (the
    error instead if its job type has no handler) that failed with ``error``: another
    attempt, or after the last one the job dead-lettered, or its key parked if its route
    says so. ``job_index``: the job's place in its delivery, for a park."""
    step = policy.after_failure(attempt, error)
    if isinstance(step, DeadLetter) and isinstance(route, Route) and route.on_failure == "park":
        # a job type that parks parks whatever failed, a body that does not fit too (at
        # once: no retry changes it; an operator skips it or resumes once the handler
        # accepts it)
        return Park(error_text(error), step.attempts, job_index)
    return step


@dataclass(frozen=True, slots=True)
class Failure:
    """A failed attempt: its error and the step :func:`next_step` decided after it."""

    error: Exception
    step: Step


#: what the ``attempt`` port calls once with an attempt's error: the failure, its step decided
Decide = Callable[[Exception], Failure]


class JobEnd(enum.Enum):
    """How a job's run ended, unless its key is to be parked (a :class:`Failure` whose step
    is a :class:`Park`)."""

    HANDLED = "handled"
    DEAD_LETTERED = "dead_lettered"
    #: shutdown came during a wait for a retry: the delivery must stay unacked
    INTERRUPTED = "interrupted"


@dataclass(frozen=True, slots=True)
class JobToRun:
    """A job as its run needs it: what came with it, and what the shell knows of it."""

    envelope: Envelope
    body: bytes
    content_type: str | None
    #: the key as the handler sees it (a worker takes it from the queue it consumed)
    key: str
    job_type: str
    #: the broker delivered it before
    redelivered: bool
    #: its place in its delivery (0 for a plain message; in a batch, which job)
    index: int = 0


class Ports(Protocol):
    """What the shell gives a job's run: the retry policy and the worker's context, and the
    I/O. The ports see a job's steps in order: ``attempt``; after a failure whose step is a
    retry, ``on_retry`` then ``wait``; after one that dead-letters, ``dead_letter``. A job
    that no attempt can get past (its body does not fit, its job type has no handler) skips
    ``attempt``: the ports see only ``dead_letter``, or nothing before a returned park; so
    per-job state belongs in every port that can come first, not in ``attempt`` alone."""

    @property
    def policy(self) -> RetryPolicy: ...

    @property
    def context(self) -> Context: ...

    async def attempt(
        self, job: JobToRun, route: Route, message: Message[Any], decide: Decide
    ) -> Failure | None:
        """Call the handler on ``message`` through the middleware (:func:`chain`), within its
        time limit; None if it returned, else ``decide(error)``, called once (while the
        attempt's tracing span is open, to hand it the step)."""

    def on_retry(self, job: JobToRun, attempt: int, error: Exception, delay: float) -> None:
        """Attempt ``attempt`` failed with ``error``; the next one comes after ``delay``
        seconds (the key is failing meanwhile)."""

    async def wait(self, delay: float) -> bool:
        """Wait ``delay`` seconds before the next attempt; True if shutdown cut the wait
        (the run ends there, the job not finished)."""

    async def dead_letter(self, job: JobToRun, error: Exception, attempts: int) -> None:
        """Copy the job to the dead letters, its last error recorded."""


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


def chain(middlewares: Sequence[Middleware], call: CallNext) -> CallNext:
    """``call`` wrapped in ``middlewares``, the first one outermost. None: ``call`` itself."""
    for middleware in reversed(middlewares):
        call = _wrap(middleware, call)
    return call


def _wrap(middleware: Middleware, call_next: CallNext) -> CallNext:
    async def call(message: Message[Any]) -> Any:
        return await middleware(message, call_next)

    return call


def first_message(job: JobToRun, payload: Any, context: Context) -> Message[Any]:
    """The handler's message for the job's first attempt; a retry's is a copy of it with
    its own attempt number."""
    envelope = job.envelope
    return Message(
        key=job.key,
        job_type=job.job_type,
        body=job.body,
        # read-only: what a handler sees is what a dead letter would carry
        headers=envelope.headers,
        publisher_id=envelope.publisher_id,
        sequence=envelope.sequence,
        attempt=1,
        redelivered=job.redelivered,
        user_id=envelope.user_id,
        payload=payload,
        content_type=job.content_type,
        context=context,
    )


async def run_attempts(
    route: Route | HandlerNotFoundError, job: JobToRun, ports: Ports
) -> JobEnd | Failure:
    """Run the handler on ``job`` as often as the retry policy says: :attr:`JobEnd.HANDLED`
    once an attempt succeeds; after the last attempt, the job dead-lettered
    (:attr:`JobEnd.DEAD_LETTERED`) or, if its route parks, the last :class:`Failure`,
    whose step is the :class:`Park`; :attr:`JobEnd.INTERRUPTED` if shutdown cut a wait.
    ``route``: the job type's, or the error that it has none."""
    policy = ports.policy
    prepared = prepared_payload(route, job.body, job.content_type)
    message: Message[Any] | None = None
    attempt = 0

    def decide(error: Exception) -> Failure:
        return Failure(error, next_step(policy, route, attempt, error, job_index=job.index))

    while True:
        attempt += 1
        if isinstance(prepared, Exception):
            failure: Failure | None = decide(prepared)  # not retried: the policy says so
        else:
            assert isinstance(route, Route)
            if message is None:
                message = first_message(job, prepared, ports.context)
            else:
                message = replace(message, attempt=attempt)
            failure = await ports.attempt(job, route, message, decide)
        if failure is None:
            return JobEnd.HANDLED
        step = failure.step
        if isinstance(step, Park):
            return failure
        if isinstance(step, DeadLetter):
            await ports.dead_letter(job, failure.error, step.attempts)
            return JobEnd.DEAD_LETTERED
        ports.on_retry(job, attempt, failure.error, step.delay)
        # the shell waits out the backoff: other keys run meanwhile, this key's later jobs
        # wait behind this one
        if await ports.wait(step.delay):
            return JobEnd.INTERRUPTED
