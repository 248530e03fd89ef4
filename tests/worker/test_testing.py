"""``rabbitkeys.testing``: an App's handlers run in memory with a worker's semantics. No
broker (that is the point of it); outcomes asserted, never timings (a backoff of an hour
must not be slept: the joins are bounded by ``asyncio.timeout``)."""

from __future__ import annotations

import asyncio
import contextvars
import random
import threading
from collections import defaultdict
from typing import Any

import pytest
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec
from pamqp.header import ContentHeader
from pydantic import BaseModel

from rabbitkeys import (
    App,
    Context,
    HandlerNotFoundError,
    InvalidKeyError,
    InvalidMessageError,
    Message,
    PayloadError,
    Settings,
    StartupError,
)
from rabbitkeys._wire.envelope import (
    HEADER_ATTEMPTS,
    HEADER_ERROR,
    HEADER_KEY,
    HEADER_WORKER,
    encode_envelope,
)
from rabbitkeys._wire.payload import JSON, TEXT
from rabbitkeys._wire.protocol import KeyAssignment
from rabbitkeys._wire.topology import KeyRef, Names
from rabbitkeys._worker.dedup import SequenceHistory
from rabbitkeys._worker.execution import Park
from rabbitkeys._worker.job_run import error_text
from rabbitkeys.testing import InMemoryWorker, JobsFailedError, JobState, run_jobs

from .test_execution import executor

#: a backoff no test could wait out: retries must not sleep it
AN_HOUR = 3600.0


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {"retry_backoff": AN_HOUR, "retry_backoff_max": AN_HOUR}
    values.update(overrides)
    return Settings.model_construct(**values)


class Comment(BaseModel):
    post: str
    text: str


class Failing:
    """A handler failing while ``failing`` is set; records each call's key and payload."""

    def __init__(self, failing: bool = True) -> None:
        self.failing = failing
        self.calls: list[tuple[str, Any, int]] = []

    async def __call__(self, message: Message) -> None:
        self.calls.append((message.key, message.payload, message.attempt))
        if self.failing:
            raise RuntimeError(f"boom {message.payload!r}")


# --------------------------------------------------------------------------- order, concurrency


async def test_order_per_key_under_concurrency_with_random_handler_delays() -> None:
    app = App()
    seen: dict[str, list[int]] = defaultdict(list)
    running: set[str] = set()
    overlaps: list[str] = []

    @app.handler("work")
    async def work(message: Message[int]) -> None:
        if message.key in running:
            overlaps.append(message.key)
        running.add(message.key)
        await asyncio.sleep(random.uniform(0, 0.002))
        seen[message.key].append(message.payload)
        running.discard(message.key)

    keys = [f"key {n}" for n in range(12)]
    async with InMemoryWorker(app, settings(concurrency=5)) as worker:
        for n in range(25):
            for key in random.sample(keys, len(keys)):
                await worker.publish(key, n, job_type="work")
        async with asyncio.timeout(30):
            await worker.join()

    assert overlaps == []
    assert seen == {key: list(range(25)) for key in keys}
    assert 1 < worker.most_in_flight <= 5
    assert len(worker.handled) == 12 * 25
    assert all(job.state is JobState.HANDLED for job in worker.jobs)
    for key in keys:
        assert [job.payload for job in worker.handled if job.key == key] == list(range(25))


async def test_a_slow_key_does_not_block_the_others() -> None:
    app = App()
    fast_done = asyncio.Event()
    handled: list[tuple[str, int]] = []

    @app.handler()
    async def handle(message: Message[int]) -> None:
        if message.key == "slow":
            await fast_done.wait()  # never set if the other key waited behind this one
        handled.append((message.key, message.payload))
        if message.key == "fast" and message.payload == 9:
            fast_done.set()

    async with InMemoryWorker(app, settings(concurrency=2)) as worker:
        await worker.publish("slow", 0)
        await worker.publish("slow", 1)
        for n in range(10):
            await worker.publish("fast", n)
        async with asyncio.timeout(10):
            await worker.join()

    assert [n for key, n in handled if key == "fast"] == list(range(10))
    assert [n for key, n in handled if key == "slow"] == [0, 1]
    assert handled.index(("fast", 9)) < handled.index(("slow", 0))


