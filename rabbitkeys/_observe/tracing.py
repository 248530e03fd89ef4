"""OpenTelemetry tracing, the optional extra ``rabbitkeys[otel]``: the shared plumbing, and the
publisher's span. No other module imports opentelemetry; they call the functions here, which
cost next to nothing when tracing is off. The worker's spans are built on this plumbing by
the worker (:mod:`rabbitkeys._worker.tracing`); this module imports no role.

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
* in the worker, ``wait <job_type>`` and ``handle <job_type>``, children of the context the
  job's headers carry (:func:`extract`): see :mod:`rabbitkeys._worker.tracing`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

from .._version import __version__
from .._wire.topology import Names

if TYPE_CHECKING:
    from .._wire.topology import KeyRef

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
    "enabled",
    "end_publish",
    "extract",
    "inject",
    "make_current",
    "publish_span",
    "record_failure",
    "restore",
    "start_publish",
    "start_span",
]

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
        record_failure(span, error)
    span.end()


def _publish_attributes(namespace: str, ref: KeyRef) -> dict[str, Any]:
    return {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "send",
        "messaging.destination.name": Names(namespace).jobs_exchange(ref.job_type),
        "rabbitkeys.job_type": ref.job_type,
        "rabbitkeys.key": ref.key,
    }


# -- for the worker's spans (rabbitkeys._worker.tracing) -------------------------------------


def extract(headers: Mapping[str, Any]) -> Any:
    """The trace context a job's headers carry (text values only), the parent of its spans;
    only while tracing is on (:func:`enabled`)."""
    return _propagate.extract(headers, getter=_GETTER)


def start_span(
    name: str,
    parent: Any,
    attributes: Mapping[str, Any],
    *,
    consumer: bool = False,
    start_time: int | None = None,
) -> Any:
    """A span, not current, child of ``parent`` (:func:`extract`): of kind CONSUMER if
    ``consumer``, else INTERNAL; started at ``start_time`` (ns since the epoch) if given,
    else now. Only while tracing is on (:func:`enabled`)."""
    return _tracer.start_span(
        name,
        context=parent,
        kind=_trace.SpanKind.CONSUMER if consumer else _trace.SpanKind.INTERNAL,
        attributes=attributes,
        start_time=start_time,
    )


def make_current(span: Any, parent: Any) -> object:
    """Make ``span`` current, in ``parent``'s context (its baggage too); the token that
    :func:`restore` takes."""
    return _context.attach(_trace.set_span_in_context(span, parent))


def restore(token: object) -> None:
    """Undo :func:`make_current`."""
    _context.detach(token)  # type: ignore[arg-type]


def record_failure(span: Any, error: BaseException) -> None:
    """Mark ``span`` failed with ``error``: the exception event, ``error.type``, the ERROR
    status with the error's text."""
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
