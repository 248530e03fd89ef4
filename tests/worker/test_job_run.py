"""The job-run core (``rabbitkeys/_worker/job_run.py``): what follows a failed attempt
(:func:`next_step`, pure, property-tested) and a job's run from its first attempt to its end
(:func:`run_attempts`), driven through fake ports: no broker, no sleeping, no worker."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, model_validator

from rabbitkeys import App, Context, JobTimeoutError, Message
from rabbitkeys._errors import HandlerNotFoundError, PayloadError
from rabbitkeys._wire.envelope import encode_envelope, jobs_of
from rabbitkeys._wire.topology import KeyRef
from rabbitkeys._worker.app import Route
from rabbitkeys._worker.execution import Deadlines, HandlerThreads, call_handler, time_limit
from rabbitkeys._worker.job_run import (
    MAX_ERROR_TEXT,
    Decide,
    Failure,
    JobEnd,
    JobToRun,
    Park,
    Ports,
    chain,
    error_text,
    next_step,
    route_of,
    run_attempts,
)
from rabbitkeys._worker.retry import DeadLetter, RetryPolicy

from ..support import eventually


class Comment(BaseModel):
    text: str
    #: the bodies validated as a Comment, in order
    seen: ClassVar[list[str]] = []

    @model_validator(mode="after")
    def _count(self) -> Comment:
        Comment.seen.append(self.text)
        return self


# --- next_step: pure ------------------------------------------------------------------------

policies = st.builds(
    RetryPolicy,
    max_retries=st.integers(0, 20),
    backoff=st.floats(0, 1e3, allow_nan=False),
    backoff_max=st.floats(0, 1e3, allow_nan=False),
)
errors = st.sampled_from(
    [RuntimeError("x"), JobTimeoutError("h", "t", 1.0), PayloadError("bad"), ValueError("v")]
)


def route(on_failure: str = "dead_letter") -> Route:
    app = App()

    async def handler(message: Message) -> None:
        pass

    app.add_handler("t", handler, on_failure=on_failure)  # type: ignore[arg-type]
    return app.route("t")


@given(policies, st.integers(1, 30), errors, st.sampled_from(["dead_letter", "park"]))
def test_next_step_is_the_policy_unless_the_route_parks_instead_of_dead_lettering(
    policy: RetryPolicy, attempt: int, error: Exception, on_failure: str
) -> None:
    step = next_step(policy, route(on_failure), attempt, error, job_index=4)
    expected = policy.after_failure(attempt, error)
    if isinstance(expected, DeadLetter) and on_failure == "park":
        assert step == Park(error_text(error), expected.attempts, job_index=4)
    else:
        assert step == expected


def test_a_job_type_without_handler_is_dead_lettered_at_once_even_where_others_park() -> None:
    missing = route_of(App(), "nobody")
    assert isinstance(missing, HandlerNotFoundError)
    policy = RetryPolicy(max_retries=5, backoff=1.0, backoff_max=10.0)
    assert next_step(policy, missing, 1, missing) == DeadLetter(attempts=1)


def test_a_park_reports_the_error_cut_to_its_bound() -> None:
    step = next_step(RetryPolicy(0, 1.0, 1.0), route("park"), 1, RuntimeError("x" * 5000))
    assert isinstance(step, Park) and len(step.error) == MAX_ERROR_TEXT
    assert step.error.startswith("RuntimeError: xxx") and step.job_index == 0


# --- run_attempts, through fake ports -------------------------------------------------------


def job_to_run(body: bytes = b"b", index: int = 0, key: str = "k") -> JobToRun:
    properties = encode_envelope(
        KeyRef.of(key, "t"),
        publisher_id="p",
        sequence=7,
        delivery_mode=2,
        user_id="u",
        headers={"h": 1},
    )
    (job,) = jobs_of(properties, body)
    return JobToRun(job.envelope, job.body, job.content_type, key, "t", True, index)


@dataclass
class FakePorts:
    """Ports that record what the core asks, in order; each attempt runs ``handler``."""

    handler: Callable[[Message[Any]], Awaitable[Any]]
    policy: RetryPolicy = field(default_factory=lambda: RetryPolicy(3, 0.5, 1.5))
    context: Context = field(default_factory=Context)
    #: how many waits run before shutdown cuts one (None: never)
    stop_after_waits: int | None = None
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    messages: list[Message[Any]] = field(default_factory=list)

    async def attempt(
        self, job: JobToRun, route: Route, message: Message[Any], decide: Decide
    ) -> Failure | None:
        self.messages.append(message)
        self.calls.append(("attempt", message.attempt))
        try:
            await self.handler(message)
        except Exception as exc:
            return decide(exc)
        return None

    def on_retry(self, job: JobToRun, attempt: int, error: Exception, delay: float) -> None:
        self.calls.append(("on_retry", attempt, str(error), delay))

    async def wait(self, delay: float) -> bool:
        self.calls.append(("wait", delay))
        waits = sum(1 for call in self.calls if call[0] == "wait")
        return self.stop_after_waits is not None and waits > self.stop_after_waits

    async def dead_letter(self, job: JobToRun, error: Exception, attempts: int) -> None:
        self.calls.append(("dead_letter", str(error), attempts))


def failing_until(good_attempt: int | None) -> Callable[[Message[Any]], Awaitable[None]]:
    async def handler(message: Message[Any]) -> None:
        if good_attempt is None or message.attempt < good_attempt:
            raise RuntimeError(f"busy {message.attempt}")

    return handler


async def test_retries_run_in_order_each_after_its_wait_until_one_succeeds() -> None:
    ports = FakePorts(failing_until(3))
    assert await run_attempts(route(), job_to_run(), ports) is JobEnd.HANDLED
    assert ports.calls == [
        ("attempt", 1),
        ("on_retry", 1, "busy 1", 0.5),
        ("wait", 0.5),
        ("attempt", 2),
        ("on_retry", 2, "busy 2", 1.0),
        ("wait", 1.0),
        ("attempt", 3),
    ]


async def test_after_the_last_attempt_the_job_is_dead_lettered_the_waits_doubling_to_a_cap() -> (
    None
):
    ports = FakePorts(failing_until(None))
    assert await run_attempts(route(), job_to_run(), ports) is JobEnd.DEAD_LETTERED
    assert [call[1] for call in ports.calls if call[0] == "wait"] == [0.5, 1.0, 1.5]
    assert [call[1] for call in ports.calls if call[0] == "attempt"] == [1, 2, 3, 4]
    assert ports.calls[-1] == ("dead_letter", "busy 4", 4)


async def test_a_park_route_parks_with_the_jobs_index_in_its_delivery_instead() -> None:
    ports = FakePorts(failing_until(None), policy=RetryPolicy(1, 0.0, 0.0))
    end = await run_attempts(route("park"), job_to_run(index=2), ports)
    assert isinstance(end, Failure) and str(end.error) == "busy 2"
    assert end.step == Park("RuntimeError: busy 2", attempts=2, job_index=2)
    assert "dead_letter" not in [call[0] for call in ports.calls]


async def test_a_body_that_does_not_fit_or_no_handler_fails_at_once_without_an_attempt() -> None:
    app = App()

    @app.handler("t", on_failure="park")
    async def typed(message: Message[Comment]) -> None:
        pass

    ports = FakePorts(failing_until(None))
    end = await run_attempts(route_of(app, "nobody"), job_to_run(), ports)
    assert end is JobEnd.DEAD_LETTERED and ports.calls == [
        ("dead_letter", "no handler for job type 'nobody'", 1)
    ]
    ports = FakePorts(failing_until(None))  # it parks, at once: no retry changes a body
    end = await run_attempts(app.route("t"), job_to_run(b"{"), ports)
    assert isinstance(end, Failure) and isinstance(end.error, PayloadError)
    assert end.step == Park(error_text(end.error), attempts=1, job_index=0)
    assert ports.calls == []


async def test_a_wait_cut_by_shutdown_ends_the_run_unfinished() -> None:
    ports = FakePorts(failing_until(None), stop_after_waits=1)
    assert await run_attempts(route(), job_to_run(), ports) is JobEnd.INTERRUPTED
    assert [call[0] for call in ports.calls] == [
        "attempt",
        "on_retry",
        "wait",
        "attempt",
        "on_retry",
        "wait",
    ]


async def test_the_message_is_built_once_each_retry_a_copy_with_its_attempt_number() -> None:
    app = App()

    @app.handler("t")
    async def typed(message: Message[Comment]) -> None:
        pass

    ports = FakePorts(failing_until(3))
    job = job_to_run(b'{"text": "hi"}', key="post A")
    validated = len(Comment.seen)
    assert await run_attempts(app.route("t"), job, ports) is JobEnd.HANDLED
    assert len(Comment.seen) == validated + 1  # the body decoded once for all attempts
    first, second, third = ports.messages
    assert first.payload is second.payload is third.payload == Comment(text="hi")
    assert [m.attempt for m in ports.messages] == [1, 2, 3]
    assert (first.key, first.job_type, first.body) == ("post A", "t", b'{"text": "hi"}')
    assert (first.publisher_id, first.sequence, first.user_id) == ("p", 7, "u")
    assert first.redelivered and first.headers["h"] == 1 and first.context is ports.context
    for later in (second, third):
        assert {**fields_of(later), "attempt": 1} == fields_of(first)


def fields_of(message: Message[Any]) -> dict[str, Any]:
    return {name: getattr(message, name) for name in message.__dataclass_fields__}


# --- the shell's handler call (threads, time limits, middleware) through the same ports -----


@dataclass
class CallingPorts(FakePorts):
    """Fake ports whose attempts call the handler as a worker does (:func:`call_handler`:
    the middleware chain, the time limit, a thread for a ``def``), without a broker."""

    app: App = field(default_factory=App)
    job_timeout: float = 0.0
    deadlines: Deadlines = field(default_factory=Deadlines)
    threads: HandlerThreads = field(default_factory=lambda: HandlerThreads(2))

    async def attempt(
        self, job: JobToRun, route: Route, message: Message[Any], decide: Decide
    ) -> Failure | None:
        self.calls.append(("attempt", message.attempt))
        thread = None if route.is_async else await self.threads.take(job.job_type, job.key)
        limit = time_limit(route, self.job_timeout, message)
        try:
            await call_handler(
                self.app, route, message, limit, self.deadlines, self.threads, thread
            )
        except Exception as exc:
            failure = decide(exc)
            self.calls.append(("failed", type(exc).__name__, type(failure.step).__name__))
            return failure
        finally:
            if thread is not None:
                self.threads.give_back(thread, route.name)
        return None


async def test_a_timed_out_attempt_is_a_failure_like_any_other() -> None:
    app = App()

    @app.handler("t", timeout=0.05, on_failure="park")
    async def slow(message: Message) -> None:
        await asyncio.sleep(0 if message.attempt == 3 else 60)

    ports = CallingPorts(failing_until(None), policy=RetryPolicy(1, 0.0, 0.0), app=app)
    end = await run_attempts(app.route("t"), job_to_run(), ports)
    assert isinstance(end, Failure) and isinstance(end.error, JobTimeoutError)
    assert end.step == Park(error_text(end.error), attempts=2, job_index=0)
    assert [call for call in ports.calls if call[0] == "failed"] == [
        ("failed", "JobTimeoutError", "Retry"),
        ("failed", "JobTimeoutError", "Park"),
    ]


async def test_a_sync_handler_past_its_time_limit_fails_its_attempt_and_is_retried() -> None:
    app = App()
    release = asyncio.Event()
    loop = asyncio.get_running_loop()

    @app.handler("t", timeout=0.05)
    def blocking(message: Message) -> None:
        if message.attempt == 1:
            asyncio.run_coroutine_threadsafe(release.wait(), loop).result()

    ports = CallingPorts(failing_until(None), app=app)
    with ThreadPoolExecutor(2) as pool:
        ports.threads.pool = pool
        running = asyncio.create_task(run_attempts(app.route("t"), job_to_run(), ports))
        # the first attempt failed at its limit; its thread runs on, and the retry waits
        # for it: a key never has two calls running at once
        await eventually(lambda: ("wait", 0.5) in ports.calls and ports.threads.overdue == 1)
        assert not running.done()
        release.set()
        assert await running is JobEnd.HANDLED
    assert ports.calls[1] == ("failed", "JobTimeoutError", "Retry")


async def test_middleware_wraps_each_attempt_the_first_registered_outermost() -> None:
    app = App()
    seen: list[str] = []

    @app.middleware
    async def outer(message: Message, call_next: Any) -> Any:
        seen.append(f"outer {message.attempt}")
        try:
            return await call_next(message)
        finally:
            seen.append("outer done")

    @app.middleware
    async def inner(message: Message, call_next: Any) -> Any:
        seen.append("inner")
        return await call_next(message)

    @app.handler("t")
    async def handler(message: Message) -> None:
        seen.append("handler")
        if message.attempt == 1:
            raise RuntimeError("once")

    ports = CallingPorts(failing_until(None), app=app)
    assert await run_attempts(app.route("t"), job_to_run(), ports) is JobEnd.HANDLED
    once = ["inner", "handler", "outer done"]
    assert seen == ["outer 1", *once, "outer 2", *once]


async def test_the_chain_calls_middleware_in_order_around_the_call() -> None:
    order: list[str] = []

    def middleware(name: str) -> Any:
        async def around(message: Message, call_next: Any) -> Any:
            order.append(f"{name} in")
            result = await call_next(message)
            order.append(f"{name} out")
            return result

        return around

    async def call(message: Message) -> str:
        order.append("call")
        return "result"

    message = Message(
        key="k",
        job_type="t",
        body=b"",
        headers={},
        publisher_id=None,
        sequence=None,
        attempt=1,
        redelivered=False,
    )
    assert chain((), call) is call
    assert await chain((middleware("a"), middleware("b")), call)(message) == "result"
    assert order == ["a in", "b in", "call", "b out", "a out"]


def test_the_fakes_are_ports_as_the_core_declares_them() -> None:
    """The fakes stand where the worker's and the in-memory worker's ports do; mypy holds
    all three to ``Ports``, so a port the core gains is one they must all give."""
    ports: Ports = FakePorts(failing_until(None))
    calling: Ports = CallingPorts(failing_until(None))
    assert ports.policy == calling.policy