async def test_a_retry_waiting_out_its_backoff_holds_no_slot_and_keeps_its_key() -> None:
    app = App()
    order: list[str] = []
    attempts = 0

    @app.handler()
    async def handle(message: Message[str]) -> None:
        nonlocal attempts
        order.append(message.payload)
        if message.payload == "a1":
            attempts += 1
            if attempts == 1:
                # the other key gets the one slot while this one waits for its retry
                await asyncio.sleep(0)
                raise RuntimeError("once")

    # a real (short) backoff, slept: the other key's job runs during it
    config = settings(concurrency=1, retry_backoff=0.05, retry_backoff_max=0.05)
    async with InMemoryWorker(app, config, sleep_backoff=True) as worker:
        await worker.publish("a", "a1")
        await worker.publish("a", "a2")
        await worker.publish("b", "b1")
        async with asyncio.timeout(10):
            await worker.join()

    assert order.index("b1") < order.index("a2")
    assert [x for x in order if x.startswith("a")] == ["a1", "a1", "a2"]
    assert worker.of("a")[0].backoffs == [0.05]


# --------------------------------------------------------------------------- retries, dead letters


async def test_retries_follow_the_policy_and_are_recorded_not_slept() -> None:
    app = App()
    attempts_seen: list[int] = []

    @app.handler()
    async def handle(message: Message) -> str:
        attempts_seen.append(message.attempt)
        if message.attempt < 3:
            raise ConnectionError(f"attempt {message.attempt}")
        return "done"

    async with InMemoryWorker(app, settings(max_retries=3, retry_backoff=AN_HOUR / 4)) as worker:
        job = await worker.publish("k", b"x")
        async with asyncio.timeout(10):
            await worker.join()

    assert attempts_seen == [1, 2, 3]
    assert job.state is JobState.HANDLED and job.attempts == 3 and job.result == "done"
    assert [str(e) for e in job.errors] == ["attempt 1", "attempt 2"]
    assert job.backoffs == [AN_HOUR / 4, AN_HOUR / 2]  # RetryPolicy's doubling
    assert worker.dead_letters == []


async def test_after_the_last_attempt_a_job_is_dead_lettered_and_its_key_goes_on() -> None:
    app = App()
    handler = Failing()

    @app.handler("mail")
    async def mail(message: Message[str]) -> None:
        if message.payload == "bad":
            await handler(message)

    async with InMemoryWorker(app, settings(max_retries=2)) as worker:
        bad = await worker.publish("user 1", "bad", job_type="mail")
        good = await worker.publish("user 1", "good", job_type="mail")
        async with asyncio.timeout(10):
            with pytest.raises(JobsFailedError) as failed:
                await worker.join()
            await worker.join()  # each failure is reported once

    assert failed.value.jobs == [bad]
    assert isinstance(failed.value.__cause__, RuntimeError)
    assert "mail 'user 1' #1 dead_lettered after 3 attempt(s): RuntimeError: boom 'bad'" in str(
        failed.value
    )
    assert worker.dead_letters == [bad] and worker.handled == [good]
    assert bad.state is JobState.DEAD_LETTERED and bad.attempts == 3
    assert [call[2] for call in handler.calls] == [1, 2, 3]
    assert bad.backoffs == [AN_HOUR, AN_HOUR]
    assert bad.dead_letter_headers is not None
    assert bad.dead_letter_headers[HEADER_ERROR] == "RuntimeError: boom 'bad'"
    assert bad.dead_letter_headers[HEADER_ATTEMPTS] == 3
    assert bad.dead_letter_headers[HEADER_KEY] == "user 1"
    assert bad.dead_letter_headers[HEADER_WORKER] == "in-memory"


