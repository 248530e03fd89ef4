"""The publisher client library: ``async with Publisher() as pub: await pub.publish(key, body)``.

Per key, messages reach the key's queue in the order ``publish()`` was *called*, also when
calls overlap. Each key has a lane:

* steady: the lane knows the routing key of the key's binding; a publish is written to the
  channel at once (frames leave in call order) and its confirm is awaited in the background,
  so publishes pipeline across and within keys with no extra round trip;
* waiting: the lane has no routing key yet (first use) or lost it (a message came back with
  ``basic.return``). New publishes queue up behind the returned ones; once every message in
  flight on the lane is settled, the lane asks the registry to ensure the key and resends
  the queue, oldest first.

When the connection drops, every unconfirmed message goes back to its lane the same way and
is sent again, in order, once the publisher has reconnected; ``publish()`` waits for that up
to ``publish_timeout``. A message the broker had already taken before the drop then exists
twice: workers drop the copy (same publisher id and sequence number).

What a publisher holds is bounded (``max_pending_messages``, ``max_pending_bytes``): a
publish that finds no room waits in line (:class:`~rabbitkeys._room.Room`, first come first
served, so callers keep their call order per key), and that wait counts against its
``publish_timeout``. A publish that gives up (timeout or cancellation) before its message was
written to the connection withdraws it: it leaves the publisher at once and is never sent.
"Written" means handed to aiormq's write queue (``basic_publish``): from there aiormq's writer
copies it into the socket's buffer without waiting, and nothing can take it back. If the
connection is stalled the bytes wait in those buffers and reach the broker if the connection
recovers, or die with it; so a written message with no confirm raises
:class:`PublishOutcomeUnknownError` (it may still be delivered), is not sent again, and keeps
its room until the broker answers for it or its connection is gone: the bound covers what
sits in a stalled socket too.

Why a returned message can be put back in its place: every binding the registry makes gets
a fresh routing key (see ``new_routing_key``), so once one message on a routing key comes
back, every later message on it comes back too. No later message of the lane can overtake it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from types import TracebackType
from typing import Any, Self, cast

import aiormq
from aio_pika.abc import AbstractConnection
from pamqp import commands as spec
from prometheus_client import CollectorRegistry

from ._amqp import CHANNEL_ERRORS, TaskSet
from ._connection import keep_connected
from ._control import ControlClient
from ._envelope import encode, header_frame_size
from ._errors import (
    BrokerUnavailableError,
    InvalidMessageError,
    PublishError,
    PublishOutcomeUnknownError,
    QuotaExceededError,
    RabbitkeysError,
    RegistryUnavailableError,
)
from ._metrics import PublisherMetrics
from ._protocol import REFUSED_QUOTA_EXCEEDED, Ensured, EnsureKey, Refused
from ._room import Room
from ._settings import Settings, load_settings
from ._topology import DEFAULT_JOB_TYPE, KeyRef, Names

__all__ = ["Publisher"]

log = logging.getLogger("rabbitkeys.publisher")

# The broker closed the channel or connection over something sent on it this many times
# while a message was on it: that message is given up rather than sent again forever.
_MAX_BROKER_CLOSES = 3
_BROKER_REFUSALS = (
    aiormq.exceptions.ChannelClosed,
    aiormq.exceptions.ConnectionFrameError,
    aiormq.exceptions.ConnectionSyntaxError,
    aiormq.exceptions.ConnectionCommandInvalid,
    aiormq.exceptions.ConnectionUnexpectedFrame,
)
# Lanes of idle keys beyond this many are dropped (their routing key is asked for again).
_MAX_IDLE_LANES = 100_000


class _Stage(enum.Enum):
    """Where a message is. Only QUEUED and SENT hold room; only ``_done`` ends a message."""

    ADMITTING = "waiting for room"  # in the Room's line; the publisher holds nothing of it
    QUEUED = "queued"  # in its lane (waiting or returned), on no connection: withdrawable
    SENT = "sent"  # written to the current connection, no answer yet
    DONE = "done"  # confirmed, failed or withdrawn: holds nothing


@dataclass(eq=False)
class _Lane:
    ref: KeyRef
    exchange: str
    routing_key: str | None = None
    in_flight: set[_Entry] = field(default_factory=set)
    waiting: deque[_Entry] = field(default_factory=deque)
    #: sent but to be sent again (returned by the broker, or cut off by a lost connection)
    returned: list[_Entry] = field(default_factory=list)
    ensuring: bool = False
    stale_routing_key: str | None = None
    #: messages of the lane not DONE (an idle lane has none and may be dropped)
    live: int = 0


@dataclass(eq=False)
class _Entry:
    """One publish() call, from the call until the broker confirmed it into the key's queue."""

    sequence: int
    lane: _Lane
    body: bytes
    properties: spec.Basic.Properties
    future: asyncio.Future[None]
    #: what it counts against max_pending_bytes: body and application headers
    size: int
    #: bytes of its content header frame, when application headers make it worth checking
    header_frame: int = 0
    stage: _Stage = _Stage.ADMITTING
    #: written to a connection and not known to be refused since: the broker may have it
    may_have_arrived: bool = False
    #: an earlier send of it went down with its connection, unanswered
    lost_a_copy: bool = False
    #: times the broker closed the channel or connection while it was on it
    broker_closes: int = 0
    routing_key: str | None = None
    #: the publish task of the current send; a callback from an older one is ignored
    task: asyncio.Future[Any] | None = None


