"""What a handler is and what runs around it: typed payloads (``Message[T]``), plain ``def``
handlers in the worker's thread pool, startup and shutdown hooks with the shared
``Context``, and middleware. Registration rules are pure; the rest runs against the real
broker (the executor fed by hand where only its logic is at stake)."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from rabbitkeys import (
    App,
    ConfigError,
    Context,
    Message,
    PayloadError,
    Publisher,
    Settings,
    StartupError,
    Worker,
)
from rabbitkeys._wire.envelope import HEADER_ATTEMPTS, HEADER_ERROR, HEADER_KEY
from rabbitkeys._wire.payload import encode_payload
from rabbitkeys._worker.dedup import SequenceHistory
from rabbitkeys._worker.retry import DeadLetter, RetryPolicy
from rabbitkeys.tools.cluster import _settings_env

from ..support import eventually, make_settings, running_registry, running_worker
from .test_execution import assignment, delivery, executor
from .test_worker import dead_letters


class Comment(BaseModel):
    post: str
    text: str


class NotValidatable:
    """pydantic cannot build a validator for it."""


# --- registration: pure ------------------------------------------------------------------


def test_the_parameter_annotation_says_what_the_payload_is() -> None:
    app = App()

    @app.handler("typed")
    async def typed(message: Message[Comment]) -> None: ...

    @app.handler("raw")
    def raw(message: Message) -> None: ...

    @app.handler("as_bytes")
    async def as_bytes(message: Message[bytes]) -> None: ...

    @app.handler("unannotated")
    def unannotated(message):  # type: ignore[no-untyped-def]
        ...

    assert app.route("typed").decoder is not None and app.route("typed").is_async
    assert app.route("raw").decoder is None and not app.route("raw").is_async
    assert app.route("as_bytes").decoder is None
    assert app.route("unannotated").decoder is None
    assert app.route("typed").payload(b'{"post": "A", "text": "hi"}', None) == Comment(
        post="A", text="hi"
    )
    assert app.route("raw").payload(b"\xff", None) == b"\xff"  # untouched, never parsed
    with pytest.raises(PayloadError, match=r"not a valid Comment.*text: Field required"):
        app.route("typed").payload(b'{"post": "A"}', "application/json")


def test_a_handler_that_cannot_work_is_refused_at_registration_naming_it() -> None:
    app = App()

    async def two(message: Message, extra: int) -> None: ...

    def wrong(comment: Comment) -> None: ...

    async def unbuildable(message: Message[NotValidatable]) -> None: ...

    def local_type() -> None:
        class Local(BaseModel):
            x: int

        async def nested(message: Message[Local]) -> None: ...

        app.add_handler("nested", nested)

    with pytest.raises(ConfigError, match=r"\.two of job type 'a' must take one parameter"):
        app.add_handler("a", two)
    with pytest.raises(ConfigError, match=r"wrong of job type 'a': .*annotate it rabbitkeys"):
        app.add_handler("a", wrong)
    with pytest.raises(ConfigError, match=r"unbuildable of job type 'a': cannot validate a body"):
        app.add_handler("a", unbuildable)
    with pytest.raises(ConfigError, match=r"nested .*define the type at module level"):
        local_type()
    with pytest.raises(ConfigError, match="must be an `async def mw"):
        app.middleware(lambda message, call_next: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(ConfigError, match=r"startup hook .* must take one parameter"):
        app.on_startup(lambda: None)
    assert app.job_types == frozenset()


def test_a_message_made_by_hand_carries_its_body_as_payload() -> None:
    """For users' own unit tests of a handler: payload and context need not be given."""
    message: Message = Message(
        key="k",
        job_type="default",
        body=b"x",
        headers={},
        publisher_id=None,
        sequence=None,
        attempt=1,
        redelivered=False,
    )
    assert message.payload == b"x" and message.content_type is None
    assert isinstance(message.context, Context)


