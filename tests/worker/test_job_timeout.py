"""A time limit per attempt (``RABBITKEYS_JOB_TIMEOUT``, ``@app.handler(timeout=)``): an
attempt past it fails with ``JobTimeoutError`` and goes through the retry policy, then the
dead letter or the park. An ``async def`` is cancelled; a ``def``'s thread runs on, keeps
its place in the pool, and its key's next call waits for it.

The limit is pure (which one applies) and the registration and settings checks are pure;
the executor is fed by hand where only its logic is at stake; then a real registry and
worker against the broker, and the in-memory worker. No assertion depends on how fast the
machine is: a handler that must time out hangs until the test lets it go (or for an hour),
one that must not runs a few times its job type's limit."""

from __future__ import annotations

import asyncio
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from rabbitkeys import (
    App,
    ConfigError,
    Context,
    JobTimeoutError,
    Message,
    Publisher,
    RabbitkeysError,
    Settings,
    load_settings,
)
from rabbitkeys._observe.metrics import WorkerMetrics
from rabbitkeys._wire.envelope import HEADER_ATTEMPTS, HEADER_ERROR, HEADER_SEQUENCE
from rabbitkeys._worker.app import Route
from rabbitkeys._worker.dedup import SequenceHistory
from rabbitkeys._worker.execution import Deadlines, Outcome, Park, time_limit
from rabbitkeys.testing import InMemoryWorker, JobState

from ..support import eventually, make_settings, running_registry, running_worker
from .test_execution import assignment, batch, delivery, executor
from .test_park_worker import membership_tap, queued
from .test_worker import dead_letters

HOUR = 3600.0


def route(timeout: float | None) -> Route:
    app = App()

    @app.handler(timeout=timeout)
    async def handler(message: Message) -> None: ...

    return app.route("default")


def message_with(headers: dict[str, Any] | None = None) -> Message:
    """A job's message as a handler gets it (what a per-job limit looks at)."""
    return Message(
        key="post A",
        job_type="default",
        body=b"",
        headers=headers or {},
        publisher_id="p",
        sequence=1,
        attempt=1,
        redelivered=False,
        user_id=None,
        payload=b"",
        content_type=None,
        context=Context(),
    )


# --- which limit applies: pure --------------------------------------------------------------


def test_the_default_is_300_seconds() -> None:
    assert Settings().job_timeout == 300.0
    assert time_limit(route(None), Settings().job_timeout, message_with()) == 300.0


@given(
    st.one_of(st.none(), st.just(0.0), st.floats(0.001, 1e6)),
    st.one_of(st.just(0.0), st.floats(0.001, 1e6)),
)
def test_the_job_types_own_limit_beats_the_setting_and_0_is_no_limit(
    own: float | None, setting: float
) -> None:
    limit = time_limit(route(own), setting, message_with())
    chosen = setting if own is None else own
    assert limit == (chosen if chosen > 0 else None)


def test_a_job_types_limit_can_be_each_jobs_own() -> None:
    """``timeout=`` a function of the message (the Celery bridge: each task's
    ``time_limit``); None from it is the setting, 0 no limit."""
    app = App()

    @app.handler(timeout=lambda message: message.headers.get("limit"))
    async def handler(message: Message) -> None: ...

    per_job = app.route("default")
    assert time_limit(per_job, 300.0, message_with({"limit": 2.5})) == 2.5
    assert time_limit(per_job, 300.0, message_with()) == 300.0
    assert time_limit(per_job, 300.0, message_with({"limit": 0})) is None


@pytest.mark.parametrize("bad", [-1, -0.5, math.nan, math.inf, "5", True])
def test_a_timeout_that_is_not_seconds_is_refused_at_registration(bad: Any) -> None:
    app = App()
    with pytest.raises(ConfigError, match=r"timeout of job type 'orders' must be a number"):

        @app.handler("orders", timeout=bad)
        async def orders(message: Message) -> None: ...

    with pytest.raises(ConfigError, match=r"timeout of job type 'orders'"):
        app.add_handler("orders", lambda message: None, timeout=bad)
    assert "orders" not in app.job_types


