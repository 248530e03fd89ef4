"""The worker's tracing spans, on the shared plumbing of :mod:`rabbitkeys._observe.tracing`
(which says when tracing is on; off, :func:`handle_span` costs next to nothing). Per job:

* ``wait <job_type>`` (INTERNAL), from the job's ``x-rabbitkeys-published-at`` to the start
  of its handler's first attempt: the time the job waited (in the publisher's lane, the
  broker, the key's order), the interval of ``rabbitkeys_end_to_end_latency``. Its start is
  the publisher's clock, its end the worker's.
* ``handle <job_type>`` (CONSUMER), one per attempt, a child of the context the job's headers
  carry; the handler and the middleware run in it (a ``def`` handler in its thread too), so
  the application's spans nest under it. Its ``rabbitkeys.outcome`` says what followed the
  attempt: the step the job's run decided (:func:`~.job_run.next_step`), handed to the span
  by :meth:`HandleSpan.failed`, not asked of the retry policy again.

A job whose headers carry no trace context (published without tracing, or by something else)
gets a ``handle`` span that starts a trace of its own.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Final

from .._observe import tracing as _plumbing
from .app import Message
from .job_run import Park, Step
from .retry import Retry

__all__ = [
    "OUTCOME_DEAD_LETTERED",
    "OUTCOME_HANDLED",
    "OUTCOME_INTERRUPTED",
    "OUTCOME_PARKED",
    "OUTCOME_RETRIED",
    "HandleSpan",
    "handle_span",
]

#: what followed an attempt (the ``rabbitkeys.outcome`` attribute of its ``handle`` span)
OUTCOME_HANDLED: Final = "handled"
#: it failed and the retry policy gives the job another attempt
OUTCOME_RETRIED: Final = "retried"
#: it failed, it was the last attempt: the job is dead-lettered (``on_failure="dead_letter"``)
OUTCOME_DEAD_LETTERED: Final = "dead_lettered"
#: ... or parked (``on_failure="park"``)
OUTCOME_PARKED: Final = "parked"
#: the handler was cancelled (the worker's session ended under it)
OUTCOME_INTERRUPTED: Final = "interrupted"


class HandleSpan:
    """What :func:`handle_span` gives when tracing is off: nothing to do (one, shared); the
    base of the real span."""

    __slots__ = ()

    def __enter__(self) -> HandleSpan:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    def failed(self, error: BaseException, step: Step) -> None:
        """The attempt raised ``error``, and ``step`` follows."""
        return None


_NO_SPAN = HandleSpan()


class _HandleSpan(HandleSpan):
    """The ``handle <job_type>`` span of one attempt, current while it is entered."""

    __slots__ = ("_outcome", "_span", "_token")

    def __init__(self, message: Message[Any], published_at: int | None) -> None:
        parent = _plumbing.extract(message.headers)
        job_type = message.job_type
        if message.attempt == 1 and published_at is not None:
            # what the job waited: from its publish to the start of its first attempt
            _plumbing.start_span(
                f"wait {job_type}",
                parent,
                {"rabbitkeys.job_type": job_type, "rabbitkeys.key": message.key},
                start_time=published_at * 1000,
            ).end()
        attributes: dict[str, Any] = {
            "messaging.system": "rabbitmq",
            "messaging.operation.type": "process",
            "rabbitkeys.job_type": job_type,
            "rabbitkeys.key": message.key,
            "rabbitkeys.attempt": message.attempt,
            "rabbitkeys.redelivered": message.redelivered,
        }
        if message.sequence is not None:
            attributes["rabbitkeys.sequence"] = message.sequence
        self._span = _plumbing.start_span(f"handle {job_type}", parent, attributes, consumer=True)
        self._outcome = OUTCOME_HANDLED
        # the extracted context (its baggage too), with this span current
        self._token = _plumbing.make_current(self._span, parent)

    def __enter__(self) -> _HandleSpan:
        return self

    def failed(self, error: BaseException, step: Step) -> None:
        """The attempt raised ``error``: recorded, with ``step``, what follows it."""
        if isinstance(step, Retry):
            self._outcome = OUTCOME_RETRIED
        elif isinstance(step, Park):
            self._outcome = OUTCOME_PARKED
        else:
            self._outcome = OUTCOME_DEAD_LETTERED
        _plumbing.record_failure(self._span, error)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc is not None:  # not an Exception (the caller returns those): cancelled
                self._outcome = OUTCOME_INTERRUPTED
            self._span.set_attribute("rabbitkeys.outcome", self._outcome)
            self._span.end()
        finally:
            _plumbing.restore(self._token)


def handle_span(message: Message[Any], published_at: int | None) -> HandleSpan:
    """``with handle_span(message, published_at) as span:`` around one attempt of a job's
    handler (and its middleware): the ``handle <job_type>`` span, current inside, a child of
    the context the job's headers carry; at the first attempt, the ``wait <job_type>`` span
    before it. The caller reports a failed attempt with ``span.failed(error, step)``.
    Tracing off: a shared object that does nothing."""
    if not _plumbing.enabled():
        return _NO_SPAN
    return _HandleSpan(message, published_at)