def test_a_payload_error_is_never_retried() -> None:
    policy = RetryPolicy(max_retries=5, backoff=0.1, backoff_max=1.0)
    assert policy.after_failure(1, PayloadError("bad")) == DeadLetter(attempts=1)


# --- middleware and sync handlers in the executor ------------------------------------------

trace: contextvars.ContextVar[str] = contextvars.ContextVar("trace", default="")


async def test_middleware_wraps_each_attempt_outermost_first_and_sees_failures() -> None:
    events: list[str] = []
    app = App()

    def recording(name: str) -> Callable[..., Awaitable[Any]]:
        async def middleware(message: Message, call_next: Any) -> Any:
            events.append(f"{name} before {message.attempt}")
            try:
                result = await call_next(message)
            except Exception as exc:
                events.append(f"{name} failed {exc!r}")
                raise
            events.append(f"{name} after {result}")
            return result

        return middleware

    app.add_middleware(recording("outer"))
    app.add_middleware(recording("inner"))

    @app.handler()
    async def flaky(message: Message) -> str:
        events.append(f"handler {message.attempt}")
        if message.attempt == 1:
            raise RuntimeError("busy")
        return "done"

    run = executor(app, asyncio.Event(), max_retries=1, retry_backoff=0.0)
    assert await run.execute(assignment("k"), SequenceHistory(), delivery("k", b"", 1))
    assert events == [
        "outer before 1",
        "inner before 1",
        "handler 1",
        "inner failed RuntimeError('busy')",
        "outer failed RuntimeError('busy')",
        "outer before 2",  # a retry runs the whole chain again
        "inner before 2",
        "handler 2",
        "inner after done",
        "outer after done",
    ]


async def test_a_raising_middleware_fails_the_attempt_like_the_handler() -> None:
    app = App()
    handled: list[int] = []

    @app.middleware
    async def refuses_first(message: Message, call_next: Any) -> Any:
        if message.attempt == 1:
            raise RuntimeError("tracing backend down")
        return await call_next(message)

    @app.handler()
    async def handler(message: Message) -> None:
        handled.append(message.attempt)

    run = executor(app, asyncio.Event(), max_retries=2, retry_backoff=0.0)
    assert await run.execute(assignment("k"), SequenceHistory(), delivery("k", b"", 1))
    assert handled == [2] and run.dead_lettered == 0


async def test_a_sync_handler_runs_in_a_thread_with_the_middlewares_context() -> None:
    seen: list[tuple[str, str, bool]] = []
    app = App()

    @app.middleware
    async def tracing(message: Message, call_next: Any) -> Any:
        trace.set(f"span-{message.key}")
        return await call_next(message)

    @app.handler()
    def blocking(message: Message[Comment]) -> None:
        seen.append(
            (
                message.payload.text,
                trace.get(),
                threading.current_thread() is threading.main_thread(),
            )
        )

    run = executor(app, asyncio.Event())
    body, _ = encode_payload(Comment(post="k", text="hello"))
    with ThreadPoolExecutor(1) as run.threads:  # the worker's, while it runs
        assert await run.execute(assignment("k"), SequenceHistory(), delivery("k", bytes(body), 1))
    assert seen == [("hello", "span-k", False)]


async def test_a_key_waits_for_its_sync_handler_left_running_by_a_lost_session() -> None:
    """A session's end cancels its runners, but not a thread: the key's next message (in
    the next session) starts only when that thread is done."""
    gate = threading.Event()
    events: list[str] = []
    app = App()

    @app.handler()
    def blocking(message: Message) -> None:
        events.append(f"{message.body.decode()} start")
        if message.body == b"1":
            assert gate.wait(60)
        events.append(f"{message.body.decode()} end")

    run = executor(app, asyncio.Event())
    with ThreadPoolExecutor(2) as run.threads:
        first = asyncio.create_task(
            run.execute(assignment("k"), SequenceHistory(), delivery("k", b"1", 1))
        )
        await eventually(lambda: events == ["1 start"])
        first.cancel()  # what the end of a session does to the key's runner
        await asyncio.gather(first, return_exceptions=True)
        second = asyncio.create_task(
            run.execute(assignment("k"), SequenceHistory(), delivery("k", b"2", 2))
        )
        await asyncio.sleep(0.2)  # room for a wrong start; the order below holds anyway
        gate.set()
        assert await second
    assert events == ["1 start", "1 end", "2 start", "2 end"]


