"""OpenTelemetry tracing (``rabbitkeys[otel]``: rabbitkeys/_observe/tracing.py, and the worker's
spans in rabbitkeys/_worker/tracing.py) against the real broker: a job's ``handle`` span
continues the trace of the ``publish()`` call that sent it (also in a batch, each job its own
caller's trace; also from the sync publisher), the ``wait`` span
starts at the job's published-at, failed attempts are ERROR spans, and the application's
spans in a handler (async, or a ``def`` in its thread) nest under ``handle``.

The global tracer provider can be set only once per process, and setting it would turn
tracing on for every test after these ones (their jobs would carry ``traceparent``). So these
tests give rabbitkeys a tracer of their own SDK provider for the duration of each test
(``_tracing._tracer``, what :func:`rabbitkeys._observe.tracing.enabled` finds once a global provider
is set); the global switch itself, and tracing's absence, are tested in subprocesses."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CollectorRegistry

from rabbitkeys import App, Message, Publisher, Settings, SyncPublisher
from rabbitkeys._observe import tracing as _tracing
from rabbitkeys._wire.envelope import HEADER_PUBLISHED_AT

from ..support import eventually, make_settings, running_registry, running_worker

_PROVIDER = TracerProvider()
_EXPORTER = InMemorySpanExporter()
_PROVIDER.add_span_processor(SimpleSpanProcessor(_EXPORTER))
#: the application's own spans
tracer = _PROVIDER.get_tracer("tests.observe.test_tracing")


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    _EXPORTER.clear()
    monkeypatch.setattr(_tracing, "_tracer", _PROVIDER.get_tracer("rabbitkeys"))
    yield _EXPORTER
    _EXPORTER.clear()


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name == name]


def parent_chain(exporter: InMemorySpanExporter, span: ReadableSpan) -> list[str]:
    """The names of ``span``'s ancestors, nearest first (as far as they were recorded)."""
    by_id = {s.context.span_id: s for s in exporter.get_finished_spans()}
    names = []
    while span.parent is not None and span.parent.span_id in by_id:
        span = by_id[span.parent.span_id]
        names.append(span.name)
    return names


def attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


async def test_a_job_is_handled_in_the_trace_of_its_publish(
    settings: Settings, spans: InMemorySpanExporter
) -> None:
    seen: list[Message] = []
    app = App()

    @app.handler("mail")
    async def send(message: Message) -> None:
        with tracer.start_as_current_span("render"):
            seen.append(message)

    async with running_registry(settings), running_worker(settings, app):
        async with Publisher(settings) as publisher:
            with tracer.start_as_current_span("request") as request:
                await publisher.publish("user-1", b"hi", job_type="mail", headers={"a": 1})
        await eventually(lambda: named(spans, "handle mail"))

    [publish] = named(spans, "publish mail")
    [wait] = named(spans, "wait mail")
    [handle] = named(spans, "handle mail")
    [render] = named(spans, "render")
    trace_id = request.get_span_context().trace_id
    assert {s.context.trace_id for s in (publish, wait, handle, render)} == {trace_id}
    assert parent_chain(spans, render) == ["handle mail", "publish mail", "request"]
    assert parent_chain(spans, wait) == ["publish mail", "request"]
    assert publish.kind is SpanKind.PRODUCER and handle.kind is SpanKind.CONSUMER
    assert attributes(publish) == {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "send",
        "messaging.destination.name": f"{settings.namespace}.jobs.mail",
        "rabbitkeys.job_type": "mail",
        "rabbitkeys.key": "user-1",
    }
    [message] = seen
    assert attributes(handle) == {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "process",
        "rabbitkeys.job_type": "mail",
        "rabbitkeys.key": "user-1",
        "rabbitkeys.attempt": 1,
        "rabbitkeys.redelivered": False,
        "rabbitkeys.sequence": message.sequence,
        "rabbitkeys.outcome": "handled",
    }
    assert handle.status.status_code is StatusCode.UNSET
    # the job's headers: the application's, the trace context, rabbitkeys' own
    assert message.headers["a"] == 1
    assert message.headers["traceparent"].split("-")[1:3] == [
        f"{trace_id:032x}",
        f"{publish.context.span_id:016x}",
    ]
    # wait: from the publish to the handler's start
    assert wait.start_time == message.headers[HEADER_PUBLISHED_AT] * 1000
    assert wait.end_time is not None and handle.start_time is not None
    assert wait.end_time <= handle.start_time
    assert publish.start_time is not None and publish.start_time <= wait.start_time


