"""OpenTelemetry tracing, the optional extra ``rabbitkeys[otel]``: the one home of it. No other
module imports opentelemetry; they call the functions here, which cost next to nothing when
tracing is off.

Tracing is on once ``opentelemetry`` (the API) is importable and the application has set a
tracer provider (``trace.set_tracer_provider(...)``, the SDK's usual setup). Without the
API, or with it and no provider set (its default proxy provider), every function here is a
no-op: no span, no context lookup, no header added.

What it traces, per job:

* ``publish <job_type>`` (PRODUCER), in the publisher, from the ``publish()`` call until the
  broker confirmed the job (or the call failed), a child of the caller's current span. The
  job's headers get the W3C trace context of that span (``traceparent``, ``tracestate``,
  and ``baggage``: whatever the global propagator writes), per job, also for a job that
  travels in a batch (each record carries its own application headers).
* ``wait <job_type>`` (INTERNAL), in the worker, from the job's ``x-rabbitkeys-published-at``
  to the start of its handler's first attempt: the time the job waited (in the publisher's
  lane, the broker, the key's order), the interval of ``rabbitkeys_end_to_end_latency``. Its
  start is the publisher's clock, its end the worker's.
* ``handle <job_type>`` (CONSUMER), in the worker, one per attempt, a child of the context
  the job's headers carry; the handler and the middleware run in it (a ``def`` handler in
  its thread too), so the application's spans nest under it.

A job whose headers carry no trace context (published without tracing, or by something else)
gets a ``handle`` span that starts a trace of its own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

from .._version import __version__
from .._wire.topology import Names

if TYPE_CHECKING:
    from .._wire.topology import KeyRef
    from .._worker.app import Message, Route
    from .._worker.retry import RetryPolicy

try:
    from opentelemetry import context as _context
    from opentelemetry import propagate as _propagate
    from opentelemetry import trace as _trace
    from opentelemetry.environment_variables import OTEL_PYTHON_TRACER_PROVIDER
    from opentelemetry.propagators.textmap import Getter as _Getter

    _INSTALLED = True
    # "no provider set" cheaply (10 ns, where get_tracer_provider() takes 1.4 us): the API's
    # own global, read, never written; a provider named in the environment is loaded by
    # get_tracer_provider(), and an API without that global gets the public call
    _QUICK_CHECK = hasattr(_trace, "_TRACER_PROVIDER") and OTEL_PYTHON_TRACER_PROVIDER not in (
        os.environ
    )
except ImportError:  # the extra is not installed: every function below is a no-op
    _INSTALLED = False
    _QUICK_CHECK = False

__all__ = [
    "OUTCOME_DEAD_LETTERED",
    "OUTCOME_HANDLED",
    "OUTCOME_INTERRUPTED",
    "OUTCOME_PARKED",
    "OUTCOME_RETRIED",
    "enabled",
    "end_publish",
    "handle_span",
    "inject",
    "publish_span",
    "start_publish",
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

_MAX_STATUS_CHARS = 1000

# set once tracing is found on (a tracer provider, once set, stays set)
_tracer: Any = None


def enabled() -> bool:
    """Whether spans are made: the API is installed and a tracer provider is set."""
    global _tracer
    if _tracer is not None:
        return True
    if not _INSTALLED or (_QUICK_CHECK and _trace._TRACER_PROVIDER is None):
        return False
    if isinstance(_trace.get_tracer_provider(), _trace.ProxyTracerProvider):
        return False
    _tracer = _trace.get_tracer("rabbitkeys", __version__)
    return True


def inject(headers: dict[str, Any]) -> None:
    """Write the current context's trace context (W3C ``traceparent``, ``tracestate``; what
    the global propagator writes) into a job's ``headers``; nothing when tracing is off."""
    if enabled():
        _propagate.inject(headers)


# -- publisher ---------------------------------------------------------------------------


def publish_span(
    namespace: str, ref: KeyRef, headers: Mapping[str, Any] | None
) -> AbstractContextManager[Mapping[str, Any] | None]:
    """``with publish_span(namespace, ref, headers) as headers:`` around an async ``publish()``:
    the ``publish <job_type>`` span, current inside (a child of the caller's context), and
    the headers to send: the caller's with the span's trace context added (a new dict: the
    caller's is not changed). Tracing off: the caller's headers, no span."""
    if not enabled():
        return nullcontext(headers)
    return _publishing(namespace, ref, headers)


@contextmanager
def _publishing(
    namespace: str, ref: KeyRef, headers: Mapping[str, Any] | None
) -> Iterator[Mapping[str, Any] | None]:
    # start_as_current_span records an exception and sets the ERROR status
    with _tracer.start_as_current_span(
        f"publish {ref.job_type}",
        kind=_trace.SpanKind.PRODUCER,
        attributes=_publish_attributes(namespace, ref),
    ):
        carrier = dict(headers) if headers else {}
        _propagate.inject(carrier)
        yield carrier


