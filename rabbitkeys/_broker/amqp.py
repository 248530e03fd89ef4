"""Small AMQP helpers shared by the three roles: the one home of what a gone channel raises
(:data:`CHANNEL_ERRORS`), of opening channels (:func:`open_channel`, :func:`fresh_channel`,
:class:`ChannelPool`),
of background tasks a session spawns (:class:`TaskSet`), and of pausing a loop unless the
component is stopping (:func:`sleep_unless`).

Channels: a refused call (say PRECONDITION_FAILED) closes the channel it ran on; the pool
opens a new one in its place on the next call, so one bad key never stops the others.

Channel numbers: aiormq (7.2) frees the number of a channel the broker closed as soon as it
reads the broker's Channel.Close, and its Channel.CloseOk can be late, or lost: it is
dropped when the connection's 10-frame write queue is full. The broker keeps such a channel
open, and a channel opened with the same number makes it close the whole connection
("second 'channel.open' seen"; docs/probes/channel_number_reuse.py). Channels that may be
closed by the broker are therefore opened with numbers that cycle through a range of their
own, so a number comes back only after thousands of other channels. (Channels whose
CloseOk was lost stay open on the broker until the connection closes; were they ever to
reach channel_max, the broker closes the connection and rabbitkeys reconnects.)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import weakref
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection

log = logging.getLogger("rabbitkeys.amqp")

__all__ = [
    "CHANNEL_ERRORS",
    "ChannelPool",
    "QUEUE_ANSWER_TIMEOUT",
    "QueueChecks",
    "QueueUnavailableError",
    "TaskSet",
    "CHANNEL_CLOSE_TIMEOUT",
    "broker_version",
    "channel_max",
    "close_channel",
    "fresh_channel",
    "open_channel",
    "passive_declare_refusal",
    "queue_unavailable",
    "sleep_unless",
]

#: What a call on a channel raises once the channel or its connection is gone
#: (aiormq's ChannelInvalidStateError is a RuntimeError, not an AMQPError).
CHANNEL_ERRORS = (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError)

#: Seconds a channel's close waits for the broker's Channel.CloseOk. aiormq waits as long
#: as the connection's heartbeat (the broker's default: 60 s), and the broker answers a
#: close once the channel's queues have let its consumers go: on a cluster, a quorum queue
#: that lost its leader with a node cannot until it has a new one, and a worker letting go
#: of such a key held it for the whole 60 s (the likely cause of a key's one 60.8 s wait in
#: ``chaos --cluster`` with quorum queues). What the close is for happens on the broker
#: once it is sent (a closed channel's deliveries go back in place, and the key's next
#: single active consumer waits until they have), so the caller goes on.
CHANNEL_CLOSE_TIMEOUT = 5.0


#: Seconds a passive declare of an existing queue may take before the queue is taken as
#: unavailable (:class:`QueueChecks`). RabbitMQ 4.0.5 answers one of a classic queue whose
#: node is down only after ~65 s (NOT_FOUND "... due to timeout"); a queue that is there
#: answers in milliseconds, also behind a burst of declares.
QUEUE_ANSWER_TIMEOUT = 5.0
#: Passive declares that may run at once (:class:`QueueChecks`), each on a channel of its own.
QUEUE_CHECK_CHANNELS = 8

#: What the broker says of a queue that exists but cannot be reached (its cluster node is
#: down): 3.10 at once, "home node '…' of durable queue '…' is down or inaccessible"; 4.0
#: after ~65 s of retries, "failed to perform operation on queue '…' … due to timeout"
#: (docs/probes/classic_node_down.py).
_UNAVAILABLE_TEXTS = ("down or inaccessible", "due to timeout")


class QueueUnavailableError(Exception):
    """A queue did not answer a passive declare within :data:`QUEUE_ANSWER_TIMEOUT`."""


def queue_unavailable(error: BaseException) -> bool:
    """Whether ``error`` says a queue exists but cannot be reached: on a cluster, a classic
    queue whose node is down (see :data:`_UNAVAILABLE_TEXTS`, :class:`QueueUnavailableError`).
    Unlike a real NOT_FOUND, the queue and its messages come back with the node, so it must
    be waited for, never given up or declared anew."""
    if isinstance(error, QueueUnavailableError):
        return True
    return isinstance(error, aiormq.exceptions.ChannelNotFoundEntity) and any(
        text in str(error) for text in _UNAVAILABLE_TEXTS
    )


def passive_declare_refusal(what: str, error: aiormq.exceptions.ChannelAccessRefused) -> str:
    """One line saying why the broker refused a passive declare of ``what`` ("exchange
    'NS.membership'") and what to do. Up to RabbitMQ 4.2.5 a passive declare needs no
    permission; 4.2.6 and 4.3.0 ask configure (rabbitmq-server #16085), which no worker or
    publisher role has on the shared names it checks; 4.2.7 and 4.3.1 accept any permission
    on the name (#16272), which each role has on the names it checks (_permissions)."""
    return (
        f"the broker refused a passive declare of {what} ({error}): RabbitMQ 4.2.6 and 4.3.0 "
        f"ask configure permission for one (rabbitmq-server #16085); upgrade the broker to "
        f"4.2.7+ or 4.3.1+, or grant this user configure on that name (later versions "
        f"accept any permission on it: check the user has its role's, `rabbitkeys users`)"
    )


def broker_version(connection: AbstractConnection) -> tuple[int, int]:
    """The broker's major and minor version, from the server properties of ``connection``
    ((0, 0) if it does not say)."""
    properties = connection.transport.connection.server_properties  # type: ignore[union-attr]
    version = properties.get("version", b"") if properties else b""
    text = version.decode() if isinstance(version, bytes) else str(version)
    parts = text.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return 0, 0


def channel_max(connection: AbstractConnection) -> int:
    """How many channels ``connection`` may have open at once, as negotiated with the
    broker (RabbitMQ's default: 2047; 0 in the tune means no limit but the protocol's).
    The broker closes the whole connection when one more is opened."""
    tune = connection.transport.connection.connection_tune  # type: ignore[union-attr]
    return int(tune.channel_max) or 65_535


# aiormq numbers its own channels upwards from 1; ours live far above them.
_FIRST, _LAST = 32_768, 65_535
_counters: weakref.WeakKeyDictionary[AbstractConnection, itertools.cycle[int]] = (
    weakref.WeakKeyDictionary()
)


async def open_channel(
    connection: AbstractConnection, *, publisher_confirms: bool = False
) -> AbstractChannel:
    """A channel whose number was not used recently on this connection."""
    numbers = _counters.setdefault(connection, itertools.cycle(range(_FIRST, _LAST + 1)))
    for _ in range(_LAST - _FIRST + 1):
        number = next(numbers)
        try:
            channel = connection.channel(
                channel_number=number, publisher_confirms=publisher_confirms
            )
            await channel.initialize()
            return channel
        except ValueError:
            continue  # in use (a long-lived channel from the last lap)
    raise aiormq.exceptions.ChannelInvalidStateError("no free channel number")


class ChannelPool:
    """A few channels used round-robin for management calls (declare, bind, delete); a
    channel the broker closed is replaced on the next call."""

    def __init__(self, connection: AbstractConnection, size: int) -> None:
        self.connection = connection
        self._channels: list[aiormq.abc.AbstractChannel | None] = [None] * size
        # One opening per slot at a time: a burst of calls (a thousand new keys at once)
        # would otherwise each open a channel for the same empty slot, and all but the
        # last would stay open, unused, until the connection closes.
        self._opening = [asyncio.Lock() for _ in range(size)]
        self._turn = itertools.cycle(range(size))

    async def get(self) -> aiormq.abc.AbstractChannel:
        slot = next(self._turn)
        channel = self._channels[slot]
        if channel is None or channel.is_closed:
            async with self._opening[slot]:
                channel = self._channels[slot]
                if channel is None or channel.is_closed:
                    opened = await open_channel(self.connection)
                    channel = self._channels[slot] = await opened.get_underlay_channel()
        return channel


class QueueChecks:
    """Passive declares of queues that may be unavailable, answered within ``timeout``.

    RabbitMQ 4.0.5 keeps a passive declare of a classic queue whose node is down for ~65 s
    (and the channel with it) before it answers NOT_FOUND; 3.10 answers at once. A check that
    has no answer within ``timeout`` raises :class:`QueueUnavailableError`.

    Each check has a channel to itself while it runs: a channel carries one call at a time,
    so a check sent behind a stuck one would wait as long and be judged unavailable too
    (seen on a 4.0.5 cluster: the keys of the live nodes handed back with those of the dead
    one, behind their declares on four shared channels). At most ``channels`` checks run at
    once; a check waits for a free channel before its ``timeout`` starts (the wait is not the
    queue's doing). A channel that answered goes back for the next check; one stuck past the
    timeout frees its place at once and is closed when the broker answers at last. One check
    per queue runs at a time: a later check of the same queue waits for it (or, once it is
    past the timeout, fails at once), so a down queue asked about every second holds one
    channel, not one per ask, and costs no second wait."""

    def __init__(
        self,
        connection: AbstractConnection,
        timeout: float = QUEUE_ANSWER_TIMEOUT,
        channels: int = QUEUE_CHECK_CHANNELS,
    ) -> None:
        self._connection = connection
        self._timeout = timeout
        self._places = asyncio.Semaphore(channels)
        #: channels whose last check was answered, for the next ones
        self._idle: list[aiormq.abc.AbstractChannel] = []
        #: queue -> the check running for it
        self._running: dict[str, _Check] = {}
        self._tasks = TaskSet(log, "a queue check")

    async def passive_declare(self, queue: str) -> Any:
        """The queue's DeclareOk; the broker's error (a real NOT_FOUND, say), or
        :class:`QueueUnavailableError` past the timeout."""
        check = self._running.get(queue)
        if check is None:
            check = self._running[queue] = _Check(asyncio.get_running_loop().create_future())
            self._tasks.spawn(self._run(queue, check))
        elif check.stuck:  # past the timeout already: no second wait
            raise self._unavailable(queue)
        await check.sent.wait()
        try:
            async with asyncio.timeout(self._timeout):
                return await asyncio.shield(check.answer)
        except TimeoutError:
            if not check.answer.done() and not check.stuck:
                check.stuck = True
                self._places.release()  # the next checks get channels of their own
            raise self._unavailable(queue) from None

    async def _run(self, queue: str, check: _Check) -> None:
        """Send ``queue``'s declare on a channel of its own, and settle ``check``."""
        try:
            await self._places.acquire()
        except asyncio.CancelledError:
            self._end(queue, check)
            raise
        channel: aiormq.abc.AbstractChannel | None = None
        try:
            channel = await self._channel()
            check.sent.set()  # its timeout starts: the channel is its own
            _settle(check.answer, await channel.queue_declare(queue, passive=True))
        except Exception as exc:  # the callers get it: NOT_FOUND, a lost channel...
            _settle(check.answer, exc)
        finally:
            self._end(queue, check)
            if check.stuck:  # its place was freed at the timeout
                if channel is not None:
                    await close_channel(channel)
            else:
                self._places.release()
                if channel is not None and not channel.is_closed:
                    self._idle.append(channel)

    def _end(self, queue: str, check: _Check) -> None:
        if self._running.get(queue) is check:
            del self._running[queue]
        if not check.answer.done():  # cancelled before an answer: so are its waiters
            check.answer.cancel()
        check.sent.set()

    async def _channel(self) -> aiormq.abc.AbstractChannel:
        while self._idle:
            channel = self._idle.pop()
            if not channel.is_closed:  # a NOT_FOUND closes it; so does a lost connection
                return channel
        opened = await open_channel(self._connection)
        return await opened.get_underlay_channel()

    def _unavailable(self, queue: str) -> QueueUnavailableError:
        return QueueUnavailableError(
            f"queue {queue!r} did not answer a passive declare within {self._timeout:g}s "
            f"(on a cluster: its node is down)"
        )


class _Check:
    """One queue's passive declare: sent yet, its answer, stuck past the timeout."""

    __slots__ = ("answer", "sent", "stuck")

    def __init__(self, answer: asyncio.Future[Any]) -> None:
        self.answer = answer
        self.sent = asyncio.Event()
        self.stuck = False


def _settle(answer: asyncio.Future[Any], outcome: Any) -> None:
    if answer.done():
        return
    if isinstance(outcome, BaseException):
        answer.set_exception(outcome)
        answer.exception()  # retrieved: its waiters raise it, or none waits any more
    else:
        answer.set_result(outcome)


class TaskSet:
    """The tasks a component spawns and nobody awaits: held until they end (asyncio keeps
    only a weak reference to a running task), each failure logged as ``"<what> failed"``
    (else it would surface, if ever, when the task is garbage-collected)."""

    def __init__(self, log: logging.Logger, what: str) -> None:
        self._log = log
        self._what = what
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(self.log_failure)
        return task

    def log_failure(self, task: asyncio.Task[Any]) -> None:
        """A done-callback, also for a task held elsewhere: logs its exception, if any."""
        if not task.cancelled() and (error := task.exception()) is not None:
            self._log.error("%s failed", self._what, exc_info=error)

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(list(self._tasks))

    def __len__(self) -> int:
        return len(self._tasks)


async def sleep_unless(stopping: asyncio.Event, delay: float) -> bool:
    """Sleep ``delay`` seconds, less if ``stopping`` is set meanwhile; whether it is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopping.wait(), delay)
    return stopping.is_set()


async def close_channel(channel: AbstractChannel | aiormq.abc.AbstractChannel) -> bool:
    """Close ``channel`` unless it is closed; whether the broker confirmed it within
    :data:`CHANNEL_CLOSE_TIMEOUT` (False also when the channel or its connection went away:
    then the broker closes it). Its number stays taken until a late CloseOk, if any."""
    if channel.is_closed:
        return True
    try:
        async with asyncio.timeout(CHANNEL_CLOSE_TIMEOUT):
            await channel.close()
    except TimeoutError:
        log.warning(
            "the broker did not confirm a channel's close within %gs; going on",
            CHANNEL_CLOSE_TIMEOUT,
        )
        return False
    except CHANNEL_ERRORS:
        return False
    return True


@contextlib.asynccontextmanager
async def fresh_channel(
    connection: AbstractConnection,
) -> AsyncIterator[aiormq.abc.AbstractChannel]:
    """A channel of its own, for calls whose error must not fail anyone else's."""
    # the broker closes it on NOT_FOUND / RESOURCE_LOCKED: a number of its own
    channel = await open_channel(connection)
    try:
        yield await channel.get_underlay_channel()
    finally:
        await close_channel(channel)
