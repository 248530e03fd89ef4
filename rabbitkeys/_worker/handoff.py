"""A worker's hold on its keys: the one home of taking a key (check its queue, consume), of the
key's buffer and runner, and of letting it go without reordering it. Each key the worker
holds is an :class:`OwnedKey` in a named :class:`HoldState`; :meth:`OwnedKey.move` is the one
place a state changes, and refuses a change the table :data:`TRANSITIONS` does not list.

Each key is a consumer of its own queue with a small prefetch (``prefetch`` deliveries held
per key). Deliveries of a key land in that key's buffer, in delivery order, and one runner
task per key hands them to the executor (:mod:`.execution`) one after the other.

Letting go of a key (a rebalance, a retirement, a shutdown, the broker cancelling our
consumer) never breaks its order, and the next owner starts only after this one has let go
(see docs/internals/worker.md, "Handoff"):

1. the runner finishes the delivery it is handling (every job of a batch) and acks it;
2. the consumer stops: deliveries already on their way land in the buffer;
3. what the buffer holds (delivered, never started) goes back to the queue, each message in
   its original place, with a round trip after it;
4. only then does the worker report the key released; the registry assigns it elsewhere.

Steps 2 and 3 depend on the queue type (RabbitMQ 3.10.8). A classic queue puts a message
rejected with requeue back in its place: classic keys share the session's consume channel
(and its cap over all keys); their consumer is cancelled and their buffer rejected in order.
A quorum queue puts a message rejected, or delivered as the cancel crosses it, after its
consumer's cancel at its *back*, behind the ones still ready there; a channel's close puts
every delivery it had unacked back in its place (docs/probes/redrive_rotation.py,
docs/probes/quorum_let_go.py). So each quorum key is consumed on a channel of its own, and
let go by closing that channel: no cancel, no reject; the close-ok is the round trip. A
quorum worker holds at most as many keys as its connection has channels left
(``channel_max``): a key beyond that is handed back, as a key whose consume fails.

A key whose head failed its last attempt under the ``park`` policy (the executor's
:class:`~.execution.Park`) is let go the same way, by its runner, with one difference: the
head was not acked, and goes back with the rest (rejected first, on a classic queue), so it
is back at the head of the queue. The worker then reports the key parked (``KeyParked``),
before its ``Released``.

There is no standby consumer: on RabbitMQ before 3.10.13 a single-active-consumer switch to
a standby can crash the queue (docs/probes/sac_switch_crashes_queue.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import shlex
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

import aiormq
from aiormq.abc import DeliveredMessage

from .._broker.amqp import (
    CHANNEL_ERRORS,
    ChannelPool,
    QueueChecks,
    TaskSet,
    channel_max,
    close_channel,
    open_channel,
    passive_declare_refusal,
    queue_unavailable,
    sleep_unless,
)
from .._observe.metrics import WorkerMetrics
from .._settings import Settings
from .._wire.protocol import KeyAssignment
from .dedup import SequenceHistory
from .execution import Executor, Outcome, Park

__all__ = ["TRANSITIONS", "Handoff", "HoldState", "OwnedKey"]

log = logging.getLogger("rabbitkeys.worker")

# How many let-go keys' dedup histories a worker keeps: as much memory as this many more
# held keys' histories at most. A history only holds jobs this worker handled, so an old
# one is never wrong about a job, whatever other workers did with the key meanwhile.
#: the longest pause before giving back, again, a key whose queue's node is down
_UNAVAILABLE_PAUSE_MAX = 3.0
_FORMER_HISTORIES = 1024
#: Releases whose cancel and requeue are on the shared consume channel at once. A channel
#: carries one call at a time, in turn: the retirement of a thousand idle keys at once put a
#: thousand cancels ahead of a new key's consume, whose first job then waited 25-50 s at the
#: 99th percentile (docs/benchmarks.md, "Issue 25: new keys while idle keys retire").
_RELEASES_AT_ONCE = 4
#: channels a session keeps for itself out of its connection's ``channel_max`` (control,
#: dead letters, consume, declares), with a margin for channels the broker still counts
#: after we saw them closed (a lost close-ok): quorum keys get one each out of the rest
SESSION_CHANNELS = 32


class NoChannelLeft(Exception):
    """The connection has no channel left for one more quorum key: hand the key back."""


class HoldState(enum.Enum):
    """Where a worker's hold on one key stands. Declaring the queue comes before: until
    it is declared, the key is not held."""

    #: consume sent, consume-ok not yet back; deliveries may already arrive and are run
    ACQUIRING = "acquiring"
    #: consumed: deliveries land in the buffer and the runner hands them on one by one
    CONSUMING = "consuming"
    #: letting go (a Release, the drain, the broker cancelled our consumer): the runner
    #: stops after the message it is handling; no new runner starts
    RELEASING = "releasing"
    #: let go, or lost with the session's channel; out of the worker's book for good
    RELEASED = "released"

    @property
    def held(self) -> bool:
        """Ours to run and to report in a join (not on its way out)."""
        return self in (HoldState.ACQUIRING, HoldState.CONSUMING)


#: The changes a hold may go through. Any state can end in RELEASED with its session (the
#: channel is gone; the broker requeues what the hold had, in order).
TRANSITIONS: dict[HoldState, frozenset[HoldState]] = {
    HoldState.ACQUIRING: frozenset({HoldState.CONSUMING, HoldState.RELEASED}),
    HoldState.CONSUMING: frozenset({HoldState.RELEASING, HoldState.RELEASED}),
    HoldState.RELEASING: frozenset({HoldState.RELEASED}),
    HoldState.RELEASED: frozenset(),
}


@dataclass(eq=False)
class OwnedKey:
    """A key this worker holds, from its consume to its release."""

    assignment: KeyAssignment
    state: HoldState = HoldState.ACQUIRING
    consumer_tag: str | None = None
    #: the channel its consumer is on: the session's consume channel (classic), or one of
    #: its own (quorum: closed to let the key go)
    channel: aiormq.Channel | None = None
    #: delivered and not yet acked, in delivery order; the head is the one being handled
    buffer: deque[DeliveredMessage] = field(default_factory=deque)
    runner: asyncio.Task[None] | None = None
    last_activity: float = field(default_factory=time.monotonic)
    idle_reported_at: float = 0.0
    history: SequenceHistory = field(default_factory=SequenceHistory)
    #: its head failed its last attempt under the park policy: its runner stopped, and the
    #: key is being let go with the head put back first
    parked: Park | None = None
    #: the deliveries its consumer may hold, out of the worker's :class:`PrefetchBudget`
    #: (0 where the broker caps the worker: a global qos)
    prefetch: int = 0

    @property
    def key_id(self) -> str:
        return self.assignment.key_id

    @property
    def runs(self) -> bool:
        """Whether its runner may hand deliveries on: held, and not parked."""
        return self.state.held and self.parked is None

    def move(self, to: HoldState) -> None:
        """The one place a hold changes state."""
        if to not in TRANSITIONS[self.state]:
            raise RuntimeError(f"key {self.key_id}: no transition {self.state.name} -> {to.name}")
        self.state = to


@dataclass
class PrefetchBudget:
    """The worker-wide cap (``RABBITKEYS_MAX_BUFFERED_MESSAGES``) where the broker cannot
    keep it. RabbitMQ 3.x keeps it for classic keys with a global qos shared by the
    consume channel's consumers; quorum queues refuse a global qos, and RabbitMQ 4.3 (4.0
    with ``deprecated_features.permit.global_qos = false``) reads it as each consumer's
    prefetch: the cap would become every key's prefetch (measured on 4.0.5:
    docs/probes/global_qos_cap.py). There, each key's consumer gets its prefetch out of
    the cap instead: the full per-key prefetch while the cap has room, else what is left,
    and never less than one (a key must be consumed, or it waits for ever and its queue
    expires). A worker holds at most the cap while its keys fit in it, and one delivery
    per key beyond; a key let go gives its share back."""

    cap: int
    per_key: int
    used: int = 0

    def take(self) -> int:
        granted = min(self.per_key, max(1, self.cap - self.used))
        self.used += granted
        return granted

    def give_back(self, granted: int) -> None:
        self.used -= granted


class Handoff:
    """Takes and lets go of a worker's keys. Lives as long as the worker; :meth:`begin`
    gives it each session's consume channel, :meth:`end` drops the holds of a session
    that is over. ``report`` tells the registry which keys the worker let go; ``parked``,
    which key it parked (before that key's ``report``)."""

    def __init__(
        self,
        settings: Settings,
        executor: Executor,
        metrics: WorkerMetrics,
        tasks: TaskSet,
        stopping: asyncio.Event,
        report: Callable[[list[KeyAssignment]], Awaitable[None]],
        *,
        parked: Callable[[KeyAssignment, Park], Awaitable[None]] | None = None,
    ) -> None:
        self._settings = settings
        self._executor = executor
        self._metrics = metrics
        self._tasks = tasks
        self._stopping = stopping
        self._report = report
        self._report_parked = parked
        #: the keys held now, in any state but RELEASED
        self._book: dict[str, OwnedKey] = {}
        self._key_locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}
        self._consume: aiormq.Channel | None = None
        self._declares: ChannelPool | None = None
        self._checks: QueueChecks | None = None
        #: quorum keys are consumed each on a channel of its own (the module docstring)
        self._channel_per_key = settings.queue_type == "quorum"
        #: the quorum keys of this session that have a channel of their own (open, or
        #: being opened), out of at most ``_channel_limit``
        self._key_channels: set[OwnedKey] = set()
        self._channel_limit = 0
        #: whether the broker caps the consume channel (a global qos, classic keys on
        #: RabbitMQ 3.x); else each key's prefetch comes out of ``_budget``
        self._global_cap = False
        self._budget = PrefetchBudget(settings.buffered_messages_cap, settings.prefetch)
        #: on the shared consume channel a qos applies to the consumers made after it: a
        #: key's qos and its consume go together, one key at a time
        self._consume_lock = asyncio.Lock()
        self._releasing = asyncio.Semaphore(_RELEASES_AT_ONCE)
        self._lost = asyncio.Event()
        #: the dedup histories of keys let go of lately, most recent last: a key that comes
        #: back to this worker (its session started over, a rebalance undone) still knows
        #: the jobs it handled, and skips them in a redelivered batch
        self._former_histories: OrderedDict[str, SequenceHistory] = OrderedDict()
        #: keys whose queue was found unavailable (its node down), by times in a row
        self._unavailable: dict[str, int] = {}
        #: deliveries run to their end and acked, over all sessions
        self.handled = 0
        #: keys parked (let go with their failed head put back), over all sessions
        self.parked = 0
        #: keys whose queue was checked (a passive declare) before consuming it, and keys
        #: consumed unchecked because the registry had just declared them
        #: (``KeyAssignment.fresh``), over all sessions
        self.queues_checked = 0
        self.checks_skipped = 0

    def begin(
        self,
        consume: aiormq.Channel,
        declares: ChannelPool,
        lost: asyncio.Event,
        *,
        global_cap: bool,
    ) -> None:
        """A new session: keys are consumed on ``consume``; ``lost`` is set when a delivery
        cannot be settled (the session must start over). ``global_cap``: ``consume`` has
        the worker-wide cap as a global qos (classic keys, RabbitMQ 3.x)."""
        self._consume = consume
        self._global_cap = global_cap and not self._channel_per_key
        self._budget = PrefetchBudget(self._settings.buffered_messages_cap, self._settings.prefetch)
        self._declares = declares
        self._checks = QueueChecks(declares.connection)
        self._lost = lost
        consume.on_consumer_cancel_callbacks.add(self._on_broker_cancel)
        self._key_channels = set()
        self._channel_limit = channel_max(declares.connection) - SESSION_CHANNELS

    def end(self) -> None:
        """The session is over (its runners are done): every hold went with its channel. The
        keys' own channels close with the session's connection, which its caller closes
        (the broker puts back what they held, in order)."""
        for owned in list(self._book.values()):
            self._drop(owned)
        self._key_channels = set()

    def holds(self) -> list[OwnedKey]:
        return list(self._book.values())

    def holding(self, key_id: str) -> bool:
        """Whether the key is held now (not on its way out)."""
        owned = self._book.get(key_id)
        return owned is not None and owned.state.held

    def runners(self) -> list[asyncio.Task[None]]:
        return [owned.runner for owned in self._book.values() if owned.runner is not None]

    def _drop(self, owned: OwnedKey) -> None:
        """RELEASED and out of the book: the two go together."""
        owned.move(HoldState.RELEASED)
        if self._book.get(owned.key_id) is owned:
            del self._book[owned.key_id]
        if owned.prefetch:
            self._budget.give_back(owned.prefetch)
            owned.prefetch = 0
        if owned.history:
            former = self._former_histories
            former[owned.key_id] = owned.history
            former.move_to_end(owned.key_id)
            if len(former) > _FORMER_HISTORIES:
                former.popitem(last=False)

    @contextlib.asynccontextmanager
    async def _key_lock(self, key_id: str) -> AsyncIterator[None]:
        """Commands for one key run one after the other, in the order they came. The lock
        is dropped when nobody holds or waits for it, so key churn does not grow memory."""
        entry = self._key_locks.get(key_id)
        if entry is None:
            entry = self._key_locks[key_id] = (asyncio.Lock(), [0])
        lock, users = entry
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._key_locks[key_id]

    # --- taking a key -------------------------------------------------------------------

    async def acquire(self, assignment: KeyAssignment) -> None:
        key_id = assignment.key_id
        async with self._key_lock(key_id):
            owned = self._book.get(key_id)
            if owned is not None:
                if owned.state is HoldState.RELEASING:
                    return  # the broker cancelled it: its release reports it, then it comes back
                if self._consuming(owned):
                    owned.assignment = assignment  # a new routing key after a rebind
                    return
                # its consumer is gone: settle what it held before consuming afresh, so
                # two runners never share the key
                await self._let_go(owned)
                if owned.parked is not None:
                    # reported parked: the registry must hear it released, not see it taken
                    await self._report([owned.assignment])
                    return
            if self._stopping.is_set():
                return
            assert self._declares is not None and self._consume is not None
            # Only the registry declares key queues (a worker may not: the right to declare
            # is the right to delete). A passive declare first means a consume never hits a
            # missing queue, which would close the channel every key is consumed on; it
            # also renews the queue's x-expires lease until the consume takes over. A key
            # the registry has just declared (``fresh``: it had the declare-ok when it sent
            # the assignment, and only it deletes key queues, never an owned key) is
            # consumed at once: a new key costs one round trip here, not two.
            if assignment.fresh:
                self.checks_skipped += 1
            else:
                self.queues_checked += 1
                problem = await self._check_queue(assignment.queue)
                if problem is not None:
                    self._tasks.spawn(self._give_back(assignment, problem))
                    return
            if self._stopping.is_set():
                return  # stop() came while we declared: we must not consume after leaving
            owned = self._book[key_id] = OwnedKey(assignment)
            if not self._global_cap:
                owned.prefetch = self._budget.take()
            try:
                channel = await self._channel_for(owned)
                ok = await self._start_consumer(channel, owned)
            except Exception as exc:
                # A channel error on the shared consume channel: it is gone and the session
                # starts over. Else (a key's own channel, no channel left, another error)
                # the key was never ours: hand it back.
                shared = owned not in self._key_channels
                await self._close_key_channel(owned)
                self._drop(owned)
                if isinstance(exc, NoChannelLeft):
                    self._tasks.spawn(self._give_back(assignment, str(exc)))
                elif shared and isinstance(exc, CHANNEL_ERRORS):
                    log.error("cannot consume key %s: %r", key_id, exc)
                else:
                    self._tasks.spawn(self._give_back(assignment, f"cannot be consumed ({exc!r})"))
                return
            owned.consumer_tag = ok.consumer_tag
            owned.move(HoldState.CONSUMING)
            if self._unavailable.pop(key_id, None) is not None:
                log.warning("key %s: its queue is available again; consuming it", key_id)

    async def _channel_for(self, owned: OwnedKey) -> aiormq.Channel:
        """The channel to consume ``owned`` on: the session's consume channel, or for a
        quorum key a channel of its own with the per-key prefetch, if the connection has
        one left (else :class:`NoChannelLeft`). One the broker closes lets the key go
        (:meth:`_on_key_channel_closed`), and the session goes on."""
        if not self._channel_per_key:
            assert self._consume is not None
            owned.channel = self._consume
            return owned.channel
        if len(self._key_channels) >= self._channel_limit:
            raise NoChannelLeft(
                f"cannot be consumed: this worker holds {len(self._key_channels)} quorum "
                f"keys, one channel each, all its connection may open besides its own "
                f"(channel_max {self._channel_limit + SESSION_CHANNELS}); run more workers, "
                f"or raise channel_max on the broker"
            )
        # counted before the await: keys taken concurrently must not overshoot the limit
        self._key_channels.add(owned)
        assert self._declares is not None
        opened = await open_channel(self._declares.connection)
        channel = owned.channel = cast(aiormq.Channel, await opened.get_underlay_channel())
        channel.on_consumer_cancel_callbacks.add(self._on_broker_cancel)
        channel.closing.add_done_callback(partial(self._on_key_channel_closed, owned))
        await channel.basic_qos(prefetch_count=owned.prefetch or self._settings.prefetch)
        return channel

    async def _start_consumer(self, channel: aiormq.Channel, owned: OwnedKey) -> Any:
        """Consume ``owned`` on ``channel`` (its own, or the shared one) with its prefetch."""
        on_delivery = partial(self._on_delivery, owned)
        queue = owned.assignment.queue
        if channel is not self._consume or self._global_cap:
            return await channel.basic_consume(queue, on_delivery)
        async with self._consume_lock:
            await channel.basic_qos(prefetch_count=owned.prefetch)
            return await channel.basic_consume(queue, on_delivery)

    async def _check_queue(self, queue: str) -> str | None:
        """None if ``queue`` can be consumed now, else why not: it does not exist, or (on a
        cluster) it is unavailable, its node down; the registry assigns it again after the
        pause of :meth:`_give_back`, so the key resumes once its node is back."""
        assert self._checks is not None
        try:
            # bounded: RabbitMQ 4.0 answers a passive declare of a classic queue whose node
            # is down only after ~65 s (QueueChecks)
            await self._checks.passive_declare(queue)
        except Exception as exc:  # NOT_FOUND, or the channel is gone: not a queue to consume now
            if queue_unavailable(exc):
                return "is unavailable (its node is down)"
            if isinstance(exc, aiormq.exceptions.ChannelAccessRefused):
                # RabbitMQ 4.2.6 / 4.3.0: the check is kept (it keeps a missing queue from
                # closing the shared consume channel, and renews the lease): say why it fails
                return "cannot be checked: " + passive_declare_refusal(f"queue {queue!r}", exc)
            return f"cannot be consumed ({type(exc).__name__})"
        return None

    async def _give_back(self, assignment: KeyAssignment, problem: str) -> None:
        """Tell the registry we do not consume a key it assigned us. After a pause: it may
        assign it to us again at once, and the failure must not turn into a busy loop. A
        queue whose node is down is given back again and again until the node returns: the
        pause doubles each time (to :data:`_UNAVAILABLE_PAUSE_MAX`), and only the first
        time is logged as a warning."""
        key_id = assignment.key_id
        pause = self._settings.heartbeat_interval
        if "unavailable" in problem:
            times = self._unavailable[key_id] = self._unavailable.get(key_id, 0) + 1
            pause = min(_UNAVAILABLE_PAUSE_MAX, pause * 2 ** (times - 1))
            level = logging.WARNING if times == 1 else logging.DEBUG
        else:
            level = logging.ERROR
        queue = assignment.queue
        log.log(level, "key %s: its queue %s %s; handing it back", key_id, queue, problem)
        await sleep_unless(self._stopping, pause)
        await self._report([assignment])

    def _consuming(self, owned: OwnedKey) -> bool:
        channel = owned.channel
        return (
            owned.state is HoldState.CONSUMING
            and owned.consumer_tag is not None
            and channel is not None
            and not channel.is_closed
            and owned.consumer_tag in channel.consumers
        )

    # --- deliveries ---------------------------------------------------------------------

    async def _on_delivery(self, owned: OwnedKey, delivery: DeliveredMessage) -> None:
        if owned.state is HoldState.RELEASED:
            # Arrived after we let go of the key (should not happen: see Worker._start on the
            # consume channel). Hand it straight back rather than sit on it and block the key.
            channel = owned.channel
            if channel is not None and not channel.is_closed:
                await channel.basic_reject(_tag(delivery), requeue=True)
            return
        # No await before this append: deliveries enter the buffer in delivery order.
        owned.buffer.append(delivery)
        owned.last_activity = time.monotonic()
        if owned.runner is None and owned.runs:
            owned.runner = asyncio.ensure_future(self._run(owned))
            owned.runner.add_done_callback(self._tasks.log_failure)

    async def _run(self, owned: OwnedKey) -> None:
        """Hand the key's buffered deliveries to the executor one at a time, oldest first,
        while the key is held."""
        if self._former_histories:
            former = self._former_histories.pop(owned.key_id, None)
            if former is not None and not owned.history:  # the key is back before any job ran
                owned.history = former
        try:
            while owned.buffer and owned.runs:
                delivery = owned.buffer[0]
                outcome = await self._executor.execute(owned.assignment, owned.history, delivery)
                if outcome is not Outcome.DONE:
                    if isinstance(outcome, Park):
                        # the head stays unacked, at buffer[0]: the let-go puts it back first
                        owned.parked = outcome
                        self._tasks.spawn(self._let_go_parked(owned))
                    # else shutting down mid-retry: released (requeued) by the drain
                    return
                assert owned.channel is not None
                # no drain wait: acks leave in order on the channel anyway, and waiting for
                # the socket write per message halved throughput (docs/benchmarks.md)
                await owned.channel.basic_ack(_tag(delivery), wait=False)
                owned.buffer.popleft()
                self.handled += 1
                owned.last_activity = time.monotonic()
        except Exception:
            if self._own_channel_closed(owned):
                # the broker closed the key's own channel and took back what it held, in
                # order: the key is let go (_on_key_channel_closed), the session goes on
                log.warning("key %s: its channel closed before a delivery was acked", owned.key_id)
                return
            # The channel is gone, or the dead-letter copy could not be made: we cannot
            # settle this delivery. Start over: the broker requeues all we held, in order.
            log.exception("key %s: cannot settle a delivery; reconnecting", owned.key_id)
            self._lost.set()
        finally:
            owned.runner = None

    # --- letting go ---------------------------------------------------------------------

    async def release_and_report(self, key_ids: list[str]) -> None:
        released = await asyncio.gather(
            *(self.release(key_id) for key_id in key_ids), return_exceptions=True
        )
        keys = [assignment for assignment in released if isinstance(assignment, KeyAssignment)]
        if keys:
            await self._report(keys)

    async def release(self, key_id: str) -> KeyAssignment | None:
        """Let go of a key without reordering it; what it was, if it was held."""
        async with self._key_lock(key_id):
            owned = self._book.get(key_id)
            if owned is None:
                return None
            await self._let_go(owned)
            return owned.assignment

    async def _let_go_parked(self, owned: OwnedKey) -> None:
        """Let go of a key its runner parked, and report it released (after its park)."""
        async with self._key_lock(owned.key_id):
            if self._book.get(owned.key_id) is not owned:
                return  # let go already: a Release, the drain, or the session's end came first
            await self._let_go(owned)
        await self._report([owned.assignment])

    async def _let_go(self, owned: OwnedKey) -> None:
        """The four steps in the module docstring; the caller holds the key's lock. A
        parked key's head is the buffer's first delivery (never acked): it goes back first."""
        if owned.state is not HoldState.RELEASING:
            owned.move(HoldState.RELEASING)
        started = time.perf_counter()
        if owned.runner is not None:
            await asyncio.wait([owned.runner])
        if owned in self._key_channels:
            await self._close_key_channel(owned)
        else:
            async with self._releasing:
                await self._cancel(owned)
                await self._requeue_buffer(owned)
        self._drop(owned)
        self._metrics.keys_released.inc()
        self._metrics.release_duration.observe(time.perf_counter() - started)
        if owned.parked is not None:
            await self._tell_parked(owned.assignment, owned.parked)

    async def _tell_parked(self, assignment: KeyAssignment, park: Park) -> None:
        """Count, log and report a key let go with its failed head put back."""
        self.parked += 1
        self._metrics.parked.inc()
        job_type, key = shlex.quote(assignment.job_type), shlex.quote(assignment.key)
        log.error(
            "key %s parked: its head%s failed %d attempt(s), last: %s. Its messages wait in "
            "its queue, in order. Retry the head with `rabbitkeys resume %s %s`, or "
            "dead-letter it and go on with `rabbitkeys skip %s %s`",
            assignment.key_id,
            f" (job {park.job_index} of its batch)" if park.job_index else "",
            park.attempts,
            park.error,
            job_type,
            key,
            job_type,
            key,
        )
        if self._report_parked is not None:
            await self._report_parked(assignment, park)

    async def _cancel(self, owned: OwnedKey) -> None:
        tag, owned.consumer_tag = owned.consumer_tag, None
        channel = owned.channel
        if tag is None or channel is None or channel.is_closed:
            return
        with contextlib.suppress(*CHANNEL_ERRORS):
            await channel.basic_cancel(tag)

    async def _requeue_buffer(self, owned: OwnedKey) -> None:
        """Step 3 on the shared consume channel (classic keys), after the cancel: reject
        with requeue, in order, which puts each message back in its place on a classic
        queue."""
        channel = owned.channel
        if not owned.buffer or channel is None or channel.is_closed:
            owned.buffer.clear()
            return
        with contextlib.suppress(*CHANNEL_ERRORS):
            while owned.buffer:
                delivery = owned.buffer.popleft()
                await channel.basic_reject(_tag(delivery), requeue=True)
            # A round trip on the same channel: the broker has taken the rejects in before
            # we tell the registry (and so the next owner) that the key is free. The
            # channel-wide cap again: a per-consumer qos here would lift it. Without it,
            # a per-consumer qos, under the lock that pairs each key's qos and consume.
            if self._global_cap:
                await channel.basic_qos(
                    prefetch_count=self._settings.buffered_messages_cap, global_=True
                )
            else:
                async with self._consume_lock:
                    await channel.basic_qos(prefetch_count=self._settings.prefetch)

    async def _close_key_channel(self, owned: OwnedKey) -> None:
        """Steps 2 and 3 on a quorum key's own channel: close it, with no cancel and no
        reject before. The broker puts every delivery the channel had unacked back in its
        place, in order: also the one it sent as our last ack freed room, which a cancel
        would cross and put at the back of the queue (docs/probes/quorum_let_go.py). The
        close-ok is the round trip. The connection has one more channel free for a key
        afterwards."""
        if owned not in self._key_channels:
            return
        self._key_channels.discard(owned)
        owned.buffer.clear()
        if owned.channel is not None:
            # bounded: during a quorum leader election the CloseOk can take the heartbeat's
            # 60 s, and the key would wait as long (_broker.amqp.CHANNEL_CLOSE_TIMEOUT)
            await close_channel(owned.channel)

    def _on_broker_cancel(self, frame: Any) -> None:
        """The broker dropped one of our consumers (its queue was deleted or crashed)."""
        for owned in list(self._book.values()):
            if owned.consumer_tag == frame.consumer_tag:
                owned.consumer_tag = None  # nothing left for our own cancel to do
                self._lose(owned, "the broker cancelled our consumer")

    def _own_channel_closed(self, owned: OwnedKey) -> bool:
        return owned in self._key_channels and owned.channel is not None and owned.channel.is_closed

    def _on_key_channel_closed(self, owned: OwnedKey, closing: asyncio.Future[Any]) -> None:
        """A quorum key's own channel closed. By us (a let-go, a failed consume: the key is
        not CONSUMING then) or with the connection (the session ends): nothing to do here.
        By the broker (a channel error): it took back what the key held, in order; only
        this key is lost."""
        error = None if closing.cancelled() else closing.exception()
        if owned.state is HoldState.CONSUMING and isinstance(
            error, aiormq.exceptions.ChannelClosed
        ):
            owned.consumer_tag = None
            self._lose(owned, f"the broker closed its channel ({error})")

    def _lose(self, owned: OwnedKey, why: str) -> None:
        """The broker ended a consumer of ours: let go of its key as in a release, and tell
        the registry, which assigns it again."""
        log.warning("key %s: %s", owned.key_id, why)
        if owned.state is HoldState.CONSUMING:  # else a release is under way already
            owned.move(HoldState.RELEASING)
            self._tasks.spawn(self.release_and_report([owned.key_id]))


def _tag(delivery: DeliveredMessage) -> int:
    tag = getattr(delivery.delivery, "delivery_tag", None)
    assert isinstance(tag, int)
    return tag