@pytest.mark.parametrize("good", [0, 2, 0.25])
def test_a_timeout_in_seconds_or_0_is_taken(good: float) -> None:
    app = App()
    app.add_handler("orders", lambda message: None, timeout=good)
    assert app.route("orders").timeout == float(good)


@pytest.mark.parametrize("bad", ["-1", "nan", "inf", "soon", ""])
def test_a_bad_job_timeout_setting_is_a_config_error_naming_it(
    monkeypatch: pytest.MonkeyPatch, bad: str
) -> None:
    monkeypatch.setenv("RABBITKEYS_JOB_TIMEOUT", bad)
    with pytest.raises(ConfigError, match="RABBITKEYS_JOB_TIMEOUT"):
        load_settings()


def test_the_job_timeout_setting_reads_seconds_and_0(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RABBITKEYS_JOB_TIMEOUT", "2.5")
    assert load_settings().job_timeout == 2.5
    monkeypatch.setenv("RABBITKEYS_JOB_TIMEOUT", "0")
    assert load_settings().job_timeout == 0.0


def test_job_timeout_error_is_a_rabbitkeys_error_and_a_timeout_error() -> None:
    error = JobTimeoutError("charge", "orders", 30.0)
    assert isinstance(error, RabbitkeysError) and isinstance(error, TimeoutError)
    assert (
        str(error)
        == "handler charge of job type 'orders' ran past its time limit of 30 s (cancelled)"
    )
    assert (error.handler, error.job_type, error.limit) == ("charge", "orders", 30.0)


async def test_a_timeout_error_the_handler_raises_itself_is_not_a_job_timeout() -> None:
    async def own_timeout() -> None:
        raise TimeoutError("the database did not answer")

    with pytest.raises(TimeoutError) as caught:
        await Deadlines().within(HOUR, own_timeout(), route(None), "default")
    assert not isinstance(caught.value, JobTimeoutError)


async def test_one_timer_serves_calls_of_any_limits_each_cut_at_its_own() -> None:
    """A short limit that begins after a long one is cut first; a cancellation from outside
    (a session's end) stays a cancellation."""
    deadlines = Deadlines()

    async def hang() -> None:
        await asyncio.sleep(HOUR)

    long = asyncio.create_task(deadlines.within(HOUR, hang(), route(None), "long"))
    outside = asyncio.create_task(deadlines.within(HOUR / 2, hang(), route(None), "outside"))
    await asyncio.sleep(0)
    with pytest.raises(JobTimeoutError) as short:
        await deadlines.within(0.1, hang(), route(None), "short")
    assert short.value.job_type == "short" and isinstance(
        short.value.__cause__, asyncio.CancelledError
    )
    assert not long.done() and not outside.done()
    outside.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outside
    long.cancel()
    await asyncio.gather(long, return_exceptions=True)


async def test_a_call_that_swallows_its_cancellation_ends_as_it_likes_with_no_stray_cancel() -> (
    None
):
    async def stubborn() -> str:
        try:
            await asyncio.sleep(HOUR)
        except asyncio.CancelledError:
            return "kept going"
        return "woke"

    assert await Deadlines().within(0.1, stubborn(), route(None), "default") == "kept going"
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0)  # a cancellation left pending would raise here


# --- the executor, fed by hand ----------------------------------------------------------------


def timeouts(metrics: WorkerMetrics, job_type: str = "default") -> float:
    return float(metrics.job_timeouts.labels(job_type=job_type)._value.get())


def overdue(metrics: WorkerMetrics) -> float:
    return float(metrics.overdue_handler_threads._value.get())


