"""Request/reply with the registry over AMQP, and the control queue's declaration.

Requests go to the registry queue, which every party declares the same way so that a
request made before any registry runs waits there (each carries an expiration, so a
registry that starts late does not act on requests whose caller has given up).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from ._errors import RegistryUnavailableError
from ._protocol import MAX_REPLY_BYTES, ControlMessage, decode, encode
from ._topology import Names

__all__ = ["ControlClient", "control_message", "declare_registry_queue"]


async def declare_registry_queue(channel: AbstractChannel, names: Names) -> None:
    await channel.declare_queue(names.registry_queue, durable=True)


def control_message(
    payload: Any, *, expiration: float | None = None, **properties: Any
) -> aio_pika.Message:
    return aio_pika.Message(
        encode(payload),
        content_type="application/json",
        expiration=expiration,
        delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
        **properties,
    )


class ControlClient:
    """Sends requests to the registry and waits for the matching reply."""

    def __init__(self, connection: AbstractConnection, names: Names) -> None:
        self._connection = connection
        self._names = names
        self._pending: dict[str, asyncio.Future[ControlMessage]] = {}
        self._channel: AbstractChannel | None = None
        self._reply_queue = names.reply_queue(uuid.uuid4().hex)

    async def start(self) -> None:
        self._channel = await self._connection.channel()
        self._channel.close_callbacks.add(self._on_channel_close)
        await declare_registry_queue(self._channel, self._names)
        queue = await self._channel.declare_queue(
            self._reply_queue, exclusive=True, auto_delete=True
        )
        await queue.consume(self._on_reply, no_ack=True)

    async def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()

    async def request(self, payload: Any, *, timeout: float) -> ControlMessage:
        """Send ``payload`` to the registry; raise :class:`RegistryUnavailableError` if no
        reply comes within ``timeout`` seconds."""
        assert self._channel is not None, "ControlClient.start() was not awaited"
        correlation_id = uuid.uuid4().hex
        future: asyncio.Future[ControlMessage] = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = future
        try:
            await self._channel.default_exchange.publish(
                control_message(
                    payload,
                    expiration=timeout,
                    reply_to=self._reply_queue,
                    correlation_id=correlation_id,
                ),
                routing_key=self._names.registry_queue,
            )
            return await asyncio.wait_for(future, timeout)
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
        future = self._pending.get(message.correlation_id or "")
        if future is None or future.done():
            return  # a reply to a request that has already timed out
        try:
            future.set_result(decode(message.body, max_bytes=MAX_REPLY_BYTES))
        except Exception as exc:  # a malformed reply fails that request, nothing else
            future.set_exception(exc)