class Publisher:
    """Publishes keyed jobs; per key, in the order of the ``publish()`` calls.

    ``Publisher()`` reads its settings from the ``RABBITKEYS_*`` environment; pass a
    :class:`Settings` to choose them in code. Metrics go to ``metrics_registry`` (default:
    prometheus_client's global registry; the application serves them).
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        metrics_registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings if settings is not None else load_settings()
        #: travels in every message, so a worker can tell publishers apart (dedup, order checks)
        self.publisher_id = uuid.uuid4().hex
        self._names = Names(self.settings.namespace)
        self._lanes: dict[str, _Lane] = {}
        self._channel: aiormq.Channel | None = None
        self._control: ControlClient | None = None
        self._background = TaskSet(log, "publisher task")
        self._delivery_mode = 2 if self.settings.durable else 1
        # One counter for all keys: per key the numbers still only grow (what dedup and
        # order checks need), and a dropped idle lane cannot restart them at 1.
        self._next_sequence = 1
        self._unsettled: set[asyncio.Future[None]] = set()
        self._room: Room[_Entry] = Room(
            self.settings.max_pending_messages, self.settings.max_pending_bytes, self._admit
        )
        # AMQP's minimum; the connection's negotiated value replaces it on connect
        self._frame_max = 4096
        self._connected = asyncio.Event()
        #: set while publishes wait for a connection: reconnect without a long backoff
        self._hurry = asyncio.Event()
        self._closing = asyncio.Event()
        self._connection_task: asyncio.Task[None] | None = None
        #: messages that came back (``basic.return``) and were routed again
        self.returned_messages = 0
        #: messages sent again after a lost connection
        self.resent_messages = 0
        self.metrics = PublisherMetrics(metrics_registry)

    def __repr__(self) -> str:
        return (
            f"<Publisher {self.publisher_id} namespace={self.settings.namespace!r} "
            f"url={self.settings.amqp_url_masked!r}>"
        )

    @property
    def connected(self) -> bool:
        """Whether the publisher has a working connection to the broker now."""
        return self._connected.is_set()

    @property
    def pending_messages(self) -> int:
        """Messages the publisher holds: not yet sent, or sent and not yet answered for.
        At most ``max_pending_messages``."""
        return self._room.items

    @property
    def pending_bytes(self) -> int:
        """Bytes (bodies and application headers) of :attr:`pending_messages`. At most
        ``max_pending_bytes``."""
        return self._room.bytes

    @property
    def waiting_for_room(self) -> int:
        """``publish()`` calls waiting for room (their messages are not held yet)."""
        return self._room.waiting

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect; raise :class:`BrokerUnavailableError` if the broker does not answer
        within ``publish_timeout``. Later outages are ridden out by reconnecting."""
        self._hurry.set()  # the caller waits for the first connection
        self._connection_task = asyncio.ensure_future(
            keep_connected(
                self.settings,
                f"publisher {self.publisher_id}",
                self._session,
                self._closing,
                log,
                hurry=self._hurry,
            )
        )
        try:
            await asyncio.wait_for(self._connected.wait(), self.settings.publish_timeout)
        except TimeoutError:
            await self._stop_connection()
            raise BrokerUnavailableError(
                f"cannot connect to {self.settings.amqp_url_masked} within "
                f"{self.settings.publish_timeout:g}s"
            ) from None

    async def _session(self, connection: AbstractConnection) -> None:
        lost = asyncio.Event()
        reasons: list[BaseException] = []

        def on_close(_sender: object, reason: BaseException | None = None) -> None:
            if reason is not None:
                reasons.append(reason)
            lost.set()

        connection.close_callbacks.add(on_close)
        channel = await connection.channel(publisher_confirms=True)
        # A channel the broker closed (say, a refused frame) is as good as a lost connection.
        channel.close_callbacks.add(on_close)
        control = ControlClient(connection, self._names)
        await control.start()
        # The underlying aiormq channel: its basic_publish writes frames in call order
        # (one FIFO lock), which is what keeps overlapping publishes of a key in order.
        self._channel = cast(aiormq.Channel, await channel.get_underlay_channel())
        self._frame_max = _frame_max_of(self._channel)
        self._control = control
        self._connected.set()
        self._hurry.clear()
        for lane in self._lanes.values():
            self._pump(lane)
        try:
            closing = asyncio.ensure_future(self._closing.wait())
            lost_wait = asyncio.ensure_future(lost.wait())
            await asyncio.wait([closing, lost_wait], return_when=asyncio.FIRST_COMPLETED)
            closing.cancel()
            lost_wait.cancel()
            if lost.is_set() and not self._closing.is_set():
                cause = f": {reasons[0]!r}" if reasons else ""
                raise ConnectionError(f"connection to the broker lost{cause}")
        finally:
            self._connected.clear()
            self._channel = None
            self._abandon_in_flight(reasons[0] if reasons else None)
            if self._room.items or self._room.waiting:
                self._hurry.set()

    def _abandon_in_flight(self, reason: BaseException | None) -> None:
        """The connection is gone: whatever waited for a confirm on it will be sent again,
        unless its caller gave up meanwhile. Not left to the old channel's futures: on an
        abrupt loss some never complete, and a lane waiting for them would never send again.

        When the broker itself closed the channel or connection (a frame it refused, say),
        something on it was at fault: a message that was on it ``_MAX_BROKER_CLOSES`` times
        is given up, so no single message makes the publisher reconnect forever."""
        refused = isinstance(reason, _BROKER_REFUSALS)
        for lane in list(self._lanes.values()):
            abandoned = sorted(lane.in_flight, key=lambda entry: entry.sequence)
            lane.in_flight.clear()
            for entry in abandoned:
                entry.lost_a_copy = True
                task, entry.task = entry.task, None
                if task is not None:
                    task.cancel()
                if refused:
                    entry.broker_closes += 1
                    if entry.broker_closes >= _MAX_BROKER_CLOSES:
                        self._done(entry)
                        _fail(
                            entry,
                            PublishOutcomeUnknownError(
                                f"the broker closed the connection {entry.broker_closes} "
                                f"times while this message was on it (last: {reason!r}); "
                                f"it is not sent again"
                            ),
                        )
                        continue
                if self._requeue(entry):
                    self.resent_messages += 1
                    self.metrics.resent.inc()

    async def close(self) -> None:
        """Wait for every publish already called to settle, then disconnect."""
        if self._unsettled or self._background:
            await asyncio.wait(
                [*self._unsettled, *self._background], timeout=self.settings.publish_timeout
            )
        await self._stop_connection()

    async def _stop_connection(self) -> None:
        self._closing.set()
        if self._control is not None:
            try:
                await self._control.close()
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # our caller is being cancelled: let it through
                # else aiormq cancelled its own close (the connection went down meanwhile):
                # nothing is left to close, and the caller's `async with` must not see it
            except Exception:
                pass
        if self._connection_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._connection_task, 10)

    async def publish(
        self,
        key: str,
        body: bytes,
        *,
        job_type: str = DEFAULT_JOB_TYPE,
        headers: Mapping[str, Any] | None = None,
    ) -> None:
        """Publish ``body`` for ``key``; return once the broker confirmed it into the key's
        queue. Waits for room when the publisher holds ``max_pending_messages`` or
        ``max_pending_bytes`` already; all waiting counts against ``publish_timeout``.

        Raises :class:`InvalidKeyError` / :class:`InvalidMessageError` before sending
        anything (a body over ``max_message_bytes``, headers too large for a frame),
        :class:`RegistryUnavailableError` if a new key could not be routed in
        ``ensure_timeout``, :class:`PublishError` if the message was not published and never
        will be (refused by the broker, or withdrawn unsent at ``publish_timeout``), and
        :class:`PublishOutcomeUnknownError` if it was written but not confirmed in time: it
        may still be delivered."""
        ref = KeyRef.of(key, job_type)
        if not isinstance(body, bytes | bytearray | memoryview):
            raise InvalidMessageError(f"body must be bytes, got {type(body).__name__}")
        if len(body) > self.settings.max_message_bytes:
            raise InvalidMessageError(
                f"body is {len(body)} bytes; the maximum is {self.settings.max_message_bytes} "
                f"(RABBITKEYS_MAX_MESSAGE_BYTES)"
            )
        if self._connection_task is None or self._closing.is_set():
            raise PublishError("Publisher is not started: use `async with Publisher() as pub`")
        properties = encode(
            ref,
            publisher_id=self.publisher_id,
            sequence=self._next_sequence,
            delivery_mode=self._delivery_mode,
            headers=headers,
        )
        size = len(body)
        header_frame = 0
        if headers:
            # Without application headers the frame is small (a key is at most 1,024 bytes)
            # and fits AMQP's minimum frame_max of 4,096: measured only when it may not.
            header_frame = header_frame_size(properties, len(body))
            self._check_header_frame(header_frame)
            size += header_frame
            if size > self.settings.max_pending_bytes:
                raise InvalidMessageError(
                    f"body and headers are {size} bytes; max_pending_bytes is "
                    f"{self.settings.max_pending_bytes} (RABBITKEYS_MAX_PENDING_BYTES)"
                )
        lane = self._lanes.get(ref.id)
        if lane is None:
            if len(self._lanes) >= _MAX_IDLE_LANES:
                self._drop_idle_lanes()
            lane = self._lanes[ref.id] = _Lane(ref, self._names.jobs_exchange(ref.job_type))
        entry = _Entry(
            sequence=self._next_sequence,
            lane=lane,
            body=bytes(body),
            properties=properties,
            future=asyncio.get_running_loop().create_future(),
            size=size,
            header_frame=header_frame,
        )
        self._next_sequence += 1
        lane.live += 1
        self._unsettled.add(entry.future)
        entry.future.add_done_callback(self._unsettled.discard)
        if self._room.ask(entry, size):
            self._admit(entry)
        if not self._connected.is_set():
            self._hurry.set()
        # A timer, not asyncio.wait_for: no extra task per message on the hot path.
        started = time.perf_counter()
        timer = asyncio.get_running_loop().call_later(
            self.settings.publish_timeout, self._give_up, entry
        )
        try:
            await entry.future
        except asyncio.CancelledError:
            self._withdraw(entry)  # the caller gave up: a message not yet written never is
            raise
        except RabbitkeysError:
            self.metrics.publish_failures.inc()
            raise
        finally:
            timer.cancel()
        self.metrics.published.inc()
        self.metrics.publish_duration.observe(time.perf_counter() - started)

    def _check_header_frame(self, header_frame: int) -> None:
        if self._frame_max and header_frame > self._frame_max:
            raise InvalidMessageError(
                f"the headers make a content header frame of {header_frame} bytes; the "
                f"connection's frame_max is {self._frame_max} bytes (send big data in the body)"
            )

    def _admit(self, entry: _Entry) -> None:
        """The Room took the entry: it joins its lane and holds room until it is done."""
        entry.stage = _Stage.QUEUED
        entry.lane.waiting.append(entry)
        self._pump(entry.lane)

    def _give_up(self, entry: _Entry) -> None:
        """``publish_timeout`` is over: withdraw the message if the broker cannot have it (never
        written, or returned unrouted), else say that it may still arrive. Either way it is not
        sent (again)."""
        timeout = self.settings.publish_timeout
        if entry.may_have_arrived:
            error: PublishError = PublishOutcomeUnknownError(
                f"the broker did not confirm the message within {timeout:g}s; it was written "
                f"to the connection and may still be delivered (it is not sent again)"
            )
        else:
            if entry.stage is _Stage.ADMITTING:
                why = (
                    f"the publisher held max_pending_messages "
                    f"({self.settings.max_pending_messages}) or max_pending_bytes "
                    f"({self.settings.max_pending_bytes}) all along"
                )
            elif not self._connected.is_set():
                why = "no connection to the broker"
            elif entry.lane.routing_key is None:
                why = "the key was not routed yet"
            else:
                why = "earlier messages of its key were not settled"
            error = PublishError(
                f"the message was not sent within {timeout:g}s ({why}); it was withdrawn "
                f"and will never be delivered"
            )
        self._withdraw(entry)
        _fail(entry, error)

    def _withdraw(self, entry: _Entry) -> None:
        """Take back a message its caller gave up on, unless it is on the connection (SENT):
        that one keeps its room until the broker answers for it or the connection is gone."""
        if entry.stage is _Stage.QUEUED:
            lane = entry.lane
            with contextlib.suppress(ValueError):
                lane.waiting.remove(entry)  # near the front: callers give up oldest first
            with contextlib.suppress(ValueError):
                lane.returned.remove(entry)
            self._done(entry)
        elif entry.stage is _Stage.ADMITTING:
            self._done(entry)

    def _done(self, entry: _Entry) -> None:
        """The one way a message leaves the publisher; gives its room to the next in line."""
        stage, entry.stage = entry.stage, _Stage.DONE
        if stage is _Stage.DONE:
            return
        entry.lane.live -= 1
        entry.body = b""  # what the caller may still hold is theirs, not ours
        if stage is _Stage.ADMITTING:
            self._room.withdraw(entry)
        else:
            self._room.give_back(entry.size)

    def _requeue(self, entry: _Entry) -> bool:
        """A sent message that must be sent again goes back to its lane, unless its caller
        gave up meanwhile (then it is done). True if it goes back."""
        if entry.future.done():
            self._done(entry)
            return False
        entry.stage = _Stage.QUEUED
        entry.lane.returned.append(entry)
        return True

    def _drop_idle_lanes(self) -> None:
        """Forget the oldest lanes with nothing pending (memory stays flat under key churn)."""
        idle = [
            key_id
            for key_id, lane in self._lanes.items()
            if not (lane.live or lane.in_flight or lane.waiting or lane.returned or lane.ensuring)
        ]
        for key_id in idle[: len(self._lanes) - _MAX_IDLE_LANES * 9 // 10]:
            del self._lanes[key_id]

    def _pump(self, lane: _Lane) -> None:
        """Send what the lane can send now, in sequence order.

        Messages to send again (returned, or cut off by a lost connection) wait until nothing
        of the lane is in flight, then go back in front of the waiting ones: nothing of the
        key may overtake them.
        """
        if lane.returned:
            if lane.in_flight:
                return
            lane.returned.sort(key=lambda entry: entry.sequence)
            lane.waiting.extendleft(reversed(lane.returned))
            lane.returned.clear()
        if not lane.waiting or not self._connected.is_set() or lane.ensuring:
            return
        if lane.routing_key is None:
            lane.ensuring = True
            self._background.spawn(self._ensure(lane))
            return
        while lane.waiting:
            entry = lane.waiting.popleft()
            if entry.future.done():  # its caller cancelled; publish() withdraws it soon
                self._done(entry)
            elif entry.header_frame > self._frame_max > 0:  # a new connection, a smaller limit
                self._done(entry)
                _fail(
                    entry,
                    InvalidMessageError(
                        f"the headers make a content header frame of {entry.header_frame} "
                        f"bytes; the connection's frame_max is now {self._frame_max} bytes"
                    ),
                )
            else:
                self._send(lane, entry)

    def _send(self, lane: _Lane, entry: _Entry) -> None:
        assert self._channel is not None and lane.routing_key is not None
        entry.routing_key = lane.routing_key
        entry.stage = _Stage.SENT
        entry.may_have_arrived = True
        lane.in_flight.add(entry)
        # The task starts at once, in call order, and takes the channel's FIFO write lock
        # before any await: frames leave in the order of the publish() calls.
        task = asyncio.ensure_future(
            self._channel.basic_publish(
                entry.body,
                exchange=lane.exchange,
                routing_key=entry.routing_key,
                properties=entry.properties,
                mandatory=True,
                wait=False,
            )
        )
        entry.task = task
        task.add_done_callback(partial(self._on_confirm, lane, entry))

    def _on_confirm(self, lane: _Lane, entry: _Entry, task: asyncio.Future[Any]) -> None:
        if entry.task is not task:
            return  # a send abandoned when its connection was lost; settled already
        entry.task = None
        lane.in_flight.discard(entry)
        error = None if task.cancelled() else task.exception()
        if error is not None and isinstance(error, aiormq.exceptions.DeliveryError):
            # basic.nack: the broker could not take it (an internal error, a full queue)
            self._done(entry)
            _fail(entry, PublishError(f"the broker refused the message: {error!r}"))
        elif task.cancelled() or error is not None:
            # The channel or connection went away before the confirm: send it again later.
            entry.lost_a_copy = True
            if self._requeue(entry):
                self.resent_messages += 1
                self.metrics.resent.inc()
        elif isinstance(task.result(), spec.Basic.Ack):
            self._done(entry)
            if not entry.future.done():
                entry.future.set_result(None)
        elif isinstance(task.result(), aiormq.abc.DeliveredMessage):
            # basic.return: no binding for this routing key any more (key retired, queue
            # expired or deleted). The message is not published; it goes back in its place.
            # No queue took this copy: withdrawing it now is clean, unless an earlier copy
            # went down with a connection (the broker may have routed that one).
            entry.may_have_arrived = entry.lost_a_copy
            self._requeue(entry)
            self.returned_messages += 1
            self.metrics.returned.inc()
            if lane.routing_key == entry.routing_key:
                lane.stale_routing_key = lane.routing_key
                lane.routing_key = None
        else:
            self._done(entry)
            _fail(entry, PublishError(f"the broker refused the message: {task.result()!r}"))
        self._pump(lane)

    async def _ensure(self, lane: _Lane) -> None:
        failure: PublishError | None = None
        try:
            assert self._control is not None
            reply = await self._control.request(
                EnsureKey(
                    job_type=lane.ref.job_type,
                    key=lane.ref.key,
                    stale_routing_key=lane.stale_routing_key,
                ),
                timeout=self.settings.ensure_timeout,
            )
            if isinstance(reply, Refused):
                refusal = (
                    QuotaExceededError if reply.code == REFUSED_QUOTA_EXCEEDED else PublishError
                )
                raise refusal(f"the registry refused key {lane.ref.key!r}: {reply.reason}")
            if not isinstance(reply, Ensured):
                raise PublishError(f"unexpected reply from the registry: {reply.type}")
        except (RegistryUnavailableError, PublishError) as exc:
            failure = exc
        except (*CHANNEL_ERRORS, ConnectionError) as exc:
            # The connection dropped during the request: ask again once reconnected.
            log.debug("ensure of %s interrupted: %r", lane.ref.id, exc)
            return
        finally:
            lane.ensuring = False
        if failure is not None:
            failed = list(lane.waiting)
            lane.waiting.clear()
            for entry in failed:
                # may admit a publish of this lane from the line: it starts an ensure of its own
                self._done(entry)
                if entry.may_have_arrived:
                    _fail(entry, _outcome_unknown(failure))
                else:
                    _fail(entry, failure)
            return
        assert isinstance(reply, Ensured)
        lane.routing_key = reply.routing_key
        lane.stale_routing_key = None
        self._pump(lane)


def _fail(entry: _Entry, error: BaseException) -> None:
    if not entry.future.done():
        entry.future.set_exception(error)


def _outcome_unknown(error: PublishError) -> PublishOutcomeUnknownError:
    return PublishOutcomeUnknownError(
        f"{error}; an earlier copy was written to a connection that was lost before the "
        f"broker answered, and may still be delivered (it is not sent again)"
    )


def _frame_max_of(channel: aiormq.Channel) -> int:
    return int(channel.connection.connection_tune.frame_max)