async def test_a_hung_async_handler_is_cancelled_retried_then_parks_with_the_timeout() -> None:
    attempts: list[int] = []
    cancelled: list[int] = []
    app = App()

    @app.handler(on_failure="park", timeout=0.2)
    async def hangs(message: Message) -> None:
        attempts.append(message.attempt)
        try:
            await asyncio.sleep(HOUR)
        except asyncio.CancelledError:
            cancelled.append(message.attempt)
            raise

    run = executor(app, asyncio.Event(), max_retries=2, retry_backoff=0)
    outcome = await run.execute(assignment("k"), SequenceHistory(), delivery("k", b"1", 1))
    assert outcome == Park(
        "JobTimeoutError: handler test_a_hung_async_handler_is_cancelled_retried_then_parks_"
        "with_the_timeout.<locals>.hangs of job type 'default' ran past its time limit of "
        "0.2 s (cancelled)",
        3,
        0,
    )
    assert attempts == cancelled == [1, 2, 3]
    assert timeouts(run._metrics) == 3
    assert run._metrics.handler_failures._value.get() == 3


async def test_each_job_of_a_batch_has_its_own_limit_and_the_key_keeps_its_order() -> None:
    """Job 2 of 3 hangs on its first attempt: it alone times out, is retried and handled;
    the batch's jobs run in order, and a limit spent by job 1 is not job 2's."""
    seen: list[tuple[bytes, int]] = []
    app = App()

    @app.handler(timeout=0.5)
    async def record(message: Message) -> None:
        seen.append((message.body, message.attempt))
        if message.body == b"2" and message.attempt == 1:
            await asyncio.sleep(HOUR)
        elif message.body == b"1":
            await asyncio.sleep(0.3)  # most of the limit: job 2's limit starts afresh

    run = executor(app, asyncio.Event(), max_retries=1, retry_backoff=0)
    outcome = await run.execute(
        assignment("k"), SequenceHistory(), batch("k", [(1, b"1"), (2, b"2"), (3, b"3")])
    )
    assert outcome is Outcome.DONE
    assert seen == [(b"1", 1), (b"2", 1), (b"2", 2), (b"3", 1)]
    assert timeouts(run._metrics) == 1


async def test_a_middleware_sees_the_timeout_from_call_next() -> None:
    seen: list[BaseException] = []
    app = App()

    @app.middleware
    async def report(message: Message, call_next: Any) -> Any:
        try:
            return await call_next(message)
        except Exception as exc:
            seen.append(exc)
            raise

    @app.handler(on_failure="park", timeout=0.2)
    async def hangs(message: Message) -> None:
        await asyncio.sleep(HOUR)

    run = executor(app, asyncio.Event(), max_retries=0)
    outcome = await run.execute(assignment("k"), SequenceHistory(), delivery("k", b"1", 1))
    assert isinstance(outcome, Park) and outcome.error.startswith("JobTimeoutError:")
    [error] = seen
    assert isinstance(error, JobTimeoutError) and error.limit == 0.2


async def test_a_hung_middleware_is_cut_at_the_limit_and_its_grace() -> None:
    app = App()

    @app.middleware
    async def hangs_after(message: Message, call_next: Any) -> Any:
        try:
            return await call_next(message)
        finally:
            await asyncio.sleep(HOUR)

    @app.handler(on_failure="park", timeout=0.1)
    async def quick(message: Message) -> None: ...

    run = executor(app, asyncio.Event(), max_retries=0)
    outcome = await run.execute(assignment("k"), SequenceHistory(), delivery("k", b"1", 1))
    assert isinstance(outcome, Park) and outcome.error.startswith("JobTimeoutError:")


