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

Why a returned message can be put back in its place: every binding the registry makes gets
a fresh routing key (see ``new_routing_key``), so once one message on a routing key comes
back, every later message on it comes back too. No later message of the lane can overtake it.
"""

from __future__ import annotations

import asyncio
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

from ._connection import connect
from ._control import ControlClient
from ._errors import InvalidMessageError, PublishError, RegistryUnavailableError
from ._protocol import Ensured, EnsureKey, Refused
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

_RESERVED_HEADER_PREFIX = "x-rabbitkeys-"


@dataclass(eq=False)
class _Entry:
    """One publish() call, from the call until the broker confirmed it into the key's queue."""

    sequence: int
    body: bytes
    properties: spec.Basic.Properties
    future: asyncio.Future[None]
    routing_key: str | None = None


@dataclass(eq=False)
class _Lane:
    ref: KeyRef
    exchange: str
    routing_key: str | None = None
    next_sequence: int = 1
    in_flight: int = 0
    waiting: deque[_Entry] = field(default_factory=deque)
    returned: list[_Entry] = field(default_factory=list)
    ensuring: bool = False
    stale_routing_key: str | None = None


class Publisher:
    """Publishes keyed jobs; per key, in the order of the ``publish()`` calls.

    ``Publisher()`` reads its settings from the ``RABBITKEYS_*`` environment; pass a
    :class:`Settings` to choose them in code.
    """

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings if settings is not None else load_settings()
        #: travels in every message, so a worker can tell publishers apart (dedup, order checks)
        self.publisher_id = uuid.uuid4().hex
        self._names = Names(self.settings.namespace)
        self._lanes: dict[str, _Lane] = {}
        self._connection: AbstractConnection | None = None
        self._channel: aiormq.Channel | None = None
        self._control: ControlClient | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._delivery_mode = 2 if self.settings.durable else 1
        #: messages that came back (``basic.return``) and were routed again
        self.returned_messages = 0

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
        self._connection = await connect(self.settings, f"publisher {self.publisher_id}")
        channel = await self._connection.channel(publisher_confirms=True)
        # The underlying aiormq channel: its basic_publish writes frames in call order
        # (one FIFO lock), which is what keeps overlapping publishes of a key in order.
        self._channel = cast(aiormq.Channel, await channel.get_underlay_channel())
        self._control = ControlClient(self._connection, self._names)
        await self._control.start()

    async def close(self) -> None:
        """Wait for every publish already called to settle, then disconnect."""
        pending = [
            entry.future
            for lane in self._lanes.values()
            for entry in (*lane.waiting, *lane.returned)
        ]
        if pending or self._background:
            await asyncio.wait([*pending, *self._background], timeout=self.settings.ensure_timeout)
        if self._control is not None:
            await self._control.close()
        if self._connection is not None:
            await self._connection.close()

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
        if self._channel is None:
            raise PublishError("Publisher is not started: use `async with Publisher() as pub`")
        lane = self._lanes.get(ref.id)
        if lane is None:
            lane = self._lanes[ref.id] = _Lane(ref, self._names.jobs_exchange(ref.job_type))
        entry = _Entry(
            sequence=lane.next_sequence,
            body=bytes(body),
            properties=self._properties(ref, lane.next_sequence, headers),
            future=asyncio.get_running_loop().create_future(),
        )
        lane.next_sequence += 1
        if lane.routing_key is not None and not lane.waiting and not lane.returned:
            self._send(lane, entry)
        else:
            lane.waiting.append(entry)
            self._ensure_when_settled(lane)
        await entry.future

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
        table[HEADER_PUBLISHED_AT] = time.time()
        properties = spec.Basic.Properties(
            delivery_mode=self._delivery_mode, headers=table, message_id=uuid.uuid4().hex
        )
        try:  # fail here, in the caller, rather than as a broken channel later
            spec.Basic.Properties.marshal(properties)
        except Exception as exc:
            raise InvalidMessageError(f"headers cannot be encoded in AMQP: {exc}") from None
        return properties

    def _send(self, lane: _Lane, entry: _Entry) -> None:
        assert self._channel is not None and lane.routing_key is not None
        entry.routing_key = lane.routing_key
        lane.in_flight += 1
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
        task.add_done_callback(partial(self._on_confirm, lane, entry))

    def _on_confirm(self, lane: _Lane, entry: _Entry, task: asyncio.Future[Any]) -> None:
        lane.in_flight -= 1
        if task.cancelled():
            _fail(entry, PublishError("publish was cancelled before the broker confirmed it"))
        elif (error := task.exception()) is not None:
            _fail(entry, PublishError(f"the broker did not confirm the message: {error!r}"))
        elif isinstance(task.result(), spec.Basic.Ack):
            if not entry.future.done():
                entry.future.set_result(None)
        elif isinstance(task.result(), aiormq.abc.DeliveredMessage):
            # basic.return: no binding for this routing key any more (key retired, queue
            # expired or deleted). The message is not published; it goes back in its place.
            lane.returned.append(entry)
            self.returned_messages += 1
            if lane.routing_key == entry.routing_key:
                lane.stale_routing_key = lane.routing_key
                lane.routing_key = None
        else:
            _fail(entry, PublishError(f"the broker refused the message: {task.result()!r}"))
        self._ensure_when_settled(lane)

    def _ensure_when_settled(self, lane: _Lane) -> None:
        """Once nothing of the lane is in flight, put returned messages back in front of the
        waiting ones (in sequence order) and ask the registry for a routing key."""
        if lane.in_flight or lane.ensuring:
            return
        if lane.returned:
            lane.returned.sort(key=lambda entry: entry.sequence)
            lane.waiting.extendleft(reversed(lane.returned))
            lane.returned.clear()
        if not lane.waiting:
            return
        lane.ensuring = True
        task = asyncio.ensure_future(self._ensure(lane))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _ensure(self, lane: _Lane) -> None:
        assert self._control is not None
        try:
            reply = await self._control.request(
                EnsureKey(
                    job_type=lane.ref.job_type,
                    key=lane.ref.key,
                    stale_routing_key=lane.stale_routing_key,
                ),
                timeout=self.settings.ensure_timeout,
            )
            if isinstance(reply, Refused):
                raise PublishError(f"the registry refused key {lane.ref.key!r}: {reply.reason}")
            if not isinstance(reply, Ensured):
                raise PublishError(f"unexpected reply from the registry: {reply.type}")
        except (RegistryUnavailableError, PublishError, aiormq.exceptions.AMQPError) as exc:
            error = exc if isinstance(exc, PublishError) else PublishError(repr(exc))
            while lane.waiting:
                _fail(lane.waiting.popleft(), error)
            return
        finally:
            lane.ensuring = False
        lane.routing_key = reply.routing_key
        lane.stale_routing_key = None
        while lane.waiting and lane.routing_key is not None:
            entry = lane.waiting.popleft()
            if not entry.future.done():  # its caller may have given up (cancelled)
                self._send(lane, entry)


def _fail(entry: _Entry, error: BaseException) -> None:
    if not entry.future.done():
        entry.future.set_exception(error)
