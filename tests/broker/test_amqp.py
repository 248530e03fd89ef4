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
    """A channel whose passive declares of queues named ``down...`` the broker does not
    answer (RabbitMQ 4.0.5, a classic queue whose node is down: ~65 s) until ``answer`` is
    set; others answer at once. One call at a time, as on an AMQP channel: a call behind a
    stuck one waits for it."""

    def __init__(self, answer: asyncio.Future[str]) -> None:
        self.answer = answer
        self.declares: list[str] = []
        self.is_closed = False
        self._one_call = asyncio.Lock()

    async def queue_declare(self, queue: str, passive: bool) -> str:
        assert passive
        async with self._one_call:
            self.declares.append(queue)
            if queue.startswith("down"):
                return f"{await self.answer} {queue}"
            return f"ok {queue}"

    async def close(self) -> None:
        self.is_closed = True


class _Broker:
    """What QueueChecks opens channels on: each channel a :class:`_StuckChannel`."""

    def __init__(self) -> None:
        self.channels: list[_StuckChannel] = []
        self.answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def open_channel(self, connection: object) -> _Broker:
        self.channels.append(_StuckChannel(self.answer))
        return self

    async def get_underlay_channel(self) -> _StuckChannel:
        return self.channels[-1]

    def declares(self) -> list[list[str]]:
        return [channel.declares for channel in self.channels]


@pytest.fixture
async def broker(monkeypatch: pytest.MonkeyPatch) -> _Broker:
    broker = _Broker()
    monkeypatch.setattr(_amqp, "open_channel", broker.open_channel)
    return broker


async def test_a_passive_declare_without_answer_is_unavailable_once_waited_for(
    broker: _Broker,
) -> None:
    checks = _amqp.QueueChecks(object(), timeout=0.05)  # type: ignore[arg-type]
    assert await checks.passive_declare("up") == "ok up"
    with pytest.raises(_amqp.QueueUnavailableError, match="'down' did not answer"):
        await checks.passive_declare("down")
    assert _amqp.queue_unavailable(_amqp.QueueUnavailableError("x"))
    # asked again while the broker still has not answered: no second declare, no wait
    started = asyncio.get_running_loop().time()
    with pytest.raises(_amqp.QueueUnavailableError):
        await checks.passive_declare("down")
    assert asyncio.get_running_loop().time() - started < 0.04
    assert broker.declares() == [["up", "down"]]  # the channel that answered, used again
    # another queue meanwhile: answered at once, on a channel of its own (behind the stuck
    # declare it would wait as long, and be found unavailable too)
    assert await checks.passive_declare("up") == "ok up"
    assert broker.declares() == [["up", "down"], ["up"]]
    # the broker answers at last: the channel it was stuck on is closed, not used again
    broker.answer.set_result("late")
    for _ in range(5):
        await asyncio.sleep(0)
    assert [channel.is_closed for channel in broker.channels] == [True, False]
    assert await checks.passive_declare("down") == "late down"  # a new check, answered
    assert broker.declares() == [["up", "down"], ["up", "down"]]


async def test_checks_of_queues_that_answer_are_not_held_up_by_stuck_ones(
    broker: _Broker,
) -> None:
    """Eight keys of a dead node and four of live ones checked at once, on at most four
    channels (a 4.0.5 cluster run found the live keys handed back with the dead ones): the
    live four answer as soon as a place is free, the dead eight each after its timeout."""
    checks = _amqp.QueueChecks(object(), timeout=0.2, channels=4)  # type: ignore[arg-type]
    queues = [f"down{i}" for i in range(8)] + [f"up{i}" for i in range(4)]
    results = await asyncio.gather(
        *(checks.passive_declare(queue) for queue in queues), return_exceptions=True
    )
    assert all(isinstance(r, _amqp.QueueUnavailableError) for r in results[:8])
    assert results[8:] == [f"ok up{i}" for i in range(4)]
    # no live queue's declare was sent behind a stuck one
    assert all(
        not any(q.startswith("up") for q in declares[i + 1 :])
        for declares in broker.declares()
        for i, q in enumerate(declares)
        if q.startswith("down")
    )
    broker.answer.set_result("late")


def test_both_brokers_texts_for_a_queue_whose_node_is_down_say_unavailable() -> None:
    for text in (
        "NOT_FOUND - home node 'rk2@localhost' of durable queue 'q' in vhost '/' is down or "
        "inaccessible",  # 3.10
        "NOT_FOUND - failed to perform operation on queue 'q' in vhost '/' due to timeout",  # 4.0
    ):
        assert _amqp.queue_unavailable(aiormq.exceptions.ChannelNotFoundEntity(text))
    gone = aiormq.exceptions.ChannelNotFoundEntity("NOT_FOUND - no queue 'q' in vhost '/'")
    assert not _amqp.queue_unavailable(gone)