# --- against the real broker --------------------------------------------------------------


async def test_a_typed_payload_round_trip_and_an_invalid_body_dead_lettered_with_its_reason(
    settings: Settings,
) -> None:
    """JSON bytes become a validated Comment; a body that does not fit is dead-lettered on
    its first attempt with pydantic's reason, counted, and the key moves on."""
    comments: list[Comment] = []
    content_types: list[str | None] = []
    app = App()

    @app.handler("comments")
    async def create_comment(message: Message[Comment]) -> None:
        comments.append(message.payload)
        content_types.append(message.content_type)

    body, _ = encode_payload(Comment(post="post A", text="first"))
    later, _ = encode_payload({"post": "post A", "text": "after the bad one"})
    # a registry of its own: the process's default one counts every earlier test's too
    metrics = CollectorRegistry()
    async with (
        running_registry(settings),
        running_worker(settings, app, metrics_registry=metrics) as worker,
    ):
        async with Publisher(settings) as publisher:
            await publisher.publish("post A", bytes(body), job_type="comments")
            await publisher.publish("post A", b'{"post": "post A"}', job_type="comments")
            await publisher.publish("post A", bytes(later), job_type="comments")
        await eventually(lambda: len(comments) == 2 and worker.dead_lettered == 1)
        assert worker.metrics.dead_lettered._value.get() == 1
        assert worker.metrics.handler_failures._value.get() == 0  # no handler ran for it
    assert [c.text for c in comments] == ["first", "after the bad one"]
    assert content_types == [None, None]  # published as bytes: no content type
    [dead] = await dead_letters(settings)
    assert dead.body == b'{"post": "post A"}'
    assert dead.headers[HEADER_KEY] == "post A"
    assert dead.headers[HEADER_ATTEMPTS] == 1  # never retried
    error = dead.headers[HEADER_ERROR]
    assert isinstance(error, str)
    assert error.startswith("PayloadError: body is not a valid Comment: text: Field required")


async def test_sync_handlers_that_block_leave_heartbeats_and_async_handlers_running(
    amqp_url: str, namespace: str
) -> None:
    """Three keys of a plain ``def`` handler block their threads (two threads) for as long
    as the test likes; meanwhile the registry keeps hearing the worker's heartbeats and
    async handlers of other keys run. Then each sync key is handled in order."""
    settings = make_settings(amqp_url, namespace, sync_handler_threads=2, concurrency=4)
    gate = threading.Event()
    lock = threading.Lock()
    running, most_at_once = 0, 0
    handled: dict[str, list[int]] = {}
    quick: list[str] = []
    app = App()

    @app.handler("blocking")
    def blocking(message: Message) -> None:
        nonlocal running, most_at_once
        with lock:
            running += 1
            most_at_once = max(most_at_once, running)
        try:
            # a blocking call, as time.sleep or a sync ORM query would be; it lasts until
            # the test has seen enough heartbeats, many intervals long
            assert gate.wait(60), "the test never opened the gate"
            time.sleep(0.01)
        finally:
            with lock:
                running -= 1
                handled.setdefault(message.key, []).append(int(message.body))

    @app.handler("quick")
    async def quick_handler(message: Message) -> None:
        quick.append(message.key)

    async with (
        running_registry(settings) as registry,
        running_worker(settings, app, worker_id="w-sync") as worker,
    ):
        async with Publisher(settings) as publisher:
            for n in range(3):
                for key in ("s1", "s2", "s3"):
                    await publisher.publish(key, str(n).encode(), job_type="blocking")
            await eventually(lambda: running == 2)  # both threads are held
            started = time.monotonic()
            beats: set[float] = set()

            def heard(times: int) -> bool:
                beats.add(registry._book.workers["w-sync"].last_seen)
                return len(beats) >= times

            await eventually(lambda: heard(8), timeout=20)
            for n in range(10):
                await publisher.publish(f"q{n}", b"x", job_type="quick")
            await eventually(lambda: len(quick) == 10)
            assert running == 2 and not gate.is_set()
            blocked_for = time.monotonic() - started
            gate.set()
        await eventually(lambda: sum(map(len, handled.values())) == 9)
        assert "w-sync" in registry._book.workers and worker.ready
    assert handled == {key: [0, 1, 2] for key in ("s1", "s2", "s3")}
    assert most_at_once == 2  # the pool's size, below the concurrency of 4
    print(
        f"\nsync handlers blocked {blocked_for:.2f}s (heartbeat every "
        f"{settings.heartbeat_interval}s): the registry heard {len(beats)} heartbeats and 10 "
        "async messages were handled meanwhile"
    )