async def test_a_body_that_does_not_fit_fails_at_once_without_middleware() -> None:
    """No attempt, no retry: dead-lettered for a job type that dead-letters; a job type that
    parks parks it (as the worker does: order is what it asked for)."""
    app = App()
    called: list[str] = []

    @app.middleware
    async def watch(message: Message, call_next: Any) -> Any:
        called.append("middleware")
        return await call_next(message)

    @app.handler("comments")
    async def create(message: Message[Comment]) -> None:
        called.append(message.payload.text)

    @app.handler("ledger", on_failure="park")
    async def book(message: Message[Comment]) -> None:
        called.append(message.payload.text)

    async with InMemoryWorker(app, settings(max_retries=5)) as worker:
        bad = await worker.publish("post A", {"post": "post A"}, job_type="comments")
        good = await worker.publish(
            "post A", Comment(post="post A", text="hi"), job_type="comments"
        )
        stuck = await worker.publish("post A", {"post": "post A"}, job_type="ledger")
        waiting = await worker.publish(
            "post A", Comment(post="post A", text="later"), job_type="ledger"
        )
        await worker.join(check=False)

    assert worker.dead_letters == [bad] and worker.handled == [good]
    assert bad.attempts == 1 and isinstance(bad.error, PayloadError)
    assert "body is not a valid Comment" in str(bad.error) and "text: Field required" in str(
        bad.error
    )
    assert bad.backoffs == []
    assert worker.parked == [stuck] and stuck.attempts == 1 and stuck.backoffs == []
    assert waiting not in worker.handled
    assert called == ["middleware", "hi"]


async def test_a_job_type_without_handler_is_dead_lettered_at_once() -> None:
    app = App()
    app.add_handler("known", Failing(failing=False))
    async with InMemoryWorker(app, settings()) as worker:
        job = await worker.publish("k", b"x", job_type="unknown")
        with pytest.raises(JobsFailedError, match="no handler for job type 'unknown'"):
            await worker.join()
    assert worker.dead_letters == [job]
    assert job.attempts == 1 and isinstance(job.error, HandlerNotFoundError)


# --------------------------------------------------------------------------- park, resume, skip


def parking_app(handler: Failing) -> App:
    app = App()
    app.add_handler("orders", handler, on_failure="park")
    return app


async def test_a_parked_key_waits_in_order_then_resume_retries_its_head_with_fresh_attempts() -> (
    None
):
    handler = Failing()
    async with InMemoryWorker(parking_app(handler), settings(max_retries=1)) as worker:
        first = await worker.publish("order 1", "pay", job_type="orders")
        await worker.publish("order 1", "ship", job_type="orders")
        await worker.publish("order 1", "close", job_type="orders")
        with pytest.raises(JobsFailedError, match="parked after 2 attempt"):
            await worker.join()

        # stopped with the failing job at its head; the others wait behind it, in order
        assert worker.parked == [first]
        assert [job.state for job in worker.of("order 1", "orders")] == [
            JobState.PARKED,
            JobState.WAITING,
            JobState.WAITING,
        ]
        assert worker.dead_letters == [] and worker.handled == []
        assert first.dead_letter_headers is None
        # another key of the same type goes on meanwhile
        other = await worker.publish("order 2", "pay", job_type="orders")
        handler.failing = False
        await worker.join()
        assert worker.handled == [other] and worker.parked == [first]

        await worker.resume("order 1", job_type="orders")
        async with asyncio.timeout(10):
            await worker.join()

    assert worker.parked == []
    assert [job.payload for job in worker.of("order 1", "orders")] == ["pay", "ship", "close"]
    assert [job.payload for job in worker.handled if job.key == "order 1"] == [
        "pay",
        "ship",
        "close",
    ]
    assert first.attempts == 1  # fresh attempts after the resume
    assert len(first.errors) == 2  # the two failed ones before it are kept
    assert [c[2] for c in handler.calls if c[0] == "order 1" and c[1] == b"pay"] == [1, 2, 1]


