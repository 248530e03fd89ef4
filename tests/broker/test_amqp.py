"""The small AMQP helpers of ``rabbitkeys._broker.amqp`` that need no broker: the task set,
sleeping unless stopping, and a channel's close bounded in time. (Channel opening is tested
against the broker in test_channels.)"""

from __future__ import annotations

import asyncio
import logging

import aiormq
import pytest

from rabbitkeys._broker import amqp as _amqp
from rabbitkeys._broker.amqp import CHANNEL_ERRORS, TaskSet, close_channel, sleep_unless

log = logging.getLogger("rabbitkeys.test")


async def test_sleep_unless_sleeps_out_the_delay_when_not_stopping() -> None:
    stopping = asyncio.Event()
    assert await sleep_unless(stopping, 0.01) is False


async def test_sleep_unless_ends_when_stopping_is_set() -> None:
    stopping = asyncio.Event()
    # an hour: only the event can end this sleep within the test's timeout
    sleeping = asyncio.ensure_future(sleep_unless(stopping, 3600))
    await asyncio.sleep(0)
    assert not sleeping.done()
    stopping.set()
    assert await asyncio.wait_for(sleeping, 30) is True


async def test_sleep_unless_returns_at_once_when_already_stopping() -> None:
    stopping = asyncio.Event()
    stopping.set()
    assert await asyncio.wait_for(sleep_unless(stopping, 3600), 30) is True


async def test_a_task_set_holds_its_tasks_until_they_end() -> None:
    tasks = TaskSet(log, "test task")
    release = asyncio.Event()
    task = tasks.spawn(release.wait())
    assert list(tasks) == [task] and len(tasks) == 1 and tasks
    release.set()
    await task
    await asyncio.sleep(0)  # done-callbacks run in the next loop iteration
    assert list(tasks) == [] and len(tasks) == 0 and not tasks


async def test_a_task_set_logs_a_failure_once_and_not_a_cancellation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tasks = TaskSet(log, "test task")

    async def fail() -> None:
        raise ValueError("boom")

    failing = tasks.spawn(fail())
    cancelled = tasks.spawn(asyncio.Event().wait())
    await asyncio.sleep(0)
    cancelled.cancel()
    with caplog.at_level(logging.ERROR, logger="rabbitkeys.test"):
        await asyncio.gather(failing, cancelled, return_exceptions=True)
        await asyncio.sleep(0)
    failures = [r for r in caplog.records if r.name == "rabbitkeys.test"]
    assert [r.getMessage() for r in failures] == ["test task failed"]
    assert failures[0].exc_info is not None
    assert isinstance(failures[0].exc_info[1], ValueError)
    assert len(tasks) == 0


async def test_log_failure_serves_a_task_held_elsewhere(caplog: pytest.LogCaptureFixture) -> None:
    tasks = TaskSet(log, "runner")

    async def fail() -> None:
        raise RuntimeError("lost")

    task = asyncio.ensure_future(fail())
    task.add_done_callback(tasks.log_failure)
    with caplog.at_level(logging.ERROR, logger="rabbitkeys.test"):
        with pytest.raises(RuntimeError):
            await task
        await asyncio.sleep(0)
    assert [r.getMessage() for r in caplog.records if r.name == "rabbitkeys.test"] == [
        "runner failed"
    ]
    assert len(tasks) == 0  # logged, not held


def test_channel_errors_cover_a_closed_channel_and_a_gone_connection() -> None:
    # ChannelInvalidStateError is a RuntimeError, not an AMQPError: both must be caught
    assert not issubclass(aiormq.exceptions.ChannelInvalidStateError, aiormq.exceptions.AMQPError)
    for error in (
        aiormq.exceptions.ChannelInvalidStateError("closed"),
        aiormq.exceptions.ChannelClosed(),
        aiormq.exceptions.ConnectionClosed(320, "gone"),
    ):
        assert isinstance(error, CHANNEL_ERRORS)


