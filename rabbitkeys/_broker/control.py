"""Control traffic over AMQP: the shared topology the registry declares, how control
messages are built, and request/reply with the registry.

Every control message travels on a named exchange of its direction (``_wire.topology.Names``)
and carries ``user_id``, which the broker checks against the connection's user: the
receiver learns the sender's role from the exchange and its identity from ``user_id``
(``_wire.senders``). Only the registry declares the shared names; a client that finds them
missing waits for a registry to have started once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any, cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from .._errors import ConfigError, PublishError, RegistryUnavailableError
from .._wire.protocol import MAX_REPLY_BYTES, ControlMessage, decode_control, encode_control
from .._wire.topology import Names, control_queue_arguments, unlimited_deliveries_command
from .amqp import broker_version, close_channel, fresh_channel, passive_declare_refusal

log = logging.getLogger("rabbitkeys")

__all__ = [
    "ControlClient",
    "control_message",
    "declare_control_topology",
    "publish_control",
    "wait_for_topology",
]

# How often a party that found the namespace's control names missing looks again.
_TOPOLOGY_POLL = 0.5


async def declare_control_topology(
    connection: AbstractConnection, channel: AbstractChannel, names: Names, queue_type: str
) -> None:
    """The registry's part: every shared control name (idempotent, durable). The registry
    and dead-letter queues are of ``queue_type`` (RABBITKEYS_QUEUE_TYPE): a quorum registry
    queue keeps new keys and membership flowing through the loss of a node."""
    fanout, direct = aio_pika.ExchangeType.FANOUT, aio_pika.ExchangeType.DIRECT
    # Clients wait for the membership exchange (workers) or NS.replies (a ControlClient
    # binding its reply queue, which then sends at once): NS.replies comes last, so that a
    # client which found it finds every other one. Declared first, a status request from
    # a client started in between met NOT_FOUND on NS.requests.
    await channel.declare_exchange(names.commands_exchange, direct, durable=True)
    dead_letters = await channel.declare_exchange(names.dead_letter_exchange, fanout, durable=True)
    membership = await channel.declare_exchange(names.membership_exchange, fanout, durable=True)
    # the holds (bindings, never a route: internal) before anything may be held
    await channel.declare_exchange(names.holds_exchange, direct, durable=True, internal=True)
    operations = await channel.declare_exchange(names.operations_exchange, fanout, durable=True)
    requests = await channel.declare_exchange(names.requests_exchange, fanout, durable=True)
    await channel.declare_exchange(names.replies_exchange, direct, durable=True)
    arguments = control_queue_arguments(queue_type, broker_version(connection))
    for queue, sources in (
        (names.registry_queue, (requests, membership, operations)),
        (names.dead_letter_queue, (dead_letters,)),
    ):
        await _declare_durable(connection, queue, arguments)
        declared = await channel.get_queue(queue, ensure=False)
        for source in sources:
            await declared.bind(source)


async def _declare_durable(
    connection: AbstractConnection, queue: str, arguments: dict[str, Any]
) -> None:
    """Declare a durable control queue; one that exists with other arguments (declared
    before a RABBITKEYS_QUEUE_TYPE change) is kept as it is, with a warning: its type
    changes only if an operator deletes it (it holds messages)."""
    try:
        async with fresh_channel(connection) as channel:
            await channel.queue_declare(queue, durable=True, arguments=arguments)
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        if "inequivalent arg" not in str(exc):
            raise
        log.warning("queue %s is kept as it is, not as RABBITKEYS_QUEUE_TYPE says: %s", queue, exc)
        if "x-delivery-limit" in str(exc):
            log.warning(
                "queue %s keeps RabbitMQ 4's delivery limit (a message let go 20 times is "
                "dropped); lift it with: %s",
                queue,
                unlimited_deliveries_command(queue.rpartition(".")[0]),
            )
        async with fresh_channel(connection) as channel:
            await channel.queue_declare(queue, passive=True)


async def topology_exists(connection: AbstractConnection, exchange: str) -> bool:
    """Whether ``exchange`` exists: a passive declare, which needs no permission up to
    RabbitMQ 4.2.5 and any permission on the name from 4.2.7 and 4.3.1 (the worker writes
    on ``NS.membership``, a publisher on ``NS.requests``, operators on ``NS.operations``).
    Raises :class:`ConfigError` saying so when the broker refuses it (4.2.6 and 4.3.0 ask
    configure): otherwise a worker would reconnect forever over an ACCESS_REFUSED."""
    try:
        async with fresh_channel(connection) as probe:
            await probe.exchange_declare(exchange, passive=True)
            return True
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False
    except aiormq.exceptions.ChannelAccessRefused as exc:
        refusal = passive_declare_refusal(f"exchange {exchange!r}", exc)
        log.error("%s", refusal)
        raise ConfigError(refusal) from exc


async def wait_for_topology(
    connection: AbstractConnection, exchange: str, *, timeout: float | None = None
) -> bool:
    """Wait until a registry has declared ``exchange``; False if ``timeout`` passed first."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not await topology_exists(connection, exchange):
        if deadline is not None and time.monotonic() >= deadline:
            return False
        await asyncio.sleep(_TOPOLOGY_POLL)
    return True


def control_message(
    payload: Any, *, user_id: str, expiration: float | None = None, **properties: Any
) -> aio_pika.Message:
    """``user_id``: the connection's user (the broker refuses any other)."""
    return aio_pika.Message(
        encode_control(payload),
        content_type="application/json",
        expiration=expiration,
        delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
        user_id=user_id,
        **properties,
    )


