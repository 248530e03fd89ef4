"""SyncPublisher and rabbitkeys.publish, against the real broker: per-key order from many
threads as a worker handles it, the Publisher's errors raised in the calling thread, close
flushing what was submitted, the process's default publisher (reused, flushed at exit,
made anew after fork) and the refusal to block a running event loop.

A SyncPublisher blocks its caller, so the async tests (which run a registry and a worker on
the test's loop) drive it from other threads (``asyncio.to_thread``)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

import rabbitkeys
from rabbitkeys import (
    App,
    BrokerUnavailableError,
    InvalidKeyError,
    InvalidMessageError,
    Message,
    PublishError,
    QuotaExceededError,
    RegistryUnavailableError,
    Settings,
    SyncPublisher,
)

from ..support import eventually, make_settings, running_registry, running_worker

THREADS = 8
KEYS = 6
PER_KEY = 40


def in_threads(target: Callable[[int], object], count: int) -> float:
    """Run ``target(0)`` ... ``target(count - 1)`` in threads of their own, released at
    once; re-raise the first error; return the seconds they took together."""
    start = threading.Barrier(count)
    errors: list[BaseException] = []

    def run(n: int) -> None:
        start.wait()
        try:
            target(n)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - started


class Handled:
    """What the worker's handler saw, per key, in handling order: JSON bodies decoded, others
    as text."""

    def __init__(self) -> None:
        self.bodies: dict[str, list[Any]] = defaultdict(list)
        self.publishers: dict[str, set[str | None]] = defaultdict(set)

    def app(self) -> App:
        app = App()

        @app.handler()
        async def record(message: Message) -> None:
            try:
                body = json.loads(message.body)
            except ValueError:
                body = message.body.decode()
            self.bodies[message.key].append(body)
            self.publishers[message.key].add(message.publisher_id)

        return app

    def total(self) -> int:
        return sum(map(len, self.bodies.values()))


async def test_threads_keep_their_order_per_key(settings: Settings) -> None:
    """8 threads publish to the same keys at once, each its own numbers per key: half block
    on each publish, half submit and wait at the end. Per key and thread the worker handles
    the numbers in increasing order, and every one of them."""
    handled = Handled()
    keys = [f"post-{k}" for k in range(KEYS)]

    def publish_from(publisher: SyncPublisher, thread: int) -> None:
        futures: list[Future[None]] = []
        for n in range(PER_KEY):
            for key in keys:
                payload = {"thread": thread, "n": n}
                if thread % 2:
                    futures.append(publisher.submit(key, payload))
                else:
                    publisher.publish(key, payload)
        for future in futures:
            future.result()

    async with running_registry(settings), running_worker(settings, handled.app()):
        publisher = SyncPublisher(settings)
        await asyncio.to_thread(publisher.start)
        try:
            seconds = await asyncio.to_thread(
                in_threads, lambda thread: publish_from(publisher, thread), THREADS
            )
        finally:
            await asyncio.to_thread(publisher.close)
        total = THREADS * KEYS * PER_KEY
        await eventually(lambda: handled.total() >= total, timeout=30)
    print(f"{total} sync publishes from {THREADS} threads in {seconds:.2f}s")
    assert handled.total() == total
    for key in keys:
        per_thread: dict[int, list[int]] = defaultdict(list)
        for body in handled.bodies[key]:
            per_thread[body["thread"]].append(body["n"])
        assert per_thread == {t: list(range(PER_KEY)) for t in range(THREADS)}, key
        assert handled.publishers[key] == {publisher.publisher_id}


def test_invalid_input_raises_in_the_caller_and_nothing_is_sent(settings: Settings) -> None:
    with SyncPublisher(settings) as publisher:
        with pytest.raises(InvalidKeyError):
            publisher.publish("", b"x")
        with pytest.raises(InvalidKeyError):
            publisher.submit("k", b"x", job_type="has.dot")
        with pytest.raises(InvalidMessageError, match="as JSON"):
            publisher.publish("k", object())
        with pytest.raises(InvalidMessageError, match="reserved"):
            publisher.publish("k", b"x", headers={"x-rabbitkeys-seq": 1})
        assert publisher._publisher is not None
        assert publisher._publisher.pending_messages == 0


def test_without_a_registry_publish_raises_registry_unavailable(
    amqp_url: str, namespace: str
) -> None:
    settings = make_settings(amqp_url, namespace, ensure_timeout=0.5)
    with SyncPublisher(settings) as publisher:
        with pytest.raises(RegistryUnavailableError, match="no registry answered"):
            publisher.publish("k", b"x")
        future = publisher.submit("k", b"y")
        assert isinstance(future.exception(timeout=10), RegistryUnavailableError)


async def test_a_quota_refusal_raises_in_the_caller(amqp_url: str, namespace: str) -> None:
    settings = make_settings(amqp_url, namespace, max_keys=1)
    async with running_registry(settings):
        publisher = SyncPublisher(settings)
        await asyncio.to_thread(publisher.start)
        try:
            await asyncio.to_thread(publisher.publish, "k1", "one")
            with pytest.raises(QuotaExceededError, match="RABBITKEYS_MAX_KEYS=1"):
                await asyncio.to_thread(publisher.publish, "k2", "two")
            await asyncio.to_thread(publisher.publish, "k1", "still fine")
        finally:
            await asyncio.to_thread(publisher.close)


async def test_close_flushes_what_was_submitted(settings: Settings) -> None:
    handled = Handled()
    async with running_registry(settings), running_worker(settings, handled.app()):
        publisher = SyncPublisher(settings)
        await asyncio.to_thread(publisher.start)

        def submit_then_close() -> list[Future[None]]:
            futures = [publisher.submit(f"k{n % 10}", {"n": n}) for n in range(500)]
            publisher.close()
            return futures

        futures = await asyncio.to_thread(submit_then_close)
        # close returned: every submit was settled, and confirmed
        assert [f.done() for f in futures] == [True] * 500
        assert {f.exception() for f in futures} == {None}
        with pytest.raises(PublishError, match="closed"):
            publisher.submit("k0", b"late")
        await eventually(lambda: handled.total() == 500, timeout=30)
    for n in range(10):
        assert [body["n"] for body in handled.bodies[f"k{n}"]] == list(range(n, 500, 10))


def test_close_with_a_timeout_cancels_what_is_still_waiting(amqp_url: str, namespace: str) -> None:
    # no registry: the key is never routed, so the message waits in its lane, unsent
    settings = make_settings(amqp_url, namespace, ensure_timeout=2)
    publisher = SyncPublisher(settings)
    publisher.start()
    future = publisher.submit("k", b"x")
    started = time.perf_counter()
    publisher.close(timeout=0.2)
    print(f"close(timeout=0.2) took {time.perf_counter() - started:.2f}s")
    assert future.cancelled()  # withdrawn: it was never written
    assert not publisher.running
    publisher.close()  # again: nothing to do


def test_start_raises_in_the_caller_when_the_broker_is_unreachable(namespace: str) -> None:
    settings = make_settings("amqp://guest:guest@127.0.0.1:1/", namespace, publish_timeout=1)
    publisher = SyncPublisher(settings)
    with pytest.raises(BrokerUnavailableError, match="within 1s"):
        publisher.start()
    assert not publisher.running
    assert "rabbitkeys-sync-publisher" not in [t.name for t in threading.enumerate()]


def test_publish_before_start_is_a_clear_error(settings: Settings) -> None:
    with pytest.raises(PublishError, match="not started"):
        SyncPublisher(settings).publish("k", b"x")


async def test_blocking_calls_inside_a_running_loop_raise_and_submit_works(
    settings: Settings,
) -> None:
    async with running_registry(settings):
        publisher = SyncPublisher(settings)
        with pytest.raises(RuntimeError, match="runs an event loop"):
            publisher.start()
        await asyncio.to_thread(publisher.start)
        try:
            with pytest.raises(RuntimeError, match="runs an event loop"):
                publisher.publish("k", b"x")
            with pytest.raises(RuntimeError, match="runs an event loop"):
                rabbitkeys.publish("k", b"x")
            # submit does not block: awaitable from async code
            await asyncio.wrap_future(publisher.submit("k", b"x"))

            # on the publisher's own loop, publish would wait for itself forever
            def on_its_loop() -> None:
                publisher.publish("k", b"y")

            assert publisher._loop is not None
            ran: Future[None] = Future()

            def call() -> None:
                try:
                    on_its_loop()
                    ran.set_result(None)
                except BaseException as exc:
                    ran.set_exception(exc)

            publisher._loop.call_soon_threadsafe(call)
            with pytest.raises(RuntimeError, match="deadlock"):
                await asyncio.wrap_future(ran)
        finally:
            await asyncio.to_thread(publisher.close)


# ------------------------------------------------------------------ the default publisher


@pytest.fixture
def default_env(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> Iterator[dict[str, str]]:
    """The environment the default publisher reads its settings from; it is closed after."""
    env = {
        "RABBITKEYS_AMQP_URL": settings.amqp_url.get_secret_value(),
        "RABBITKEYS_NAMESPACE": settings.namespace,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    yield env
    rabbitkeys.close_default_publisher()


async def test_the_default_publisher_is_made_once_and_reused(
    settings: Settings, default_env: dict[str, str]
) -> None:
    handled = Handled()
    async with running_registry(settings), running_worker(settings, handled.app()):
        seen: list[SyncPublisher] = []

        def use_default(n: int) -> None:  # all threads at once: still one publisher
            rabbitkeys.publish(f"k{n}", {"n": n})
            seen.append(rabbitkeys.default_publisher())

        await asyncio.to_thread(in_threads, use_default, THREADS)
        assert len({id(p) for p in seen}) == 1
        [first] = set(seen)
        await eventually(lambda: handled.total() == THREADS)
        assert {p for ps in handled.publishers.values() for p in ps} == {first.publisher_id}

        # closed (by hand here; at exit otherwise), the next use makes a new one
        await asyncio.to_thread(first.close)
        await asyncio.to_thread(rabbitkeys.publish, "k0", {"n": 100})
        second = rabbitkeys.default_publisher()
        assert second is not first and second.running
        await eventually(lambda: handled.total() == THREADS + 1)


def _run_script(source: str, env: dict[str, str], tmp_path: Path) -> str:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    result = subprocess.run(
        [sys.executable, str(script)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.processes
async def test_a_script_that_exits_without_closing_has_its_messages_sent(
    settings: Settings, default_env: dict[str, str], tmp_path: Path
) -> None:
    handled = Handled()
    source = """
        import rabbitkeys
        publisher = rabbitkeys.default_publisher()
        for n in range(300):
            publisher.submit(f"k{n % 3}", {"n": n})  # not waited for: flushed at exit
        print(publisher.publisher_id)
    """
    async with running_registry(settings), running_worker(settings, handled.app()):
        out = await asyncio.to_thread(_run_script, source, default_env, tmp_path)
        await eventually(lambda: handled.total() >= 300, timeout=30)
    assert handled.total() == 300
    for k in range(3):
        assert [body["n"] for body in handled.bodies[f"k{k}"]] == list(range(k, 300, 3))
        assert handled.publishers[f"k{k}"] == {out.strip()}


@pytest.mark.processes
async def test_the_default_publisher_works_in_a_forked_child(
    settings: Settings, default_env: dict[str, str], tmp_path: Path
) -> None:
    """What gunicorn --preload does: the parent used the default publisher, then forks."""
    handled = Handled()
    source = """
        import os, sys
        import rabbitkeys
        rabbitkeys.publish("parent", "before the fork")
        parent = rabbitkeys.default_publisher()
        pid = os.fork()
        if pid == 0:
            try:
                parent.publish("parent", "from the child, through the parent's")
            except rabbitkeys.PublishError as exc:
                print("refused:", exc)
            rabbitkeys.publish("child", "in the child")
            print("child", rabbitkeys.default_publisher().publisher_id)
            sys.stdout.flush()
            sys.exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
        rabbitkeys.publish("parent", "after the fork")
        print("parent", parent.publisher_id, rabbitkeys.default_publisher() is parent)
    """
    async with running_registry(settings), running_worker(settings, handled.app()):
        out = await asyncio.to_thread(_run_script, source, default_env, tmp_path)
        await eventually(lambda: handled.total() >= 3, timeout=30)
    lines = out.splitlines()
    assert lines[0].startswith("refused: this SyncPublisher belongs to process"), out
    ids = dict(line.split()[:2] for line in lines[1:])
    assert lines[-1].endswith("True"), out  # the parent kept its own
    assert ids["child"] != ids["parent"]
    assert handled.bodies == {
        "parent": ["before the fork", "after the fork"],
        "child": ["in the child"],
    }
    assert handled.publishers == {"parent": {ids["parent"]}, "child": {ids["child"]}}
