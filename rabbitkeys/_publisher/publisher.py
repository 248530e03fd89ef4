"""The publisher client library: ``async with Publisher() as pub: await pub.publish(key, body)``.

Per key, messages reach the key's queue in the order ``publish()`` was *called*, also when
calls overlap. Each key has a lane:

* steady (ROUTED): the lane knows the routing key of the key's binding; a publish is written
  to the channel at once (frames leave in call order) unless ``max_in_flight_per_key`` of the
  key's messages await their confirm: then it waits, and what waits leaves as one batch (one
  AMQP message, docs/internals/publisher.md "Batches") when one is confirmed. Publishes
  pipeline across keys, and within a key up to that bound;
* waiting (UNROUTED, ENSURING, DRAINING): the lane has no routing key yet (first use) or lost
  it (a message came back with ``basic.return``). New publishes queue up behind the returned
  ones; once every message in flight on the lane is settled, the lane asks the registry to
  ensure the key and resends the queue, oldest first.

When the connection drops, every unconfirmed message goes back to its lane the same way and
is sent again, in order, once the publisher has reconnected; ``publish()`` waits for that up
to ``publish_timeout``. A message the broker had already taken before the drop then exists
twice: workers drop the copy (same publisher id and sequence number).

What a publisher holds is bounded (``max_pending_messages``, ``max_pending_bytes``): a
publish that finds no room waits in line (:class:`~.room.Room`, first come
first served, so callers keep their call order per key), and that wait counts against its
``publish_timeout``. A publish that gives up (timeout or cancellation) before its message was
written to the connection withdraws it: it leaves the publisher at once and is never sent.
"Written" means handed to aiormq's write queue (``basic_publish``): from there aiormq's writer
copies it into the socket's buffer without waiting, and nothing can take it back. If the
connection is stalled the bytes wait in those buffers and reach the broker if the connection
recovers, or die with it; so a written message with no confirm raises
:class:`PublishOutcomeUnknownError` (it may still be delivered), is not sent again, and keeps
its room until the broker answers for it or its connection is gone: the bound covers what
sits in a stalled socket too.

The lanes themselves, their states and every decision above (what to send, when to ask the
registry, what a caller is told) live in :mod:`.lane`, pure and
synchronous. The shell is this module's :class:`Publisher` (the calls, their deadlines and
futures, the connection) and its :class:`~.carrier.Carrier` (:mod:`.carrier`: it carries out
what the lanes say over AMQP, the room included, and reports back what happened).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Mapping
from functools import partial
from types import TracebackType
from typing import Any, Self, cast

import aiormq
from aio_pika.abc import AbstractConnection
from prometheus_client import CollectorRegistry

from .._broker.connection import keep_connected
from .._broker.control import ControlClient
from .._errors import BrokerUnavailableError, InvalidMessageError, PublishError, RabbitkeysError
from .._observe.metrics import PublisherMetrics
from .._observe.tracing import publish_span
from .._settings import Settings, load_settings
from .._wire.batch import RECORD_OVERHEAD, Record, encode_headers
from .._wire.envelope import encode_envelope, header_frame_size
from .._wire.payload import encode_payload
from .._wire.topology import DEFAULT_JOB_TYPE, KeyRef, Names
from .carrier import Carrier, Link, OutgoingMessage

__all__ = ["Publisher"]

log = logging.getLogger("rabbitkeys.publisher")


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
        # every message carries it; the broker refuses any other than the connection's user
        self._user_id = self.settings.amqp_user
        self.metrics = PublisherMetrics(metrics_registry)
        self._delivery_mode = 2 if self.settings.durable else 1
        self._carrier = Carrier(
            self.settings,
            self.metrics,
            publisher_id=self.publisher_id,
            delivery_mode=self._delivery_mode,
            user_id=self._user_id,
        )
        self._lanes = self._carrier.lanes
        self._control: ControlClient | None = None
        # One counter for all keys: per key the numbers still only grow (what dedup and
        # order checks need), and a dropped idle lane cannot restart them at 1.
        self._next_sequence = 1
        self._unsettled: set[asyncio.Future[None]] = set()
        #: the publishes with the default publish_timeout, oldest first: their deadlines are
        #: in this order, so one timer (for the oldest live one) covers them all
        self._deadlines: deque[OutgoingMessage] = deque()
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._exchanges: dict[str, str] = {}
        self._room = self._carrier.room
        self._connected = asyncio.Event()
        #: set while publishes wait for a connection: reconnect without a long backoff
        self._hurry = asyncio.Event()
        self._closing = asyncio.Event()
        self._connection_task: asyncio.Task[None] | None = None

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
    def returned_messages(self) -> int:
        """Messages that came back (``basic.return``) and were routed again."""
        return self._carrier.returned_messages

    @property
    def resent_messages(self) -> int:
        """Messages sent again after a lost connection."""
        return self._carrier.resent_messages

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
        control = ControlClient(connection, self._names, self._user_id)
        await control.start()
        self._control = control
        underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
        self._carrier.connected(Link(underlay, control))
        self._connected.set()
        self._hurry.clear()
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
            self._carrier.lost(reasons[0] if reasons else None)
            if self._room.items or self._room.waiting:
                self._hurry.set()

    async def close(self) -> None:
        """Wait for every publish already called to settle, then disconnect."""
        background = self._carrier.background
        if self._unsettled or background:
            await asyncio.wait(
                [*self._unsettled, *background], timeout=self.settings.publish_timeout
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
        payload: object,
        *,
        job_type: str = DEFAULT_JOB_TYPE,
        headers: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> None:
        """Publish ``payload`` for ``key``; return once the broker confirmed it into the
        key's queue. Waits for room when the publisher holds ``max_pending_messages`` or
        ``max_pending_bytes`` already; all waiting counts against ``publish_timeout`` (or
        ``timeout`` seconds, if given, for this message).

        ``payload``: ``bytes`` (sent as is, no content type), ``str`` (UTF-8,
        ``text/plain``), a pydantic model or another JSON-able object (JSON,
        ``application/json``); the content type travels in the message's ``content_type``.

        Raises :class:`InvalidKeyError` / :class:`InvalidMessageError` before sending
        anything (a payload that cannot be encoded, a body over ``max_message_bytes``,
        headers too large for a frame), :class:`RegistryUnavailableError` if a new key could
        not be routed in ``ensure_timeout``, :class:`PublishError` if the message was not
        published and never will be (refused by the broker, or withdrawn unsent at
        ``publish_timeout``), and :class:`PublishOutcomeUnknownError` if it was written but
        not confirmed in time: it may still be delivered."""
        ref = KeyRef.of(key, job_type)
        body, content_type = encode_body(payload, self.settings.max_message_bytes)
        # the trace context of this call goes with its job (a no-op without tracing)
        with publish_span(self.settings.namespace, ref, headers) as headers:
            await self._publish(ref, body, content_type, headers, timeout)

    async def _publish(
        self,
        ref: KeyRef,
        body: bytes,
        content_type: str | None,
        headers: Mapping[str, Any] | None,
        timeout: float | None,
    ) -> None:
        """``publish`` of a body :func:`encode_body` made (the sync publisher encodes in its
        caller's thread and comes in here)."""
        if self._connection_task is None or self._closing.is_set():
            raise PublishError("Publisher is not started: use `async with Publisher() as pub`")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        entry = self._message(ref, body, content_type, headers, future)
        lane = entry.lane
        size = entry.size
        lane.enter(entry)
        self._unsettled.add(future)
        if self._room.ask(entry, size):
            self._carrier.admit(entry)
        if not self._connected.is_set():
            self._hurry.set()
        started = time.perf_counter()
        # No timer (nor asyncio.wait_for task) per message on the hot path: the deadlines
        # of the default publish_timeout come in call order, one timer serves them all.
        timer = None
        if timeout is None:
            entry.deadline = loop.time() + self.settings.publish_timeout
            self._watch_deadline(entry, loop)
        else:
            timer = loop.call_later(timeout, partial(self._carrier.give_up, entry, timeout))
        try:
            await future
        except asyncio.CancelledError:
            # the caller gave up: a message not yet written never is
            self._carrier.carry_out(lane.withdraw(entry))
            raise
        except RabbitkeysError:
            self.metrics.publish_failures.inc()
            raise
        finally:
            self._unsettled.discard(future)
            if timer is not None:
                timer.cancel()
        self.metrics.publish_duration.observe(time.perf_counter() - started)

    def _message(
        self,
        ref: KeyRef,
        body: bytes,
        content_type: str | None,
        headers: Mapping[str, Any] | None,
        caller: asyncio.Future[None],
    ) -> OutgoingMessage:
        """The next message of this publisher, on its key's lane, with what goes on the
        wire; raises :class:`InvalidMessageError` (its headers too large) and then takes no
        sequence number."""
        sequence = self._next_sequence
        published_at = time.time_ns() // 1000
        size = len(body)
        header_frame = 0
        properties = None
        table = b""
        if headers:
            # The plain properties now (they check the names and values): the frame they
            # make is measured against frame_max, and they are what goes if the job is sent
            # alone. Without application headers the frame is small (a key is at most 1,024
            # bytes) and fits AMQP's minimum frame_max of 4,096: nothing to measure.
            properties = encode_envelope(
                ref,
                publisher_id=self.publisher_id,
                sequence=sequence,
                delivery_mode=self._delivery_mode,
                user_id=self._user_id,
                content_type=content_type,
                headers=headers,
                published_at=published_at,
            )
            table = encode_headers(headers)  # as a batch carries them; encodable: checked
            header_frame = header_frame_size(properties, len(body))
            self._check_header_frame(header_frame)
            size += header_frame
            if size > self.settings.max_pending_bytes:
                raise InvalidMessageError(
                    f"body and headers are {size} bytes; max_pending_bytes is "
                    f"{self.settings.max_pending_bytes} (RABBITKEYS_MAX_PENDING_BYTES)"
                )
        record = Record(sequence, published_at, body, content_type, table)
        exchange = self._exchanges.get(ref.job_type)
        if exchange is None:
            exchange = self._exchanges[ref.job_type] = self._names.jobs_exchange(ref.job_type)
        lane = self._lanes.lane(ref, exchange)
        entry = OutgoingMessage(
            sequence=sequence,
            lane=lane,
            caller=caller,
            size=size,
            header_frame=header_frame,
            # its record's size in a batch (RECORD_OVERHEAD counts the table's length field)
            wire_size=RECORD_OVERHEAD
            + len(body)
            + (len(table) - 4 if table else 0)
            + len(content_type or ""),
            record=record,
            properties=properties,
        )
        self._next_sequence += 1
        return entry

    def _watch_deadline(self, entry: OutgoingMessage, loop: asyncio.AbstractEventLoop) -> None:
        deadlines = self._deadlines
        while deadlines and deadlines[0].caller.done():
            deadlines.popleft()
        if len(deadlines) > 2 * len(self._unsettled) + 1024:  # a long-lived one at the front
            self._deadlines = deadlines = deque(e for e in deadlines if not e.caller.done())
        deadlines.append(entry)
        if self._deadline_timer is None:
            self._deadline_timer = loop.call_at(deadlines[0].deadline, self._deadlines_over)

    def _deadlines_over(self) -> None:
        """The oldest publish's ``publish_timeout`` is over: give up every one whose is."""
        self._deadline_timer = None
        deadlines = self._deadlines
        loop = asyncio.get_running_loop()
        now = loop.time()
        while deadlines:
            entry = deadlines[0]
            if not entry.caller.done():
                if entry.deadline > now:
                    self._deadline_timer = loop.call_at(entry.deadline, self._deadlines_over)
                    return
                self._carrier.give_up(entry)
            deadlines.popleft()

    def _check_header_frame(self, header_frame: int) -> None:
        frame_max = self._lanes.frame_max
        if frame_max and header_frame > frame_max:
            raise InvalidMessageError(
                f"the headers make a content header frame of {header_frame} bytes; the "
                f"connection's frame_max is {frame_max} bytes (send big data in the body)"
            )


def encode_body(payload: object, max_message_bytes: int) -> tuple[bytes, str | None]:
    """The body and content type ``payload`` is sent as
    (:func:`~rabbitkeys._wire.payload.encode_payload`),
    checked against ``max_message_bytes``. Bytes pass through untouched (no copy); a bytearray or
    memoryview is copied here, so a caller that changes it afterwards changes nothing sent.
    Raises :class:`InvalidMessageError`."""
    encoded, content_type = encode_payload(payload)
    body = encoded if type(encoded) is bytes else bytes(encoded)
    if len(body) > max_message_bytes:
        raise InvalidMessageError(
            f"body is {len(body)} bytes; the maximum is {max_message_bytes} "
            f"(RABBITKEYS_MAX_MESSAGE_BYTES)"
        )
    return body, content_type