async def test_a_sync_handler_past_its_limit_runs_on_and_its_retry_waits_for_its_thread() -> None:
    """Attempt 1's thread blocks past the limit: the attempt fails, the thread runs on
    (counted as overdue), and attempt 2 starts only once that thread returned, although a
    second thread is free: another key's sync handler runs on it meanwhile."""
    gate = threading.Event()
    events: list[str] = []
    app = App()

    @app.handler(timeout=0.3)
    def blocking(message: Message) -> None:
        events.append(f"{message.key} {message.attempt} start")
        if message.key == "k" and message.attempt == 1:
            assert gate.wait(60)
        events.append(f"{message.key} {message.attempt} end")

    run = executor(app, asyncio.Event(), max_retries=1, retry_backoff=0, sync_handler_threads=2)
    metrics = run._metrics
    with ThreadPoolExecutor(2) as run.threads:
        try:
            first = asyncio.create_task(
                run.execute(assignment("k"), SequenceHistory(), delivery("k", b"1", 1))
            )
            await eventually(lambda: overdue(metrics) == 1)
            assert timeouts(metrics) == 1 and run.handler_threads.overdue == 1
            other = await run.execute(assignment("j"), SequenceHistory(), delivery("j", b"x", 1))
            assert other is Outcome.DONE
            await asyncio.sleep(0.3)  # room for a wrong start of k's attempt 2
            assert events == ["k 1 start", "j 1 start", "j 1 end"]
        finally:
            gate.set()
        assert await first is Outcome.DONE
    assert events[3:] == ["k 1 end", "k 2 start", "k 2 end"]
    assert overdue(metrics) == 0 and run.handler_threads.overdue == 0


async def test_an_overdue_thread_keeps_its_place_in_the_pool_until_it_returns() -> None:
    """One thread: while the overdue one runs, another key's sync handler waits for a
    thread without its time limit running (had it been queued in the pool, its limit would
    have run out there: it would have failed without running)."""
    gate = threading.Event()
    seen: list[tuple[str, int]] = []
    app = App()

    @app.handler(timeout=0.2)
    def blocking(message: Message) -> None:
        seen.append((message.key, message.attempt))
        if message.key == "k":
            assert gate.wait(60)

    run = executor(app, asyncio.Event(), max_retries=0, sync_handler_threads=1)
    with ThreadPoolExecutor(1) as run.threads:
        try:
            key_k = asyncio.create_task(
                run.execute(assignment("k"), SequenceHistory(), delivery("k", b"1", 1))
            )
            await eventually(lambda: overdue(run._metrics) == 1)
            key_j = asyncio.create_task(
                run.execute(assignment("j"), SequenceHistory(), delivery("j", b"x", 1))
            )
            await asyncio.sleep(0.6)  # three times j's limit, had it started
            assert not key_j.done() and seen == [("k", 1)]
        finally:
            gate.set()
        # k's only attempt timed out: dead-lettered (no channel here: the copy fails)
        await asyncio.gather(key_k, return_exceptions=True)
        assert await key_j is Outcome.DONE
    assert seen == [("k", 1), ("j", 1)]
    assert timeouts(run._metrics) == 1  # k's, never j's


# --- a real registry and worker -------------------------------------------------------------


async def test_a_hung_async_handler_is_retried_then_dead_lettered_and_its_key_goes_on(
    amqp_url: str, namespace: str
) -> None:
    """Against the broker: the setting's limit (1 s) for a job type without its own; a
    job type whose own limit is 0 (none) runs past the setting."""
    settings = make_settings(amqp_url, namespace, job_timeout=1.0, max_retries=1)
    seen: list[tuple[str, bytes, int]] = []
    app = App()

    @app.handler("hangs")
    async def hangs(message: Message) -> None:
        seen.append((message.job_type, message.body, message.attempt))
        if message.body == b"hang":
            await asyncio.sleep(HOUR)

    @app.handler("long", timeout=0)
    async def long(message: Message) -> None:
        await asyncio.sleep(2.5)  # 2.5 times the setting
        seen.append((message.job_type, message.body, message.attempt))

    metrics = CollectorRegistry()
    async with running_registry(settings):
        async with running_worker(settings, app, metrics_registry=metrics) as worker:
            async with Publisher(settings) as publisher:
                for body in (b"1", b"hang", b"3"):
                    await publisher.publish("post 1", body, job_type="hangs")
                await publisher.publish("post 1", b"slow", job_type="long")
            await eventually(
                lambda: ("hangs", b"3", 1) in seen and ("long", b"slow", 1) in seen, timeout=30
            )
            assert worker.dead_lettered == 1
    assert [entry for entry in seen if entry[0] == "hangs"] == [
        ("hangs", b"1", 1),
        ("hangs", b"hang", 1),
        ("hangs", b"hang", 2),
        ("hangs", b"3", 1),
    ]
    assert ("long", b"slow", 1) in seen  # once: never timed out
    assert metrics.get_sample_value("rabbitkeys_job_timeouts_total", {"job_type": "hangs"}) == 2
    assert metrics.get_sample_value("rabbitkeys_job_timeouts_total", {"job_type": "long"}) == 0
    [dead] = await dead_letters(settings)
    assert dead.body == b"hang" and dead.headers[HEADER_ATTEMPTS] == 2
    assert dead.headers[HEADER_ERROR] == (
        "JobTimeoutError: handler test_a_hung_async_handler_is_retried_then_dead_lettered_and_"
        "its_key_goes_on.<locals>.hangs of job type 'hangs' ran past its time limit of 1 s "
        "(cancelled)"
    )