async def test_the_in_memory_worker_decides_as_a_worker_in_the_same_job_run_core() -> None:
    """The same job of a parking job type, run by a worker's executor (fed the delivery by
    hand) and by the in-memory worker: the same attempts, backoffs and park, from the one
    job-run core (``rabbitkeys._worker.job_run``) each wires its own ports to."""
    handler = Failing()
    app = parking_app(handler)
    values = {"max_retries": 2, "retry_backoff": 0.0, "retry_backoff_max": 0.0}
    run = executor(app, asyncio.Event(), **values)
    ref = KeyRef.of("order 1", "orders")
    assignment = KeyAssignment(
        key_id=ref.id, job_type="orders", key=ref.key, queue=Names("ns").key_queue(ref)
    )
    properties = encode_envelope(ref, publisher_id="p", sequence=1, delivery_mode=2)
    delivered = DeliveredMessage(
        delivery=spec.Basic.Deliver("ctag", 1, False, "", "q"),
        header=ContentHeader(0, 3, properties),
        body=b"pay",
        channel=None,  # type: ignore[arg-type]  # the executor never touches it
    )
    park = await run.execute(assignment, SequenceHistory(), delivered)
    by_worker = list(handler.calls)
    handler.calls.clear()
    async with InMemoryWorker(app, Settings.model_construct(**values)) as worker:
        job = await worker.publish("order 1", b"pay", job_type="orders")
        await worker.join(check=False)
    assert handler.calls == by_worker == [("order 1", b"pay", n) for n in (1, 2, 3)]
    assert job.error is not None
    assert park == Park(error_text(job.error), job.attempts, job_index=0)
    assert job.state is JobState.PARKED and job.backoffs == [0.0, 0.0]


async def test_a_resumed_job_that_fails_again_parks_again_and_is_reported_again() -> None:
    handler = Failing()
    async with InMemoryWorker(parking_app(handler), settings(max_retries=0)) as worker:
        job = await worker.publish("k", "x", job_type="orders")
        await worker.join(check=False)
        await worker.resume("k", job_type="orders")
        with pytest.raises(JobsFailedError):
            await worker.join()
    assert worker.parked == [job] and len(job.errors) == 2


async def test_skip_dead_letters_the_parked_head_and_the_key_goes_on() -> None:
    handler = Failing()
    app = parking_app(handler)
    async with InMemoryWorker(app, settings(max_retries=2)) as worker:
        first = await worker.publish("order 1", "pay", job_type="orders")
        second = await worker.publish("order 1", "ship", job_type="orders")
        await worker.join(check=False)
        assert worker.parked == [first]

        handler.failing = False
        await worker.skip("order 1", job_type="orders")
        async with asyncio.timeout(10):
            await worker.join()  # the skipped job was reported when it parked

    assert worker.dead_letters == [first] and worker.handled == [second]
    assert first.state is JobState.DEAD_LETTERED and first.attempts == 3
    assert first.dead_letter_headers is not None
    assert first.dead_letter_headers[HEADER_ERROR] == "RuntimeError: boom b'pay'"
    assert first.dead_letter_headers[HEADER_ATTEMPTS] == 3
    assert worker.parked == []


async def test_resume_or_skip_of_a_key_that_is_not_parked_is_refused() -> None:
    async with InMemoryWorker(parking_app(Failing(failing=False)), settings()) as worker:
        await worker.publish("k", "x", job_type="orders")
        await worker.join()
        with pytest.raises(ValueError, match="not parked"):
            await worker.resume("k", job_type="orders")
        with pytest.raises(ValueError, match="not parked"):
            await worker.skip("nobody", job_type="orders")


# --------------------------------------------------------------------------- middleware, threads


async def test_middleware_wraps_each_attempt_outermost_first_and_sees_failures() -> None:
    app = App()
    trace: list[str] = []

    @app.middleware
    async def outer(message: Message, call_next: Any) -> Any:
        trace.append(f"outer in {message.attempt}")
        try:
            return await call_next(message)
        except Exception as exc:
            trace.append(f"outer saw {exc}")
            raise
        finally:
            trace.append(f"outer out {message.attempt}")

    @app.middleware
    async def inner(message: Message, call_next: Any) -> Any:
        trace.append(f"inner in {message.attempt}")
        result = await call_next(message)
        return f"{result}+inner"

    @app.handler()
    async def handle(message: Message) -> str:
        trace.append(f"handler {message.attempt}")
        if message.attempt == 1:
            raise RuntimeError("first")
        return "ok"

    async with InMemoryWorker(app, settings(max_retries=1)) as worker:
        job = await worker.publish("k", b"x")
        await worker.join()

    assert trace == [
        "outer in 1",
        "inner in 1",
        "handler 1",
        "outer saw first",
        "outer out 1",
        "outer in 2",
        "inner in 2",
        "handler 2",
        "outer out 2",
    ]
    assert job.result == "ok+inner"


