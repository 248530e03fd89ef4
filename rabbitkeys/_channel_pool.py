"""Opening AMQP channels safely, and a few of them used round-robin for management calls
(declare, bind, delete).

A refused call (say PRECONDITION_FAILED) closes the channel it ran on; the pool opens a new
one in its place on the next call, so one bad key never stops the others.

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

import itertools
import weakref

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection

__all__ = ["ChannelPool", "open_channel"]

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
    def __init__(self, connection: AbstractConnection, size: int) -> None:
        self._connection = connection
        self._channels: list[aiormq.abc.AbstractChannel | None] = [None] * size
        self._turn = itertools.cycle(range(size))

    async def get(self) -> aiormq.abc.AbstractChannel:
        slot = next(self._turn)
        channel = self._channels[slot]
        if channel is None or channel.is_closed:
            opened = await open_channel(self._connection)
            channel = self._channels[slot] = await opened.get_underlay_channel()
        return channel