async def test_a_hung_handler_of_a_parking_job_type_parks_its_key_in_order(
    amqp_url: str, namespace: str
) -> None:
    """The job type's own limit beats the setting (an hour): the key parks at its head with
    the timeout as its error, its later messages behind it in order; another key goes on."""
    settings = make_settings(amqp_url, namespace, job_timeout=HOUR, max_retries=1)
    seen: list[tuple[str, bytes]] = []
    app = App()

    @app.handler(on_failure="park", timeout=0.5)
    async def picky(message: Message) -> None:
        seen.append((message.key, message.body))
        if message.body == b"hang":
            await asyncio.sleep(HOUR)

    async with running_registry(settings), membership_tap(settings) as tap:
        async with running_worker(settings, app):
            async with Publisher(settings) as publisher:
                for body in (b"1", b"hang", b"3"):
                    await publisher.publish("post 1", body)
                for n in range(3):
                    await publisher.publish("post 2", str(n).encode())
            await eventually(lambda: tap.released_after_first_park("post 1"), timeout=30)
            await eventually(lambda: len([k for k, _ in seen if k == "post 2"]) == 3)
            first = tap.parked("post 1")[0]
            assert first.error.startswith("JobTimeoutError: handler ")
            assert first.error.endswith(" ran past its time limit of 0.5 s (cancelled)")
            assert (first.attempts, first.job_index) == (2, 0)
    assert [body for key, body in seen if key == "post 1" and body != b"hang"] == [b"1"]
    messages, _ = await queued(settings, "post 1")
    assert [m.body for m in messages] == [b"hang", b"3"]
    assert [m.headers[HEADER_SEQUENCE] for m in messages] == [2, 3]


async def test_a_hung_sync_handler_is_dead_lettered_and_its_key_waits_for_its_thread(
    amqp_url: str, namespace: str
) -> None:
    """The thread cannot be stopped: the attempt fails at the limit and the job is
    dead-lettered while the thread still runs (overdue: the gauge says 1); the key's next
    message starts only once the thread returned, and its result is discarded."""
    settings = make_settings(amqp_url, namespace, max_retries=0, sync_handler_threads=2)
    gate = threading.Event()
    events: list[str] = []
    app = App()

    @app.handler(timeout=0.5)
    def blocking(message: Message) -> str:
        events.append(f"{message.body.decode()} start")
        if message.body == b"hang":
            assert gate.wait(60)
        events.append(f"{message.body.decode()} end")
        return "discarded"

    metrics = CollectorRegistry()

    def overdue_threads() -> float | None:
        return metrics.get_sample_value("rabbitkeys_overdue_handler_threads")

    async with running_registry(settings):
        async with running_worker(settings, app, metrics_registry=metrics) as worker:
            try:
                async with Publisher(settings) as publisher:
                    for body in (b"1", b"hang", b"3"):
                        await publisher.publish("post 1", body)
                await eventually(lambda: worker.dead_lettered == 1, timeout=30)
                assert overdue_threads() == 1
                [dead] = await dead_letters(settings)
                assert dead.body == b"hang"
                assert str(dead.headers[HEADER_ERROR]).endswith(
                    " ran past its time limit of 0.5 s (its thread runs on, its result discarded)"
                )
                await asyncio.sleep(0.5)  # room for a wrong start of "3"
                assert events == ["1 start", "1 end", "hang start"]
            finally:
                gate.set()
            await eventually(lambda: events[-1:] == ["3 end"], timeout=30)
            assert overdue_threads() == 0
    assert events == ["1 start", "1 end", "hang start", "hang end", "3 start", "3 end"]
    assert metrics.get_sample_value("rabbitkeys_job_timeouts_total", {"job_type": "default"}) == 1