async def test_a_raising_middleware_fails_the_attempt_like_the_handler() -> None:
    app = App()

    @app.middleware
    async def refuse(message: Message, call_next: Any) -> Any:
        raise PermissionError("no")

    app.add_handler("default", Failing(failing=False))
    async with InMemoryWorker(app, settings(max_retries=1)) as worker:
        job = await worker.publish("k", b"x")
        await worker.join(check=False)
    assert worker.dead_letters == [job] and job.attempts == 2
    assert isinstance(job.error, PermissionError)


request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")


async def test_a_sync_handler_runs_in_a_thread_with_the_middlewares_context() -> None:
    app = App()
    seen: list[tuple[str, int, bool]] = []
    loop_thread = threading.get_ident()

    @app.middleware
    async def tag(message: Message, call_next: Any) -> Any:
        request_id.set(f"req-{message.payload.text}")
        return await call_next(message)

    @app.handler("comments")
    def save(message: Message[Comment]) -> None:  # a plain def: may block
        seen.append((request_id.get(), message.sequence or 0, threading.get_ident() != loop_thread))

    async with InMemoryWorker(app, settings()) as worker:
        for text in ["a", "b", "c"]:
            await worker.publish("post", Comment(post="post", text=text), job_type="comments")
        await worker.join()

    assert [s[0] for s in seen] == ["req-a", "req-b", "req-c"]
    assert [s[1] for s in seen] == [1, 2, 3]
    assert all(s[2] for s in seen)


async def test_a_sync_handler_that_returns_an_awaitable_fails() -> None:
    app = App()

    async def later() -> None:
        pass

    app.add_handler("default", lambda message: later())
    async with InMemoryWorker(app, settings(max_retries=0)) as worker:
        await worker.publish("k", b"x")
        with pytest.raises(JobsFailedError, match="returned an awaitable"):
            await worker.join()


# --------------------------------------------------------------------------- hooks, context


async def test_hooks_and_context_as_in_a_worker() -> None:
    app = App()
    events: list[str] = []

    @app.on_startup
    async def open_pool(context: Context) -> None:
        context.db = ["opened"]
        events.append("startup")

    @app.on_shutdown
    def close_pool(context: Context) -> None:  # a sync hook: in the pool
        events.append(f"shutdown {context.db}")

    @app.handler()
    async def handle(message: Message[str]) -> None:
        message.context.db.append(message.payload)

    async with InMemoryWorker(app, settings()) as worker:
        assert events == ["startup"]
        await worker.publish("k", "row")
        await worker.join()
    assert events == ["startup", "shutdown ['opened', 'row']"]
    assert worker.context.db == ["opened", "row"]

    # run_hooks=False: the test puts its own doubles on the context
    events.clear()
    fake = Context(db=["fake"])
    async with InMemoryWorker(app, settings(), context=fake, run_hooks=False) as worker:
        await worker.publish("k", "row")
        await worker.join()
    assert events == [] and fake.db == ["fake", "row"]


async def test_a_failing_startup_hook_raises_startup_error_and_runs_no_shutdown_hook() -> None:
    app = App()
    closed: list[bool] = []

    @app.on_startup
    async def open_pool(context: Context) -> None:
        raise OSError("database down")

    app.add_shutdown(lambda context: closed.append(True))
    app.add_handler("default", Failing(failing=False))
    with pytest.raises(StartupError, match=r"startup hook .*open_pool failed: OSError"):
        async with InMemoryWorker(app, settings()):
            pass
    assert closed == []