async def test_each_attempt_is_a_span_failed_ones_with_their_error(
    amqp_url: str, namespace: str, spans: InMemorySpanExporter
) -> None:
    settings = make_settings(amqp_url, namespace, max_retries=1)
    handled: list[tuple[str, int]] = []
    app = App()

    @app.handler()
    async def flaky(message: Message) -> None:
        handled.append((message.key, message.attempt))
        if message.key == "poison" or message.attempt == 1:
            raise RuntimeError(f"busy {message.key}")

    async with running_registry(settings), running_worker(settings, app) as worker:
        async with Publisher(settings) as publisher:
            await publisher.publish("flaky", b"1")
            await publisher.publish("poison", b"2")
        await eventually(lambda: worker.dead_lettered == 1 and len(handled) == 4)
        await eventually(lambda: len(named(spans, "handle default")) == 4)

    by_key: dict[str, list[ReadableSpan]] = {}
    for span in sorted(named(spans, "handle default"), key=lambda s: s.start_time or 0):
        by_key.setdefault(attributes(span)["rabbitkeys.key"], []).append(span)
    flaky_spans, poison_spans = by_key["flaky"], by_key["poison"]
    assert [attributes(s)["rabbitkeys.attempt"] for s in flaky_spans] == [1, 2]
    assert [attributes(s)["rabbitkeys.outcome"] for s in flaky_spans] == ["retried", "handled"]
    assert [s.status.status_code for s in flaky_spans] == [StatusCode.ERROR, StatusCode.UNSET]
    failed = flaky_spans[0]
    assert failed.status.description == "RuntimeError: busy flaky"
    assert attributes(failed)["error.type"] == "RuntimeError"
    [event] = failed.events
    assert event.name == "exception"
    assert dict(event.attributes or {})["exception.message"] == "busy flaky"
    assert [attributes(s)["rabbitkeys.outcome"] for s in poison_spans] == [
        "retried",
        "dead_lettered",
    ]
    assert {s.status.status_code for s in poison_spans} == {StatusCode.ERROR}
    # both attempts of a job continue its publish's trace; one wait per job
    for job in (flaky_spans, poison_spans):
        assert {parent_chain(spans, s)[0] for s in job} == {"publish default"}
    assert len(named(spans, "wait default")) == 2


async def test_each_job_of_a_batch_continues_the_trace_of_its_own_publish(
    settings: Settings, spans: InMemorySpanExporter
) -> None:
    jobs = 6
    seen: list[int] = []
    app = App()

    @app.handler()
    async def record(message: Message) -> None:
        with tracer.start_as_current_span(f"inside {int(message.body)}"):
            seen.append(int(message.body))

    async def call(publisher: Publisher, n: int) -> None:
        with tracer.start_as_current_span(f"caller {n}"):
            await publisher.publish("k", str(n).encode())

    metrics = CollectorRegistry()
    async with running_registry(settings), running_worker(settings, app):
        async with Publisher(settings, metrics_registry=metrics) as publisher:
            # one task each (each its own context), all for one key: they wait in its lane
            # for the registry's routing key, then leave together as a batch
            await asyncio.gather(*(call(publisher, n) for n in range(jobs)))
        await eventually(lambda: len(named(spans, "handle default")) == jobs)
    assert seen == list(range(jobs))
    messages = metrics.get_sample_value("rabbitkeys_publish_batch_jobs_count")
    assert messages is not None and messages < jobs  # batches did travel
    traces = set()
    for n in range(jobs):
        [inside] = named(spans, f"inside {n}")
        [caller] = named(spans, f"caller {n}")
        assert parent_chain(spans, inside) == [
            "handle default",
            "publish default",
            f"caller {n}",
        ]
        assert inside.context.trace_id == caller.context.trace_id
        traces.add(caller.context.trace_id)
    assert len(traces) == jobs