async def publish_control(
    channel: AbstractChannel,
    exchange: str,
    message: aio_pika.Message,
    routing_key: str,
    *,
    mandatory: bool = False,
) -> Any:
    """Publish a control message and wait for the broker's confirm (or return), not for
    the socket write: aio-pika's ``publish`` holds the channel's lock until its frames are
    written out, so publishes on one channel leave one per event-loop turn, and a burst of
    a thousand new keys waited seconds for it (requests, replies and assignments alike).
    Frames still leave in call order (the write queue is FIFO)."""
    # aiormq's Channel has ``wait``; its abstract base does not declare it
    underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
    return await underlay.basic_publish(
        message.body,
        exchange=exchange,
        routing_key=routing_key,
        properties=message.properties,
        mandatory=mandatory,
        wait=False,
    )


class ControlClient:
    """Sends requests to the registry and waits for the matching reply: through
    ``exchange``, by default ``NS.requests`` (a publisher's); operator requests go through
    ``NS.operations`` (``names.operations_exchange``), which only the registry's role may
    write on."""

    def __init__(
        self,
        connection: AbstractConnection,
        names: Names,
        user_id: str,
        *,
        exchange: str | None = None,
    ) -> None:
        self._connection = connection
        self._names = names
        self._user_id = user_id
        self._exchange = exchange or names.requests_exchange
        self._registry_seen = False
        self._pending: dict[str, asyncio.Future[ControlMessage]] = {}
        self._channel: AbstractChannel | None = None
        self._reply_queue = names.reply_queue(uuid.uuid4().hex)

    async def start(self) -> None:
        self._channel = await self._connection.channel()
        self._channel.close_callbacks.add(self._on_channel_close)
        queue = await self._channel.declare_queue(
            self._reply_queue, exclusive=True, auto_delete=True
        )
        await self._bind_reply_queue()
        await queue.consume(self._on_reply, no_ack=True)

    async def _bind_reply_queue(self) -> bool:
        """Bind the reply queue to ``NS.replies``; False if no registry has declared that
        exchange yet. The bind is its own existence check (NOT_FOUND): it needs only rights
        every role has on those names, where a passive declare asked configure on RabbitMQ
        4.2.6 and 4.3.0. On a channel of its own, which NOT_FOUND closes (the queue is
        exclusive to this connection, not to a channel)."""
        with contextlib.suppress(aiormq.exceptions.ChannelNotFoundEntity):
            async with fresh_channel(self._connection) as channel:
                await channel.queue_bind(
                    self._reply_queue, self._names.replies_exchange, routing_key=self._reply_queue
                )
                self._registry_seen = True
        return self._registry_seen

    async def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        if self._channel is not None:
            await close_channel(self._channel)  # bounded: a publisher's close must not hang

    async def request(self, payload: Any, *, timeout: float) -> ControlMessage:
        """Send ``payload`` to the registry; raise :class:`RegistryUnavailableError` if no
        reply comes within ``timeout`` seconds."""
        assert self._channel is not None, "ControlClient.start() was not awaited"
        correlation_id = uuid.uuid4().hex
        future: asyncio.Future[ControlMessage] = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = future
        deadline = time.monotonic() + timeout
        try:
            if not self._registry_seen:
                # No registry had run in this namespace when we started: its exchanges
                # appear when one does (NS.replies last: declare_control_topology).
                while not await self._bind_reply_queue():
                    if time.monotonic() + _TOPOLOGY_POLL >= deadline:
                        raise TimeoutError
                    await asyncio.sleep(_TOPOLOGY_POLL)
                remaining = deadline - time.monotonic()
                try:
                    found = await wait_for_topology(
                        self._connection, self._exchange, timeout=remaining
                    )
                except ConfigError as exc:
                    # refused by the broker: the request is never sent, say why
                    raise PublishError(str(exc)) from exc
                if not found:
                    raise TimeoutError
            while True:
                remaining = max(0.001, deadline - time.monotonic())
                try:
                    sent = await publish_control(
                        self._channel,
                        self._exchange,
                        control_message(
                            payload,
                            user_id=self._user_id,
                            expiration=remaining,
                            reply_to=self._reply_queue,
                            correlation_id=correlation_id,
                        ),
                        "",
                        mandatory=True,
                    )
                except aiormq.exceptions.DeliveryError as exc:
                    sent = exc  # nacked: as returned (RabbitMQ 4.0, its queue's node down)
                if isinstance(sent, aiormq.spec.Basic.Ack):
                    break
                # Returned: the registry's queue is not bound yet (a registry starting for
                # the first time declares the exchange a moment before it binds), or its
                # node is down (3.10 returns the request, 4.0 nacks it).
                if time.monotonic() + _TOPOLOGY_POLL >= deadline:
                    raise TimeoutError
                await asyncio.sleep(_TOPOLOGY_POLL)
            return await asyncio.wait_for(future, max(0.001, deadline - time.monotonic()))
        except TimeoutError:
            raise RegistryUnavailableError(
                f"no registry answered within {timeout:g}s "
                f"(is `rabbitkeys registry` running in namespace {self._names.namespace!r}?)"
            ) from None
        finally:
            self._pending.pop(correlation_id, None)

    def _on_channel_close(self, *_: Any) -> None:
        # No reply can come any more: fail the waiting requests now, not at their timeout.
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError("control channel closed"))

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        # Only the registry writes on the replies exchange (permissions).
        if message.exchange != self._names.replies_exchange or not message.user_id:
            return
        future = self._pending.get(message.correlation_id or "")
        if future is None or future.done():
            return  # a reply to a request that has already timed out
        try:
            future.set_result(decode_control(message.body, max_bytes=MAX_REPLY_BYTES))
        except Exception as exc:  # a malformed reply fails that request, nothing else
            future.set_exception(exc)