def start_publish(
    namespace: str, ref: KeyRef, headers: Mapping[str, Any] | None
) -> tuple[Any, Mapping[str, Any] | None]:
    """The ``publish <job_type>`` span of a publish that ends elsewhere (the sync publisher:
    started in the caller's thread, ended when its future settles, :func:`end_publish`),
    and the headers to send, as :func:`publish_span`. Tracing off: (None, the caller's
    headers)."""
    if not enabled():
        return None, headers
    span = _tracer.start_span(
        f"publish {ref.job_type}",
        kind=_trace.SpanKind.PRODUCER,
        attributes=_publish_attributes(namespace, ref),
    )
    carrier = dict(headers) if headers else {}
    _propagate.inject(carrier, context=_trace.set_span_in_context(span))
    return span, carrier


def end_publish(span: Any, error: BaseException | None) -> None:
    """End a span :func:`start_publish` made, failed if ``error``."""
    if error is not None:
        _failed(span, error)
    span.end()


def _publish_attributes(namespace: str, ref: KeyRef) -> dict[str, Any]:
    return {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "send",
        "messaging.destination.name": Names(namespace).jobs_exchange(ref.job_type),
        "rabbitkeys.job_type": ref.job_type,
        "rabbitkeys.key": ref.key,
    }


# -- worker ------------------------------------------------------------------------------


class _NoSpan:
    """What :func:`handle_span` gives when tracing is off: nothing to do (one, shared)."""

    __slots__ = ()

    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    def failed(self, error: BaseException, policy: RetryPolicy, route: Route) -> None:
        return None


_NO_SPAN = _NoSpan()


class _HandleSpan(_NoSpan):
    """The ``handle <job_type>`` span of one attempt, current while it is entered."""

    __slots__ = ("_attempt", "_outcome", "_span", "_token")

    def __init__(self, message: Message[Any], published_at: int | None) -> None:
        parent = _propagate.extract(message.headers, getter=_GETTER)
        job_type = message.job_type
        if message.attempt == 1 and published_at is not None:
            # what the job waited: from its publish to the start of its first attempt
            _tracer.start_span(
                f"wait {job_type}",
                context=parent,
                start_time=published_at * 1000,
                attributes={"rabbitkeys.job_type": job_type, "rabbitkeys.key": message.key},
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
        self._span = _tracer.start_span(
            f"handle {job_type}",
            context=parent,
            kind=_trace.SpanKind.CONSUMER,
            attributes=attributes,
        )
        self._attempt = message.attempt
        self._outcome = OUTCOME_HANDLED
        # the extracted context (its baggage too), with this span current
        self._token = _context.attach(_trace.set_span_in_context(self._span, parent))

    def __enter__(self) -> _HandleSpan:
        return self

    def failed(self, error: BaseException, policy: RetryPolicy, route: Route) -> None:
        """The attempt raised ``error``: recorded, with what the policy does next."""
        from .._worker.retry import DeadLetter  # not at import: _retry is not needed when off

        if not isinstance(policy.after_failure(self._attempt, error), DeadLetter):
            self._outcome = OUTCOME_RETRIED
        elif route.on_failure == "park":
            self._outcome = OUTCOME_PARKED
        else:
            self._outcome = OUTCOME_DEAD_LETTERED
        _failed(self._span, error)

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
            _context.detach(self._token)


def handle_span(message: Message[Any], published_at: int | None) -> _NoSpan:
    """``with handle_span(message, published_at) as span:`` around one attempt of a job's
    handler (and its middleware): the ``handle <job_type>`` span, current inside, a child of
    the context the job's headers carry; at the first attempt, the ``wait <job_type>`` span
    before it. The caller reports a failed attempt with ``span.failed(...)``. Tracing off:
    a shared object that does nothing."""
    if not enabled():
        return _NO_SPAN
    return _HandleSpan(message, published_at)


def _failed(span: Any, error: BaseException) -> None:
    span.record_exception(error)
    span.set_attribute("error.type", type(error).__qualname__)
    span.set_status(
        _trace.Status(
            _trace.StatusCode.ERROR, f"{type(error).__name__}: {error}"[:_MAX_STATUS_CHARS]
        )
    )


if _INSTALLED:

    class _HeaderGetter(_Getter[Mapping[str, Any]]):
        """Reads a job's headers for the propagator: text values only (anyone who can
        publish to a key queue can put anything there; a bytes or number header is no
        trace context)."""

        def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
            value = carrier.get(key)
            return [value] if isinstance(value, str) else None

        def keys(self, carrier: Mapping[str, Any]) -> list[str]:
            return list(carrier)

    _GETTER = _HeaderGetter()