async def test_the_drain_waits_for_a_running_sync_handler_and_acks_its_message(
    settings: Settings,
) -> None:
    gate = threading.Event()
    entered = threading.Event()
    finished: list[bytes] = []
    app = App()

    @app.handler()
    def blocking(message: Message) -> None:
        entered.set()
        assert gate.wait(60)
        finished.append(message.body)

    async with running_registry(settings):
        worker = Worker(app, settings)
        await worker.start()
        async with Publisher(settings) as publisher:
            await publisher.publish("k", b"one")
        await eventually(entered.is_set)
        closing = asyncio.create_task(worker.close())
        await eventually(lambda: not worker.ready)  # stopping: the drain is under way
        assert not closing.done()  # a thread cannot be cancelled: the drain waits for it
        gate.set()
        await asyncio.wait_for(closing, 30)
    assert finished == [b"one"] and worker.handled == 1
    assert await dead_letters(settings) == []


async def test_hooks_run_once_around_the_worker_and_share_the_context_with_handlers(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []
    seen: list[tuple[str, int]] = []
    app = App()

    @app.on_startup
    async def open_pool(context: Context) -> None:
        calls.append("startup async")
        context.pool = "a pool"

    @app.on_startup
    def read_config(context: Context) -> None:  # sync: runs in the worker's pool
        calls.append(f"startup sync in a thread: {threading.current_thread().name}")
        context.limit = 3

    @app.on_shutdown
    def failing_shutdown(context: Context) -> None:
        calls.append("shutdown sync")
        raise RuntimeError("already closed")

    @app.on_shutdown
    async def close_pool(context: Context) -> None:
        calls.append(f"shutdown async, pool {context.pool}")

    @app.handler()
    async def handler(message: Message) -> None:
        seen.append((message.context.pool, message.context.limit))

    @app.handler("sync")
    def sync_handler(message: Message) -> None:
        seen.append((message.context.pool, message.context.limit))

    with caplog.at_level(logging.ERROR, "rabbitkeys.worker"):
        async with running_registry(settings), running_worker(settings, app) as worker:
            await eventually(lambda: worker.ready)  # started in the background
            assert calls[0] == "startup async" and len(calls) == 2
            async with Publisher(settings) as publisher:
                await publisher.publish("k", b"1")
                await publisher.publish("k", b"2", job_type="sync")
            await eventually(lambda: len(seen) == 2)
            assert worker.context.pool == "a pool"
    assert calls[1].startswith("startup sync in a thread: rabbitkeys-worker-")
    assert calls[2:] == ["shutdown sync", "shutdown async, pool a pool"]
    assert seen == [("a pool", 3), ("a pool", 3)]
    assert "shutdown hook test_hooks_run_once" in caplog.text
    assert "failing_shutdown failed" in caplog.text and "already closed" in caplog.text


async def test_a_failing_startup_hook_stops_the_worker_before_it_joins(
    settings: Settings,
) -> None:
    app = App()
    ran: list[str] = []

    @app.on_startup
    async def connect_database(context: Context) -> None:
        raise ConnectionRefusedError("database at db:5432 refused")

    @app.on_startup
    async def never(context: Context) -> None:
        ran.append("second startup hook")

    @app.on_shutdown
    async def close(context: Context) -> None:
        ran.append("shutdown hook")

    @app.handler()
    async def handler(message: Message) -> None:
        ran.append("handler")

    async with running_registry(settings) as registry:
        worker = Worker(app, settings, worker_id="w-broken")
        with pytest.raises(StartupError) as failure:
            await asyncio.wait_for(worker.run(), 10)
        assert registry._book.workers == {}
    assert str(failure.value) == (
        "startup hook test_a_failing_startup_hook_stops_the_worker_before_it_joins.<locals>"
        ".connect_database failed: ConnectionRefusedError: database at db:5432 refused"
    )
    assert isinstance(failure.value.__cause__, ConnectionRefusedError)
    assert ran == [] and not worker.ready


@pytest.mark.processes
async def test_the_worker_command_exits_1_naming_a_failing_startup_hook(
    settings: Settings, tmp_path: Path
) -> None:
    (tmp_path / "broken_app.py").write_text(
        textwrap.dedent(
            """
            import rabbitkeys

            app = rabbitkeys.App()

            @app.on_startup
            def open_pool(context):
                raise RuntimeError("no DATABASE_URL")

            @app.handler()
            async def handler(message):
                pass
            """
        )
    )
    async with running_registry(settings) as registry:
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "rabbitkeys", "worker", "broken_app:app"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            env={**os.environ, **_settings_env(settings), "RABBITKEYS_METRICS_PORT": "0"},
        )
        assert registry._book.workers == {}
    assert result.returncode == 1, result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line == ("rabbitkeys: startup hook open_pool failed: RuntimeError: no DATABASE_URL")
    assert "joined" not in result.stderr


