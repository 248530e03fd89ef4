"""The Celery bridge against the real broker and a real result backend (the machine's Redis):
Celery tasks sent with ``ordered`` run one at a time per key in the order they were sent,
with Celery's request, retries, time limits and result states."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest
from celery import states
from celery.exceptions import NotRegistered
from prometheus_client import REGISTRY

from rabbitkeys import (
    InvalidKeyError,
    Publisher,
    RegistryUnavailableError,
    Settings,
    SyncPublisher,
    Worker,
)
from rabbitkeys._wire.topology import Names
from rabbitkeys.celery import ordered, worker_app
from rabbitkeys.tools.cluster import _settings_env

from ..cli.test_cli import rabbitkeys_cli
from ..support import eventually, overlapping, running_registry, running_worker
from . import tasks

KEYS = ["post A", "user/42", "https://example.com/p?q=1&é", "commentaire/été 🎉"]


@contextlib.asynccontextmanager
async def bridge(settings: Settings, **options: Any) -> AsyncIterator[tuple[Worker, Publisher]]:
    async with (
        running_registry(settings),
        running_worker(settings, worker_app(tasks.celery, **options)) as worker,
        Publisher(settings) as publisher,
    ):
        yield worker, publisher


@contextlib.asynccontextmanager
async def sync_publisher(settings: Settings) -> AsyncIterator[SyncPublisher]:
    """A ``SyncPublisher`` as sync code has one (its blocking calls off this event loop)."""
    publisher = SyncPublisher(settings)
    await asyncio.to_thread(publisher.start)
    try:
        yield publisher
    finally:
        await asyncio.to_thread(publisher.close)


async def result_of(result: Any, timeout: float = 15.0) -> Any:
    """``AsyncResult.get()`` (blocking, Celery's), off the event loop."""
    return await asyncio.to_thread(result.get, timeout=timeout, propagate=False)


async def dead_letters(settings: Settings) -> list[aio_pika.abc.AbstractIncomingMessage]:
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(
            Names(settings.namespace).dead_letter_queue, durable=True
        )
        found = []
        while (message := await queue.get(fail=False, no_ack=True)) is not None:
            found.append(message)
        return found
    finally:
        await connection.close()


def task_runs_counted() -> dict[tuple[str, str], float]:
    """``rabbitkeys_celery_task_runs_total`` by (task, state), as a worker serves it."""
    return {
        (sample.labels["task"].rsplit(".", 1)[-1], sample.labels["state"]): sample.value
        for metric in REGISTRY.collect()
        if metric.name == "rabbitkeys_celery_task_runs"
        for sample in metric.samples
        if sample.name.endswith("_total")
    }


def runs_of(name: str) -> dict[str, list[int]]:
    by_key: dict[str, list[int]] = defaultdict(list)
    for task, key, n, _retries, _id in tasks.ran:
        if task == name:
            by_key[key].append(n)
    return by_key


async def test_each_keys_tasks_run_one_at_a_time_in_the_order_they_were_sent(
    settings: Settings, celery_app: Any
) -> None:
    """Two tasks of one key share its order (create, then delete); keys run concurrently;
    every result reaches the backend."""
    async with bridge(settings) as (worker, publisher):
        sent = []
        for n in range(20):
            for key in KEYS:
                task = tasks.create_comment if n % 3 else tasks.delete_comment
                args = (key, n, 0.005) if n % 3 else (key, n)
                sent.append(ordered(task, key, publisher=publisher).aapply_async(args))
        results = await asyncio.gather(*sent)
        # one at a time: Celery's result consumer is not made for many threads at once
        values = [await result_of(result) for result in results]
    assert all(result.state == states.SUCCESS for result in results)
    assert values == [n if n % 3 else f"deleted {n}" for n in range(20) for _ in KEYS]
    order: dict[str, list[int]] = defaultdict(list)
    for _task, key, n, retries, _id in tasks.ran:
        order[key].append(n)
        assert retries == 0
    assert order == {key: list(range(20)) for key in KEYS}
    by_key: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for key, started, finished in tasks.spans:
        by_key[key].append((started, finished))
    assert overlapping(by_key) == []
    assert worker.dead_lettered == 0


async def test_the_sync_calls_publish_through_a_sync_publisher(
    settings: Settings, celery_app: Any
) -> None:
    """``apply_async`` / ``delay`` block until confirmed, from sync code (a thread here);
    ``OrderedTask``'s ``apply_async(key=...)`` goes the same way."""

    def send(publisher: SyncPublisher) -> list[Any]:
        first = ordered(tasks.create_comment, "post A", publisher=publisher).delay("post A", 1)
        second = ordered(tasks.create_comment, publisher=publisher).apply_async(
            ("post A", 2), key="post A"
        )
        return [first, second]

    async with bridge(settings):
        async with sync_publisher(settings) as publisher:
            results = await asyncio.to_thread(send, publisher)
            assert [await result_of(result) for result in results] == [1, 2]
    assert runs_of("create") == {"post A": [1, 2]}


async def test_an_ordered_task_base_class_sends_through_rabbitkeys_when_given_a_key(
    settings: Settings, celery_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with bridge(settings):
        async with sync_publisher(settings) as publisher:
            # the process's default publisher, as an application's would be
            monkeypatch.setattr(
                "rabbitkeys.celery._publishing.default_publisher", lambda: publisher
            )
            result = await asyncio.to_thread(tasks.based.apply_async, ("user/42", 7), key="user/42")
            assert await result_of(result) == 7
    assert runs_of("based") == {"user/42": [7]}


async def test_self_retry_runs_the_task_again_in_place_while_its_key_waits(
    settings: Settings, celery_app: Any
) -> None:
    """``self.retry(countdown=...)``: the next attempt has ``request.retries`` one higher
    and the key's later task runs after it, not before; past ``max_retries`` the task
    fails and is dead-lettered with its error."""
    counted_before = task_runs_counted()
    async with bridge(settings) as (worker, publisher):
        key = "post A"
        retried = await ordered(tasks.flaky, key, publisher=publisher).adelay(key, 1, 2)
        after = await ordered(tasks.create_comment, key, publisher=publisher).adelay(key, 2)
        too_many = await ordered(tasks.flaky, key, publisher=publisher).adelay(key, 3, 10)
        last = await ordered(tasks.create_comment, key, publisher=publisher).adelay(key, 4)
        assert await result_of(retried) == [1, 2]
        assert await result_of(last) == 4
        await eventually(lambda: worker.dead_lettered == 1)
    assert [(task, n, retries) for task, _key, n, retries, _id in tasks.ran] == [
        ("flaky", 1, 0),
        ("flaky", 1, 1),
        ("flaky", 1, 2),
        ("create", 2, 0),
        ("flaky", 3, 0),
        ("flaky", 3, 1),
        ("flaky", 3, 2),
        ("flaky", 3, 3),
        ("create", 4, 0),
    ]
    assert after.state == states.SUCCESS
    assert too_many.state == states.FAILURE
    [dead] = await dead_letters(settings)
    assert dead.headers["id"] == too_many.id
    assert str(dead.headers["x-rabbitkeys-error"]).startswith("MaxRetriesExceededError")
    # the worker's per-task figures: every attempt, by the state Celery gave it
    counted = task_runs_counted()
    assert {
        label: counted[label] - counted_before.get(label, 0.0)
        for label in counted
        if counted[label] != counted_before.get(label, 0.0)
    } == {
        ("flaky", "RETRY"): 5,
        ("flaky", "SUCCESS"): 1,
        ("flaky", "FAILURE"): 1,
        ("create_comment", "SUCCESS"): 2,
    }


async def test_a_retry_with_other_arguments_runs_with_them(
    settings: Settings, celery_app: Any
) -> None:
    async with bridge(settings) as (_worker, publisher):
        result = await ordered(tasks.retried_with_other_args, "k", publisher=publisher).adelay(
            "k", 0
        )
        assert await result_of(result) == 3
    assert runs_of("other-args") == {"k": [0, 1, 2, 3]}


async def test_autoretry_for_with_backoff_retries_in_order(
    settings: Settings, celery_app: Any
) -> None:
    async with bridge(settings) as (_worker, publisher):
        key = "user/42"
        first = await ordered(tasks.autoretried, key, publisher=publisher).adelay(key, 1)
        then = await ordered(tasks.create_comment, key, publisher=publisher).adelay(key, 2)
        assert await result_of(first) == 2
        assert await result_of(then) == 2
    assert [(task, retries) for task, *_, retries, _id in tasks.ran] == [
        ("auto", 0),
        ("auto", 1),
        ("auto", 2),
        ("create", 0),
    ]


async def test_a_failing_task_fails_at_once_and_its_key_goes_on(
    settings: Settings, celery_app: Any
) -> None:
    """A task error is not retried (Celery does not retry what the task does not): FAILURE
    in the backend, with the exception ``get()`` raises; dead-lettered with its error."""
    async with bridge(settings) as (worker, publisher):
        failed = await ordered(tasks.fails, "post A", publisher=publisher).adelay("post A", 1)
        then = await ordered(tasks.create_comment, "post A", publisher=publisher).adelay(
            "post A", 2
        )
        assert await result_of(then) == 2
        await eventually(lambda: worker.dead_lettered == 1)
    assert failed.state == states.FAILURE
    with pytest.raises(ValueError, match="comment 1 of post A cannot be saved"):
        failed.get(timeout=5)
    assert [(task, n) for task, _key, n, *_ in tasks.ran] == [("fails", 1), ("create", 2)]
    [dead] = await dead_letters(settings)
    assert dead.headers["x-rabbitkeys-error"] == "ValueError: comment 1 of post A cannot be saved"
    assert dead.headers["task"] == "tests.celery.tasks.fails"


async def test_a_failing_task_parks_its_key_when_the_bridge_parks(
    settings: Settings, celery_app: Any
) -> None:
    async with bridge(settings, on_failure="park") as (worker, publisher):
        await ordered(tasks.fails, "post A", publisher=publisher).adelay("post A", 1)
        later = await ordered(tasks.create_comment, "post A", publisher=publisher).adelay(
            "post A", 2
        )
        other = await ordered(tasks.create_comment, "post B", publisher=publisher).adelay(
            "post B", 3
        )
        assert await result_of(other) == 3
        await eventually(lambda: worker.parked == 1)
        assert later.state == states.PENDING  # waits behind the parked task
    assert runs_of("create") == {"post B": [3]}


async def test_a_task_the_worker_does_not_know_is_dead_lettered_and_its_key_goes_on(
    settings: Settings, celery_app: Any
) -> None:
    gone_id = str(uuid.uuid4())
    unregistered_before = task_runs_counted().get(("(unregistered)", "FAILURE"), 0.0)
    async with bridge(settings) as (worker, publisher):
        await publisher.publish(
            "post A",
            b'[[], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]',
            job_type="celery",
            headers={"task": "proj.tasks.gone", "id": gone_id, "lang": "py"},
        )
        await publisher.publish("post A", b"not a celery message", job_type="celery")
        then = await ordered(tasks.create_comment, "post A", publisher=publisher).adelay(
            "post A", 1
        )
        assert await result_of(then) == 1
        await eventually(lambda: worker.dead_lettered == 2)
    unknown, foreign = await dead_letters(settings)
    assert str(unknown.headers["x-rabbitkeys-error"]).startswith("NotRegistered")
    # stored as a Celery worker stores it: the caller's get() raises instead of waiting
    gone = tasks.celery.AsyncResult(gone_id)
    assert gone.state == states.FAILURE
    with pytest.raises(NotRegistered, match=r"proj\.tasks\.gone"):
        gone.get(timeout=5)
    gone.forget()
    assert task_runs_counted()[("(unregistered)", "FAILURE")] == unregistered_before + 1
    assert "proj.tasks.gone" in str(unknown.headers["x-rabbitkeys-error"])
    assert "not a Celery task message" in str(foreign.headers["x-rabbitkeys-error"])


async def test_time_limits_raise_inside_the_task_and_fail_it(
    settings: Settings, celery_app: Any
) -> None:
    """``soft_time_limit``: ``SoftTimeLimitExceeded`` inside the task, which may clean up
    and return; ``time_limit``: the task fails, not retried, ``TimeLimitExceeded`` in the
    backend, and its key goes on."""
    async with bridge(settings) as (worker, publisher):
        soft = await ordered(tasks.soft_limited, "a", publisher=publisher).adelay("a", 1)
        hard = await ordered(tasks.hard_limited, "b", publisher=publisher).adelay("b", 2)
        then = await ordered(tasks.create_comment, "b", publisher=publisher).adelay("b", 3)
        assert await result_of(soft) == "cleaned up"
        assert await result_of(then) == 3
        await eventually(lambda: worker.dead_lettered == 1)
        await eventually(lambda: hard.state == states.FAILURE)
    assert type(hard.result).__name__ == "TimeLimitExceeded"
    assert [task for task, *_ in tasks.ran] == ["soft", "hard", "create"] or [
        task for task, *_ in tasks.ran
    ] == ["hard", "soft", "create"]
    [dead] = await dead_letters(settings)
    assert dead.headers["x-rabbitkeys-error"] == "TimeLimitExceeded: TimeLimitExceeded(0.3,)"


async def test_expired_tasks_are_revoked_and_ignore_result_stores_nothing(
    settings: Settings, celery_app: Any
) -> None:
    async with bridge(settings) as (_worker, publisher):
        expired = await ordered(tasks.create_comment, "k", publisher=publisher).aapply_async(
            ("k", 1), expires=-1
        )
        quiet = await ordered(tasks.no_result, "k", publisher=publisher).adelay("k", 2)
        then = await ordered(tasks.create_comment, "k", publisher=publisher).adelay("k", 3)
        assert await result_of(then) == 3
        assert expired.state == states.REVOKED
        assert quiet.state == states.PENDING
    assert [(task, n) for task, _key, n, *_ in tasks.ran] == [("no-result", 2), ("create", 3)]


async def test_calls_a_key_cannot_honour_are_refused_before_anything_is_sent(
    settings: Settings, celery_app: Any
) -> None:
    async with bridge(settings) as (worker, publisher):
        call = ordered(tasks.create_comment, "k", publisher=publisher)
        refused = (
            {"countdown": 5},
            {"eta": 0},
            {"queue": "q"},
            {"link": None},
            {"compression": "zlib"},
        )
        for option in refused:
            with pytest.raises(TypeError, match="not supported by rabbitkeys"):
                await call.aapply_async(("k", 1), **option)
        with pytest.raises(TypeError, match="no key"):
            await ordered(tasks.create_comment, publisher=publisher).adelay("k", 1)
        with pytest.raises(TypeError, match=r"not a signature .*ordered\(sig\.type, key\)"):
            ordered(tasks.create_comment.s("k", 1), "k")
        with pytest.raises(TypeError, match="takes a Celery task"):
            ordered(print, "k")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="unknown apply_async options: colour"):
            await call.aapply_async(("k", 1), colour="red")
        with pytest.raises(TypeError, match="await"):
            call.apply_async(("k", 1))  # an async Publisher from sync code
        # what Celery users pass out of habit is taken, with nothing to do
        last = await call.aapply_async(("k", 9), retry=True, retry_policy={"max_retries": 3})
        assert await result_of(last) == 9
    assert tasks.ran == [("create", "k", 9, 0, last.id)]
    assert worker.dead_lettered == 0


async def test_a_task_called_from_a_task_has_its_parent_and_root(
    settings: Settings, celery_app: Any
) -> None:
    from rabbitkeys.celery._protocol import task_message

    message = task_message(tasks.create_comment, ("k", 1))
    assert message.headers["task"] == "tests.celery.tasks.create_comment"
    assert message.headers["root_id"] == message.task_id
    assert message.headers["parent_id"] is None
    assert message.payload.content_type == "application/json"
    assert message.headers["x-celery-content-encoding"] == "utf-8"


def test_under_task_always_eager_a_call_runs_at_once_as_celery_runs_it(
    celery_app: Any,
) -> None:
    """An application's tests that set ``task_always_eager`` keep working: nothing is
    published (no broker here), the task runs in the caller; a bad key still fails."""
    celery_app.conf.task_always_eager = True
    try:
        result = ordered(tasks.create_comment, "post A").delay("post A", 5)
        assert result.get() == 5
        assert tasks.ran == [("create", "post A", 5, 0, result.id)]
        with pytest.raises(InvalidKeyError):
            ordered(tasks.create_comment, "").delay("", 1)
        with pytest.raises(TypeError, match="countdown"):
            ordered(tasks.create_comment, "k").apply_async(("k", 1), countdown=1)
    finally:
        celery_app.conf.task_always_eager = False


async def test_a_call_that_cannot_be_sent_raises_what_publish_raises_and_runs_nothing(
    settings: Settings, celery_app: Any
) -> None:
    """Arguments the task's serializer cannot carry: kombu's ``EncodeError``, as Celery
    raises it; no registry to route a new key: ``RegistryUnavailableError`` (a
    ``PublishError``: never sent, safe to send again)."""
    from kombu.exceptions import EncodeError

    hurried = settings.model_copy(update={"ensure_timeout": 0.5})
    async with Publisher(hurried) as publisher:
        with pytest.raises(EncodeError):
            await ordered(tasks.create_comment, "k", publisher=publisher).adelay("k", object())
        with pytest.raises(RegistryUnavailableError):
            await ordered(tasks.create_comment, "k", publisher=publisher).adelay("k", 1)
    assert tasks.ran == []


async def test_a_base_class_calling_super_call_keeps_the_request_and_the_app(
    settings: Settings, celery_app: Any
) -> None:
    """Flask's app-context ``Task.__call__`` calling ``super().__call__``: the task still
    sees its request (id, retries) and its app as ``current_app``, as in a Celery worker,
    and its retry still runs in place."""
    tasks.context.clear()
    async with bridge(settings) as (_worker, publisher):
        result = await ordered(tasks.in_context, "k", publisher=publisher).adelay("k", 1)
        assert await result_of(result) == [result.id, 1, "bridge-tests"]
    assert tasks.context == ["entered", "entered"]
    assert [(task, retries) for task, _key, _n, retries, _id in tasks.ran] == [
        ("context", 0),
        ("context", 1),
    ]


async def test_a_task_past_its_hard_limit_fails_even_if_it_retries_on_every_error(
    settings: Settings, celery_app: Any
) -> None:
    """``autoretry_for=(Exception,)`` catches the ``TimeLimitExceeded`` raised in it; the
    task failed all the same (Celery kills it): ``FAILURE``, dead-lettered, run once."""
    async with bridge(settings) as (worker, publisher):
        hard = await ordered(tasks.hard_limited_autoretry, "k", publisher=publisher).adelay("k", 1)
        then = await ordered(tasks.create_comment, "k", publisher=publisher).adelay("k", 2)
        assert await result_of(then) == 2
        await eventually(lambda: worker.dead_lettered == 1)
    assert hard.state == states.FAILURE
    assert type(hard.result).__name__ == "TimeLimitExceeded"
    assert [task for task, *_ in tasks.ran] == ["hard-auto", "create"]


async def test_a_task_without_limit_gets_the_workers_and_fails_at_it(
    settings: Settings, celery_app: Any
) -> None:
    """No ``time_limit``: ``RABBITKEYS_JOB_TIMEOUT`` is the limit; the task gets
    ``TimeLimitExceeded`` at it, the job fails (no retry) and the backend says why."""
    quick = settings.model_copy(update={"job_timeout": 0.5})
    async with bridge(quick) as (worker, publisher):
        sleeper = await ordered(tasks.no_limit_sleeper, "k", publisher=publisher).adelay("k", 1)
        then = await ordered(tasks.create_comment, "k", publisher=publisher).adelay("k", 2)
        assert await result_of(then) == 2
        await eventually(lambda: worker.dead_lettered == 1)
        await eventually(lambda: sleeper.state == states.FAILURE)
    assert type(sleeper.result).__name__ == "TimeLimitExceeded"
    assert [task for task, *_ in tasks.ran] == ["sleeper", "create"]
    [dead] = await dead_letters(settings)
    assert dead.headers["x-rabbitkeys-error"] == (
        "WorkerTimeLimitExceeded: task tests.celery.tasks.no_limit_sleeper ran past 0.5 s, the "
        "worker's limit for a task without time_limit (RABBITKEYS_JOB_TIMEOUT): give it a "
        "time_limit"
    )


async def test_retries_that_would_hold_a_job_too_long_fail_it(
    settings: Settings, celery_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delivery is held through its in-place retries at most ``RETRY_WINDOW`` (25 min,
    under RabbitMQ's 30-minute consumer_timeout; 1 s here): the retry past it fails."""
    from rabbitkeys.celery import _running

    monkeypatch.setattr(_running, "RETRY_WINDOW", 1.0)
    async with bridge(settings) as (worker, publisher):
        long = await ordered(tasks.long_retries, "k", publisher=publisher).adelay("k", 1)
        await eventually(lambda: worker.dead_lettered == 1)
        await eventually(lambda: long.state == states.FAILURE)
    assert type(long.result).__name__ == "RetryWindowExceededError"
    assert 4 <= len(tasks.ran) <= 6  # 0.2 s apart within 1 s
    [dead] = await dead_letters(settings)
    assert str(dead.headers["x-rabbitkeys-error"]).startswith("RetryWindowExceededError")


async def test_a_rejected_task_to_be_requeued_runs_again_in_place(
    settings: Settings, celery_app: Any
) -> None:
    async with bridge(settings) as (worker, publisher):
        rejected = await ordered(tasks.rejects, "k", publisher=publisher).adelay("k", 1)
        then = await ordered(tasks.create_comment, "k", publisher=publisher).adelay("k", 2)
        assert await result_of(rejected) == 1
        assert await result_of(then) == 2
        assert worker.dead_lettered == 0
    assert [(task, retries) for task, _key, _n, retries, _id in tasks.ran] == [
        ("rejects", 0),
        ("rejects", 1),
        ("create", 0),
    ]


async def test_a_task_registered_after_the_worker_started_retries_in_place_too(
    settings: Settings, celery_app: Any
) -> None:
    async with bridge(settings) as (_worker, publisher):

        @celery_app.task(bind=True, name="tests.celery.late", max_retries=2)
        def late(self: Any, key: str, n: int) -> int:
            tasks.record("late", key, n, self.request)
            if self.request.retries < 1:
                raise self.retry(countdown=0)
            return self.request.retries

        try:
            result = await ordered(late, "k", publisher=publisher).adelay("k", 1)
            assert await result_of(result) == 1
        finally:
            celery_app.tasks.unregister("tests.celery.late")
    assert [(task, retries) for task, _key, _n, retries, _id in tasks.ran] == [
        ("late", 0),
        ("late", 1),
    ]


async def test_the_worker_starts_and_stops_as_a_celery_worker_does(
    settings: Settings, celery_app: Any
) -> None:
    """``worker_init`` / ``worker_process_init`` at start (Django's fixup and engine set-ups
    hang on them), ``worker_shutdown`` at the end; the request's host name is the worker's."""
    from celery import signals

    seen: list[str] = []

    def on_init(sender: Any, **_: Any) -> None:
        seen.append(f"init {sender.app.main}")

    def on_process_init(**_: Any) -> None:
        seen.append("process init")

    def on_shutdown(sender: Any, **_: Any) -> None:
        seen.append("shutdown")

    signals.worker_init.connect(on_init, weak=False)
    signals.worker_process_init.connect(on_process_init, weak=False)
    signals.worker_shutdown.connect(on_shutdown, weak=False)
    try:
        async with bridge(settings) as (_worker, publisher):
            result = await ordered(tasks.create_comment, "k", publisher=publisher).adelay("k", 1)
            assert await result_of(result) == 1
    finally:
        signals.worker_init.disconnect(on_init)
        signals.worker_process_init.disconnect(on_process_init)
        signals.worker_shutdown.disconnect(on_shutdown)
    assert seen == ["init bridge-tests", "process init", "shutdown"]


async def test_the_rpc_result_backend_brings_results_back_to_the_caller(
    settings: Settings,
) -> None:
    """``backend="rpc://"`` (Celery's first-steps tutorial): no store, a worker sends each
    state to the caller's reply queue over the Celery app's broker connection. The caller's
    reply queue is declared before the job is sent, so a result that comes before ``get()``
    waits for it; a failure comes back as the exception, as with Celery."""
    from celery import Celery

    rpc_app = Celery("bridge-rpc-tests", broker=settings.amqp_url.get_secret_value())
    rpc_app.conf.result_backend = "rpc://"

    @rpc_app.task(bind=True)
    def add(self: Any, x: int, y: int) -> list[Any]:
        return [x + y, self.request.retries]

    @rpc_app.task(bind=True, max_retries=1)
    def flaky_add(self: Any, x: int, y: int) -> list[Any]:
        if self.request.retries == 0:
            raise self.retry(countdown=0.1)
        return [x + y, self.request.retries]

    @rpc_app.task
    def refuse(x: int) -> None:
        raise ValueError(f"no {x}")

    def call(publisher: SyncPublisher) -> list[Any]:
        sent = [
            ordered(add, "post A", publisher=publisher).delay(1, 2),
            ordered(flaky_add, "post A", publisher=publisher).delay(3, 4),
            ordered(refuse, "post A", publisher=publisher).delay(5),
        ]
        time.sleep(1.0)  # the results come before get() asks: they wait in the reply queue
        try:
            got = [result.get(timeout=15, propagate=False) for result in sent]
            return [*got[:2], repr(got[2]), sent[2].state]
        finally:
            rpc_app.backend.result_consumer.stop()  # this thread's (Celery's are per thread)

    async with (
        running_registry(settings),
        running_worker(settings, worker_app(rpc_app)),
        sync_publisher(settings) as publisher,
    ):
        try:
            got = await asyncio.to_thread(call, publisher)
        finally:
            rpc_app.close()
    assert got == [[3, 0], [7, 1], "ValueError('no 5')", states.FAILURE]


async def test_a_dead_lettered_task_redriven_runs_again_under_its_id(
    settings: Settings, celery_app: Any
) -> None:
    """``rabbitkeys redrive --job-type celery --apply``, once the cause is fixed: the task
    runs again with its id, before what its key had waiting, and its FAILURE becomes
    SUCCESS in the backend."""
    async with bridge(settings) as (worker, publisher):
        failed = await ordered(tasks.fails_until_fixed, "post A", publisher=publisher).adelay(
            "post A", 1
        )
        await eventually(lambda: worker.dead_lettered == 1)
        assert failed.state == states.FAILURE
        tasks.fixed.set()
        redrive = ["redrive", "--job-type", "celery", "--key", "post A", "--apply"]
        done = await asyncio.to_thread(rabbitkeys_cli, *redrive, env=_settings_env(settings))
        assert done.returncode == 0, done.stderr
        assert "redriven: 1 dead letter of 1 key" in done.stdout
        await eventually(lambda: tasks.celery.AsyncResult(failed.id).state == states.SUCCESS)
    assert tasks.celery.AsyncResult(failed.id).result == 1
    assert [(task, n, task_id) for task, _key, n, _retries, task_id in tasks.ran] == [
        ("until-fixed", 1, failed.id),
        ("until-fixed", 1, failed.id),
    ]


async def test_a_task_travels_in_its_own_serializer_which_the_worker_must_accept(
    settings: Settings, celery_app: Any
) -> None:
    """``serializer="pickle"``: the body is pickle, which the app's ``accept_content``
    lets the worker read; a worker that does not accept it dead-letters the job, saying
    why, and the key goes on."""
    async with bridge(settings) as (worker, publisher):
        sent = await ordered(tasks.pickled, "k", publisher=publisher).adelay("k", {"b", "a"})
        assert await result_of(sent) == ["a", "b"]
        accepted = tasks.celery.conf.accept_content
        tasks.celery.conf.accept_content = ["json"]
        try:
            await ordered(tasks.pickled, "k", publisher=publisher).adelay("k", {"c"})
            then = await ordered(tasks.create_comment, "k", publisher=publisher).adelay("k", 2)
            assert await result_of(then) == 2
            await eventually(lambda: worker.dead_lettered == 1)
        finally:
            tasks.celery.conf.accept_content = accepted
    [dead] = await dead_letters(settings)
    assert dead.properties.content_type == "application/x-python-serialize"
    assert str(dead.headers["x-rabbitkeys-error"]).startswith("ContentDisallowed")
    assert [task for task, *_ in tasks.ran] == ["pickled", "create"]