class ClosingChannel:
    """A channel whose close the broker confirms after ``confirm_after`` seconds (None:
    never, as a close can wait the heartbeat's 60 s for a quorum queue's new leader), or
    which fails with ``error``."""

    def __init__(self, confirm_after: float | None, error: Exception | None = None) -> None:
        self.confirm_after = confirm_after
        self.error = error
        self.is_closed = False
        self.closes = 0

    async def close(self) -> None:
        self.closes += 1
        if self.error is not None:
            raise self.error
        if self.confirm_after is None:
            await asyncio.Event().wait()
        await asyncio.sleep(self.confirm_after or 0)
        self.is_closed = True


async def test_a_channel_close_the_broker_does_not_confirm_ends_at_its_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_amqp, "CHANNEL_CLOSE_TIMEOUT", 0.05)
    unconfirmed = ClosingChannel(confirm_after=None)
    started = asyncio.get_running_loop().time()
    assert await asyncio.wait_for(close_channel(unconfirmed), 30) is False  # type: ignore[arg-type]
    assert asyncio.get_running_loop().time() - started < 5
    confirmed = ClosingChannel(confirm_after=0.0)
    assert await close_channel(confirmed) is True  # type: ignore[arg-type]
    assert await close_channel(confirmed) is True and confirmed.closes == 1  # type: ignore[arg-type]
    gone = ClosingChannel(None, aiormq.exceptions.ChannelInvalidStateError("closed"))
    assert await close_channel(gone) is False  # type: ignore[arg-type]


async def test_a_bounded_channel_close_lets_its_callers_cancellation_through() -> None:
    closing = asyncio.ensure_future(close_channel(ClosingChannel(None)))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing


class _StuckChannel:
    """A channel whose passive declares of ``stuck`` the broker does not answer (RabbitMQ
    4.0.5, a classic queue whose node is down: ~65 s); others answer at once."""

    def __init__(self, stuck: str) -> None:
        self.stuck = stuck
        self.declares: list[str] = []
        self.is_closed = False
        self.answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def queue_declare(self, queue: str, passive: bool) -> str:
        assert passive
        self.declares.append(queue)
        if queue == self.stuck:
            return await self.answer
        return f"ok {queue}"

    async def close(self) -> None:
        self.is_closed = True


class _Pool:
    def __init__(self, channel: _StuckChannel) -> None:
        self.channel = channel
        self.discarded: list[_StuckChannel] = []

    async def get(self) -> _StuckChannel:
        return self.channel

    def discard(self, channel: _StuckChannel) -> None:
        self.discarded.append(channel)


async def test_a_passive_declare_without_answer_is_unavailable_once_waited_for() -> None:
    channel = _StuckChannel("down")
    pool = _Pool(channel)
    checks = _amqp.QueueChecks(pool, timeout=0.05)  # type: ignore[arg-type]
    assert await checks.passive_declare("up") == "ok up"
    with pytest.raises(_amqp.QueueUnavailableError, match="'down' did not answer"):
        await checks.passive_declare("down")
    assert pool.discarded == [channel]  # the calls behind it would wait as long
    assert _amqp.queue_unavailable(_amqp.QueueUnavailableError("x"))
    # asked again while the broker still has not answered: no second declare, no wait
    started = asyncio.get_running_loop().time()
    with pytest.raises(_amqp.QueueUnavailableError):
        await checks.passive_declare("down")
    assert asyncio.get_running_loop().time() - started < 0.04
    assert channel.declares == ["up", "down"]
    # the broker answers at last: the channel it was stuck on is closed
    channel.answer.set_result("ok down")
    for _ in range(5):
        await asyncio.sleep(0)
    assert channel.is_closed


def test_both_brokers_texts_for_a_queue_whose_node_is_down_say_unavailable() -> None:
    for text in (
        "NOT_FOUND - home node 'rk2@localhost' of durable queue 'q' in vhost '/' is down or "
        "inaccessible",  # 3.10
        "NOT_FOUND - failed to perform operation on queue 'q' in vhost '/' due to timeout",  # 4.0
    ):
        assert _amqp.queue_unavailable(aiormq.exceptions.ChannelNotFoundEntity(text))
    gone = aiormq.exceptions.ChannelNotFoundEntity("NOT_FOUND - no queue 'q' in vhost '/'")
    assert not _amqp.queue_unavailable(gone)