# --- the in-memory worker ---------------------------------------------------------------------


async def test_the_in_memory_worker_times_out_retries_and_dead_letters_or_parks() -> None:
    app = App()

    @app.handler("mail", timeout=0.2)
    async def mail(message: Message) -> None:
        if message.body == b"hang":
            await asyncio.sleep(HOUR)

    @app.handler("orders", on_failure="park", timeout=0.2)
    async def orders(message: Message) -> None:
        if message.body == b"hang":
            await asyncio.sleep(HOUR)

    @app.handler("long", timeout=0)
    async def long(message: Message) -> None:
        await asyncio.sleep(0.5)  # past the setting below: its own "no limit" wins

    settings = Settings(max_retries=1, job_timeout=0.2)
    async with InMemoryWorker(app, settings) as worker:
        for body in (b"hang", b"next"):
            await worker.publish("k", body, job_type="mail")
            await worker.publish("k", body, job_type="orders")
        await worker.publish("k", b"slow", job_type="long")
        await worker.join(check=False)

    [dead] = worker.dead_letters
    assert (dead.job_type, dead.body, dead.attempts) == ("mail", b"hang", 2)
    assert all(isinstance(error, JobTimeoutError) for error in dead.errors)
    assert dead.dead_letter_headers is not None
    assert dead.dead_letter_headers[HEADER_ERROR].startswith("JobTimeoutError: handler ")
    assert [job.state for job in worker.of("k", "mail")] == [
        JobState.DEAD_LETTERED,
        JobState.HANDLED,
    ]
    [parked] = worker.parked
    assert (parked.job_type, parked.attempts, type(parked.error)) == ("orders", 2, JobTimeoutError)
    assert [job.state for job in worker.of("k", "orders")] == [JobState.PARKED, JobState.WAITING]
    assert [job.state for job in worker.of("k", "long")] == [JobState.HANDLED]


async def test_the_in_memory_worker_lets_a_sync_handlers_thread_run_on_and_its_key_wait() -> None:
    gate = threading.Event()
    events: list[str] = []
    app = App()

    @app.handler(timeout=0.2)
    def blocking(message: Message) -> None:
        events.append(f"{message.body.decode()} {message.attempt} start")
        if message.body == b"hang" and message.attempt == 1:
            assert gate.wait(60)
        events.append(f"{message.body.decode()} {message.attempt} end")

    async with InMemoryWorker(app, Settings(max_retries=1)) as worker:
        try:
            hang = await worker.publish("k", b"hang")
            await worker.publish("k", b"next")
            await eventually(lambda: len(hang.errors) == 1)
            assert isinstance(hang.error, JobTimeoutError)
            await asyncio.sleep(0.4)  # room for a wrong start of the retry
            assert events == ["hang 1 start"]
        finally:
            gate.set()
        await worker.join()
    assert events == [
        "hang 1 start",
        "hang 1 end",
        "hang 2 start",
        "hang 2 end",
        "next 1 start",
        "next 1 end",
    ]
    assert [job.attempts for job in worker.handled] == [2, 1]
