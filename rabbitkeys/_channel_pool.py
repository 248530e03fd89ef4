"""A few AMQP channels used round-robin for management calls (declare, bind, delete).

A refused call (say PRECONDITION_FAILED) closes the channel it ran on; the pool opens a new
one in its place on the next call, so one bad key never stops the others.
"""

from __future__ import annotations

import itertools

import aiormq
from aio_pika.abc import AbstractConnection

__all__ = ["ChannelPool"]


class ChannelPool:
    def __init__(self, connection: AbstractConnection, size: int) -> None:
        self._connection = connection
        self._channels: list[aiormq.abc.AbstractChannel | None] = [None] * size
        self._turn = itertools.cycle(range(size))

    async def get(self) -> aiormq.abc.AbstractChannel:
        slot = next(self._turn)
        channel = self._channels[slot]
        if channel is None or channel.is_closed:
            opened = await self._connection.channel(publisher_confirms=False)
            channel = self._channels[slot] = await opened.get_underlay_channel()
        return channel