async def test_the_sync_publisher_and_a_sync_handler_continue_the_trace(
    settings: Settings, spans: InMemorySpanExporter
) -> None:
    app = App()

    @app.handler("report")
    def build(message: Message) -> None:  # in the worker's thread pool
        with tracer.start_as_current_span("build in thread"):
            pass

    def publish_from_a_thread() -> int:
        with SyncPublisher(settings, metrics_registry=CollectorRegistry()) as pub:
            with tracer.start_as_current_span("view") as view:
                pub.publish("r-1", b"x", job_type="report")
                pub.submit("r-2", b"y", job_type="report").result()
            return view.get_span_context().trace_id

    async with running_registry(settings), running_worker(settings, app):
        trace_id = await asyncio.to_thread(publish_from_a_thread)
        await eventually(lambda: len(named(spans, "handle report")) == 2)
        await eventually(lambda: len(named(spans, "build in thread")) == 2)

    assert len(named(spans, "publish report")) == 2
    for span in named(spans, "build in thread"):
        assert span.context.trace_id == trace_id
        assert parent_chain(spans, span) == ["handle report", "publish report", "view"]


async def test_without_tracing_jobs_carry_no_trace_context(settings: Settings) -> None:
    assert not _tracing.enabled()  # no global provider in the test process
    seen: list[Message] = []
    app = App()

    @app.handler()
    async def record(message: Message) -> None:
        seen.append(message)

    async with running_registry(settings), running_worker(settings, app):
        async with Publisher(settings) as publisher:
            with tracer.start_as_current_span("request"):
                await publisher.publish("k", b"1")
        await eventually(lambda: len(seen) == 1)
    assert "traceparent" not in seen[0].headers


def run_python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_without_opentelemetry_installed_every_function_is_a_no_op() -> None:
    out = run_python(
        """
        import sys
        sys.modules["opentelemetry"] = None  # as if the extra were not installed
        from rabbitkeys._observe import tracing as _tracing
        from rabbitkeys._wire.topology import KeyRef
        from rabbitkeys._worker.tracing import handle_span

        ref = KeyRef.of("k", "default")
        headers = {"a": 1}
        assert not _tracing.enabled()
        with _tracing.publish_span("ns", ref, headers) as sent:
            assert sent is headers
        assert _tracing.start_publish("ns", ref, headers) == (None, headers)
        _tracing.inject(headers)
        assert headers == {"a": 1}
        with handle_span(None, 0) as span:  # not even looked at
            span.failed(RuntimeError(), None)
        assert "opentelemetry.trace" not in sys.modules
        print("ok")
        """
    )
    assert out == "ok"


def test_tracing_turns_on_when_the_application_sets_a_tracer_provider() -> None:
    out = run_python(
        """
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
            InMemorySpanExporter,
        )
        from rabbitkeys._observe import tracing as _tracing
        from rabbitkeys._wire.topology import KeyRef

        ref = KeyRef.of("k", "default")
        with _tracing.publish_span("ns", ref, None) as sent:
            assert sent is None  # the API alone: off
        assert not _tracing.enabled()
        provider = TracerProvider()
        exporter = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        with _tracing.publish_span("ns", ref, None) as sent:
            assert set(sent) == {"traceparent"}
        [span] = exporter.get_finished_spans()
        print(span.name)
        """
    )
    assert out == "publish default"