async def test_sync_handler_throughput_figure(amqp_url: str, namespace: str) -> None:
    """Figures, not assertions on time: 200 messages over 20 keys, each handler blocking
    20 ms, as plain ``def`` (time.sleep) with 8 threads and as ``async def``
    (asyncio.sleep)."""
    settings = make_settings(amqp_url, namespace, sync_handler_threads=8)
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    app = App()

    @app.handler("sync")
    def sync_handler(message: Message) -> None:
        time.sleep(0.02)
        with lock:
            counts["sync"] += 1

    @app.handler("async")
    async def async_handler(message: Message) -> None:
        await asyncio.sleep(0.02)
        counts["async"] += 1

    figures = {}
    async with running_registry(settings), running_worker(settings, app):
        async with Publisher(settings) as publisher:
            for job_type in ("sync", "async"):
                # the keys exist and are assigned first: what is timed is handling
                await asyncio.gather(
                    *(publisher.publish(f"k{n}", b"", job_type=job_type) for n in range(20))
                )
                await eventually(lambda job_type=job_type: counts[job_type] == 20)  # type: ignore[misc]
                started = time.perf_counter()
                await asyncio.gather(
                    *(publisher.publish(f"k{n % 20}", b"", job_type=job_type) for n in range(200))
                )
                await eventually(lambda job_type=job_type: counts[job_type] == 220)  # type: ignore[misc]
                figures[job_type] = 200 / (time.perf_counter() - started)
    assert counts == {"sync": 220, "async": 220}
    print(
        f"\n200 messages over 20 keys, handler blocking 20 ms: sync (8 threads) "
        f"{figures['sync']:.0f}/s, async {figures['async']:.0f}/s"
    )
