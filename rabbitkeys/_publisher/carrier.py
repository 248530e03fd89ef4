"""The publisher's carrier: what carries a publisher's messages to the broker.

The :class:`~.publisher.Publisher` takes the calls (it encodes each job, keeps its
deadline, awaits its future); the lanes (:mod:`.lane`, pure) decide what to send and when to
ask the registry. The :class:`Carrier` between them does what the lanes decide and reports
back what came of it: it writes messages on the confirm channel (one job alone, several as a
batch), turns each broker answer (ack, nack, ``basic.return``, a lost channel) into the lane's
next actions, has the :class:`~.ensures.Ensurer` ask the registry for the keys' routing keys,
answers callers' futures and frees room. It holds the lanes, the
:class:`~.room.Room` and, while the publisher is connected, the :class:`Link` to the broker.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import aiormq
from pamqp import commands as spec

from .._broker.amqp import TaskSet
from .._broker.control import ControlClient
from .._observe.metrics import PublisherMetrics
from .._settings import Settings
from .._wire.batch import Record
from .._wire.envelope import encode_batch, encode_envelope
from .ensures import Ensurer
from .lane import (
    Action,
    Answer,
    Batch,
    Count,
    Counted,
    Ensure,
    Entry,
    Lane,
    Lanes,
    LeaveRoom,
    Linger,
    Send,
)
from .room import Room

__all__ = ["Carrier", "Link", "OutgoingMessage"]

log = logging.getLogger("rabbitkeys.publisher")

# What the broker closing the channel or connection over something sent on it raises: a
# strike against every message on it (the lane gives one up at MAX_BROKER_CLOSES).
# CONNECTION_FORCED (a broker shutdown) and network drops are not strikes.
_BROKER_REFUSALS = (
    aiormq.exceptions.ChannelClosed,
    aiormq.exceptions.ConnectionFrameError,
    aiormq.exceptions.ConnectionSyntaxError,
    aiormq.exceptions.ConnectionCommandInvalid,
    aiormq.exceptions.ConnectionUnexpectedFrame,
)


@dataclass(eq=False, kw_only=True)
class OutgoingMessage(Entry):
    """An entry of this publisher's lanes, with what goes on the wire; its ``caller`` is the
    future its ``publish()`` awaits.

    ``record`` is the job as a batch carries it, made once when ``publish()`` is called
    (its application headers encoded then); the properties of a message of its own are
    made only if it is sent alone (``properties`` is kept from the call when it has
    application headers: their frame was measured then)."""

    record: Record
    properties: spec.Basic.Properties | None = None
    #: the event loop's time its publish_timeout ends (0: the call has its own timeout)
    deadline: float = 0.0

    @property
    def future(self) -> asyncio.Future[None]:
        return cast(asyncio.Future[None], self.caller)

    @property
    def body(self) -> bytes:
        return self.record.body


_NO_RECORD = Record(sequence=0, published_at=0, body=b"")


@dataclass(frozen=True, slots=True)
class Link:
    """What the carrier writes on while the publisher is connected, built when a connection
    is: the underlying aiormq confirm channel (its ``basic_publish`` writes frames in call
    order, one FIFO lock: what keeps overlapping publishes of a key in order) and the
    control client that asks the registry."""

    channel: aiormq.Channel
    control: ControlClient


class _NotConnected:
    """The carrier's link while there is no connection. The lanes send nothing and ask
    nothing then (they wait for ``on_connected``); an ensure that was under way when the
    connection went finds this and is interrupted, as by the lost connection itself."""

    __slots__ = ()

    @property
    def channel(self) -> aiormq.Channel:
        raise ConnectionError("the publisher is not connected")

    @property
    def control(self) -> ControlClient:
        raise ConnectionError("the publisher is not connected")


_NOT_CONNECTED = _NotConnected()


class Carrier:
    """Carries out what the lanes say: writes messages on the channel and reports each
    answer, asks the registry, answers callers, frees room; holds the lanes, the Room and
    the current channel. No decision is taken here: they are all in :mod:`.lane`."""

    def __init__(
        self,
        settings: Settings,
        metrics: PublisherMetrics,
        *,
        publisher_id: str,
        delivery_mode: int,
        user_id: str | None,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._publisher_id = publisher_id
        self._delivery_mode = delivery_mode
        self._user_id = user_id
        self.lanes = Lanes(
            publish_timeout=settings.publish_timeout,
            room_bounds=(
                f"max_pending_messages ({settings.max_pending_messages}) or "
                f"max_pending_bytes ({settings.max_pending_bytes})"
            ),
            batch_max_jobs=settings.batch_max_jobs,
            batch_max_bytes=settings.batch_max_bytes,
            batch_linger=settings.batch_linger,
            max_in_flight_per_key=settings.max_in_flight_per_key,
        )
        self.room: Room[OutgoingMessage] = Room(
            settings.max_pending_messages, settings.max_pending_bytes, self.admit
        )
        #: what the lanes said to do and is not done yet, oldest first (see carry_out)
        self._todo: deque[Action] = deque()
        self._carrying_out = False
        self._link: Link | _NotConnected = _NOT_CONNECTED
        #: the publish tasks on the current channel, cancelled when it is gone
        self._sending: set[asyncio.Future[Any]] = set()
        #: ensure requests
        self.background = TaskSet(log, "publisher task")
        self._ensurer = Ensurer(
            settings.ensure_timeout, self._control, self.carry_out, self.background
        )
        self.returned_messages = 0
        self.resent_messages = 0

    def connected(self, link: Link) -> None:
        self._link = link
        self._ensurer.connected()
        self.carry_out(self.lanes.on_connected(_frame_max_of(link.channel)))

    def _control(self) -> ControlClient:
        return self._link.control  # ConnectionError while not connected

    def lost(self, reason: BaseException | None) -> None:
        """The connection is gone (``reason``: what closed it, if known)."""
        self._link = _NOT_CONNECTED
        # Not left to the old channel's futures: on an abrupt loss some never complete.
        for task in list(self._sending):
            task.cancel()
        refused = repr(reason) if isinstance(reason, _BROKER_REFUSALS) else None
        self.carry_out(self.lanes.on_connection_lost(refused))

    def admit(self, entry: OutgoingMessage) -> None:
        """The Room took the entry (also called by the Room when its turn comes)."""
        self.carry_out(entry.lane.admit(entry))

    def give_up(self, entry: OutgoingMessage, timeout: float | None = None) -> None:
        """``publish_timeout`` (or the publish's own ``timeout``) is over (a timer)."""
        self.carry_out(entry.lane.give_up(entry, timeout))

    def carry_out(self, actions: list[Action]) -> None:
        """Do what the lanes said, in the order they said it.

        Freeing room can admit the next publish in the Room's line, whose lane may then
        decide to send: that lands at the end of the queue, after every send decided before
        it, so the frames still leave in the order the lanes decided (call order per key)."""
        self._todo.extend(actions)
        if self._carrying_out:
            return
        self._carrying_out = True
        published = 0
        try:
            while self._todo:
                action = self._todo.popleft()
                if isinstance(action, Send):
                    self._send(action)
                elif isinstance(action, Answer):
                    future = cast(OutgoingMessage, action.entry).future
                    if not future.done():
                        if action.error is None:
                            future.set_result(None)
                            published += 1
                        else:
                            future.set_exception(action.error)
                elif isinstance(action, LeaveRoom):
                    message = cast(OutgoingMessage, action.entry)
                    # what the caller may still hold is theirs, not ours
                    message.record, message.properties = _NO_RECORD, None
                    if action.admitted:
                        self.room.give_back(message.size)
                    else:
                        self.room.withdraw(message)
                elif isinstance(action, Ensure):
                    self._ensurer.ask(action.lane, action.stale_routing_key)
                elif isinstance(action, Linger):
                    asyncio.get_running_loop().call_later(
                        action.delay, self._linger_over, action.lane, action.token
                    )
                elif isinstance(action, Count):
                    if action.what is Counted.RETURNED:
                        self.returned_messages += 1
                        self._metrics.returned.inc()
                    else:
                        self.resent_messages += 1
                        self._metrics.resent.inc()
        finally:
            self._carrying_out = False
            if published:  # counted once per answer from the broker, not per job
                self._metrics.published.inc(published)

    def _send(self, send: Send) -> None:
        """Write one message: a job alone as a plain message, several as a batch."""
        channel = self._link.channel  # the lanes send only while connected
        entries = cast(list[OutgoingMessage], send.batch.entries)  # every entry here is one
        lane = send.lane
        if len(entries) == 1:
            message = entries[0]
            body = message.record.body
            properties = message.properties or self._properties_of(lane, message)
        else:
            body, properties = encode_batch(
                lane.ref,
                [message.record for message in entries],
                publisher_id=self._publisher_id,
                delivery_mode=self._delivery_mode,
                user_id=self._user_id,
            )
        self._metrics.batch_jobs.observe(len(entries))
        # The task starts at once, in the order the lanes decided, and takes the channel's
        # FIFO write lock before any await: frames leave in the order of the publish() calls.
        task = asyncio.ensure_future(
            channel.basic_publish(
                body,
                exchange=lane.exchange,
                routing_key=send.batch.routing_key,
                properties=properties,
                mandatory=True,
                wait=False,
            )
        )
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)
        task.add_done_callback(partial(self._on_answer, lane, send.batch))

    def _properties_of(self, lane: Lane, message: OutgoingMessage) -> spec.Basic.Properties:
        """The properties of a job sent alone, without application headers."""
        record = message.record
        return encode_envelope(
            lane.ref,
            publisher_id=self._publisher_id,
            sequence=record.sequence,
            delivery_mode=self._delivery_mode,
            user_id=self._user_id,
            content_type=record.content_type,
            published_at=record.published_at,
        )

    def _on_answer(self, lane: Lane, batch: Batch, task: asyncio.Future[Any]) -> None:
        """The broker answered for one message (or its channel went away): tell the lane."""
        error = None if task.cancelled() else task.exception()
        if isinstance(error, aiormq.exceptions.DeliveryError):
            actions = lane.refused(batch, repr(error))  # basic.nack
        elif task.cancelled() or error is not None:
            actions = lane.cut_off(batch)
        elif isinstance(task.result(), spec.Basic.Ack):
            actions = lane.acked(batch)
        elif isinstance(task.result(), aiormq.abc.DeliveredMessage):
            actions = lane.returned_unrouted(batch)  # basic.return
        else:
            actions = lane.refused(batch, repr(task.result()))
        self.carry_out(actions)

    def _linger_over(self, lane: Lane, token: int) -> None:
        self.carry_out(lane.linger_over(token))


def _frame_max_of(channel: aiormq.Channel) -> int:
    return int(channel.connection.connection_tune.frame_max)