async def test_jobs_published_by_handlers_are_joined_too() -> None:
    app = App()

    @app.handler("orders")
    async def order(message: Message[int]) -> None:
        await message.context.jobs.publish(f"mail {message.payload}", "sent", job_type="mail")

    @app.handler("mail")
    async def mail(message: Message[str]) -> None:
        pass

    context = Context()
    async with InMemoryWorker(app, settings(), context=context) as worker:
        context.jobs = worker  # what a real app would put there: a Publisher
        for n in range(3):
            await worker.publish("orders", n, job_type="orders")
        await worker.join()
    assert sorted(job.key for job in worker.handled if job.job_type == "mail") == [
        "mail 0",
        "mail 1",
        "mail 2",
    ]


async def test_leaving_the_block_without_join_stops_what_runs() -> None:
    app = App()
    started = asyncio.Event()

    @app.handler()
    async def forever(message: Message) -> None:
        started.set()
        await asyncio.Event().wait()

    async with InMemoryWorker(app, settings()) as worker:
        job = await worker.publish("k", b"x")
        await started.wait()
    assert job.state is JobState.RUNNING and worker.handled == []


# --------------------------------------------------------------------------- publishing


async def test_publish_encodes_and_checks_as_a_publisher_does() -> None:
    app = App()
    messages: list[Message[Any]] = []

    @app.handler()
    async def handle(message: Message) -> None:
        messages.append(message)

    async with InMemoryWorker(app, settings(), user_id="tester") as worker:
        await worker.publish("post A", "text", headers={"trace": "t1"})
        await worker.publish("post A", {"n": 1})
        await worker.publish("post A", Comment(post="p", text="t"))
        await worker.publish("post A", b"\x00raw")
        with pytest.raises(InvalidKeyError):
            await worker.publish("", b"x")
        with pytest.raises(InvalidKeyError):
            await worker.publish("k", b"x", job_type="no spaces")
        with pytest.raises(InvalidMessageError, match="reserved"):
            await worker.publish("k", b"x", headers={"x-rabbitkeys-key": "other"})
        with pytest.raises(InvalidMessageError):
            await worker.publish("k", object())
        await worker.join()

    assert [m.content_type for m in messages] == [TEXT, JSON, JSON, None]
    bodies = [b"text", b'{"n":1}', b'{"post":"p","text":"t"}', b"\x00raw"]
    assert [m.body for m in messages] == bodies
    assert [m.sequence for m in messages] == [1, 2, 3, 4]
    assert {m.publisher_id for m in messages} == {worker.publisher_id}
    assert all(m.user_id == "tester" and not m.redelivered for m in messages)
    assert messages[0].headers["trace"] == "t1"
    assert messages[0].headers[HEADER_KEY] == "post A"
    assert len(worker.jobs) == 4


async def test_publish_needs_a_running_worker_which_runs_once() -> None:
    worker = InMemoryWorker(App(), settings())
    with pytest.raises(RuntimeError, match="not running"):
        await worker.publish("k", b"x")
    async with worker:
        pass
    with pytest.raises(RuntimeError, match="not running"):
        await worker.publish("k", b"x")
    with pytest.raises(RuntimeError, match="runs once"):
        await worker.start()


def test_the_default_settings_ignore_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RABBITKEYS_MAX_RETRIES", "9")
    assert InMemoryWorker(App()).policy.max_retries == Settings.model_fields["max_retries"].default


# --------------------------------------------------------------------------- sync entry point


def test_run_jobs_from_a_sync_test() -> None:
    app = App()
    saved: list[str] = []

    @app.handler("comments")
    def save(message: Message[Comment]) -> None:
        saved.append(message.payload.text)

    @app.handler("audit", on_failure="park")
    def audit(message: Message[str]) -> None:
        raise RuntimeError("audit down")

    worker = run_jobs(
        app,
        [("post A", Comment(post="post A", text="1")), ("post A", {"post": "post A", "text": "2"})],
        job_type="comments",
    )
    assert saved == ["1", "2"] and len(worker.handled) == 2

    with pytest.raises(JobsFailedError, match="audit 'x' #2 parked"):
        run_jobs(app, [("post B", Comment(post="post B", text="3")), ("x", "y", "audit")])

    worker = run_jobs(app, [("x", "y", "audit")], settings(max_retries=0), check=False)
    assert [job.key for job in worker.parked] == ["x"] and worker.parked[0].attempts == 1
