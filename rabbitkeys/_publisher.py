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

Why a returned message can be put back in its place: every binding the registry makes gets
a fresh routing key (see ``new_routing_key``), so once one message on a routing key comes
back, every later message on it comes back too. No later message of the lane can overtake it.
"""

from __future__ import annotations

import asyncio
import contextlib
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

from ._connection import keep_connected
from ._control import ControlClient
from ._errors import (
    BrokerUnavailableError,
    InvalidMessageError,
    PublishError,
    QuotaExceededError,
    RabbitkeysError,
    RegistryUnavailableError,
)
from ._metrics import PublisherMetrics
from ._protocol import REFUSED_QUOTA_EXCEEDED, Ensured, EnsureKey, Refused
from ._settings import Settings, load_settings
from ._topology import (
    DEFAULT_JOB_TYPE,
    HEADER_JOB_TYPE,
    HEADER_KEY,
    HEADER_PUBLISHED_AT,
    HEADER_PUBLISHER,
    HEADER_SEQUENCE,
    KeyRef,
    Names,
)

__all__ = ["Publisher"]

log = logging.getLogger("rabbitkeys.publisher")

_RESERVED_HEADER_PREFIX = "x-rabbitkeys-"
# RabbitMQ's default max_message_size; a bigger body would close the channel for every key.
_MAX_BODY_BYTES = 128 * 1024 * 1024
# Lanes of idle keys beyond this many are dropped (their routing key is asked for again).
_MAX_IDLE_LANES = 100_000
_CHANNEL_ERRORS = (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError)


@dataclass(eq=False)
class _Entry:
    """One publish() call, from the call until the broker confirmed it into the key's queue."""

    sequence: int
    body: bytes
    properties: spec.Basic.Properties
    future: asyncio.Future[None]
    routing_key: str | None = None
    #: the publish task of the current send; a callback from an older one is ignored
    task: asyncio.Future[Any] | None = None


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
        self._background: set[asyncio.Task[Any]] = set()
        self._delivery_mode = 2 if self.settings.durable else 1
        # One counter for all keys: per key the numbers still only grow (what dedup and
        # order checks need), and a dropped idle lane cannot restart them at 1.
        self._next_sequence = 1
        self._unsettled: set[asyncio.Future[None]] = set()
        self._connected = asyncio.Event()
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
        self._connection_task = asyncio.ensure_future(
            keep_connected(
                self.settings,
                f"publisher {self.publisher_id}",
                self._session,
                self._closing,
                log,
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
        connection.close_callbacks.add(lambda *_: lost.set())
        channel = await connection.channel(publisher_confirms=True)
        # A channel the broker closed (say, a refused frame) is as good as a lost connection.
        channel.close_callbacks.add(lambda *_: lost.set())
        control = ControlClient(connection, self._names)
        await control.start()
        # The underlying aiormq channel: its basic_publish writes frames in call order
        # (one FIFO lock), which is what keeps overlapping publishes of a key in order.
        self._channel = cast(aiormq.Channel, await channel.get_underlay_channel())
        self._control = control
        self._connected.set()
        for lane in self._lanes.values():
            self._pump(lane)
        try:
            closing = asyncio.ensure_future(self._closing.wait())
            lost_wait = asyncio.ensure_future(lost.wait())
            await asyncio.wait([closing, lost_wait], return_when=asyncio.FIRST_COMPLETED)
            closing.cancel()
            lost_wait.cancel()
            if lost.is_set() and not self._closing.is_set():
                raise ConnectionError("connection to the broker lost")
        finally:
            self._connected.clear()
            self._channel = None
            self._abandon_in_flight()

    def _abandon_in_flight(self) -> None:
        """The connection is gone: whatever waited for a confirm on it will be sent again.
        Not left to the old channel's futures: on an abrupt loss some never complete, and a
        lane waiting for them would never send again."""
        for lane in self._lanes.values():
            for entry in sorted(lane.in_flight, key=lambda entry: entry.sequence):
                task, entry.task = entry.task, None
                if task is not None:
                    task.cancel()
                if not entry.future.done():
                    lane.returned.append(entry)
                    self.resent_messages += 1
                    self.metrics.resent.inc()
            lane.in_flight.clear()

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
        queue. Raises :class:`InvalidKeyError` / :class:`InvalidMessageError` before sending
        anything, :class:`RegistryUnavailableError` if a new key could not be routed in
        ``ensure_timeout``, :class:`PublishError` if the broker refused the message."""
        ref = KeyRef.of(key, job_type)
        if not isinstance(body, bytes | bytearray | memoryview):
            raise InvalidMessageError(f"body must be bytes, got {type(body).__name__}")
        if len(body) > _MAX_BODY_BYTES:
            raise InvalidMessageError(f"body is {len(body)} bytes; the maximum is 128 MiB")
        if self._connection_task is None or self._closing.is_set():
            raise PublishError("Publisher is not started: use `async with Publisher() as pub`")
        lane = self._lanes.get(ref.id)
        if lane is None:
            if len(self._lanes) >= _MAX_IDLE_LANES:
                self._drop_idle_lanes()
            lane = self._lanes[ref.id] = _Lane(ref, self._names.jobs_exchange(ref.job_type))
        entry = _Entry(
            sequence=self._next_sequence,
            body=bytes(body),
            properties=self._properties(ref, self._next_sequence, headers),
            future=asyncio.get_running_loop().create_future(),
        )
        self._next_sequence += 1
        self._unsettled.add(entry.future)
        entry.future.add_done_callback(self._unsettled.discard)
        lane.waiting.append(entry)
        self._pump(lane)
        # A timer, not asyncio.wait_for: no extra task per message on the hot path.
        started = time.perf_counter()
        timer = asyncio.get_running_loop().call_later(
            self.settings.publish_timeout, self._give_up, entry
        )
        try:
            await entry.future  # a caller that cancels also withdraws a message not yet sent
        except RabbitkeysError:
            self.metrics.publish_failures.inc()
            raise
        finally:
            timer.cancel()
        self.metrics.published.inc()
        self.metrics.publish_duration.observe(time.perf_counter() - started)

    def _give_up(self, entry: _Entry) -> None:
        """No confirm within publish_timeout: the message is not sent again. If an earlier
        send reached the broker it is delivered anyway (a documented duplicate case)."""
        _fail(
            entry,
            PublishError(
                f"the broker did not confirm the message within "
                f"{self.settings.publish_timeout:g}s (is it reachable?)"
            ),
        )

    def _drop_idle_lanes(self) -> None:
        """Forget the oldest lanes with nothing pending (memory stays flat under key churn)."""
        idle = [
            key_id
            for key_id, lane in self._lanes.items()
            if not (lane.in_flight or lane.waiting or lane.returned or lane.ensuring)
        ]
        for key_id in idle[: len(self._lanes) - _MAX_IDLE_LANES * 9 // 10]:
            del self._lanes[key_id]

    def _properties(
        self, ref: KeyRef, sequence: int, headers: Mapping[str, Any] | None
    ) -> spec.Basic.Properties:
        table: dict[str, Any] = {}
        if headers:
            for name, value in headers.items():
                if not isinstance(name, str) or name.startswith(_RESERVED_HEADER_PREFIX):
                    raise InvalidMessageError(
                        f"header name {name!r} is not a str or is reserved "
                        f"({_RESERVED_HEADER_PREFIX}*)"
                    )
                table[name] = value
        table[HEADER_KEY] = ref.key
        table[HEADER_JOB_TYPE] = ref.job_type
        table[HEADER_PUBLISHER] = self.publisher_id
        table[HEADER_SEQUENCE] = sequence
        # integer microseconds: AMQP tables carry Python floats as 32-bit floats (pamqp),
        # which would round an epoch timestamp to minutes
        table[HEADER_PUBLISHED_AT] = time.time_ns() // 1000
        # aiormq adds a random message_id, which it needs to match a basic.return
        properties = spec.Basic.Properties(delivery_mode=self._delivery_mode, headers=table)
        if headers:
            try:  # fail here, in the caller, rather than as a broken channel later
                spec.Basic.Properties.marshal(properties)
            except Exception as exc:
                raise InvalidMessageError(f"headers cannot be encoded in AMQP: {exc}") from None
        return properties

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
            task = asyncio.ensure_future(self._ensure(lane))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return
        while lane.waiting:
            entry = lane.waiting.popleft()
            if not entry.future.done():  # its caller may have given up
                self._send(lane, entry)

    def _send(self, lane: _Lane, entry: _Entry) -> None:
        assert self._channel is not None and lane.routing_key is not None
        entry.routing_key = lane.routing_key
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
            _fail(entry, PublishError(f"the broker refused the message: {error!r}"))
        elif task.cancelled() or error is not None:
            # The channel or connection went away before the confirm: send it again later.
            if not entry.future.done():
                lane.returned.append(entry)
                self.resent_messages += 1
                self.metrics.resent.inc()
        elif isinstance(task.result(), spec.Basic.Ack):
            if not entry.future.done():
                entry.future.set_result(None)
        elif isinstance(task.result(), aiormq.abc.DeliveredMessage):
            # basic.return: no binding for this routing key any more (key retired, queue
            # expired or deleted). The message is not published; it goes back in its place.
            lane.returned.append(entry)
            self.returned_messages += 1
            self.metrics.returned.inc()
            if lane.routing_key == entry.routing_key:
                lane.stale_routing_key = lane.routing_key
                lane.routing_key = None
        else:
            _fail(entry, PublishError(f"the broker refused the message: {task.result()!r}"))
        self._pump(lane)

    async def _ensure(self, lane: _Lane) -> None:
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
            while lane.waiting:
                _fail(lane.waiting.popleft(), exc)
            return
        except (*_CHANNEL_ERRORS, ConnectionError) as exc:
            # The connection dropped during the request: ask again once reconnected.
            log.debug("ensure of %s interrupted: %r", lane.ref.id, exc)
            return
        finally:
            lane.ensuring = False
        lane.routing_key = reply.routing_key
        lane.stale_routing_key = None
        self._pump(lane)


def _fail(entry: _Entry, error: BaseException) -> None:
    if not entry.future.done():
        entry.future.set_exception(error)
